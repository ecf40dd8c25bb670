"""Keep-last-N training checkpoints with exact resume, written through `pipeline.atomic`.

A checkpoint is a directory `step_XXXXXXXX/` holding whatever the engine saves
(model, optimizer, scheduler, RNG states, data position), `meta.json` and the
`manifest.json` of `pipeline.atomic`: it is written beside its final name and swapped
in only when complete (re-saves of the same step included), so a kill during a save
leaves the previous checkpoints loadable; `latest_checkpoint` returns the newest one
whose manifest checks out and logs the newer ones it skipped.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline import atomic

_PREFIX = "step_"
_META = "meta.json"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return checkpoint_root(out_dir) / f"{_PREFIX}{step:08d}"


def save_checkpoint(
    out_dir: str | Path, step: int, write: Callable[[Path], None], *, keep_last: int, meta: dict | None = None
) -> Path:
    """Let `write(tmp_dir)` fill a fresh directory, then publish it atomically as step `step`."""
    final = checkpoint_dir(out_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)

    def write_all(tmp: Path) -> None:
        write(tmp)
        (tmp / _META).write_text(json.dumps({"step": step, **(meta or {})}, indent=2))

    atomic.write_atomic_dir(final, write_all)
    prune_checkpoints(final.parent, keep_last)
    return final


def step_dirs(out_dir: str | Path) -> list[Path]:
    """Every `step_*` directory, complete or not, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (every file of the manifest present with its size), oldest first."""
    return [p for p in step_dirs(out_dir) if atomic.incomplete_reason(p) is None]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones are logged as skipped."""
    return atomic.newest_complete(step_dirs(out_dir))


def prune_checkpoints(root: Path, keep_last: int) -> None:
    atomic.remove_stale(root)  # leftovers of killed saves
    if keep_last <= 0:
        return
    for old in complete_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
