"""Converters from user data formats into webdataset shards.

Inputs:
- CSV `image_file,text_label` (image paths relative to the CSV), the fine-tuning-guide format;
- JSONL in the ms-swift `messages` + `images` style and the `query` / `response` / `images` style;
- a folder of images with sidecar `.txt` labels (`page1.png` + `page1.txt`);
- plain text files for the text-only share (whole files, paragraphs or lines).

Image paths named by a data file resolve inside the dataset root (the CSV's or JSONL's folder,
the image folder); a path leading outside it (`..`, absolute, a symlink out) is an `outside_root`
skip unless the reader is given `allow_root`, a folder the user names (`--allow-root`).

Each reader yields `Record`s (or a reject found while reading, e.g. a JSONL line that is not
UTF-8); `encode_record` validates and encodes one record (in worker processes when
`workers > 0`); `convert_records` writes the survivors with a `ShardWriter`, counts every
reject by reason, counts duplicates (same image bytes, prompt and label; dropped with
`drop_duplicates`) and writes the report into manifest.json: per reason the count and the first
rows, the share of bad rows, and whether it exceeds `max_bad_share`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_tools.paths import OutsideRootError, resolve_inside
from data_tools.shards import Sample, ShardWriter, ShardWriterConfig, ordered_map, safe_text
from data_tools.validate import (
    VIEW_LONG_SIDE,
    Reject,
    ValidationConfig,
    check_image_file,
    check_label,
    check_text,
    decode_text,
    has_surrogates,
)

logger = logging.getLogger(__name__)

IMAGE_TAG = "<image>"
FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MODES = tuple(VIEW_LONG_SIDE)  # the mode hints a sample may carry (data_tools/validate.py)


@dataclass
class ConvertConfig:
    """Options shared by all converters.

    source: dataset name stored in every sample's `source` field (and key prefix).
    lang: language code stored in `lang` ("und" when unknown).
    mode: optional mode hint for the loader (one of MODES).
    workers: processes that decode/validate images (0 = in this process).
    drop_duplicates: skip a sample whose image bytes, prompt and label equal an earlier one's
        (reason `duplicate`); by default duplicates are kept and only counted in the report.
    max_bad_share: the report flags `bad_share_exceeded` (and `dsocr-data` exits with 1) when
        more than this share of the rows is skipped for a bad-data reason.
    """

    source: str
    lang: str = "und"
    mode: str | None = None
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    workers: int = 0
    progress: bool = True
    drop_duplicates: bool = False
    max_bad_share: float = 0.1

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source must be a non-empty dataset name")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} not in {MODES}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not 0 <= self.max_bad_share <= 1:
            raise ValueError(f"max_bad_share must be in [0, 1], got {self.max_bad_share}")

    @property
    def key_prefix(self) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "_", self.source)


@dataclass
class Record:
    """One raw input sample before validation. `origin` says where it came from (file:line)."""

    index: int
    origin: str
    answer: str | bytes | None
    prompt: str | None = None
    image_path: Path | None = None
    text_only: bool = False
    reject: Reject | None = None


def normalise_prompt(prompt: str | None, has_image: bool) -> str | None | Reject:
    """Image samples carry exactly one `<image>` tag (prepended with a newline when absent)."""
    if prompt is None:
        return None
    prompt = check_text(prompt, "prompt")
    if isinstance(prompt, Reject):
        return prompt
    n = prompt.count(IMAGE_TAG)
    if not has_image:
        return Reject("bad_prompt", "prompt has <image> but the sample has no image") if n else prompt
    if n == 0:
        return f"{IMAGE_TAG}\n{prompt}"
    if n > 1:
        return Reject("bad_prompt", f"prompt has {n} <image> tags; one image per sample")
    return prompt


def encode_record(args: tuple[Record, ConvertConfig]) -> Sample | tuple[Record, Reject]:
    """Validate one record and build its Sample, or return the reason it is skipped."""
    rec, cfg = args
    if rec.reject is not None:
        return rec, rec.reject
    label = check_label(rec.answer, cfg.validation)
    if isinstance(label, Reject):
        return rec, label
    key = f"{cfg.key_prefix}-{rec.index:09d}"
    meta: dict = {"source": cfg.source, "lang": cfg.lang, "origin": safe_text(rec.origin)}
    if rec.text_only and rec.prompt is None:
        meta["text"] = label
        return Sample(key, meta)
    prompt = normalise_prompt(rec.prompt, rec.image_path is not None)
    if isinstance(prompt, Reject):
        return rec, prompt
    if prompt is not None:
        meta["prompt"] = prompt
    meta["answer"] = label
    if cfg.mode is not None:
        meta["mode"] = cfg.mode
    if rec.image_path is None:
        return Sample(key, meta)
    img = check_image_file(rec.image_path, cfg.validation, cfg.mode)
    if isinstance(img, Reject):
        return rec, img
    meta["width"], meta["height"] = img.width, img.height
    return Sample(key, meta, img.data, img.ext)


REPORT_EXAMPLES = 5  # rows listed per duplicate in the report


def content_digest(sample: Sample) -> str:
    """What makes two samples the same: image bytes, prompt and label (or text)."""
    meta = sample.meta
    h = hashlib.sha256(sample.image or b"")
    for part in (meta.get("prompt"), meta.get("answer"), meta.get("text")):
        h.update(b"\x00" + json.dumps(part, ensure_ascii=False).encode())
    return h.hexdigest()


@dataclass
class DuplicateCounter:
    """Samples whose content equals an earlier one's: how many, and the first few pairs."""

    first_origin: dict[str, str] = field(default_factory=dict)
    count: int = 0
    examples: list[dict] = field(default_factory=list)

    def check(self, digest: str, origin: str) -> str | None:
        """The origin of the earlier equal sample, or None (and `origin` remembered)."""
        first = self.first_origin.setdefault(digest, origin)
        if first == origin:
            return None
        self.count += 1
        if len(self.examples) < REPORT_EXAMPLES:
            self.examples.append({"source": safe_text(origin), "same_as": safe_text(first)})
        return first


