"""Report aggregation: failures counted as CER 1, loops, throughput, key checks, JSONL round trip."""

import json

import pytest

from pipeline.eval.report import (
    SampleRecord,
    build_report,
    format_comparison,
    join_predictions,
    read_records_jsonl,
)

pytestmark = pytest.mark.unit


def _records():
    return [
        SampleRecord("a", "abcd", "abce", hit_eos=True, tokens=10, seconds=1.0),
        # Arabic kaf in the reference, Persian keheh in the output: raw 1 edit, normalised 0
        SampleRecord("b", "\u0643\u062a\u0627\u0628", "\u06a9\u062a\u0627\u0628", tokens=10, seconds=1.0),
        # failed sample: whatever text it carries is ignored, scored as an empty prediction
        SampleRecord("c", "hello", "garbage", error="decode failed: truncated PNG"),
        # 8 chars for a 2-char reference: > 3x, a loop (CER 6 / 2 = 3.0)
        SampleRecord("d", "ab", "abababab", hit_eos=True, tokens=20, seconds=2.0),
    ]


def test_aggregates_failures_and_loops():
    report = build_report(_records(), name="ours")
    assert report.num_samples == 4 and report.num_failed == 1
    assert report.failures == [{"key": "c", "reason": "decode failed: truncated PNG"}]
    assert report.raw.corpus_cer == pytest.approx((1 + 1 + 5 + 6) / (4 + 4 + 5 + 2))
    assert report.raw.mean_cer == pytest.approx((0.25 + 0.25 + 1.0 + 3.0) / 4)
    assert report.raw.median_cer == pytest.approx((0.25 + 1.0) / 2)
    assert report.raw.capped_cer == pytest.approx((0.25 + 0.25 + 1.0 + 1.0) / 4)
    assert report.normalized.corpus_cer == pytest.approx((1 + 0 + 5 + 6) / 15)
    assert report.raw.corpus_wer == pytest.approx(4 / 4)  # every one-word sample is wrong
    assert report.num_loops == 1 and report.loop_rate == pytest.approx(0.25)
    assert [s["failed"] for s in report.per_sample] == [False, False, True, False]
    assert report.per_sample[2]["cer"] == 1.0
    assert report.pages_per_s == pytest.approx(4 / 4.0)
    assert report.tokens_per_s == pytest.approx(40 / 4.0)
    assert build_report(_records(), wall_seconds=8.0).pages_per_s == pytest.approx(0.5)


def test_no_eos_is_a_loop():
    report = build_report([SampleRecord("x", "abc", "abc", hit_eos=False)])
    assert report.num_loops == 1 and report.raw.corpus_cer == 0.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="empty reference"):
        build_report([SampleRecord("a", "  ", "x")])
    with pytest.raises(ValueError, match="after normalisation"):
        build_report([SampleRecord("a", "\u064e", "x")])  # a lone fatha
    with pytest.raises(ValueError, match="duplicate"):
        build_report([SampleRecord("a", "x", "x"), SampleRecord("a", "y", "y")])
    with pytest.raises(ValueError, match="at least one"):
        build_report([])
    with pytest.raises(
        ValueError, match=r"1 references without prediction \['b'\].*1 predictions without reference \['z'\]"
    ):
        join_predictions({"a": "x", "b": "y"}, {"a": {"prediction": "x"}, "z": {"prediction": "y"}})


def test_join_predictions():
    records = join_predictions(
        {"a": "xy", "b": "z"}, {"b": {"prediction": "z"}, "a": {"prediction": "x", "hit_eos": False}}
    )
    assert [(r.key, r.reference, r.prediction, r.hit_eos) for r in records] == [
        ("a", "xy", "x", False),
        ("b", "z", "z", True),
    ]


def test_write_read_round_trip(tmp_path):
    report = build_report(_records(), name="ours", meta={"mode": "tiny"})
    paths = report.write(tmp_path)
    summary = json.loads(paths["json"].read_text())
    assert summary["num_failed"] == 1 and summary["meta"] == {"mode": "tiny"}
    assert summary["raw"]["corpus_cer"] == pytest.approx(13 / 15)
    records = read_records_jsonl(paths["samples"])
    assert records == _records()
    again = build_report(records, name="ours", meta={"mode": "tiny"})
    assert again.summary() == report.summary()
    # re-scoring against external references checks keys
    with pytest.raises(ValueError, match="do not match"):
        read_records_jsonl(paths["samples"], references={"a": "abcd"})
    rescored = read_records_jsonl(paths["samples"], references={"a": "abce", "b": "x", "c": "y", "d": "z"})
    assert rescored[0].reference == "abce"
    table = paths["table"].read_text()
    assert "86.67%" in table and "failed [ours] c: decode failed: truncated PNG" in table


def test_comparison_table_columns():
    ours = build_report(_records(), name="ours")
    base = build_report([SampleRecord(r.key, r.reference, r.reference) for r in _records()], name="tesseract")
    table = format_comparison([ours, base])
    header = table.splitlines()[0].split()
    assert header == ["metric", "ours", "raw", "ours", "norm", "tesseract", "raw", "tesseract", "norm"]
    corpus_row = next(line for line in table.splitlines() if line.startswith("corpus CER")).split()
    assert corpus_row[2:] == ["86.67%", "80.00%", "0.00%", "0.00%"]
