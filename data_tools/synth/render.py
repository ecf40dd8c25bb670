"""Fast single-line text rendering and an in-memory sampler of short line images.

`render_line` draws one line of text with a real font (RAQM shaping for Arabic/Persian,
BASIC layout elsewhere) into a fixed-size or tight image; fonts are cached per size, so a
64x256 or 128x128 line costs about a millisecond. `LineSampler` is a map-style, seedable
source of (PIL image, text) pairs for the CPU embedded-default training run: item `i` depends
only on (seed, i), so DataLoader workers can index it in any order.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from data_tools.synth.fonts import RTL_SCRIPTS, FontFile, find_fonts, load_font, script_of_lang
from data_tools.synth.text import TextSource


def _font(font: FontFile | str) -> FontFile:
    return FontFile(font) if isinstance(font, str) else font


def fit_font_size(
    text: str, font: FontFile | str, max_size: int, max_width: int | None, script: str = "latin"
):
    """The largest size <= max_size whose rendered text width fits in max_width; (font, bbox)."""
    ff = _font(font)
    size = max(4, int(max_size))
    for _ in range(6):
        f = load_font(ff.path, size, ff.index, script)
        bbox = f.getbbox(text)
        tw = bbox[2] - bbox[0]
        if max_width is None or tw <= max_width or size <= 4:
            return f, bbox
        size = max(4, min(size - 1, int(size * max_width / max(tw, 1))))
    return f, bbox


def render_line(
    text: str,
    font: FontFile | str,
    height: int,
    *,
    width: int | None = None,
    script: str = "latin",
    font_size: int | None = None,
    fg: int | tuple[int, int, int] = 0,
    bg: int | tuple[int, int, int] = 255,
    pad: int = 2,
    align: str | None = None,
    offset: tuple[int, int] = (0, 0),
    mode: str = "RGB",
) -> Image.Image:
    """Render `text` on one line into an image `height` pixels high.

    width None: the image is as wide as the text (+ 2*pad). Otherwise the font shrinks until
    the text fits in `width - 2*pad`. font_size defaults to 0.7*height. align is "left",
    "center" or "right" (default: right for RTL scripts, left otherwise); offset shifts the
    text by (dx, dy) pixels. Colours are grey levels or RGB tuples.
    """
    if height < 4:
        raise ValueError(f"height must be >= 4, got {height}")
    if width is not None and width <= 2 * pad:
        raise ValueError(f"width {width} leaves no room inside pad {pad}")
    if align is None:
        align = "right" if script in RTL_SCRIPTS else "left"
    if align not in ("left", "center", "right"):
        raise ValueError(f"align must be left/center/right, got {align!r}")
    size = font_size or max(4, int(height * 0.7))
    f, bbox = fit_font_size(text, font, size, None if width is None else width - 2 * pad, script)
    tw, th = bbox[2] - bbox[0], bbox[3] - bbox[1]
    if th > height - 2 * pad:  # too tall (e.g. a large explicit font_size): shrink to fit
        f, bbox = fit_font_size(text, font, int(f.size * (height - 2 * pad) / max(th, 1)), None, script)
        if width is not None:
            f, bbox = fit_font_size(text, font, f.size, width - 2 * pad, script)
        tw, th = bbox[2] - bbox[0], bbox[3] - bbox[1]
    w = width if width is not None else tw + 2 * pad
    if mode == "L":
        fg = fg if isinstance(fg, int) else sum(fg) // 3
        bg = bg if isinstance(bg, int) else sum(bg) // 3
    else:
        fg = (fg, fg, fg) if isinstance(fg, int) else fg
        bg = (bg, bg, bg) if isinstance(bg, int) else bg
    img = Image.new(mode, (w, height), bg)
    if align == "left":
        x = pad
    elif align == "right":
        x = w - pad - tw
    else:
        x = (w - tw) // 2
    y = (height - th) // 2
    ImageDraw.Draw(img).text((x - bbox[0] + offset[0], y - bbox[1] + offset[1]), text, font=f, fill=fg)
    return img


@dataclass
class LineSamplerConfig:
    """Short single-line samples.

    image_size: (width, height) of every image. min_len/max_len: characters per text.
    alphabet: draw characters uniformly from it instead of words. langs: languages to mix.
    bundled_only: use only the fonts that ship in matplotlib (same fonts on every machine).
    """

    seed: int = 0
    alphabet: str | None = None
    min_len: int = 1
    max_len: int = 12
    image_size: tuple[int, int] = (256, 64)
    langs: tuple[str, ...] = ("en",)
    bundled_only: bool = False
    color_jitter: bool = True
    position_jitter: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = tuple(self.image_size)
        if len(self.image_size) != 2 or min(self.image_size) < 8:
            raise ValueError(f"image_size must be (width, height) >= 8, got {self.image_size}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if self.alphabet is not None and not self.alphabet.strip():
            raise ValueError("alphabet must contain at least one non-space character")
        if not self.langs:
            raise ValueError("langs must name at least one language")
        self.langs = tuple(self.langs)
        for lang in self.langs:
            script_of_lang(lang)  # raises ValueError for an unknown language


class LineSampler:
    """Map-style and iterable source of (RGB PIL image, text) short-line samples.

    >>> sampler = LineSampler(seed=0, min_len=3, max_len=6, image_size=128)
    >>> image, text = sampler[0]
    """

    def __init__(
        self,
        seed: int = 0,
        alphabet: str | None = None,
        min_len: int = 1,
        max_len: int = 12,
        image_size: int | tuple[int, int] = (256, 64),
        langs: Sequence[str] = ("en",),
        bundled_only: bool = False,
        color_jitter: bool = True,
        position_jitter: bool = True,
    ):
        self.config = LineSamplerConfig(
            seed,
            alphabet,
            min_len,
            max_len,
            image_size,
            tuple(langs),
            bundled_only,
            color_jitter,
            position_jitter,
        )
        self.fonts = {}
        for lang in self.config.langs:
            script = script_of_lang(lang)
            fonts = find_fonts(script)
            if bundled_only:
                fonts = tuple(f for f in fonts if "mpl-data" in f.path)
            self.fonts[lang] = fonts
        if self.config.alphabet is not None:
            self._alphabet = "".join(ch for ch in self.config.alphabet if not ch.isspace())
        for lang, fonts in self.fonts.items():
            if not fonts:
                raise ValueError(f"no bundled font for language {lang!r}; set bundled_only=False")

    def __len__(self) -> int:
        return 2**31

    def sample(self, index: int) -> tuple[Image.Image, str]:
        cfg = self.config
        rng = random.Random(cfg.seed * 1_000_003 + index)
        lang = cfg.langs[rng.randrange(len(cfg.langs))]
        script = script_of_lang(lang)
        if cfg.alphabet is not None:
            n = rng.randint(cfg.min_len, cfg.max_len)
            text = "".join(rng.choice(self._alphabet) for _ in range(n))
        else:
            text = TextSource(lang, rng).short(cfg.min_len, cfg.max_len)
        font = rng.choice(self.fonts[lang])
        w, h = cfg.image_size
        line_h = min(h, max(8, int(min(h, w * 0.5) * rng.uniform(0.45, 0.9))))
        if cfg.color_jitter:
            bg = tuple(rng.randint(205, 255) for _ in range(3))
            fg = tuple(rng.randint(0, 70) for _ in range(3))
        else:
            bg, fg = (255, 255, 255), (0, 0, 0)
        pad = max(2, w // 32)
        dx = dy = 0
        if cfg.position_jitter:
            dx = rng.randint(-pad // 2, pad // 2)
            dy = rng.randint(-(h - line_h) // 2, (h - line_h) // 2) if h > line_h else 0
        line = render_line(text, font, line_h, width=w, script=script, fg=fg, bg=bg, pad=pad, align="center",
                           offset=(dx, 0))  # fmt: skip
        if line_h == h:
            return line, text
        img = Image.new("RGB", (w, h), bg)
        img.paste(line, (0, (h - line_h) // 2 + dy))
        return img, text

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        if index < 0:
            raise IndexError(index)
        return self.sample(index)

    def __iter__(self) -> Iterator[tuple[Image.Image, str]]:
        i = 0
        while True:
            yield self.sample(i)
            i += 1