def convert_records(
    records: Iterable[Record], writer_cfg: ShardWriterConfig, cfg: ConvertConfig, total: int | None = None
) -> dict:
    """Validate, encode and write `records`; returns the manifest (written as manifest.json)."""
    writer = ShardWriter(writer_cfg, extra_manifest={"converter": {"source": cfg.source, "lang": cfg.lang}})
    jobs = ((rec, cfg) for rec in records)
    duplicates = DuplicateCounter()
    try:
        results = ordered_map(encode_record, jobs, cfg.workers)
        bar = tqdm(results, total=total, unit="sample", disable=not cfg.progress, desc=cfg.source)
        for result in bar:
            if isinstance(result, Sample):
                origin = result.meta["origin"]
                first = duplicates.check(content_digest(result), origin)
                if first is not None and cfg.drop_duplicates:
                    writer.skip("duplicate", origin, result.key, f"same image, prompt and label as {first}")
                else:
                    writer.write(result)
            else:
                rec, rej = result
                writer.skip(rej.reason, rec.origin, f"{cfg.key_prefix}-{rec.index:09d}", rej.detail)
            bar.set_postfix(ok=writer.total_samples, skipped=sum(writer.skipped.values()), refresh=False)
    except BaseException:
        writer.abort()  # never leave a half-written shard that looks complete
        raise
    bad = sum(n for reason, n in writer.skipped.items() if reason != "duplicate")
    rows = writer.total_samples + sum(writer.skipped.values())
    writer.extra_manifest.update(
        rows=rows,
        bad_rows=bad,
        bad_share=round(bad / rows, 6) if rows else 0.0,
        max_bad_share=cfg.max_bad_share,
        bad_share_exceeded=rows > 0 and bad / rows > cfg.max_bad_share,
        duplicates={
            "count": duplicates.count,
            "dropped": cfg.drop_duplicates,
            "examples": duplicates.examples,
        },
    )
    return writer.close()


# ---------------------------------------------------------------------------------------- readers


