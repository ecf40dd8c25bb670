"""Tesseract baseline: setup errors, a rendered page read back exactly, failures recorded and scored."""

import io
import os
import shutil

import matplotlib
import pytest
from PIL import Image, ImageDraw, ImageFont

from pipeline.eval.data import EvalSample
from pipeline.eval.report import build_report
from pipeline.eval.tesseract import (
    TesseractConfig,
    TesseractNotFoundError,
    check_setup,
    installed_languages,
    run_tesseract,
)

pytestmark = pytest.mark.unit
needs_tesseract = pytest.mark.skipif(
    shutil.which("tesseract") is None, reason="tesseract binary not installed"
)


def _page(lines: list[str]) -> bytes:
    font = ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts/ttf/DejaVuSans.ttf"), 40)
    image = Image.new("RGB", (900, 80 * len(lines) + 40), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((20, 20 + 80 * i), line, font=font, fill="black")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_config_and_missing_binary():
    with pytest.raises(TesseractNotFoundError, match="launch/install_system_deps.sh"):
        check_setup(TesseractConfig(binary="no-such-tesseract-binary"))
    with pytest.raises(ValueError, match="psm"):
        TesseractConfig(psm=14)
    with pytest.raises(ValueError, match="languages"):
        TesseractConfig(languages=("eng+fas",))
    with pytest.raises(TypeError, match="tuple"):
        TesseractConfig(languages="eng")


@needs_tesseract
def test_missing_language_is_a_setup_error():
    assert "eng" in installed_languages()
    with pytest.raises(ValueError, match=r"tesseract-ocr-zz-notalang.*install_system_deps"):
        check_setup(TesseractConfig(languages=("eng", "zz_notalang")))


@needs_tesseract
def test_reads_rendered_page_and_records_failures():
    lines = ["Hello world 2024", "The quick brown fox"]
    samples = [
        EvalSample("good", "\n".join(lines), _page(lines)),
        EvalSample("broken", "anything", b"\x89PNG not really"),
        EvalSample("absent", "anything", None),
    ]
    records = run_tesseract(samples, TesseractConfig(workers=2))
    assert [r.key for r in records] == ["good", "broken", "absent"]
    assert records[0].prediction == "Hello world 2024\n\nThe quick brown fox"
    assert records[0].error is None and records[0].seconds > 0
    assert records[1].error.startswith("tesseract failed: RuntimeError")
    assert "no image" in records[2].error
    report = build_report(records, name="tesseract")
    assert report.num_failed == 2
    assert report.normalized.mean_cer == pytest.approx((0.0 + 1.0 + 1.0) / 3)
