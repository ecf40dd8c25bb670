"""Training-run plots from the run's metrics log (JSONL), without wandb.

Input: `metrics.jsonl` written by pipeline.train.logging.RunLogger, one JSON object per line.
Step records carry `step`, `loss`, `aux_loss`, `lr` and optionally `expert_counts` (per MoE
layer, the per-expert routed-token counts of that step); eval records (`"event": "eval"`) carry
`step` and `cer` (and `cer_norm`). Output PNGs (matplotlib, Agg):
- losses.png: loss (and lm_loss) and the MoE aux loss over steps, plus the learning rate;
- cer.png: CER over steps;
- expert_load_layer<i>.png: per MoE layer, a steps x experts heatmap of each expert's share of
  the routed tokens times the number of experts (1.0 = perfectly balanced).
Unparseable lines are counted and logged with their line number, then skipped.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def read_metrics_log(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """(records, number of skipped lines). Blank lines are ignored; bad lines are logged."""
    records, bad = [], 0
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                obj = None
                log.warning("metrics log %s:%d: skipped unparseable line (%s)", path, lineno, exc)
            if isinstance(obj, dict):
                records.append(obj)
            else:
                bad += 1
    return records, bad


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of every record holding a finite number under `key` and a numeric step."""
    steps, values = [], []
    for rec in records:
        step, value = _number(rec.get("step")), _number(rec.get(key))
        if step is not None and value is not None:
            steps.append(step)
            values.append(value)
    return steps, values


def expert_load(records: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(steps (S,), load (S, L, E)) from the records with `expert_counts`.

    load[s, l, e] = counts[l][e] / sum_e counts[l][e] * E: 1.0 means the expert got exactly its
    even share. Records whose counts are not an L x E table matching the first one are skipped
    with a warning; a layer with no routed tokens at a step gets NaN.
    """
    steps, tables = [], []
    shape = None
    for rec in records:
        counts, step = rec.get("expert_counts"), _number(rec.get("step"))
        if counts is None or step is None:
            continue
        try:
            table = np.asarray(counts, dtype=np.float64)
        except (TypeError, ValueError):
            table = np.empty(0)
        if table.ndim != 2 or (shape is not None and table.shape != shape):
            log.warning(
                "step %s: expert_counts is not a %s table, skipped",
                rec.get("step"),
                shape or "layers x experts",
            )
            continue
        shape = table.shape
        steps.append(step)
        tables.append(table)
    if not tables:
        return np.empty(0), np.empty((0, 0, 0))
    counts = np.stack(tables)  # (S, L, E)
    totals = counts.sum(axis=2, keepdims=True)  # (S, L, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        load = np.where(totals > 0, counts / totals * counts.shape[2], np.nan)
    return np.asarray(steps), load


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """loss / lm_loss, aux_loss and lr over steps; None when the log has no loss."""
    if not series(records, "loss")[0]:
        return None
    plt = _pyplot()
    fig, (ax_loss, ax_aux, ax_lr) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for key in ("loss", "lm_loss"):
        steps, values = series(records, key)
        if steps:
            ax_loss.plot(steps, values, label=key)
    ax_loss.set_ylabel("loss (nats)")
    ax_loss.legend()
    steps, values = series(records, "aux_loss")
    ax_aux.plot(steps, values, color="tab:red")
    ax_aux.set_ylabel("MoE aux loss")
    steps, values = series(records, "lr")
    ax_lr.plot(steps, values, color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    for ax in (ax_loss, ax_aux, ax_lr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_cer(records: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """CER (and normalised CER) over steps, in percent; None when the log has no CER."""
    if not series(records, "cer")[0]:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for key in ("cer", "cer_norm"):
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, [100 * v for v in values], "o-", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("CER (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_expert_load(records: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One heatmap PNG per MoE layer (steps x experts, load relative to an even share)."""
    steps, load = expert_load(records)
    if not len(steps):
        return []
    plt = _pyplot()
    out = Path(out_dir)
    paths = []
    vmax = max(2.0, float(np.nanmax(load))) if np.isfinite(load).any() else 2.0
    for layer in range(load.shape[1]):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        image = ax.imshow(
            load[:, layer, :].T,  # (E, S): experts on y, time on x
            aspect="auto",
            origin="lower",
            interpolation="nearest",
            cmap="viridis",
            vmin=0.0,
            vmax=vmax,
            extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, load.shape[2] - 0.5),
        )
        fig.colorbar(image, ax=ax, label="load / even share")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.set_title(f"MoE layer {layer}: expert load")
        fig.tight_layout()
        path = out / f"expert_load_layer{layer}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_run(log_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """All plots of one run into out_dir. Returns {"losses", "cer", "expert_load", "skipped_lines"}.

    ValueError when the log holds no plottable record at all.
    """
    records, bad = read_metrics_log(log_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "losses": plot_losses(records, out / "losses.png"),
        "cer": plot_cer(records, out / "cer.png"),
        "expert_load": plot_expert_load(records, out),
        "skipped_lines": bad,
    }
    if result["losses"] is None and result["cer"] is None and not result["expert_load"]:
        raise ValueError(
            f"{log_path}: no record with loss, cer or expert_counts ({len(records)} records, {bad} bad lines)"
        )
    return result
