"""Small synthetic webdataset shards for the data-path tests and `bench/bench_data.py`.

Writes uncompressed tars in the layout of data_tools/README.md (`<key>.png` +
`<key>.json` {prompt?, answer, source, lang, mode?}; text-only samples: json only)
with Python's tarfile, plus helpers to make deliberately broken members. Not a
converter: real corpora come from data_tools.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def png_bytes(width: int, height: int, seed: int = 0, *, text: str = "", fmt: str = "PNG") -> bytes:
    """A page-like image: light noisy background, dark bars as 'lines', optional drawn text."""
    rng = np.random.default_rng(seed)
    page = np.full((height, width, 3), 245, dtype=np.uint8)
    page -= rng.integers(0, 12, size=(height, width, 1), dtype=np.uint8)
    line_h = max(height // 24, 2)
    for top in range(line_h, height - line_h, 2 * line_h):
        right = int(width * rng.uniform(0.4, 0.95))
        page[top : top + line_h // 2, width // 16 : right] = rng.integers(0, 60)
    image = Image.fromarray(page)
    if text:
        ImageDraw.Draw(image).text((4, 4), text, fill=(0, 0, 0))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def sample_members(
    key: str, answer: str | None, image: bytes | None = None, **meta: object
) -> list[tuple[str, bytes]]:
    """Members of one sample: `<key>.png` (if image) and `<key>.json`."""
    members = []
    if image is not None:
        members.append((f"{key}.png", image))
    record = {"source": "synthetic", "lang": "en", **meta}
    if answer is not None:
        record["answer"] = answer
    members.append((f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8")))
    return members


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """Write `(name, payload)` members to an uncompressed tar, in order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(payload))
    return path


def write_ocr_shards(
    directory: str | Path,
    *,
    num_shards: int,
    per_shard: int,
    size: tuple[int, int] = (64, 48),
    prefix: str = "ocr",
    answer_chars: int = 12,
) -> list[str]:
    """`num_shards` shards of valid OCR samples; keys are `<prefix><shard>_<i>` (unique)."""
    paths = []
    for s in range(num_shards):
        members = []
        for i in range(per_shard):
            key = f"{prefix}{s:03d}_{i:04d}"
            answer = (key + " lorem ipsum dolor sit amet") * (answer_chars // 10 + 1)
            members += sample_members(key, answer[:answer_chars], png_bytes(*size, seed=s * 1000 + i))
        paths.append(str(write_tar(Path(directory) / f"{prefix}-{s:03d}.tar", members)))
    return paths
