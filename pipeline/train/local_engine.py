"""The one-device engine of `pipeline.train.trainer.Trainer`: the fast training step.

One optimizer step = `grad_accum` micro-batches, with nothing in it that waits for the device:

- batches reach the device ahead of time: the copy of batch k+1 is issued on a side stream when
  batch k is handed out (`DeviceBatches`), and the compute stream waits only for that copy;
- the loss, gradient norm and non-finite flag stay on the device; the fused AdamW kernel skips a
  non-finite step itself (`found_inf`, the hook torch's GradScaler uses): weights, moments and
  its step counter stay as they were;
- the learning rate is read on the device from a table of the schedule indexed by the count of
  good steps, so a skipped step leaves the schedule where it was without the host knowing yet;
- autocast to bf16 over fp32 master weights when parallel.dtype=bf16.

The loop reads a step's figures back one step later (`StepStats.read`). Checkpoints hold the
model, the optimizer and the loop's rank state (`trainer_state.safetensors` + `.json`, meta kind
"local"); the schedule needs no state of its own: it is a function of the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.batch import PackedBatch
from pipeline.config import OptimConfig, ParallelConfig, TrainConfig
from pipeline.train.checkpoint import latest_checkpoint, save_checkpoint
from pipeline.train.optim import build_optimizer, lr_factor, param_groups
from pipeline.train.state_io import load_state, save_state
from pipeline.train.trainer import StepStats, expert_load_fields

TRAINER_STATE = "trainer_state"  # trainer_state.safetensors + trainer_state.json


def batch_to(batch: PackedBatch, device: torch.device) -> PackedBatch:
    """The batch on `device`; CUDA copies from pinned memory, so they overlap the running step."""
    if device.type == "cpu":
        return batch
    return batch.pin_memory().to(device, non_blocking=True)


class DeviceBatches:
    """Device batches from an iterator of host batches, one copy ahead on CUDA (a side stream).

    `data_state()` is the loader position after the last batch handed out, also while the next
    one is already held here (checkpoints must not skip it)."""

    def __init__(self, source: Iterator[PackedBatch], loader, device: torch.device) -> None:
        self.source, self.loader, self.device = source, loader, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.held: tuple[PackedBatch, PackedBatch, Any, dict | None] | None = (
            None  # host, device, event, state
        )
        self.wait_s = 0.0

    def _pull(self):
        state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        start = time.perf_counter()
        host = next(self.source)
        self.wait_s += time.perf_counter() - start
        if self.stream is None:
            return host, host, None, state
        with torch.cuda.stream(self.stream):
            moved = host.pin_memory().to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return host, moved, event, state

    def __next__(self) -> tuple[PackedBatch, PackedBatch]:
        """(host batch, device batch)."""
        host, moved, event, _ = self.held if self.held is not None else self._pull()
        self.held = None
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            moved = moved.map(
                lambda t: (t.record_stream(current), t)[1]
            )  # memory of the side stream's copies
            self.held = self._pull()  # the next copy runs while this batch computes
        return host, moved

    def data_state(self) -> dict | None:
        if self.held is not None:
            return self.held[3]
        return self.loader.state_dict() if hasattr(self.loader, "state_dict") else None


class LocalEngine:
    """Trains `model` (forward(PackedBatch) -> .loss / .lm_loss / .aux_loss) on one device."""

    is_logging_rank = True
    world_size = 1

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        *,
        max_steps: int,
        grad_accum: int,
        device: torch.device,
        dtype: str,
        out_dir: str | Path,
        keep_last: int,
        meta: dict | None = None,
        flops: Callable[[float, float], float] | None = None,
    ) -> None:
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"parallel.dtype must be fp32 or bf16, got {dtype!r}")
        self.model, self.device, self.grad_accum = model, device, grad_accum
        self.autocast = dtype == "bf16"
        self.out_dir, self.keep_last, self.meta = Path(out_dir), keep_last, meta or {}
        self._flops = flops
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(param_groups(model, optim.weight_decay), optim)
        self.grad_clip = optim.grad_clip
        self.max_steps, self.optim = max_steps, optim
        # the schedule over good steps, on the device: lr of good step s = table[s]
        factors = [lr_factor(s, max_steps, optim) for s in range(max_steps + 1)]
        self.lr_table = torch.tensor(factors, dtype=torch.float32, device=device) * optim.lr
        self.good = torch.zeros((), dtype=torch.long, device=device)
        self.batches: DeviceBatches | None = None
        self._loader = None

    def attach(self, loader) -> None:
        """The loader whose position checkpoints record (the Trainer's)."""
        self._loader = loader

    # ------------------------------------------------------------------ step
    def step(self, batches: Iterator[PackedBatch]) -> StepStats:
        if self.batches is None or self.batches.source is not batches:
            self.batches = DeviceBatches(batches, self._loader, self.device)
        self.batches.wait_s = 0.0
        self.model.train()
        total = torch.zeros(3, device=self.device)
        tokens = rows = images = 0
        for _ in range(self.grad_accum):
            host, batch = next(self.batches)
            tokens, rows = tokens + host.num_tokens, rows + host.num_documents
            images += host.image_positions.numel()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out = self.model(batch)
            (out.loss / self.grad_accum).backward()
            total += torch.stack([out.loss, out.lm_loss, out.aux_loss]).detach().float()
        total /= self.grad_accum
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = (
            torch.nn.utils.get_total_norm(grads, foreach=True)
            if grads
            else torch.zeros((), device=self.device)
        )
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, norm, foreach=True)
        bad = (
            (~torch.isfinite(total[0] + norm)).to(torch.float32).reshape(())
        )  # 0-dim: what fused AdamW takes
        # index_select, not lr_table[good]: indexing with a 0-dim tensor converts it to an int (a sync)
        lr = self.lr_table.index_select(0, self.good.clamp(max=self.max_steps).view(1)).reshape(())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.found_inf = bad
        self.optimizer.step()
        for group in self.optimizer.param_groups:  # a float again: state dicts and logs stay plain
            group["lr"] = self.optim.lr
        self.optimizer.zero_grad(set_to_none=True)
        self.good += (1 - bad).long()
        values = torch.cat([total, norm.float().reshape(1), bad.reshape(1)])
        return StepStats.on_host_later(values, tokens=tokens, rows=rows, images=images,
                                       data_wait=self.batches.wait_s)  # fmt: skip

    def lr(self) -> float:
        step = max(int(self.good) - 1, 0)
        return self.optim.lr * lr_factor(step, self.max_steps, self.optim)

    def flops(self, tokens: float, images: float) -> float:
        return self._flops(tokens, images) if self._flops is not None else 0.0

    def agree(self, flag: int) -> int:
        return flag

    def extras(self) -> dict[str, Any]:
        record: dict[str, Any] = {}
        skips = getattr(self._loader, "skip_counts", None)
        if skips:  # distinct bad samples, and how often they were met (once per epoch each)
            record["skipped"] = dict(skips)
            record["skip_encounters"] = dict(getattr(self._loader, "skip_encounters", {}))
        decoder = getattr(self.model, "decoder", None)  # DeepSeekOCR; peft wraps keep the attribute
        counts = decoder.expert_counts() if hasattr(decoder, "expert_counts") else None
        if counts is not None:  # tokens per expert per MoE layer of the last micro-batch
            record.update(expert_load_fields(counts))
        return record

    def evaluate(self, hook, step: int) -> dict:
        self.model.eval()
        try:
            with torch.no_grad():
                return hook(self.model, step)
        finally:
            self.model.train()

    # ------------------------------------------------------------------ checkpoints
    def data_state(self) -> dict | None:
        if self.batches is not None:
            return self.batches.data_state()
        return self._loader.state_dict() if hasattr(self._loader, "state_dict") else None

    def save(self, step: int, rank_state: dict) -> Path:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rank": rank_state,
        }
        return save_checkpoint(self.out_dir, step, lambda d: save_state(state, d, TRAINER_STATE),
                               keep_last=self.keep_last, meta={"kind": "local", **self.meta})  # fmt: skip

    def load(self) -> tuple[Path, dict] | None:
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            return None
        state = load_state(ckpt, TRAINER_STATE)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        rank = state["rank"]
        self.good.fill_(rank["step"])
        self.batches = None  # the trainer restarts its iterator at the restored position
        return ckpt, rank


