"""Image modes of DeepSeek-OCR: loading, resize/pad/tile, normalisation and placeholder counts.

Implements ../shared/spec/architecture.md section 3, following the public DeepSeek-OCR
processor (`process/image_process.py`: `dynamic_preprocess`, `find_closest_aspect_ratio`,
`ImageOps.pad` global views, `tokenize_with_images` placeholder layout):

- Tiny 512 / Small 640: the whole image is stretched to a square (no aspect kept).
- Base 1024 / Large 1280: the image is fitted into the square keeping its aspect, the
  rest filled with the pad colour (127, 127, 127).
- Gundam: local tiles of 640 on a w x h grid chosen by the closest-aspect-ratio rule
  (2 <= w*h <= max_tiles), plus a global view padded to 1024; images whose both sides
  are <= 640 get no tiles (the Base layout).
- Lines 640 (this project's, for text-line crops up to ~100 characters): a wide line image is
  first folded into a few rows stacked top to bottom (cut at the lightest columns near even
  cut points, `fold_line`), then stretched to the square like Small. A 40:1 line becomes six
  rows in a near-square view instead of a 16-pixel strip, so each image-token column carries
  ~2 characters; the text is read row after row, the order of a paragraph. Laid out at one fixed
  scale instead (small glyphs in a corner of the page: few image tokens per character), the
  embedded default did not learn to read (CER 0.97 vs 0.056 folded and stretched, 2026-12-04).

Every view is a square of side S (a multiple of 64) and becomes a q x q grid of features,
q = S / 64 (patch 16, 16x token compressor). In the text it occupies q*(q+1) placeholders
(a newline after each row); tiles form one stitched (h*q) x (w*q) grid with a newline per
stitched row; each image ends with one view-separator placeholder.

Views leave this module as uint8 RGB (4x smaller than float32 in the loader's shared memory and
in the host -> device copy); the model normalises them on its device with `normalize_pixels`
(ToTensor + Normalize(mean=std=0.5), the release's `BasicImageTransform`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from data_tools.images import to_rgb
from pipeline.batch import ImageViews

VIEW_DOWNSAMPLE = 64  # pixels per feature-grid cell: patch 16 x 4 (two stride-2 convs)
PAD_COLOR = (127, 127, 127)  # int(0.5 * 255) per channel, the release's background colour
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
assert len(set(IMAGE_MEAN)) == len(set(IMAGE_STD)) == 1, (
    "normalize_pixels uses one mean / std for all channels"
)


@dataclass(frozen=True)
class ModeSpec:
    """One image mode.

    base_size: side of the global view. image_size: side of the local tiles (crop modes) and,
    for resize modes, the side the image is stretched to. crop: Gundam-style tiling.
    pad: keep the aspect ratio and pad the global view (False = stretch to a square).
    """

    name: str
    base_size: int
    image_size: int
    crop: bool = False
    pad: bool = False
    fold: bool = False  # fold wide line images into stacked rows first (`fold_line`)

    def __post_init__(self) -> None:
        for field_name in ("base_size", "image_size"):
            side = getattr(self, field_name)
            if side <= 0 or side % VIEW_DOWNSAMPLE:
                raise ValueError(
                    f"mode {self.name!r}: {field_name}={side} must be a positive multiple of {VIEW_DOWNSAMPLE}"
                )
        if not self.crop and self.base_size != self.image_size:
            raise ValueError(
                f"mode {self.name!r}: without crop there is a single view, so base_size "
                f"({self.base_size}) must equal image_size ({self.image_size})"
            )
        if self.crop and not self.pad:
            raise ValueError(f"mode {self.name!r}: crop modes pad their global view; set pad=True")
        if self.fold and self.crop:
            raise ValueError(f"mode {self.name!r}: fold (line images) and crop (tiles) exclude each other")

    @property
    def global_grid(self) -> int:
        """Feature-grid side q of the global view."""
        return self.base_size // VIEW_DOWNSAMPLE

    @property
    def tile_grid(self) -> int:
        """Feature-grid side q of one local tile."""
        return self.image_size // VIEW_DOWNSAMPLE


MODES: dict[str, ModeSpec] = {
    "tiny": ModeSpec("tiny", 512, 512, crop=False, pad=False),
    "small": ModeSpec("small", 640, 640, crop=False, pad=False),
    "base": ModeSpec("base", 1024, 1024, crop=False, pad=True),
    "large": ModeSpec("large", 1280, 1280, crop=False, pad=True),
    "gundam": ModeSpec("gundam", 1024, 640, crop=True, pad=True),
    # CPU-sized modes for the embedded default and tests (same rules, smaller sides).
    "debug": ModeSpec("debug", 128, 128, crop=False, pad=False),
    "debug-pad": ModeSpec("debug-pad", 128, 128, crop=False, pad=True),
    "debug-gundam": ModeSpec("debug-gundam", 128, 64, crop=True, pad=True),
    "debug-256": ModeSpec("debug-256", 256, 256, crop=False, pad=False),  # the embedded CPU default
    "lines": ModeSpec("lines", 640, 640, fold=True),  # text-line crops (experiment=real_lines)
    "debug-lines": ModeSpec("debug-lines", 256, 256, fold=True),
}
# The modes the paper trains jointly (stage 2's mixture); the others are CPU-sized test modes.
PAPER_MODES = ("tiny", "small", "base", "large", "gundam")


def view_sizes() -> tuple[int, ...]:
    """Every view side a mode produces (global views and tiles), ascending: the image slots of a
    batch (`pipeline.layout`). Derived from MODES on each call, so a mode added there reaches the
    loader, the layout, the model and the token counts."""
    return tuple(sorted({s for m in MODES.values() for s in (m.base_size, m.image_size)}))


def fold_line(image: Image.Image, max_rows: int = 8, gap: float = 0.1) -> Image.Image:
    """A wide line image cut into k rows stacked top to bottom, k = round(sqrt(width / height))
    (about square; 1 = unchanged). Each cut is the lightest stretch of columns (a word space where
    there is one) within a quarter of a row's width of an even cut point; rows are left-aligned, padded
    and separated by `gap` x height with the image's median colour (its paper)."""
    width, height = image.size
    rows = max(1, min(max_rows, round(math.sqrt(width / height / (1 + gap)))))
    if rows == 1:
        return image
    grey = np.asarray(image.convert("L"), dtype=np.float32)  # (H, W)
    ink = (255.0 - grey).sum(axis=0)  # (W,) darkness per column
    span = max(1, int(0.3 * height))  # about a word space: the gaps between words score lowest
    ink = np.convolve(ink, np.ones(span, dtype=np.float32), mode="same")
    step, window = width / rows, max(1, int(width / rows / 4))
    cuts = [0]
    for j in range(1, rows):
        centre = int(j * step)
        lo, hi = max(cuts[-1] + 1, centre - window), min(width - 1, centre + window)
        cuts.append(lo + int(np.argmin(ink[lo : hi + 1])) if hi >= lo else centre)
    cuts.append(width)
    pieces = [image.crop((a, 0, b, height)) for a, b in zip(cuts, cuts[1:], strict=False)]
    paper = tuple(int(v) for v in np.median(np.asarray(image).reshape(-1, len(image.getbands())), axis=0))
    pitch = height + max(1, round(gap * height))
    folded = Image.new(image.mode, (max(p.width for p in pieces), pitch * rows - (pitch - height)),
                       paper if len(paper) > 1 else paper[0])  # fmt: skip
    for k, piece in enumerate(pieces):
        folded.paste(piece, (0, k * pitch))
    return folded


