"""Evaluation sets: pages with a reference text, read from JSONL, CSV or webdataset shards.

- JSONL: one object per line, `{"key", "image", "answer"}`; `image` is a path (relative paths
  resolve against the file's folder, the dataset root). A path that leads outside the root
  (`..`, absolute, a symlink out) is refused unless `allow_root` names a folder that holds it
  (`data_tools.paths.resolve_inside`): the sample is kept, and fails at evaluation time with
  the reason, so the report counts it.
- CSV: a header with the same column names.
- webdataset: uncompressed `.tar` shards in the layout of data_tools/README.md
  (`<key>.json` with `answer`, plus `<key>.png|jpg|jpeg|webp`), given as a file, a folder of
  shards, or a brace/glob pattern (`pipeline.data.shards.expand_shards`).

The reference field defaults to the first of `answer`, `text`, `reference` present. An eval set
is read strictly: a missing or empty reference, a duplicate key, or an unreadable shard raises
ValueError naming its source, since a silently shrunk set would bias every number. Images are read
lazily (`EvalSample.load_image`); an undecodable or missing image becomes a failed sample at
evaluation time, recorded with its reason.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from data_tools.images import DEFAULT_MAX_PIXELS, load_rgb, to_rgb
from data_tools.paths import OutsideRootError, resolve_inside
from pipeline.data.shards import SkipCounter, expand_shards, index_shard, read_files

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
REFERENCE_FIELDS = ("answer", "text", "reference")


@dataclass(frozen=True)
class TarMember:
    """Location of one payload inside an uncompressed tar shard."""

    shard: str
    ext: str
    offset: int
    size: int

    def read(self) -> bytes:
        return read_files(self.shard, {self.ext: (self.offset, self.size)})[self.ext]


@dataclass(frozen=True)
class EvalSample:
    """One page to evaluate. image: a file path, encoded bytes, a tar member, an in-memory PIL
    image (e.g. a training run's synthetic validation lines), or None (missing).
    refused: why the image named by the data file is not read (a path outside the dataset root)."""

    key: str
    reference: str
    image: Path | bytes | TarMember | Image.Image | None
    source: str = ""
    refused: str | None = None

    def load_image(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Decode the image (EXIF transposed, RGB); ValueError with the source on any failure."""
        where = f"{self.source}:{self.key}" if self.source else self.key
        if self.refused is not None:
            raise ValueError(f"{where}: {self.refused}")
        if self.image is None:
            raise ValueError(f"{where}: the sample has no image")
        if isinstance(self.image, Image.Image):
            width, height = self.image.size
            if width * height > max_pixels or not width or not height:
                raise ValueError(
                    f"{where}: in-memory image of {width}x{height} pixels is empty or over max_pixels"
                )
            return to_rgb(self.image)
        data = self.image.read() if isinstance(self.image, TarMember) else self.image
        return load_rgb(data, max_pixels=max_pixels, source=where)

    def image_bytes(self) -> bytes:
        """The encoded image file (for external tools such as tesseract); PIL images as PNG."""
        if self.refused is not None:
            raise ValueError(f"{self.source}:{self.key}: {self.refused}")
        if self.image is None:
            raise ValueError(f"{self.source}:{self.key}: the sample has no image")
        if isinstance(self.image, TarMember):
            return self.image.read()
        if isinstance(self.image, bytes):
            return self.image
        if isinstance(self.image, Image.Image):
            out = io.BytesIO()
            self.image.save(out, format="PNG")
            return out.getvalue()
        return Path(self.image).read_bytes()


def _reference(row: dict[str, Any], field: str | None, where: str) -> str:
    fields = (field,) if field else REFERENCE_FIELDS
    value = next((row[f] for f in fields if f in row), None)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"{where}: missing or empty reference (looked for {'/'.join(fields)}, got {value!r})"
        )
    return value


def _row_sample(
    row: dict[str, Any], base: Path, field: str | None, where: str, allow_root: Path | None
) -> EvalSample:
    key = row.get("key")
    if not isinstance(key, str) or not key:
        raise ValueError(f"{where}: a sample needs a non-empty string 'key', got {key!r}")
    image = row.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(f"{where}: 'image' must be a path string, got {image!r}")
    reference = _reference(row, field, f"{where} key={key}")
    if not image:
        return EvalSample(key, reference, None, where)
    try:
        return EvalSample(key, reference, resolve_inside(base, image, allow_root), where)
    except OutsideRootError as exc:
        return EvalSample(key, reference, None, where, refused=str(exc))


def _read_jsonl(path: Path, field: str | None, allow_root: Path | None) -> list[EvalSample]:
    samples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object")
            samples.append(_row_sample(row, path.parent, field, where, allow_root))
    return samples


def _read_csv(path: Path, field: str | None, allow_root: Path | None) -> list[EvalSample]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return [
            _row_sample(row, path.parent, field, f"{path}:{i + 2}", allow_root)
            for i, row in enumerate(reader)
        ]


def _read_shards(pattern: str, field: str | None) -> list[EvalSample]:
    samples = []
    for shard in expand_shards(pattern):
        skips = SkipCounter()
        entries = index_shard(shard, skips)
        if skips.counts:
            raise ValueError(f"eval shard {shard} could not be read completely: {skips.as_dict()}")
        for entry in entries:
            where = f"{shard}:{entry.key}"
            if "json" not in entry.files:
                raise ValueError(f"{where}: no .json member (members {sorted(entry.files)})")
            offset, size = entry.files["json"]
            raw = TarMember(shard, "json", offset, size).read()
            try:
                meta = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{where}: bad JSON member ({exc})") from exc
            if not isinstance(meta, dict):
                raise ValueError(f"{where}: the JSON member is not an object")
            ext = next((e for e in IMAGE_EXTS if e in entry.files), None)
            image = None if ext is None else TarMember(shard, ext, *entry.files[ext])
            samples.append(EvalSample(entry.key, _reference(meta, field, where), image, shard))
    return samples


def read_eval_set(
    spec: str | Path,
    *,
    reference_field: str | None = None,
    limit: int | None = None,
    allow_root: str | Path | None = None,
) -> list[EvalSample]:
    """Read an eval set (see module docstring): `.jsonl`, `.csv`, `.tar`, a folder of `.tar`
    shards, or a brace/glob shard pattern. `limit` keeps the first N samples. `allow_root`: a
    folder that image paths of a JSONL/CSV set may lead into besides the set's own folder."""
    allow = None if allow_root is None else Path(allow_root)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    text = str(spec)
    path = Path(text)
    if text.endswith(".jsonl"):
        samples = _read_jsonl(path, reference_field, allow)
    elif text.endswith(".csv"):
        samples = _read_csv(path, reference_field, allow)
    elif path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise ValueError(f"eval set folder {path} holds no .tar shard")
        samples = [s for shard in shards for s in _read_shards(shard, reference_field)]
    elif ".tar" in text:
        samples = _read_shards(text, reference_field)
    else:
        raise ValueError(
            f"eval set {text!r}: expected a .jsonl, .csv, .tar (pattern) or a folder of .tar shards"
        )
    if not samples:
        raise ValueError(f"eval set {text!r} holds no sample")
    seen: dict[str, str] = {}
    for s in samples:
        if s.key in seen:
            raise ValueError(f"duplicate key {s.key!r} in the eval set ({seen[s.key]} and {s.source})")
        seen[s.key] = s.source
    return samples[:limit] if limit else samples


def references_of(samples: Sequence[EvalSample]) -> dict[str, str]:
    """key -> reference text."""
    return {s.key: s.reference for s in samples}
