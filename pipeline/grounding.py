"""Grounding markup of DeepSeek-OCR: `<|ref|>LABEL<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`.

Coordinates are integer bins 0..999 of the original image width/height
(../shared/spec/architecture.md section 4). Parsing follows the release's visualisation
code (`re_match` + `x = int(bin / 999 * W)`); `format_grounding` is the inverse used to
build training targets (pixels -> bins, rounded). Malformed boxes in generated text are
skipped, never raised: model output is untrusted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pipeline.tokenizer import DET_END, DET_START, REF_END, REF_START

NUM_BINS = 1000  # bins 0..999
Box = tuple[int, int, int, int]

_ENTRY = re.compile(
    re.escape(REF_START)
    + r"(.*?)"
    + re.escape(REF_END)
    + r"\s*"
    + re.escape(DET_START)
    + r"(.*?)"
    + re.escape(DET_END),
    re.DOTALL,
)
_BOX = re.compile(
    r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]"
)


def _bin_to_pixel(value: float, size: int) -> int:
    value = min(max(value, 0.0), NUM_BINS - 1.0)
    return int(value / (NUM_BINS - 1) * size)


def parse_grounding(text: str, image_size: tuple[int, int]) -> list[tuple[str, list[Box]]]:
    """All (label, boxes) of `text`, boxes as (x1, y1, x2, y2) pixels of an image (W, H)."""
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive (W, H), got {image_size}")
    results: list[tuple[str, list[Box]]] = []
    for match in _ENTRY.finditer(text):
        label, det = match.group(1), match.group(2)
        boxes: list[Box] = []
        for box in _BOX.finditer(det):
            x1, y1, x2, y2 = (float(v) for v in box.groups())
            boxes.append(
                (
                    _bin_to_pixel(x1, width),
                    _bin_to_pixel(y1, height),
                    _bin_to_pixel(x2, width),
                    _bin_to_pixel(y2, height),
                )
            )
        results.append((label, boxes))
    return results


def strip_grounding(text: str) -> str:
    """Text with the grounding markup removed: each entry is replaced by its label."""
    return _ENTRY.sub(lambda m: m.group(1), text)


def pixel_to_bin(value: float, size: int) -> int:
    """Pixel coordinate -> bin 0..999 (rounded, clamped)."""
    return min(max(round(value / size * (NUM_BINS - 1)), 0), NUM_BINS - 1)


def format_grounding(label: str, boxes: Sequence[Sequence[float]], image_size: tuple[int, int]) -> str:
    """One `<|ref|>label<|/ref|><|det|>[[...]]<|/det|>` entry from pixel boxes."""
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive (W, H), got {image_size}")
    binned = []
    for box in boxes:
        if len(box) != 4:
            raise ValueError(f"a box has 4 coordinates (x1, y1, x2, y2), got {box}")
        x1, y1, x2, y2 = box
        binned.append(
            f"[{pixel_to_bin(x1, width)}, {pixel_to_bin(y1, height)}, "
            f"{pixel_to_bin(x2, width)}, {pixel_to_bin(y2, height)}]"
        )
    return f"{REF_START}{label}{REF_END}{DET_START}[{', '.join(binned)}]{DET_END}"
