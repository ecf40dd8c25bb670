"""`dsocr-bench`: the performance table, peers measured in the same run (bench/suite.py).

    dsocr-bench --out $OUT                          # GPU machine: every row, on the first visible GPU
    dsocr-bench --device cpu --quick --out /tmp/b   # CPU smoke run of the same code paths
    dsocr-bench --only sam,full                     # a subset of decoder,sam,full,finetune,data
    dsocr-bench --render DIR/bench_results.json     # rewrite PERFORMANCE.md from a result JSON

Prints one table (ours, the peer measured in the same run, ratio, target) and the wall time per
section, and writes DIR/bench_results.json and DIR/PERFORMANCE.md (the README performance
fragment; `--render` writes it beside the JSON). The full-step rows train the project's Trainer over
LocalEngine, eager and compiled, against the transformers peer in the same Trainer
(bench/full_step.py). A failing row is reported in the table and the run goes on; `--strict`
then exits 1. `dsocr-bench` is `python -m bench.cli`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from bench import report, suite


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsocr-bench",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument("--quick", action="store_true", help="debug presets, small sizes (the CPU smoke run)")
    parser.add_argument(
        "--only", default=None, help="comma list of decoder,sam,full,finetune,data (default: all)"
    )
    parser.add_argument("--out", type=Path, default=Path("dsocr-bench-out"),
                        help="output directory (default: %(default)s)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="skip optional extras (compiled peers) past this many seconds (default: %(default)s)")  # fmt: skip
    parser.add_argument("--render", type=Path, default=None,
                        help="only re-render PERFORMANCE.md from this JSON")  # fmt: skip
    parser.add_argument("--release-code", default="",
                        help="finetune rows: the released model's folder with its modeling_*.py (the peer's code)")  # fmt: skip
    parser.add_argument("--peer-path", default="",
                        help="finetune rows: PYTHONPATH entry with transformers 4.46.x + peft for the peer process")  # fmt: skip
    parser.add_argument("--strict", action="store_true", help="exit 1 when a row failed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render is not None:
        result = report.load_result(args.render)
        target = args.render.with_name("PERFORMANCE.md")
        target.write_text(report.render_markdown(result))
        print(f"wrote {target}")
        return 0

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    only = tuple(x.strip() for x in args.only.split(",") if x.strip()) if args.only else suite.SECTIONS
    command = "dsocr-bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        settings = suite.BenchSettings(device=device, quick=args.quick, only=only, out=args.out,
                                       budget_s=args.budget_s, command=command.strip(),
                                       release_code=args.release_code, peer_path=args.peer_path)  # fmt: skip
    except ValueError as error:
        print(f"dsocr-bench: {error}", file=sys.stderr)
        return 2
    result = suite.run_suite(settings)
    failed = [r for r in result["rows"] if r["status"] == "failed"]
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
