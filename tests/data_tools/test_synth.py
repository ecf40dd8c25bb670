"""Synthetic OCR generator: RTL shaping oracle, determinism, layout boxes, degradation, charts, speed."""

from __future__ import annotations

import io
import random
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_tools.shards import ShardWriterConfig, iter_samples
from data_tools.synth import fonts as fonts_mod
from data_tools.synth.chart import CHART_KINDS, render_chart
from data_tools.synth.degrade import DegradeConfig, degrade, rotate_point
from data_tools.synth.fonts import MissingFontError, find_fonts, fonts_available
from data_tools.synth.generate import SynthConfig, generate, make_sample
from data_tools.synth.page import PageConfig, free_ocr_target, grounding_target, render_page, to_bins
from data_tools.synth.render import LineSampler, render_line
from data_tools.synth.text import TextSource

pytestmark = pytest.mark.unit

HAS_ZH, ZH_REASON = fonts_available("chinese")
BUNDLED_LANGS = ("en", "ru", "ar", "fa")


@pytest.mark.parametrize(
    "script, logical, visual",
    [
        # DejaVu Sans presentation forms in visual (left-to-right drawing) order, shaped by hand:
        # salaam = seen-initial, lam-alef final ligature, meem isolated
        ("arabic", "سلام", "\ufee1\ufefc\ufeb3"),
        # ketab = keheh-initial, teh-medial, alef-final, beh-isolated
        ("persian", "کتاب", "\ufe8f\ufe8e\ufe98\ufb90"),
    ],
)
def test_rtl_shaping_matches_hand_shaped_presentation_forms(script, logical, visual):
    font = find_fonts(script)[0]  # DejaVu Sans from matplotlib: on every machine
    shaped = np.asarray(render_line(logical, font, 48, script=script, align="left"))
    oracle = np.asarray(render_line(visual, font, 48, script="latin", align="left"))
    unshaped = np.asarray(render_line(logical, font, 48, script="latin", align="left"))
    assert shaped.shape == oracle.shape and np.array_equal(shaped, oracle)
    assert unshaped.shape != shaped.shape or not np.array_equal(unshaped, shaped)


def test_line_sampler_bounds_and_determinism():
    sampler = LineSampler(seed=3, min_len=3, max_len=6, image_size=128, bundled_only=True)
    texts = []
    for i in range(200):
        img, text = sampler[i]
        assert img.size == (128, 128) and img.mode == "RGB"
        assert 3 <= len(text) <= 6 and text == text.strip()
        texts.append(text)
    assert len(set(texts)) > 100  # real variety, not a constant
    img0, text0 = LineSampler(seed=3, min_len=3, max_len=6, image_size=128, bundled_only=True)[17]
    assert text0 == texts[17] and np.array_equal(np.asarray(img0), np.asarray(sampler[17][0]))
    other = LineSampler(seed=4, min_len=3, max_len=6, image_size=128, bundled_only=True)
    assert sum(other[i][1] != texts[i] for i in range(50)) > 25  # another seed, another stream
    # ink is present: the text was drawn (dark pixels on a light background)
    assert (np.asarray(img0).min(axis=2) < 100).sum() > 20


def test_line_sampler_alphabet_and_validation():
    s = LineSampler(seed=0, alphabet="ab c", min_len=5, max_len=5, image_size=(64, 32))
    for i in range(20):
        _, text = s[i]
        assert len(text) == 5 and set(text) <= {"a", "b", "c"}
    with pytest.raises(ValueError, match="min_len"):
        LineSampler(min_len=5, max_len=2)
    with pytest.raises(ValueError, match="language"):
        LineSampler(langs=("xx",))


def test_text_source_short_lengths():
    for lang in ("en", "ru", "ar", "fa", "zh"):
        src = TextSource(lang, random.Random(1))
        for _ in range(200):
            t = src.short(2, 9)
            assert 2 <= len(t) <= 9 and t == t.strip(), (lang, t)


