"""DeepSpeed configuration, optimizer and LR schedule of a training job, from the typed RunConfig.

Stage 2 of DeepSeek-OCR (arXiv 2510.18234 section 3.5; ../shared/spec/training.md): AdamW,
lr 3e-5 with a step schedule, bf16, pipeline x data parallel. What this file decides:

- batch keys from `Topology` (train_batch_size = micro x accumulation x DP, validated there);
- ZeRO stage 0 or 1 (DeepSpeed rejects 2/3 with pipelines); bf16 trains with fp32 master
  weights and `data_types.grad_accum_dtype: fp32`, which DeepSpeed only offers with ZeRO-1;
- gradient clipping from `optim.grad_clip` (0 disables; DeepSpeed >= 0.19.3 defaults to 1.0);
- the optimizer is a torch AdamW *object* over `pipeline.train.optim.param_groups` (no decay on
  norms, biases, embeddings), so DeepSpeed does not JIT-build FusedAdam
  (`zero_allow_untested_optimizer`), and the schedule is our `LambdaLR` (`build_scheduler`);
- `pipeline.use_reentrant: false`: reentrant activation checkpointing would mark the first
  stage's pixels as requiring grad and reach back through the frozen SAM
  (../shared/spec/engine_notes.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import OptimConfig, ParallelConfig, TrainConfig
from pipeline.model import validate_compile_options
from pipeline.parallel.topology import Topology
from pipeline.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups

DTYPES = ("fp32", "bf16")
SCHEDULES = ("step", "cosine", "constant")  # pipeline.train.optim.lr_factor


def validate_training_config(p: ParallelConfig, o: OptimConfig, train: TrainConfig) -> None:
    """ValueError for settings the DeepSpeed engine cannot run, naming the field and the fix."""
    if p.dtype not in DTYPES:
        raise ValueError(f"parallel.dtype must be one of {DTYPES}, got {p.dtype!r}")
    if p.zero_stage not in (0, 1):
        raise ValueError(
            f"parallel.zero_stage={p.zero_stage}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 "
            "(stages 2 and 3 partition gradients, which pipelining cannot); set parallel.zero_stage=1"
        )
    if p.dtype == "bf16" and p.zero_stage != 1:
        raise ValueError(
            "parallel.dtype=bf16 trains with fp32 master weights and fp32 gradient accumulation, which "
            "DeepSpeed provides with ZeRO-1 only: set parallel.zero_stage=1 (or parallel.dtype=fp32)"
        )
    if p.activation_checkpoint_interval < 0:
        raise ValueError(
            f"parallel.activation_checkpoint_interval must be >= 0, got {p.activation_checkpoint_interval}"
        )
    validate_compile_options(p.compile_layers, p.compile_backend)
    if o.grad_clip < 0:
        raise ValueError(f"optim.grad_clip must be >= 0 (0 disables clipping), got {o.grad_clip}")
    if o.lr <= 0:
        raise ValueError(f"optim.lr must be > 0, got {o.lr}")
    if o.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {o.schedule!r}")
    lr_factor(max(train.max_steps, 1), max(train.max_steps, 1), o)  # after warmup: checks the schedule
    if train.max_steps < 1:
        raise ValueError(f"train.max_steps must be >= 1, got {train.max_steps}")
    if train.max_bad_steps < 1:
        raise ValueError(f"train.max_bad_steps must be >= 1, got {train.max_bad_steps}")


def deepspeed_config(
    p: ParallelConfig, o: OptimConfig, train: TrainConfig, topology: Topology
) -> dict[str, Any]:
    """The DeepSpeed config dict of this run (pass to `deepspeed.initialize(config=...)`)."""
    validate_training_config(p, o, train)
    config: dict[str, Any] = {
        **topology.deepspeed_batch_config(),
        "gradient_clipping": float(o.grad_clip),
        "zero_optimization": {"stage": p.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": p.dtype == "bf16"},
        "fp16": {"enabled": False},
        "pipeline": {
            "use_reentrant": False,
            "activation_checkpoint_interval": p.activation_checkpoint_interval,
        },
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own prints stay quiet
        "wall_clock_breakdown": False,
        # The engine's throughput timer synchronises the device at every micro-batch's forward
        # (timers.throughput.synchronized); the trainer measures throughput itself.
        "timers": {"throughput": {"enabled": False}},
    }
    if p.dtype == "bf16":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def build_optimizer_and_scheduler(
    model: nn.Module, o: OptimConfig, max_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the decay / no-decay groups of `model`'s trainable parameters + our LambdaLR
    over `max_steps` (train.max_steps)."""
    optimizer = build_optimizer(param_groups(model, o.weight_decay), o)
    return optimizer, build_scheduler(optimizer, max_steps, o)
