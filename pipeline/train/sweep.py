"""The summary table a Hydra `--multirun` sweep ends with (a Hydra callback, configs/train.yaml).

Each job of a sweep has its own directory `<sweep dir>/<job number>/` holding Hydra's record of
its overrides (`.hydra/overrides.yaml`) and what the job wrote: `metrics.jsonl` and
`eval/{before,after}_report.json` (dsocr-train), or `finetune_summary.json` (dsocr-finetune).
After the last job the table (the overrides that differ between jobs, steps, loss, held-out CER
before and after) is printed and written to `<sweep dir>/sweep_summary.md`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

from pipeline.train.run_dir import first_logged_loss

SUMMARY_FILE = "sweep_summary.md"


@dataclass(frozen=True)
class JobRow:
    job: str
    overrides: dict[str, str]
    steps: int | None
    first_loss: float | None
    last_loss: float | None
    cer_before: float | None
    cer_after: float | None


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _last_step(out: Path) -> tuple[int | None, float | None]:
    """(step, loss) of the last training record in metrics.jsonl."""
    last = (None, None)
    path = out / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "event" not in record and "loss" in record:
                last = (record["step"], record["loss"])
    return last


def read_job(job_dir: Path) -> JobRow:
    """One job's row from the files it left; fields it did not write (a failed job) stay None."""
    raw = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) if (
        job_dir / ".hydra" / "overrides.yaml").is_file() else []  # fmt: skip
    overrides = dict(item.split("=", 1) for item in raw or [] if "=" in item)
    step, loss = _last_step(job_dir)
    finetune = _json(job_dir / "finetune_summary.json")
    if finetune is not None:
        cer = finetune.get("cer", {})
        return JobRow(job_dir.name, overrides, finetune.get("steps"), finetune.get("first_loss"),
                      finetune.get("last_loss"), cer.get("target_before"), cer.get("target_after"))  # fmt: skip
    before, after = (
        _json(job_dir / "eval" / "before_report.json"),
        _json(job_dir / "eval" / "after_report.json"),
    )
    return JobRow(job_dir.name, overrides, step, first_logged_loss(job_dir), loss,
                  before["raw"]["corpus_cer"] if before else None, after["raw"]["corpus_cer"] if after else None)  # fmt: skip


def summary_table(rows: list[JobRow]) -> str:
    """A markdown table: one row per job, a column per override that differs between jobs."""
    keys = sorted({k for r in rows for k in r.overrides})
    varying = [k for k in keys if len({r.overrides.get(k) for r in rows}) > 1] or keys
    fmt = lambda x: "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))  # noqa: E731
    header = ["job", *varying, "steps", "first loss", "last loss", "CER before", "CER after"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.job, *(r.overrides.get(k, "-") for k in varying), fmt(r.steps), fmt(r.first_loss),
                 fmt(r.last_loss), fmt(r.cer_before), fmt(r.cer_after)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarize_sweep(sweep_dir: Path) -> str:
    """Write and return the table of every job directory (numbered) under `sweep_dir`."""
    jobs = sorted(
        (d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)
    )
    table = summary_table([read_job(d) for d in jobs])
    (sweep_dir / SUMMARY_FILE).write_text(table)
    return table


class SweepSummary(Callback):
    """Hydra callback: after a `--multirun`, print the jobs' table and write sweep_summary.md."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            print(
                f"\n=== sweep summary ({sweep_dir / SUMMARY_FILE}) ===\n{summarize_sweep(sweep_dir)}",
                flush=True,
            )
