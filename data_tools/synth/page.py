"""Synthetic document pages: title, headings, paragraphs, lists and tables in 1-3 columns.

Every page comes with its layout blocks (label, pixel box, markdown, plain text), from which
`free_ocr_target` builds the "Free OCR" plain-text answer and `grounding_target` the
DeepSeek-OCR grounding markdown: per block
`<|ref|>LABEL<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>` + newline + the block's markdown, with
coordinates in 0..999 bins of the image size (DeepSeek-OCR README and inference scripts,
which map a bin b back to b / 999 * size). Tables are HTML (`<table><tr><td>..`). Arabic and
Persian pages run right to left (right-aligned lines, columns and table cells from the right).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from data_tools.synth.degrade import DegradeConfig, degrade, rotate_box
from data_tools.synth.fonts import RTL_SCRIPTS, FontFile, find_fonts, font_cmap, load_font, script_of_lang
from data_tools.synth.text import TextSource

LABELS = ("title", "sub_title", "text", "table")
_NO_LINE_START = set("，。；：！？）、,.;:!?)")


@dataclass
class Block:
    """One layout element; box is (x1, y1, x2, y2) in pixels of the final image."""

    label: str
    box: tuple[float, float, float, float]
    markdown: str
    plain: str


@dataclass
class PageConfig:
    """Page geometry and content mix.

    width: page width range in pixels; aspect: height/width range.
    columns: column counts to choose from, with column_weights.
    body_size: body font size range in pixels (headings scale up from it).
    block_weights: relative frequency of sub_title / text / list / table blocks.
    """

    width: tuple[int, int] = (896, 1152)
    aspect: tuple[float, float] = (1.2, 1.45)
    columns: tuple[int, ...] = (1, 2, 3)
    column_weights: tuple[float, ...] = (0.5, 0.35, 0.15)
    body_size: tuple[int, int] = (16, 28)
    p_title: float = 0.8
    block_weights: dict = field(
        default_factory=lambda: {"sub_title": 0.15, "text": 0.55, "list": 0.15, "table": 0.15}
    )
    bundled_only: bool = False
    degrade: DegradeConfig = field(default_factory=DegradeConfig)

    def __post_init__(self) -> None:
        if not 64 <= self.width[0] <= self.width[1]:
            raise ValueError(f"width range must satisfy 64 <= lo <= hi, got {self.width}")
        if not 0.2 <= self.aspect[0] <= self.aspect[1] <= 5:
            raise ValueError(f"aspect range must satisfy 0.2 <= lo <= hi <= 5, got {self.aspect}")
        if len(self.columns) != len(self.column_weights) or not self.columns or min(self.columns) < 1:
            raise ValueError("columns and column_weights must be equally long, columns >= 1")
        if not 6 <= self.body_size[0] <= self.body_size[1]:
            raise ValueError(f"body_size must satisfy 6 <= lo <= hi, got {self.body_size}")
        unknown = set(self.block_weights) - {"sub_title", "text", "list", "table"}
        if unknown or not any(v > 0 for v in self.block_weights.values()):
            raise ValueError(
                f"block_weights needs positive weights over sub_title/text/list/table, got {self.block_weights}"
            )


@dataclass
class Page:
    image: Image.Image
    blocks: list[Block]
    lang: str
    jpeg: bytes | None = None


def to_bins(box: tuple[float, float, float, float], size: tuple[int, int]) -> list[int]:
    """Pixel box -> [x1, y1, x2, y2] in 0..999 bins of the image size."""
    w, h = size
    out = []
    for v, s in zip(box, (w, h, w, h)):
        out.append(int(min(999, max(0, round(v / s * 999)))))
    return out


def grounding_target(blocks: list[Block], size: tuple[int, int]) -> str:
    parts = []
    for b in blocks:
        x1, y1, x2, y2 = to_bins(b.box, size)
        parts.append(f"<|ref|>{b.label}<|/ref|><|det|>[[{x1}, {y1}, {x2}, {y2}]]<|/det|>\n{b.markdown}")
    return "\n\n".join(parts)


def free_ocr_target(blocks: list[Block]) -> str:
    return "\n\n".join(b.plain for b in blocks)


def html_table(rows: list[list[str]]) -> str:
    return (
        "<table>" + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows) + "</table>"
    )


class _Painter:
    """Draws text on the page and tracks ink boxes; one per page."""

    def __init__(self, img: Image.Image, script: str, regular: FontFile, bold: FontFile, rng: random.Random):
        self.img, self.draw, self.script, self.rng = img, ImageDraw.Draw(img), script, rng
        self.regular, self.bold = regular, bold
        self.rtl = script in RTL_SCRIPTS
        self.sep = "" if script == "chinese" else " "
        self.ink = tuple(rng.randint(0, 60) for _ in range(3))

    def font(self, size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
        ff = self.bold if bold else self.regular
        return load_font(ff.path, size, ff.index, self.script)

    def wrap(self, text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
        """Greedy line breaking at spaces (per character for Chinese); over-long words are split."""
        tokens = list(text) if self.sep == "" else text.split(" ")
        lines, cur = [], ""
        for tok in tokens:
            cand = tok if not cur else cur + self.sep + tok
            if font.getlength(cand) <= width or (cur and tok in _NO_LINE_START):
                cur = cand
                continue
            if cur:
                lines.append(cur)
            cur = tok
            while font.getlength(cur) > width and len(cur) > 1:  # split a word wider than the column
                k = len(cur) - 1
                while k > 1 and font.getlength(cur[:k]) > width:
                    k -= 1
                lines.append(cur[:k])
                cur = cur[k:]
        if cur:
            lines.append(cur)
        return lines

    def line(self, text: str, font, x0: float, x1: float, y: float, align: str | None = None):
        """Draw one line between x0 and x1 with its top at y; returns the ink box."""
        bbox = font.getbbox(text)
        tw = bbox[2] - bbox[0]
        align = align or ("right" if self.rtl else "left")
        x = x1 - tw if align == "right" else (x0 + (x1 - x0 - tw) / 2 if align == "center" else x0)
        ascent, _ = font.getmetrics()
        self.draw.text((x - bbox[0], y), text, font=font, fill=self.ink)
        return (x, y + bbox[1], x + tw, y + bbox[3]), ascent


def _union(boxes):
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _text_block(p: _Painter, src: TextSource, label: str, x0, x1, y, y_max, size, kind: str):
    """Heading, paragraph or list at (x0..x1, y); returns (Block | None, new y)."""
    bold = label in ("title", "sub_title")
    font = p.font(size, bold)
    lh = int(size * p.rng.uniform(1.25, 1.5))
    if kind == "list":
        numbered = p.rng.random() < 0.5
        items = [src.sentence(3, 10) for _ in range(p.rng.randint(2, 5))]
        bullet = "•" if ord("•") in font_cmap(p.regular.path, p.regular.index) else "-"
        marks = [f"{i + 1}." if numbered else bullet for i in range(len(items))]
        indent = font.getlength("00. ")
        boxes, kept, y0 = [], [], y
        for mark, item in zip(marks, items):
            lines = p.wrap(item, font, x1 - x0 - indent)
            if y + lh * len(lines) > y_max:
                break
            mx0, mx1 = (x1 - indent, x1) if p.rtl else (x0, x0 + indent)
            boxes.append(p.line(mark, font, mx0, mx1, y)[0])
            for ln in lines:
                tx0, tx1 = (x0, x1 - indent) if p.rtl else (x0 + indent, x1)
                boxes.append(p.line(ln, font, tx0, tx1, y)[0])
                y += lh
            kept.append((mark, item))
            y += lh * 0.25
        if not kept:
            return None, y0
        md = "\n".join(f"{m} {t}" if numbered else f"- {t}" for m, t in kept)
        plain = "\n".join(f"{m} {t}" for m, t in kept)
        return Block("text", _union(boxes), md, plain), y + lh * 0.4
    if kind == "heading":
        text = src.heading()
    else:
        text = src.paragraph(1, 4)
    lines = p.wrap(text, font, x1 - x0)
    fit = max(0, int((y_max - y) // lh))
    if fit == 0:
        return None, y
    if len(lines) > fit:
        if kind == "heading":
            return None, y
        lines = lines[:fit]
    text = p.sep.join(lines)
    align = "center" if label == "title" else None
    boxes = []
    for ln in lines:
        boxes.append(p.line(ln, font, x0, x1, y, align)[0])
        y += lh
    prefix = {"title": "# ", "sub_title": "## "}.get(label, "")
    return Block(label, _union(boxes), prefix + text, text), y + lh * (0.6 if bold else 0.5)


def _table_block(p: _Painter, src: TextSource, x0, x1, y, y_max, size):
    """A ruled table with a bold header row; cells right-to-left on RTL pages."""
    font, hfont = p.font(size), p.font(size, True)
    n_cols = p.rng.randint(2, max(2, min(5, int((x1 - x0) // (size * 4)))))
    n_rows = p.rng.randint(2, 6)
    cell_w, pad = (x1 - x0) / n_cols, size * 0.4
    row_h = int(size * 1.7)
    if y + row_h * n_rows + 2 > y_max:
        n_rows = int((y_max - y - 2) // row_h)
        if n_rows < 2:
            return None, y
    rows = []
    for r in range(n_rows):
        f = hfont if r == 0 else font
        row = []
        for _ in range(n_cols):
            cell = src.word() if r == 0 else src.cell()
            while f.getlength(cell) > cell_w - 2 * pad and len(cell) > 1:
                cell = cell[:-1].rstrip()
            row.append(cell)
        rows.append(row)
    for r, row in enumerate(rows):
        top = y + r * row_h
        for c, cell in enumerate(row):
            vc = n_cols - 1 - c if p.rtl else c
            cx0 = x0 + vc * cell_w
            p.line(
                cell,
                hfont if r == 0 else font,
                cx0 + pad,
                cx0 + cell_w - pad,
                top + (row_h - size) / 2 - size * 0.1,
            )
    bottom = y + n_rows * row_h
    for r in range(n_rows + 1):
        p.draw.line([(x0, y + r * row_h), (x1, y + r * row_h)], fill=p.ink, width=1)
    for c in range(n_cols + 1):
        xx = min(x0 + c * cell_w, x1)
        p.draw.line([(xx, y), (xx, bottom)], fill=p.ink, width=1)
    plain = "\n".join(" ".join(r) for r in rows)
    return Block("table", (x0, y, x1 + 1, bottom + 1), html_table(rows), plain), bottom + size


def render_page(rng: random.Random, lang: str, cfg: PageConfig) -> Page:
    """Lay out and draw one page; blocks are in reading order with boxes after degradation."""
    script = script_of_lang(lang)
    fonts = [f for f in find_fonts(script) if not cfg.bundled_only or "mpl-data" in f.path]
    if not fonts:
        raise ValueError(f"no bundled font for {lang!r}; set bundled_only=False")
    regular = rng.choice([f for f in fonts if not f.bold] or fonts)
    bold = rng.choice([f for f in fonts if f.bold] or [regular])
    W = rng.randint(*cfg.width)
    H = int(W * rng.uniform(*cfg.aspect))
    paper = tuple(rng.randint(235, 255) for _ in range(3))
    img = Image.new("RGB", (W, H), paper)
    p = _Painter(img, script, regular, bold, rng)
    src = TextSource(lang, rng)
    size = rng.randint(*cfg.body_size)
    margin = int(W * rng.uniform(0.05, 0.1))
    y, y_max = margin, H - margin
    blocks: list[Block] = []
    if rng.random() < cfg.p_title:
        b, y = _text_block(
            p, src, "title", margin, W - margin, y, y_max, int(size * rng.uniform(1.5, 2.0)), "heading"
        )
        if b:
            blocks.append(b)
    n_cols = rng.choices(cfg.columns, weights=cfg.column_weights)[0]
    n_cols = max(1, min(n_cols, int((W - 2 * margin) // (size * 12)) or 1))
    gap = int(size * 1.5)
    col_w = (W - 2 * margin - gap * (n_cols - 1)) / n_cols
    kinds, weights = zip(*cfg.block_weights.items())
    for c in range(n_cols):
        vc = n_cols - 1 - c if p.rtl else c  # RTL: the first column in reading order is the rightmost
        x0 = margin + vc * (col_w + gap)
        x1 = x0 + col_w
        cy, failures = y, 0
        while cy < y_max - size * 2 and failures < 3:
            kind = rng.choices(kinds, weights=weights)[0]
            if kind == "table":
                b, ny = _table_block(p, src, x0, x1, cy, y_max, size)
            elif kind == "sub_title":
                b, ny = _text_block(p, src, "sub_title", x0, x1, cy, y_max, int(size * 1.25), "heading")
            else:
                b, ny = _text_block(p, src, "text", x0, x1, cy, y_max, size, kind)
            if b is None:
                failures += 1
                continue
            blocks.append(b)
            cy = ny
    img, degrees, jpeg = degrade(img, rng, cfg.degrade, fill=paper)
    if degrees:
        for b in blocks:
            b.box = rotate_box(b.box, degrees, (W, H))
    return Page(img, blocks, lang, jpeg)
