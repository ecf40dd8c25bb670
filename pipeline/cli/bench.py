"""`dsocr-bench`: the performance table, peers measured in the same run (bench/suite.py).

    dsocr-bench --out $OUT --profile               # GPU machine: every row, 4 GPUs add the pipeline rows
    dsocr-bench --device cpu --quick --profile --out /tmp/b  # CPU smoke run of the same code paths
    dsocr-bench --only sam,full                    # a subset of decoder,sam,full,data,pipeline
    dsocr-bench --render DIR/bench_results.json    # rewrite PERFORMANCE.md from a result JSON

Prints one table (ours, the peer measured in the same run, ratio, target) and the wall time per
section, and writes DIR/bench_results.json and DIR/PERFORMANCE.md (the README performance
fragment; `--fragment PATH` copies it); `--profile` adds the gzip'd Chrome traces of one full
training step (trace_full_step_*.json.gz, open in ui.perfetto.dev) and profile_summary.txt (top
kernels, host syncs, operator table). Single-GPU rows run on the first visible GPU; with 4 GPUs
visible the pipeline rows run bench/pipeline_gpu.sh on the first four, one row per configuration
(`--pipeline-configs 4:balanced:off:16 ...`, `--pipeline-steps`, `--pipeline-timeout-s`;
`--deadline-s` ends the whole run in time by shrinking the pipeline's limit). A
failing row is reported in the table and the run goes on; `--strict` then exits 1. The benchmark
code is the `bench` package (installed with the project).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path


def _import_bench():
    """The installed `bench` package; an editable install made before bench/ was packaged does not
    map it, so fall back to the source checkout this file sits in."""
    try:
        import bench.suite as suite
    except ModuleNotFoundError as error:
        root = Path(__file__).resolve().parents[2]
        if error.name != "bench" or not (root / "bench" / "suite.py").exists():
            raise
        sys.path.insert(0, str(root))
        import bench.suite as suite
    import bench.report as report

    return suite, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsocr-bench",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument(
        "--quick", action="store_true", help="debug presets, small sizes (the CPU smoke test)"
    )
    parser.add_argument("--only", default=None, help="comma list of decoder,sam,full,data,pipeline")
    parser.add_argument("--out", type=Path, default=Path("dsocr-bench-out"), help="output directory")
    parser.add_argument("--profile", action="store_true", help="save torch profiler traces of the full step")
    parser.add_argument(
        "--budget-s", type=float, default=330.0, help="skip optional extras past this many seconds"
    )
    parser.add_argument("--pipeline-steps", type=int, default=12, help="training steps per pipeline layout")
    parser.add_argument(
        "--pipeline-timeout-s",
        type=float,
        default=300.0,
        help="time limit of the pipeline script (both layouts)",
    )
    parser.add_argument(
        "--pipeline-configs",
        nargs="+",
        default=None,
        metavar="CONFIG",
        help="bench/pipeline_gpu.sh configurations PP:PARTITION:CHECKPOINTING:GLOBAL_BATCH[:LOSS_CHUNK], "
        "one row each (default: 4:paper:on:16 2:paper:on:16)",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="end the whole run within this many seconds (the pipeline rows get the time left)",
    )
    parser.add_argument("--fragment", type=Path, default=None, help="also write PERFORMANCE.md to this path")
    parser.add_argument(
        "--render", type=Path, default=None, help="only re-render PERFORMANCE.md from this JSON"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a row failed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    suite, report = _import_bench()
    if args.render is not None:
        result = report.load_result(args.render)
        target = args.fragment or args.render.with_name("PERFORMANCE.md")
        target.write_text(report.render_markdown(result))
        print(f"wrote {target}")
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    only = tuple(x.strip() for x in args.only.split(",") if x.strip()) if args.only else suite.SECTIONS
    command = "dsocr-bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        from bench.pipeline_rows import PipelineSettings

        pipeline = PipelineSettings(steps=args.pipeline_steps, timeout_s=args.pipeline_timeout_s,
                                    configs=tuple(args.pipeline_configs or ()))  # fmt: skip
        settings = suite.BenchSettings(device=device, quick=args.quick, only=only, out=args.out,
                                       profile=args.profile, budget_s=args.budget_s, command=command.strip(),
                                       pipeline=pipeline, deadline_s=args.deadline_s)  # fmt: skip
    except ValueError as error:
        print(f"dsocr-bench: {error}", file=sys.stderr)
        return 2
    result = suite.run_suite(settings)
    if args.fragment is not None:
        args.fragment.write_text(report.render_markdown(result))
        print(f"wrote {args.fragment}")
    failed = [r for r in result["rows"] if r["status"] == "failed"]
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
