"""Benchmark (CUDA, not collected by pytest): SAM relative-position attention formulations.

Compares, in bf16 at DeepSeek-OCR's SAM shapes, forward and forward+backward time and peak
memory of: the plain formulation (bias matrix as SDPA attn_mask, as DeepSeek-OCR's
`sam_vary_sdpa.py`), the augmented q/k formulation (v unpadded / v padded for FlashAttention),
FlexAttention with a score_mod, and mask-free SDPA without any bias (lower bound), then
the whole SAM ViT-B (+ compressor) with each `attn_impl`.

    python tests/deepencoder/bench_rel_pos_attention.py [--batch 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deepencoder.attention import (  # noqa: E402
    augmented_rel_pos_attention,
    decomposed_bias_attention,
    decomposed_rel_terms,
)
from deepencoder.config import SamConfig  # noqa: E402
from deepencoder.sam import SamEncoder  # noqa: E402


def timed(fn, *args, warmup: int = 3, iters: int = 10) -> tuple[float, float]:
    """Mean milliseconds per call of fn(*args) and peak allocated GiB during the calls."""
    for _ in range(warmup):
        fn(*args)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, (torch.cuda.max_memory_allocated() - base) / 2**30


def make_flex():
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)

    def flex(q, k, v, rel_pos_h, rel_pos_w, hw):
        height, width = hw
        rel_h, rel_w = decomposed_rel_terms(q, rel_pos_h, rel_pos_w, hw)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + rel_h[b, h, q_idx, kv_idx // width] + rel_w[b, h, q_idx, kv_idx % width]

        return compiled(q, k, v, score_mod=score_mod)

    return flex


def attention_step(fn, leaves, side):
    out = fn(*leaves, (side, side))
    torch.autograd.grad(out.sum(), leaves[:3], allow_unused=True)


def sam_step(model, x):
    model(x).float().square().mean().backward()


def attention_bench(batch: int) -> list[dict]:
    variants = {
        "bias_mask": decomposed_bias_attention,
        "augmented": augmented_rel_pos_attention,
        "augmented_padv": lambda *a: augmented_rel_pos_attention(*a, pad_value=True),
        "flex": make_flex(),
        "no_rel_pos": lambda q, k, v, *_: F.scaled_dot_product_attention(q, k, v),
    }
    # (name, batch of attention problems, grid side): windows of 14 (25 per 1024 view, padded 64->70),
    # global blocks at 640 / 1024 / 1280.
    shapes = [
        ("window14@1024", batch * 25, 14),
        ("global@640", batch, 40),
        ("global@1024", batch, 64),
        ("global@1280", batch, 80),
    ]
    rows = []
    for shape_name, b, side in shapes:
        n = side * side
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(b, 12, n, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3)
        )
        rel_h = torch.randn(2 * side - 1, 64, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.3
        rel_w = torch.randn(2 * side - 1, 64, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.3
        leaves = [t.requires_grad_() for t in (q, k, v, rel_h, rel_w)]
        ref = decomposed_bias_attention(*[t.float() for t in leaves], (side, side)).detach()
        for name, fn in variants.items():
            row = {"shape": shape_name, "variant": name}
            try:
                with torch.no_grad():
                    out = fn(*leaves, (side, side))
                    if name != "no_rel_pos":
                        row["max_abs_err_vs_fp32"] = (out.float() - ref).abs().max().item()
                    row["fwd_ms"], row["fwd_gib"] = timed(fn, *leaves, (side, side))
                row["fwd_bwd_ms"], row["fwd_bwd_gib"] = timed(attention_step, fn, leaves, side)
            except Exception as exc:  # report a variant the stack cannot run; keep benchmarking the rest
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def sam_bench(batch: int, view: int) -> list[dict]:
    rows = []
    for impl in ("bias", "augmented"):
        torch.manual_seed(0)
        model = SamEncoder(SamConfig(attn_impl=impl)).cuda().to(torch.bfloat16)
        model.init_weights()
        with torch.no_grad():
            for block in model.blocks:
                block.attn.rel_pos_h.normal_(std=0.3)
                block.attn.rel_pos_w.normal_(std=0.3)
        x = torch.randn(batch, 3, view, view, device="cuda", dtype=torch.bfloat16)
        row = {"shape": f"SAM ViT-B+compressor batch {batch} @ {view}", "variant": impl}
        with torch.no_grad():
            row["fwd_ms"], row["fwd_gib"] = timed(model, x, iters=5)
        row["fwd_bwd_ms"], row["fwd_bwd_gib"] = timed(sam_step, model, x, iters=5)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", type=str, default="")
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    rows = attention_bench(args.batch)
    for view in (640, 1024, 1280):
        rows += sam_bench(args.batch, view)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
