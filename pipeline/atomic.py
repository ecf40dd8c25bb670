"""Atomic checkpoint directories with a manifest: the one writer and completeness check of every trainer.

A checkpoint directory is written beside its final name (`.tmp-<name>`), closed with
`manifest.json` (every file's relative path and size), fsynced, then swapped in:

    1. rename an existing `<name>` (a re-save of the same step) to `.old-<name>`
    2. rename `.tmp-<name>` to `<name>`
    3. delete `.old-<name>`

A kill at any point leaves every other checkpoint untouched and `<name>` either absent, the
old complete one, or the new complete one. Only directories whose manifest lists files that all
exist with their recorded sizes count as complete (`incomplete_reason`); readers take the newest
complete one and log each newer one they skipped. Multi-rank writers share one staging
directory: rank 0 calls `begin`, every rank writes into it, then rank 0 calls `commit`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_TMP, _OLD = ".tmp-", ".old-"


def staging_dir(final: Path) -> Path:
    return final.parent / f"{_TMP}{final.name}"


def begin(final: Path) -> Path:
    """A fresh, empty staging directory beside `final` (leftovers of a killed save are removed)."""
    tmp = staging_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _files(directory: Path) -> dict[str, int]:
    return {
        str(f.relative_to(directory)): f.stat().st_size
        for f in sorted(directory.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }


def _fsync_tree(directory: Path) -> None:
    for f in directory.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())


def write_manifest(directory: Path) -> None:
    """List every file of `directory` with its size; the manifest is written last, so its
    presence alone says nothing: `incomplete_reason` checks each listed file."""
    (directory / MANIFEST).write_text(json.dumps({"files": _files(directory)}, indent=1, sort_keys=True))


def commit(tmp: Path, final: Path) -> Path:
    """Close the staging directory `tmp` with its manifest and swap it in as `final`."""
    write_manifest(tmp)
    _fsync_tree(tmp)
    old = final.parent / f"{_OLD}{final.name}"
    if final.exists():  # a re-save: keep the old one complete until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def write_atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a fresh staging directory, which is then committed as `final`."""
    tmp = begin(final)
    write(tmp)
    return commit(tmp, final)


def incomplete_reason(directory: Path) -> str | None:
    """None for a complete directory, else why it is not (missing manifest, missing or short file)."""
    manifest = directory / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the save was interrupted)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST}: {err}"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest records {size}"
    return None


def newest_complete(candidates: list[Path]) -> Path | None:
    """The last complete directory of `candidates` (oldest first); logs each newer one skipped."""
    for candidate in reversed(candidates):
        reason = incomplete_reason(candidate)
        if reason is None:
            return candidate
        log.warning("skipping incomplete checkpoint %s: %s", candidate, reason)
    return None


def remove_stale(root: Path) -> None:
    """Delete staging and swapped-out leftovers of killed saves under `root`."""
    for stale in [*root.glob(f"{_TMP}*"), *root.glob(f"{_OLD}*")]:
        shutil.rmtree(stale, ignore_errors=True)
