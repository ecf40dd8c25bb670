"""Data-parallel training of the whole DeepSeek-OCR model on DeepSpeed's engine (parallel.pp = 1).

Stage 1 of DeepSeek-OCR (arXiv 2510.18234 section 3.5; ../shared/spec/training.md) trains the
DeepEncoder with a compact LM and needs no pipeline: every rank holds the whole model, DeepSpeed
averages the gradients and shards optimizer states (ZeRO-1) or optimizer states and gradients
(ZeRO-2) over the data-parallel ranks. Stage 2 runs here too when it fits one GPU (PP=1).
`dsocr-train` dispatches to `run_data_parallel_training` when parallel.pp = 1 and the world
size is > 1 (`pipeline.train.job.run_distributed_job`); launch/ starts it like a pipeline job.

The run is `pipeline.train.trainer.Trainer` (the loop of every path: non-finite steps skipped and
counted, `train.max_bad_steps` in a row stop the run, SIGTERM and `train.max_minutes` agreed by
all ranks, checkpoints, exact resume, one log record) over `DataParallelEngine`, which shares with
the pipeline's engine (`pipeline.parallel.engine_base`), not copied:
- the DeepSpeed config of `pipeline.parallel.ds_config` (batch keys from `Topology`: global
  batch = micro x accumulation x DP, validated; clipping; bf16 with fp32 master weights), with
  the ZeRO stage from parallel.zero_stage (0, 1 or 2) and without the pipeline section;
- our AdamW over `pipeline.train.optim.param_groups` and the LambdaLR schedules;
- the step guard of `pipeline.parallel.engine.install_step_guard`: a non-finite loss on any
  rank skips the update on every rank; its one all-reduce also sums the step's losses and counts;
- the atomic keep-last-N checkpoints of `pipeline.parallel.checkpoints` (meta kind
  "data_parallel"; RNG states and the loader position per rank).
Rank 0 logs. The fine-tune's data-parallel path (`pipeline.finetune.distributed`) runs this
engine over its adapted model.

The model comes from `model_factory()` (the job's `build_run_model`: presets or
`model.init_from`, then the stage-1 options `encoder_init` / `sam_init` / `clip_init` / `freeze`
of `pipeline.stage1.options`), seeded identically on every rank (DeepSpeed also broadcasts rank
0's weights). parallel.compile_layers compiles its repeated blocks in place before DeepSpeed
wraps it (`DeepSeekOCR.compile_regions`, backend parallel.compile_backend; state-dict keys
unchanged); evaluation then runs eagerly (no recompiles for generation shapes). At the end
rank 0 writes the release-layout model (fp32 master weights when bf16) and, when
`model.export_encoder` is set, the stage-1 encoder export.

DeepSpeed 0.19 precision rules (engine `_do_optimizer_sanity_check`): bf16 keeps fp32 master
weights only inside its ZeRO optimizers, so parallel.dtype=bf16 needs zero_stage 1 or 2; ZeRO-1
accumulates gradients in fp32 (`data_types.grad_accum_dtype`), ZeRO-2 in its bf16 buckets.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.batch import PackedBatch
from pipeline.checkpoint_io import configs_from_dict, configs_to_dict, export_release
from pipeline.config import ModelConfig, OptimConfig, ParallelConfig, RunConfig, TrainConfig
from pipeline.model import DeepSeekOCR
from pipeline.parallel import checkpoints as ckpt_io
from pipeline.parallel.ds_config import build_optimizer_and_scheduler, deepspeed_config
from pipeline.parallel.engine import restore_fp32_rotary, run_model_configs
from pipeline.parallel.engine_base import (
    N_LOSSES,
    DeepSpeedEngineBase,
    EngineResult,
    rank_logger,
    seed_rank,
)
from pipeline.parallel.topology import Topology, dist_env
from pipeline.parallel.trainer import init_distributed
from pipeline.stage1.options import export_encoder_if_requested
from pipeline.train.local_engine import batch_to, model_flops
from pipeline.train.logging import NullLogger, RunLogger
from pipeline.train.trainer import StepStats, Trainer, expert_load_fields

ZERO_STAGES = (0, 1, 2)
LoaderFactory = Callable[[int, int], Iterable[PackedBatch]]


def validate_data_parallel_config(p: ParallelConfig, o: OptimConfig, train: TrainConfig) -> None:
    """ValueError for settings this path cannot run (before any process group or model)."""
    if p.pp != 1:
        raise ValueError(f"parallel.pp={p.pp}: data parallelism runs the whole model per rank; use pp=1")
    if p.zero_stage not in ZERO_STAGES:
        raise ValueError(
            f"parallel.zero_stage={p.zero_stage}: data parallelism supports ZeRO stage 0, 1 or 2 (stage 3 "
            "shards the weights, which the checkpoints and exports here do not handle); set 0, 1 or 2"
        )
    if p.dtype == "bf16" and p.zero_stage == 0:
        raise ValueError(
            "parallel.dtype=bf16 trains with fp32 master weights, which DeepSpeed keeps only in its ZeRO "
            "optimizers: set parallel.zero_stage=1 (or 2), or parallel.dtype=fp32"
        )
    if p.partition is not None:
        raise ValueError("parallel.partition is a pipeline setting; with parallel.pp=1 leave it null")
    # the shared checks (dtype names, lr, schedule, clipping, steps) of the pipeline's config
    deepspeed_config(dataclasses.replace(p, zero_stage=1), o, train, Topology(1, 1, 1, 1))


def data_parallel_ds_config(
    p: ParallelConfig, o: OptimConfig, train: TrainConfig, topology: Topology
) -> dict[str, Any]:
    """The DeepSpeed config of a data-parallel run: the pipeline's, ZeRO 0/1/2, no pipeline section."""
    validate_data_parallel_config(p, o, train)
    config = deepspeed_config(dataclasses.replace(p, zero_stage=1), o, train, topology)
    config.pop("pipeline", None)
    config["zero_optimization"] = {"stage": p.zero_stage}
    if p.zero_stage != 1:
        config.pop("data_types", None)  # fp32 accumulation of bf16 grads is DeepSpeed's ZeRO-1 path only
    return config


