"""Fixed-pitch reading lines: the embedded default's training data (a from-scratch curriculum).

Short strings (words, numbers, random letters) rendered left-aligned in a monospace font
(DejaVu Sans Mono, shipped inside matplotlib, so every machine renders the same pixels) on
a strip of `width x width/aspect` pixels (aspect 4 by default), with jittered colours and a
small offset; `text="typed"` writes the French (or English) typed text of the synthetic scans
instead. With a fixed character pitch of `width / max_chars` every character lands at a
predictable column, so a debug-sized DeepEncoder + decoder trained from scratch learns to
ground text positions on image tokens within minutes on a CPU (../shared/spec/training.md,
"Small-scale learning dynamics": proportional fonts with centred text stay on the
character-frequency plateau).

`lines > 1` makes short paragraphs instead: a square page of `width x width` pixels with up to
`lines` left-aligned lines of at most `max_chars` characters (words wrapped, the same fixed
pitch), the reference being the lines joined by newlines. `lang` picks the word list; RTL
languages (Persian) are shaped by raqm and right-aligned (DejaVu Sans Mono covers Persian).
"""

from __future__ import annotations

import io
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw

from data_tools.shards import Sample, ShardWriter, ShardWriterConfig, ordered_map
from data_tools.synth.fonts import RTL_SCRIPTS, load_font, script_of_lang
from data_tools.synth.render import render_line
from data_tools.synth.scan_text import typed_line
from data_tools.synth.text import TextSource

MONO_FONT = str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSansMono.ttf")
MONO_ADVANCE = 0.602  # DejaVu Sans Mono advance width per unit of font size
PROMPT = "<image>\nFree OCR."


@dataclass
class ReadingLinesConfig:
    n: int
    seed: int = 0
    width: int = 256
    min_chars: int = 2
    max_chars: int = 8  # per line; the pitch is width / max_chars
    source: str = "reading-lines"
    lang: str = "en"
    lines: int = 1  # > 1: paragraphs of up to this many lines on a square page
    aspect: int = 4  # a line's strip is width x width / aspect pixels
    text: str = "short"  # "short": TextSource.short (words, numbers, letters); "typed": French/English typed text

    def __post_init__(self) -> None:
        script_of_lang(self.lang)  # ValueError naming the known languages
        if self.text not in ("short", "typed"):
            raise ValueError(f"text must be 'short' or 'typed', got {self.text!r}")
        if self.text == "typed" and (self.lang not in ("fr", "en") or self.lines > 1):
            raise ValueError(f"text='typed' writes single lines in 'fr' or 'en', got lang={self.lang!r}, lines={self.lines}")
        if self.aspect < 1:
            raise ValueError(f"aspect must be >= 1, got {self.aspect}")
        if self.lines < 1:
            raise ValueError(f"lines must be >= 1, got {self.lines}")
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        if not 1 <= self.min_chars <= self.max_chars:
            raise ValueError(f"need 1 <= min_chars <= max_chars, got {self.min_chars}, {self.max_chars}")
        if self.width < 8 * self.max_chars or self.width % 4:
            raise ValueError(
                f"width must be a multiple of 4 and >= 8 px per character ({8 * self.max_chars}), got {self.width}"
            )

    def manifest(self) -> dict:
        return asdict(self)

    @property
    def font_size(self) -> int:
        return int(self.width / self.max_chars / MONO_ADVANCE)


def reading_line(index: int, cfg: ReadingLinesConfig) -> tuple[Image.Image, str]:
    """Sample `index` (depends only on cfg.seed and index): a line, or a paragraph when cfg.lines > 1."""
    rng = random.Random(cfg.seed * 1_000_003 + index)
    if cfg.text == "typed":
        text, script = typed_line(rng, cfg.min_chars, cfg.max_chars, cfg.lang), "latin"
    else:
        source = TextSource(cfg.lang, rng)
        if cfg.lines > 1:
            return _paragraph(source, rng, cfg)
        text = source.short(cfg.min_chars, cfg.max_chars)[: cfg.max_chars].strip() or source.chars(cfg.min_chars)
        script = source.script
    bg = tuple(rng.randint(205, 255) for _ in range(3))
    fg = tuple(rng.randint(0, 70) for _ in range(3))
    rtl = script in RTL_SCRIPTS
    offset = (-rng.randint(0, 3) if rtl else rng.randint(0, 3), rng.randint(-2, 2))
    image = render_line(text, MONO_FONT, cfg.width // cfg.aspect, width=cfg.width, font_size=cfg.font_size, script=script,
                        fg=fg, bg=bg, pad=2, align="right" if rtl else "left", offset=offset)  # fmt: skip
    return image, text


