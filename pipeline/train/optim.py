"""AdamW with decay/no-decay parameter groups and the paper's LR schedules.

Stage 2 (paper section 3.5): AdamW, step-based schedule, lr 3e-5. Stage 1: cosine
annealing, lr 5e-5. Both with linear warmup. Norm weights, biases, embeddings and
the learned image vectors get no weight decay (the usual practice; nanoGPT,
torchtitan).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from pipeline.config import OptimConfig

SCHEDULES = ("step", "cosine", "constant")
_NO_DECAY_NAMES = ("embed", "norm", "image_newline", "view_seperator", "class_embedding", "pos_embed")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decay / no-decay groups (frozen ones are left out)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(key in name for key in _NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameter: check the freeze settings")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(params: Iterable[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel per step instead of a chain of foreach ops) where torch has the
    fused kernel for every parameter's device: CUDA (A100 and H100 alike) and CPU."""
    groups = list(params)
    devices = {p.device.type for group in groups for p in group["params"]}
    fused = devices <= {"cuda", "cpu"}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def lr_factor(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based)."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    passed = sum(step >= int(m * max_steps) for m in cfg.step_milestones)  # "step"
    return cfg.step_gamma**passed


def build_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, cfg: OptimConfig):
    lr_factor(0, max_steps, cfg)  # validates the schedule name before training starts
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, max_steps, cfg))
