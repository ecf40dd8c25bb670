"""Compression study: bucketing, per-bucket means (hand-computed), paper column, table and plot."""

import json

import pytest
from PIL import Image

from pipeline.eval.compression import (
    DEFAULT_BUCKET_EDGES,
    bucket_index,
    compression_study,
    count_text_tokens,
    vision_tokens_of,
)
from pipeline.eval.report import SampleRecord
from pipeline.processing import process_image

pytestmark = pytest.mark.unit

EDGES = (10, 20, 30)
TOKENS = {"a": 12, "b": 15, "c": 25, "d": 5, "e": 30}


def _records():
    return [
        SampleRecord("a", "the cat sat", "the cat"),
        SampleRecord("b", "x y", "x y"),
        SampleRecord("c", "lost page", "", error="generation failed: CUDA OOM"),
        SampleRecord("d", "short", "short"),
        SampleRecord("e", "long", "long"),
    ]


def test_bucket_index():
    assert bucket_index(600, DEFAULT_BUCKET_EDGES) == 0
    assert bucket_index(699, DEFAULT_BUCKET_EDGES) == 0
    assert bucket_index(700, DEFAULT_BUCKET_EDGES) == 1
    assert bucket_index(1299, DEFAULT_BUCKET_EDGES) == 6
    assert bucket_index(1300, DEFAULT_BUCKET_EDGES) is None
    assert bucket_index(599, DEFAULT_BUCKET_EDGES) is None


def test_bucket_means_hand_computed():
    study = compression_study({"tiny": _records()}, TOKENS, {"tiny": 5}, edges=EDGES)
    assert study.out_of_range == ["d", "e"]
    low, high = study.rows
    assert (low.lo, low.hi, low.num_pages, low.num_failed) == (10, 20, 2, 0)
    # page a: Fox {the,cat,sat} vs {the,cat} -> 2/3; LCS 7 -> char P 7/7, R 7/11; edit 4/11
    assert low.fox_precision == pytest.approx((2 / 3 + 1) / 2)
    assert low.char_precision == pytest.approx(1.0)
    assert low.char_recall == pytest.approx((7 / 11 + 1) / 2)
    assert low.edit_distance == pytest.approx((4 / 11) / 2)
    assert low.compression == pytest.approx((12 / 5 + 15 / 5) / 2)
    assert low.text_tokens == pytest.approx(13.5)
    assert (high.num_pages, high.num_failed, high.fox_precision, high.edit_distance) == (1, 1, 0.0, 1.0)
    assert high.compression == pytest.approx(5.0)
    assert low.paper_precision is None  # not a paper bucket


def test_per_page_vision_tokens_and_errors():
    study = compression_study({"gundam": _records()[:2]}, TOKENS, {"gundam": {"a": 4, "b": 6}}, edges=EDGES)
    assert study.rows[0].compression == pytest.approx((12 / 4 + 15 / 6) / 2)
    with pytest.raises(ValueError, match="no vision token count for mode 'huge'"):
        compression_study({"huge": _records()}, TOKENS, edges=EDGES)
    with pytest.raises(ValueError, match="page 'b'"):
        compression_study({"gundam": _records()[:2]}, TOKENS, {"gundam": {"a": 4}}, edges=EDGES)
    with pytest.raises(ValueError, match="ground-truth token count"):
        compression_study({"tiny": _records()}, {"a": 12}, edges=EDGES)
    with pytest.raises(ValueError, match="increasing"):
        compression_study({"tiny": _records()}, TOKENS, edges=(20, 10))


def test_paper_column_table_plot(tmp_path):
    text = " ".join(f"w{i}" for i in range(650))
    records = [SampleRecord("p", text, text)]
    tokens = count_text_tokens(str.split, {"p": text})
    assert tokens == {"p": 650}
    study = compression_study({"tiny": records, "small": records}, tokens)
    tiny, small = study.rows
    assert tiny.paper_precision == 0.965 and small.paper_precision == 0.985
    assert tiny.compression == pytest.approx(650 / 64) and small.compression == pytest.approx(6.5)
    assert tiny.fox_precision == 1.0
    paths = study.write(tmp_path)
    table = paths["table"].read_text()
    assert "600-700" in table and "96.5%" in table and "10.2x" in table
    assert json.loads(paths["json"].read_text())["rows"][1]["mode"] == "small"
    with Image.open(paths["plot"]) as img:
        assert img.format == "PNG" and img.size == (840, 540)


def test_vision_tokens_of_modes():
    page = Image.new("RGB", (1400, 900), "white")  # aspect 1.56: closest tile grid 3x2 (1.5)
    assert vision_tokens_of(process_image(page, "tiny"), "tiny") == 64
    assert vision_tokens_of(process_image(page, "base"), "base") == 256
    gundam = process_image(page, "gundam")
    assert gundam.grid == (3, 2) and vision_tokens_of(gundam, "gundam") == 6 * 100 + 256
    small_page = Image.new("RGB", (600, 500), "white")  # both sides <= 640: no tiles
    assert vision_tokens_of(process_image(small_page, "gundam"), "gundam") == 256
