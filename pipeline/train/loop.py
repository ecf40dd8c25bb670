"""Single-process training loop (PP=1 on one device), the reference the pipeline engine is tested against.

One optimizer step = `grad_accum` micro-batches (global batch = micro x accum x DP).
Non-finite losses skip the step and are counted; too many in a row stop the run
with the last good checkpoint intact. SIGTERM (preemption) saves a checkpoint and
exits cleanly. Checkpoints hold model, optimizer, scheduler, RNG and data position,
so a resumed run continues with exactly the next batch.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pipeline.batch import PackedBatch
from pipeline.config import RunConfig
from pipeline.train.checkpoint import latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from pipeline.train.logging import NullLogger, RunLogger
from pipeline.train.state_io import load_state, save_state

TRAINER_STATE = "trainer_state"  # trainer_state.safetensors + trainer_state.json


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    bad_steps: int = 0
    stopped_by_signal: bool = False
    last_checkpoint: Path | None = None


def batch_to(batch: PackedBatch, device: torch.device) -> PackedBatch:
    """The batch on `device`; CUDA copies from pinned memory, so they overlap the running step."""
    if device.type == "cpu":
        return batch
    return batch.pin_memory().to(device, non_blocking=True)


# Exit status of a run stopped by SIGTERM after its checkpoint was saved: 128 + SIGTERM, what a
# shell reports for a process SIGTERM ended, so one scheduler rule (SLURM: RequeueExit=143 in
# slurm.conf, or `[ $? -eq 143 ] && scontrol requeue $SLURM_JOB_ID`) requeues both; the
# requeued job resumes from the checkpoint (launch/README.md, "Preemption and requeue").
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


def exit_preempted() -> None:
    """End a run that SIGTERM stopped (its checkpoint is written) with PREEMPTED_EXIT_CODE."""
    print("[train] stopped by SIGTERM, checkpoint saved; exiting with "
          f"{PREEMPTED_EXIT_CODE} so the scheduler can requeue the job", flush=True)  # fmt: skip
    raise SystemExit(PREEMPTED_EXIT_CODE)


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


def step_record(step: int, loss: float, lm: float, aux: float, lr: float, grad_norm: float,
                tokens: float, rows: float, dt: float) -> dict[str, float]:  # fmt: skip
    """The fields every trainer logs per optimizer step (losses, lr, grad norm, throughput);
    `tokens` and `rows` are the step's totals over all ranks, `dt` its wall time."""
    return {
        "step": step,
        "loss": loss,
        "lm_loss": lm,
        "aux_loss": aux,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / dt,
        "samples_per_s": rows / dt,
    }


def progress_bar(start: int, total: int) -> tqdm:
    """Steps done / to do with an ETA on an interactive console; disabled when stderr is not a
    terminal (batch logs keep only the periodic log lines)."""
    return tqdm(total=total, initial=start, unit="step", desc="train", disable=None, dynamic_ncols=True)


