"""Data-path throughput: decode + mode transform + tokenize + pack, samples/s per CPU core.

Preprocessing must not starve the GPUs: target >= 30 samples/s per core for Base mode on
1024x1024 PNG pages. `render_page` draws synthetic text pages (~40 lines of words, answer = the
rendered text); `end_to_end` runs the real loader (`pipeline.data.StreamingLoader`, one process)
over a shard of them with one mode fixed. `dsocr-bench --only data` (bench/suite.py) writes the
shard and runs it per mode with torch limited to one thread. Figures of the standalone script
this module was until 2026-12-03 (DataLoader workers, noisy pages): README, "Component records".
"""

from __future__ import annotations

import io
import random
import time

from PIL import Image, ImageDraw, ImageFont

from pipeline.data import LoaderConfig, SourceSpec, StreamingLoader

_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no what up out can more about "
    "document page table figure section analysis results method model data training vision encoder tokens"
)
WORDS = tuple(_TEXT.split(" "))


def render_page(rng: random.Random, size: int) -> tuple[bytes, str]:
    """A white page with ~40 lines of random words; returns (PNG bytes, its text)."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=18)
    lines = []
    for top in range(40, size - 40, 24):
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 13)))
        draw.text((40, top), line, fill="black", font=font)
        lines.append(line)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue(), "\n".join(lines)


def end_to_end(shard: str, tokenizer, mode: str, samples: int, seq_len: int) -> tuple[float, float]:
    """Samples/s and packing efficiency of StreamingLoader with `mode` fixed, in this process."""
    source = SourceSpec("bench", shard, modes=mode, prompt="free_ocr")
    config = LoaderConfig([source], seq_len=seq_len, batch_size=1, pack_buffer=16, seed=0)
    loader = StreamingLoader(config, tokenizer, dp_rank=0, dp_world=1)
    stream = iter(loader)
    next(stream)  # warm-up: fills the packing buffer
    docs0, start = loader.packing_stats.docs, time.perf_counter()
    while loader.packing_stats.docs - docs0 < samples:
        next(stream)
    elapsed = time.perf_counter() - start
    return (loader.packing_stats.docs - docs0) / elapsed, loader.packing_efficiency
