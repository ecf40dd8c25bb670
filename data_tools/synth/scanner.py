"""What a scanner (and the paper under it) does to a typed page: degradations with probabilities.

`scan_degrade(image, rng, cfg)` takes a rendered greyscale image (dark ink on light paper) and
applies, each with its own probability in `ScannerConfig`, in the order a real page meets them:

  ink_bleed     ink spreads into the paper fibres: strokes thicken (a grey-level erosion);
  uneven_paper  low-frequency shading and stains: the paper is darker in places, ink stays dark;
  skew          the page lies rotated on the glass: the image is rotated (expanded, paper fill);
  low_res       scanned at a low resolution: downsampled and scaled back (detail is lost);
  blur          out of focus: a Gaussian blur;
  noise         sensor noise: Gaussian per-pixel noise;
  binarize      bilevel scanning: a global threshold between the ink and paper levels (2 values);
  tint          yellowed paper and coloured ink: the grey levels mapped onto a paper-to-ink ramp;
  jpeg          lossy compression of the stored file.

Underline and strike-through marks are drawn by the renderer (`draw_marks`), which knows where
the words are. All randomness comes from the `random.Random` passed in: a seed fixes the result.
"""

from __future__ import annotations

import io
import random
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

STEPS = ("ink_bleed", "uneven_paper", "skew", "low_res", "blur", "noise", "binarize", "tint", "jpeg")


@dataclass
class ScannerConfig:
    """Probability (`p_*`) and range of each degradation; `ScannerConfig.off()` disables all."""

    p_ink_bleed: float = 0.25
    p_uneven_paper: float = 0.4
    paper_shade: tuple[float, float] = (0.05, 0.3)  # darkest shading, as a fraction of the paper level
    p_skew: float = 0.3
    skew_degrees: tuple[float, float] = (0.2, 1.5)  # magnitude range; the sign is random
    p_low_res: float = 0.3
    low_res_scale: tuple[float, float] = (0.35, 0.75)
    p_blur: float = 0.3
    blur_radius: tuple[float, float] = (0.3, 1.3)
    p_noise: float = 0.3
    noise_sigma: tuple[float, float] = (2.0, 14.0)
    p_binarize: float = 0.15
    p_tint: float = 0.5
    p_jpeg: float = 0.4
    jpeg_quality: tuple[int, int] = (25, 90)
    p_underline: float = 0.08  # per line: one run of words underlined
    p_strike: float = 0.04  # per line: one run of words struck through

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # from YAML
                value = tuple(value)
                setattr(self, f.name, value)
            if f.name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise ValueError(f"scanner {f.name} must be a probability in [0, 1], got {value}")
            if isinstance(value, tuple) and not (len(value) == 2 and 0 <= value[0] <= value[1]):
                raise ValueError(f"scanner {f.name} must be a range (lo, hi) with 0 <= lo <= hi, got {value}")
        self.jpeg_quality = (int(self.jpeg_quality[0]), int(self.jpeg_quality[1]))
        if not 0 < self.low_res_scale[1] <= 1 or not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError("scanner low_res_scale must lie in (0, 1] and jpeg_quality in [1, 100]")
        if self.paper_shade[1] >= 1 or self.skew_degrees[1] > 45:
            raise ValueError("scanner paper_shade must stay below 1 and skew_degrees at most 45")

    @classmethod
    def off(cls) -> ScannerConfig:
        return cls(**{f.name: 0.0 for f in fields(cls) if f.name.startswith("p_")})

    @classmethod
    def only(cls, step: str, **ranges) -> ScannerConfig:
        """Just `step` (a STEPS name, or underline / strike), always: for tests and the contact sheet."""
        cfg = {**asdict(cls.off()), **ranges, f"p_{step}": 1.0}
        return cls(**cfg)


def _levels(arr: np.ndarray) -> tuple[float, float]:
    """(ink, paper) grey levels: the 2nd and 98th percentiles."""
    lo, hi = np.percentile(arr, [2, 98])
    return float(lo), float(hi)


def _smooth_field(rng: random.Random, size: tuple[int, int], cells: int) -> np.ndarray:
    """A smooth random field in [0, 1] of `size` (w, h): a few random values, bicubically enlarged."""
    w, h = size
    gen = np.random.default_rng(rng.getrandbits(63))
    grid = (gen.random((cells, cells)) * 255).astype(np.uint8)
    field = Image.fromarray(grid, "L").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float32) / 255.0  # (H, W)


