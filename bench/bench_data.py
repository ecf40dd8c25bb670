"""Data-path throughput: decode + mode transform + tokenize + pack, samples/s per CPU core.

Preprocessing must not starve the GPUs: target >= 30 samples/s per
core for Base mode on 1024x1024 PNG pages. The script renders synthetic text pages
(1024x1024 PNG, ~40 lines of words, answer = the rendered text), writes them into a
webdataset shard in a temporary directory, and for each mode runs the real loader
(`pipeline.data.StreamingLoader`, one process, torch limited to one thread) with that
mode fixed, packing into rows of `--seq-len`. It prints a table with the per-stage
costs measured separately on the same pages and the end-to-end rate.

    python bench/bench_data.py                      # all modes, 48 samples each
    python bench/bench_data.py --modes base --samples 200 --noise 8

Measured 2026-11-21 on an idle 16-core Intel Xeon host (the device machine), 96 samples
per mode, clean pages (113 KiB PNG), samples/s per core end to end:
tiny 62.0, small 54.9, base 62.8, large 28.0, gundam 21.4 (decode 8.0 ms; transform
base 7.4 ms, gundam 37 ms). Noisy scan-like pages (--noise 8, 985 KiB PNG): base 40.5,
gundam 16.8. With DataLoader workers (StreamingLoader num_workers=W), base: 57 (W=1),
216 (4), 364 (8), 487 (14) samples/s in total; gundam: 20, 70, 127, 187.
On the shared 2-core development machine under load the same script gives ~3x less.
These numbers predate uint8 views: the transform then also normalised to float32 on the host
(~3 ms more per 1024 px view, see the script's last line); the model now does that on its device.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.images import load_rgb  # noqa: E402
from data_tools.synth.render import LineSampler  # noqa: E402
from pipeline.data import LoaderConfig, SourceSpec, StreamingLoader  # noqa: E402
from pipeline.data.testing import sample_members, write_tar  # noqa: E402
from pipeline.processing import PAPER_MODES, normalize_pixels, process_image, to_pixels  # noqa: E402
from pipeline.prompts import PROMPTS, build_example  # noqa: E402
from pipeline.tokenizer import build_tokenizer  # noqa: E402

_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no what up out can more about "
    "document page table figure section analysis results method model data training vision encoder tokens"
)
WORDS = tuple(_TEXT.split(" "))


def render_page(rng: random.Random, size: int, noise: int) -> tuple[bytes, str]:
    """A white page with ~40 lines of random words; returns (PNG bytes, its text)."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=18)
    lines = []
    for top in range(40, size - 40, 24):
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 13)))
        draw.text((40, top), line, fill="black", font=font)
        lines.append(line)
    if noise:
        pixels = np.asarray(image, dtype=np.int16)
        jitter = np.random.default_rng(rng.randrange(2**32)).integers(-noise, noise + 1, pixels.shape[:2])
        image = Image.fromarray(np.clip(pixels - np.abs(jitter)[..., None], 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue(), "\n".join(lines)


def per_call_ms(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return 1000 * (time.perf_counter() - start) / len(items)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(PAPER_MODES))
    parser.add_argument("--samples", type=int, default=48, help="samples per mode (end to end)")
    parser.add_argument("--pages", type=int, default=16, help="distinct synthetic pages")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--noise", type=int, default=0, help="scan-like noise amplitude (0 = clean render)")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--target", type=float, default=30.0, help="Base-mode target, samples/s per core")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-core numbers: PIL is single-threaded too
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    prompt = PROMPTS["free_ocr"]

    rng = random.Random(0)
    pages = [render_page(rng, args.size, args.noise) for _ in range(args.pages)]
    tokenizer = build_tokenizer([text for _, text in pages] * 4, vocab_size=2000)
    with tempfile.TemporaryDirectory() as tmp:
        members = []
        for i, (png, text) in enumerate(pages):
            members += sample_members(f"page{i:04d}", text, png)
        shard = str(write_tar(Path(tmp) / "bench-000000.tar", members))

        images = [load_rgb(png) for png, _ in pages]
        decode_ms = per_call_ms(load_rgb, [png for png, _ in pages])
        png_kb = sum(len(png) for png, _ in pages) / len(pages) / 1024
        print(
            f"{args.pages} pages {args.size}x{args.size} PNG, {png_kb:.0f} KiB each, noise={args.noise}; "
            f"rows of {args.seq_len}; torch threads=1; host load avg {os.getloadavg()[0]:.2f}"
        )
        header = (
            f"{'mode':<8}{'tokens':>8}{'decode ms':>11}{'transform ms':>14}{'tokenize ms':>13}"
            f"{'samples/s/core':>16}{'packing':>9}"
        )
        print(header)
        print("-" * len(header))
        rates = {}
        for mode in modes:
            views = [process_image(image, mode) for image in images]
            transform_ms = per_call_ms(lambda im, m=mode: process_image(im, m), images)
            pairs = list(zip(views, (text for _, text in pages)))
            tokenize_ms = per_call_ms(lambda p: build_example(tokenizer, prompt, p[1], [p[0]]), pairs)
            tokens = np.mean([len(build_example(tokenizer, prompt, t, [v])) for v, t in pairs])
            rate, efficiency = end_to_end(shard, tokenizer, mode, args.samples, args.seq_len)
            rates[mode] = rate
            print(
                f"{mode:<8}{tokens:>8.0f}{decode_ms:>11.1f}{transform_ms:>14.1f}{tokenize_ms:>13.2f}"
                f"{rate:>16.1f}{efficiency:>9.3f}"
            )
    image = images[0]
    pixels_ms = per_call_ms(to_pixels, [image] * 10)
    host_ms = per_call_ms(lambda im: normalize_pixels(to_pixels(im)), [image] * 10)
    print(
        f"one 1024x1024 view: uint8 to_pixels {pixels_ms:.1f} ms (the loader's cost); "
        f"+ float32 normalisation on the host {host_ms:.1f} ms (done on the device instead)"
    )
    lines = LineSampler(
        seed=0, min_len=1, max_len=12, image_size=(256, 64), langs=("en", "ru", "ar", "fa"), bundled_only=True
    )
    per_call_ms(lines.__getitem__, range(20))  # warms the font cache
    lines_ms = per_call_ms(lines.__getitem__, range(1000, 1200))
    print(
        f"synthetic text lines (LineSampler 256x64, the embedded default's data): {lines_ms:.2f} ms per line"
    )
    if "base" in rates:
        verdict = "meets" if rates["base"] >= args.target else "misses"
        print(f"Base: {rates['base']:.1f} samples/s per core {verdict} the target of {args.target:.0f}")


if __name__ == "__main__":
    main()
