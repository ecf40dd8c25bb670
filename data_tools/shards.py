"""Webdataset tar shards: an atomic, size- and count-bounded writer, a manifest, and a reader.

Shard layout follows the webdataset convention (one sample = consecutive tar members that
share a key up to the first dot): `<key>.json` always, plus one image member
`<key>.png|jpg|jpeg|webp` for image samples. The JSON fields are documented in
data_tools/README.md.

Atomic finalisation: a shard is written to `<name>.tar.tmp`, flushed, fsync'ed, then renamed
to `<name>.tar` and the directory is fsync'ed. A killed conversion leaves at most a `.tar.tmp`
file, never a truncated `.tar`. The manifest (`manifest.json`, written the same way) lists per
shard its sample count, byte size and sha256, the totals and the skip counts by reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = "dsocr-wds-1"
_TAR_BLOCK = 512


def _tar_member_size(payload_len: int) -> int:
    """Bytes one tar member occupies: a 512-byte header plus the payload padded to 512."""
    return _TAR_BLOCK + -(-payload_len // _TAR_BLOCK) * _TAR_BLOCK


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_text(text: str) -> str:
    """`text` with surrogates (undecodable bytes of file names, lone JSON escapes) backslash-escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: object) -> None:
    """Write JSON to `path` through a fsync'ed temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class Sample:
    """One encoded sample: a key, its JSON metadata and optionally image bytes + extension."""

    key: str
    meta: dict
    image: bytes | None = None
    image_ext: str | None = None

    def __post_init__(self) -> None:
        if not self.key or "." in self.key or "/" in self.key:
            raise ValueError(f"sample key {self.key!r} must be non-empty without '.' or '/'")
        if (self.image is None) != (self.image_ext is None):
            raise ValueError("image and image_ext must be given together")
        if self.image_ext is not None and self.image_ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"image_ext {self.image_ext!r} not in {IMAGE_EXTENSIONS}")

    def members(self) -> list[tuple[str, bytes]]:
        out = []
        if self.image is not None:
            out.append((f"{self.key}.{self.image_ext}", self.image))
        out.append((f"{self.key}.json", json.dumps(self.meta, ensure_ascii=False).encode("utf-8")))
        return out


@dataclass
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str


@dataclass
class ShardWriterConfig:
    """Where and how big: `max_count` samples and about `max_bytes` bytes per shard."""

    out_dir: str
    prefix: str = "shard"
    max_count: int = 10_000
    max_bytes: int = 1 << 30
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {self.max_count}")
        if self.max_bytes < 10 * _TAR_BLOCK:
            raise ValueError(f"max_bytes must be >= {10 * _TAR_BLOCK}, got {self.max_bytes}")
        if not self.prefix or "/" in self.prefix or "." in self.prefix:
            raise ValueError(f"prefix {self.prefix!r} must be non-empty without '/' or '.'")


@dataclass
class ShardWriter:
    """Writes samples into `<out_dir>/<prefix>-NNNNNN.tar`, rolling over at the size/count bound.

    Use as a context manager; `close()` finalises the open shard and writes the manifest.
    A sample larger than `max_bytes` gets a shard of its own (a bound, not a hard limit).
    """

    config: ShardWriterConfig
    extra_manifest: dict = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list, init=False)
    skipped: Counter = field(default_factory=Counter, init=False)
    skipped_examples: dict = field(default_factory=dict, init=False)
    sources: Counter = field(default_factory=Counter, init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.config.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out.glob(f"{self.config.prefix}-*.tar")) + [
            p for p in [self.out / MANIFEST_NAME] if p.exists()
        ]
        if existing and not self.config.overwrite:
            raise ValueError(
                f"{self.out} already holds {existing[0].name} (and {len(existing) - 1} more); "
                "pass overwrite=True (--overwrite) or choose another output directory"
            )
        for p in existing:
            p.unlink()
        for stale in self.out.glob(f"{self.config.prefix}-*.tar.tmp"):
            logger.warning("removing unfinished shard %s from an earlier run", stale)
            stale.unlink()
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._count = 0
        self._bytes = 0
        self._start = time.time()
        self._closed = False

    @property
    def total_samples(self) -> int:
        return sum(s.count for s in self.shards) + self._count

    def _shard_name(self) -> str:
        return f"{self.config.prefix}-{len(self.shards):06d}.tar"

    def _open(self) -> None:
        tmp = self.out / (self._shard_name() + ".tmp")
        self._file = open(tmp, "wb")  # noqa: SIM115 (closed in _finalise/abort)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._count = 0
        self._bytes = 0

    def _finalise(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()  # writes the two end-of-archive blocks
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self._shard_name()
        tmp, final = self.out / (name + ".tmp"), self.out / name
        os.replace(tmp, final)
        _fsync_dir(self.out)
        info = ShardInfo(name, self._count, final.stat().st_size, file_sha256(final))
        self.shards.append(info)
        logger.info("finalised %s: %d samples, %d bytes", name, info.count, info.bytes)
        self._tar = self._file = None
        self._count = self._bytes = 0

    def write(self, sample: Sample) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        members = sample.members()
        size = sum(_tar_member_size(len(data)) for _, data in members)
        if self._tar is not None and (
            self._count >= self.config.max_count or self._bytes + size > self.config.max_bytes
        ):
            self._finalise()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0  # fixed, so equal inputs give byte-identical shards
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size
        self.sources[sample.meta.get("source", "")] += 1

    def skip(self, reason: str, source: str, key: str, detail: str = "") -> None:
        """Count and log one bad input; the first few per reason are kept for the manifest."""
        self.skipped[reason] += 1
        source, key, detail = safe_text(source), safe_text(key), safe_text(detail)
        examples = self.skipped_examples.setdefault(reason, [])
        if len(examples) < 20:
            examples.append({"source": source, "key": key, "detail": detail[:300]})
        logger.warning("skip [%s] source=%s key=%s %s", reason, source, key, detail[:300])

    def manifest(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "prefix": self.config.prefix,
            "shards": [vars(s) for s in self.shards],
            "total_samples": sum(s.count for s in self.shards),
            "total_bytes": sum(s.bytes for s in self.shards),
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_total": sum(self.skipped.values()),
            "skipped_examples": self.skipped_examples,
            "sources": dict(sorted(self.sources.items())),
            "elapsed_s": round(time.time() - self._start, 3),
            **self.extra_manifest,
        }

    def close(self) -> dict:
        """Finalise the open shard, write manifest.json; returns the manifest."""
        if self._closed:
            return self.manifest()
        if self._tar is not None and self._count > 0:
            self._finalise()
        self._closed = True
        manifest = self.manifest()
        write_json_atomic(self.out / MANIFEST_NAME, manifest)
        return manifest

    def abort(self) -> None:
        """Drop the open shard (left as nothing: its .tmp file is removed); no manifest."""
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            (self.out / (self._shard_name() + ".tmp")).unlink(missing_ok=True)
            self._tar = self._file = None
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def ordered_map(
    fn, jobs: Iterable, workers: int = 0, chunksize: int = 8, start_method: str | None = None
) -> Iterator:
    """`map(fn, jobs)` in input order, over `workers` processes when > 0 (so shards stay
    deterministic); the pool is terminated when the consumer stops, also on an error."""
    if workers <= 0:
        yield from map(fn, jobs)
        return
    pool = multiprocessing.get_context(start_method).Pool(workers)
    try:
        yield from pool.imap(fn, jobs, chunksize=chunksize)
    finally:
        pool.terminate()


def expand_shard_paths(specs: Iterable[str]) -> list[Path]:
    """Expand directories (their *.tar files) and files into a sorted list of shard paths."""
    paths: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(p.glob("*.tar"))
            if not found:
                raise ValueError(f"no *.tar shards in directory {p}")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise ValueError(f"shard path {p} does not exist")
    return paths


def iter_shard(path: str | os.PathLike) -> Iterator[dict]:
    """Yield samples of one shard as dicts: `__key__`, `__shard__`, `json` (parsed), image ext -> bytes.

    Members are grouped by key as webdataset does (consecutive members, key = name up to the
    first dot of the basename).
    """
    current: dict | None = None
    with tarfile.open(path, mode="r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            key, ext = base.split(".", 1)
            prefix = member.name[: len(member.name) - len(base)]
            key = prefix + key
            data = tar.extractfile(member).read()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield _decode(current)
                current = {"__key__": key, "__shard__": str(path)}
            current[ext.lower()] = data
    if current is not None:
        yield _decode(current)


def _decode(raw: dict) -> dict:
    if "json" in raw:
        raw["json"] = json.loads(raw["json"].decode("utf-8"))
    return raw


def iter_samples(paths: Iterable[str | os.PathLike]) -> Iterator[dict]:
    for path in paths:
        yield from iter_shard(path)


def sample_image_ext(sample: dict) -> str | None:
    """The image extension a read-back sample carries, or None for a text-only sample."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext
    return None
