"""Benchmark: one decoder training step (forward, backward, AdamW step), ours vs transformers.

`dsocr-bench --only decoder` (bench/suite.py) times DecoderModel (decoder/) against transformers'
DeepseekOcr2TextModel (grouped_mm experts, SDPA attention) with the same sizes, the same initial
weights, the same lm_head + cross-entropy loss and the same optimizer (torch AdamW, fused on
CUDA), in one process on one device, one model at a time; bf16 parameters, batch 1 x 8192.

Figures of the standalone script this module was until 2026-12-03 (expert backends included):
README, "Component records".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.measure import time_calls
from decoder import DecoderConfig, DecoderModel


def oracle_model(cfg: DecoderConfig, device: torch.device, dtype: torch.dtype):
    """transformers' DeepseekOcr2TextModel with the same sizes, grouped_mm experts, SDPA."""
    from transformers.models.deepseek_ocr2 import DeepseekOcr2TextConfig, DeepseekOcr2TextModel

    hf_cfg = DeepseekOcr2TextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        n_routed_experts=cfg.moe.n_routed_experts,
        num_experts_per_tok=cfg.moe.num_experts_per_tok,
        moe_intermediate_size=cfg.moe.moe_intermediate_size,
        n_shared_experts=cfg.moe.n_shared_experts,
        routed_scaling_factor=cfg.moe.routed_scaling_factor,
        topk_method="greedy",
        mlp_layer_types=["sparse" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.num_layers)],
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        use_cache=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg._experts_implementation = "grouped_mm"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DeepseekOcr2TextModel(hf_cfg)
    finally:
        torch.set_default_dtype(previous)
    return model


class OracleWithHead(torch.nn.Module):
    """Oracle body + an lm_head Linear, returning fp32 logits (the oracle text model has no head)."""

    def __init__(self, body: torch.nn.Module, vocab: int, hidden: int, device, dtype) -> None:
        super().__init__()
        self.body = body
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(input_ids=ids, use_cache=False).last_hidden_state
        return self.lm_head(hidden).float(), torch.zeros((), device=ids.device)


class OursWrapped(torch.nn.Module):
    def __init__(self, model: DecoderModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(ids)
        return out.logits, out.aux_loss


def time_training(model, ids, labels, steps: int, warmup: int, device) -> tuple[list[float], float]:
    """Per-step seconds of fwd + bwd + AdamW step, and the loss of the first (pre-update) step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=device.type == "cuda")
    losses = []

    def step() -> None:
        logits, aux = model(ids)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        (loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    times = time_calls(step, device, warmup, steps)
    return times, float(losses[0])
