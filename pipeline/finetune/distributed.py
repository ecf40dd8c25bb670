"""Data-parallel fine-tuning on several GPUs: DeepSpeed's (non-pipeline) engine, one replica per rank.

Launched like every multi-process job (torchrun / `deepspeed --no_local_rank` / launch/, which
set RANK, WORLD_SIZE, LOCAL_RANK); `dsocr-finetune` dispatches here when WORLD_SIZE > 1.
Every rank builds the same adapted model (`pipeline.finetune.job.prepare`, seeded; DeepSpeed
also broadcasts rank 0's weights at initialisation), reads its own share of the target/replay
mixture (`StreamingLoader(dp_rank, dp_world)`), and trains it with the loop of every path,
`pipeline.train.trainer.Trainer`, over `pipeline.parallel.data_parallel.DataParallelEngine`:
DeepSpeed averages the gradients of the trainable parameters only (adapters, or the chosen
components); ZeRO 0/1/2, batch arithmetic (global = micro x accumulation x DP), clipping and
bf16 as in `data_parallel_ds_config`; our AdamW over the trainable groups and LambdaLR. So a
data-parallel fine-tune has what the single-process one has: periodic checkpoints
(`train.save_every`, meta kind "data_parallel" with the fine-tune method), exact resume from the
newest one (`train.resume`), a checkpoint on SIGTERM, the time box `train.max_minutes`,
non-finite steps skipped on every rank, and the common log keys. Rank 0 evaluates before and
after, logs and exports (adapter and/or merged); the others wait at a barrier.

Pipeline parallelism is not used (LoRA fine-tunes fit one GPU per replica; a full fine-tune of
the release needs ~60 GiB per replica in bf16 + fp32 Adam, or ZeRO-1/2 sharding over DP).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.distributed as dist

from pipeline.config import RunConfig
from pipeline.data.loader import StreamingLoader
from pipeline.finetune.job import (
    FinetuneResult,
    describe,
    evaluate_sets,
    finish,
    loader_config,
    prepare,
    start_output,
)
from pipeline.parallel.checkpoints import run_config_dict
from pipeline.parallel.data_parallel import DataParallelEngine, data_parallel_ds_config
from pipeline.parallel.engine_base import seed_rank
from pipeline.parallel.topology import Topology, dist_env
from pipeline.parallel.trainer import init_distributed
from pipeline.train.data_kinds import data_kind
from pipeline.train.job import eval_config
from pipeline.train.logging import NullLogger, RunLogger
from pipeline.train.trainer import Trainer
from pipeline.training_info import TrainingInfo, mode_mix


def validate_finetune_dp(run: RunConfig, world_size: int) -> Topology:
    """ValueError for what this path cannot run, before any process group or model."""
    if not data_kind(run.data).finetunes_data_parallel:
        raise ValueError(
            "a data-parallel fine-tune reads webdataset shards (data.kind=webdataset); the embedded demo "
            "(data.kind=synth_lines) runs in one process"
        )
    p = run.parallel
    topology = Topology(world_size=world_size, pp=1, micro_batch=p.micro_batch, global_batch=p.global_batch,
                        dp=p.dp)  # fmt: skip
    data_parallel_ds_config(p, run.optim, run.train, topology)  # dtype / ZeRO / schedule / clipping
    return topology


def run_finetune_dp(run: RunConfig, resolved_yaml: str | None = None) -> FinetuneResult | None:
    """The data-parallel fine-tune of this rank; rank 0 returns the result, the others None (all
    return one, preempted, after a SIGTERM)."""
    env = dist_env()
    topology = validate_finetune_dp(run, env.world_size)
    rank = env.rank
    out = start_output(run.train, run.parallel, resolved_yaml if rank == 0 else None)
    device = init_distributed()
    seed_rank(run.train)
    prep = prepare(run, out)
    prep.model.to(device)
    reports = {}
    ecfg = eval_config(run.data, run.eval)
    if rank == 0:
        prep.tokenizer.save(out / "tokenizer")
        describe(run.name, run.finetune, prep, f"{device} x {topology.dp} ranks", out)
        reports = evaluate_sets(ecfg, prep, out, "before")
    dist.barrier()

    engine = DataParallelEngine(topology, prep.tokenizer, prep.model, device, parallel=run.parallel,
                                optim=run.optim, train=run.train, seq_len=run.data.seq_len,
                                record=run_config_dict(run), meta={"finetune": run.finetune.method})  # fmt: skip
    train_data = loader_config(run.data, prep.data, batch_size=run.parallel.micro_batch, seed=run.train.seed)
    loader = StreamingLoader(train_data, prep.tokenizer, dp_rank=engine.dp_rank, dp_world=topology.dp)
    logger = RunLogger(out, run.logger, asdict(run), run.name) if rank == 0 else NullLogger()
    trainer = Trainer(engine, run.train, loader, logger=logger)
    trainer.resume()
    result = trainer.train()
    job = None
    if result.stopped_by_signal:  # the checkpoint is written; resume with the same command
        logger.close()  # every rank reports it, so every rank exits as preempted
        return FinetuneResult(out, result.steps, None, None, reports, prep.added, None, None, preempted=True)
    check_replicas_agree(engine.model)
    if rank == 0:
        after = evaluate_sets(ecfg, prep, out, "after")
        for name, report in after.items():
            logger.log({"event": "eval", "set": name, "step": trainer.step, "cer": report.raw.corpus_cer},
                       console=False)  # fmt: skip
        logger.close()
        info = TrainingInfo(ecfg.mode, ecfg.prompt, mode_mix(train_data.sources))
        job = finish(run.finetune, info, prep, out, {**reports, **after}, result.steps, result.losses)
    dist.barrier()
    return job


def check_replicas_agree(model: torch.nn.Module, tolerance: float = 1e-5) -> None:
    """All ranks hold the same trainable weights after training (gradients were averaged)."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters() if p.requires_grad])
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    spread = max(float((g - gathered[0]).abs().max()) for g in gathered)
    if spread > tolerance * (1 + float(gathered[0].abs().max())):
        raise RuntimeError(f"data-parallel replicas diverged (max difference of parameter sums {spread:.3g})")
