"""One rank of a CPU pipeline-training test run (launched N times by tests/parallel/harness.py).

Reads a JSON spec: {"run": RunConfig overrides, "shards": [...], "alphabet": str, "seq_len": int,
"result": path prefix, "nan_steps": [engine steps whose loss is made NaN], "probe": optional
bench.pipeline_probe.StepProbe kwargs} and trains with `run_pipeline_training`; every rank writes
`<result>.rank<N>.json` with what it saw, including "dynamo_graphs": the graphs torch.compile
captured in this process (parallel.compile_layers), and with "probe" the probe's report.
"""

from __future__ import annotations

import faulthandler
import json
import math
import signal
import sys
from pathlib import Path

import torch._dynamo.utils
from harness import rank_outcome, write_rank_result  # noqa: E402  (this directory is on sys.path)
from omegaconf import OmegaConf

from pipeline.config import RunConfig, to_run_config
from pipeline.data.config import LoaderConfig
from pipeline.data.loader import StreamingLoader
from pipeline.parallel import stages
from pipeline.parallel.trainer import run_pipeline_training
from pipeline.tokenizer import build_char_tokenizer


def _poison(nan_steps: set[int]) -> None:
    """Make the head return NaN on the given (0-based) optimizer-step attempts."""
    original = stages.HeadUnit.forward
    calls = {"n": 0}

    def forward(self, inputs):
        loss = original(self, inputs)
        attempt = calls["n"] // self.micro_batches
        calls["n"] += 1
        return loss * math.nan if attempt in nan_steps else loss

    stages.HeadUnit.forward = forward


def main(spec_path: str) -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack (hangs)
    spec = json.loads(Path(spec_path).read_text())
    run: RunConfig = to_run_config(OmegaConf.merge(OmegaConf.structured(RunConfig), spec["run"]))
    tokenizer = build_char_tokenizer(spec["alphabet"])
    if spec.get("nan_steps"):
        stages.HeadUnit.micro_batches = (
            run.parallel.global_batch
            // run.parallel.micro_batch
            // (int(spec["world_size"]) // run.parallel.pp)
        )
        _poison(set(spec["nan_steps"]))

    def loader_factory(dp_rank: int, dp_world: int) -> StreamingLoader:
        config = LoaderConfig.debug(
            spec["shards"], seq_len=spec["seq_len"], batch_size=run.parallel.micro_batch, seed=run.train.seed
        )
        return StreamingLoader(config, tokenizer, dp_rank=dp_rank, dp_world=dp_world)

    probe = None
    if "probe" in spec:  # bench/pipeline_probe.py: engine instruction timings, one profiled step
        from bench.pipeline_probe import StepProbe

        probe = StepProbe(out_dir=Path(run.train.out_dir), **spec["probe"])
    train = lambda: run_pipeline_training(  # noqa: E731
        run, tokenizer=tokenizer, loader_factory=loader_factory, on_step=probe
    )
    out = rank_outcome(train)
    if probe is not None:
        out["probe"] = probe.report()
    out["dynamo_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    write_rank_result(spec, out)


if __name__ == "__main__":
    main(sys.argv[1])
