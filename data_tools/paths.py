"""Paths named inside data files (CSV `image_file`, JSONL `images`, eval sets) stay inside the dataset.

A dataset file is input like any other: a row with `../../home/user/id.png` or `/etc/...` must
not make a converter or an evaluation read a file outside the dataset. `resolve_inside` resolves
a path (relative ones against the dataset root), follows symlinks, and accepts it only when the
real path lies under the root, or under `allow_root` when the user names a wider folder explicitly
(the converters' and `dsocr-eval`'s `--allow-root`). Callers turn the error into a counted, logged
skip (`outside_root`).
"""

from __future__ import annotations

import os
from pathlib import Path


class OutsideRootError(ValueError):
    """A path from a data file resolves outside the allowed root."""


def resolve_inside(root: str | Path, value: str | Path, allow_root: str | Path | None = None) -> Path:
    """`value` (relative to `root`, or absolute) as a real path under `root` or `allow_root`.

    Symlinks are followed before the check, so a link inside the dataset pointing out of it is
    refused too. Raises OutsideRootError naming the value, where it leads and the allowed roots.
    """
    text = os.fspath(value)
    if "\x00" in text:
        raise OutsideRootError(f"path {text!r} contains a NUL character")
    allowed = [Path(root).resolve()] + ([] if allow_root is None else [Path(allow_root).resolve()])
    real = (Path(root) / text).resolve()  # an absolute `text` replaces `root`
    if not any(real == folder or folder in real.parents for folder in allowed):
        raise OutsideRootError(
            f"path {text!r} resolves to {real}, outside the dataset root "
            f"{' and '.join(str(f) for f in allowed)} "
            "(pass --allow-root with a folder that contains it to read it anyway)"
        )
    return real