@dataclass
class Scanned:
    """A degraded image ("L", or "RGB" after tint), the steps applied, and the JPEG file when the
    jpeg step ran (`image` is then its decoded copy: store these bytes, the artefacts seen)."""

    image: Image.Image
    steps: list[str]
    jpeg: bytes | None = None


def scan_degrade(image: Image.Image, rng: random.Random, cfg: ScannerConfig) -> Scanned:
    """Degrade a greyscale ("L") image (dark ink on light paper). The size changes only through
    skew (the rotated page is expanded)."""
    img = image.convert("L")
    applied = []
    if rng.random() < cfg.p_ink_bleed:
        img = img.filter(ImageFilter.MinFilter(3))  # dark ink grows one pixel each way
        applied.append("ink_bleed")
    if rng.random() < cfg.p_uneven_paper:
        arr = np.asarray(img, dtype=np.float32)
        shade = rng.uniform(*cfg.paper_shade)
        gradient = np.linspace(0, 1, img.width, dtype=np.float32)[None, :] * rng.uniform(
            0, 1
        )  # light from one side
        field = np.clip(0.6 * _smooth_field(rng, img.size, rng.randint(2, 5)) + 0.4 * gradient, 0, 1)
        ink, _ = _levels(arr)
        # paper darkens by up to `shade`, ink (already dark) moves proportionally less
        arr = ink + (arr - ink) * (1.0 - shade * field)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
        applied.append("uneven_paper")
    if rng.random() < cfg.p_skew:
        angle = rng.uniform(*cfg.skew_degrees) * rng.choice((-1, 1))
        paper = int(_levels(np.asarray(img))[1])
        img = img.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=paper)
        applied.append("skew")
    if rng.random() < cfg.p_low_res:
        scale = rng.uniform(*cfg.low_res_scale)
        small = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(small, Image.Resampling.BOX).resize(img.size, Image.Resampling.BILINEAR)
        applied.append("low_res")
    if rng.random() < cfg.p_blur:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(*cfg.blur_radius)))
        applied.append("blur")
    if rng.random() < cfg.p_noise:
        gen = np.random.default_rng(rng.getrandbits(63))
        arr = np.asarray(img, dtype=np.float32) + gen.normal(
            0.0, rng.uniform(*cfg.noise_sigma), (img.height, img.width)
        )
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
        applied.append("noise")
    if rng.random() < cfg.p_binarize:
        ink, paper = _levels(np.asarray(img))
        threshold = ink + (paper - ink) * rng.uniform(0.4, 0.65)
        img = img.point(lambda v: 255 if v > threshold else 0)
        applied.append("binarize")
    if rng.random() < cfg.p_tint:
        # yellowed or grey paper (red >= green >= blue); black, grey, blue or violet ribbon ink
        red = rng.randint(200, 252)
        green = red - rng.randint(0, 15)
        paper_rgb = (red, green, green - rng.randint(0, 40))
        ink = rng.randint(0, 100)
        ink_rgb = (ink + rng.randint(0, 25), ink, ink + rng.choice((0, 0, rng.randint(0, 60))))
        ramp = np.linspace(0, 1, 256)[:, None]  # grey level v -> ink + (paper - ink) * v / 255
        palette = np.asarray(ink_rgb) + (np.asarray(paper_rgb) - np.asarray(ink_rgb)) * ramp
        img = img.copy()
        img.putpalette(np.round(palette).astype(np.uint8).tobytes())  # "L" -> "P", one byte per pixel
        img = img.convert("RGB")
        applied.append("tint")
    jpeg = None
    if rng.random() < cfg.p_jpeg:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=rng.randint(*cfg.jpeg_quality))
        jpeg = buf.getvalue()
        img = Image.open(io.BytesIO(jpeg))
        img.load()
        applied.append("jpeg")
    return Scanned(img, applied, jpeg)


def draw_marks(coverage: Image.Image, spans: list[tuple[float, float]], kind: str, baseline: float,
               x_height: float, rng: random.Random) -> None:  # fmt: skip
    """Draw an underline below (kind="underline") or a stroke through (kind="strike") each
    horizontal span (x1, x2) of an "L" ink-coverage image (255 = ink), in place."""
    draw = ImageDraw.Draw(coverage)
    width = max(1, round(x_height / 6))
    for x1, x2 in spans:
        y = baseline + width + 1 if kind == "underline" else baseline - x_height / 2
        wobble = rng.uniform(-1, 1) * (0 if kind == "underline" else x_height / 6)
        draw.line([(x1, y), (x2, y + wobble)], fill=255, width=width)
