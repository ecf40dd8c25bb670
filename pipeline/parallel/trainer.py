"""Distributed stage-2 training: DeepSeek-OCR on DeepSpeed's pipeline engine (PP x DP).

`run_pipeline_training(run, tokenizer=..., loader_factory=...)` is called by every rank of a
torchrun / deepspeed / SLURM launch (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set).
Order of work: validate everything that can be checked from configs and files (topology,
partition, DeepSpeed settings, `model.init_from` size, resume layout) -> init the process
group -> build this rank's stage -> load weights (`model.init_from`, then the stage-1 encoder
sources `model.encoder_init` / `sam_init` / `clip_init`, each stage copying only its own tensors
after a strict check against the whole encoder) -> with parallel.compile_layers, regional
torch.compile of the stage's repeated blocks (`pipeline.model.compile_blocks`; state-dict keys
unchanged) -> deepspeed.initialize -> resume -> loop.
`model.freeze` is refused (only SAM + compressor freeze, `model.freeze_sam`); parallel.pp = 1
runs in `pipeline.parallel.data_parallel`.

Data: `loader_factory(dp_rank, dp_world)` (a `StreamingLoader`) is built on the first and the
last stage of every pipeline, keyed by the *data-parallel* rank, so both read identical
micro-batches; the first stage feeds them to the model, the last stage uses them for token /
sample counts and checks that the labels that travelled through the pipeline are the ones it
read (a divergence raises instead of training on misaligned targets).

The run is `pipeline.train.trainer.Trainer` (the loop of every path) over `PipelineEngine`, whose
optimizer step is one `engine.train_batch()` (micro-batches = gradient accumulation, 1F1B
schedule). Log records carry the Trainer's keys plus the 1F1B bubble and are written by one
rank, the last stage of data-parallel rank 0 (where the loss lives). A step whose loss is
NaN/Inf is skipped on every rank by the step guard (`pipeline.parallel.engine_base`) and
counted; `train.max_bad_steps` in a row stop the run with the last good checkpoint intact.
Checkpoints: every `train.save_every` steps, at the end, and on SIGTERM or at the time box
(`train.max_minutes`; agreed by all ranks at the next step boundary); see
`pipeline.parallel.checkpoints`. With `train.resume` the newest complete checkpoint is loaded
and training continues with exactly the next batch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from pipeline.batch import PackedBatch
from pipeline.config import DataConfig, ModelConfig, OptimConfig, ParallelConfig, RunConfig, TrainConfig
from pipeline.model import compile_blocks
from pipeline.parallel import checkpoints as ckpt_io
from pipeline.parallel.ds_config import validate_training_config
from pipeline.parallel.engine import build_engine, build_pipeline_module, run_model_configs, run_partition
from pipeline.parallel.engine_base import DeepSpeedEngineBase, EngineResult, StepView, rank_logger, seed_rank
from pipeline.parallel.memory import step_flops
from pipeline.parallel.stages import unit_key_to_model_key
from pipeline.parallel.topology import Topology, dist_env
from pipeline.stage1.options import encoder_sources, validate_model_options
from pipeline.stage1.parts import encoder_part_of
from pipeline.train.logging import NullLogger, RunLogger
from pipeline.train.trainer import StepStats, Trainer, expert_load_fields
from pipeline.units import UNIT_KINDS

LoaderFactory = Callable[[int, int], Iterable[PackedBatch]]
ENCODER_PREFIX = "encoder."


class _StageBatches:
    """The engine's data iterator on the first / last stage over the Trainer's batches: yields
    (stage-0 inputs | None, labels), records what it read and how long it waited."""

    def __init__(self, source, *, first: bool) -> None:
        self.source, self.first = source, first
        self.records: list[tuple[int, int, int, torch.Tensor]] = []  # tokens, rows, image tokens, labels
        self.wait_s = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.source)
        self.wait_s += time.perf_counter() - start
        inputs = batch.model_inputs() if self.first else None
        images = int(batch.image_positions.numel())
        self.records.append((batch.num_tokens, batch.num_documents, images, batch.labels.long()))
        return inputs, batch.labels


def prepare(run: RunConfig, tokenizer, world_size: int):
    """Every check that needs no process group and no model (ValueError naming field and fix)."""
    topology = Topology(
        world_size=world_size,
        pp=run.parallel.pp,
        micro_batch=run.parallel.micro_batch,
        global_batch=run.parallel.global_batch,
        dp=run.parallel.dp,
    )
    if run.parallel.pp < 2:
        raise ValueError(
            "parallel.pp=1 runs without the pipeline engine: use the data-parallel trainer "
            "(pipeline.parallel.data_parallel; dsocr-train picks it) or set parallel.pp >= 2"
        )
    if run.model.freeze:
        raise ValueError(
            f"model.freeze={list(run.model.freeze)}: the pipeline engine freezes only SAM + compressor "
            "(model.freeze_sam; a stage without trainable parameters cannot join DeepSpeed's pipeline). "
            "Leave model.freeze empty, or train with parallel.pp=1 (data parallel), which applies it"
        )
    validate_model_options(run.model)  # encoder_init / sam_init / clip_init: files exist, one source
    validate_training_config(run.parallel, run.optim, run.train)
    split = run_partition(run.model, run.data, run.parallel)
    configs = run_model_configs(
        run.model,
        vocab_size=tokenizer.vocab_size,
        image_token_id=tokenizer.image_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    model_dict = ckpt_io.model_configs_dict(configs)
    resume_from = ckpt_io.newest_checkpoint(run.train.out_dir) if run.train.resume else None
    if resume_from is not None:
        ckpt_io.check_resume_compatible(
            resume_from, pp=topology.pp, dp=topology.dp, parts=split.parts, model=model_dict
        )
    elif run.model.init_from:
        found = ckpt_io.init_source_configs(run.model.init_from, tokenizer.image_id)
        ckpt_io.check_same_size(found, configs, f"model.init_from={run.model.init_from}")
    return topology, split, configs, model_dict, resume_from


def load_encoder_sources(module, m, enc_cfg) -> dict[str, list[str]]:
    """Apply model.encoder_init / sam_init / clip_init to this rank's stage (after model.init_from).

    Every rank checks each source strictly against the whole encoder (missing / unexpected /
    mis-shaped keys raise ValueError listing them) and copies only the tensors its own units hold.
    Returns {source: parts loaded on this stage}."""
    loaded: dict[str, list[str]] = {}
    for src in encoder_sources(m, enc_cfg):
        parts: set[str] = set()
        for unit in module.units():
            own = unit.state_dict()
            with torch.no_grad():
                for key, value in own.items():
                    model_key = unit_key_to_model_key(key)
                    if model_key is None or not model_key.startswith(ENCODER_PREFIX):
                        continue
                    enc_key = model_key[len(ENCODER_PREFIX) :]
                    if enc_key in src.state:
                        value.copy_(src.state[enc_key])
                        parts.add(encoder_part_of(enc_key))
        loaded[src.source] = sorted(parts)
    return loaded


def init_distributed() -> torch.device:
    """DeepSpeed's process group (NCCL on GPUs, gloo on CPU) and this rank's device."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def run_pipeline_training(
    run: RunConfig,
    *,
    tokenizer,
    loader_factory: LoaderFactory,
    eval_hook: Callable[[torch.nn.Module, int], dict] | None = None,
    logger: RunLogger | NullLogger | None = None,
    on_step: Callable[[StepView], None] | None = None,
) -> EngineResult:
    """Train `run` on this rank's pipeline stage with `pipeline.train.trainer.Trainer` over a
    `PipelineEngine`; returns what this rank saw.

    on_step(view) runs on every rank after each good step (tests/parallel/pp_worker.py counts the
    backward walks through each decoder layer with it)."""
    env = dist_env()
    topology, split, configs, model_dict, resume_from = prepare(run, tokenizer, env.world_size)
    device = init_distributed()
    # DeepSpeed 0.19 back-propagates a stage with several float outputs one tensor at a time,
    # retain_graph=True for all but the last; compiled backwards (the decoder's flex attention)
    # with donated buffers refuse that (seen on H200 with PP=2 x DP=2, no checkpointing).
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    seed_rank(run.train)
    engine = PipelineEngine(topology, split, configs, tokenizer, device, model_cfg=run.model, data=run.data,
                            parallel=run.parallel, optim=run.optim, train=run.train,
                            record=ckpt_io.run_config_dict(run), model_dict=model_dict,
                            resume_from=resume_from)  # fmt: skip
    logger = rank_logger(
        logger, engine.is_logging_rank, run.train, run.logger, run.name, ckpt_io.run_config_dict(run)
    )
    if run.parallel.compile_layers:  # what the logging (last) stage compiled
        logger.log({"event": "compile", "stage": engine.stage, "backend": run.parallel.compile_backend,
                    "regions": engine.compiled_regions})  # fmt: skip
    loader = loader_factory(engine.dp_rank, topology.dp) if (engine.first or engine.last) else None
    hook = None if on_step is None else (lambda t: on_step(engine.view(t.step)))
    trainer = Trainer(engine, run.train, loader, logger=logger, evaluate=eval_hook, on_step=hook)
    try:
        trainer.resume()
        return engine.result(trainer.train())
    finally:
        logger.close()


