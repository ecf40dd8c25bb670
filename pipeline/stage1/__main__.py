"""`python -m pipeline.stage1`: export a stage-1 encoder from a finished checkpoint, or inspect an export.

    python -m pipeline.stage1 export runs/stage1_small/model runs/stage1_small/encoder_export
    python -m pipeline.stage1 export CONSOLIDATED_DIR OUT --projector --dtype bf16
    python -m pipeline.stage1 inspect runs/stage1_small/encoder_export

`export` reads our checkpoint layout (a job's `<out_dir>/model`) or a released-layout directory
(e.g. a consolidated pipeline checkpoint, `dsocr-convert consolidate`) and writes the encoder
with `pipeline.stage1.export.export_encoder`. Stage 2 then sets `model.encoder_init=OUT`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "keep": None}


def _export(args: argparse.Namespace) -> int:
    from pipeline.checkpoint_io import load_any
    from pipeline.stage1.export import export_encoder

    model, _ = load_any(args.src)
    out = export_encoder(
        model.encoder,
        args.out,
        include_projector=args.projector,
        dtype=DTYPES[args.dtype],
        source={"checkpoint": str(Path(args.src).resolve())},
    )
    print(f"wrote {out} (stage 2: model.encoder_init={out})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from pipeline.stage1.export import EXPORT_CONFIG, EXPORT_WEIGHTS, is_encoder_export

    path = Path(args.path)
    if not is_encoder_export(path):
        raise ValueError(
            f"{path} is not a stage-1 encoder export (no {EXPORT_CONFIG} with the export format)"
        )
    config = json.loads((path / EXPORT_CONFIG).read_text())
    with safe_open(str(path / EXPORT_WEIGHTS), framework="pt", device="cpu") as handle:
        keys = list(handle.keys())
        numel = sum(math.prod(handle.get_slice(k).get_shape()) for k in keys)
    print(json.dumps({"parts": config["parts"], "tensors": len(keys), "parameters": numel,
                      "n_embed": config["encoder"]["n_embed"], "source": config["source"]}, indent=2))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stage1", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write the encoder of a checkpoint in the released layout")
    exp.add_argument("src", help="our checkpoint directory (<out_dir>/model) or a released-layout directory")
    exp.add_argument("out", help="output directory")
    exp.add_argument(
        "--projector", action="store_true", help="include projector + image_newline/view_seperator"
    )
    exp.add_argument(
        "--dtype", choices=sorted(DTYPES), default="keep", help="tensor dtype (default: as stored)"
    )
    ins = sub.add_parser("inspect", help="print the parts and sizes of an export")
    ins.add_argument("path")
    args = parser.parse_args(argv)
    try:
        return _export(args) if args.command == "export" else _inspect(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
