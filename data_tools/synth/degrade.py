"""Optional image degradations for synthetic pages: rotation, blur, Gaussian noise, JPEG.

Each step fires with its own probability drawn from the caller's `random.Random`, so a seed
fixes the result. Rotation returns the affine map it applied so grounding boxes can follow.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass
class DegradeConfig:
    """Probabilities and ranges of each degradation (all off with p=0)."""

    p_rotate: float = 0.3
    max_degrees: float = 2.0
    p_blur: float = 0.3
    max_blur_radius: float = 1.2
    p_noise: float = 0.3
    max_noise_sigma: float = 12.0
    p_jpeg: float = 0.3
    jpeg_quality: tuple[int, int] = (30, 90)

    def __post_init__(self) -> None:
        for name in ("p_rotate", "p_blur", "p_noise", "p_jpeg"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.max_degrees <= 45:
            raise ValueError(f"max_degrees must be in [0, 45], got {self.max_degrees}")
        lo, hi = self.jpeg_quality
        if not 1 <= lo <= hi <= 100:
            raise ValueError(f"jpeg_quality must satisfy 1 <= lo <= hi <= 100, got {self.jpeg_quality}")

    @classmethod
    def off(cls) -> DegradeConfig:
        return cls(p_rotate=0.0, p_blur=0.0, p_noise=0.0, p_jpeg=0.0)


def rotate_point(x: float, y: float, degrees: float, size: tuple[int, int]) -> tuple[float, float]:
    """Where (x, y) lands after PIL's `rotate(degrees)` about the centre without expansion."""
    w, h = size
    cx, cy = w / 2, h / 2
    a = math.radians(degrees)  # PIL rotates counter-clockwise on screen (y down)
    dx, dy = x - cx, y - cy
    return cx + dx * math.cos(a) + dy * math.sin(a), cy - dx * math.sin(a) + dy * math.cos(a)


def rotate_box(box: tuple[float, float, float, float], degrees: float, size: tuple[int, int]):
    """Axis-aligned envelope of a rotated box, clipped to the image."""
    x1, y1, x2, y2 = box
    pts = [rotate_point(x, y, degrees, size) for x, y in ((x1, y1), (x2, y1), (x1, y2), (x2, y2))]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    w, h = size
    return max(0.0, min(xs)), max(0.0, min(ys)), min(float(w), max(xs)), min(float(h), max(ys))


def degrade(
    img: Image.Image, rng: random.Random, cfg: DegradeConfig, fill: tuple[int, int, int] = (255, 255, 255)
) -> tuple[Image.Image, float, bytes | None]:
    """Apply the degradations; returns (image, rotation degrees applied, JPEG bytes or None).

    When the JPEG step fires, the returned bytes are the encoded file (store them as-is so
    the artefacts are the ones the model sees) and the image is its decoded copy.
    """
    degrees = 0.0
    if rng.random() < cfg.p_rotate and cfg.max_degrees > 0:
        degrees = rng.uniform(-cfg.max_degrees, cfg.max_degrees)
        img = img.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=fill)
    if rng.random() < cfg.p_blur:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, cfg.max_blur_radius)))
    if rng.random() < cfg.p_noise:
        sigma = rng.uniform(2.0, cfg.max_noise_sigma)
        noise = np.random.default_rng(rng.getrandbits(63)).normal(0.0, sigma, (img.height, img.width, 1))
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) + noise.astype(np.float32)  # (H, W, 3)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    jpeg = None
    if rng.random() < cfg.p_jpeg:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=rng.randint(*cfg.jpeg_quality))
        jpeg = buf.getvalue()
        img = Image.open(io.BytesIO(jpeg))
        img.load()
    return img, degrees, jpeg