def test_missing_font_error_names_the_package(monkeypatch):
    fonts_mod.find_fonts.cache_clear()
    monkeypatch.setitem(
        fonts_mod._CANDIDATES,
        "chinese",
        [(fonts_mod.Path("/nonexistent"), "X.ttc", 2, False, "fonts-noto-cjk")],
    )
    with pytest.raises(MissingFontError, match="fonts-noto-cjk.*install_system_deps"):
        find_fonts("chinese")
    ok, reason = fonts_available("chinese")
    assert not ok and "fonts-noto-cjk" in reason
    fonts_mod.find_fonts.cache_clear()


def _ink_outside_boxes(page, paper_margin: int = 2) -> int:
    """Pixels clearly darker than the paper that lie outside every block box."""
    arr = np.asarray(page.image.convert("L")).astype(int)  # (H, W)
    paper = np.median(arr)
    mask = np.zeros_like(arr, dtype=bool)
    for b in page.blocks:
        x1, y1, x2, y2 = (int(v) for v in b.box)
        mask[max(0, y1 - paper_margin) : y2 + paper_margin, max(0, x1 - paper_margin) : x2 + paper_margin] = (
            True
        )
    return int(((arr < paper - 60) & ~mask).sum())


@pytest.mark.parametrize(
    "lang", ["en", "ru", "fa", pytest.param("zh", marks=pytest.mark.skipif(not HAS_ZH, reason=ZH_REASON))]
)
def test_page_blocks_cover_all_ink_and_targets_are_consistent(lang):
    cfg = PageConfig(width=(640, 640), aspect=(1.3, 1.3), degrade=DegradeConfig.off())
    page = render_page(random.Random(7), lang, cfg)
    assert len(page.blocks) >= 3
    assert _ink_outside_boxes(page) == 0
    for b in page.blocks:  # every box holds ink
        x1, y1, x2, y2 = (int(v) for v in b.box)
        assert np.asarray(page.image.convert("L"))[y1:y2, x1:x2].min() < 128
    g = grounding_target(page.blocks, page.image.size)
    dets = re.findall(r"<\|ref\|>(\w+)<\|/ref\|><\|det\|>\[\[(\d+), (\d+), (\d+), (\d+)\]\]<\|/det\|>\n", g)
    assert len(dets) == len(page.blocks)
    for (label, *coords), b in zip(dets, page.blocks):
        x1, y1, x2, y2 = map(int, coords)
        assert label == b.label and 0 <= x1 < x2 <= 999 and 0 <= y1 < y2 <= 999
        assert [x1, y1, x2, y2] == to_bins(b.box, page.image.size)
    assert free_ocr_target(page.blocks) == "\n\n".join(b.plain for b in page.blocks)
    for b in page.blocks:
        if b.label == "table":
            n_rows = b.markdown.count("<tr>")
            assert b.markdown.startswith("<table>") and n_rows == len(b.plain.split("\n"))


def test_rtl_page_reading_order_starts_right():
    cfg = PageConfig(width=(800, 800), aspect=(1.3, 1.3), columns=(2,), column_weights=(1.0,), p_title=0.0,
                     degrade=DegradeConfig.off())  # fmt: skip
    page = render_page(random.Random(2), "fa", cfg)
    first, last = page.blocks[0].box, page.blocks[-1].box
    assert first[0] > 400 and last[2] < 400  # first column in reading order is the right one


def test_to_bins():
    assert to_bins((0, 0, 1000, 500), (1000, 500)) == [0, 0, 999, 999]
    assert to_bins((500, 250, 1000, 500), (1000, 500)) == [500, 500, 999, 999]


def test_rotate_point_matches_pil_rotation():
    img = Image.new("L", (200, 120), 0)
    ImageDraw.Draw(img).rectangle([149, 29, 151, 31], fill=255)
    rotated = img.rotate(7.0, resample=Image.Resampling.BICUBIC, expand=False)
    arr = np.asarray(rotated).astype(float)
    ys, xs = np.nonzero(arr > 60)
    wts = arr[ys, xs]
    cx, cy = (xs * wts).sum() / wts.sum(), (ys * wts).sum() / wts.sum()
    ex, ey = rotate_point(150.5, 30.5, 7.0, (200, 120))
    assert abs(cx - ex) < 1.0 and abs(cy - ey) < 1.0


