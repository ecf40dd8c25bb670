"""Synthetic scans: each scanner degradation changes the image the way it says, text lines and
pages, font families, marks, determinism by seed."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_tools.shards import ShardWriterConfig, expand_shard_paths, iter_samples
from data_tools.synth.scan import FAMILIES, ScanConfig, _set_line, family_fonts, render_scan, write_scans
from data_tools.synth.scan_text import typed_line
from data_tools.synth.scanner import ScannerConfig, draw_marks, scan_degrade

pytestmark = pytest.mark.unit


def text_image(w=240, h=60) -> Image.Image:
    """Dark glyph-like strokes on light paper (paper 235, ink 30)."""
    img = Image.new("L", (w, h), 235)
    draw = ImageDraw.Draw(img)
    for x in range(20, w - 30, 14):
        draw.rectangle([x, 20, x + 6, 40], fill=30)
        draw.line([(x, 40), (x + 10, 20)], fill=30, width=2)
    return img


def ink_mask(img: Image.Image, threshold: int = 128) -> np.ndarray:
    return np.asarray(img.convert("L")) < threshold


def degrade(step: str, img: Image.Image | None = None, seed: int = 0, **ranges):
    scanned = scan_degrade(img or text_image(), random.Random(seed), ScannerConfig.only(step, **ranges))
    assert scanned.steps == [step] and (scanned.jpeg is not None) == (step == "jpeg")
    return scanned.image


def edge_energy(img: Image.Image) -> float:
    """Mean squared neighbour difference: the high-frequency energy (sharp edges score high)."""
    a = np.asarray(img.convert("L"), dtype=np.float32)
    return float((np.diff(a, axis=1) ** 2).mean() + (np.diff(a, axis=0) ** 2).mean())


def test_skew_rotates_the_ink_by_the_drawn_angle():
    bar = Image.new("L", (400, 40), 240)
    ImageDraw.Draw(bar).rectangle([20, 18, 380, 21], fill=0)
    slopes = set()
    for seed in range(4):
        out = degrade("skew", bar, seed, skew_degrees=(3.0, 3.0))
        ys, xs = np.nonzero(ink_mask(out))
        slope = np.polyfit(xs, ys, 1)[0]
        assert abs(abs(slope) - np.tan(np.radians(3.0))) < 0.005  # the bar's slope is tan(3 degrees)
        assert ys.max() - ys.min() > 4 + 360 * np.sin(np.radians(3.0)) - 3  # the ink bbox grew by w * sin
        assert out.size[0] > 400 and out.size[1] > 40  # expanded: nothing cut off
        slopes.add(np.sign(slope))
    assert slopes == {-1.0, 1.0}  # both directions occur


def test_binarize_yields_two_values_and_keeps_the_ink_where_it_was():
    noisy = scan_degrade(text_image(), random.Random(1), ScannerConfig.only("noise")).image
    out = degrade("binarize", noisy)
    assert set(np.unique(np.asarray(out))) == {0, 255}
    assert (ink_mask(out) == ink_mask(text_image())).mean() > 0.98


def test_jpeg_changes_the_pixels_but_keeps_the_text_dark():
    src = text_image()
    out = degrade("jpeg", src, jpeg_quality=(20, 20))
    assert out.format == "JPEG"
    a, b = np.asarray(src, dtype=np.int16), np.asarray(out.convert("L"), dtype=np.int16)
    assert (a != b).any()
    ink = ink_mask(src)
    assert b[ink].mean() < 70 and b[~ink].mean() > 200


def test_low_res_and_blur_remove_detail_at_the_same_size():
    src = text_image()
    for step in ("low_res", "blur"):
        out = degrade(step, src)
        assert out.size == src.size
        assert edge_energy(out) < 0.7 * edge_energy(src)
        assert ink_mask(out, 160).sum() > 0.5 * ink_mask(src).sum()  # still legible ink


def test_noise_roughens_the_paper():
    src = text_image()
    out = np.asarray(degrade("noise", src, noise_sigma=(8.0, 8.0)), dtype=np.float32)
    paper = ~ink_mask(src) & (np.asarray(src) == 235)
    assert np.asarray(src)[paper].std() == 0
    assert 6 < out[paper].std() < 10


def test_ink_bleed_thickens_strokes_by_a_pixel():
    src = text_image()
    out = degrade("ink_bleed", src)
    before, after = ink_mask(src), ink_mask(out)
    assert (after | ~before).all()  # no ink is lost
    assert after.sum() > 1.3 * before.sum()
    ys, xs = np.nonzero(after)
    ys0, xs0 = np.nonzero(before)
    assert (ys.min(), xs.min(), ys.max(), xs.max()) == (
        ys0.min() - 1,
        xs0.min() - 1,
        ys0.max() + 1,
        xs0.max() + 1,
    )


def test_uneven_paper_shades_the_paper_not_the_ink():
    src = text_image()
    out = np.asarray(degrade("uneven_paper", src, paper_shade=(0.3, 0.3)), dtype=np.float32)
    ink = ink_mask(src)
    assert out[~ink].std() > 5  # the paper is no longer one level
    assert out[~ink].min() < 235 * 0.85
    assert out[ink].max() <= 31 and out[~ink].min() > out[ink].max()


def test_tint_maps_grey_onto_paper_and_ink_colours():
    out = degrade("tint", text_image())
    assert out.mode == "RGB"
    rgb = np.asarray(out, dtype=np.int16)
    paper = rgb[~ink_mask(text_image())]
    assert (paper[:, 0] >= paper[:, 1]).all() and (paper[:, 1] >= paper[:, 2]).all()  # yellowed or grey
    assert rgb[ink_mask(text_image())].mean() < paper.mean() - 80


def test_marks_underline_below_and_strike_through_the_span():
    for kind, rows in (("underline", range(22, 26)), ("strike", range(13, 18))):
        cov = Image.new("L", (100, 40), 0)
        draw_marks(cov, [(10, 50)], kind, baseline=20, x_height=10, rng=random.Random(0))
        ink = np.asarray(cov) > 0
        ys, xs = np.nonzero(ink)
        assert xs.min() >= 9 and xs.max() <= 51 and (xs.max() - xs.min()) >= 39
        assert set(ys) <= set(rows), (kind, sorted(set(ys)))


def test_underlined_words_get_the_prefix_in_the_reference():
    cfg = ScanConfig(n=1, scanner=ScannerConfig.only("underline"), underline_prefix="_", bundled_only=True)
    texts = [render_scan(i, cfg)[1] for i in range(6)]
    assert all("_" in t for t in texts)
    plain = ScanConfig(n=1, scanner=ScannerConfig.off(), bundled_only=True)
    assert [render_scan(i, plain)[1] for i in range(6)] == [t.replace("_", "") for t in texts]


def test_typewriter_lines_have_a_fixed_pitch_and_families_have_fonts():
    for family in FAMILIES:
        assert family_fonts(family, bundled_only=True)  # matplotlib's DejaVu is always there
    mono = family_fonts("typewriter", bundled_only=True)[0]
    narrow = _set_line("iiii iiii", mono, True, 30, random.Random(0), 400, 60, 5, 5)
    wide = _set_line("MMMM MMMM", mono, True, 30, random.Random(0), 400, 60, 5, 5)
    assert narrow.word_spans == wide.word_spans


def test_lines_reach_100_characters_and_pages_join_lines():
    rng = random.Random(0)
    lengths = [len(typed_line(rng, 1, 100)) for _ in range(400)]
    assert min(lengths) >= 1 and max(lengths) <= 100 and max(lengths) >= 95
    cfg = ScanConfig(n=1, unit="page", page_lines=(3, 5), bundled_only=True)
    image, text = render_scan(0, cfg)
    assert 3 <= len(text.split("\n")) <= 5
    line_image, _ = render_scan(0, ScanConfig(n=1, bundled_only=True, scanner=ScannerConfig.off()))
    assert image.height > 2 * line_image.height / 1.6


def test_same_seed_same_pixels_other_seed_other_pixels(tmp_path):
    cfg = ScanConfig(n=6, seed=3, bundled_only=True)
    a = [np.asarray(render_scan(i, cfg)[0]) for i in range(6)]
    b = [np.asarray(render_scan(i, cfg)[0]) for i in range(6)]
    assert all(x.shape == y.shape and (x == y).all() for x, y in zip(a, b, strict=True))
    other = ScanConfig(n=6, seed=4, bundled_only=True)
    assert any(x.shape != render_scan(i, other)[0].size[::-1] for i, x in enumerate(a))
    manifest = write_scans(cfg, ShardWriterConfig(str(tmp_path / "s")))
    assert manifest["total_samples"] == 6
    got = list(iter_samples(expand_shard_paths([str(tmp_path / "s")])))
    decoded = [np.asarray(Image.open(io.BytesIO(s["png"] if "png" in s else s["jpg"]))) for s in got]
    assert all(
        x.shape == y.shape and (x == y).all() for x, y in zip(decoded, a, strict=True)
    )  # stored as seen
    assert any("jpg" in s for s in got)  # JPEG-degraded samples keep their JPEG file


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="p_blur"):
        ScannerConfig(p_blur=1.5)
    with pytest.raises(ValueError, match="font family"):
        ScanConfig(n=1, families={"gothic": 1.0})
    assert ScanConfig(n=1, scanner={"p_jpeg": 0.0, "blur_radius": [0.5, 1.0]}).scanner.blur_radius == (
        0.5,
        1.0,
    )


def test_cli_synth_scans_and_degradation_sheet(tmp_path, capsys):
    from data_tools.cli import run

    argv = ["synth-scans", "--out", str(tmp_path / "s"), "-n", "3", "--bundled-fonts", "--no-progress",
            "--scanner", "p_jpeg=0,p_tint=0,blur_radius=0.5:1.0"]  # fmt: skip
    assert run(argv) == 0
    got = list(iter_samples(expand_shard_paths([str(tmp_path / "s")])))
    assert len(got) == 3 and all(
        Image.open(io.BytesIO(s["png"])).mode == "L" for s in got
    )  # no tint, no JPEG
    assert run(["inspect", "--degradations", str(tmp_path / "d.png")]) == 0
    rows = capsys.readouterr().out.split("rows: ")[1]
    for step in ("skew", "binarize", "uneven_paper", "ink_bleed", "underline", "strike", "low_res"):
        assert step in rows
    sheet = Image.open(tmp_path / "d.png")
    assert sheet.height == 64 * 13  # none + 9 steps + 2 marks + all
    with pytest.raises(ValueError, match="unknown scanner setting"):
        run(["synth-scans", "--out", str(tmp_path / "x"), "-n", "1", "--scanner", "p_rotate=1"])


def test_install_script_installs_every_scan_font_package_and_french_tesseract():
    from pathlib import Path

    script = (Path(__file__).resolve().parents[2] / "launch" / "install_system_deps.sh").read_text()
    packages = {pkg for fonts in FAMILIES.values() for _, pkg in fonts if pkg != "matplotlib"}
    assert packages == {"fonts-freefont-ttf", "fonts-liberation2", "fonts-noto-core"}
    for pkg in (*packages, "tesseract-ocr-fra"):
        assert f" {pkg}" in script or f"\n    {pkg}\n" in script, pkg


def test_typed_lines_stay_inside_their_alphabet():
    from data_tools.synth.scan_text import alphabet

    for lang in ("fr", "en"):
        rng, allowed = random.Random(5), set(alphabet(lang))
        used = set("".join(typed_line(rng, 1, 100, lang) for _ in range(3000)))
        assert used <= allowed, used - allowed
    assert {"é", "’", "'", "°", "Ç"} <= set(alphabet("fr"))


def test_fonts_unpacked_elsewhere_are_found_through_dsocr_font_dirs(tmp_path, monkeypatch):
    import shutil

    from data_tools.synth import scan

    mono = family_fonts("typewriter", bundled_only=True)[0]  # a real TTF to stand in for FreeMono
    shutil.copy(mono, tmp_path / "FreeMono.ttf")
    missing = tmp_path / "nowhere"
    monkeypatch.setitem(scan.FAMILIES, "typewriter", [(missing / "FreeMono.ttf", "fonts-freefont-ttf")])
    assert family_fonts("typewriter") == []
    monkeypatch.setenv("DSOCR_FONT_DIRS", str(tmp_path))
    assert family_fonts("typewriter") == [str(tmp_path / "FreeMono.ttf")]
    assert family_fonts("typewriter", bundled_only=True) == []
