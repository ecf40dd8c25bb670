"""`dsocr-infer`: image file(s) + prompt + mode + checkpoint directory -> text (and grounding boxes).

Decoding defaults are the release README's (docs/model.md): greedy,
up to 8192 new tokens, no-repeat n-gram 30 over a window of 90 with `<td>`/`</td>`
whitelisted. Each image is one request; requests are decoded in left-padded batches.
The checkpoint is a release-layout directory (`import_release`) or ours (`save_checkpoint`);
mode and prompt default to the ones it was trained with (its training_info.json).

    dsocr-infer --checkpoint ckpt/ --mode gundam --prompt grounding_markdown page1.png page2.jpg

Exit status: 0 done; 1 some images could not be read (the others' results are printed, the
failed ones listed on stderr; with --json each has an "error" record); 2 nothing ran (a bad
argument or checkpoint, one line naming the file).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from data_tools.images import DEFAULT_MAX_PIXELS
from pipeline.cli.help import DefaultsHelpFormatter
from pipeline.processing import MODES

DTYPES = ("auto", "fp32", "bf16", "fp16")
PARTIAL_FAILURE = 1  # exit status: some images failed, the others' results were printed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        prog="dsocr-infer",
        description="Run DeepSeek-OCR on image files and print the text (and boxes).",
    )
    parser.add_argument("images", nargs="+", help="image files (each one request)")
    parser.add_argument("--checkpoint", required=True, help="release-layout or dsocr checkpoint directory")
    parser.add_argument(
        "--mode",
        default=None,
        choices=sorted(MODES),
        help="image mode (default: the one in the checkpoint's training_info.json, else gundam)",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help="a prompt name (free_ocr, grounding_markdown, grounding_ocr, parse_figure, describe, locate) "
        "or a literal prompt containing <image> (default: the checkpoint's training_info.json, else free_ocr)",
    )
    parser.add_argument("--ref", default=None, help="the object to find, for --prompt locate")
    parser.add_argument("--max-new-tokens", type=int, default=8192, help="generation limit")
    parser.add_argument("--ngram", type=int, default=30, help="no-repeat n-gram size, 0 disables")
    parser.add_argument("--window", type=int, default=90, help="no-repeat window in generated tokens")
    parser.add_argument("--min-tiles", type=int, default=2, help="Gundam tile minimum")
    parser.add_argument("--max-tiles", type=int, default=9, help="Gundam tile limit (paper 9, vLLM config 6)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit")
    parser.add_argument("--batch-size", type=int, default=1, help="images decoded together")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    return parser


def _resolve(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bf16" if torch.device(device).type == "cuda" else "fp32"
    return torch.device(device), {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def run(args: argparse.Namespace) -> list[dict]:
    """Load the model, process every image and decode; returns one record per image."""
    from data_tools.images import load_rgb
    from pipeline.checkpoint_io import load_any
    from pipeline.generation import generate
    from pipeline.grounding import parse_grounding
    from pipeline.processing import process_image
    from pipeline.prompts import get_prompt
    from pipeline.training_info import resolve_mode_prompt

    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--batch-size and --max-new-tokens must be >= 1")
    mode, prompt_name = resolve_mode_prompt(args.checkpoint, args.mode, args.prompt, "dsocr-infer")
    prompt = get_prompt(prompt_name, ref=args.ref) if args.ref is not None else get_prompt(prompt_name)
    if prompt.count("<image>") != 1:
        raise ValueError(f"the prompt must contain exactly one <image> (one per image file), got {prompt!r}")
    device, dtype = _resolve(args.device, args.dtype)
    model, tokenizer = load_any(args.checkpoint, dtype=dtype, device=device)

    records = []
    for start in range(0, len(args.images), args.batch_size):
        paths, pictures, views = [], [], []
        for path in args.images[start : start + args.batch_size]:
            try:  # one unreadable image is reported; the others of the batch still run
                picture = load_rgb(path, max_pixels=args.max_pixels)
                view = process_image(picture, mode, min_tiles=args.min_tiles, max_tiles=args.max_tiles,
                                     source=path)  # fmt: skip
            except ValueError as err:
                records.append({"image": path, "error": str(err)})
                continue
            paths.append(path)
            pictures.append(picture)
            views.append([view])
        if not paths:
            continue
        results = generate(
            model,
            tokenizer,
            views,
            [prompt] * len(paths),
            max_new_tokens=args.max_new_tokens,
            no_repeat_ngram_size=args.ngram or None,
            no_repeat_window=args.window,
        )
        for path, picture, result in zip(paths, pictures, results):
            # grounding tokens are content: decode them back for the parser
            text = tokenizer.decode(result.token_ids)
            boxes = parse_grounding(text, picture.size)
            records.append(
                {
                    "image": path,
                    "text": text,
                    "hit_eos": result.hit_eos,
                    "num_tokens": len(result.token_ids),
                    "boxes": [{"label": label, "boxes": [list(b) for b in bs]} for label, bs in boxes],
                }
            )
    return records


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        records = run(args)
    except ValueError as err:
        print(f"dsocr-infer: error: {err}", file=sys.stderr)
        return 2
    failed = [record for record in records if "error" in record]
    for record in records:
        if args.json:
            print(json.dumps(record, ensure_ascii=False))
            continue
        if "error" in record:
            continue
        print(
            f"==> {record['image']} ({record['num_tokens']} tokens{'' if record['hit_eos'] else ', no EOS'})"
        )
        print(record["text"])
        for entry in record["boxes"]:
            print(f"[box] {entry['label']}: {entry['boxes']}")
    for record in failed:
        print(f"dsocr-infer: error: {record['error']}", file=sys.stderr)
    if failed:
        print(f"dsocr-infer: {len(failed)} of {len(records)} images failed: "
              f"{', '.join(r['image'] for r in failed)}", file=sys.stderr)  # fmt: skip
        return PARTIAL_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
