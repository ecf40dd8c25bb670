"""Launch check: start it exactly like training to test the rendezvous, the rank layout and the
collectives a PP x DP job needs, in seconds and without loading a model or data.

    DSOCR_MODULE=launch.check_dist bash launch/single_node.sh experiment=node8_stage2
    DSOCR_MODULE=launch.check_dist sbatch launch/slurm.sbatch experiment=paper_stage2

Every rank reads the launcher's environment (`pipeline.parallel.topology.dist_env`), composes the
same Hydra config as `dsocr-train` (argv = its overrides), builds the `Topology` for the world
size it was given, and then runs: an all-reduce over the world, an all-reduce inside each
stage's data-parallel group (gradient sync), and a send/recv chain along each pipeline
(activations). NCCL on GPUs (device = LOCAL_RANK), gloo on CPU. Rank 0 prints one line per
rank (host, node, local rank, stage, dp rank, device) and writes runs/<name>/launch/check.json;
any mismatch raises, so a broken layout exits non-zero.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.cli.dryrun import compose_config
from pipeline.config import to_run_config
from pipeline.parallel.topology import Topology, dist_env, strip_local_rank_arg


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"launch check failed: {message}")


def main(argv: list[str] | None = None) -> dict:
    args = strip_local_rank_arg(sys.argv[1:] if argv is None else argv)
    env = dist_env()
    run = to_run_config(compose_config(args))
    par = run.parallel
    topo = Topology(env.world_size, par.pp, par.micro_batch, par.global_batch, dp=par.dp)

    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=5))
    _check(
        dist.get_world_size() == env.world_size, f"process group size {dist.get_world_size()} != WORLD_SIZE"
    )
    _check(dist.get_rank() == env.rank, f"process group rank {dist.get_rank()} != RANK {env.rank}")

    # world all-reduce: sum of ranks
    total = torch.tensor([float(env.rank)], device=device)
    dist.all_reduce(total)
    _check(
        int(total.item()) == env.world_size * (env.world_size - 1) // 2,
        f"world all-reduce gave {total.item()}",
    )

    # gradient sync inside each stage's data-parallel group (every rank creates every group)
    stage, dp_rank = topo.stage(env.rank), topo.dp_rank(env.rank)
    groups = [dist.new_group(topo.stage_ranks(s)) for s in range(topo.pp)]
    grad = torch.tensor([float(dp_rank)], device=device)
    dist.all_reduce(grad, group=groups[stage])
    _check(int(grad.item()) == topo.dp * (topo.dp - 1) // 2, f"stage {stage} all-reduce gave {grad.item()}")

    # activations along the pipeline: stage s sends (dp_rank, s) to stage s+1 of the same pipeline
    chain = topo.pipeline_ranks(dp_rank)
    if stage > 0:
        received = torch.zeros(2, device=device)
        dist.recv(received, src=chain[stage - 1])
        _check(
            received.tolist() == [float(dp_rank), float(stage - 1)], f"rank {env.rank} received {received}"
        )
    if stage < topo.pp - 1:
        dist.send(torch.tensor([float(dp_rank), float(stage)], device=device), dst=chain[stage + 1])

    me = {
        "rank": env.rank,
        "host": socket.gethostname(),
        "node_rank": env.node_rank,
        "local_rank": env.local_rank,
        "stage": stage,
        "dp_rank": dp_rank,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""),
    }
    table: list[dict] = [{} for _ in range(env.world_size)]
    dist.all_gather_object(table, me)
    result = {"name": run.name, "topology": topo.describe(), "ranks": table}
    if env.rank == 0:
        print(f"launch check {run.name}: {topo.describe()}")
        for row in table:
            print("  " + "  ".join(f"{k} {v}" for k, v in row.items()))
        out = Path("runs") / run.name / "launch" / "check.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"launch check passed: {env.world_size} ranks, written to {out}")
    dist.barrier()
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