def test_degrade_is_deterministic_and_jpeg_bytes_decode_to_image():
    base = render_line("Hello degrade", find_fonts("latin")[0], 40)
    cfg = DegradeConfig(p_rotate=1, p_blur=1, p_noise=1, p_jpeg=1)
    a, deg_a, jpeg_a = degrade(base, random.Random(5), cfg)
    b, deg_b, jpeg_b = degrade(base, random.Random(5), cfg)
    assert deg_a == deg_b != 0 and jpeg_a == jpeg_b and jpeg_a[:2] == b"\xff\xd8"
    assert np.array_equal(np.asarray(a), np.asarray(Image.open(io.BytesIO(jpeg_a)).convert("RGB")))
    same, deg, jpeg = degrade(base, random.Random(5), DegradeConfig.off())
    assert same is base and deg == 0 and jpeg is None


@pytest.mark.parametrize("kind", CHART_KINDS)
def test_chart_table_shape_and_determinism(kind):
    c1 = render_chart(random.Random(11), kind, dpi=60)
    c2 = render_chart(random.Random(11), kind, dpi=60)
    assert np.array_equal(np.asarray(c1.image), np.asarray(c2.image)) and c1.table == c2.table
    header, *rows = c1.table
    assert header[0] == "" and len(rows) >= 3 and all(len(r) == len(header) for r in rows)
    decimals = {len(v.split(".")[1]) if "." in v else 0 for r in rows for v in r[1:]}
    assert len(decimals) == 1  # one fixed format per chart
    if kind == "pie":
        assert abs(sum(float(r[1]) for r in rows) - 100) < 0.05 * len(rows)
    assert c1.html.count("<tr>") == len(rows) + 1


def test_generate_deterministic_shards(tmp_path):
    cfg = dict(
        n=6, seed=9, langs=BUNDLED_LANGS, kinds={"line": 0.6, "page": 0.2, "chart": 0.2}, progress=False
    )
    page = PageConfig(width=(400, 480), aspect=(1.2, 1.3), bundled_only=True)
    m1 = generate(SynthConfig(page=page, **cfg), ShardWriterConfig(str(tmp_path / "a"), max_count=4))
    m2 = generate(SynthConfig(page=page, **cfg), ShardWriterConfig(str(tmp_path / "b"), max_count=4))
    assert m1["total_samples"] == 6 and [s["count"] for s in m1["shards"]] == [4, 2]
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    samples = list(iter_samples(sorted((tmp_path / "a").glob("*.tar"))))
    again = list(iter_samples(sorted((tmp_path / "b").glob("*.tar"))))
    assert [s["json"] for s in samples] == [s["json"] for s in again]
    assert all(s.get("png", s.get("jpg")) == t.get("png", t.get("jpg")) for s, t in zip(samples, again))
    assert [s["sha256"] for s in m1["shards"]][0] != "" and m1["skipped_total"] == 0
    for s in samples:
        meta = s["json"]
        assert meta["prompt"].startswith("<image>\n") and meta["answer"].strip()
        img = Image.open(io.BytesIO(s.get("png") or s["jpg"]))
        assert img.size == (meta["width"], meta["height"])
    other = make_sample(0, SynthConfig(page=page, **{**cfg, "seed": 10}))
    assert other.meta != samples[0]["json"] or other.image != samples[0].get("png")


def test_synth_config_validation():
    with pytest.raises(ValueError, match="langs"):
        SynthConfig(n=1, langs=("xx",))
    with pytest.raises(ValueError, match="kinds"):
        SynthConfig(n=1, kinds={"poem": 1.0})
    with pytest.raises(ValueError, match="p_grounding"):
        SynthConfig(n=1, p_grounding=2.0)


def test_rotated_page_boxes_follow_the_ink():
    rotate_only = DegradeConfig(p_rotate=1.0, max_degrees=3.0, p_blur=0, p_noise=0, p_jpeg=0)
    cfg = PageConfig(width=(640, 640), aspect=(1.3, 1.3), degrade=rotate_only)
    page = render_page(random.Random(4), "en", cfg)
    straight = render_page(random.Random(4), "en", PageConfig(width=(640, 640), aspect=(1.3, 1.3),
                                                             degrade=DegradeConfig.off()))  # fmt: skip
    assert [b.box for b in page.blocks] != [b.box for b in straight.blocks]
    assert _ink_outside_boxes(page) == 0