def prepare_data_parallel(run: RunConfig, tokenizer, world_size: int):
    """Every check that needs no process group and no model: (topology, model configs dict, resume)."""
    p = run.parallel
    validate_data_parallel_config(p, run.optim, run.train)
    topology = Topology(world_size=world_size, pp=1, micro_batch=p.micro_batch,
                        global_batch=p.global_batch, dp=p.dp)  # fmt: skip
    if run.model.init_from:  # the configured size, or a ValueError naming both sizes
        ckpt_io.check_init_from(run.model, tokenizer)
    configs = run_model_configs(run.model, vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_id,
                                bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)  # fmt: skip
    model_dict = ckpt_io.model_configs_dict(configs)
    resume_from = ckpt_io.newest_checkpoint(run.train.out_dir) if run.train.resume else None
    if resume_from is not None:
        ckpt_io.check_resume_compatible(
            resume_from, pp=1, dp=topology.dp, parts=None, model=model_dict, kind=ckpt_io.DP_KIND
        )
    return topology, model_dict, resume_from


def run_data_parallel_training(
    run: RunConfig,
    *,
    tokenizer,
    loader_factory: LoaderFactory,
    model_factory: Callable[[], DeepSeekOCR],
    eval_hook: Callable[[torch.nn.Module, int], dict] | None = None,
    logger: RunLogger | NullLogger | None = None,
    export: bool = True,
) -> EngineResult:
    """Train `run` on this rank's replica with `pipeline.train.trainer.Trainer`; returns what this
    rank saw.

    export=True: rank 0 writes `<out_dir>/model` (release layout) and, with
    model.export_encoder, `<out_dir>/encoder_export` at the end (not after a SIGTERM stop)."""
    env = dist_env()
    topology, model_dict, _ = prepare_data_parallel(run, tokenizer, env.world_size)
    device = init_distributed()
    seed_rank(run.train)  # identical init on every rank
    model = model_factory()
    built = configs_to_dict(model)
    if built != model_dict:
        ckpt_io.check_same_size(configs_from_dict(built), configs_from_dict(model_dict), "the built model")
    engine = DataParallelEngine(topology, tokenizer, model, device, parallel=run.parallel, optim=run.optim,
                                train=run.train, seq_len=run.data.seq_len, record=ckpt_io.run_config_dict(run))  # fmt: skip
    logger = rank_logger(
        logger, engine.is_logging_rank, run.train, run.logger, run.name, ckpt_io.run_config_dict(run)
    )
    loader = loader_factory(engine.dp_rank, topology.dp)
    trainer = Trainer(engine, run.train, loader, logger=logger, evaluate=eval_hook)
    try:
        trainer.resume()
        result = trainer.train()
        if export and not result.stopped_by_signal:
            engine.export(trainer.step, logger, run.model, run.name)
        return engine.result(result)
    finally:
        logger.close()


