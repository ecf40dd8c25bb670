"""One rank of a CPU pipeline-training test run (launched N times by tests/parallel/harness.py).

Reads a JSON spec: {"run": RunConfig overrides, "shards": [...], "alphabet": str, "seq_len": int,
"result": path prefix, "nan_steps": [engine steps whose loss is made NaN], "count_layer_backward":
optional bool} and trains with
`run_pipeline_training`; every rank writes `<result>.rank<N>.json` with what it saw, including
"dynamo_graphs": the graphs torch.compile captured in this process (parallel.compile_layers),
and the backward walks per decoder layer in step 2 when asked.
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
    original = stages.StageUnit.forward
    calls = {"n": 0}

    def forward(self, inputs):
        out = original(self, inputs)
        if self.unit.kind != "head":
            return out
        attempt = calls["n"] // self.micro_batches
        calls["n"] += 1
        return out * math.nan if attempt in nan_steps else out

    stages.StageUnit.forward = forward


class LayerBackwardCounter:
    """on_step hook (an `engine_base.StepView`): how often each decoder layer's weights got a gradient in step 2 (hooks on
    input_layernorm.weight, which every router of the layer and above depends on): the number of
    backward walks through the layer, one per micro-batch when each stage back-propagates once."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.counting = False

    def __call__(self, trainer) -> None:
        if trainer.step == 1:
            for stage_unit in trainer.module.units():
                unit = stage_unit.unit
                if unit.kind == "decoder_layer":
                    self.counts[unit.layer_idx] = 0
                    layer = unit.layer(stage_unit.model)
                    layer.input_layernorm.weight.register_hook(self._hook(unit.layer_idx))
        self.counting = trainer.step == 1  # step 2 only

    def _hook(self, idx: int):
        def count(grad):
            if self.counting:
                self.counts[idx] += 1

        return count


def main(spec_path: str) -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack (hangs)
    spec = json.loads(Path(spec_path).read_text())
    run: RunConfig = to_run_config(OmegaConf.merge(OmegaConf.structured(RunConfig), spec["run"]))
    tokenizer = build_char_tokenizer(spec["alphabet"])
    if spec.get("nan_steps"):
        stages.StageUnit.micro_batches = (
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

    hooks: list = []
    if spec.get("count_layer_backward"):
        hooks.append(LayerBackwardCounter())
    train = lambda: run_pipeline_training(  # noqa: E731
        run, tokenizer=tokenizer, loader_factory=loader_factory, on_step=lambda t: [h(t) for h in hooks]
    )
    out = rank_outcome(train)
    for hook in hooks:
        out["layer_backward_calls"] = hook.counts
    out["dynamo_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    write_rank_result(spec, out)


if __name__ == "__main__":
    main(sys.argv[1])
