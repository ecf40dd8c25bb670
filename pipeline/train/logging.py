"""Run metrics: console lines, a JSONL log (the source for plots) and optional wandb.

One rank logs (the last pipeline stage's, where the loss lives); every other rank
gets `NullLogger` (torchtitan `components/metrics.py`). wandb is imported only
when enabled, so `logger.kind=none` works without it installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.config import LoggerConfig


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class NullLogger:
    def log(self, record: dict[str, Any], *, console: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger:
    """Writes every record to `metrics.jsonl`; prints scalars; forwards to wandb when enabled."""

    CONSOLE_KEYS = (
        "step",
        "loss",
        "aux_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "samples_per_s",
        "data_wait",
        "mfu",
        "cer",
    )

    def __init__(self, out_dir: str | Path, cfg: LoggerConfig, run_config: dict, run_name: str) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._wandb = None
        if cfg.kind == "wandb":  # logger.kind and logger.mode are checked by the schema (LoggerConfig)
            self._wandb = self._start_wandb(cfg, run_config, run_name, out_dir)

    @staticmethod
    def _start_wandb(cfg: LoggerConfig, run_config: dict, run_name: str, out_dir: str | Path):
        import wandb

        mode = cfg.mode
        if mode == "auto":
            has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
            mode = "online" if has_key else "offline"
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=list(cfg.tags),
            name=run_name,
            mode=mode,
            dir=str(out_dir),
            config={**run_config, "git_commit": git_commit()},
        )

    def log(self, record: dict[str, Any], *, console: bool = True) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if console:
            parts = [f"{k} {_fmt(record[k])}" for k in self.CONSOLE_KEYS if k in record]
            extra = record.get("event")
            # through tqdm: a progress bar on the console is redrawn below the line, not torn by it
            tqdm.write(("[" + extra + "] " if extra else "") + " | ".join(parts), file=sys.stdout)
            sys.stdout.flush()
        if self._wandb is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
            self._wandb.log(scalars, step=record.get("step"))

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
