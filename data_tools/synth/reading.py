"""Fixed-pitch reading lines: the embedded default's training data (a from-scratch curriculum).

Short strings (words, numbers, random letters) rendered left-aligned in a monospace font
(DejaVu Sans Mono, shipped inside matplotlib, so every machine renders the same pixels) on
a strip of `width x width/4` pixels, with jittered colours and a small offset. With a fixed
character pitch of `width / max_chars` every character lands at a predictable column, so a
debug-sized DeepEncoder + decoder trained from scratch learns to ground text positions on
image tokens within minutes on a CPU (../shared/spec/training.md, "Small-scale learning
dynamics": proportional fonts with centred text stay on the character-frequency plateau).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from PIL import Image

from data_tools.shards import Sample, ShardWriter, ShardWriterConfig, ordered_map
from data_tools.synth.render import render_line
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
    max_chars: int = 8
    source: str = "reading-lines"

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        if not 1 <= self.min_chars <= self.max_chars:
            raise ValueError(f"need 1 <= min_chars <= max_chars, got {self.min_chars}, {self.max_chars}")
        if self.width < 8 * self.max_chars or self.width % 4:
            raise ValueError(
                f"width must be a multiple of 4 and >= 8 px per character ({8 * self.max_chars}), got {self.width}"
            )

    @property
    def font_size(self) -> int:
        return int(self.width / self.max_chars / MONO_ADVANCE)


def reading_line(index: int, cfg: ReadingLinesConfig) -> tuple[Image.Image, str]:
    """Sample `index` (depends only on cfg.seed and index)."""
    rng = random.Random(cfg.seed * 1_000_003 + index)
    text = TextSource("en", rng).short(cfg.min_chars, cfg.max_chars)[: cfg.max_chars]
    bg = tuple(rng.randint(205, 255) for _ in range(3))
    fg = tuple(rng.randint(0, 70) for _ in range(3))
    offset = (rng.randint(0, 3), rng.randint(-2, 2))
    image = render_line(text, MONO_FONT, cfg.width // 4, width=cfg.width, font_size=cfg.font_size,
                        fg=fg, bg=bg, pad=2, align="left", offset=offset)  # fmt: skip
    return image, text


def reading_sample(args: tuple[int, ReadingLinesConfig]) -> Sample:
    index, cfg = args
    image, text = reading_line(index, cfg)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    meta = {"prompt": PROMPT, "answer": text, "source": cfg.source, "lang": "en", "task": "free_ocr"}
    return Sample(f"{cfg.source}-{index:09d}", meta, buf.getvalue(), "png")


def write_reading_lines(cfg: ReadingLinesConfig, writer_cfg: ShardWriterConfig, workers: int = 0) -> dict:
    """Render cfg.n lines into webdataset shards (in index order, also with workers); returns the manifest."""
    jobs = ((i, cfg) for i in range(cfg.n))
    with ShardWriter(writer_cfg, extra_manifest={"reading_lines": vars(cfg)}) as writer:
        # spawn: the training job calling this has torch's thread pools running
        for sample in ordered_map(reading_sample, jobs, workers, chunksize=256, start_method="spawn"):
            writer.write(sample)
    return writer.manifest()
