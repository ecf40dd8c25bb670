"""The run directory's resolved config, and what a resume may change.

Every run writes its resolved config as `config.yaml` beside its checkpoints. A run started in a
directory that already holds a checkpoint resumes from it, so a changed config would silently
continue the old weights, optimiser and metrics under new settings. `record_config` refuses that
and lists the differences, except for the fields that only say how long or how often the run
goes on (RUN_LENGTH_FIELDS). `train.allow_config_change=true` lets it continue: the earlier config
is kept as `config.until_step_<N>.yaml` (N: the checkpoint the run continues from) and the new
one becomes `config.yaml`.

`first_logged_loss` reads the run's first training loss from `metrics.jsonl`, which a resumed
run appends to, so a summary reports the whole run rather than the part since the resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pipeline.train.checkpoint import latest_checkpoint

CONFIG_FILE = "config.yaml"
# Keys (dotted, in the resolved config) a resumed run may change: length, cadence, threads.
RUN_LENGTH_FIELDS = frozenset(
    {
        "train.max_steps",
        "train.max_minutes",
        "train.save_every",
        "train.eval_every",
        "train.log_every",
        "train.keep_last",
        "train.resume",
        "train.allow_config_change",
        "train.threads",
        "max_steps",
        "log_every",
        "eval_every",
        "save_every",
        "keep_last",
    }
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value} of a nested dict/list config (lists indexed like Hydra: a.0.b)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    if not flat and prefix:  # an empty dict/list is a value of its own
        flat[prefix] = tree
    return flat


MISSING = "<unset>"
EMPTY = (None, "", False, [], {})  # an option left at nothing: absent from an older config means the same


def config_differences(old_yaml: str, new_yaml: str) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every leaf that differs, run-length fields left out; `<unset>` marks a
    key one side lacks (one the other side leaves empty, e.g. an option newer than the run, is
    no difference)."""
    old, new = flatten(yaml.safe_load(old_yaml) or {}), flatten(yaml.safe_load(new_yaml) or {})
    changes = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, MISSING), new.get(key, MISSING)
        if key in RUN_LENGTH_FIELDS or before == after:
            continue
        if MISSING in (before, after) and (after if before == MISSING else before) in EMPTY:
            continue
        changes.append((key, before, after))
    return changes


def record_config(out: Path, resolved_yaml: str, *, resume: bool, allow_change: bool) -> Path:
    """Write `config.yaml` into `out`; refuse (ValueError) to continue a checkpoint under another config."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None and path.is_file():
        changes = config_differences(path.read_text(), resolved_yaml)
        if changes:
            listing = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, old, new in changes)
            if not allow_change:
                raise ValueError(
                    f"{out} holds a checkpoint ({checkpoint.name}) trained under another config; resuming would "
                    f"continue it under these changes:\n{listing}\nStart a new run directory (another name=...), "
                    "or continue anyway with train.allow_config_change=true (both configs are kept)."
                )
            kept = out / f"config.until_{checkpoint.name}.yaml"
            path.replace(kept)
            print(f"[run] continuing {checkpoint.name} under a changed config (earlier one kept as {kept.name}):\n"
                  f"{listing}", flush=True)  # fmt: skip
    path.write_text(resolved_yaml)
    return path


def first_logged_loss(out: Path) -> float | None:
    """The loss of the earliest training step in `out/metrics.jsonl` (None without one); of a run
    restarted from scratch in the same directory (the log appended to), the latest such step."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    first: tuple[int, float] | None = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
        if "event" in record or "loss" not in record or "step" not in record:
            continue
        if first is None or record["step"] <= first[0]:
            first = (record["step"], record["loss"])
    return first[1] if first else None
