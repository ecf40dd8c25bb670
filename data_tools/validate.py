"""Validation of converter inputs: labels (UTF-8, empty, length) and images (exists, decodes, size).

Every check returns either the cleaned value or a `Reject(reason, detail)`; converters count
and log rejects with source and key and skip the sample (issue 6: bad data never crashes a
conversion). Skip reasons are the fixed strings in `SKIP_REASONS`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

SKIP_REASONS = (
    "missing_file",
    "not_an_image",
    "corrupt_image",
    "too_many_pixels",
    "empty_label",
    "invalid_utf8",
    "label_too_long",
    "bad_record",
    "bad_prompt",
    "unsupported_image_ref",
)

# Pillow formats whose bytes are stored unchanged; anything else is re-encoded to PNG.
_PASSTHROUGH = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


@dataclass(frozen=True)
class Reject:
    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        assert self.reason in SKIP_REASONS, self.reason


@dataclass
class ValidationConfig:
    """Limits applied to every sample.

    max_label_chars: longest accepted label (characters, after stripping).
    max_pixels: largest accepted image (width * height).
    min_side: smallest accepted image side in pixels.
    """

    max_label_chars: int = 16_384
    max_pixels: int = 40_000_000
    min_side: int = 8

    def __post_init__(self) -> None:
        if self.max_label_chars < 1:
            raise ValueError(f"max_label_chars must be >= 1, got {self.max_label_chars}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")


def decode_text(data: bytes) -> str | Reject:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return Reject("invalid_utf8", f"byte {e.start}: {e.reason}")


def has_surrogates(text: str) -> bool:
    """True if `text` holds surrogate code points: bytes kept by errors='surrogateescape' from
    invalid UTF-8, or lone surrogates from JSON escapes such as "\\ud800" (not encodable)."""
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def check_label(label: str | bytes | None, cfg: ValidationConfig) -> str | Reject:
    """Decode (if bytes), reject invalid UTF-8, empty/whitespace-only and over-long labels.

    The label is returned with leading/trailing whitespace stripped; inner text is unchanged.
    """
    if label is None:
        return Reject("empty_label", "no label")
    if isinstance(label, bytes):
        label = decode_text(label)
        if isinstance(label, Reject):
            return label
    if not isinstance(label, str):
        return Reject("bad_record", f"label is {type(label).__name__}, not text")
    if has_surrogates(label):
        return Reject("invalid_utf8", "label is not valid UTF-8")
    label = label.strip()
    if not label:
        return Reject("empty_label", "empty or whitespace-only label")
    if len(label) > cfg.max_label_chars:
        return Reject("label_too_long", f"{len(label)} chars > max_label_chars={cfg.max_label_chars}")
    return label


@dataclass
class CheckedImage:
    data: bytes
    ext: str
    width: int
    height: int


def check_image_bytes(data: bytes, cfg: ValidationConfig) -> CheckedImage | Reject:
    """Fully decode `data`; keep PNG/JPEG/WEBP bytes as they are, re-encode other formats to PNG."""
    if not data:
        return Reject("not_an_image", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Reject("not_an_image", "Pillow cannot identify the bytes as an image")
    except Image.DecompressionBombError as e:
        return Reject("too_many_pixels", str(e))
    except (OSError, ValueError, SyntaxError) as e:
        return Reject("corrupt_image", f"{type(e).__name__}: {e}")
    width, height = img.size
    if width * height > cfg.max_pixels:
        return Reject("too_many_pixels", f"{width}x{height} > max_pixels={cfg.max_pixels}")
    if min(width, height) < cfg.min_side:
        return Reject("corrupt_image", f"{width}x{height} has a side < min_side={cfg.min_side}")
    fmt = img.format
    try:
        img.load()  # full decode: catches truncated files that open() accepts
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return Reject("corrupt_image", f"{type(e).__name__}: {e}")
    if fmt in _PASSTHROUGH:
        return CheckedImage(data, _PASSTHROUGH[fmt], width, height)
    img = ImageOps.exif_transpose(img)
    if img.mode not in ("RGB", "RGBA", "L", "LA"):
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return CheckedImage(buf.getvalue(), "png", img.width, img.height)


def check_image_file(path: Path, cfg: ValidationConfig) -> CheckedImage | Reject:
    if not path.is_file():
        return Reject("missing_file", str(path))
    try:
        data = path.read_bytes()
    except OSError as e:
        return Reject("missing_file", f"{path}: {e}")
    return check_image_bytes(data, cfg)