def model_flops(model: nn.Module, seq_len: int) -> Callable[[float, float], float]:
    """FLOPs of a training step of `model` over (tokens, image tokens), rows of `seq_len`."""
    from pipeline.parallel.memory import step_flops

    enc, dec = model.encoder.config, model.decoder.config
    sam_frozen = not any(p.requires_grad for p in model.encoder.sam_model.parameters())
    return lambda tokens, images: step_flops(enc, dec, int(tokens), seq_len, images / max(tokens, 1),
                                             sam_frozen).total  # fmt: skip


def grad_accum_of(parallel: ParallelConfig, dp: int = 1) -> int:
    """Micro-batches per optimizer step: global batch = micro x accumulation x DP."""
    if parallel.global_batch % (parallel.micro_batch * dp):
        raise ValueError(
            f"parallel.global_batch ({parallel.global_batch}) must be a multiple of parallel.micro_batch "
            f"({parallel.micro_batch}) x DP ({dp})"
        )
    return parallel.global_batch // (parallel.micro_batch * dp)


def local_trainer(model: nn.Module, loader, *, train: TrainConfig, optim: OptimConfig, parallel: ParallelConfig,
                  seq_len: int, device: torch.device, logger=None, evaluate=None, meta: dict | None = None):  # fmt: skip
    """A `Trainer` over a `LocalEngine` for `model` (on `device`), compiled per parallel.compile_layers."""
    from pipeline.train.trainer import Trainer

    if parallel.compile_layers:
        model.compile_regions(backend=parallel.compile_backend)
    engine = LocalEngine(model, optim, max_steps=train.max_steps, grad_accum=grad_accum_of(parallel),
                         device=device, dtype=parallel.dtype, out_dir=train.out_dir, keep_last=train.keep_last,
                         meta=meta, flops=model_flops(model, seq_len))  # fmt: skip
    return Trainer(engine, train, loader, logger=logger, evaluate=evaluate)