class PipelineEngine(DeepSpeedEngineBase):
    """The `Engine` of a pipeline run: this rank's stage in DeepSpeed's pipeline engine; the last
    stage of data-parallel rank 0 logs (where the loss lives). Weights: `model.init_from`, then the
    stage-1 encoder sources (skipped when `resume_from`: the checkpoint's weights are loaded)."""

    kind = ckpt_io.KIND

    def __init__(self, topology: Topology, split, configs, tokenizer, device, *, model_cfg: ModelConfig,
                 data: DataConfig, parallel: ParallelConfig, optim: OptimConfig, train: TrainConfig,
                 record: dict, model_dict: dict, resume_from: Path | None = None) -> None:  # fmt: skip
        enc, dec, _ = configs
        flops = lambda tokens, images: step_flops(enc, dec, int(tokens), data.seq_len,  # noqa: E731
                                                  images / tokens, model_cfg.freeze_sam).total  # fmt: skip
        super().__init__(train, topology, tokenizer, device, flops)
        self.split, self.configs, self.parts = split, configs, split.parts
        self.module = build_pipeline_module(model_cfg, data, parallel, topology, configs, seed=train.seed)
        self.stage = topology.stage(self.rank)
        self.first, self.last = self.stage == 0, self.stage == topology.pp - 1
        self.is_logging_rank = self.rank == topology.logging_rank()
        self.batches: _StageBatches | None = None
        self.loaded_encoder_parts: dict[str, list[str]] = {}
        self.compiled_regions: dict[str, int] = {}  # blocks compiled per kind (parallel.compile_layers)
        if resume_from is None and model_cfg.init_from:
            self.module.load_model_state(ckpt_io.load_init_state(model_cfg.init_from))
        if resume_from is None:
            self.loaded_encoder_parts = load_encoder_sources(self.module, model_cfg, configs[0])
        if parallel.compile_layers:  # on the stage's device, before DeepSpeed wraps it
            self.compiled_regions = dict.fromkeys(UNIT_KINDS, 0)
            for unit in self.module.units():
                for kind, n in compile_blocks(unit.model, [unit.unit], parallel.compile_backend).items():
                    self.compiled_regions[kind] = self.compiled_regions.get(kind, 0) + n
        self.engine, self.optimizer, self.scheduler = build_engine(
            self.module, parallel, optim, train, topology
        )
        self._install_guard()
        self.meta = {
            "format": ckpt_io.PIPELINE_FORMAT,
            "pp": topology.pp,
            "dp": topology.dp,
            "parts": split.parts,
            "units": [u.name for u in split.units],
            "model": model_dict,
            "run": record,
        }

    # ------------------------------------------------------------------ step
    def step(self, batches) -> StepStats:
        """One `engine.train_batch()` (the micro-batches of gradient accumulation, 1F1B). The loss
        and the lm / aux losses are DeepSpeed's (averaged over micro-batches and data-parallel
        ranks, broadcast to every stage); the counts come from the last stages via the guard."""
        if batches is not None and (self.batches is None or self.batches.source is not batches):
            self.batches = _StageBatches(batches, first=self.first)
            self.engine.set_dataiterator(self.batches)
        self.module.reset_step_records()
        if self.batches is not None:
            self.batches.records.clear()
            self.batches.wait_s = 0.0
        loss = float(self.engine.train_batch())
        self._check_labels()
        extra = self.engine.get_additional_losses() or {}
        lm = float(extra["lm_loss"]) if "lm_loss" in extra else loss
        aux = float(extra["aux_loss"]) if "aux_loss" in extra else 0.0
        return self._stats((loss, lm, aux), self.batches.wait_s if self.batches is not None else 0.0)

    def _local_figures(self) -> torch.Tensor:
        """At the optimizer step: the last stage's non-finite flag and counts (once per pipeline)."""
        bad, counts = False, [0.0, 0.0, 0.0]
        if self.last:
            total = self.engine.total_loss
            bad = total is not None and not bool(torch.isfinite(torch.as_tensor(total)).all())
            records = self.batches.records if self.batches is not None else []
            counts = [float(sum(r[i] for r in records)) for i in range(3)]
        self._set_local(bad, torch.zeros(3), counts)
        return self._local

    def _check_labels(self) -> None:
        if not self.last or self.batches is None:
            return
        head = self.module.head()
        read = [r[3] for r in self.batches.records]
        seen = head.seen_labels
        if len(read) != len(seen) or any(not torch.equal(a, b.to(a.device)) for a, b in zip(read, seen)):
            raise RuntimeError(
                "the last stage received labels that differ from the batches it read: the first and last "
                "stage of a pipeline must read identical data (key sharding on the data-parallel rank)"
            )

    # ------------------------------------------------------------------ logging and eval
    def extras(self) -> dict[str, Any]:
        """The 1F1B bubble, the logging rank's skipped samples, the expert load of data-parallel
        rank 0's pipeline (gathered from its stages)."""
        counts = self._gather_expert_counts()
        if not self.is_logging_rank:
            return {}
        record: dict[str, Any] = {"bubble": self.topology.bubble_fraction}
        skips = getattr(self._loader, "skip_counts", None)
        if skips:
            record["skipped"] = dict(skips)
        if counts:
            record.update(expert_load_fields(torch.stack([counts[i] for i in sorted(counts)])))
        return record

    def _gather_expert_counts(self) -> dict[int, torch.Tensor]:
        """Expert counts of every MoE layer of data-parallel rank 0's pipeline, on the logging rank."""
        if self.dp_rank != 0:
            return {}
        local = {i: c.cpu() for i, c in self.module.expert_counts().items()}
        gathered = [None] * self.topology.pp if self.last else None
        torch.distributed.gather_object(local, gathered, dst=self.topology.logging_rank(),
                                        group=self.engine.grid.get_pipe_parallel_group())  # fmt: skip
        merged: dict[int, torch.Tensor] = {}
        for part in gathered or []:
            merged.update(part or {})
        return merged

    def evaluate(self, hook, step: int) -> dict | None:
        """Gather data-parallel rank 0's stages into one DeepSeekOCR on the logging rank and evaluate."""
        metrics = None
        if self.dp_rank == 0:
            state = {k: v.detach().cpu() for k, v in self.module.model_state_dict().items()}
            gathered = [None] * self.topology.pp if self.last else None
            torch.distributed.gather_object(state, gathered, dst=self.topology.logging_rank(),
                                            group=self.engine.grid.get_pipe_parallel_group())  # fmt: skip
            if self.last:
                from pipeline.parallel.consolidate import model_from_state

                full = {}
                for part in gathered:
                    full.update(part)
                model = model_from_state(full, self.configs).to(self.device)
                model.eval()
                with torch.no_grad():
                    metrics = hook(model, step)
                del model
        torch.distributed.barrier()
        return metrics


__all__ = ["PipelineEngine", "init_distributed", "prepare", "run_pipeline_training"]
