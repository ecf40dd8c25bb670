"""Rows of the benchmark table, their targets, and the two renderings (console table, PERFORMANCE.md).

A row holds our figure and the peer's figure measured in the same run; the ratio is always
computed from those two numbers (never stored separately), so the JSON, the console table and
the README fragment cannot disagree. A row that failed or was skipped keeps its reason in
`status` and is still printed. `render_markdown` is the README fragment: the table, the machine,
the command, the date and the FLOP formulas, regenerated from the JSON by `dsocr-bench --render`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATUSES = ("ok", "failed", "skipped")
TARGET_KINDS = ("ratio", "value", "none")


@dataclass
class Target:
    """What a row should reach: ratio >= threshold, or our figure >= threshold, or nothing."""

    kind: str = "none"
    threshold: float = 0.0
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"Target.kind must be one of {TARGET_KINDS}, got {self.kind!r}")
        if self.kind != "none" and not self.threshold > 0:
            raise ValueError(f"a {self.kind} target needs a positive threshold, got {self.threshold}")

    def describe(self, unit: str) -> str:
        texts = {"ratio": f">= {self.threshold:g}x", "value": f">= {fmt_number(self.threshold)} {unit}"}
        text = texts.get(self.kind, "-")
        return f"{text} ({self.note})" if self.note else text


@dataclass
class Row:
    """One line of the table. ours/peer in `unit` (higher is better); extra: details for the notes."""

    section: str
    name: str
    unit: str
    ours: float | None = None
    peer: float | None = None
    peer_name: str = ""
    target: Target = field(default_factory=Target)
    notes: str = ""
    status: str = "ok"
    reason: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.target, dict):
            self.target = Target(**self.target)
        if self.status not in STATUSES:
            raise ValueError(f"Row.status must be one of {STATUSES}, got {self.status!r}")

    @property
    def ratio(self) -> float | None:
        """ours / peer from the two measured figures (None when either is missing)."""
        if self.ours is None or self.peer is None or not self.peer > 0:
            return None
        return self.ours / self.peer

    @property
    def target_met(self) -> bool | None:
        if self.status != "ok" or self.target.kind == "none":
            return None
        if self.target.kind == "ratio":
            return None if self.ratio is None else self.ratio >= self.target.threshold
        return None if self.ours is None else self.ours >= self.target.threshold

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ratio"] = self.ratio
        out["target_met"] = self.target_met
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Row:
        data = {k: v for k, v in data.items() if k not in ("ratio", "target_met")}
        return cls(**data)


def error_text(error: BaseException) -> str:
    """One line, at most 300 characters, for the table: what a failed measurement raised."""
    return f"{type(error).__name__}: {error}".replace("\n", " ")[:300]


def status_row(section: str, name: str, unit: str, why: BaseException | str, target: Target | None = None,
               status: str = "failed") -> Row:  # fmt: skip
    """The row of a measurement that raised (`why` the error) or was skipped: the table shows why."""
    reason = why if isinstance(why, str) else error_text(why)
    return Row(section, name, unit, target=target or Target(), status=status, reason=reason)


def with_peer(label: str, ours: float | None, peer: float | None, spec: str, unit: str = "") -> str:
    """'label ours unit (peer p unit)' for the notes; '' when ours is not known (CUDA-only figures)."""
    if ours is None:
        return ""
    text = f"{label} {ours:{spec}}{unit}".strip()
    return text + (f" (peer {peer:{spec}}{unit})" if peer is not None else "")


def join_notes(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def fmt_number(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _cells(row: Row) -> list[str]:
    met = {True: "yes", False: "NO", None: "-"}[row.target_met]
    if row.status != "ok":
        met = row.status.upper()
    ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
    ours, peer = fmt_number(row.ours), fmt_number(row.peer)
    if row.peer_name:
        peer = f"{peer} ({row.peer_name})"
    notes = row.notes if row.status == "ok" else f"{row.status}: {row.reason}"
    return [row.section, row.name, row.unit, ours, peer, ratio, row.target.describe(row.unit), met, notes]


HEADER = ["benchmark", "variant", "unit", "ours", "peer (same run)", "ratio", "target", "met", "notes"]


def render_text(rows: list[Row]) -> str:
    """Fixed-width console table (notes column last, unpadded)."""
    table = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER) - 1)]
    lines = []
    for k, line in enumerate(table):
        head = "  ".join(cell.ljust(w) for cell, w in zip(line, widths))
        lines.append(f"{head}  {line[-1]}".rstrip())
        if k == 0:
            lines.append("-" * (sum(widths) + 2 * len(widths) + 5))
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def wall_time(result: dict) -> str:
    """'132 s (full 72 s, decoder 21 s, ...)': the run's wall time, then each section's."""
    sections = ", ".join(f"{k} {v:.0f} s" for k, v in result.get("section_wall_s", {}).items())
    return f"{result.get('wall_s', 0):.0f} s" + (f" ({sections})" if sections else "")


def render_markdown(result: dict) -> str:
    """The README fragment: heading, machine, command, date, the table and the footnotes."""
    rows = [Row.from_dict(r) for r in result["rows"]]
    machine = result["machine"]
    lines = [
        "### Benchmarks (`dsocr-bench`)",
        "",
        f"Measured {result['date']} with `{result['command']}` (git {machine.get('git', '?')}), "
        f"{'quick CPU mode (debug presets, compiled variants traced with aot_eager: a smoke test, not a performance claim)' if result['quick'] else 'full presets'}.",
        "",
        f"- machine: {machine.get('device_name', '?')} x{machine.get('device_count', 0)}, "
        f"{machine.get('cpu', '?')} ({machine.get('cpu_cores', '?')} cores)",
        f"- software: torch {machine.get('torch', '?')}, transformers {machine.get('transformers', '?')}, "
        f"CUDA {machine.get('cuda', '-')}, Python {machine.get('python', '?')}",
        f"- measured bf16 matmul peak: {fmt_number(result.get('peak_tflops'))} TFLOP/s "
        f"({result.get('peak_note', '')})",
        f"- total wall time of the run: {wall_time(result)}",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_md_escape(c) for c in _cells(row)) + " |")
    lines.append("")
    for note in result.get("footnotes", []):
        lines.append(f"- {note}")
    lines.append("")
    lines.append(
        "Regenerate: `dsocr-bench --out DIR` on the GPU machine (writes DIR/PERFORMANCE.md and "
        "DIR/bench_results.json), or `dsocr-bench --render DIR/bench_results.json` from the JSON; "
        "numbers in this section are never edited by hand."
    )
    return "\n".join(lines) + "\n"


def write_result(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """bench_results.json and PERFORMANCE.md in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "bench_results.json"
    json_path.write_text(json.dumps(result, indent=2, sort_keys=False))
    md_path = out_dir / "PERFORMANCE.md"
    md_path.write_text(render_markdown(result))
    return json_path, md_path


def load_result(path: Path) -> dict:
    result = json.loads(Path(path).read_text())
    if "rows" not in result or "machine" not in result:
        raise ValueError(f"{path} is not a dsocr-bench result (no 'rows' / 'machine')")
    return result
