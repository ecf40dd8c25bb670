"""Process topology of a pipeline x data parallel job and the launcher environment.

Batch arithmetic (DeepSpeed asserts it: train_batch_size == micro x GAS x DP):

    world_size   = pp * dp                       (no tensor parallelism)
    global_batch = micro_batch * grad_accum * dp

Rank layout follows DeepSpeed's default `PipeDataParallelTopology` (axes ["pipe", "data"],
data fastest): global rank = stage * dp + dp_rank. Data sharding and worker seeds must be
keyed on `dp_rank`, not on the global rank, so the first and last stage of one pipeline read
the same samples (../shared/spec/engine_notes.md, "Data sharding under pipeline parallelism").

Launchers: torchrun and `deepspeed --no_local_rank` export LOCAL_RANK/RANK/WORLD_SIZE/
MASTER_ADDR/MASTER_PORT; the plain deepspeed launcher also appends `--local_rank=N` to argv,
which Hydra's command line rejects. `dist_env()` reads the environment only, and
`strip_local_rank_arg()` removes that argv entry before Hydra parses the command line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# `--local_rank=3`, `--local-rank=3` (torch.distributed.launch spelling), or the pair
# `--local_rank 3`.
_LOCAL_RANK_FLAG = re.compile(r"^--local[_-]rank(=\d+)?$")


@dataclass
class Topology:
    """Resolved PP x DP layout and gradient accumulation of one job.

    world_size: number of processes (GPUs). pp: pipeline stages. micro_batch: rows per
    micro-batch per pipeline. global_batch: rows per optimizer step over all pipelines.
    dp: expected data-parallel degree; None derives it as world_size // pp. When given it
    must agree with the world size (a preset pinned to 160 GPUs refuses to start on 80).
    """

    world_size: int
    pp: int
    micro_batch: int
    global_batch: int
    dp: int | None = None
    grad_accum: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("world_size", "pp", "micro_batch", "global_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel topology: {name} must be an integer >= 1, got {value!r}")
        if self.world_size % self.pp != 0:
            raise ValueError(
                f"parallel.pp={self.pp} does not divide the world size {self.world_size}: "
                f"choose parallel.pp from {divisors(self.world_size)} or launch a multiple of {self.pp} "
                "processes"
            )
        derived = self.world_size // self.pp
        if self.dp is None:
            self.dp = derived
        elif self.dp != derived:
            raise ValueError(
                f"parallel.dp={self.dp} with parallel.pp={self.pp} needs {self.dp * self.pp} processes, "
                f"but the world size is {self.world_size}: launch {self.dp * self.pp} processes, or set "
                f"parallel.dp=null to derive dp={derived} from the world size"
            )
        rows_per_step = self.micro_batch * self.dp
        if self.global_batch % rows_per_step != 0:
            lo = (self.global_batch // rows_per_step) * rows_per_step
            hint = f"{lo} or {lo + rows_per_step}" if lo else f"{rows_per_step}"
            raise ValueError(
                f"parallel.global_batch={self.global_batch} is not divisible by "
                f"parallel.micro_batch x dp = {self.micro_batch} x {self.dp} = {rows_per_step}: "
                f"set parallel.global_batch to a multiple of {rows_per_step} (e.g. {hint}) "
                "or change parallel.micro_batch"
            )
        self.grad_accum = self.global_batch // rows_per_step

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches each pipeline runs per optimizer step (= gradient accumulation)."""
        return self.grad_accum

    @property
    def bubble_fraction(self) -> float:
        """Idle fraction of a 1F1B schedule: (p-1) / (m+p-1) with m micro-batches."""
        return (self.pp - 1) / (self.grad_accum + self.pp - 1)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {self.world_size})")

    def stage(self, rank: int) -> int:
        """Pipeline stage of a global rank (DeepSpeed default layout)."""
        self._check_rank(rank)
        return rank // self.dp

    def dp_rank(self, rank: int) -> int:
        """Data-parallel rank (the key for data sharding and seeds) of a global rank."""
        self._check_rank(rank)
        return rank % self.dp

    def rank_of(self, stage: int, dp_rank: int) -> int:
        """Inverse of (stage, dp_rank): global rank = stage * dp + dp_rank."""
        if not (0 <= stage < self.pp and 0 <= dp_rank < self.dp):
            raise ValueError(f"(stage {stage}, dp_rank {dp_rank}) outside pp={self.pp} x dp={self.dp}")
        return stage * self.dp + dp_rank

    def stage_ranks(self, stage: int) -> list[int]:
        """The dp ranks that hold one pipeline stage (they all-reduce its gradients)."""
        return [self.rank_of(stage, d) for d in range(self.dp)]

    def pipeline_ranks(self, dp_rank: int) -> list[int]:
        """The pp ranks of one pipeline, first stage first (they pass activations)."""
        return [self.rank_of(s, dp_rank) for s in range(self.pp)]

    def is_last_stage(self, rank: int) -> bool:
        return self.stage(rank) == self.pp - 1

    def logging_rank(self) -> int:
        """The rank that logs: the loss lives on the last stage, dp rank 0 (STYLE.md)."""
        return self.rank_of(self.pp - 1, 0)

    def deepspeed_batch_config(self) -> dict[str, int]:
        """The three batch keys of a DeepSpeed config, consistent by construction."""
        return {
            "train_batch_size": self.global_batch,
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.grad_accum,
        }

    def describe(self) -> str:
        return (
            f"world {self.world_size} = PP {self.pp} x DP {self.dp}; global batch {self.global_batch} = "
            f"micro {self.micro_batch} x accum {self.grad_accum} x DP {self.dp}; "
            f"1F1B bubble {self.bubble_fraction:.1%}"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class DistEnv:
    """What the launcher told this process (torchrun / deepspeed / srun wrapper)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int  # 0 when the launcher did not say
    master_addr: str
    master_port: int
    node_rank: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def dist_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables from the environment (never from argv).

    Defaults describe a single process (rank 0 of 1, 127.0.0.1:29500), so the same code path
    runs unlaunched. A half-set environment (RANK without WORLD_SIZE, rank >= world size) is
    a launcher error and raises ValueError.
    """
    env = os.environ if env is None else env
    has_rank, has_world = "RANK" in env, "WORLD_SIZE" in env
    if has_rank != has_world:
        raise ValueError(
            "RANK and WORLD_SIZE must be set together (launch with torchrun, `deepspeed --no_local_rank` "
            "or launch/slurm.sbatch); found only " + ("RANK" if has_rank else "WORLD_SIZE")
        )
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world})")
    if world > 1 and "LOCAL_RANK" not in env:
        raise ValueError("WORLD_SIZE > 1 but LOCAL_RANK is not set: the launcher must export LOCAL_RANK")
    local_rank = _env_int(env, "LOCAL_RANK", 0)
    # torchrun: LOCAL_WORLD_SIZE / GROUP_RANK; deepspeed launcher: LOCAL_SIZE / CROSS_RANK.
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", _env_int(env, "LOCAL_SIZE", 1 if world == 1 else 0))
    if local_world and not 0 <= local_rank < local_world:
        raise ValueError(f"LOCAL_RANK={local_rank} must lie in [0, LOCAL_WORLD_SIZE={local_world})")
    port = _env_int(env, "MASTER_PORT", 29500)
    if not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT={port} is not a TCP port")
    node_rank = _env_int(env, "NODE_RANK", _env_int(env, "GROUP_RANK", _env_int(env, "CROSS_RANK", 0)))
    return DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=port,
        node_rank=node_rank,
    )


def strip_local_rank_arg(argv: Sequence[str]) -> list[str]:
    """argv without the launcher-appended `--local_rank=N` (or `--local_rank N`).

    The local rank itself is taken from LOCAL_RANK; Hydra would reject the flag as an
    unparseable override. Other arguments keep their order.
    """
    out: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
            if arg.isdigit():
                continue
        if _LOCAL_RANK_FLAG.match(arg):
            skip_value = "=" not in arg
            continue
        out.append(arg)
    return out
