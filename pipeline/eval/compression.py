"""Vision-text compression study (DeepSeek-OCR paper, Table 2 protocol).

Pages are bucketed by the number of ground-truth text tokens under the model tokenizer
(600-700, ..., 1200-1300 by default; lo <= n < hi). Per mode and bucket we report the Fox
word-set precision (unique ground-truth words found, as the Fox script computes it), character
precision/recall (LCS), the normalised edit distance, and the compression ratio = text tokens /
vision tokens (mean over the bucket's pages). Failed pages count with precision/recall 0 and edit
distance 1. The paper's Tiny/Small precisions are printed beside ours (../shared/spec/training.md).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.batch import ImageViews
from pipeline.eval.metrics import Normalizer, char_precision_recall, fox_scores
from pipeline.eval.report import SampleRecord
from pipeline.processing import ModeSpec, get_mode

DEFAULT_BUCKET_EDGES = (600, 700, 800, 900, 1000, 1100, 1200, 1300)
# vision tokens of one view in the resize/pad modes (architecture.md section 3)
NOMINAL_VISION_TOKENS = {"tiny": 64, "small": 100, "base": 256, "large": 400}
# DeepSeek-OCR Table 2 precision on Fox English pages (word-set metric), by text-token bucket
PAPER_TABLE2_PRECISION = {
    "tiny": {600: 0.965, 700: 0.938, 800: 0.838, 900: 0.859, 1000: 0.793, 1100: 0.764, 1200: 0.591},
    "small": {600: 0.985, 700: 0.973, 800: 0.968, 900: 0.968, 1000: 0.915, 1100: 0.898, 1200: 0.871},
}


@dataclass(frozen=True)
class BucketRow:
    """Mean scores of one mode over the pages of one text-token bucket [lo, hi)."""

    mode: str
    lo: int
    hi: int
    num_pages: int
    num_failed: int
    fox_precision: float
    char_precision: float
    char_recall: float
    edit_distance: float
    compression: float
    text_tokens: float
    paper_precision: float | None = None


@dataclass
class CompressionStudy:
    """All bucket rows plus the pages left out (outside every bucket)."""

    rows: list[BucketRow]
    edges: tuple[int, ...]
    out_of_range: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "edges": list(self.edges),
            "out_of_range": self.out_of_range,
            "rows": [asdict(r) for r in self.rows],
        }

    def to_table(self) -> str:
        header = [
            "mode",
            "text tokens",
            "pages",
            "failed",
            "Fox prec",
            "paper",
            "char P",
            "char R",
            "edit dist",
            "compr.",
        ]
        lines = [header]
        for r in self.rows:
            paper = "" if r.paper_precision is None else f"{100 * r.paper_precision:.1f}%"
            lines.append(
                [
                    r.mode,
                    f"{r.lo}-{r.hi}",
                    str(r.num_pages),
                    str(r.num_failed),
                    f"{100 * r.fox_precision:.1f}%",
                    paper,
                    f"{100 * r.char_precision:.1f}%",
                    f"{100 * r.char_recall:.1f}%",
                    f"{r.edit_distance:.3f}",
                    f"{r.compression:.1f}x",
                ]
            )
        widths = [max(len(row[c]) for row in lines) for c in range(len(header))]
        text = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        if self.out_of_range:
            text.append(
                f"{len(self.out_of_range)} page(s) outside {self.edges[0]}-{self.edges[-1]} tokens left out"
            )
        return "\n".join(text)

    def write(self, out_dir: str | Path, stem: str = "compression") -> dict[str, Path]:
        """Write {stem}.json, {stem}.txt and the plot {stem}.png."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / f"{stem}.json", "table": out / f"{stem}.txt", "plot": out / f"{stem}.png"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        paths["table"].write_text(self.to_table() + "\n")
        self.plot(paths["plot"])
        return paths

    def plot(self, path: str | Path) -> Path:
        """Precision vs compression, one line per mode (Fox precision solid, char precision dashed)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in dict.fromkeys(r.mode for r in self.rows):
            rows = sorted((r for r in self.rows if r.mode == mode), key=lambda r: r.compression)
            x = [r.compression for r in rows]
            (line,) = ax.plot(x, [100 * r.fox_precision for r in rows], "o-", label=f"{mode} (Fox word-set)")
            ax.plot(
                x,
                [100 * r.char_precision for r in rows],
                "s--",
                color=line.get_color(),
                alpha=0.6,
                label=f"{mode} (char)",
            )
            for r in rows:
                ax.annotate(
                    f"{r.lo}-{r.hi}",
                    (r.compression, 100 * r.fox_precision),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_xlabel("compression ratio (text tokens / vision tokens)")
        ax.set_ylabel("precision (%)")
        ax.set_title("Vision-text compression")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def count_text_tokens(
    encode: Callable[[str], Sequence[int]], references: Mapping[str, str]
) -> dict[str, int]:
    """Ground-truth token counts (key -> len(encode(text))), encode without special tokens."""
    return {key: len(encode(text)) for key, text in references.items()}


def vision_tokens_of(views: ImageViews, mode: str | ModeSpec) -> int:
    """Vision tokens one processed image feeds the decoder, without newline/separator slots:
    q^2 for the global view plus w*h*t^2 for the tiles (Gundam: n*100 + 256)."""
    spec = get_mode(mode)
    tiles = 0 if views.tiles is None else views.grid[0] * views.grid[1]
    return spec.global_grid**2 + tiles * spec.tile_grid**2


def bucket_index(num_tokens: int, edges: Sequence[int]) -> int | None:
    """Index i with edges[i] <= num_tokens < edges[i+1], or None outside the range."""
    for i in range(len(edges) - 1):
        if edges[i] <= num_tokens < edges[i + 1]:
            return i
    return None


def _vision_tokens(spec: int | Mapping[str, int], mode: str, key: str) -> int:
    n = spec if isinstance(spec, int) else spec.get(key)
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"mode {mode!r}: no positive vision token count for page {key!r} (got {n!r})")
    return n


def compression_study(
    records_by_mode: Mapping[str, Sequence[SampleRecord]],
    text_tokens: Mapping[str, int],
    vision_tokens: Mapping[str, int | Mapping[str, int]] | None = None,
    *,
    edges: Sequence[int] = DEFAULT_BUCKET_EDGES,
    normalizer: Normalizer | None = None,
    cjk: Literal["chars", "jieba"] = "chars",
) -> CompressionStudy:
    """Bucket every mode's pages by ground-truth tokens and average their scores.

    records_by_mode: mode -> evaluated pages. text_tokens: key -> ground-truth token count.
    vision_tokens: mode -> tokens per page (an int, or key -> int for variable modes such as
    Gundam); defaults to NOMINAL_VISION_TOKENS. normalizer: applied to both texts before scoring
    (default None: raw text, as the Fox script). Empty buckets get no row.
    """
    edges = tuple(int(e) for e in edges)
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bucket edges must be at least two strictly increasing numbers, got {edges}")
    if not records_by_mode:
        raise ValueError("compression_study needs at least one mode")
    vision_tokens = vision_tokens if vision_tokens is not None else NOMINAL_VISION_TOKENS
    norm = normalizer or Normalizer.identity()
    rows: list[BucketRow] = []
    out_of_range: set[str] = set()
    for mode, records in records_by_mode.items():
        if mode not in vision_tokens:
            raise ValueError(f"no vision token count for mode {mode!r}; pass vision_tokens={{{mode!r}: N}}")
        buckets: dict[int, list[tuple[SampleRecord, int, int]]] = {}
        for rec in records:
            if rec.key not in text_tokens:
                raise ValueError(f"mode {mode!r}: page {rec.key!r} has no ground-truth token count")
            n_text = text_tokens[rec.key]
            idx = bucket_index(n_text, edges)
            if idx is None:
                out_of_range.add(rec.key)
                continue
            buckets.setdefault(idx, []).append(
                (rec, n_text, _vision_tokens(vision_tokens[mode], mode, rec.key))
            )
        for idx in sorted(buckets):
            scores: list[tuple[float, float, float, float]] = []  # Fox P, char P, char R, edit distance
            for rec, _, _ in buckets[idx]:
                if rec.error is not None:
                    scores.append((0.0, 0.0, 0.0, 1.0))
                    continue
                ref, pred = norm(rec.reference), norm(rec.prediction)
                fox = fox_scores(ref, pred, cjk=cjk)
                scores.append((fox.precision, *char_precision_recall(ref, pred), fox.edit_distance))
            fox_p, char_p, char_r, ned = (statistics.fmean(column) for column in zip(*scores))
            lo, hi = edges[idx], edges[idx + 1]
            rows.append(
                BucketRow(
                    mode=mode,
                    lo=lo,
                    hi=hi,
                    num_pages=len(buckets[idx]),
                    num_failed=sum(rec.error is not None for rec, _, _ in buckets[idx]),
                    fox_precision=fox_p,
                    char_precision=char_p,
                    char_recall=char_r,
                    edit_distance=ned,
                    compression=statistics.fmean(n_text / n_vision for _, n_text, n_vision in buckets[idx]),
                    text_tokens=statistics.fmean(n for _, n, _ in buckets[idx]),
                    paper_precision=PAPER_TABLE2_PRECISION.get(mode.lower(), {}).get(lo)
                    if hi - lo == 100
                    else None,
                )
            )
    return CompressionStudy(rows=rows, edges=edges, out_of_range=sorted(out_of_range))
