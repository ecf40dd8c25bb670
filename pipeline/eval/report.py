"""Evaluation report: per-sample records -> raw and normalised CER/WER, loop rate, throughput,
failures; written as JSON, a per-sample JSONL and a human-readable table.

Implements the reporting side of ../shared/spec/training.md "Measuring OCR quality". A sample that
failed to decode or generate is kept: it is scored as an empty prediction (CER and WER exactly 1.0),
listed with its reason and counted in `num_failed`, so averages never silently drop it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.eval.metrics import CorpusMetrics, Normalizer, corpus_metrics, is_loop, score_sample


@dataclass
class SampleRecord:
    """One evaluated sample.

    prediction: decoded output ("" when generation failed); hit_eos: generation ended with EOS;
    error: None, or why the sample could not be decoded/generated; tokens: generated tokens;
    seconds: wall time attributed to this sample (its share of the batch).
    """

    key: str
    reference: str
    prediction: str = ""
    hit_eos: bool = True
    error: str | None = None
    tokens: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], source: str = "") -> SampleRecord:
        """Build from a JSON object; `key` and `reference` are required, the rest defaults."""
        where = f" ({source})" if source else ""
        for name in ("key", "reference"):
            if not isinstance(obj.get(name), str):
                raise ValueError(f"record{where} needs a string {name!r}, got {obj.get(name)!r}")
        unknown = set(obj) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"record {obj['key']!r}{where} has unknown fields {sorted(unknown)}")
        record = cls(**obj)
        if record.prediction is None:
            record.prediction = ""
        return record


def join_predictions(
    references: Mapping[str, str],
    predictions: Mapping[str, Mapping[str, Any]],
) -> list[SampleRecord]:
    """Pair predictions with references by key.

    predictions[key] holds the SampleRecord fields other than key/reference. Keys must match
    exactly; otherwise a ValueError lists (a few of) the missing and the unexpected keys.
    """
    missing = sorted(set(references) - set(predictions))
    extra = sorted(set(predictions) - set(references))
    if missing or extra:
        raise ValueError(
            "prediction keys do not match the references: "
            f"{len(missing)} references without prediction {missing[:5]}, "
            f"{len(extra)} predictions without reference {extra[:5]}"
        )
    return [
        SampleRecord.from_json({**predictions[key], "key": key, "reference": ref})
        for key, ref in references.items()
    ]


@dataclass
class EvalReport:
    """Aggregated evaluation of one system on one sample set.

    raw/normalized: CorpusMetrics without and with `normalizer`. loop_rate: loops / all samples
    (failed samples are not loops). pages_per_s/tokens_per_s: over `seconds` of generation wall
    time. per_sample: key, cer, cer_norm, wer, loop, error for each record, in input order.
    """

    name: str
    num_samples: int
    num_failed: int
    num_loops: int
    raw: CorpusMetrics
    normalized: CorpusMetrics
    seconds: float
    total_tokens: int
    failures: list[dict[str, str]]
    per_sample: list[dict[str, Any]]
    records: list[SampleRecord]
    normalizer: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def loop_rate(self) -> float:
        return self.num_loops / self.num_samples

    @property
    def pages_per_s(self) -> float:
        return self.num_samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.total_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """The aggregate numbers (no per-sample lists)."""
        return {
            "name": self.name,
            "meta": self.meta,
            "num_samples": self.num_samples,
            "num_failed": self.num_failed,
            "num_loops": self.num_loops,
            "loop_rate": self.loop_rate,
            "raw": self.raw.as_dict(),
            "normalized": self.normalized.as_dict(),
            "seconds": self.seconds,
            "total_tokens": self.total_tokens,
            "pages_per_s": self.pages_per_s,
            "tokens_per_s": self.tokens_per_s,
            "normalizer": self.normalizer,
            "failures": self.failures,
        }

    def to_table(self) -> str:
        """Human-readable table: raw vs normalised metrics, loops, throughput, failures."""
        return format_comparison([self], title=f"eval {self.name}".strip())

    def write(self, out_dir: str | Path, stem: str = "eval") -> dict[str, Path]:
        """Write {stem}_report.json, {stem}_report.txt and {stem}_samples.jsonl into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": out / f"{stem}_report.json",
            "table": out / f"{stem}_report.txt",
            "samples": out / f"{stem}_samples.jsonl",
        }
        paths["json"].write_text(json.dumps(self.summary(), indent=2, ensure_ascii=False) + "\n")
        paths["table"].write_text(self.to_table() + "\n")
        with paths["samples"].open("w", encoding="utf-8") as f:
            for record, scores in zip(self.records, self.per_sample):
                f.write(json.dumps({**record.to_json(), **scores}, ensure_ascii=False) + "\n")
        return paths


