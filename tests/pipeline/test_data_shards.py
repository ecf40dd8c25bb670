"""Shard discovery and tar indexing of the streaming loader (pipeline/data/shards.py)."""

import os

import pytest

from pipeline.data.shards import (
    ShardReadError,
    SkipCounter,
    expand_shards,
    index_shard,
    read_files,
    split_key,
)
from pipeline.data.testing import write_tar

pytestmark = pytest.mark.unit


def test_expand_shards_braces_globs_and_literals(tmp_path):
    for name in ("a-000.tar", "a-001.tar", "a-002.tar", "b-000.tar"):
        (tmp_path / name).write_bytes(b"")
    got = expand_shards([f"{tmp_path}/a-{{000..001}}.tar", f"{tmp_path}/b-*.tar", f"{tmp_path}/a-000.tar"])
    assert got == [f"{tmp_path}/{n}" for n in ("a-000.tar", "a-001.tar", "b-000.tar")]
    # a literal missing file is kept (counted later as missing_shard); an empty glob is a config error
    assert expand_shards(f"{tmp_path}/missing.tar") == [f"{tmp_path}/missing.tar"]
    with pytest.raises(ValueError, match="matches no file"):
        expand_shards(f"{tmp_path}/c-*.tar")
    with pytest.raises(ValueError, match="compressed"):
        expand_shards(f"{tmp_path}/a.tar.gz")


def test_split_key_follows_webdataset_convention():
    assert split_key("dir/k001.png") == ("dir/k001", "png")
    assert split_key("k001.seg.PNG") == ("k001", "seg.png")
    assert split_key("README") is None


def test_index_groups_consecutive_members_and_reads_payloads(tmp_path):
    members = [("a.png", b"PNG-A"), ("a.json", b"{}"), ("sub/b.json", b'{"x":1}'), ("c.seg.txt", b"t")]
    path = write_tar(tmp_path / "s.tar", members)
    skips = SkipCounter()
    entries = index_shard(str(path), skips)
    assert [(e.key, sorted(e.files)) for e in entries] == [
        ("a", ["json", "png"]),
        ("sub/b", ["json"]),
        ("c", ["seg.txt"]),
    ]
    assert read_files(str(path), entries[0].files) == {"png": b"PNG-A", "json": b"{}"}
    assert read_files(str(path), entries[1].files) == {"json": b'{"x":1}'}
    assert skips.as_dict() == {}


def test_missing_bad_and_truncated_shards_are_counted(tmp_path):
    skips = SkipCounter()
    assert index_shard(str(tmp_path / "nope.tar"), skips) == []
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 5)
    assert index_shard(str(tmp_path / "junk.tar"), skips) == []
    members = [(f"k{i}.{ext}", bytes([i]) * 3000) for i in range(4) for ext in ("png", "json")]
    full = write_tar(tmp_path / "full.tar", members)
    data = full.read_bytes()
    # cut inside the payload of k2.png: each member is 512 header + 3072 data bytes
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 4 * 3584 + 512 + 1000])
    entries = index_shard(str(cut), skips)
    assert [e.key for e in entries] == ["k0", "k1", "k2"]
    assert read_files(str(cut), entries[1].files)["png"] == bytes([1]) * 3000
    with pytest.raises(ShardReadError, match="truncated"):
        read_files(str(cut), entries[2].files)
    assert skips.as_dict() == {"bad_shard": 1, "missing_shard": 1, "truncated_shard": 1}
    assert os.path.getsize(full) > os.path.getsize(cut)
