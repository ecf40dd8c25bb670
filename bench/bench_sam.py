"""Benchmark: frozen SAM ViT-B + neck + 16x compressor forward, ours vs transformers' DeepSeek-OCR-2 SAM.

Stage 2 runs SAM frozen (PP0), so the step only needs its forward under no_grad. Ours is
deepencoder.sam.SamEncoder (relative positions folded into the q/k channels, one mask-free
SDPA call per block); the peer is transformers' `DeepseekOcr2SamVisionEncoder` with
`downsample_channels=[512, 1024]` (the same architecture; SDPA with the decomposed
relative-position bias materialised as an additive mask), loaded with the same weights, so
the outputs are compared too. Both in bf16, batch 16, views of 1024 and 640 pixels.

Used by bench/suite.py (`dsocr-bench --only sam`).
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from bench.measure import free, peak_memory_gib, reset_peak_memory, sam_forward_flops, time_calls
from deepencoder.config import SamConfig
from deepencoder.sam import SamEncoder

# transformers DeepseekOcr2SamVisionEncoder key prefixes -> ours (the rest is renamed per block)
_PEER_PREFIXES = {
    "patch_embed.proj.": "patch_embed.projection.",
    "neck.0.": "neck.conv1.",
    "neck.1.": "neck.layer_norm1.",
    "neck.2.": "neck.conv2.",
    "neck.3.": "neck.layer_norm2.",
    "net_2.": "proj.conv1.",
    "net_3.": "proj.conv2.",
}


def peer_key(ours: str) -> str:
    """Our SamEncoder key -> the transformers DeepseekOcr2SamVisionEncoder key."""
    for a, b in _PEER_PREFIXES.items():
        if ours.startswith(a):
            return b + ours[len(a) :]
    if ours.startswith("blocks."):
        return (
            ours.replace("blocks.", "layers.", 1)
            .replace(".norm1.", ".layer_norm1.")
            .replace(".norm2.", ".layer_norm2.")
        )
    return ours


def build_ours(cfg: SamConfig, device: torch.device, dtype: torch.dtype) -> SamEncoder:
    """Frozen SamEncoder in eval mode, random init (weights do not change the timing)."""
    with torch.device("meta"):
        model = SamEncoder(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model.to(dtype).eval().requires_grad_(False)


def build_peer(cfg: SamConfig, ours: SamEncoder, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """transformers' DeepSeek-OCR-2 SAM encoder with our sizes and a copy of our weights (strict)."""
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2SamVisionConfig
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2SamVisionEncoder

    hf_cfg = DeepseekOcr2SamVisionConfig(
        hidden_size=cfg.embed_dim,
        output_channels=cfg.out_chans,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.img_size,
        patch_size=cfg.patch_size,
        window_size=cfg.window_size,
        global_attn_indexes=list(cfg.global_attn_indexes),
        downsample_channels=list(cfg.compressor_channels),
        layer_norm_eps=cfg.layer_norm_eps,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        peer = DeepseekOcr2SamVisionEncoder(hf_cfg)
    peer.load_state_dict({peer_key(k): v for k, v in ours.state_dict().items()}, strict=True)
    return peer.to(dtype).eval().requires_grad_(False)


def measure_sam(cfg: SamConfig, sizes: list[int], batch: int, device: torch.device, *, warmup: int, iters: int,
                compile_ours: bool, compile_backend: str = "inductor",
                dtype: torch.dtype = torch.bfloat16) -> dict[int, dict]:  # fmt: skip
    """Per view size: images/s of ours (eager, optionally compiled) and the peer, output agreement."""
    torch.manual_seed(0)
    ours = build_ours(cfg, device, dtype)
    peer = build_peer(cfg, ours, device, dtype)
    results: dict[int, dict] = {side: {"flops_per_image": sam_forward_flops(cfg, side)} for side in sizes}
    for side in sizes:
        x = torch.randn(batch, cfg.in_chans, side, side, device=device, dtype=dtype)
        results[side]["ours"] = _timed(ours, x, device, warmup, iters)
        results[side]["peer"] = _timed(peer, x, device, warmup, iters)
        with torch.no_grad():
            a, b = _forward(ours, x).float(), _forward(peer, x).float()
        results[side]["max_rel_diff"] = float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
        x = a = b = None
        free(device)
    peer = None
    free(device)
    if compile_ours:
        for block in ours.blocks:
            block.compile(dynamic=False, backend=compile_backend)
        for side in sizes:
            x = torch.randn(batch, cfg.in_chans, side, side, device=device, dtype=dtype)
            results[side]["ours_compiled"] = _timed(ours, x, device, warmup + 1, iters)
    ours = x = None
    free(device)
    return results


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x) if not isinstance(model, SamEncoder) else model(x)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def _timed(model: nn.Module, x: torch.Tensor, device: torch.device, warmup: int, iters: int) -> dict:
    """images/s, ms per batch and peak memory of the frozen forward (no_grad, as stage 2 runs it)."""
    reset_peak_memory(device)
    with torch.no_grad():
        t = statistics.median(time_calls(lambda: _forward(model, x), device, warmup, iters))
    return {"images_per_s": x.shape[0] / t, "ms": 1e3 * t, "peak_gib": peak_memory_gib(device)}