def get_mode(mode: str | ModeSpec) -> ModeSpec:
    """Resolve a mode name (or pass a ModeSpec through)."""
    if isinstance(mode, ModeSpec):
        return mode
    if mode not in MODES:
        raise ValueError(f"unknown image mode {mode!r}; known modes: {sorted(MODES)}")
    return MODES[mode]


def num_placeholders(mode: str | ModeSpec, grid: tuple[int, int] = (1, 1)) -> int:
    """`<image>` placeholders of one image: global q*(q+1) + 1 separator (+ tiles (q*w+1)*(q*h))."""
    spec = get_mode(mode)
    w, h = grid
    if w < 1 or h < 1:
        raise ValueError(f"tile grid must be at least (1, 1), got {grid}")
    q = spec.global_grid
    count = q * (q + 1) + 1
    if (w, h) != (1, 1):
        if not spec.crop:
            raise ValueError(f"mode {spec.name!r} has no tiles, got grid {grid}")
        t = spec.tile_grid
        count += (t * w + 1) * (t * h)
    return count


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All (w, h) tile grids with min_tiles <= w*h <= max_tiles, stably ordered by tile count.

    Within one tile count the order is the release's: it builds a Python set with this exact
    generator and sorts it by w*h, so ties in the closest-aspect rule resolve by CPython's
    (deterministic, for small int tuples) set iteration order. We reproduce that construction.
    """
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min={min_tiles} max={max_tiles}")
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(
    width: int, height: int, tile_size: int, *, min_tiles: int = 2, max_tiles: int = 9
) -> tuple[int, int]:
    """Closest-aspect-ratio tile grid (w, h) (InternVL rule used by DeepSeek-OCR).

    On an exact tie of |W/H - w/h| the later candidate wins only if the image area exceeds half
    the area the candidate's tiles cover.
    """
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for w, h in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - w / h)
        if diff < best_diff:
            best_diff, best = diff, (w, h)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * w * h:
            best = (w, h)
    return best


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8; `normalize_pixels` turns it into model inputs."""
    if image.mode != "RGB":
        raise ValueError(f"to_pixels needs an RGB image, got mode {image.mode!r}")
    # PIL splits the channels in C: ~40% faster than permuting an (H, W, 3) array into (3, H, W)
    return torch.from_numpy(np.stack([np.asarray(band) for band in image.split()]))  # (3, H, W)


