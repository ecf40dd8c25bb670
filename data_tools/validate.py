"""Validation of converter inputs: labels (UTF-8, control characters, empty, length) and images
(exists, decodes, size, aspect for the chosen mode).

Every check returns either the cleaned value or a `Reject(reason, detail)`; converters count
and log rejects with source and key and skip the sample (bad data never crashes a conversion).
Skip reasons are the fixed strings in `SKIP_REASONS`.

Images are decoded with `data_tools.images.load_rgb`, the decoder the training loader uses, so a
file that passes here reaches the model with its content. PNG/JPEG/WEBP files that are plain
8-bit RGB or greyscale with no transparency and no EXIF rotation are stored byte for byte; every
other file is stored as the PNG of what the model sees (16-bit scaled to 8 bits, transparency on
white, CMYK converted, EXIF orientation applied).

Labels: CR LF and lone CR line ends become LF and the text is stripped (a documented normalisation); any
other control character (Unicode category Cc other than newline and tab: NUL, escape, DEL, C1
controls) rejects the sample: it is garbage from an export, and a tokenizer would train on it.
"""

from __future__ import annotations

import io
import math
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from data_tools.images import has_transparency, load_rgb

SKIP_REASONS = (
    "missing_file",
    "not_an_image",
    "corrupt_image",
    "too_many_pixels",
    "too_small",
    "unusable_aspect",
    "empty_label",
    "invalid_utf8",
    "control_chars",
    "label_too_long",
    "bad_record",
    "bad_prompt",
    "unsupported_image_ref",
    "outside_root",
    "duplicate",
)

# Pillow formats whose bytes are stored unchanged (when their mode is in _PASSTHROUGH_MODES).
_PASSTHROUGH = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
_PASSTHROUGH_MODES = ("RGB", "L")
_EXIF_ORIENTATION = 0x0112

# Longest side, in pixels, that a view of each mode gives an image (pipeline/processing.py's
# modes): the global view's side, or for Gundam the widest tile row (640 x max_tiles=9).
VIEW_LONG_SIDE = {"tiny": 512, "small": 640, "base": 1024, "large": 1280, "gundam": 640 * 9}
DEFAULT_VIEW_MODE = "base"  # what the loader uses when a sample names no mode


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
    min_view_side: smallest side, in pixels, the image may keep once its long side is fitted into
        the view of the sample's mode (`VIEW_LONG_SIDE`): a 20000 x 8 strip fitted into Base's
        1024 keeps 0.4 pixel of height, nothing a model can read.
    """

    max_label_chars: int = 16_384
    max_pixels: int = 40_000_000
    min_side: int = 8
    min_view_side: int = 8

    def __post_init__(self) -> None:
        if self.max_label_chars < 1:
            raise ValueError(f"max_label_chars must be >= 1, got {self.max_label_chars}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if self.min_view_side < 1:
            raise ValueError(f"min_view_side must be >= 1, got {self.min_view_side}")


def decode_text(data: bytes) -> str | Reject:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return Reject("invalid_utf8", f"byte {e.start}: {e.reason}")


def has_surrogates(text: str) -> bool:
    """True if `text` holds surrogate code points: bytes kept by errors='surrogateescape' from
    invalid UTF-8, or lone surrogates from JSON escapes such as "\\ud800" (not encodable)."""
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def first_control_char(text: str) -> int | None:
    """Index of the first control character other than newline and tab, or None."""
    for i, ch in enumerate(text):
        if ch not in "\n\t" and unicodedata.category(ch) == "Cc":
            return i
    return None


def check_text(text: str, what: str) -> str | Reject:
    """Reject surrogates and control characters in `text` (a label or a prompt); CR LF / CR -> LF."""
    if has_surrogates(text):
        return Reject("invalid_utf8", f"{what} is not valid UTF-8")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    i = first_control_char(text)
    if i is not None:
        return Reject("control_chars", f"{what} has control character U+{ord(text[i]):04X} at position {i}")
    return text


def check_label(label: str | bytes | None, cfg: ValidationConfig) -> str | Reject:
    """Decode (if bytes), reject invalid UTF-8, control characters, empty/whitespace-only and
    over-long labels. Returned with line ends normalised and surrounding whitespace stripped."""
    if label is None:
        return Reject("empty_label", "no label")
    if isinstance(label, bytes):
        label = decode_text(label)
        if isinstance(label, Reject):
            return label
    if not isinstance(label, str):
        return Reject("bad_record", f"label is {type(label).__name__}, not text")
    label = check_text(label, "label")
    if isinstance(label, Reject):
        return label
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


def check_geometry(width: int, height: int, cfg: ValidationConfig, mode: str | None) -> Reject | None:
    """Pixel limit, smallest side, and the side the image keeps in the view of `mode`."""
    if width * height > cfg.max_pixels:
        return Reject("too_many_pixels", f"{width}x{height} > max_pixels={cfg.max_pixels}")
    if min(width, height) < cfg.min_side:
        return Reject("too_small", f"{width}x{height} has a side < min_side={cfg.min_side}")
    view = VIEW_LONG_SIDE[mode or DEFAULT_VIEW_MODE]
    kept = min(width, height) * view / max(width, height)
    if kept < cfg.min_view_side:
        return Reject(
            "unusable_aspect",
            f"{width}x{height} fitted into the {view}-pixel view of mode {mode or DEFAULT_VIEW_MODE} keeps "
            f"{kept:.1f} px of its short side < min_view_side={cfg.min_view_side} (crop or split the image)",
        )
    return None


def _stored_unchanged(img: Image.Image) -> bool:
    """True if the file's own bytes decode to exactly what `load_rgb` gives the model."""
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    return (
        img.format in _PASSTHROUGH
        and img.mode in _PASSTHROUGH_MODES
        and not has_transparency(img)
        and orientation == 1
    )


def check_image_bytes(data: bytes, cfg: ValidationConfig, mode: str | None = None) -> CheckedImage | Reject:
    """Fully decode `data` with the training decoder; see the module docstring for what is stored."""
    if not data:
        return Reject("not_an_image", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            header = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Reject("not_an_image", "Pillow cannot identify the bytes as an image")
    except Image.DecompressionBombError as e:
        return Reject("too_many_pixels", str(e))
    except (OSError, ValueError, SyntaxError) as e:
        return Reject("corrupt_image", f"{type(e).__name__}: {e}")
    reject = check_geometry(*header.size, cfg, mode)
    if reject is not None:
        return reject
    try:
        rgb = load_rgb(data, max_pixels=cfg.max_pixels, max_aspect=math.inf)
    except ValueError as e:
        return Reject("corrupt_image", str(e))
    if _stored_unchanged(header):
        return CheckedImage(data, _PASSTHROUGH[header.format], rgb.width, rgb.height)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return CheckedImage(buf.getvalue(), "png", rgb.width, rgb.height)


def check_image_file(path: Path, cfg: ValidationConfig, mode: str | None = None) -> CheckedImage | Reject:
    if not path.is_file():
        return Reject("missing_file", str(path))
    try:
        data = path.read_bytes()
    except OSError as e:
        return Reject("missing_file", f"{path}: {e}")
    return check_image_bytes(data, cfg, mode)
