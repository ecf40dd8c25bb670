"""CPU thread count for torch from the cores this process may actually use.

torch's default is one intra-op thread per core of the machine. On a machine shared with other
work (or a container limited by a CPU quota) that oversubscribes the cores: OpenMP's worker
threads spin-wait at every parallel region's barrier for a peer the OS has descheduled, so each
op waits a scheduler time slice and a CPU step gets several times slower than on one thread.

The default here is the number of cores left free: the cores the process may run on
(`os.sched_getaffinity`, then capped by a cgroup CPU quota) minus the load other processes put on
them (the 1-minute load average), at least 1. An explicit `train.threads` wins, and so does
`OMP_NUM_THREADS` set in the environment (launch/env.sh sets it per process on a cluster node).
The entry points also make OpenMP's idle threads sleep rather than spin (`passive_openmp_waits`):
measured on a shared 2-core machine, 2 spinning threads ran a CPU step at ~1/8 the tokens/s of
1 thread, 2 passive ones at about the speed of 1.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def cgroup_cpu_quota(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> int | None:
    """Whole cores the cgroup's CPU quota allows (rounded up), None when unlimited or unknown."""
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
        if v1[0].is_file() and v1[1].is_file():
            quota, period = int(v1[0].read_text()), int(v1[1].read_text())
            return None if quota <= 0 else max(1, math.ceil(quota / period))
    except (OSError, ValueError):  # unreadable or malformed: no quota is known
        return None
    return None


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by the cgroup quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return min(cores, quota) if quota else cores


def free_cores(available: int, load: float) -> int:
    """Cores left after `load` runnable processes of other work: at least 1, at most `available`."""
    return min(available, max(1, available - round(load)))


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str


def choose_threads(requested: int, environ: dict[str, str] | None = None) -> ThreadChoice:
    """`requested` (> 0: train.threads), else OMP_NUM_THREADS from the environment, else the free cores."""
    environ = os.environ if environ is None else environ
    if requested > 0:
        return ThreadChoice(requested, "from train.threads")
    omp = environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return ThreadChoice(int(omp), "from OMP_NUM_THREADS")
    available = available_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = free_cores(available, load)
    return ThreadChoice(threads, f"{available} cores available, load {load:.1f}; train.threads=N sets them")


def passive_openmp_waits(environ: dict[str, str] | None = None) -> None:
    """OMP_WAIT_POLICY=PASSIVE unless set: idle OpenMP threads sleep instead of spinning, so a
    load that appears after the thread count was chosen slows the run instead of stalling it.
    Read once when the OpenMP runtime loads: call before torch is imported."""
    environ = os.environ if environ is None else environ
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_torch_threads(requested: int) -> ThreadChoice:
    """Apply `choose_threads` to torch (intra-op threads) and report the choice."""
    import torch

    choice = choose_threads(requested)
    torch.set_num_threads(choice.threads)
    print(f"[threads] {choice.threads} torch CPU threads ({choice.reason})", flush=True)
    return choice
