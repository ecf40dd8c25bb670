"""Synthetic scans of typed documents: text lines up to 100 characters, and pages of them.

Text comes from `scan_text.typed_line`; the font from one of three families, in proportions set
by `ScanConfig.families`:

  typewriter  FreeMono (fonts-freefont-ttf), Liberation Mono (fonts-liberation2), Noto Sans Mono
              (fonts-noto-core), DejaVu Sans Mono (matplotlib); drawn one character at a time on
              a fixed pitch, each with its own strike strength and a small vertical jitter, as
              the type bars of a typewriter leave them;
  serif       FreeSerif, Liberation Serif, Noto Serif, DejaVu Serif;
  sans        FreeSans, Liberation Sans, Noto Sans, DejaVu Sans.

A line image is cropped the way line ground truth is (a margin around the line, at times the
descenders of the line above and the ascenders of the line below cut by the crop edge); a page
puts several lines in one image, its reference being the lines joined by newlines. Underline and
strike marks run over a span of words; with `underline_prefix` (the Tapuscorpus convention is
"_") each underlined word is written with that prefix in the reference. Then the scanner
degradations of `data_tools.synth.scanner` apply. Sample `index` depends only on (seed, index)
and the installed fonts.
"""

from __future__ import annotations

import io
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw

from data_tools.shards import Sample, ShardWriter, ShardWriterConfig, ordered_map
from data_tools.synth.fonts import _extra_dirs, load_font
from data_tools.synth.scan_text import typed_line
from data_tools.synth.scanner import Scanned, ScannerConfig, draw_marks, scan_degrade

PROMPT = "<image>\nFree OCR."
_MPL = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
_FREE = Path("/usr/share/fonts/truetype/freefont")
_LIB = Path("/usr/share/fonts/truetype/liberation2")
_NOTO = Path("/usr/share/fonts/truetype/noto")
# family -> (file, Debian package or "matplotlib"); only files that exist are used
FAMILIES: dict[str, list[tuple[Path, str]]] = {
    "typewriter": [(_FREE / "FreeMono.ttf", "fonts-freefont-ttf"), (_FREE / "FreeMonoBold.ttf", "fonts-freefont-ttf"),
                   (_LIB / "LiberationMono-Regular.ttf", "fonts-liberation2"),
                   (_NOTO / "NotoSansMono-Regular.ttf", "fonts-noto-core"), (_MPL / "DejaVuSansMono.ttf", "matplotlib")],
    "serif": [(_FREE / "FreeSerif.ttf", "fonts-freefont-ttf"), (_LIB / "LiberationSerif-Regular.ttf", "fonts-liberation2"),
              (_NOTO / "NotoSerif-Regular.ttf", "fonts-noto-core"), (_MPL / "DejaVuSerif.ttf", "matplotlib")],
    "sans": [(_FREE / "FreeSans.ttf", "fonts-freefont-ttf"), (_LIB / "LiberationSans-Regular.ttf", "fonts-liberation2"),
             (_NOTO / "NotoSans-Regular.ttf", "fonts-noto-core"), (_MPL / "DejaVuSans.ttf", "matplotlib")],
}  # fmt: skip


