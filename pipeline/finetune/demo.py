"""Data of the embedded fine-tuning default: reading lines of a script the base model never saw.

The base model of the CPU default reads Latin fixed-pitch lines (data_tools/synth/reading.py,
trained by `dsocr-train`). The fine-tune target is the same kind of line in another language
of data_tools' word lists ("ru": Cyrillic, DejaVu Sans Mono covers it), rendered with the same
font, pitch, colours and jitter, so the only new thing to learn is the script. The replay and
original-capability sets are the Latin lines themselves (`pipeline.train.synth_lines.prepare_synth_lines`).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from data_tools.shards import Sample, ShardWriter, ShardWriterConfig
from data_tools.synth.reading import MONO_FONT, PROMPT, ReadingLinesConfig
from data_tools.synth.render import render_line
from data_tools.synth.text import LANGS, TextSource


def script_line(index: int, cfg: ReadingLinesConfig, lang: str):
    """Sample `index` of language `lang` (depends only on cfg.seed, lang and index)."""
    rng = random.Random(f"{cfg.seed}-{lang}-{index}")
    text = TextSource(lang, rng).short(cfg.min_chars, cfg.max_chars)[: cfg.max_chars].strip()
    if not text:  # a word list entry of spaces only cannot be a reference
        text = TextSource(lang, rng).chars(cfg.min_chars)
    bg = tuple(rng.randint(205, 255) for _ in range(3))
    fg = tuple(rng.randint(0, 70) for _ in range(3))
    offset = (rng.randint(0, 3), rng.randint(-2, 2))
    image = render_line(text, MONO_FONT, cfg.width // 4, width=cfg.width, font_size=cfg.font_size,
                        fg=fg, bg=bg, pad=2, align="left", offset=offset)  # fmt: skip
    return image, text


def write_script_lines(cfg: ReadingLinesConfig, lang: str, out_dir: Path, prefix: str) -> str:
    """Render cfg.n lines of `lang` into shards under out_dir (reused when complete); returns the pattern."""
    if lang not in LANGS:
        raise ValueError(f"finetune.demo.lang must be one of {LANGS}, got {lang!r}")
    record = {**vars(cfg), "lang": lang}
    manifest = out_dir / "manifest.json"
    pattern = str(out_dir / f"{prefix}-*.tar")
    if manifest.exists() and json.loads(manifest.read_text()).get("script_lines") == record:
        return pattern
    writer_cfg = ShardWriterConfig(str(out_dir), prefix=prefix, max_count=5000, overwrite=True)
    with ShardWriter(writer_cfg, extra_manifest={"script_lines": record}) as writer:
        for i in range(cfg.n):
            image, text = script_line(i, cfg, lang)
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=1)
            meta = {"prompt": PROMPT, "answer": text, "source": cfg.source, "lang": lang, "task": "free_ocr"}
            writer.write(Sample(f"{cfg.source}-{i:09d}", meta, buf.getvalue(), "png"))
    return pattern
