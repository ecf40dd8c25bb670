"""One training step of the single-process model: peak memory and host syncs, chunked loss vs full logits.

The PP=1 path (`DeepSeekOCR.forward`) on packed rows of Base-mode pages + text (bench/step_data.py),
bf16 parameters (what the DeepSpeed engines train), frozen SAM: forward + backward, once with the
chunked loss head (`loss_chunk_tokens`, the default on every path) and once with full logits
(`loss_chunk_tokens=0`: the (rows, seq_len, vocab) fp32 logits exist at once). Reports the loss,
the peak memory of each and the synchronising CUDA calls of the step with the places that made
them (CUDA only; on CPU the loss and the time).

    python -m bench.step_memory --out result.json        # full preset, 8192-token rows (a GPU)
    python -m bench.step_memory --encoder debug --decoder debug --seq-len 256 --chunks 64,0 --device cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.full_step import FullStepSettings, build_inputs, build_ours
from bench.measure import host_sync_sites, peak_memory_gib, reset_peak_memory, sync


def measure(encoder: str, decoder: str, seq_len: int, chunks: list[int], device: torch.device) -> dict:
    s = FullStepSettings(encoder, decoder, "base" if encoder == "full" else "debug", seq_len, rows=1, steps=1,
                         warmup=1, text_range=(600, 1300) if seq_len > 2048 else (20, 60))  # fmt: skip
    (batch,), vocab, image_id = build_inputs(s)
    batch = batch.to(device)
    model = build_ours(s, vocab, image_id, device).train()
    for p in model.parameters():  # buffers stay fp32 (RoPE's inv_freq)
        p.data = p.data.to(torch.bfloat16)
    out: dict = {"encoder": encoder, "decoder": decoder, "seq_len": seq_len, "tokens": batch.num_tokens,
                 "label_tokens": batch.num_label_tokens, "images": batch.num_images, "variants": {}}  # fmt: skip

    def step() -> torch.Tensor:
        loss = model(batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    for chunk in chunks:
        model.loss_chunk_tokens = chunk
        step()  # warm up kernels and the allocator
        sync(device)
        reset_peak_memory(device)
        begin = time.perf_counter()
        loss = step()
        sync(device)
        seconds = time.perf_counter() - begin
        sites = host_sync_sites(step, device)
        sync(device)
        out["variants"][str(chunk)] = {
            "loss_chunk_tokens": chunk,
            "loss": float(loss),
            "peak_gib": peak_memory_gib(device),
            "step_s": seconds,
            "host_syncs": None if sites is None else sum(sites.values()),
            "sync_sites": None if sites is None else dict(sites.most_common(8)),
        }
        print(json.dumps(out["variants"][str(chunk)]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.step_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default="full", help="encoder preset (default: %(default)s)")
    parser.add_argument("--decoder", default="full", help="decoder preset (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=8192, help="tokens per row (default: %(default)s)")
    parser.add_argument(
        "--chunks", default="2048,0", help="loss_chunk_tokens values, 0: full logits (default: %(default)s)"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="default: %(default)s")
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.step_memory measures CUDA memory: run it on a GPU (or --device cpu)")
    chunks = [int(c) for c in args.chunks.split(",")]
    result = measure(args.encoder, args.decoder, args.seq_len, chunks, torch.device(args.device))
    result["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
