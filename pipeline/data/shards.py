"""Shard discovery, tar indexing and random-access sample reads for the streaming loader.

Shards are uncompressed webdataset tars (data_tools/README.md): members `<key>.<ext>`
grouped into one sample per run of consecutive members sharing a key, with the key
taken up to the first dot of the basename (webdataset's `base_plus_ext` convention).

Instead of streaming a tar front to back (webdataset), a shard is *indexed*: its
headers are scanned once (tarfile seeks over the payloads) into a list of
`SampleEntry(key, {ext: (offset, size)})`. A sample is then one `seek` + `read` per
file. This is what makes the loader's position exactly resumable and lets the
sample order inside a shard be a seeded permutation rather than a shuffle buffer
whose contents cannot be checkpointed (see `pipeline.data.stream`).

Bad input is never fatal here: a missing or unreadable shard and a truncated tar
(the entries before the damage are kept) are counted in a `SkipCounter` and logged
with the shard path.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from collections import Counter
from typing import NamedTuple

from braceexpand import braceexpand

log = logging.getLogger(__name__)

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # "dir/k.seg.png" -> ("dir/k", "seg.png")
_GLOB_CHARS = re.compile(r"[*?\[]")


class SampleEntry(NamedTuple):
    """One sample of a shard: its key and, per extension, (payload offset, payload size)."""

    key: str
    files: dict[str, tuple[int, int]]


class ShardReadError(Exception):
    """A sample's bytes could not be read (short read: the tar is truncated inside a payload)."""


class SkipCounter:
    """Counts skipped inputs by reason, each bad sample (or shard) once, and logs each with its
    shard and key the first time it is met.

    An endless stream meets the same bad sample once per epoch: `counts` holds the encounters,
    `unique` the distinct (reason, shard, key) seen, and `as_dict()` the number of distinct bad
    inputs per reason. `state()` is plain data, so the counts travel in a loader state_dict and
    merge across DataLoader workers and data-parallel ranks (`merge_skip_states`).
    """

    def __init__(self, state: dict | None = None) -> None:
        state = state or {}
        self.counts: Counter[str] = Counter(state.get("encounters", {}))
        self.unique: set[tuple[str, str, str]] = {tuple(u) for u in state.get("unique", [])}

    def skip(self, reason: str, shard: str, key: str = "", detail: str = "") -> None:
        self.counts[reason] += 1
        ident = (reason, shard, key)
        if ident in self.unique:
            return
        self.unique.add(ident)
        where = f"shard={shard}" + (f" key={key}" if key else "")
        log.warning("skipped sample (%s): %s%s", reason, where, f": {detail}" if detail else "")

    def as_dict(self) -> dict[str, int]:
        """Distinct bad inputs per reason."""
        return dict(sorted(Counter(reason for reason, _, _ in self.unique).items()))

    def encounters(self) -> dict[str, int]:
        """Every time a bad input was met, per reason (>= as_dict() once epochs repeat)."""
        return dict(sorted(self.counts.items()))

    def state(self) -> dict:
        return {"encounters": self.encounters(), "unique": sorted(list(u) for u in self.unique)}


def merge_skip_states(states: list[dict]) -> SkipCounter:
    """One counter over several consumers' `SkipCounter.state()`s (a shard every consumer opens
    counts once)."""
    total = SkipCounter()
    for state in states:
        total.counts.update(state.get("encounters", {}))
        total.unique.update(tuple(u) for u in state.get("unique", []))
    return total


def _directory_shards(folder: str) -> list[str]:
    """The shards of a directory: its manifest.json's list, else its *.tar files."""
    manifest = os.path.join(folder, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            names = [s["name"] for s in json.load(f).get("shards", [])]
    else:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".tar"))
    if not names:
        raise ValueError(f"shard directory {folder!r} holds no shard (no .tar, or a manifest listing none)")
    return [os.path.join(folder, n) for n in names]


def expand_shards(patterns: str | list[str] | tuple[str, ...]) -> list[str]:
    """Expand brace patterns (`data-{000..099}.tar`) and globs into a sorted list of paths.

    A directory stands for its shards: those its `manifest.json` lists (what `dsocr-data
    convert` wrote), else every `*.tar` in it. A literal path is kept even if it does not
    exist (the reader counts it as a missing shard, so one deleted file does not stop a
    run); a glob that matches nothing is a configuration error.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    paths: set[str] = set()
    for pattern in patterns:
        for expanded in braceexpand(pattern):
            expanded = os.path.expanduser(expanded)
            if os.path.isdir(expanded):
                paths.update(_directory_shards(expanded))
            elif _GLOB_CHARS.search(expanded):
                matches = glob.glob(expanded)
                if not matches:
                    raise ValueError(f"shard pattern {expanded!r} (from {pattern!r}) matches no file")
                paths.update(matches)
            else:
                paths.add(expanded)
    if not paths:
        raise ValueError(f"shard patterns {patterns!r} expand to no path")
    for path in paths:
        if path.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")):
            raise ValueError(f"shard {path!r} is compressed; the loader reads uncompressed .tar shards")
    return sorted(paths)


def split_key(name: str) -> tuple[str, str] | None:
    """`dir/k.seg.png` -> (`dir/k`, `seg.png`); None for names without an extension."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def index_shard(path: str, skips: SkipCounter) -> list[SampleEntry]:
    """Scan the tar headers of `path` into sample entries (in file order).

    A missing/unreadable shard yields [] and counts `missing_shard`/`bad_shard`; a
    truncated tar keeps the entries read before the damage and counts `truncated_shard`.
    """
    entries: list[SampleEntry] = []
    try:
        tar = tarfile.open(path, mode="r:")  # noqa: SIM115 (closed by the `with` below)
    except FileNotFoundError:
        skips.skip("missing_shard", path)
        return entries
    except (OSError, tarfile.TarError) as err:
        skips.skip("bad_shard", path, detail=repr(err))
        return entries
    with tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_key(member.name)
                if parts is None:
                    continue
                key, ext = parts
                if not entries or entries[-1].key != key or ext in entries[-1].files:
                    entries.append(SampleEntry(key, {}))
                entries[-1].files[ext] = (member.offset_data, member.size)
        except (OSError, tarfile.TarError) as err:
            skips.skip("truncated_shard", path, detail=f"{err!r} after {len(entries)} samples")
    return entries


def read_files(path: str, files: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """Read the payloads of one sample; ShardReadError if the shard ends inside one."""
    out: dict[str, bytes] = {}
    try:
        with open(path, "rb") as handle:
            for ext, (offset, size) in files.items():
                handle.seek(offset)
                data = handle.read(size)
                if len(data) != size:
                    raise ShardReadError(f"{ext}: read {len(data)} of {size} bytes (truncated shard)")
                out[ext] = data
    except OSError as err:
        raise ShardReadError(repr(err)) from err
    return out
