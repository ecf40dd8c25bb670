"""What the two DeepSpeed engines of `pipeline.train.trainer.Trainer` share: data parallelism over
the whole model (`data_parallel.DataParallelEngine`, PP = 1) and the pipeline
(`trainer.PipelineEngine`, PP >= 2).

- The step guard of `pipeline.parallel.engine.install_step_guard`: at the optimizer step every
  rank contributes [non-finite flag, loss sums, token / row / image-token counts] to one
  all-reduce; the update, the LR schedule step and the engine's step count run only when no rank
  flagged, on every rank. The summed vector gives the step's global figures (`StepStats`), so a
  step costs no collective beyond the guard's.
- lr (the LambdaLR's), the agreement of flags over all ranks (SIGTERM, time box), model FLOPs.
- Checkpoints of `pipeline.parallel.checkpoints` (atomic, keep-last-N, the engine's files plus
  the Trainer's rank state with this rank's stage and data-parallel rank); `load()` checks the
  layout, the model and the engine files before DeepSpeed reads them, and that the rank state
  belongs to this rank's place.
- Seeding, determinism and threads of a rank (`seed_rank`), the run logger of the logging rank,
  and what a run returns (`EngineResult`: the Trainer's result plus where the rank sits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import LoggerConfig, TrainConfig
from pipeline.parallel import checkpoints as ckpt_io
from pipeline.parallel.engine import install_step_guard
from pipeline.parallel.topology import Topology
from pipeline.train.logging import NullLogger, RunLogger
from pipeline.train.trainer import StepStats, TrainResult

N_LOSSES = 3  # loss, lm_loss, aux_loss
N_COUNTS = 3  # tokens, rows, image tokens


@dataclass
class EngineResult(TrainResult):
    """What one rank saw (`TrainResult`: the global loss of every good step, counters, the last
    checkpoint) and where the rank sits."""

    stage: int = 0
    dp_rank: int = 0


@dataclass
class StepView:
    """What an `on_step(view)` hook of a pipeline run sees after each good step (tests: the backward
    walks per decoder layer): the count of good steps and this rank's engine parts."""

    step: int
    rank: int
    stage: int
    dp_rank: int
    engine: Any  # the DeepSpeed engine
    module: torch.nn.Module


def seed_rank(train: TrainConfig) -> None:
    torch.manual_seed(train.seed)
    if train.deterministic:
        torch.use_deterministic_algorithms(True)
    if train.threads:
        torch.set_num_threads(train.threads)


def rank_logger(logger, is_logging_rank: bool, train: TrainConfig, cfg: LoggerConfig, name: str,
                record: dict) -> RunLogger | NullLogger:  # fmt: skip
    """`logger` (or a new RunLogger of run `name` under train.out_dir, `record` its config) on the
    logging rank, a NullLogger elsewhere."""
    if not is_logging_rank:
        return NullLogger()
    if logger is not None:
        return logger
    return RunLogger(train.out_dir, cfg, record, name)


