"""`dsocr-dryrun`: check a training layout on paper before asking for GPUs.

    dsocr-dryrun experiment=paper_stage2 cluster.nodes=20 cluster.gpus_per_node=8 cluster.gpu_mem_gb=40

Composes the same Hydra config as `dsocr-train` (configs/train.yaml + overrides), then prints
the resolved topology (PP, DP, micro-batch, accumulation, global batch), the stage partition
with parameter counts, the estimated memory of every stage against the GPU's memory and the
model FLOPs of one step (formulas: pipeline/parallel/memory.py). Exits 2 and says why when the
layout does not divide or does not fit. CPU only, a few seconds (models are built on the meta
device for the parameter counts).

Arguments: Hydra overrides as for training, plus the dry run's own keys
    cluster.nodes, cluster.gpus_per_node, cluster.gpu_mem_gb, cluster.peak_tflops,
    cluster.reserve_gb       (see `ClusterSpec`; default: the world size the preset pins with
                              parallel.dp x parallel.pp, 8 GPUs a node, A100-40G)
    estimate.vision_fraction share of the tokens that are image placeholders (default 1.0,
                              the worst case for encoder memory)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import RunConfig, register_configs, to_run_config
from pipeline.model import model_configs
from pipeline.parallel.engine import run_partition
from pipeline.parallel.memory import (
    GIB,
    ClusterSpec,
    StageMemory,
    StepFlops,
    Workload,
    stage_memory,
    step_flops,
    workload_of,
)
from pipeline.parallel.partition import Partition
from pipeline.parallel.topology import Topology

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
OWN_PREFIXES = ("cluster.", "estimate.")


# ---------------------------------------------------------------- composing like dsocr-train


def compose_config(
    overrides: Sequence[str] = (), *, job_num: int | None = None, config_dir: Path = CONFIG_DIR
) -> DictConfig:
    """The job config `dsocr-train <overrides>` would run with (the `hydra` node removed).

    Like Hydra's `run_job`, it sets `hydra.runtime.output_dir` (run dir, or sweep dir/subdir
    for `job_num`) and registers the Hydra config, so `${hydra:...}` interpolations resolve.
    """
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        if job_num is None:
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        else:
            gh = GlobalHydra.instance().hydra
            assert gh is not None
            cfg = gh.compose_config("train", overrides=list(overrides), run_mode=RunMode.MULTIRUN)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        if job_num is not None:
            cfg.hydra.job.num = job_num
            cfg.hydra.job.id = str(job_num)
            out = os.path.join(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir))
        else:
            out = str(cfg.hydra.run.dir)
        cfg.hydra.runtime.output_dir = os.path.abspath(out)
    HydraConfig.instance().set_config(cfg)
    job = cfg.copy()
    with read_write(job), open_dict(job):
        del job["hydra"]
    return job


def sweep_jobs(overrides: Sequence[str], config_dir: Path = CONFIG_DIR) -> list[list[str]]:
    """The per-job override lists of `dsocr-train --multirun <overrides>` (basic sweeper).

    Mirrors `BasicSweeper.sweep`: the axes of `hydra.sweeper.params` in the composed config come
    first, the command line after; a key given in both keeps the command line's values.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        gh = GlobalHydra.instance().hydra
        assert gh is not None
        cfg = gh.compose_config("train", overrides=list(overrides), run_mode=RunMode.MULTIRUN)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params or {}) or {}
    merged = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    parsed = OverridesParser.create().parse_overrides(merged)
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


# ---------------------------------------------------------------- the plan


@dataclass
class DryRun:
    run: RunConfig
    cluster: ClusterSpec
    workload: Workload
    topology: Topology
    partition: Partition
    memory: list[StageMemory]
    flops: StepFlops

    @property
    def budget(self) -> float:
        return (self.cluster.gpu_mem_gb - self.cluster.reserve_gb) * GIB

    def problems(self) -> list[str]:
        """Stages whose estimate exceeds the GPU memory less the reserve."""
        return [
            f"stage {m.stage} ({m.label}) needs ~{m.total / GIB:.1f} GiB, more than the "
            f"{self.budget / GIB:.1f} GiB usable of a {self.cluster.gpu_mem_gb:g} GiB GPU "
            f"(reserve {self.cluster.reserve_gb:g} GiB)"
            for m in self.memory
            if m.total > self.budget
        ]

    @property
    def fits(self) -> bool:
        return not self.problems()


