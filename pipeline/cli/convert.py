"""`dsocr-convert`: checkpoint conversions between the released DeepSeek-OCR layout and ours.

Subcommands (each registered in `SUBCOMMANDS` as (help, add_arguments, run), so other
conversions, e.g. pipeline-stage consolidation, plug in the same way):

    dsocr-convert from-release RELEASE_DIR OUT_DIR      release -> our layout
    dsocr-convert to-release   CKPT_DIR OUT_DIR [--dtype bf16]   ours (or release) -> release layout
    dsocr-convert inspect      CKPT_DIR                  configs and parameter counts
    dsocr-convert consolidate  RUN_OR_CKPT OUT_DIR [--dtype bf16]   pipeline checkpoint -> release layout

Both layouts are directories with the tokenizer files; see pipeline/checkpoint_io.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from pipeline.cli.help import DefaultsHelpFormatter

_DTYPES = {"keep": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(name: str):
    import torch

    return None if _DTYPES[name] is None else getattr(torch, _DTYPES[name])


def _add_from_release(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="release-layout directory (config.json, *.safetensors, tokenizer files)")
    p.add_argument("out", help="output directory (our layout)")
    p.add_argument("--dtype", default="keep", choices=sorted(_DTYPES))


def _run_from_release(args: argparse.Namespace) -> dict:
    from pipeline.checkpoint_io import import_release, save_checkpoint

    model, _ = import_release(args.src, dtype=_dtype(args.dtype))
    save_checkpoint(model, args.src, args.out)
    return {"written": args.out, "layout": "dsocr"}


def _add_to_release(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="our checkpoint directory (or a release directory to re-export)")
    p.add_argument("out", help="output directory in the released layout")
    p.add_argument("--dtype", default="keep", choices=sorted(_DTYPES), help="tensor dtype in the export")


def _run_to_release(args: argparse.Namespace) -> dict:
    from pipeline.checkpoint_io import export_release, load_any

    model, _ = load_any(args.src, dtype=_dtype(args.dtype))
    export_release(model, args.src, args.out)
    return {"written": args.out, "layout": "release"}


def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint directory (either layout)")


def _run_inspect(args: argparse.Namespace) -> dict:
    from pipeline.checkpoint_io import configs_to_dict, load_any

    model, tokenizer = load_any(args.src)
    return {
        **configs_to_dict(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "encoder_parameters": sum(p.numel() for p in model.encoder.parameters()),
        "decoder_parameters": sum(p.numel() for p in model.decoder.parameters()),
        "tokenizer_vocab": tokenizer.vocab_size,
        "dtype": str(next(model.parameters()).dtype),
    }


def _add_consolidate(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="pipeline run directory (its newest complete checkpoint) or one checkpoint")
    p.add_argument("out", help="output directory in the released layout")
    p.add_argument("--dtype", default="keep", choices=sorted(_DTYPES), help="tensor dtype in the export")


def _run_consolidate(args: argparse.Namespace) -> dict:
    from pipeline.parallel.consolidate import consolidate, resolve_checkpoint

    source = resolve_checkpoint(args.src)
    consolidate(source, args.out, dtype=_dtype(args.dtype))
    return {"written": args.out, "layout": "release", "checkpoint": str(source)}


SUBCOMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], dict]]
] = {
    "from-release": ("release layout -> our layout", _add_from_release, _run_from_release),
    "to-release": ("our layout -> release layout", _add_to_release, _run_to_release),
    "inspect": ("print configs and parameter counts", _add_inspect, _run_inspect),
    "consolidate": ("pipeline checkpoint (any PP/DP) -> release layout", _add_consolidate, _run_consolidate),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsocr-convert",
        description="Convert DeepSeek-OCR checkpoints.",
        formatter_class=DefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, formatter_class=DefaultsHelpFormatter))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = SUBCOMMANDS[args.command][2](args)
    except ValueError as err:
        print(f"dsocr-convert: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