class DeepSpeedEngineBase:
    """The parts of an `Engine` both DeepSpeed engines share. A subclass sets `engine` (DeepSpeed),
    `scheduler`, `module`, `meta`, `kind`, `parts`, `stage`, `is_logging_rank`, calls
    `_install_guard()` and implements step / extras / evaluate."""

    engine: Any
    scheduler: Any
    module: torch.nn.Module
    meta: dict
    kind: str
    parts: list[int] | None = None
    stage: int = 0
    is_logging_rank: bool = False

    def __init__(self, train: TrainConfig, topology: Topology, tokenizer, device: torch.device,
                 flops: Callable[[float, float], float]) -> None:  # fmt: skip
        self.train, self.topology, self.tokenizer, self.device = train, topology, tokenizer, device
        self.rank = dist.get_rank()
        self.dp_rank = topology.dp_rank(self.rank)
        self.world_size = topology.world_size
        self._flops = flops
        self._loader = None
        self._local: torch.Tensor | None = None  # [flag, losses, counts] of this rank's step
        self._reduced: torch.Tensor | None = None  # the same, summed over all ranks

    # ------------------------------------------------------------------ step guard and figures
    def _install_guard(self) -> None:
        install_step_guard(self.engine, self._local_figures, self._take_reduced)

    def _local_figures(self) -> torch.Tensor:
        assert self._local is not None, "the step set its figures before the optimizer step"
        return self._local

    def _take_reduced(self, reduced: torch.Tensor) -> None:
        self._reduced = reduced

    def _set_local(self, bad: bool | torch.Tensor, losses: torch.Tensor, counts: list[float]) -> None:
        """This rank's contribution to the guard's all-reduce: [non-finite flag, losses (N_LOSSES), counts]."""
        flag = torch.as_tensor(bad, dtype=torch.float64, device=self.device).reshape(1)
        counts_t = torch.tensor(counts, dtype=torch.float64, device=self.device)
        self._local = torch.cat([flag, losses.to(self.device, torch.float64).reshape(N_LOSSES), counts_t])

    def _stats(self, losses: tuple[float, float, float] | None, wait: float) -> StepStats:
        """The step's StepStats from the guard's sums; `losses` given (global already) or the
        summed losses over the data-parallel ranks."""
        reduced, self._reduced, self._local = self._reduced, None, None
        assert reduced is not None, "the step guard ran at the optimizer step"
        reduced = reduced.double().cpu()
        skipped = float(reduced[0]) > 0
        if losses is None:
            losses = tuple(float(v) / self.topology.dp for v in reduced[1 : 1 + N_LOSSES])
        norm = float("nan") if skipped else float(self.engine.get_global_grad_norm() or 0.0)
        tokens, rows, images = (float(v) for v in reduced[1 + N_LOSSES :])
        values = torch.tensor([*losses, norm, float(skipped)], dtype=torch.float64)
        return StepStats(values, tokens=tokens, rows=rows, images=images, data_wait=wait)

    # ------------------------------------------------------------------ Engine: small parts
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def flops(self, tokens: float, images: float) -> float:
        return self._flops(tokens, images) if tokens else 0.0

    def agree(self, flag: int) -> int:
        value = torch.tensor([flag], dtype=torch.int64, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())

    def attach(self, loader) -> None:
        self._loader = loader

    def data_state(self) -> dict | None:
        loader = self._loader
        return loader.state_dict() if loader is not None and hasattr(loader, "state_dict") else None

    def view(self, step: int) -> StepView:
        return StepView(step, self.rank, self.stage, self.dp_rank, self.engine, self.module)

    def result(self, result: TrainResult) -> EngineResult:
        values = {f.name: getattr(result, f.name) for f in fields(TrainResult)}
        return EngineResult(**values, stage=self.stage, dp_rank=self.dp_rank)

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int, rank_state: dict) -> Path:
        """Collective: every rank writes its engine shards and its rank state."""
        state = {**rank_state, "stage": self.stage, "dp_rank": self.dp_rank}
        return ckpt_io.save_engine_checkpoint(
            self.engine, out_dir=self.train.out_dir, step=step, rank=self.rank, rank_state=state,
            meta=self.meta, tokenizer=self.tokenizer, keep_last=self.train.keep_last, kind=self.kind,
        )  # fmt: skip

    def load(self) -> tuple[Path, dict] | None:
        ckpt = ckpt_io.newest_checkpoint(self.train.out_dir)
        if ckpt is None:
            return None
        ckpt_io.check_resume_compatible(ckpt, pp=self.topology.pp, dp=self.topology.dp, parts=self.parts,
                                        model=self.meta["model"], kind=self.kind)  # fmt: skip
        self.engine.load_checkpoint(
            str(ckpt), tag=ckpt_io.ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        state = ckpt_io.load_rank_state(ckpt, self.rank)
        if (state["stage"], state["dp_rank"]) != (self.stage, self.dp_rank):
            raise ValueError(
                f"{ckpt}: rank {self.rank} state belongs to stage {state['stage']}, data-parallel rank "
                f"{state['dp_rank']} (this rank: stage {self.stage}, data-parallel rank {self.dp_rank})"
            )
        return ckpt, state


__all__ = ["DeepSpeedEngineBase", "EngineResult", "StepView", "rank_logger", "seed_rank"]