def resolve_cluster(run: RunConfig, given: dict[str, float]) -> ClusterSpec:
    """The cluster from `cluster.*` arguments; without nodes and GPUs per node, the shape the
    preset pins (parallel.pp x parallel.dp GPUs, 8 a node); with parallel.dp unset they are
    required. Memory default: A100-40G (the paper's GPU). A shape that contradicts a pinned parallel.dp is
    refused later by `Topology`."""
    kw = {k.split(".", 1)[1]: v for k, v in given.items() if k.startswith("cluster.")}
    if run.parallel.dp is None and not {"nodes", "gpus_per_node"} & kw.keys():
        raise ValueError(
            "parallel.dp is not pinned by this config, so the world size is unknown: give "
            "cluster.nodes=N cluster.gpus_per_node=G (or parallel.dp=D)"
        )
    if run.parallel.dp is not None and not {"nodes", "gpus_per_node"} & kw.keys():
        world = run.parallel.pp * run.parallel.dp
        per_node = min(8, world)
        if world % per_node:
            raise ValueError(
                f"the preset pins {world} GPUs (parallel.pp x parallel.dp), not whole nodes of 8: "
                "give cluster.nodes and cluster.gpus_per_node"
            )
        kw.update(nodes=world // per_node, gpus_per_node=per_node)
    return ClusterSpec(**kw)


def check_experiment(overrides: Sequence[str], config_dir: Path = CONFIG_DIR) -> None:
    """`experiment` is an optional group in configs/train.yaml, so Hydra silently skips a
    misspelt name; refuse it instead."""
    for o in overrides:
        key, _, value = o.partition("=")
        path = config_dir / "experiment" / f"{value}.yaml"
        if key.lstrip("+") == "experiment" and value not in ("", "null") and not path.is_file():
            known = sorted(p.stem for p in (config_dir / "experiment").glob("*.yaml"))
            raise ValueError(f"unknown experiment {value!r}; known: {known}")


def dry_run(run: RunConfig, cluster: ClusterSpec, vision_fraction: float = 1.0) -> DryRun:
    """Resolve topology, partition, memory and FLOPs; raises ValueError if the layout does not divide."""
    par = run.parallel
    topo = Topology(cluster.world_size, par.pp, par.micro_batch, par.global_batch, dp=par.dp)
    part = run_partition(run.model, run.data, run.parallel)
    units = part.units
    enc, dec = model_configs(run.model)
    if run.data.seq_len > dec.max_position_embeddings:
        raise ValueError(
            f"data.seq_len={run.data.seq_len} exceeds the decoder's max_position_embeddings="
            f"{dec.max_position_embeddings}: lower data.seq_len or raise model.decoder_overrides"
            ".max_position_embeddings"
        )
    work = workload_of(run.model, run.data, run.parallel, vision_fraction)
    memory = stage_memory(part, topo, enc, dec, work)
    frozen_sam = units[0].trainable == 0
    flops = step_flops(
        enc, dec, par.global_batch * run.data.seq_len, run.data.seq_len, vision_fraction, frozen_sam
    )
    return DryRun(run, cluster, work, topo, part, memory, flops)


def _gib(x: float) -> str:
    return f"{x / GIB:7.2f}"


def _m(x: int) -> str:
    return f"{x / 1e6:9.1f}M"


def _checkpointing(w: Workload, pp: int) -> str:
    on = [s for s in range(pp) if w.checkpointed(s)]
    return "on" if len(on) == pp else "off" if not on else "stages " + ",".join(map(str, on))


def format_report(d: DryRun) -> str:
    t, c, w = d.topology, d.cluster, d.workload
    lines = [
        f"run {d.run.name}: model {d.run.model.encoder}+{d.run.model.decoder}, {w.dtype}, ZeRO-{w.zero_stage}, "
        f"seq_len {w.seq_len}, activation checkpointing {_checkpointing(w, d.partition.pp)}, "
        f"loss {'over the whole row' if not w.loss_chunk_tokens else f'in chunks of {w.loss_chunk_tokens} tokens'}",
        f"cluster: {c.nodes} node(s) x {c.gpus_per_node} GPU(s) = {c.world_size}, {c.gpu_mem_gb:g} GiB each",
        f"topology: PP {t.pp} x DP {t.dp}; micro-batch {t.micro_batch}, grad accumulation {t.grad_accum}, "
        f"global batch {t.global_batch} ({t.global_batch * w.seq_len:,} tokens); 1F1B bubble {t.bubble_fraction:.1%}",
        f"partition ({d.partition.method}): parts {d.partition.parts}",
        f"{'stage':>5}  {'units':<46} {'trainable':>10} {'frozen':>10}",
    ]
    for s in d.partition.stages:
        lines.append(f"{s.index:>5}  {s.label():<46} {_m(s.trainable)} {_m(s.frozen)}")
    total_t = sum(s.trainable for s in d.partition.stages)
    total_f = sum(s.frozen for s in d.partition.stages)
    lines.append(f"{'':>5}  {'total':<46} {_m(total_t)} {_m(total_f)}")
    lines.append(
        f"memory per GPU, GiB (vision fraction {w.vision_fraction:g}; usable {d.budget / GIB:.1f} of {c.gpu_mem_gb:g}):"
    )
    lines.append(
        f"{'stage':>5} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total':>8}  in-flight  verdict"
    )
    for m in d.memory:
        verdict = "fits" if m.total <= d.budget else "DOES NOT FIT"
        step = (
            [f"optimizer step temporary {m.step_transient / GIB:.2f} GiB"]
            if m.step_transient > m.activations
            else []
        )
        lines.append(
            f"{m.stage:>5} {_gib(m.weights)} {_gib(m.gradients)} {_gib(m.optimizer)} {_gib(m.activations)} "
            f"{_gib(m.total)}  {m.in_flight:>9}  {verdict}" + "".join(f"  ({n})" for n in [*m.notes, *step])
        )
    f = d.flops
    peak = c.world_size * c.peak_tflops * 1e12
    lines.append(
        f"step FLOPs (model, fwd+bwd): {f.total:.3e} = decoder {f.decoder:.3e} + CLIP {f.clip:.3e} + SAM {f.sam:.3e}; "
        f"{f.total / (t.global_batch * w.seq_len) / 1e9:.2f} GFLOP/token; >= {f.total / peak:.2f} s/step at peak "
        f"({c.peak_tflops:g} TFLOP/s per GPU), {f.total / (0.4 * peak):.2f} s at 40% MFU"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """Split the dry run's own `cluster.*` / `estimate.*` keys from the Hydra overrides."""
    own: dict[str, float] = {}
    overrides: list[str] = []
    known = {f"cluster.{f.name}" for f in fields(ClusterSpec)} | {"estimate.vision_fraction"}
    for arg in argv:
        if arg.startswith(OWN_PREFIXES):
            key, sep, value = arg.partition("=")
            if not sep or key not in known:
                raise ValueError(f"unknown dry-run option {arg!r}; known: {sorted(known)} (as key=value)")
            try:
                own[key] = int(value) if key in ("cluster.nodes", "cluster.gpus_per_node") else float(value)
            except ValueError:
                raise ValueError(f"{key} needs a number, got {value!r}") from None
        else:
            overrides.append(arg)
    return own, overrides


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        own, overrides = parse_args(argv)
        check_experiment(overrides)
        run = to_run_config(compose_config(overrides))
        cluster = resolve_cluster(run, own)
        plan = dry_run(run, cluster, own.get("estimate.vision_fraction", 1.0))
    except (ValueError, KeyError, HydraException, OmegaConfBaseException) as err:
        print(f"dsocr-dryrun: refused: {err}", file=sys.stderr)
        return 2
    print(format_report(plan))
    problems = plan.problems()
    if problems:
        for p in problems:
            print(f"dsocr-dryrun: refused: {p}", file=sys.stderr)
        print(
            "dsocr-dryrun: fixes: more pipeline stages (parallel.pp), more data parallelism for ZeRO-1 "
            "sharding, model.gradient_checkpointing=true, a smaller parallel.micro_batch or data.seq_len",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
