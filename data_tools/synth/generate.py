"""Synthetic OCR corpus generation into webdataset shards (`dsocr-data synth`).

Mixes three kinds of samples (weights configurable): single text lines ("Free OCR"), full
pages (plain "Free OCR" text or grounding markdown, DeepSeek-OCR prompts from
shared/spec/architecture.md section 4) and matplotlib charts ("Parse the figure." -> HTML
table). Sample `i` is drawn from `random.Random(seed * 1_000_003 + i)` alone, so the corpus
is identical for a given seed and set of installed fonts, whatever the number of workers.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

from tqdm import tqdm

from data_tools.shards import Sample, ShardWriter, ShardWriterConfig, ordered_map
from data_tools.synth.chart import render_chart
from data_tools.synth.degrade import DegradeConfig, degrade
from data_tools.synth.fonts import find_fonts, script_of_lang
from data_tools.synth.page import PageConfig, free_ocr_target, grounding_target, render_page
from data_tools.synth.render import render_line
from data_tools.synth.text import LANGS, TextSource

PROMPT_FREE_OCR = "<image>\nFree OCR."
PROMPT_GROUNDING = "<image>\n<|grounding|>Convert the document to markdown."
PROMPT_FIGURE = "<image>\nParse the figure."
KINDS = ("line", "page", "chart")


@dataclass
class SynthConfig:
    """What to generate.

    n: number of samples. langs: languages for lines and pages (charts are English).
    kinds: relative weights of line / page / chart samples.
    p_grounding: probability that a page gets the grounding-markdown target (else Free OCR).
    line_height: pixel height range of line images; line_chars: character range of line texts.
    """

    n: int
    seed: int = 0
    langs: tuple[str, ...] = LANGS
    kinds: dict = field(default_factory=lambda: {"line": 0.3, "page": 0.5, "chart": 0.2})
    p_grounding: float = 0.5
    line_height: tuple[int, int] = (32, 64)
    line_chars: tuple[int, int] = (5, 60)
    page: PageConfig = field(default_factory=PageConfig)
    line_degrade: DegradeConfig = field(default_factory=lambda: DegradeConfig(p_rotate=0.2, max_degrees=1.5))
    source: str = "synth"
    workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        bad = [lang for lang in self.langs if lang not in LANGS]
        if bad or not self.langs:
            raise ValueError(f"langs {bad or self.langs} not supported; choose from {LANGS}")
        self.langs = tuple(self.langs)
        if set(self.kinds) - set(KINDS) or not any(w > 0 for w in self.kinds.values()):
            raise ValueError(f"kinds must give positive weights over {KINDS}, got {self.kinds}")
        if not 0.0 <= self.p_grounding <= 1.0:
            raise ValueError(f"p_grounding must be in [0, 1], got {self.p_grounding}")
        if not 8 <= self.line_height[0] <= self.line_height[1]:
            raise ValueError(f"line_height must satisfy 8 <= lo <= hi, got {self.line_height}")
        if not 1 <= self.line_chars[0] <= self.line_chars[1]:
            raise ValueError(f"line_chars must satisfy 1 <= lo <= hi, got {self.line_chars}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")

    def check_fonts(self) -> None:
        """Raise MissingFontError (naming what to install) before any work starts."""
        for lang in self.langs:
            find_fonts(script_of_lang(lang))


def _png(img, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _encode(img, jpeg: bytes | None) -> tuple[bytes, str]:
    return (jpeg, "jpg") if jpeg is not None else (_png(img), "png")


def make_sample(index: int, cfg: SynthConfig) -> Sample:
    """Sample `index` of the corpus (depends only on cfg and index)."""
    rng = random.Random(cfg.seed * 1_000_003 + index)
    kinds, weights = zip(*cfg.kinds.items())
    kind = rng.choices(kinds, weights=weights)[0]
    key = f"{cfg.source}-{kind}-{index:09d}"
    if kind == "chart":
        chart = render_chart(rng)
        meta = {"prompt": PROMPT_FIGURE, "answer": chart.html, "source": f"{cfg.source}-chart", "lang": "en",
                "task": "chart", "width": chart.image.width, "height": chart.image.height}  # fmt: skip
        return Sample(key, meta, _png(chart.image), "png")
    lang = rng.choice(cfg.langs)
    if kind == "page":
        page = render_page(rng, lang, cfg.page)
        grounding = rng.random() < cfg.p_grounding
        answer = grounding_target(page.blocks, page.image.size) if grounding else free_ocr_target(page.blocks)
        meta = {"prompt": PROMPT_GROUNDING if grounding else PROMPT_FREE_OCR, "answer": answer,
                "source": f"{cfg.source}-page", "lang": lang, "task": "grounding" if grounding else "free_ocr",
                "width": page.image.width, "height": page.image.height}  # fmt: skip
        return Sample(key, meta, *_encode(page.image, page.jpeg))
    script = script_of_lang(lang)
    text = TextSource(lang, rng).short(*cfg.line_chars)
    font = rng.choice(find_fonts(script))
    height = rng.randint(*cfg.line_height)
    bg = tuple(rng.randint(215, 255) for _ in range(3))
    fg = tuple(rng.randint(0, 70) for _ in range(3))
    img = render_line(text, font, height, script=script, fg=fg, bg=bg, pad=max(2, height // 6))
    img, _, jpeg = degrade(img, rng, cfg.line_degrade, fill=bg)
    meta = {"prompt": PROMPT_FREE_OCR, "answer": text, "source": f"{cfg.source}-line", "lang": lang,
            "task": "free_ocr", "width": img.width, "height": img.height}  # fmt: skip
    return Sample(key, meta, *_encode(img, jpeg))


def _make(args: tuple[int, SynthConfig]) -> Sample:
    return make_sample(*args)


def generate(cfg: SynthConfig, writer_cfg: ShardWriterConfig) -> dict:
    """Write cfg.n synthetic samples into shards; returns the manifest."""
    cfg.check_fonts()
    writer = ShardWriter(writer_cfg, extra_manifest={"synth": {"seed": cfg.seed, "langs": list(cfg.langs)}})
    jobs = ((i, cfg) for i in range(cfg.n))
    try:
        results = ordered_map(_make, jobs, cfg.workers, chunksize=4)
        for sample in tqdm(results, total=cfg.n, unit="sample", disable=not cfg.progress, desc="synth"):
            writer.write(sample)
    except BaseException:
        writer.abort()  # never leave a half-written shard that looks complete
        raise
    return writer.close()
