"""Data-parallel fine-tuning on several GPUs: DeepSpeed's (non-pipeline) engine, one replica per rank.

Launched like every multi-process job (torchrun / `deepspeed --no_local_rank` / launch/, which
set RANK, WORLD_SIZE, LOCAL_RANK); `dsocr-finetune` dispatches here when WORLD_SIZE > 1.
Every rank builds the same adapted model (`pipeline.finetune.job.prepare`, seeded; DeepSpeed
also broadcasts rank 0's weights at initialisation), reads its own share of the target/replay
mixture (`StreamingLoader(dp_rank, dp_world)`), and DeepSpeed averages the gradients of the
trainable parameters only (adapters, or the chosen components). Batch arithmetic, ZeRO stage,
clipping and bf16 come from `pipeline.parallel.ds_config` (global = micro x accumulation x DP),
the optimizer is our AdamW object over the trainable groups, the schedule our LambdaLR.
Rank 0 evaluates before and after, logs and exports; the others wait at a barrier.

Limits: pipeline parallelism is not used (LoRA fine-tunes fit one GPU per replica; a full
fine-tune of the release needs ~60 GiB per replica in bf16 + fp32 Adam, or ZeRO-1 sharding of
the optimizer states over DP); no periodic checkpoints / resume in this path (fine-tunes are
short: rerun); a non-finite loss stops the run instead of being skipped.
"""

from __future__ import annotations

import math
import time
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
from pipeline.parallel.ds_config import deepspeed_config
from pipeline.parallel.topology import Topology, dist_env
from pipeline.parallel.trainer import init_distributed
from pipeline.train.local_engine import batch_to
from pipeline.train.logging import NullLogger, RunLogger
from pipeline.train.optim import build_optimizer, build_scheduler, param_groups


def run_finetune_dp(run: RunConfig, resolved_yaml: str | None = None) -> FinetuneResult | None:
    """The data-parallel fine-tune of this rank; rank 0 returns the result, the others None."""
    env = dist_env()
    p = run.parallel
    topology = Topology(world_size=env.world_size, pp=1, micro_batch=p.micro_batch, global_batch=p.global_batch,
                        dp=p.dp)  # fmt: skip
    if run.data.kind != "webdataset":
        raise ValueError(
            "a data-parallel fine-tune reads webdataset shards (data.kind=webdataset); the embedded demo "
            "(data.kind=synth_lines) runs in one process"
        )
    ds_config = deepspeed_config(run, topology)  # validates dtype / ZeRO / schedule before any work
    rank = env.rank
    out = start_output(run, resolved_yaml if rank == 0 else None)
    device = init_distributed()
    prep = prepare(run, out)
    prep.model.to(device)
    reports = {}
    if rank == 0:
        prep.tokenizer.save(out / "tokenizer")
        describe(run, prep, f"{device} x {topology.dp} ranks", out)
        reports = evaluate_sets(run, prep, out, "before")
    dist.barrier()

    import deepspeed

    optimizer = build_optimizer(param_groups(prep.model, run.optim.weight_decay), run.optim)
    scheduler = build_scheduler(optimizer, run.train.max_steps, run.optim)
    engine, _, _, _ = deepspeed.initialize(model=prep.model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)  # fmt: skip
    loader = StreamingLoader(loader_config(run, prep.data), prep.tokenizer,
                             dp_rank=topology.dp_rank(rank), dp_world=topology.dp)  # fmt: skip
    logger = RunLogger(out, run.logger, asdict(run), run.name) if rank == 0 else NullLogger()
    batches = iter(loader)
    losses: list[float] = []
    engine.train()
    for step in range(1, run.train.max_steps + 1):
        t0 = time.perf_counter()
        total = torch.zeros(2, device=device, dtype=torch.float64)  # (sum of losses, micro-batches)
        for _ in range(topology.grad_accum):
            batch = batch_to(next(batches), device)
            result = engine(batch)
            engine.backward(result.loss)
            engine.step()
            total += torch.stack(
                [result.loss.detach().double(), torch.ones((), device=device, dtype=torch.float64)]
            )
        dist.all_reduce(total)
        loss = float(total[0] / total[1])
        if not math.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss} at step {step}: lower optim.lr or check the data")
        losses.append(loss)
        if step % run.train.log_every == 0 or step == 1:
            logger.log({"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                        "step_s": time.perf_counter() - t0, "world": topology.dp})  # fmt: skip

    check_replicas_agree(engine.module)
    job = None
    if rank == 0:
        after = evaluate_sets(run, prep, out, "after")
        logger.close()
        job = finish(run, prep, out, {**reports, **after}, run.train.max_steps, losses)
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