@pytest.mark.unit
@pytest.mark.parametrize("lang", ["en", "fa"])
def test_two_colour_page_equals_text_drawn_on_an_rgb_page(lang):
    """Paragraph pages are saved as palette PNGs: their pixels must be exactly those of the text
    drawn in fg on an RGB page of bg (antialiased edges included)."""
    from data_tools.synth.fonts import RTL_SCRIPTS, load_font, script_of_lang
    from data_tools.synth.reading import MONO_FONT, two_colour_page

    script = script_of_lang(lang)
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 \u06f1\u06f2"  # with ZWNJ and digits
    text = "Move spell time 1984" if lang == "en" else persian
    font = load_font(MONO_FONT, 23, 0, script)
    fg, bg = (12, 60, 33), (240, 219, 251)
    kwargs = {"anchor": "rm", "direction": "rtl"} if script in RTL_SCRIPTS else {"anchor": "lm"}
    xy = (310, 41) if script in RTL_SCRIPTS else (7, 41)
    rgb = Image.new("RGB", (320, 80), bg)
    ImageDraw.Draw(rgb).text(xy, text, font=font, fill=fg, **kwargs)
    coverage = Image.new("L", (320, 80), 0)
    ImageDraw.Draw(coverage).text(xy, text, font=font, fill=255, **kwargs)
    page = two_colour_page(coverage, fg, bg)
    buf = io.BytesIO()
    page.save(buf, format="PNG", compress_level=1)
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert page.mode == "P" and len(np.unique(np.asarray(rgb).reshape(-1, 3), axis=0)) > 2  # antialiased
    np.testing.assert_array_equal(decoded, np.asarray(rgb))


@pytest.mark.unit
def test_reading_paragraphs_wrap_at_the_pitch_and_persian_lines_are_tagged():
    from data_tools.synth.reading import ReadingLinesConfig, reading_line, reading_sample, wrap_words

    assert wrap_words(["ab", "cde", "fghijkl", "m"], 6, 9) == ["ab cde", "fghijk", "m"]
    assert wrap_words(["ab", "cd", "ef"], 2, 2) == ["ab", "cd"]  # at most max_lines lines
    cfg = ReadingLinesConfig(n=8, seed=5, width=320, max_chars=16, lines=6)
    for i in range(8):
        image, text = reading_line(i, cfg)
        rows = text.split("\n")
        assert image.size == (320, 320) and 2 <= len(rows) <= 6 and all(0 < len(r) <= 16 for r in rows)
    assert reading_line(3, cfg)[1] == reading_line(3, cfg)[1]  # deterministic per index
    fa = ReadingLinesConfig(n=2, seed=5, width=320, max_chars=12, lang="fa")
    sample = reading_sample((1, fa))
    assert sample.meta["lang"] == "fa" and any("\u0600" <= ch <= "\u06ff" for ch in sample.meta["answer"])
    with pytest.raises(ValueError, match="unknown language"):
        ReadingLinesConfig(n=1, lang="xx")


@pytest.mark.unit
def test_reading_lines_of_typed_text_and_their_strip_aspect():
    from data_tools.synth.reading import ReadingLinesConfig, reading_line
    from data_tools.synth.scan_text import alphabet

    cfg = ReadingLinesConfig(n=4, seed=2, width=640, aspect=8, min_chars=1, max_chars=20, lang="fr", text="typed")
    for i in range(4):
        image, text = reading_line(i, cfg)
        assert image.size == (640, 80) and 1 <= len(text) <= 20 and set(text) <= set(alphabet("fr"))
    with pytest.raises(ValueError, match="'short' or 'typed'"):
        ReadingLinesConfig(n=1, text="random")
    with pytest.raises(ValueError, match="single lines in 'fr' or 'en'"):
        ReadingLinesConfig(n=1, lang="fa", text="typed")
    with pytest.raises(ValueError, match="aspect must be >= 1"):
        ReadingLinesConfig(n=1, aspect=0)
