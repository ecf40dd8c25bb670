"""Row (e) of `dsocr-bench`: pipeline scaling on 4 GPUs, bench/pipeline_gpu.sh run as a subprocess.

bench/pipeline_gpu.sh (owned by the pipeline engineer) trains the full preset with DeepSpeed's
pipeline engine, one torchrun per configuration
(PP:PARTITION:CHECKPOINTING:GLOBAL_BATCH[:LOSS_CHUNK[:MICRO[:COMPILE]]]; default PP=4 x DP=1 and
PP=2 x DP=2 on the paper's split), and rank 0 appends one JSON summary
per configuration to $SUMMARY. This module runs it on the first 4 visible GPUs (the single-GPU
rows ran on the first one before), in its own process group under a time limit (and
CONFIG_TIMEOUT per configuration), and turns the summaries into one row per configuration: a
configuration without a summary (crash, timeout, missing script) becomes a FAILED row with the
reason read from the output, never an exception out of the suite.

The script's first phase (`pipeline_gpu.py make-data`: synthetic 1240x1754 page shards, CPU
only, about a minute) is started in the background by `DataPrep` when the run begins, so it
overlaps the single-GPU rows; the script then finds the data and skips that phase.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.report import Row, Target, skipped_row

HERE = Path(__file__).resolve().parent
SCRIPT, DRIVER = HERE / "pipeline_gpu.sh", HERE / "pipeline_gpu.py"
SECTION = "pipeline scaling (4 GPUs, full, 1x8192 rows)"
UNIT, GPUS_NEEDED = "tokens/s/GPU", 4
# bench/pipeline_gpu.sh's CONFIG: PP:PARTITION:CHECKPOINTING:GLOBAL_BATCH[:LOSS_CHUNK[:MICRO[:COMPILE]]]
# (an empty LOSS_CHUNK or MICRO takes the default)
DEFAULT_CONFIGS = ("4:paper:on:16", "2:paper:on:16")  # PP=4 x DP=1 and PP=2 x DP=2, the paper's split
CONFIG = re.compile(
    r"^(1|2|4):(paper|balanced|parameters):(on|off|[0-3](?:,[0-3])*):([1-9]\d*)"
    r"(?::(\d*)(?::([1-9]\d*)?(?::(on|off))?)?)?$"
)
DEFAULT_LOSS_CHUNK, DEFAULT_MICRO = 2048, 1
TARGET = Target("value", 25000, "per H200")
# what a FAILED row quotes, most telling first: an exception, a kill, then anything error-like
ERROR_LINES = (
    re.compile(r"\b(?!ChildFailedError)\w*(Error|Exception): "),
    re.compile(r"out of memory|SIGKILL|Killed|killed after|timed out"),
    re.compile(r"(Error|error:|Traceback|FAILED|failed)"),
)
LOG_TAIL_LINES = 200
SUMMARY_FILE = "dsocr_bench_summary.jsonl"


@dataclass
class PipelineSettings:
    """steps per configuration, the subprocess time limit (all configurations), where the synthetic
    shards live, and the script's configurations (CONFIG strings, run in order)."""

    steps: int = 12
    timeout_s: float = 300.0
    data_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "dsocr-pipeline-bench")
    configs: tuple[str, ...] = DEFAULT_CONFIGS

    def __post_init__(self) -> None:
        if self.steps < 4:
            raise ValueError(f"pipeline steps must be >= 4 (3 warm-up steps are left out), got {self.steps}")
        if not self.timeout_s > 0:
            raise ValueError(f"pipeline timeout must be positive, got {self.timeout_s}")
        self.configs = tuple(self.configs) or DEFAULT_CONFIGS
        bad = [c for c in self.configs if not CONFIG.match(c)]
        if bad:
            raise ValueError(
                f"pipeline configs {bad} are not PP:PARTITION:CHECKPOINTING:GLOBAL_BATCH[:LOSS_CHUNK[:MICRO"
                "[:COMPILE]]] (PP 1|2|4, PARTITION paper|balanced|parameters, CHECKPOINTING on|off|stages "
                "like 1,2, MICRO >= 1, COMPILE on|off)"
            )
        self.data_dir = Path(self.data_dir)