def image_record(index: int, origin: str, answer, root: Path, value: str, allow_root: Path | None) -> Record:
    """A record for the image `value` named by a data file, or an `outside_root` reject."""
    try:
        return Record(index, origin, answer, image_path=resolve_inside(root, value, allow_root))
    except OutsideRootError as e:
        return Record(index, origin, None, reject=Reject("outside_root", str(e)))


def read_csv(
    path: Path,
    image_column: str = "image_file",
    text_column: str = "text_label",
    allow_root: Path | None = None,
) -> list[Record]:
    """Rows of a CSV with a header naming `image_column` and `text_column`; paths relative to the
    CSV's folder and inside it (or `allow_root`). A record's origin is `file:line` of the row's
    first line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"CSV file {path} does not exist")
    records = []
    # surrogateescape keeps invalid UTF-8 visible per field instead of failing the whole file
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (image_column, text_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: header {reader.fieldnames} lacks column(s) {missing}; "
                "pass --image-column/--text-column to name them"
            )
        row_start = reader.line_num + 1  # after the header
        for i, row in enumerate(reader):
            origin, row_start = f"{path}:{row_start}", reader.line_num + 1
            image = (row.get(image_column) or "").strip()
            if not image:
                records.append(Record(i, origin, None, reject=Reject("missing_file", "empty image path")))
                continue
            if has_surrogates(image):
                records.append(Record(i, origin, None, reject=Reject("invalid_utf8", "image path")))
                continue
            records.append(image_record(i, origin, row.get(text_column), path.parent, image, allow_root))
    return records


def _content_text(content) -> str | None:
    """Message content as text: a string, or OpenAI-style parts (image parts become <image>)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                return None
            kind = part.get("type")
            if kind == "text":
                parts.append(str(part.get("text", "")))
            elif kind in ("image", "image_url"):
                parts.append(IMAGE_TAG)
            else:
                return None
        return "".join(parts)
    return None


def _image_ref(ref) -> str | None:
    if isinstance(ref, str):
        return ref
    if isinstance(ref, dict):
        for k in ("path", "image", "url"):
            if isinstance(ref.get(k), str):
                return ref[k]
    return None


def parse_jsonl_object(
    obj, base_dir: Path, allow_root: Path | None = None
) -> tuple[str | None, object, list[Path]] | Reject:
    """(prompt, answer, image paths inside `base_dir` or `allow_root`) from one ms-swift style object."""
    if not isinstance(obj, dict):
        return Reject("bad_record", "line is not a JSON object")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return Reject("bad_record", "messages is not a list of objects")
        idx = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not idx:
            return Reject("bad_record", "no assistant message")
        last = idx[-1]
        answer = _content_text(messages[last].get("content"))
        users = [m for m in messages[:last] if m.get("role") == "user"]
        prompt = _content_text(users[-1].get("content")) if users else None
        if answer is None or (users and prompt is None):
            return Reject("bad_record", "message content is neither text nor text/image parts")
    elif "query" in obj and "response" in obj:
        prompt, answer = obj["query"], obj["response"]
        if not isinstance(prompt, str):
            return Reject("bad_record", "query is not a string")
    else:
        return Reject("bad_record", "neither 'messages' nor 'query'/'response' present")
    images = obj.get("images") or []
    if isinstance(images, (str, dict)):
        images = [images]
    if not isinstance(images, list):
        return Reject("bad_record", "images is not a list")
    paths = []
    for ref in images:
        s = _image_ref(ref)
        if s is None:
            return Reject("bad_record", f"cannot read image reference {ref!r}")
        if re.match(r"^(https?|s3|gs|data):", s):
            return Reject("unsupported_image_ref", f"remote/inline image {s[:80]!r}; download it first")
        try:
            paths.append(resolve_inside(base_dir, s, allow_root))
        except OutsideRootError as e:
            return Reject("outside_root", str(e))
    if len(paths) > 1:
        return Reject("bad_record", f"{len(paths)} images; one image per sample is supported")
    return prompt, answer, paths


