"""Measurement helpers: device timing, the bf16 matmul peak, host-sync counting, counted FLOPs, machine.

FLOPs are model FLOPs (2 per multiply-add) counted from the architecture, not from the kernels:
- decoder training (fwd + bwd = 3 x fwd) over packed documents of lengths n_d:
  6 * N_active * sum(n_d) + 6 * L * H * sum(n_d^2), N_active = DecoderConfig.activated_params()
  (attention, dense MLP / router + shared + top-k experts, final norm, lm_head; no embedding);
  causal attention counts n^2/2 pairs of QK^T and PV (4 H FLOPs each) per layer, x3 for backward.
- frozen SAM + neck + compressor, forward only: patch conv, qkv / proj on the zero-padded 14 x 14
  windows (global blocks: all tokens), MLP, attention 4 * C * sum over groups of n_g^2, the
  decomposed relative-position terms 2 * C * n * (h + w), neck, the two stride-2 compressor convs
  (the augmented q/k channels of our SAM attention are an implementation detail: not counted).
- CLIP-L + projector training (3 x fwd): `pipeline.parallel.memory.clip_flops_per_vision_token`,
  the trainer's MFU count too.
"""

from __future__ import annotations

import gc
import os
import platform
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from decoder import DecoderConfig
from deepencoder.config import VIEW_STRIDE, EncoderConfig, SamConfig
from pipeline.parallel.memory import clip_flops_per_vision_token
from pipeline.train.logging import git_commit


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call of fn(), each call bracketed by device syncs (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_peak_tflops(device: torch.device, quick: bool) -> tuple[float, str]:
    """Best of 3 timings of a large bf16 matmul chain (8192^3 on GPU, 512^3 on CPU), TFLOP/s."""
    n, iters = (512, 3) if quick or device.type != "cuda" else (8192, 20)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = 0.0
    for _ in range(3):
        times = time_calls(lambda: [a @ b for _ in range(iters)], device, warmup=1, iters=1)
        best = max(best, 2 * n**3 * iters / times[0] / 1e12)
    return best, f"best of 3 x {iters} bf16 matmuls {n}x{n}x{n}"


def mfu(flops_per_s: float, peak_tflops: float) -> float | None:
    """Model FLOP utilisation: counted FLOPs per second over the measured matmul peak."""
    return flops_per_s / (peak_tflops * 1e12) if peak_tflops > 0 else None


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def host_sync_sites(fn: Callable[[], object], device: torch.device) -> Counter | None:
    """file:line -> synchronising CUDA calls made there by fn() (torch's sync debug mode; their sum
    is the step's host syncs); None off CUDA (fn still runs)."""
    if device.type != "cuda":
        fn()
        return None
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.set_sync_debug_mode(0)
            sync(device)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message).lower())


# ----------------------------------------------------------------------------- FLOPs


def decoder_train_flops(cfg: DecoderConfig, doc_lengths: Sequence[int]) -> float:
    """Training FLOPs of the decoder over packed documents (see the module docstring)."""
    return sum(cfg.matmul_flops_per_token(n) * n for n in doc_lengths)


def sam_forward_flops(cfg: SamConfig, side: int) -> float:
    """Forward FLOPs of SAM + neck + compressor for one side x side view."""
    if side % VIEW_STRIDE:
        raise ValueError(f"view side must be a multiple of {VIEW_STRIDE}, got {side}")
    c, g = cfg.embed_dim, side // cfg.patch_size
    n = g * g
    flops = 2 * n * c * cfg.in_chans * cfg.patch_size**2  # patch embedding conv
    for i in range(cfg.depth):
        w = cfg.block_window(i)
        if w > 0:
            padded = -(-g // w) * w
            groups, side_tokens = (padded // w) ** 2, w
        else:
            groups, side_tokens = 1, g
        group_n = side_tokens * side_tokens
        flops += 2 * groups * group_n * 4 * c * c  # qkv + proj run on the (padded) windows
        flops += 2 * n * 2 * c * cfg.mlp_dim  # lin1, lin2 on the real tokens
        flops += groups * (4 * c * group_n * group_n + 2 * c * group_n * 2 * side_tokens)  # attn + rel-pos
    out = cfg.out_chans
    flops += 2 * n * c * out + 2 * n * out * out * 9  # neck: 1x1 conv, 3x3 conv
    c2, c3 = cfg.compressor_channels
    flops += 2 * (n // 4) * out * c2 * 9 + 2 * (n // 16) * c2 * c3 * 9  # net_2, net_3
    return float(flops)


def full_step_flops(
    enc: EncoderConfig, dec: DecoderConfig, view_sides: Sequence[int], doc_lengths: Sequence[int]
) -> float:
    """Counted FLOPs of one full training step: frozen SAM fwd, CLIP + projector and decoder fwd + bwd."""
    sam = sum(sam_forward_flops(enc.sam, s) for s in view_sides)
    clip = sum(3 * clip_flops_per_vision_token(enc, s) * (s // VIEW_STRIDE) ** 2 for s in view_sides)
    return sam + clip + decoder_train_flops(dec, doc_lengths)


# ----------------------------------------------------------------------------- machine


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "device_count": torch.cuda.device_count() if device.type == "cuda" else 0,
        "cpu": _cpu_name(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else "-",
        "python": platform.python_version(),
        # the device machine runs a copy of the tree without .git: its caller passes the commit
        "git": os.environ.get("DSOCR_GIT_COMMIT") or (git_commit() or "?")[:7],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info
