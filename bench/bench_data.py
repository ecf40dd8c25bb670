"""Data-path throughput: decode + mode transform + tokenize + pack, samples/s per CPU core.

Preprocessing must not starve the GPUs: target >= 30 samples/s per core for Base mode on
1024x1024 PNG pages. `render_page` draws synthetic text pages (~40 lines of words, answer = the
rendered text); `end_to_end` runs the real loader (`pipeline.data.StreamingLoader`, one process)
over a shard of them with one mode fixed. `dsocr-bench --only data` (bench/suite.py) writes the
shard and runs it per mode with torch limited to one thread.

Measured 2026-11-21 on an idle 16-core Intel Xeon host (the device machine) with the standalone
script this module was until 2026-12-03, 96 samples per mode, clean pages (113 KiB PNG),
samples/s per core end to end: tiny 62.0, small 54.9, base 62.8, large 28.0, gundam 21.4
(decode 8.0 ms; transform base 7.4 ms, gundam 37 ms). Noisy scan-like pages (985 KiB PNG): base
40.5, gundam 16.8. With DataLoader workers (StreamingLoader num_workers=W), base: 57 (W=1), 216
(4), 364 (8), 487 (14) samples/s in total; gundam: 20, 70, 127, 187. These numbers predate uint8
views: the transform then also normalised to float32 on the host (~3 ms more per 1024 px view);
the model now does that on its device.
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
