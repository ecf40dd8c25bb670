"""ShardWriter: count/size bounds, manifest checksums, webdataset read-back, atomic finalisation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds

from data_tools.shards import (
    MANIFEST_NAME,
    Sample,
    ShardWriter,
    ShardWriterConfig,
    file_sha256,
    iter_samples,
)

pytestmark = pytest.mark.unit


def _samples(n: int, payload: int = 1000) -> list[Sample]:
    out = []
    for i in range(n):
        meta = {"prompt": "<image>\nFree OCR.", "answer": f"text {i}", "source": "t", "lang": "en"}
        if i % 3 == 2:  # every third sample is text-only
            out.append(Sample(f"s-{i:05d}", {"text": f"doc {i}", "source": "t", "lang": "en"}))
        else:
            out.append(Sample(f"s-{i:05d}", meta, bytes([i % 256]) * payload, "png"))
    return out


def test_count_bound_manifest_and_webdataset_readback(tmp_path):
    cfg = ShardWriterConfig(str(tmp_path), prefix="x", max_count=4)
    with ShardWriter(cfg) as w:
        for s in _samples(10):
            w.write(s)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["total_samples"] == 10
    for s in manifest["shards"]:
        p = tmp_path / s["name"]
        assert p.stat().st_size == s["bytes"] and file_sha256(p) == s["sha256"]
    assert manifest["total_bytes"] == sum(p.stat().st_size for p in tmp_path.glob("*.tar"))
    assert not list(tmp_path.glob("*.tmp"))

    urls = [str(tmp_path / s["name"]) for s in manifest["shards"]]
    got = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        got[sample["__key__"]] = (meta, sample.get("png"))
    assert sorted(got) == [f"s-{i:05d}" for i in range(10)]
    assert got["s-00000"][1] == bytes([0]) * 1000
    assert got["s-00002"][1] is None and got["s-00002"][0]["text"] == "doc 2"
    # our own reader agrees with webdataset
    mine = {s["__key__"]: s.get("png") for s in iter_samples(urls)}
    assert mine == {k: v[1] for k, v in got.items()}


def test_size_bound(tmp_path):
    # each image sample: 512 header + 5120 payload, json member 512 + 512 -> 6656 bytes
    cfg = ShardWriterConfig(str(tmp_path), prefix="x", max_count=1000, max_bytes=3 * 6656)
    with ShardWriter(cfg) as w:
        for i in range(7):
            w.write(Sample(f"k{i}", {"answer": "a"}, b"z" * 5120, "png"))
    counts = [s.count for s in w.shards]
    assert counts == [3, 3, 1]
    for s in w.shards:  # members + 2 end blocks, padded to tar's 10 KiB record size
        assert s.bytes == -(-(s.count * 6656 + 1024) // 10240) * 10240


def test_refuses_existing_output_and_overwrite_removes_stale(tmp_path):
    with ShardWriter(ShardWriterConfig(str(tmp_path), prefix="x")) as w:
        w.write(_samples(1)[0])
    with pytest.raises(ValueError, match="overwrite"):
        ShardWriter(ShardWriterConfig(str(tmp_path), prefix="x"))
    (tmp_path / "x-000007.tar.tmp").write_bytes(b"partial")
    with ShardWriter(ShardWriterConfig(str(tmp_path), prefix="x", overwrite=True)) as w:
        w.write(_samples(2)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "x-000000.tar"]


def test_exception_leaves_no_partial_shard(tmp_path):
    with (
        pytest.raises(RuntimeError),
        ShardWriter(ShardWriterConfig(str(tmp_path), prefix="x", max_count=2)) as w,
    ):
        for s in _samples(3):
            w.write(s)
        raise RuntimeError("boom")
    # the full first shard is finalised; the open one is dropped; no manifest marks completion
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000000.tar"]


_KILL_SCRIPT = """
import sys, time
from data_tools.shards import Sample, ShardWriter, ShardWriterConfig
w = ShardWriter(ShardWriterConfig(sys.argv[1], prefix="k", max_count=3))
for i in range(10_000):
    w.write(Sample(f"s{i}", {"answer": str(i)}, b"x" * 2000, "png"))
    if i == 4:
        print("ready", flush=True)
    time.sleep(0.002)
"""


def test_killed_conversion_leaves_only_complete_shards(tmp_path):
    """SIGKILL mid-run: every .tar present is complete (full count, valid tar), the rest is .tmp."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tars = sorted(tmp_path.glob("*.tar"))
    assert tars, "at least one shard was finalised before the kill"
    assert not (tmp_path / MANIFEST_NAME).exists()
    for t in tars:
        with tarfile.open(t) as tf:
            names = tf.getnames()
        assert len(names) == 6  # 3 samples x (png + json)
    assert len(list(tmp_path.glob("*.tar.tmp"))) <= 1


def test_sample_validation():
    with pytest.raises(ValueError, match="key"):
        Sample("a.b", {})
    with pytest.raises(ValueError, match="image_ext"):
        Sample("a", {}, b"x", "gif")
    with pytest.raises(ValueError, match="together"):
        Sample("a", {}, b"x", None)
    with pytest.raises(ValueError, match="max_count"):
        ShardWriterConfig("/tmp", max_count=0)