def build_report(
    records: Sequence[SampleRecord],
    *,
    name: str = "",
    normalizer: Normalizer | None = None,
    loop_factor: float = 3.0,
    wall_seconds: float | None = None,
    meta: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Score records into an EvalReport.

    Raises ValueError on no records, duplicate keys, or a reference that is empty (raw or after
    normalisation). wall_seconds overrides the sum of per-record seconds for throughput.
    """
    if not records:
        raise ValueError("build_report needs at least one record")
    if loop_factor <= 0:
        raise ValueError(f"loop_factor must be > 0, got {loop_factor}")
    normalizer = normalizer or Normalizer()
    seen: set[str] = set()
    raw_scores, norm_scores, per_sample, failures = [], [], [], []
    num_loops = 0
    for rec in records:
        if rec.key in seen:
            raise ValueError(f"duplicate sample key {rec.key!r}")
        seen.add(rec.key)
        if not rec.reference.strip():
            raise ValueError(f"sample {rec.key!r} has an empty reference")
        ref_norm = normalizer(rec.reference)
        if not ref_norm.strip():
            raise ValueError(
                f"sample {rec.key!r}: reference is empty after normalisation ({rec.reference!r})"
            )
        failed = rec.error is not None
        prediction = "" if failed else rec.prediction
        raw = score_sample(rec.reference, prediction)
        norm = score_sample(ref_norm, normalizer(prediction))
        loop = (not failed) and is_loop(rec.reference, prediction, rec.hit_eos, loop_factor)
        num_loops += loop
        if failed:
            failures.append({"key": rec.key, "reason": rec.error})
        raw_scores.append(raw)
        norm_scores.append(norm)
        per_sample.append(
            {"cer": raw.cer, "cer_norm": norm.cer, "wer": raw.wer, "loop": loop, "failed": failed}
        )
    seconds = float(wall_seconds) if wall_seconds is not None else sum(r.seconds for r in records)
    return EvalReport(
        name=name,
        num_samples=len(records),
        num_failed=len(failures),
        num_loops=num_loops,
        raw=corpus_metrics(raw_scores),
        normalized=corpus_metrics(norm_scores),
        seconds=seconds,
        total_tokens=sum(r.tokens for r in records),
        failures=failures,
        per_sample=per_sample,
        records=list(records),
        normalizer=dataclasses.asdict(normalizer),
        meta=dict(meta or {}),
    )


_ROWS = (
    ("corpus CER", "corpus_cer"),
    ("mean CER", "mean_cer"),
    ("median CER", "median_cer"),
    ("CER capped@1", "capped_cer"),
    ("corpus WER", "corpus_wer"),
    ("mean WER", "mean_wer"),
    ("median WER", "median_wer"),
)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.2f}%"


def format_comparison(reports: Iterable[EvalReport], title: str = "") -> str:
    """Side-by-side table of several reports (e.g. ours vs tesseract), raw and normalised columns."""
    reports = list(reports)
    if not reports:
        raise ValueError("format_comparison needs at least one report")
    header = ["metric"]
    for i, r in enumerate(reports):
        label = r.name or f"#{i}"
        header += [f"{label} raw", f"{label} norm"]
    rows = [header]
    for label, attr in _ROWS:
        row = [label]
        for r in reports:
            row += [_pct(getattr(r.raw, attr)), _pct(getattr(r.normalized, attr))]
        rows.append(row)
    for label, fn in (
        ("samples", lambda r: str(r.num_samples)),
        ("failed", lambda r: str(r.num_failed)),
        ("loop rate", lambda r: f"{_pct(r.loop_rate)} ({r.num_loops})"),
        ("pages/s", lambda r: f"{r.pages_per_s:.3f}"),
        ("tokens/s", lambda r: f"{r.tokens_per_s:.1f}"),
    ):
        row = [label]
        for r in reports:
            row += [fn(r), ""]
        rows.append(row)
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = [title] if title else []
    for i, row in enumerate(rows):
        cells = [cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for r in reports:
        for failure in r.failures[:20]:
            lines.append(f"failed [{r.name}] {failure['key']}: {failure['reason']}")
        if len(r.failures) > 20:
            lines.append(f"failed [{r.name}] ... and {len(r.failures) - 20} more")
    return "\n".join(lines)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """JSON objects, one per non-blank line. A bad line raises ValueError naming it: a partially
    read prediction file would bias the scores."""
    objects = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            objects.append(obj)
    return objects


_RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(SampleRecord))


def read_records_jsonl(path: str | Path, references: Mapping[str, str] | None = None) -> list[SampleRecord]:
    """SampleRecords from a JSONL prediction file (e.g. one written by EvalReport.write).

    Fields other than SampleRecord's (such as per-sample scores) are ignored. With `references`
    (key -> text) the file's own references are replaced and the keys must match exactly
    (`join_predictions`); without, every line must carry its `reference`.
    """
    by_key: dict[str, dict[str, Any]] = {}
    for obj in read_jsonl(path):
        key = obj.get("key")
        if not isinstance(key, str):
            raise ValueError(f"{path}: a line has no string 'key': {str(obj)[:120]}")
        if key in by_key:
            raise ValueError(f"{path}: duplicate key {key!r}")
        by_key[key] = {k: v for k, v in obj.items() if k in _RECORD_FIELDS}
    if references is not None:
        stripped = {
            k: {f: v for f, v in obj.items() if f not in ("key", "reference")} for k, obj in by_key.items()
        }
        return join_predictions(references, stripped)
    return [SampleRecord.from_json(obj, source=str(path)) for obj in by_key.values()]
