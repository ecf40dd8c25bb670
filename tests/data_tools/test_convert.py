"""Converters: every kind of bad input is counted and skipped, every valid sample comes through once."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from dt_images import noise_png, png_bytes
from PIL import Image

from data_tools.convert import (
    ConvertConfig,
    chunk_text,
    convert_records,
    read_csv,
    read_folder,
    read_jsonl,
    read_text_files,
)
from data_tools.shards import ShardWriterConfig, iter_samples
from data_tools.validate import ValidationConfig

pytestmark = pytest.mark.unit

VAL = ValidationConfig(max_label_chars=50, max_pixels=100_000)


def _convert(records, out: Path, source="src", workers=0, total=None):
    cfg = ConvertConfig(
        source=source, lang="fa", mode="gundam", validation=VAL, workers=workers, progress=False
    )
    return convert_records(records, ShardWriterConfig(str(out), max_count=3), cfg, total=total)


def _read_back(out: Path) -> dict[str, dict]:
    """key -> sample, read with webdataset; asserts no key appears twice."""
    urls = sorted(str(p) for p in out.glob("*.tar"))
    got: dict[str, dict] = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert s["__key__"] not in got
        s["json"] = json.loads(s["json"])
        got[s["__key__"]] = s
    return got


def _write_csv(tmp_path: Path, bad_files: Path) -> Path:
    (tmp_path / "ok1.png").write_bytes(png_bytes())
    (tmp_path / "ok2.jpg").write_bytes(png_bytes(fmt="JPEG"))
    (tmp_path / "ok3.bmp").write_bytes(png_bytes(fmt="BMP"))
    (tmp_path / "ok4.png").write_bytes(noise_png())
    rows = [
        b"image_file,text_label",
        b"ok1.png,\xd8\xb3\xd9\x84\xd8\xa7\xd9\x85",  # Persian text, valid
        b"ok2.jpg,  hello world  ",
        b"ok3.bmp,bitmap",
        b'ok4.png,"line one\nline two, with comma"',
        b"missing.png,gone",
        b"img/truncated.png,trunc",
        b"img/notimage.png,bytes",
        b"img/empty.png,empty file",
        b"img/huge.png,too big",
        b"ok1.png,",
        b"ok1.png,   ",
        b"ok1.png,bad \xff\xfe utf8",
        b"ok1.png," + b"x" * 51,
        b",no image path",
    ]
    path = tmp_path / "data.csv"
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def test_csv_all_bad_inputs_counted_valid_exactly_once(tmp_path, bad_files):
    out = tmp_path / "out"
    records = read_csv(_write_csv(tmp_path, bad_files))
    manifest = _convert(records, out, total=len(records))
    assert manifest["skipped"] == {
        "corrupt_image": 1,
        "empty_label": 2,
        "invalid_utf8": 1,
        "label_too_long": 1,
        "missing_file": 2,
        "not_an_image": 2,
        "too_many_pixels": 1,
    }
    got = _read_back(out)
    answers = {k: s["json"]["answer"] for k, s in got.items()}
    assert answers == {
        "src-000000000": "سلام",
        "src-000000001": "hello world",
        "src-000000002": "bitmap",
        "src-000000003": "line one\nline two, with comma",
    }
    assert manifest["total_samples"] == 4 and [s["count"] for s in manifest["shards"]] == [3, 1]
    # PNG and JPEG are stored byte for byte; BMP is re-encoded to PNG with the same pixels
    assert got["src-000000000"]["png"] == (tmp_path / "ok1.png").read_bytes()
    assert got["src-000000001"]["jpg"] == (tmp_path / "ok2.jpg").read_bytes()
    bmp = Image.open(io.BytesIO(got["src-000000002"]["png"]))
    assert bmp.format == "PNG"
    assert np.array_equal(np.asarray(bmp), np.asarray(Image.open(tmp_path / "ok3.bmp")))
    meta = got["src-000000000"]["json"]
    assert meta["lang"] == "fa" and meta["mode"] == "gundam" and meta["source"] == "src"
    assert (meta["width"], meta["height"]) == (24, 16) and "prompt" not in meta


def test_csv_missing_column_is_a_clear_error(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("path,label\na.png,b\n")
    with pytest.raises(ValueError, match="image_file"):
        read_csv(p)
    assert len(read_csv(p, image_column="path", text_column="label")) == 1


def test_jsonl_both_styles_and_bad_lines(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    lines = [
        {
            "messages": [
                {"role": "user", "content": "<image>Free OCR."},
                {"role": "assistant", "content": "alpha"},
            ],
            "images": ["a.png"],
        },  # fmt: skip
        {"query": "Read it", "response": "beta", "images": ["a.png"]},
        {
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "text only"},
            ]
        },  # fmt: skip
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "OCR:"}]},
                {"role": "assistant", "content": "gamma"},
            ],
            "images": [{"path": "a.png"}],
        },  # fmt: skip
        {"messages": [{"role": "user", "content": "x"}]},  # no assistant
        {"query": "q", "response": "r", "images": ["a.png", "a.png"]},  # two images
        {"query": "q", "response": "r", "images": ["https://example.invalid/x.png"]},
        {"query": "<image><image>", "response": "r", "images": ["a.png"]},  # two tags, one image
        {"query": "q", "response": "lone \ud800 surrogate", "images": ["a.png"]},
        {"query": "q", "response": "  ", "images": ["a.png"]},
        {"other": 1},
    ]
    raw = [json.dumps(obj).encode() for obj in lines]
    raw.insert(2, b"{not json")
    raw.insert(3, b'{"query": "q", "response": "\xff"}')
    raw.insert(4, b"   ")  # blank lines are ignored, not counted
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(raw))
    manifest = _convert(read_jsonl(path), tmp_path / "out")
    assert manifest["skipped"] == {
        "bad_prompt": 1,
        "bad_record": 4,
        "empty_label": 1,
        "invalid_utf8": 2,
        "unsupported_image_ref": 1,
    }
    got = _read_back(tmp_path / "out")
    metas = {s["json"]["answer"]: (s["json"].get("prompt"), "png" in s) for s in got.values()}
    assert metas == {
        "alpha": ("<image>Free OCR.", True),
        "beta": ("<image>\nRead it", True),
        "text only": ("hi", False),
        "gamma": ("<image>OCR:", True),
    }


def test_folder_with_sidecars(tmp_path, bad_files):
    root = tmp_path / "scans"
    (root / "sub").mkdir(parents=True)
    (root / "p1.png").write_bytes(png_bytes())
    (root / "p1.txt").write_text("first page\n")
    (root / "sub" / "p2.webp").write_bytes(png_bytes(fmt="WEBP"))
    (root / "sub" / "p2.txt").write_text("second")
    (root / "nolabel.png").write_bytes(png_bytes())
    (root / "orphan.txt").write_text("no image")
    (root / "broken.png").write_bytes(b"GIF89a garbage")
    (root / "broken.txt").write_text("label")
    (root / "badutf.png").write_bytes(png_bytes())
    (root / "badutf.txt").write_bytes(b"\xc3\x28")
    manifest = _convert(read_folder(root), tmp_path / "out")
    assert manifest["skipped"] == {"missing_file": 2, "not_an_image": 1, "invalid_utf8": 1}
    got = _read_back(tmp_path / "out")
    assert sorted(s["json"]["answer"] for s in got.values()) == ["first page", "second"]
    assert sum("webp" in s for s in got.values()) == 1


def test_text_files_split_modes_and_chunking(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("para one line\nstill one\n\n\npara two\n\n  \n")
    b = tmp_path / "b.txt"
    b.write_bytes(b"bad \xff bytes")
    c = tmp_path / "c.txt"
    c.write_text("   \n")
    recs = list(read_text_files([a, b, c, tmp_path / "missing.txt"], split="paragraph"))
    manifest = _convert(recs, tmp_path / "out")
    assert manifest["skipped"] == {"empty_label": 1, "invalid_utf8": 1, "missing_file": 1}
    got = _read_back(tmp_path / "out")
    texts = sorted(s["json"]["text"] for s in got.values())
    assert texts == ["para one line\nstill one", "para two"]
    assert all(set(s) >= {"json"} and not any(k in s for k in ("png", "jpg")) for s in got.values())
    # whole-file mode chunks a long document at paragraph boundaries under the limit
    long = "\n\n".join(f"paragraph number {i} " + "w" * 10 for i in range(8))
    pieces = chunk_text(long, 50)
    assert all(len(p) <= 50 for p in pieces) and "\n\n".join(pieces) == long


def test_chunk_text_hard_split_keeps_every_character():
    text = "a" * 25 + " " + "b" * 7
    pieces = chunk_text(text, 10)
    assert all(len(p) <= 10 for p in pieces)
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")


def test_workers_give_identical_shards(tmp_path, bad_files):
    csv_path = _write_csv(tmp_path, bad_files)
    m0 = _convert(read_csv(csv_path), tmp_path / "w0")
    m2 = _convert(read_csv(csv_path), tmp_path / "w2", workers=2)
    assert [s["sha256"] for s in m0["shards"]] == [s["sha256"] for s in m2["shards"]]
    assert m0["skipped"] == m2["skipped"]


def test_iter_samples_matches_webdataset(tmp_path, bad_files):
    _convert(read_csv(_write_csv(tmp_path, bad_files)), tmp_path / "out")
    ours = {s["__key__"]: s["json"] for s in iter_samples(sorted((tmp_path / "out").glob("*.tar")))}
    theirs = {k: s["json"] for k, s in _read_back(tmp_path / "out").items()}
    assert ours == theirs