class LocalTrainer:
    """Trains `model` (whose forward(PackedBatch) returns .loss/.lm_loss/.aux_loss) on one device."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        data,
        run: RunConfig,
        *,
        device: torch.device,
        logger: RunLogger | NullLogger | None = None,
        evaluate: Callable[[nn.Module, int], dict] | None = None,
        flops_per_token: float = 0.0,
        peak_flops: float = 0.0,
    ) -> None:
        p = run.parallel
        if p.global_batch % p.micro_batch:
            raise ValueError(
                f"parallel.global_batch ({p.global_batch}) must be a multiple of parallel.micro_batch "
                f"({p.micro_batch}) x DP (1)"
            )
        self.model, self.optimizer, self.scheduler, self.data = model, optimizer, scheduler, data
        self.run, self.device = run, device
        self.grad_accum = p.global_batch // p.micro_batch
        self.logger = logger or NullLogger()
        self.evaluate = evaluate
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.step = 0
        self._data_iter = iter(data)
        self._data_wait = 0.0  # seconds spent waiting for batches in the current step

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
        }

    def save(self) -> Path:
        state = self.state_dict()
        return save_checkpoint(
            self.run.train.out_dir,
            self.step,
            lambda d: save_state(state, d, TRAINER_STATE),
            keep_last=self.run.train.keep_last,
            meta={
                "kind": "local",
                "model": {"encoder": self.run.model.encoder, "decoder": self.run.model.decoder},
            },
        )

    def maybe_resume(self) -> Path | None:
        ckpt = latest_checkpoint(self.run.train.out_dir) if self.run.train.resume else None
        if ckpt is None:
            return None
        # on the CPU: the RNG states must stay CPU ByteTensors; the load_state_dicts copy to the device
        state = load_state(ckpt, TRAINER_STATE)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if state["data"] is not None:
            self.data.load_state_dict(state["data"])
            self._data_iter = iter(self.data)
        self.step = state["step"]
        self.logger.log({"event": "resume", "step": self.step, "checkpoint": str(ckpt)})
        return ckpt

    # ----------------------------------------------------------------- training
    def _autocast(self):
        """bf16 autocast with fp32 master weights when parallel.dtype=bf16 (the model stays fp32)."""
        dtype = self.run.parallel.dtype
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"parallel.dtype must be fp32 or bf16, got {dtype!r}")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def _micro_step(self) -> tuple[torch.Tensor, int, int]:
        """Forward + backward of one micro-batch; returns detached (loss, lm, aux) without a host sync."""
        t0 = time.perf_counter()
        cpu_batch = next(self._data_iter)
        self._data_wait += time.perf_counter() - t0
        tokens, docs = cpu_batch.num_tokens, cpu_batch.num_documents  # counted before the copy
        with self._autocast():
            out = self.model(batch_to(cpu_batch, self.device))
        # a non-finite loss poisons the gradients: the whole step is dropped below
        (out.loss / self.grad_accum).backward()
        return torch.stack([out.loss, out.lm_loss, out.aux_loss]).detach().float(), tokens, docs

    def train(self) -> TrainResult:
        cfg = self.run.train
        result = TrainResult(steps=0)
        bad_in_row = 0
        self.model.train()
        deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
        with SigtermFlag() as sigterm, progress_bar(self.step, cfg.max_steps) as bar:
            while self.step < cfg.max_steps:
                if time.monotonic() > deadline:  # a time-boxed run ends like a finished one
                    self.logger.log(
                        {"event": "time_limit", "step": self.step, "max_minutes": cfg.max_minutes}
                    )
                    break
                t0 = time.perf_counter()
                self._data_wait = 0.0
                self.optimizer.zero_grad(set_to_none=True)
                parts, tokens, docs = [], 0, 0
                for _ in range(self.grad_accum):
                    values, n_tok, n_docs = self._micro_step()
                    parts.append(values)
                    tokens, docs = tokens + n_tok, docs + n_docs
                loss, lm, aux = torch.stack(parts).mean(dim=0).tolist()  # the step's one host sync
                if not math.isfinite(loss):
                    bad_in_row += 1
                    result.bad_steps += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    self.logger.log(
                        {"event": "bad_loss", "step": self.step, "loss": loss, "in_row": bad_in_row}
                    )
                    if bad_in_row >= cfg.max_bad_steps:
                        raise RuntimeError(
                            f"{bad_in_row} non-finite losses in a row at step {self.step}; stopping. The last "
                            f"good checkpoint is {latest_checkpoint(cfg.out_dir)}. Lower optim.lr or check the data."
                        )
                    continue
                bad_in_row = 0
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad],
                    self.run.optim.grad_clip if self.run.optim.grad_clip > 0 else float("inf"),
                )
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                result.losses.append(loss)
                dt = time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                if self.step % cfg.log_every == 0 or self.step == 1:
                    self._log_step(loss, lm, aux, float(grad_norm), tokens, docs, dt)
                if self.evaluate is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    self._run_eval()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    result.last_checkpoint = self.save()
                if sigterm.raised:
                    result.last_checkpoint = self.save()
                    result.stopped_by_signal = True
                    self.logger.log(
                        {"event": "sigterm", "step": self.step, "checkpoint": str(result.last_checkpoint)}
                    )
                    break
        result.steps = self.step
        return result

    def _log_step(self, loss, lm, aux, grad_norm, tokens, docs, dt) -> None:
        record = step_record(
            self.step, loss, lm, aux, self.scheduler.get_last_lr()[0], grad_norm, tokens, docs, dt
        )
        record["data_wait"] = self._data_wait / dt  # fraction of the step spent waiting for batches
        if self.flops_per_token and self.peak_flops:
            record["mfu"] = self.flops_per_token * tokens / dt / self.peak_flops
        skips = getattr(self.data, "skip_counts", None)
        if skips:  # distinct bad samples, and how often they were met (once per epoch each)
            record["skipped"] = dict(skips)
            record["skip_encounters"] = dict(getattr(self.data, "skip_encounters", {}))
        decoder = getattr(self.model, "decoder", None)  # DeepSeekOCR; peft wraps keep the attribute
        counts = decoder.expert_counts() if hasattr(decoder, "expert_counts") else None
        if counts is not None:  # tokens per expert per MoE layer of the last micro-batch
            record["expert_counts"] = counts.tolist()
        self.logger.log(record)

    def _run_eval(self) -> dict:
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            metrics = self.evaluate(self.model, self.step)
        self.model.train(was_training)
        self.logger.log({"event": "eval", "step": self.step, **metrics})
        return metrics
