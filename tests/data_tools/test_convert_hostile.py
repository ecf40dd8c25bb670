"""Converters against a hostile dataset: 16-bit and odd image modes keep their content in the
shards, paths leaving the dataset root, control characters, duplicates, unusable aspect ratios,
and the report / exit code a user reads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from dt_images import png_bytes
from PIL import Image

from data_tools.cli import main
from data_tools.convert import ConvertConfig, convert_records, read_csv, read_folder, read_jsonl
from data_tools.shards import ShardWriterConfig, iter_samples
from data_tools.validate import VIEW_LONG_SIDE, ValidationConfig, check_label

pytestmark = pytest.mark.unit


def convert(records, out: Path, **options) -> dict:
    cfg = ConvertConfig(source="src", progress=False, **options)
    return convert_records(records, ShardWriterConfig(str(out)), cfg)


def stored(out: Path) -> list[dict]:
    return list(iter_samples(sorted(out.glob("*.tar"))))


def stroke_page(dtype, paper, ink) -> np.ndarray:
    values = np.full((32, 48), paper, dtype=dtype)
    values[12:20, 8:40] = ink
    return values


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_sixteen_bit_and_transparent_images_are_stored_with_their_content(tmp_path):
    grey16 = Image.fromarray(stroke_page(np.uint16, 60000, 1000))
    rgba = np.zeros((32, 48, 4), dtype=np.uint8)  # transparent black paper, opaque black stroke
    rgba[12:20, 8:40] = (0, 0, 0, 255)
    files = {
        "g16.png": encoded(grey16, "PNG"),
        "g16.tif": encoded(grey16, "TIFF"),
        "alpha.png": encoded(Image.fromarray(rgba, mode="RGBA"), "PNG"),
        "cmyk.jpg": encoded(Image.fromarray(np.stack([np.zeros((32, 48), np.uint8)] * 3
                                                     + [stroke_page(np.uint8, 0, 255)], -1), "CMYK"), "JPEG"),
    }  # fmt: skip
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "d.csv").write_text("image_file,text_label\n" + "".join(f"{n},text {n}\n" for n in files))
    manifest = convert(read_csv(tmp_path / "d.csv"), tmp_path / "out")
    assert manifest["total_samples"] == 4 and manifest["skipped_total"] == 0
    for sample in stored(tmp_path / "out"):
        assert "png" in sample  # stored as the 8-bit RGB PNG the model sees
        # read back with plain Pillow, as any webdataset consumer would
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")).astype(int)
        assert pixels[12:20, 8:40].max() < 60, sample["json"]["answer"]
        assert pixels[:10].min() > 195 and pixels[22:].min() > 195, sample["json"]["answer"]


@pytest.fixture
def escaping_dataset(tmp_path):
    """A dataset folder with one good image, and an image outside it reached four ways."""
    root, outside = tmp_path / "dataset", tmp_path / "private"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    (root / "img" / "ok.png").write_bytes(png_bytes())
    (outside / "secret.png").write_bytes(png_bytes(30, 20))
    (root / "img" / "link.png").symlink_to(outside / "secret.png")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    refs = ["../private/secret.png", str(outside / "secret.png"), "img/link.png", "dirlink/secret.png"]
    return root, outside, refs


def test_csv_paths_outside_the_dataset_are_counted_skips(escaping_dataset, tmp_path):
    root, outside, refs = escaping_dataset
    (root / "d.csv").write_text(
        "image_file,text_label\nimg/ok.png,good\n" + "".join(f"{r},bad\n" for r in refs)
    )
    manifest = convert(read_csv(root / "d.csv"), tmp_path / "out", max_bad_share=1.0)
    assert manifest["skipped"] == {"outside_root": 4} and manifest["total_samples"] == 1
    rows = [e["source"] for e in manifest["skipped_examples"]["outside_root"]]
    assert rows == [f"{root / 'd.csv'}:{line}" for line in (3, 4, 5, 6)]
    assert "private" in manifest["skipped_examples"]["outside_root"][0]["detail"]
    allowed = convert(read_csv(root / "d.csv", allow_root=outside), tmp_path / "out2")
    assert allowed["skipped_total"] == 0 and allowed["total_samples"] == 5


def test_jsonl_and_folder_paths_outside_the_dataset_are_counted_skips(escaping_dataset, tmp_path):
    root, outside, refs = escaping_dataset
    lines = [{"query": "<image>OCR", "response": "good", "images": ["img/ok.png"]}]
    lines += [{"query": "<image>OCR", "response": "bad", "images": [r]} for r in refs]
    (root / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    manifest = convert(read_jsonl(root / "d.jsonl"), tmp_path / "out", max_bad_share=1.0)
    assert manifest["skipped"] == {"outside_root": 4} and manifest["total_samples"] == 1
    assert convert(read_jsonl(root / "d.jsonl", outside), tmp_path / "out2")["total_samples"] == 5

    (root / "img" / "ok.txt").write_text("good")
    (root / "img" / "link.txt").write_text("label of a linked image")
    (outside / "label.txt").write_text("secret label")
    (root / "img" / "ok2.png").write_bytes(png_bytes(20, 10))
    (root / "img" / "ok2.txt").symlink_to(outside / "label.txt")  # a label leading out
    folder = convert(read_folder(root / "img"), tmp_path / "out3", max_bad_share=1.0)
    assert folder["skipped"] == {"outside_root": 2} and folder["total_samples"] == 1


def test_relative_dataset_roots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("scans/sub").mkdir(parents=True)
    Path("scans/sub/a.png").write_bytes(png_bytes())
    Path("scans/sub/a.txt").write_text("folder label")
    Path("scans/d.csv").write_text("image_file,text_label\nsub/a.png,csv label\n")
    folder = convert(read_folder(Path("scans")), tmp_path / "f")
    rows = convert(read_csv(Path("scans/d.csv")), tmp_path / "c")
    assert folder["total_samples"] == rows["total_samples"] == 1 and folder["skipped_total"] == 0


def test_control_characters_in_labels_are_skips_and_line_ends_normalised():
    cfg = ValidationConfig()
    for bad in ("nul\x00here", "esc\x1b[31m", "del\x7f", "c1\x85", "bell\x07"):
        reject = check_label(bad, cfg)
        assert reject.reason == "control_chars" and "U+" in reject.detail, bad
    assert check_label("a\r\nb\rc\td", cfg) == "a\nb\nc\td"
    assert check_label("zwnj\u200cstays", cfg) == "zwnj\u200cstays"  # a format char Persian needs


def test_csv_with_nul_label_and_nul_prompt(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "d.csv").write_text("image_file,text_label\na.png,fine\na.png,bro\x00ken\n")
    records = read_csv(tmp_path / "d.csv")
    manifest = convert(records, tmp_path / "out", max_bad_share=1.0)
    assert manifest["skipped"] == {"control_chars": 1}
    assert [s["json"]["answer"] for s in stored(tmp_path / "out")] == ["fine"]
    for r in records:
        r.prompt = "<image>\nFree\x00OCR."
    assert convert(records, tmp_path / "out2", max_bad_share=1.0)["skipped"] == {"control_chars": 2}


def test_duplicates_are_counted_and_dropped_on_request(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "copy.png").write_bytes(png_bytes())  # same bytes under another name
    (tmp_path / "d.csv").write_text(
        "image_file,text_label\na.png,same\na.png,same\ncopy.png,same\na.png,other label\n"
    )
    kept = convert(read_csv(tmp_path / "d.csv"), tmp_path / "out")
    assert kept["total_samples"] == 4 and kept["duplicates"]["count"] == 2
    assert [e["same_as"] for e in kept["duplicates"]["examples"]] == [f"{tmp_path / 'd.csv'}:2"] * 2
    dropped = convert(read_csv(tmp_path / "d.csv"), tmp_path / "out2", drop_duplicates=True)
    assert dropped["total_samples"] == 2 and dropped["skipped"] == {"duplicate": 2}
    assert dropped["bad_rows"] == 0  # a duplicate is not bad data


def test_images_without_a_useful_view_in_the_mode_are_skipped(tmp_path):
    for name, size in {"strip.png": (20000, 8), "line.png": (3000, 20), "page.png": (600, 800)}.items():
        Image.new("L", size, 255).save(tmp_path / name)
    (tmp_path / "d.csv").write_text("image_file,text_label\nstrip.png,a\nline.png,b\npage.png,c\n")
    base = convert(read_csv(tmp_path / "d.csv"), tmp_path / "b", max_bad_share=1.0)
    assert base["skipped"] == {"unusable_aspect": 2}
    assert "0.4 px" in base["skipped_examples"]["unusable_aspect"][0]["detail"]
    # Gundam tiles the long side (up to 9 x 640 px): the 3000 x 20 line keeps 38 px there
    gundam = convert(read_csv(tmp_path / "d.csv"), tmp_path / "g", mode="gundam", max_bad_share=1.0)
    assert gundam["skipped"] == {"unusable_aspect": 1} and gundam["total_samples"] == 2
    loose = convert(
        read_csv(tmp_path / "d.csv"), tmp_path / "l", validation=ValidationConfig(min_view_side=4)
    )
    assert (
        loose["skipped"] == {"unusable_aspect": 1} and loose["total_samples"] == 2
    )  # the limit is an option


def test_view_sides_match_the_pipeline_modes():
    from pipeline.processing import get_mode

    for name, side in VIEW_LONG_SIDE.items():
        spec = get_mode(name)
        assert side == (spec.image_size * 9 if spec.crop else spec.base_size), name


def run_cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_cli_report_lists_rows_per_reason_and_fails_over_the_bad_share(escaping_dataset, tmp_path, capsys):
    root, outside, refs = escaping_dataset
    rows = ["img/ok.png,good"] * 3 + [f"{refs[0]},x", "missing.png,y", "img/ok.png,nul\x00"]
    (root / "d.csv").write_text("image_file,text_label\n" + "\n".join(rows) + "\n")
    base = ["convert-csv", str(root / "d.csv"), "--no-progress"]
    code, out, err = run_cli([*base, "--out", str(tmp_path / "o1")], capsys)
    assert code == 1 and "3 of 6 rows (50.0%) are bad" in err
    csv = root / "d.csv"
    assert f"outside_root (1): {csv}:5" in out and f"missing_file (1): {csv}:6" in out
    assert f"control_chars (1): {csv}:7" in out
    assert f"duplicates 2, kept (--drop-duplicates drops them): {csv}:3 = {csv}:2" in out
    report = json.loads((tmp_path / "o1" / "manifest.json").read_text())
    assert report["bad_rows"] == 3 and report["rows"] == 6 and report["bad_share_exceeded"] is True
    assert f"report: {tmp_path / 'o1' / 'manifest.json'}" in out

    code, out, _ = run_cli([*base, "--out", str(tmp_path / "o2"), "--max-bad-share", "0.5"], capsys)
    assert code == 0
    code, out, _ = run_cli([*base, "--out", str(tmp_path / "o3"), "--allow-root", str(outside),
                            "--drop-duplicates", "--max-bad-share", "0.4"], capsys)  # fmt: skip
    assert code == 0 and "outside_root" not in out and "duplicate (2)" in out
    assert json.loads((tmp_path / "o3" / "manifest.json").read_text())["total_samples"] == 2
