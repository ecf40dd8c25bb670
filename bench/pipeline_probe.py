"""Where a pipeline step's time goes, per rank: DeepSpeed's pipeline instructions timed on the
host, and optionally one step under torch.profiler (bench/pipeline_gpu.py --profile-step).

`StepProbe` is the trainer's `on_step` hook (pipeline.parallel.trainer.run_pipeline_training).
At its first call it wraps the engine *instance's* instruction table (`_INSTRUCTION_MAP`:
LoadMicroBatch, ForwardPass, BackwardPass, Send/RecvActivation, Send/RecvGrad, ReduceGrads,
OptimizerStep, ...) so every instruction is timed with `time.perf_counter` and annotated for the
profiler. No device sync is added: an instruction that blocks the host (a receive that reads
shapes back, a copy from pageable memory, DeepSpeed's own synchronisations) shows the wait in its
time, so a stage's forward time is launch time plus whatever the host waited for. `other` is the
step's wall time outside the instructions (loss aggregation, step guard, logging). Steps up to
`warmup` are left out of the totals.

With `profile_step=K`, step K runs under torch.profiler (CPU + CUDA) inside the
`dsocr_full_step` annotation; the rank writes `trace_rank<R>.json.gz` into `out_dir` and its
summary (bench.profiling.summarize_trace) plus the time in NCCL kernels, which for the
pipeline's blocking send/recv includes waiting for the peer stage.
"""

from __future__ import annotations

import gzip
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.profiling import STEP_ANNOTATION, summarize_trace, write_trace_gzip

NCCL_MARK = "nccl"


class StepProbe:
    """on_step hook: per-instruction host time of every step after `warmup`, one profiled step."""

    def __init__(self, *, warmup: int, profile_step: int = 0, out_dir: Path | None = None) -> None:
        if profile_step and profile_step <= 1:
            raise ValueError(
                f"--profile-step must be >= 2 (the probe starts after step 1), got {profile_step}"
            )
        self.warmup, self.profile_step, self.out_dir = warmup, profile_step, out_dir
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.steps, self.wall = 0, 0.0
        self._last: float | None = None
        self._counting = False
        self.rank = self.stage = -1
        self._profiler = None
        self._annotation = None
        self.profile: dict | None = None

    # ------------------------------------------------------------------ instruction timing
    def _instrument(self, engine) -> None:
        from torch.profiler import record_function

        def timed(name, fn):
            def run(engine, **kwargs):
                t0 = time.perf_counter()
                with record_function(f"pipe.{name}"):
                    fn(engine, **kwargs)
                if self._counting:
                    self.seconds[name] += time.perf_counter() - t0
                    self.calls[name] += 1

            return run

        # an instance attribute shadows the class table that _exec_schedule reads
        table = type(engine)._INSTRUCTION_MAP
        engine._INSTRUCTION_MAP = {kind: timed(kind.__name__, fn) for kind, fn in table.items()}

    def __call__(self, trainer) -> None:
        now = time.perf_counter()
        if self._last is None:
            self.rank, self.stage = trainer.rank, trainer.stage
            self._instrument(trainer.engine)
        elif self._counting:
            self.steps += 1
            self.wall += now - self._last
        if self._profiler is not None:
            self._stop_profile(trainer)
        upcoming = trainer.step + 1
        # the profiled step is left out of the timings (the profiler slows the host)
        self._counting = upcoming > self.warmup and upcoming != self.profile_step
        if upcoming == self.profile_step:
            self._start_profile()
        self._last = time.perf_counter()

    # ------------------------------------------------------------------ profiled step
    def _start_profile(self) -> None:
        from torch.profiler import ProfilerActivity, profile, record_function

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._profiler = profile(activities=activities)
        self._profiler.__enter__()
        self._annotation = record_function(STEP_ANNOTATION)
        self._annotation.__enter__()

    def _stop_profile(self, trainer) -> None:
        self._annotation.__exit__(None, None, None)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._profiler.__exit__(None, None, None)
        out = self.out_dir or Path(".")
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"trace_rank{trainer.rank}.json.gz"
        write_trace_gzip(self._profiler, path)
        with gzip.open(path, "rt") as f:
            trace = json.load(f)
        summary = summarize_trace(trace, top=8)
        nccl = sum(
            float(e.get("dur", 0.0))
            for e in trace.get("traceEvents", [])
            if e.get("ph") == "X" and e.get("cat") == "kernel" and NCCL_MARK in e.get("name", "").lower()
        )
        busy = summary["gpu_busy_ms"] or 0.0
        self.profile = {
            "step_ms": summary["step_ms"],
            "gpu_busy_ms": busy,
            "nccl_kernel_ms": nccl / 1e3,
            "compute_kernel_ms": busy - nccl / 1e3,
            "kernel_launches": summary["kernel_launches"],
            "host_syncs": summary["host_syncs_by_call"],
            "top": [(k["name"][:90], round(k["total_ms"], 2), k["calls"]) for k in summary["top"]],
            "trace": path.name,
        }
        self._profiler = self._annotation = None

    # ------------------------------------------------------------------ report
    def report(self) -> dict:
        """Per-step means (ms) of every instruction, the step wall time and the rest."""
        n = max(self.steps, 1)
        ms = {name: round(1e3 * s / n, 1) for name, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])}
        wall = 1e3 * self.wall / n
        return {
            "rank": self.rank,
            "stage": self.stage,
            "steps": self.steps,
            "step_ms": round(wall, 1),
            "instructions_ms": ms,
            "calls_per_step": {name: c / n for name, c in self.calls.items()},
            "other_ms": round(wall - sum(ms.values()), 1),
            "profile": self.profile,
        }


def render(reports: list[dict]) -> str:
    """Text table: one column per rank, one row per instruction (ms per step), then the profiles."""
    names = sorted({k for r in reports for k in r["instructions_ms"]},
                   key=lambda k: -max(r["instructions_ms"].get(k, 0.0) for r in reports))  # fmt: skip
    head = "| ms per step | " + " | ".join(f"rank {r['rank']} (stage {r['stage']})" for r in reports) + " |"
    lines = [head, "|---" * (len(reports) + 1) + "|"]
    for name in [*names, "other", "step"]:
        cells = []
        for r in reports:
            value = {"other": r["other_ms"], "step": r["step_ms"]}.get(name, r["instructions_ms"].get(name))
            calls = r["calls_per_step"].get(name)
            cells.append("-" if value is None else f"{value:,.1f}" + (f" (x{calls:g})" if calls else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for r in reports:
        p = r["profile"]
        if p:
            lines.append(
                f"rank {r['rank']} profiled step: {p['step_ms']:.0f} ms, GPU kernels {p['gpu_busy_ms']:.0f} ms "
                f"(NCCL {p['nccl_kernel_ms']:.0f}, compute {p['compute_kernel_ms']:.0f}) in "
                f"{p['kernel_launches']} launches, host syncs {p['host_syncs']}"
            )
            lines += [f"    {total:9.2f} ms x{calls:<5d} {name}" for name, total, calls in p["top"]]
    return "\n".join(lines)