def family_fonts(family: str, bundled_only: bool = False) -> list[str]:
    """Installed font files of `family` (the matplotlib one is always there); each file is looked
    up in its package's folder, then in the DSOCR_FONT_DIRS folders (e.g. unpacked packages)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown font family {family!r}; known: {sorted(FAMILIES)}")
    found = []
    for path, pkg in FAMILIES[family]:
        if bundled_only and pkg != "matplotlib":
            continue
        candidates = [path] if pkg == "matplotlib" else [path, *(d / path.name for d in _extra_dirs())]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is not None:
            found.append(str(hit))
    return found


@dataclass
class ScanConfig:
    """What to render: `unit` "line" or "page", text lengths, font sizes and families, degradations."""

    n: int
    seed: int = 0
    unit: str = "line"
    lang: str = "fr"
    min_chars: int = 1
    max_chars: int = 100  # per line
    font_px: tuple[int, int] = (22, 44)
    families: dict[str, float] = field(
        default_factory=lambda: {"typewriter": 0.7, "serif": 0.15, "sans": 0.15}
    )
    page_lines: tuple[int, int] = (4, 16)  # lines per page (unit="page")
    p_neighbours: float = 0.3  # line crops: parts of the lines above / below at the crop edges
    underline_prefix: str = ""
    source: str = "scan-lines"
    bundled_only: bool = False  # only the matplotlib fonts: the same pixels on every machine
    scanner: ScannerConfig = field(default_factory=ScannerConfig)

    def __post_init__(self) -> None:
        if isinstance(self.scanner, dict):
            unknown = set(self.scanner) - {f.name for f in fields(ScannerConfig)}
            if unknown:
                known = ", ".join(f.name for f in fields(ScannerConfig))
                raise ValueError(f"unknown scanner setting(s) {sorted(unknown)}; known: {known}")
            self.scanner = ScannerConfig(**self.scanner)
        self.font_px, self.page_lines = tuple(self.font_px), tuple(self.page_lines)
        if self.unit not in ("line", "page"):
            raise ValueError(f"unit must be 'line' or 'page', got {self.unit!r}")
        if self.lang not in ("fr", "en"):
            raise ValueError(f"lang must be 'fr' or 'en' (the typed-text word lists), got {self.lang!r}")
        if self.n < 0 or not 1 <= self.min_chars <= self.max_chars:
            raise ValueError(
                f"need n >= 0 and 1 <= min_chars <= max_chars, got {self.n}, {self.min_chars}, {self.max_chars}"
            )
        if not 8 <= self.font_px[0] <= self.font_px[1] or not 1 <= self.page_lines[0] <= self.page_lines[1]:
            raise ValueError(
                f"font_px must be 8 <= lo <= hi and page_lines 1 <= lo <= hi, got {self.font_px}, {self.page_lines}"
            )
        if (
            not self.families
            or any(w < 0 for w in self.families.values())
            or sum(self.families.values()) <= 0
        ):
            raise ValueError(
                f"families must give non-negative weights with a positive sum, got {self.families}"
            )
        for family in self.families:
            family_fonts(family)  # ValueError for an unknown family

    def manifest(self) -> dict:
        return {**asdict(self), "scanner": asdict(self.scanner)}


@dataclass
class _Typeset:
    """One line laid out in ink coverage: the image, its text, and where each word is."""

    coverage: Image.Image  # "L", 255 = ink
    text: str
    word_spans: list[tuple[float, float]]  # x extent of each word
    baseline: float
    x_height: float


def _set_line(text: str, font_path: str, typewriter: bool, size: int, rng: random.Random,
              width: int, height: int, x0: float, y_top: float) -> _Typeset:  # fmt: skip
    """Typeset `text` into a new coverage image of width x height with its top at y_top."""
    font = load_font(font_path, size)
    coverage = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(coverage)
    ascent, _ = font.getmetrics()
    baseline = y_top + ascent
    if typewriter:
        pitch = font.getlength("M")
        xs = [x0 + i * pitch for i in range(len(text) + 1)]
        for i, ch in enumerate(text):
            if ch != " ":
                jitter = rng.choice((0, 0, 0, 1, -1)) if rng.random() < 0.5 else 0
                draw.text((xs[i], baseline + jitter), ch, font=font, fill=rng.randint(150, 255), anchor="ls")
    else:
        draw.text((x0, baseline), text, font=font, fill=255, anchor="ls")
        xs = [x0 + font.getlength(text[:i]) for i in range(len(text) + 1)]
    spans, start = [], None
    for i, ch in enumerate(text + " "):
        if ch != " " and start is None:
            start = i
        elif ch == " " and start is not None:
            spans.append((xs[start], xs[i]))
            start = None
    x_height = font.getbbox("x", anchor="ls")[1] * -1 if font.getbbox("x", anchor="ls")[1] < 0 else size * 0.5
    return _Typeset(coverage, text, spans, baseline, x_height)


def _marks(ts: _Typeset, rng: random.Random, cfg: ScanConfig) -> str:
    """Underline / strike a run of words in place; returns the reference text (prefixed words)."""
    words = ts.text.split(" ")
    text = ts.text
    for kind, p in (("underline", cfg.scanner.p_underline), ("strike", cfg.scanner.p_strike)):
        if not ts.word_spans or rng.random() >= p:
            continue
        first = rng.randrange(len(ts.word_spans))
        last = min(len(ts.word_spans) - 1, first + rng.randint(0, 3))
        spans = [(ts.word_spans[first][0], ts.word_spans[last][1])]
        draw_marks(ts.coverage, spans, kind, ts.baseline, ts.x_height, rng)
        if kind == "underline" and cfg.underline_prefix:
            nonempty = [i for i, w in enumerate(words) if w]
            for k in nonempty[first : last + 1]:
                words[k] = cfg.underline_prefix + words[k]
            text = " ".join(words)
    return text


def _ink_to_image(coverage: Image.Image, rng: random.Random) -> Image.Image:
    paper = rng.randint(225, 255)
    ink = rng.randint(0, 60)
    return coverage.point(lambda c: round(paper + (ink - paper) * c / 255))


def render_scan(index: int, cfg: ScanConfig) -> tuple[Image.Image, str]:
    """Sample `index`: a degraded line crop or page, and its reference text."""
    scanned, text = _render(index, cfg)
    return scanned.image, text


def _render(index: int, cfg: ScanConfig) -> tuple[Scanned, str]:
    rng = random.Random(cfg.seed * 1_000_003 + index)
    names = sorted(cfg.families)
    family = rng.choices(names, weights=[cfg.families[n] for n in names])[0]
    fonts = family_fonts(family, cfg.bundled_only)
    font_path = rng.choice(fonts)
    size = rng.randint(*cfg.font_px)
    typewriter = family == "typewriter"
    n_lines = 1 if cfg.unit == "line" else rng.randint(*cfg.page_lines)
    texts = [typed_line(rng, cfg.min_chars, cfg.max_chars, cfg.lang) for _ in range(n_lines)]
    font = load_font(font_path, size)
    widths = [font.getlength("M") * len(t) if typewriter else font.getlength(t) for t in texts]
    line_h = round(size * rng.uniform(1.25, 1.6) * (1 if cfg.unit == "line" else rng.uniform(1.0, 1.5)))
    pad_x, pad_y = rng.randint(2, size), rng.randint(1, max(1, size // 3))
    width = int(max(widths)) + 2 * pad_x + 2
    height = line_h * n_lines + 2 * pad_y
    coverage = Image.new("L", (width, height), 0)
    refs = []
    for k, text in enumerate(texts):
        x0 = pad_x + (rng.randint(0, size) if cfg.unit == "page" and rng.random() < 0.2 else 0)  # indents
        ts = _set_line(text, font_path, typewriter, size, rng, width, height, x0, pad_y + k * line_h)
        refs.append(_marks(ts, rng, cfg))
        coverage.paste(255, mask=ts.coverage)
    if cfg.unit == "line" and rng.random() < cfg.p_neighbours:
        for y_top in (pad_y - line_h, pad_y + line_h):  # the neighbours, mostly outside the crop
            if rng.random() < 0.6:
                other = typed_line(rng, cfg.min_chars, cfg.max_chars, cfg.lang)
                ts = _set_line(other, font_path, typewriter, size, rng, width, height, pad_x, y_top)
                coverage.paste(255, mask=ts.coverage)
    return scan_degrade(_ink_to_image(coverage, rng), rng, cfg.scanner), "\n".join(refs)


def scan_sample(args: tuple[int, ScanConfig]) -> Sample:
    index, cfg = args
    scanned, text = _render(index, cfg)
    image = scanned.image
    if scanned.jpeg is not None:
        data, ext = scanned.jpeg, "jpg"
    else:
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        data, ext = buf.getvalue(), "png"
    meta = {"prompt": PROMPT, "answer": text, "source": cfg.source, "lang": cfg.lang, "task": "free_ocr",
            "width": image.width, "height": image.height}  # fmt: skip
    return Sample(f"{cfg.source}-{index:09d}", meta, data, ext)


def write_scans(cfg: ScanConfig, writer_cfg: ShardWriterConfig, workers: int = 0) -> dict:
    """Render cfg.n samples into webdataset shards (index order, also with workers); the manifest."""
    jobs = ((i, cfg) for i in range(cfg.n))
    with ShardWriter(writer_cfg, extra_manifest={"scan": cfg.manifest()}) as writer:
        # spawn: a training job calling this has torch's thread pools running
        for sample in ordered_map(scan_sample, jobs, workers, chunksize=64, start_method="spawn"):
            writer.write(sample)
    return writer.manifest()