def normalize_pixels(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 views (..., 3, H, W) -> the release's ToTensor + Normalize(mean=std=0.5), in `dtype`.

    Computed in float32 with the torchvision op order ((x / 255 - mean) / std), then cast, so the
    result is the same on every device and equals what a CPU-side float32 transform produced.
    A floating tensor is taken as already normalised and only cast to `dtype`.
    """
    if pixels.is_floating_point():
        return pixels.to(dtype)
    if pixels.dtype != torch.uint8:
        raise TypeError(f"pixels must be uint8 (raw RGB) or floating (normalised), got {pixels.dtype}")
    if pixels.dim() < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"pixels must have shape (..., 3, H, W), got {tuple(pixels.shape)}")
    # every channel alike (the release's 0.5 / 0.5): Python scalars, so no per-call tensor is
    # copied to the device (a host sync inside the training step)
    out = pixels.to(torch.float32).div_(255.0).sub_(IMAGE_MEAN[0]).div_(IMAGE_STD[0])
    return out.to(dtype)


def _check_size(image: Image.Image, source: str) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ValueError(f"{source}: image has zero pixels (size {width}x{height})")


def process_image(
    image: Image.Image,
    mode: str | ModeSpec,
    *,
    min_tiles: int = 2,
    max_tiles: int = 9,
    source: str = "image",
) -> ImageViews:
    """Turn one (EXIF-transposed) image into the views of `mode`; see the module docstring."""
    spec = get_mode(mode)
    _check_size(image, source)
    if image.mode != "RGB":
        image = to_rgb(image)
    if spec.fold:
        image = fold_line(image)
    width, height = image.size

    tiles = None
    grid = (1, 1)
    if spec.crop and (width > spec.image_size or height > spec.image_size):
        grid = choose_grid(width, height, spec.image_size, min_tiles=min_tiles, max_tiles=max_tiles)
        w, h = grid
        side = spec.image_size
        resized = image.resize((side * w, side * h), resample=Image.Resampling.BICUBIC)
        crops = [
            resized.crop((col * side, row * side, (col + 1) * side, (row + 1) * side))
            for row in range(h)
            for col in range(w)
        ]
        tiles = torch.stack([to_pixels(c) for c in crops])  # (w*h, 3, side, side) uint8, row-major

    side = spec.base_size
    if spec.pad:
        global_image = ImageOps.pad(image, (side, side), method=Image.Resampling.BICUBIC, color=PAD_COLOR)
    else:
        global_image = image.resize((side, side), resample=Image.Resampling.BICUBIC)
    return ImageViews(
        global_view=to_pixels(global_image),
        tiles=tiles,
        grid=grid,
        num_placeholders=num_placeholders(spec, grid),
    )


class _Random(Protocol):
    def random(self) -> float: ...


def mode_weights(modes: Mapping[str, float]) -> dict[str, float]:
    """Mode weights of a config source; empty means Base only. (The schemas default to an empty
    dict because OmegaConf merges a dict default with the user's dict instead of replacing it.)"""
    return dict(modes) or {"base": 1.0}


def select_mode(rng: _Random, weights: Mapping[str, float]) -> str:
    """Sample a mode name with probability proportional to `weights` (random.Random or numpy Generator)."""
    if not weights:
        raise ValueError("mode weights are empty")
    for name, weight in weights.items():
        get_mode(name)
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"mode weight for {name!r} must be finite and >= 0, got {weight}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError(f"mode weights sum to {total}; at least one must be positive")
    threshold = rng.random() * total
    cumulative = 0.0
    last_positive = None
    for name, weight in weights.items():
        if weight <= 0:
            continue
        last_positive = name
        cumulative += weight
        if threshold < cumulative:
            return name
    assert last_positive is not None
    return last_positive  # rounding at the top end


def valid_image_tokens(mode: str | ModeSpec, width: int, height: int) -> int:
    """Tokens of a padded global view that cover the image (reporting only, spec section 3)."""
    spec = get_mode(mode)
    n = spec.global_grid**2
    if not spec.pad:
        return n
    long, short = max(width, height), min(width, height)
    return math.ceil(n * (1 - (long - short) / long))