def wrap_words(words: list[str], max_chars: int, max_lines: int) -> list[str]:
    """Greedy wrap into at most `max_lines` lines of <= max_chars characters (long words are cut)."""
    lines, current = [], ""
    for word in words:
        word = word[:max_chars]
        candidate = f"{current} {word}" if current else word
        if len(candidate) <= max_chars:
            current = candidate
            continue
        lines.append(current)
        if len(lines) == max_lines:
            return lines
        current = word
    if current and len(lines) < max_lines:
        lines.append(current)
    return lines


def _paragraph(source: TextSource, rng: random.Random, cfg: ReadingLinesConfig) -> tuple[Image.Image, str]:
    """2..cfg.lines wrapped lines of a random paragraph on a width x width page, one line per
    width / cfg.lines pixels, at the fixed pitch of the lines."""
    n_lines = rng.randint(2, cfg.lines)
    words = " ".join(source.paragraph(3, 8) for _ in range(3)).split()
    lines = wrap_words(words, cfg.max_chars, n_lines)
    bg = tuple(rng.randint(205, 255) for _ in range(3))
    fg = tuple(rng.randint(0, 70) for _ in range(3))
    line_h = cfg.width // cfg.lines
    pitch_size = int((cfg.width - 12) / cfg.max_chars / MONO_ADVANCE)  # a full line fits inside the margins
    font = load_font(MONO_FONT, min(pitch_size, int(line_h * 0.75)), 0, source.script)
    coverage = Image.new("L", (cfg.width, cfg.width), 0)  # glyph coverage, 0..255
    draw = ImageDraw.Draw(coverage)
    rtl = source.script in RTL_SCRIPTS
    x0, y0 = rng.randint(2, 6), rng.randint(2, 6)
    for i, line in enumerate(lines):
        y = y0 + i * line_h + line_h // 2
        if rtl:
            draw.text((cfg.width - x0, y), line, font=font, fill=255, anchor="rm", direction="rtl")
        else:
            draw.text((x0, y), line, font=font, fill=255, anchor="lm")
    return two_colour_page(coverage, fg, bg), "\n".join(lines)


def two_colour_page(coverage: Image.Image, fg: tuple, bg: tuple) -> Image.Image:
    """`fg` over `bg` through an "L" coverage mask, as a palette image: pixel for pixel the RGB page
    that drawing in `fg` on `bg` gives (Pillow blends text and composites alike; test), at one byte
    per pixel. PNG encoding of RGB pages was ~75% of a 1024 px paragraph's rendering time."""
    ramp = Image.frombytes("L", (256, 1), bytes(range(256)))
    palette = Image.composite(Image.new("RGB", (256, 1), fg), Image.new("RGB", (256, 1), bg), ramp)
    page = coverage.copy()
    page.putpalette(palette.tobytes())  # "L" -> "P": coverage level i shows palette colour i
    return page


def reading_sample(args: tuple[int, ReadingLinesConfig]) -> Sample:
    index, cfg = args
    image, text = reading_line(index, cfg)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    meta = {"prompt": PROMPT, "answer": text, "source": cfg.source, "lang": cfg.lang, "task": "free_ocr"}
    return Sample(f"{cfg.source}-{index:09d}", meta, buf.getvalue(), "png")


def write_reading_lines(cfg: ReadingLinesConfig, writer_cfg: ShardWriterConfig, workers: int = 0) -> dict:
    """Render cfg.n lines into webdataset shards (in index order, also with workers); returns the manifest."""
    jobs = ((i, cfg) for i in range(cfg.n))
    with ShardWriter(writer_cfg, extra_manifest={"reading_lines": cfg.manifest()}) as writer:
        # spawn: the training job calling this has torch's thread pools running
        for sample in ordered_map(reading_sample, jobs, workers, chunksize=256, start_method="spawn"):
            writer.write(sample)
    return writer.manifest()