class DataParallelEngine(DeepSpeedEngineBase):
    """The `Engine` of a data-parallel run: `model` (built identically on every rank, trainable
    parameters chosen) in DeepSpeed's engine, ZeRO parallel.zero_stage; rank 0 logs.

    `record` is the run's config as its checkpoints' meta.json records it; `meta` adds entries
    there (the fine-tune names its method)."""

    kind = ckpt_io.DP_KIND

    def __init__(self, topology: Topology, tokenizer, model: DeepSeekOCR, device: torch.device, *,
                 parallel: ParallelConfig, optim: OptimConfig, train: TrainConfig, seq_len: int, record: dict,
                 meta: dict | None = None) -> None:  # fmt: skip
        import deepspeed

        super().__init__(train, topology, tokenizer, device, model_flops(model, seq_len))
        self.is_logging_rank = self.rank == 0
        model.train()
        if parallel.compile_layers:
            model.compile_regions(backend=parallel.compile_backend)
        optimizer, scheduler = build_optimizer_and_scheduler(model, optim, train.max_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=data_parallel_ds_config(parallel, optim, train, topology),
        )  # fmt: skip
        restore_fp32_rotary(self.engine.module)
        self._install_guard()
        self.module = self.engine.module
        self.meta = {"pp": 1, "dp": topology.dp, "parts": None, "model": configs_to_dict(model),
                     "zero_stage": parallel.zero_stage, "run": record, **(meta or {})}  # fmt: skip

    @property
    def model(self) -> DeepSeekOCR:
        return self.engine.module

    # ------------------------------------------------------------------ step
    def step(self, batches: Iterator[PackedBatch]) -> StepStats:
        """One optimizer step = grad_accum micro-batches; the engine averages the gradients over
        micro-batches and ranks, the guard (at the last micro-batch) sums the figures."""
        self.engine.train()
        sums = torch.zeros(N_LOSSES, dtype=torch.float64, device=self.device)
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        tokens = rows = images = wait = 0.0
        accum = self.topology.grad_accum
        for micro in range(accum):
            start = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - start
            tokens, rows = tokens + batch.num_tokens, rows + batch.num_documents
            images += batch.image_positions.numel()
            out = self.engine(batch_to(batch, self.device))
            self.engine.backward(out.loss)
            values = torch.stack([out.loss, out.lm_loss, out.aux_loss]).detach().double()
            sums += values
            bad |= ~torch.isfinite(values[0])
            if micro == accum - 1:  # what the guard all-reduces at this last micro-batch's step
                self._set_local(bad, sums / accum, [tokens, rows, images])
            self.engine.step()  # the optimizer runs (guarded) at the accumulation boundary
        return self._stats(None, wait)

    # ------------------------------------------------------------------ logging and eval
    def extras(self) -> dict[str, Any]:
        """Skipped samples of every rank (a gather to rank 0) and rank 0's expert load."""
        skips = getattr(self._loader, "skip_counts", None)
        gathered = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(dict(skips or {}), gathered, dst=0)
        if self.rank != 0:
            return {}
        record: dict[str, Any] = {}
        merged = sum((Counter(g) for g in gathered or []), Counter())
        if merged:
            record["skipped"] = dict(merged)
        decoder = getattr(self.model, "decoder", None)
        counts = decoder.expert_counts() if hasattr(decoder, "expert_counts") else None
        if counts is not None:  # (n_moe_layers, E) of rank 0's last micro-batch
            record.update(expert_load_fields(counts))
        return record

    def evaluate(self, hook, step: int) -> dict | None:
        """Rank 0 evaluates its replica (identical on every rank); the others wait."""
        metrics = None
        if self.rank == 0:
            model = self.model
            model.eval()
            with torch.no_grad():
                metrics = hook(model, step)
            model.train()
        dist.barrier()
        return metrics

    # ------------------------------------------------------------------ export
    def master_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the model's state dict on CPU with the fp32 master copy of every trainable
        weight (ZeRO-1/2 and bf16 keep it in the optimizer; fp32 ZeRO-0 weights are the masters)."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                master = safe_get_full_fp32_param(param)  # collective over the DP group when sharded
                if master is not None:
                    state[name] = master.detach().cpu()
        return state

    def export(self, step: int, logger, model_cfg: ModelConfig, run_name: str) -> None:
        """Rank 0: `<out_dir>/model` in the released layout (fp32 masters) and the stage-1 encoder
        export (`model.export_encoder` of `model_cfg`)."""
        state = self.master_state_dict()
        if self.rank == 0:
            from pipeline.parallel.consolidate import model_from_state

            model = model_from_state(state, configs_from_dict(self.meta["model"]))
            out = Path(self.train.out_dir)
            export_release(model, self.tokenizer, out / "model")
            exported = export_encoder_if_requested(model, model_cfg, out, run_name=run_name, step=step)
            logger.log({"event": "export", "step": step, "model": str(out / "model"),
                        "encoder_export": str(exported) if exported else None})  # fmt: skip
        dist.barrier()


__all__ = [
    "DataParallelEngine",
    "data_parallel_ds_config",
    "prepare_data_parallel",
    "run_data_parallel_training",
    "validate_data_parallel_config",
]
