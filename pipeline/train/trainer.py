"""The training loop of every run: one `Trainer` over a small engine interface.

Stage 1, stage 2 and fine-tuning, in one process or many, run this loop; what differs is the
engine that performs one optimizer step:

- `pipeline.train.local_engine.LocalEngine`: one device, no host sync inside the step;
- `pipeline.parallel.data_parallel.DataParallelEngine`: DeepSpeed, whole model per rank, ZeRO 0/1/2;
- `pipeline.parallel.trainer.PipelineEngine`: DeepSpeed's pipeline engine (PP >= 2, x DP).

One behaviour on every path:
- A step whose loss or gradient norm is not finite leaves weights, optimizer moments and the LR
  schedule untouched, is counted (`bad_steps`, logged as a `bad_loss` event) and does not count
  as a step; `train.max_bad_steps` of them in a row stop the run with the last good checkpoint
  named in the error.
- SIGTERM and the time box (`train.max_minutes`) end the run at the next step boundary, agreed by
  all ranks; SIGTERM saves a checkpoint first (the job exits 143, requeueable).
- Checkpoints every `train.save_every` steps and at the end (keep-last-N, written atomically),
  holding the engine's state plus this rank's loop state (`rank_state`: step, counters, RNG, data
  position), so a resumed run continues with exactly the next batch (bitwise on the CPU).
- An evaluation hook every `train.eval_every` steps; one step record with the same keys on every
  path (`STEP_KEYS`, plus the engine's extras: expert load, pipeline bubble, skipped samples).

The loop overlaps the host with the device: step k+1 is launched before step k's figures are
read back (`StepStats.read`), so the GPU never waits for the host's bookkeeping. Steps after
which the loop needs a consistent state or the step's own expert counts (save, eval, log, the
last step) are not overlapped.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from pipeline.config import TrainConfig
from pipeline.train.checkpoint import rng_state, set_rng_state
from pipeline.train.logging import NullLogger, RunLogger

# Exit status of a run stopped by SIGTERM after its checkpoint was saved: 128 + SIGTERM, what a
# shell reports for a process SIGTERM ended, so one scheduler rule (SLURM: RequeueExit=143 in
# slurm.conf, or `[ $? -eq 143 ] && scontrol requeue $SLURM_JOB_ID`) requeues both; the
# requeued job resumes from the checkpoint (launch/README.md, "Preemption and requeue").
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16 per GPU
STEP_KEYS = ("step", "loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_gpu",
             "samples_per_s", "step_time", "data_wait", "bad_steps", "mfu")  # fmt: skip
RANK_STATE_VERSION = 2


def exit_preempted() -> None:
    """End a run that SIGTERM stopped (its checkpoint is written) with PREEMPTED_EXIT_CODE."""
    print("[train] stopped by SIGTERM, checkpoint saved; exiting with "
          f"{PREEMPTED_EXIT_CODE} so the scheduler can requeue the job", flush=True)  # fmt: skip
    raise SystemExit(PREEMPTED_EXIT_CODE)


def peak_flops() -> float:
    """Dense bf16 peak of this rank's GPU (0 when unknown, e.g. CPU: no MFU logged)."""
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), 0.0)


def expert_load_fields(table: torch.Tensor) -> dict[str, Any]:
    """Log fields of per-layer expert counts (n_moe_layers, E): the counts, and the busiest
    expert's share over the mean share, averaged over the layers (1.0 = perfectly balanced)."""
    load = table.float() / table.sum(dim=1, keepdim=True).clamp(min=1)
    return {
        "expert_counts": table.long().tolist(),
        "expert_load_max_over_mean": float((load.max(dim=1).values * table.shape[1]).mean()),
    }


class SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclass
class StepStats:
    """One optimizer step's figures. `values` = [loss, lm_loss, aux_loss, grad_norm, non-finite
    flag] (global over ranks) stays on the device until `read()`; the counts are the step's
    totals over all ranks, known on the host when the batches were collated."""

    values: torch.Tensor
    tokens: float
    rows: float
    images: float  # image tokens (MFU)
    data_wait: float  # seconds this rank waited for batches
    _event: Any = None  # CUDA event after the copy to pinned host memory

    @classmethod
    def on_host_later(cls, values: torch.Tensor, **counts) -> StepStats:
        """Start the copy of `values` to the host without waiting for it (CUDA) or keep them (CPU)."""
        if values.device.type != "cuda":
            return cls(values.detach().double().cpu(), **counts)
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(host, _event=event, **counts)

    def read(self) -> tuple[float, float, float, float, bool]:
        """(loss, lm_loss, aux_loss, grad_norm, finite): waits for this step only."""
        if self._event is not None:
            self._event.synchronize()
        loss, lm, aux, norm, bad = (float(v) for v in self.values.tolist())
        return loss, lm, aux, norm, bad == 0.0 and math.isfinite(loss)


