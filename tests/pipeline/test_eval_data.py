"""Eval-set readers: JSONL, CSV, webdataset shards; strict errors; lazy image decoding."""

import io
import json

import pytest
from PIL import Image

from pipeline.data.testing import png_bytes, sample_members, write_tar
from pipeline.eval.data import EvalSample, TarMember, read_eval_set, references_of

pytestmark = pytest.mark.unit


def test_jsonl_and_csv(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes(32, 24, seed=1))
    rows = [
        {"key": "a", "image": "img/a.png", "answer": "alpha"},
        {"key": "b", "image": "missing.png", "text": "beta"},
    ]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    samples = read_eval_set(tmp_path / "set.jsonl")
    assert references_of(samples) == {"a": "alpha", "b": "beta"}
    assert samples[0].load_image().size == (32, 24)
    with pytest.raises(ValueError, match="missing.png"):
        samples[1].load_image()
    (tmp_path / "set.csv").write_text("key,image,answer\na,img/a.png,alpha\nc,,gamma\n")
    csv_samples = read_eval_set(tmp_path / "set.csv")
    assert [(s.key, s.reference) for s in csv_samples] == [("a", "alpha"), ("c", "gamma")]
    assert csv_samples[1].image is None
    assert read_eval_set(tmp_path / "set.csv", limit=1)[0].key == "a"


def test_shards(tmp_path):
    write_tar(
        tmp_path / "s-000.tar",
        sample_members("p0", "first page", png_bytes(40, 30, seed=0))
        + sample_members("p1", "second", b"not a png"),
    )
    write_tar(tmp_path / "s-001.tar", sample_members("p2", "third", None))
    for spec in (tmp_path, str(tmp_path / "s-*.tar"), str(tmp_path / "s-{000..001}.tar")):
        samples = read_eval_set(spec)
        assert [s.key for s in samples] == ["p0", "p1", "p2"]
    p0, p1, p2 = samples
    assert isinstance(p0.image, TarMember) and p0.load_image().size == (40, 30)
    assert p0.image_bytes() == png_bytes(40, 30, seed=0)
    with pytest.raises(ValueError, match="p1"):
        p1.load_image()
    with pytest.raises(ValueError, match="no image"):
        p2.load_image()


def test_strict_errors(tmp_path):
    write_tar(
        tmp_path / "dup.tar", sample_members("k", "x") + sample_members("k2", "y") + sample_members("k", "z")
    )
    with pytest.raises(ValueError, match="duplicate key 'k'"):
        read_eval_set(tmp_path / "dup.tar")
    write_tar(tmp_path / "empty_ref.tar", sample_members("k", "  "))
    with pytest.raises(ValueError, match="empty reference"):
        read_eval_set(tmp_path / "empty_ref.tar")
    (tmp_path / "bad.jsonl").write_text('{"key": "a", "answer": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_eval_set(tmp_path / "bad.jsonl")
    (tmp_path / "nokey.jsonl").write_text('{"answer": "x"}\n')
    with pytest.raises(ValueError, match="key"):
        read_eval_set(tmp_path / "nokey.jsonl")
    with pytest.raises(ValueError, match="missing or empty reference"):
        read_eval_set(tmp_path / "bad.jsonl", reference_field="caption")
    with pytest.raises(ValueError, match="could not be read"):
        read_eval_set(tmp_path / "absent.tar")
    with pytest.raises(ValueError, match="expected a .jsonl"):
        read_eval_set(tmp_path / "set.parquet")


def test_in_memory_image():
    image = Image.new("L", (20, 10), 200)
    sample = EvalSample("m", "text", image)
    loaded = sample.load_image()
    assert loaded.mode == "RGB" and loaded.getpixel((3, 3)) == (200, 200, 200)
    with Image.open(io.BytesIO(sample.image_bytes())) as png:
        assert png.format == "PNG" and png.size == (20, 10)
    with pytest.raises(ValueError, match="max_pixels"):
        sample.load_image(max_pixels=100)


def test_image_paths_outside_the_set_folder_are_refused_unless_allowed(tmp_path):
    root, outside = tmp_path / "set", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "in.png").write_bytes(png_bytes(32, 24, seed=1))
    (outside / "secret.png").write_bytes(png_bytes(20, 10, seed=2))
    (root / "link.png").symlink_to(outside / "secret.png")
    rows = [
        {"key": "inside", "image": "in.png", "answer": "a"},
        {"key": "dotdot", "image": "../elsewhere/secret.png", "answer": "b"},
        {"key": "absolute", "image": str(outside / "secret.png"), "answer": "c"},
        {"key": "symlink", "image": "link.png", "answer": "d"},
    ]
    (root / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = {s.key: s for s in read_eval_set(root / "set.jsonl")}
    assert len(samples) == 4  # refused pages stay in the set: they fail, and the report counts them
    assert samples["inside"].load_image().size == (32, 24)
    for key in ("dotdot", "absolute", "symlink"):
        with pytest.raises(ValueError, match="outside the dataset root"):
            samples[key].load_image()
        with pytest.raises(ValueError, match="outside the dataset root"):
            samples[key].image_bytes()
    allowed = {s.key: s for s in read_eval_set(root / "set.jsonl", allow_root=outside)}
    assert all(allowed[k].load_image().size == (20, 10) for k in ("dotdot", "absolute", "symlink"))
    (root / "set.csv").write_text("key,image,answer\nx,../elsewhere/secret.png,b\n")
    with pytest.raises(ValueError, match="outside the dataset root"):
        read_eval_set(root / "set.csv")[0].load_image()


def test_in_memory_sixteen_bit_image_keeps_its_content():
    import numpy as np

    values = np.full((8, 12), 60000, dtype=np.uint16)
    values[2:4] = 500
    page = EvalSample("k", "ref", Image.fromarray(values)).load_image()
    assert page.getpixel((0, 0)) == (233, 233, 233) and page.getpixel((0, 2)) == (2, 2, 2)
