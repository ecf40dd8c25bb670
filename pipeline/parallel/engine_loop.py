"""The training loop of both DeepSpeed trainers: the pipeline (`trainer.PipelineTrainer`, PP >= 2)
and data parallelism over the whole model (`data_parallel.DataParallelTrainer`, PP = 1).

What they share lives here once: seeding, NaN/Inf step skipping with the consecutive limit
(train.max_bad_steps, the last good checkpoint named in the error), logging / eval / checkpoint
cadence, SIGTERM saves agreed over all ranks, and the per-rank state a checkpoint holds (step,
counters, RNG, data position) with its restore. A subclass supplies one optimizer step, its log
record, its eval and its save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import RunConfig
from pipeline.parallel import checkpoints as ckpt_io
from pipeline.train.checkpoint import rng_state, set_rng_state
from pipeline.train.trainer import SigtermFlag, TrainResult, expert_load_fields, peak_flops


@dataclass
class EngineResult(TrainResult):
    """What one rank saw: its losses (the global loss of every good step), counters, checkpoint,
    and where the rank sits."""

    stage: int = 0
    dp_rank: int = 0


class EngineTrainer:
    """Per-rank loop state; subclasses set `engine`, `logger`, `rank`, `stage`, `dp_rank`."""

    engine: Any
    logger: Any
    rank: int
    stage: int = 0
    dp_rank: int = 0

    def __init__(self, run: RunConfig, device: torch.device) -> None:
        torch.manual_seed(run.train.seed)
        if run.train.deterministic:
            torch.use_deterministic_algorithms(True)
        if run.train.threads:
            torch.set_num_threads(run.train.threads)
        self.run, self.device = run, device
        self.step, self.bad_in_row, self.bad_total = 0, 0, 0
        self._skipped = False

    def _step_record(self, loss: float, lm: float, aux: float, tokens: float, rows: float, images: float,
                     dt: float, encoder_cfg, decoder_cfg, frozen_sam: bool) -> dict[str, Any]:  # fmt: skip
        """The step's log record: losses, lr, grad norm, throughput of the whole job (tokens, rows,
        images over all ranks) and its MFU against the measured peak."""
        from pipeline.parallel.memory import step_flops

        world = self.topology.world_size
        grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        record = {"step": self.step, "loss": loss, "lm_loss": lm, "aux_loss": aux,
                  "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens_per_s": tokens / dt,
                  "samples_per_s": rows / dt}  # fmt: skip
        record.update(tokens_per_s_per_gpu=tokens / dt / world, step_time=dt, bad_steps=self.bad_total)
        peak = peak_flops()
        if peak and tokens:
            flops = step_flops(encoder_cfg, decoder_cfg, int(tokens), self.run.data.seq_len,
                               images / tokens, frozen_sam)  # fmt: skip
            record["mfu"] = flops.total / dt / (peak * world)
        return record

    # ------------------------------------------------------------------ subclass hooks
    def _step(self) -> tuple[float, float, Any]:
        """One optimizer step: (global loss, wall time, what `_log_step` needs)."""
        raise NotImplementedError

    def _log_step(self, payload: Any, dt: float) -> None:
        raise NotImplementedError

    def _run_eval(self, eval_hook) -> None:
        raise NotImplementedError

    def save(self) -> Path:
        raise NotImplementedError

    # ------------------------------------------------------------------ step guard and agreement
    def _mark_skipped(self) -> None:
        self._skipped = True

    def _agree(self, value: int) -> int:
        """The maximum of `value` over all ranks (a flag any rank raised)."""
        flag = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    # ------------------------------------------------------------------ per-rank checkpoint state
    def _rank_state(self, loader) -> dict:
        data = loader.state_dict() if loader is not None and hasattr(loader, "state_dict") else None
        return {"step": self.step, "stage": self.stage, "dp_rank": self.dp_rank, "bad_in_row": self.bad_in_row,
                "bad_total": self.bad_total, "rng": rng_state(), "data": data}  # fmt: skip

    def _resume(self, ckpt: Path, loader) -> None:
        self.engine.load_checkpoint(
            str(ckpt), tag=ckpt_io.ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        state = ckpt_io.load_rank_state(ckpt, self.rank)
        if (state["stage"], state["dp_rank"]) != (self.stage, self.dp_rank):
            raise ValueError(
                f"{ckpt}: rank {self.rank} state belongs to stage {state['stage']}, data-parallel rank "
                f"{state['dp_rank']} (this rank: stage {self.stage}, data-parallel rank {self.dp_rank})"
            )
        self.step, self.bad_in_row, self.bad_total = state["step"], state["bad_in_row"], state["bad_total"]
        set_rng_state(state["rng"])
        if loader is not None and state["data"] is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(state["data"])
        self.logger.log({"event": "resume", "step": self.step, "checkpoint": str(ckpt)})

    # ------------------------------------------------------------------ loop
    def train(self, eval_hook=None, *, final_checkpoint: bool = True, on_step=None) -> EngineResult:
        """Steps until train.max_steps; `on_step(self)` runs on every rank after each good step
        (benchmarks use it to profile or time chosen steps)."""
        cfg = self.run.train
        result = EngineResult(steps=self.step, stage=self.stage, dp_rank=self.dp_rank)
        saved_at = None
        with SigtermFlag() as sigterm:
            while self.step < cfg.max_steps:
                self._skipped = False
                loss, dt, payload = self._step()
                if self._skipped or not math.isfinite(loss):
                    self.bad_in_row += 1
                    self.bad_total += 1
                    result.bad_steps += 1
                    self.logger.log(
                        {"event": "bad_loss", "step": self.step, "loss": loss, "in_row": self.bad_in_row}
                    )
                    if self.bad_in_row >= cfg.max_bad_steps:
                        raise RuntimeError(
                            f"{self.bad_in_row} non-finite losses in a row at step {self.step}; stopping. The "
                            f"last good checkpoint is {ckpt_io.newest_checkpoint(cfg.out_dir)}. Lower "
                            "optim.lr or check the data."
                        )
                    continue
                self.bad_in_row = 0
                self.step += 1
                result.losses.append(loss)
                if self.step % cfg.log_every == 0 or self.step == 1:
                    self._log_step(payload, dt)
                if eval_hook is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    self._run_eval(eval_hook)
                if on_step is not None:
                    on_step(self)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    result.last_checkpoint, saved_at = self.save(), self.step
                if self._agree(int(sigterm.raised)):
                    if saved_at != self.step:
                        result.last_checkpoint, saved_at = self.save(), self.step
                    result.stopped_by_signal = True
                    self.logger.log(
                        {"event": "sigterm", "step": self.step, "checkpoint": str(result.last_checkpoint)}
                    )
                    break
        if final_checkpoint and not result.stopped_by_signal and saved_at != self.step:
            result.last_checkpoint = self.save()
        result.steps = self.step
        return result


__all__ = ["EngineResult", "EngineTrainer", "expert_load_fields"]