@dataclass
class Window:
    """Totals of the steps since the last log record (throughput is taken over this window: with
    steps overlapping on the device, one step's own wall time is not observable from the host)."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: float = 0.0
    rows: float = 0.0
    images: float = 0.0
    wait: float = 0.0

    def add(self, stats: StepStats) -> None:
        self.steps += 1
        self.tokens, self.rows, self.images = (
            self.tokens + stats.tokens,
            self.rows + stats.rows,
            self.images + stats.images,
        )
        self.wait += stats.data_wait

    def pause(self, seconds: float) -> None:
        """Leave out time spent outside training steps (evaluation, checkpoints)."""
        self.start += seconds


class Engine(Protocol):
    """What the loop needs from an engine (the three engines: this module's docstring)."""

    is_logging_rank: bool  # the rank that logs (where the loss lives)
    world_size: int  # GPUs (processes) of the job, for per-GPU throughput and MFU

    def step(self, batches: Iterator) -> StepStats:
        """One optimizer step (gradient accumulation included) on the next batches; a non-finite
        step must leave the weights, optimizer and LR schedule unchanged on every rank."""

    def lr(self) -> float:
        """The learning rate of the last good step."""

    def flops(self, tokens: float, images: float) -> float:
        """Model FLOPs of a step with these totals (0: no MFU)."""

    def agree(self, flag: int) -> int:
        """The maximum of `flag` over all ranks (identity in one process)."""

    def extras(self) -> dict[str, Any]:
        """Engine-specific log fields (collective on every rank; the logging rank's are used)."""

    def evaluate(self, hook: Callable[[torch.nn.Module, int], dict], step: int) -> dict | None:
        """Run `hook(model, step)` on a consolidated model; the metrics on the logging rank."""

    def attach(self, loader) -> None:
        """The loader of this rank (None: it reads no data), for its position and skip counts."""

    def data_state(self) -> dict | None:
        """The loader position after the last batch this engine consumed (checkpoints)."""

    def save(self, step: int, rank_state: dict) -> Path:
        """Write a checkpoint of the engine's state and this rank's loop state; its directory."""

    def load(self) -> tuple[Path, dict] | None:
        """Restore the newest complete checkpoint (train.resume); (its path, this rank's loop state)."""


@dataclass
class TrainResult:
    """What one rank saw: the loss of every good step, counters, the last checkpoint."""

    steps: int
    losses: list[float] = field(default_factory=list)
    bad_steps: int = 0
    stopped_by_signal: bool = False
    stopped_by_time: bool = False
    last_checkpoint: Path | None = None


def progress_bar(start: int, total: int, enabled: bool) -> tqdm:
    """Steps done / to do with an ETA on an interactive console of the logging rank; disabled when
    stderr is not a terminal (batch logs keep only the periodic log lines)."""
    return tqdm(total=total, initial=start, unit="step", desc="train", disable=None if enabled else True,
                dynamic_ncols=True)  # fmt: skip


class Trainer:
    """The loop (module docstring) over `engine`, reading batches from `loader` (None on ranks that
    read no data: the middle stages of a pipeline)."""

    def __init__(
        self,
        engine: Engine,
        cfg: TrainConfig,
        loader=None,
        *,
        logger: RunLogger | NullLogger | None = None,
        evaluate: Callable[[torch.nn.Module, int], dict] | None = None,
        on_step: Callable[[Trainer], None] | None = None,
    ) -> None:
        self.engine, self.cfg, self.loader = engine, cfg, loader
        self.logger = logger if logger is not None and engine.is_logging_rank else NullLogger()
        self.evaluate, self.on_step = evaluate, on_step
        self.step, self.bad_in_row, self.bad_total = 0, 0, 0
        self._batches = iter(loader) if loader is not None else None
        engine.attach(loader)
        self._peak = peak_flops()
        self._window = Window()  # throughput since the last log record

    # ------------------------------------------------------------------ checkpoints
    def rank_state(self) -> dict:
        """This rank's loop state (checkpoints): step, counters, RNG, data position."""
        return {"version": RANK_STATE_VERSION, "step": self.step, "bad_in_row": self.bad_in_row,
                "bad_total": self.bad_total, "rng": rng_state(), "data": self.engine.data_state()}  # fmt: skip

    def save(self) -> Path:
        begin = time.perf_counter()
        path = self.engine.save(self.step, self.rank_state())
        self._window.pause(time.perf_counter() - begin)
        return path

    def resume(self) -> Path | None:
        """Continue from the newest complete checkpoint when train.resume (None: a fresh start)."""
        found = self.engine.load() if self.cfg.resume else None
        if found is None:
            return None
        ckpt, state = found
        self.step, self.bad_in_row, self.bad_total = state["step"], state["bad_in_row"], state["bad_total"]
        set_rng_state(state["rng"])
        if self.loader is not None and state["data"] is not None and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(state["data"])
            self._batches = iter(self.loader)
        self.logger.log({"event": "resume", "step": self.step, "checkpoint": str(ckpt)})
        return ckpt

    # ------------------------------------------------------------------ loop
    def _boundary(self, step: int) -> bool:
        """Whether the loop needs the state right after good step `step` (nothing launched beyond it)."""
        c = self.cfg
        return (step >= c.max_steps or step == 1 or step % c.log_every == 0
                or bool(c.save_every and step % c.save_every == 0)
                or bool(self.evaluate is not None and c.eval_every and step % c.eval_every == 0))  # fmt: skip

    def train(self, *, final_checkpoint: bool = True) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(steps=self.step)
        self._window = Window()
        deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
        saved_at, stop = None, None
        in_flight: StepStats | None = None
        with (
            SigtermFlag() as sigterm,
            progress_bar(self.step, cfg.max_steps, self.engine.is_logging_rank) as bar,
        ):
            while True:
                pending = 1 if in_flight is not None else 0
                may_launch = stop is None and self.step + pending < cfg.max_steps
                if may_launch and (in_flight is None or not self._boundary(self.step + 1)):
                    launched = self.engine.step(self._batches)
                else:
                    launched = None
                if in_flight is None:
                    in_flight = launched
                    if in_flight is None:
                        break
                    continue
                done, in_flight = in_flight, launched
                if not self._finish(done, result, bar):
                    continue
                if self.on_step is not None:
                    self.on_step(self)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    result.last_checkpoint, saved_at = self.save(), self.step
                if stop is None:
                    flags = self.engine.agree(int(sigterm.raised) * 2 + int(time.monotonic() > deadline))
                    stop = "sigterm" if flags & 2 else "time" if flags & 1 else None
                    if stop == "time":
                        self.logger.log(
                            {"event": "time_limit", "step": self.step, "max_minutes": cfg.max_minutes}
                        )
            if stop == "sigterm":
                if saved_at != self.step:
                    result.last_checkpoint, saved_at = self.save(), self.step
                result.stopped_by_signal = True
                self.logger.log(
                    {"event": "sigterm", "step": self.step, "checkpoint": str(result.last_checkpoint)}
                )
        result.stopped_by_time = stop == "time"
        if final_checkpoint and not result.stopped_by_signal and saved_at != self.step:
            result.last_checkpoint = self.save()
        result.steps = self.step
        return result

    def _finish(self, stats: StepStats, result: TrainResult, bar: tqdm) -> bool:
        """Book one step (its figures read back now); False when it was skipped as non-finite."""
        loss, lm, aux, grad_norm, finite = stats.read()
        self._window.add(stats)
        if not finite:
            self.bad_in_row += 1
            self.bad_total += 1
            result.bad_steps += 1
            self.logger.log({"event": "bad_loss", "step": self.step, "loss": loss, "in_row": self.bad_in_row})
            if self.bad_in_row >= self.cfg.max_bad_steps:
                from pipeline.train.checkpoint import latest_checkpoint

                raise RuntimeError(
                    f"{self.bad_in_row} non-finite losses in a row at step {self.step}; stopping. The last "
                    f"good checkpoint is {latest_checkpoint(self.cfg.out_dir)}. Lower optim.lr or check the data."
                )
            return False
        self.bad_in_row = 0
        self.step += 1
        result.losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if self.step % self.cfg.log_every == 0 or self.step == 1:
            self._log(stats, loss, lm, aux, grad_norm)
        if self.evaluate is not None and self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
            begin = time.perf_counter()
            metrics = self.engine.evaluate(self.evaluate, self.step)
            if metrics is not None:
                self.logger.log({"event": "eval", "step": self.step, **metrics})
            self._window.pause(time.perf_counter() - begin)
        return True

    def _log(self, stats: StepStats, loss: float, lm: float, aux: float, grad_norm: float) -> None:
        extras = self.engine.extras()  # collective: every rank takes part
        w, world = self._window, self.engine.world_size
        dt = max(time.perf_counter() - w.start, 1e-9)
        record = {"step": self.step, "loss": loss, "lm_loss": lm, "aux_loss": aux, "lr": self.engine.lr(),
                  "grad_norm": grad_norm, "tokens_per_s": w.tokens / dt, "tokens_per_s_per_gpu": w.tokens / dt / world,
                  "samples_per_s": w.rows / dt, "step_time": dt / w.steps, "data_wait": w.wait / dt,
                  "bad_steps": self.bad_total}  # fmt: skip
        flops = self.engine.flops(w.tokens, w.images) if self._peak else 0.0
        if flops:
            record["mfu"] = flops / dt / (self._peak * world)
        self.logger.log({**record, **extras})
        self._window = Window()


__all__ = [
    "PREEMPTED_EXIT_CODE",
    "STEP_KEYS",
    "Engine",
    "StepStats",
    "TrainResult",
    "Trainer",
    "exit_preempted",
]
