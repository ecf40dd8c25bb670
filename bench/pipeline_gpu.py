"""GPU benchmark of stage-2 pipeline training: full preset, sequence 8192, Base + Gundam pages mixed
with text-only rows, bf16 + ZeRO-1 on DeepSpeed's pipeline engine (pipeline/parallel/trainer.py).

Two phases (bench/pipeline_gpu.sh runs one or several configurations):
  python bench/pipeline_gpu.py make-data DIR           synthetic shards (pages 1240x1754 + text)
  torchrun --nproc_per_node 4 bench/pipeline_gpu.py train DIR --pp 4 [--steps 20]
      [--partition paper|balanced|parameters] [--checkpointing | --no-checkpointing]
      [--checkpoint-stages 2,3] [--global-batch 16] [--loss-chunk 2048] [--micro-batch 1]
      [--compile | --no-compile] [--profile-step K] [--pg-without-device] [--summary FILE]
--micro-batch rows of 8192 tokens per pipeline micro-batch (parallel.micro_batch; the global
batch counts rows, so accumulation = global / (micro x DP)); --compile compiles the repeated
blocks of every stage with inductor (parallel.compile_layers: SAM blocks, CLIP layers, decoder
layers: each unit's `blocks`, pipeline/units.py), compiled during the first steps (--warmup leaves them out).
Every rank trains; the last stage of data-parallel rank 0 writes DIR/<name>/metrics.jsonl.
Every rank times DeepSpeed's pipeline instructions on the host (bench/pipeline_probe.py); rank 0
prints them as one table (ms per step, one column per rank) and the summary keeps them
("engine_ms_per_step"). --profile-step K runs step K under torch.profiler (each rank writes
DIR/<name>/trace_rank<R>.json.gz; its GPU busy / NCCL / compute kernel time goes into the table;
the step is left out of the throughput). --pg-without-device initialises the process group
without binding the device (NCCL's lazy init: the stages' send/recv get per-pair communicators
instead of serialising on the world communicator; the name gains "_pgnodev").
Rank 0 prints one JSON summary (and appends it as one line to --summary): tokens/s per GPU
(mean and median over steps after --warmup), step time, first/last loss, peak GPU memory per stage
(torch.cuda.max_memory_allocated, max over DP ranks) next to the memory model's estimate
(pipeline/parallel/memory.py at 15% vision tokens), the 1F1B bubble (p-1)/(m+p-1) and the MFU
estimate; `python bench/pipeline_gpu.py table FILE` renders the summaries as a markdown table.
Target (issue 7): >= 25,000 tokens/s per H200 for PP=4, and per-stage peaks that fit a
40 GB A100 at micro-batch 1.
The vocabulary is the release's 129,280 (a character tokenizer covers the synthetic text; the
embedding and lm_head have the full size).
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ALPHABET = string.ascii_letters + string.digits + " .,;:-_()"


def make_data(root: Path, *, pages: int = 256, texts: int = 128) -> None:
    from pipeline.data.testing import sample_members, write_ocr_shards, write_tar

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "pages").is_dir():
        write_ocr_shards(
            root / "pages", num_shards=8, per_shard=pages // 8, size=(1240, 1754), answer_chars=2400
        )
    if not (root / "text").is_dir():
        for s in range(4):
            members = []
            for i in range(texts // 4):
                words = " ".join(f"word{(s * 7919 + i * 31 + j) % 997}" for j in range(600))
                members += sample_members(f"text{s:03d}_{i:04d}", None, None, text=words)
            write_tar(root / "text" / f"text-{s:03d}.tar", members)


def bench_run(root: Path, args, world: int):
    """The RunConfig of one benchmark configuration and its name (also its output directory)."""
    from pipeline.config import RunConfig, SourceConfig

    layout = f"pp{args.pp}_dp{world // args.pp}"
    ckpt = "ckpt" if args.checkpointing else "nockpt"
    if args.checkpoint_stages is not None:
        ckpt = "ckpt" + args.checkpoint_stages.replace(",", "")
    name = f"{layout}_{args.partition}_{ckpt}_gb{args.global_batch}_chunk{args.loss_chunk}"
    name += (f"_mb{args.micro_batch}" if args.micro_batch != 1 else "") + ("_compile" if args.compile else "")
    name += "_pgnodev" if args.pg_without_device else ""
    run = RunConfig(name=f"bench-{name}")
    run.model.encoder, run.model.decoder = "full", "full"
    run.model.decoder_overrides = {"vocab_size": 129280}
    run.model.freeze_sam, run.model.gradient_checkpointing = True, args.checkpointing
    p = run.parallel
    p.pp, p.dp, p.micro_batch, p.global_batch = args.pp, None, args.micro_batch, args.global_batch
    p.compile_layers, p.compile_backend = args.compile, "inductor"
    p.dtype, p.zero_stage = "bf16", 1
    p.partition_method, p.loss_chunk_tokens = args.partition, args.loss_chunk
    if args.checkpoint_stages is not None:
        p.checkpoint_stages = [int(s) for s in args.checkpoint_stages.split(",") if s.strip()]
    run.data.kind, run.data.seq_len, run.data.num_workers = "webdataset", args.seq, args.workers
    run.data.sources = [
        SourceConfig(
            "pages", str(root / "pages" / "*.tar"), 0.8, "free_ocr", {"base": 1.0, "gundam": 1.0}, "ocr"
        ),
        SourceConfig("text", str(root / "text" / "*.tar"), 0.2, "text_only", {"base": 1.0}, "text"),
    ]
    run.optim.lr, run.optim.warmup_steps, run.optim.schedule = 3e-5, 5, "step"
    run.train.max_steps, run.train.log_every, run.train.save_every = args.steps, 1, 0
    run.train.out_dir, run.train.resume = str(root / name), False
    return run, name, layout


def summarize(run, name: str, layout: str, args, world: int, peaks: list[float], records: list[dict]) -> dict:
    """The JSON summary of one configuration: throughput over the steps after --warmup, losses,
    measured peaks (GiB, global rank order, max over DP ranks per stage) next to the memory
    model's estimate at 15% vision tokens, and the 1F1B bubble."""
    from pipeline.model import model_configs
    from pipeline.parallel.engine import run_partition
    from pipeline.parallel.memory import stage_memory, workload_of
    from pipeline.parallel.topology import Topology

    dp = world // args.pp
    split = run_partition(run)
    enc, dec = model_configs(run.model)
    estimate = stage_memory(
        split, Topology(world, args.pp, args.micro_batch, args.global_batch), enc, dec, workload_of(run, 0.15)
    )
    steps = [r for r in records if "tokens_per_s" in r]
    # after warm-up; a step run under the profiler is slower and left out
    timed = [r for r in steps[args.warmup :] if r["step"] != args.profile_step] or steps
    mean = lambda key: sum(r.get(key, 0.0) for r in timed) / len(timed)  # noqa: E731
    per_gpu = sorted(r["tokens_per_s_per_gpu"] for r in timed)
    accum = args.global_batch // (args.micro_batch * dp)
    return {
        "name": name,
        "layout": layout,
        "partition": split.method,
        "parts": split.parts,
        "stages": [s.label() for s in split.stages],
        "checkpointing": args.checkpointing,
        "checkpoint_stages": run.parallel.checkpoint_stages,
        "global_batch": args.global_batch,
        "micro_batch": args.micro_batch,
        "compile": args.compile,
        "loss_chunk_tokens": args.loss_chunk,
        "steps": len(steps),
        "tokens_per_s_per_gpu": mean("tokens_per_s_per_gpu"),
        "tokens_per_s_per_gpu_median": per_gpu[len(per_gpu) // 2],
        "tokens_per_s": mean("tokens_per_s"),
        "step_time_s": mean("step_time"),
        "mfu": mean("mfu"),
        "loss_first": steps[0]["loss"],
        "loss_last": steps[-1]["loss"],
        "peak_gib_per_stage": {
            s: round(max(peaks[s * dp + d] for d in range(dp)), 2) for s in range(args.pp)
        },
        "estimated_gib_per_stage": {m.stage: round(m.total / 2**30, 2) for m in estimate},
        "bubble_1f1b": (args.pp - 1) / (accum + args.pp - 1),
    }


def train(root: Path, args) -> None:
    import torch

    from bench.pipeline_probe import StepProbe, render
    from pipeline.data.config import from_run_config
    from pipeline.data.loader import StreamingLoader
    from pipeline.parallel.trainer import run_pipeline_training
    from pipeline.tokenizer import build_char_tokenizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    run, name, layout = bench_run(root, args, world)
    tokenizer = build_char_tokenizer(ALPHABET)

    def loader_factory(dp_rank: int, dp_world: int) -> StreamingLoader:
        cfg = from_run_config(run.data, batch_size=run.parallel.micro_batch, seed=run.train.seed)
        return StreamingLoader(cfg, tokenizer, dp_rank=dp_rank, dp_world=dp_world)

    if args.pg_without_device:  # lazy NCCL init: per-pair communicators for the stages' send/recv
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl")
    probe = StepProbe(warmup=args.warmup, profile_step=args.profile_step, out_dir=Path(run.train.out_dir))
    run_pipeline_training(
        run, tokenizer=tokenizer, loader_factory=loader_factory, final_checkpoint=False, on_step=probe
    )
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    torch.distributed.all_gather(peaks, peak)
    reports = [None] * world
    torch.distributed.all_gather_object(reports, probe.report())
    if torch.distributed.get_rank() == 0:
        print(render(reports), flush=True)
        lines = (Path(run.train.out_dir) / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        summary = summarize(run, name, layout, args, world, [float(p) for p in peaks], records)
        summary["device"] = torch.cuda.get_device_name()
        summary["engine_ms_per_step"] = reports
        print(json.dumps(summary, indent=2), flush=True)
        if args.summary is not None:
            with open(args.summary, "a") as f:
                f.write(json.dumps(summary) + "\n")


def table(path: Path) -> str:
    """Markdown table of the summaries appended to `path` (one JSON object a line)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = [
        "| configuration | stages | tokens/s per GPU | step | loss first -> last "
        "| peak GiB per stage (estimate) | 1F1B bubble |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peaks = " / ".join(
            f"{r['peak_gib_per_stage'][k]:.1f} ({r['estimated_gib_per_stage'][k]:.1f})"
            for k in sorted(r["peak_gib_per_stage"], key=int)
        )
        out.append(
            f"| {r['name']} | {' / '.join(r['stages'])} | {r['tokens_per_s_per_gpu']:,.0f} "
            f"| {r['step_time_s']:.2f} s | {r['loss_first']:.2f} -> {r['loss_last']:.2f} | {peaks} "
            f"| {r['bubble_1f1b']:.1%} |"
        )
    return "\n".join(out)


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=["make-data", "train", "table"])
    parser.add_argument("root", type=Path, help="data directory (table: the summary file)")
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the throughput mean")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=4, help="data workers per loading rank")
    parser.add_argument("--partition", choices=["paper", "balanced", "parameters"], default="paper")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--checkpoint-stages",
        default=None,
        help="comma-separated stages that checkpoint (overrides the flag)",
    )
    parser.add_argument("--loss-chunk", type=int, default=2048, help="loss tokens per chunk; 0 = whole row")
    parser.add_argument("--micro-batch", type=int, default=1, help="rows per pipeline micro-batch")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile (inductor) the repeated blocks of every stage (parallel.compile_layers)",
    )
    parser.add_argument(
        "--profile-step", type=int, default=0,
        help="run this step (>= 2) under torch.profiler; each rank writes trace_rank<R>.json.gz",
    )  # fmt: skip
    parser.add_argument(
        "--pg-without-device", action="store_true",
        help="init the process group without device_id (lazy NCCL init: P2P on per-pair communicators)",
    )  # fmt: skip
    parser.add_argument("--summary", type=Path, default=None, help="append the JSON summary to this file")
    return parser


def main() -> None:
    args = arg_parser().parse_args()
    if args.phase == "make-data":
        make_data(args.root)
    elif args.phase == "table":
        print(table(args.root))
    else:
        train(args.root, args)


if __name__ == "__main__":
    main()
