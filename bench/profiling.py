"""The profile of issue 13: one full training step under torch.profiler, saved as an artifact.

`profile_step` runs one step inside a `dsocr_full_step` annotation with CPU (+ CUDA) activity,
writes the Chrome trace gzip-compressed (`<name>.json.gz`, opened directly by Perfetto and
chrome://tracing via ui.perfetto.dev) and returns the summary that `summarize_trace` reads back
from that trace: the step's wall time, the top GPU kernels by total time (on CPU: the top
operators), the GPU busy time and the host synchronisations the step issued
(cudaDeviceSynchronize / cudaStreamSynchronize / cudaEventSynchronize / synchronous cudaMemcpy
runtime calls inside the annotation). `write_summary` renders those summaries and torch's
operator table into one text file. A trace larger than `MAX_ARTIFACT_BYTES` compressed (the GPU
machine returns files up to 16 MiB) is recorded again with GPU activity only.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from bench.measure import sync

STEP_ANNOTATION = "dsocr_full_step"
MAX_ARTIFACT_BYTES = 15 * 2**20
TOP_KERNELS = 15
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")
KERNEL_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def summarize_trace(trace: dict, top: int = TOP_KERNELS) -> dict:
    """Summary of a Chrome trace dict as torch.profiler exports it (times in microseconds).

    Only events inside the (first) `dsocr_full_step` annotation count for the syncs; kernels count
    wherever they ran (they run asynchronously, possibly after the annotation closed).
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    step = next(
        (e for e in events if e.get("cat") == "user_annotation" and e.get("name") == STEP_ANNOTATION), None
    )
    begin, end = (step["ts"], step["ts"] + step["dur"]) if step else (float("-inf"), float("inf"))
    kernels = [e for e in events if e.get("cat") in KERNEL_CATEGORIES]
    on_gpu = bool(kernels)
    timed = kernels if on_gpu else [e for e in events if e.get("cat") == "cpu_op"]
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in timed:
        totals[e["name"]][0] += 1
        totals[e["name"]][1] += float(e.get("dur", 0.0))
    busy = sum(float(e.get("dur", 0.0)) for e in kernels)
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    syncs: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and begin <= e["ts"] <= end:
            name = e.get("name", "")
            if name in SYNC_CALLS or (
                name.startswith("cudaMemcpy") and "Async" not in name and "Peer" not in name
            ):
                syncs[name] += 1
    return {
        "step_ms": step["dur"] / 1e3 if step else None,
        "timed": "GPU kernels" if on_gpu else "CPU operators (total time incl. children)",
        "gpu_busy_ms": busy / 1e3 if on_gpu else None,
        "kernel_launches": len(kernels),
        "host_syncs": sum(syncs.values()),
        "host_syncs_by_call": dict(syncs),
        "top": [
            {
                "name": name,
                "calls": int(calls),
                "total_ms": total / 1e3,
                "share": total / busy if busy else None,
            }
            for name, (calls, total) in ranked
        ],
    }


def _record(step: Callable[[], object], device: torch.device, cpu: bool):
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = ([ProfilerActivity.CPU] if cpu else []) + (
        [ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    sync(device)
    with profile(activities=activities) as prof:
        with record_function(STEP_ANNOTATION):
            step()
        sync(device)
    return prof


def write_trace_gzip(prof, path: Path) -> int:
    """Chrome trace of prof as path (.json.gz); returns the compressed size in bytes."""
    raw = path.with_name(path.name.removesuffix(".gz") + ".tmp")
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb", compresslevel=6) as dst:
        dst.write(src.read())
    raw.unlink()
    return path.stat().st_size


def profile_step(
    step: Callable[[], object], path: Path, device: torch.device, *, max_bytes: int = MAX_ARTIFACT_BYTES
) -> dict:
    """Profile one call of step(); writes path (a .json.gz Chrome trace). Returns the summary plus
    the trace path, its size, whether CPU activity is in it, and torch's operator table."""
    if not path.name.endswith(".json.gz"):
        raise ValueError(f"profile trace path must end with .json.gz, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    prof = _record(step, device, cpu=True)
    size, with_cpu = write_trace_gzip(prof, path), True
    # the summary reads the saved trace (CPU runtime calls included) before any re-recording
    with gzip.open(path, "rt") as f:
        summary = summarize_trace(json.load(f))
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)
    if size > max_bytes and device.type == "cuda":
        prof = _record(step, device, cpu=False)  # kernels only: a fraction of the events
        size, with_cpu = write_trace_gzip(prof, path), False
    return {**summary, "trace": path.name, "trace_bytes": size, "trace_has_cpu": with_cpu, "table": table}


def render_summary(name: str, p: dict, host_syncs_debug_mode: int | None = None) -> str:
    """Text block of one profiled variant: step time, syncs, top kernels (or ops), operator table."""
    lines = [f"=== {name}: {p['trace']} ({p['trace_bytes'] / 2**20:.1f} MiB gzip"
             f"{'' if p['trace_has_cpu'] else ', GPU activity only: the CPU events made it too large'})"]  # fmt: skip
    step = f"{p['step_ms']:.1f} ms" if p["step_ms"] is not None else "?"
    busy = (
        f", GPU busy {p['gpu_busy_ms']:.1f} ms in {p['kernel_launches']} kernels" if p["gpu_busy_ms"] else ""
    )
    lines.append(f"step (profiled, annotation {STEP_ANNOTATION}): {step}{busy}")
    by_call = ", ".join(f"{k} x{v}" for k, v in sorted(p["host_syncs_by_call"].items())) or "none"
    lines.append(f"host syncs in the trace: {p['host_syncs']} ({by_call})")
    if host_syncs_debug_mode is not None:
        lines.append(
            f"host syncs by torch.cuda sync debug mode (one unprofiled step): {host_syncs_debug_mode}"
        )
    lines.append(f"top {len(p['top'])} {p['timed']} by total time:")
    for k in p["top"]:
        share = f" {100 * k['share']:5.1f}%" if k["share"] is not None else ""
        lines.append(f"  {k['total_ms']:9.2f} ms{share}  x{k['calls']:<5d} {k['name'][:110]}")
    lines += ["", "torch.profiler operator table:", p["table"], ""]
    return "\n".join(lines)


def write_summary(path: Path, blocks: list[str]) -> Path:
    path.write_text("\n".join(blocks))
    return path