def config_name(config: str, gpus: int = GPUS_NEEDED) -> str:
    """The name bench/pipeline_gpu.py gives a configuration's summary, e.g. 4:paper:on:16 ->
    pp4_dp1_paper_ckpt_gb16_chunk2048, 4:balanced:off:32::2:on ->
    pp4_dp1_balanced_nockpt_gb32_chunk2048_mb2_compile (tests/bench check it against
    pipeline_gpu.bench_run and bench/pipeline_gpu.sh)."""
    match = CONFIG.match(config)
    if match is None:
        raise ValueError(f"not a pipeline config: {config!r}")
    pp, partition, ckpt, gb, chunk, micro, compile_ = match.groups()
    ckpt = {"on": "ckpt", "off": "nockpt"}.get(ckpt, "ckpt" + ckpt.replace(",", ""))
    name = f"pp{pp}_dp{gpus // int(pp)}_{partition}_{ckpt}_gb{gb}_chunk{chunk or DEFAULT_LOSS_CHUNK}"
    if int(micro or DEFAULT_MICRO) != 1:
        name += f"_mb{micro}"
    return name + ("_compile" if compile_ == "on" else "")


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pipeline_env(base: dict | None = None, config_timeout_s: int = 0) -> dict:
    """The environment of the script: the first 4 GPUs of the ones this process may use, a time
    limit per configuration, and no $OUT (the script would copy its logs there: this module folds
    them into one pipeline_gpu.log, the GPU machine returns only 8 files)."""
    env = dict(os.environ if base is None else base)
    env.pop("OUT", None)
    env["CONFIG_TIMEOUT"] = str(int(config_timeout_s))
    visible = env.get("CUDA_VISIBLE_DEVICES")
    ids = [x for x in visible.split(",") if x.strip()] if visible else [str(i) for i in range(GPUS_NEEDED)]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:GPUS_NEEDED])
    return env


def pipeline_summaries(text: str) -> list[dict]:
    """The JSON summaries that bench/pipeline_gpu.py prints on rank 0 (objects with "layout" and
    "tokens_per_s_per_gpu"), in order of appearance."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        if isinstance(obj, dict) and "layout" in obj and "tokens_per_s_per_gpu" in obj:
            found.append(obj)
        i = end
    return found


@dataclass
class ScriptResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float


def run_script(cmd: list[str], env: dict, timeout_s: float) -> ScriptResult:
    """Run cmd in its own process group; on timeout end that group (torchrun's workers included)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        stderr += f"\n[dsocr-bench] killed after {timeout_s:g} s"
    return ScriptResult(proc.returncode, stdout, stderr, timed_out, time.perf_counter() - start)


def last_error_line(text: str) -> str:
    """The last line of the most telling kind in ERROR_LINES (for the FAILED row), else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for pattern in ERROR_LINES:
        errors = [line for line in lines if pattern.search(line)]
        if errors:
            return errors[-1][:200]
    return (lines or ["no output"])[-1][:200]


class DataPrep:
    """`pipeline_gpu.py make-data DIR` in the background (CPU only), started when the run begins."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.start, self.log = time.perf_counter(), data_dir / "make_data.log"
        self._log_file = open(self.log, "w")  # noqa: SIM115 (closed in wait)
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), "make-data", str(data_dir)],
                                     stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.result: str | None = None

    def wait(self, timeout_s: float = 600.0) -> str:
        """Block until the data is written; returns a one-line status (the script retries on failure)."""
        if self.result is None:
            try:
                code = self.proc.wait(timeout=timeout_s)
                self.result = f"make-data exited {code} after {time.perf_counter() - self.start:.0f} s"
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                self.result = f"make-data killed after {timeout_s:g} s"
            self._log_file.close()
        return self.result


