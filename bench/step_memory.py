"""One training step of the single-process model: peak memory and host syncs, chunked loss vs full logits.

The PP=1 path (`DeepSeekOCR.forward`) on packed rows of Base-mode pages + text (bench/step_data.py),
bf16 parameters, frozen SAM: forward + backward, once with the chunked loss head
(`loss_chunk_tokens`, the default on every path) and once with full logits
(`loss_chunk_tokens=0`: the (rows, seq_len, vocab) fp32 logits exist at once). Reports the peak
memory of each and the synchronising CUDA calls of the step with the places that made them.

    python -m bench.step_memory --out result.json        # full preset, 8192-token rows (a GPU)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.full_step import RELEASE_IMAGE_TOKEN_ID, cast_parameters
from bench.measure import host_sync_sites
from bench.step_data import make_batches, make_documents, render_views
from pipeline.model import build_model


def measure(encoder: str, decoder: str, seq_len: int, chunks: list[int], device: torch.device) -> dict:
    vocab = 129280 if decoder == "full" else 512
    image_id = RELEASE_IMAGE_TOKEN_ID if vocab > RELEASE_IMAGE_TOKEN_ID else vocab - 1
    views = render_views("base" if encoder == "full" else "debug", 4)
    docs = make_documents(views, 64, text_range=(600, 1300) if seq_len > 2048 else (20, 60),
                          vocab_size=vocab, image_token_id=image_id)  # fmt: skip
    batch = make_batches(docs, seq_len, 1, pad_id=1, image_token_id=image_id)[0].to(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(encoder, decoder, vocab, image_token_id=image_id)
    cast_parameters(model, torch.bfloat16).train()
    model.encoder.freeze_sam()
    out: dict = {"encoder": encoder, "decoder": decoder, "seq_len": seq_len, "tokens": batch.num_tokens,
                 "label_tokens": batch.num_label_tokens, "images": batch.num_images, "variants": {}}  # fmt: skip

    def step() -> None:
        loss = model(batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    for chunk in chunks:
        model.loss_chunk_tokens = chunk
        step()  # warm up kernels and the allocator
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        begin = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - begin
        sites = host_sync_sites(step, device)
        torch.cuda.synchronize(device)
        out["variants"][str(chunk)] = {
            "loss_chunk_tokens": chunk,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "step_s": seconds,
            "host_syncs": sum(sites.values()),
            "sync_sites": dict(sites.most_common(8)),
        }
        print(json.dumps(out["variants"][str(chunk)]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.step_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default="full")
    parser.add_argument("--decoder", default="full")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--chunks", default="2048,0", help="loss_chunk_tokens values (0: full logits)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.step_memory measures CUDA memory: run it on a GPU")
    chunks = [int(c) for c in args.chunks.split(",")]
    result = measure(args.encoder, args.decoder, args.seq_len, chunks, torch.device("cuda"))
    result["device"] = torch.cuda.get_device_name()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