def read_jsonl(path: Path, allow_root: Path | None = None) -> list[Record]:
    """ms-swift JSONL lines; image paths relative to the file's folder and inside it (or `allow_root`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"JSONL file {path} does not exist")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            i, origin = len(records), f"{path}:{lineno}"
            text = decode_text(raw)
            if isinstance(text, Reject):
                records.append(Record(i, origin, None, reject=text))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                records.append(Record(i, origin, None, reject=Reject("bad_record", f"invalid JSON: {e}")))
                continue
            parsed = parse_jsonl_object(obj, path.parent, allow_root)
            if isinstance(parsed, Reject):
                records.append(Record(i, origin, None, reject=parsed))
                continue
            prompt, answer, paths = parsed
            if not isinstance(answer, str):
                answer = None if answer is None else json.dumps(answer, ensure_ascii=False)
            records.append(Record(i, origin, answer, prompt=prompt, image_path=paths[0] if paths else None))
    return records


def read_folder(root: Path, label_suffix: str = ".txt", allow_root: Path | None = None) -> list[Record]:
    """Every image under `root` (recursive, sorted) with its sidecar `<stem><label_suffix>`; an
    image or label that is a symlink leading outside `root` (and `allow_root`) is skipped."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in FOLDER_IMAGE_SUFFIXES]
    image_stems = {p.with_suffix("") for p in images}
    records = []
    for p in images:
        origin = str(p)
        label_path = p.with_suffix(label_suffix)
        if not label_path.is_file():
            records.append(
                Record(len(records), origin, None, reject=Reject("missing_file", f"no {label_path.name}"))
            )
            continue
        try:
            label = resolve_inside(root, label_path.relative_to(root), allow_root).read_bytes()
        except OutsideRootError as e:
            records.append(Record(len(records), origin, None, reject=Reject("outside_root", str(e))))
            continue
        records.append(image_record(len(records), origin, label, root, p.relative_to(root), allow_root))
    for p in files:  # labels whose image is missing
        if p.suffix == label_suffix and p.with_suffix("") not in image_stems:
            records.append(
                Record(len(records), str(p), None, reject=Reject("missing_file", "label without image"))
            )
    return records


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split `text` into pieces <= max_chars at paragraph, then line, then space boundaries."""
    if len(text) <= max_chars:
        return [text]
    for sep in ("\n\n", "\n", " "):
        parts = text.split(sep)
        if len(parts) > 1:
            out, cur = [], ""
            for part in parts:
                cand = part if not cur else cur + sep + part
                if len(cand) <= max_chars:
                    cur = cand
                    continue
                if cur:
                    out.append(cur)
                if len(part) <= max_chars:
                    cur = part
                else:
                    out.extend(chunk_text(part, max_chars))
                    cur = ""
            if cur:
                out.append(cur)
            return [c for c in out if c.strip()]
    return [text[i : i + max_chars] for i in range(0, len(text), max_chars)]


def read_text_files(paths: Iterable[Path], split: str = "file", max_chars: int = 16_384) -> Iterator[Record]:
    """Text-only records: one per file (chunked to max_chars), per paragraph or per line."""
    if split not in ("file", "paragraph", "line"):
        raise ValueError(f"split must be 'file', 'paragraph' or 'line', got {split!r}")
    index = 0
    for path in paths:
        path = Path(path)
        if not path.is_file():
            yield Record(index, str(path), None, text_only=True, reject=Reject("missing_file", str(path)))
            index += 1
            continue
        text = decode_text(path.read_bytes())
        if isinstance(text, Reject):
            yield Record(index, str(path), None, text_only=True, reject=text)
            index += 1
            continue
        text = text.replace("\r\n", "\n")
        if split == "file":
            pieces = chunk_text(text.strip(), max_chars) if text.strip() else [""]
        elif split == "paragraph":
            pieces = [p for p in re.split(r"\n\s*\n", text) if p.strip()] or [""]
        else:
            pieces = [line for line in text.split("\n") if line.strip()] or [""]
        for j, piece in enumerate(pieces):
            yield Record(index, f"{path}#{j}", piece, text_only=True)
            index += 1


def expand_text_inputs(inputs: Iterable[str], pattern: str = "*.txt") -> list[Path]:
    out: list[Path] = []
    for spec in inputs:
        p = Path(spec)
        out.extend(sorted(p.rglob(pattern)) if p.is_dir() else [p])
    return out