def _log_tail(path: Path) -> str:
    if not path.exists():
        return ""
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _notes(summary: dict) -> str:
    peaks = summary.get("peak_gib_per_stage", {})
    return (f"{summary.get('name', summary.get('layout', '?'))}: MFU {100 * summary.get('mfu', 0.0):.1f}%; "
            f"step {summary.get('step_time_s', 0.0):.2f} s; bubble {summary.get('bubble_1f1b', 0.0):.2f}; "
            f"loss {summary.get('loss_first', 0.0):.3f} -> {summary.get('loss_last', 0.0):.3f}; "
            f"peak/stage {max(peaks.values(), default=0.0):.1f} GiB; {summary.get('steps', '?')} steps")  # fmt: skip


def pipeline_rows(
    settings: PipelineSettings, out_dir: Path, best_single: float | None, prep: DataPrep | None, quick: bool
) -> tuple[list[Row], dict]:
    """The rows of section (e), one per configuration, and the details for the JSON."""
    gpus = visible_gpus()
    name = ", ".join(settings.configs)
    if quick or gpus < GPUS_NEEDED:
        why = "quick mode" if quick else f"{gpus} GPU(s) visible, needs {GPUS_NEEDED}"
        return [skipped_row(SECTION, name, UNIT, why, TARGET)], {}
    if not SCRIPT.exists():
        return [skipped_row(SECTION, name, UNIT, f"{SCRIPT} not present", TARGET)], {}
    details: dict = {"data": prep.wait() if prep is not None else "made by the script"}
    prep_log = f"--- {details['data']} ---\n{_log_tail(prep.log)}\n" if prep is not None else ""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # the script tees each configuration's log here, and the trainer appends to <name>/metrics.jsonl
    for stale in [*settings.data_dir.glob("pp*.log"), *settings.data_dir.glob("pp*_dp*/metrics.jsonl")]:
        stale.unlink()
    summary_file = settings.data_dir / SUMMARY_FILE  # the script empties it first, rank 0 appends
    # one configuration may take 20% more than an even share (the first pays DeepSpeed's op builds)
    per_config = min(settings.timeout_s, max(60.0, 1.2 * settings.timeout_s / len(settings.configs)))
    env = pipeline_env(config_timeout_s=int(per_config))
    env["SUMMARY"] = str(summary_file)
    cmd = ["bash", str(SCRIPT), str(settings.data_dir), str(settings.steps), *settings.configs]
    res = run_script(cmd, env, settings.timeout_s)
    logs = {p.name: _log_tail(p) for p in sorted(settings.data_dir.glob("pp*.log"))}
    text = f"{prep_log}$ {' '.join(cmd)}\nexit {res.returncode}, {res.wall_s:.0f} s\n{res.stdout}\n--- stderr ---\n{res.stderr}"
    for log_name, tail in logs.items():
        text += f"\n--- last {LOG_TAIL_LINES} lines of {log_name} ---\n{tail}"
    (out_dir / "pipeline_gpu.log").write_text(text)
    found = pipeline_summaries(summary_file.read_text()) if summary_file.exists() else []
    # fallbacks: the printed summaries (the grep'd stdout loses a killed configuration's), the logs
    found += pipeline_summaries(res.stdout) + [s for t in logs.values() for s in pipeline_summaries(t)]
    by_name: dict[str, dict] = {}
    for summary in found:
        by_name.setdefault(summary.get("name", summary["layout"]), summary)
    details.update(returncode=res.returncode, timed_out=res.timed_out, wall_s=round(res.wall_s, 1),
                   configs=list(settings.configs), summaries=list(by_name.values()))  # fmt: skip
    why = "timed out" if res.timed_out else f"exit {res.returncode}"
    error = last_error_line(res.stdout + "\n" + res.stderr + "\n" + "\n".join(logs.values()))
    rows = []
    for config in settings.configs:
        summary = by_name.get(config_name(config))
        pp = int(config.split(":")[0])
        variant = f"PP={pp} x DP={GPUS_NEEDED // pp} ({config})"
        if summary is None:
            reason = f"no summary ({why}; {error}; pipeline_gpu.log)"
            rows.append(Row(SECTION, variant, UNIT, target=TARGET, status="failed", reason=reason))
            continue
        rows.append(Row(SECTION, variant, UNIT, float(summary["tokens_per_s_per_gpu"]), best_single,
                        "1-GPU full step, this run" if best_single else "", TARGET, _notes(summary)))  # fmt: skip
    return rows, details
