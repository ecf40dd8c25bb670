"""One rank of a CPU data-parallel or pipeline-initialisation test run (launched by tests/parallel/harness.py
with WORKER pointed here).

Spec (JSON): {"mode": "dp" | "pipeline_init", "run": RunConfig overrides, "shards": [...],
"alphabet": str, "seq_len": int, "result": path prefix, "nan_steps": [optimizer-step attempts
whose loss is made NaN]}.
- "dp": `run_data_parallel_training` with the job's model builder (`build_run_model`: init_from,
  then the stage-1 options); writes `<result>.rank<N>.json` (steps, losses, bad steps, ...).
- "pipeline_init": builds this rank's pipeline stage and loads its weights exactly as a pipeline
  run does (`PipelineEngine`: init_from, then encoder_init / sam_init / clip_init), trains
  nothing, and saves the stage's DeepSeekOCR-keyed state dict to `<result>.rank<N>.pt`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from harness import rank_outcome, write_rank_result  # noqa: E402  (this directory is on sys.path)
from omegaconf import OmegaConf

from pipeline.config import RunConfig, to_run_config
from pipeline.data.config import LoaderConfig
from pipeline.data.loader import StreamingLoader
from pipeline.model import DeepSeekOCR
from pipeline.tokenizer import build_char_tokenizer


def _poison(nan_steps: set[int], micro_batches: int) -> None:
    """Make the model's loss NaN on the given (0-based) optimizer-step attempts."""
    original = DeepSeekOCR.forward
    calls = {"n": 0}

    def forward(self, batch, **kwargs):
        out = original(self, batch, **kwargs)
        attempt = calls["n"] // micro_batches
        calls["n"] += 1
        if attempt in nan_steps:
            out.loss = out.loss * math.nan
        return out

    DeepSeekOCR.forward = forward


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    run: RunConfig = to_run_config(OmegaConf.merge(OmegaConf.structured(RunConfig), spec["run"]))
    tokenizer = build_char_tokenizer(spec["alphabet"])

    def loader_factory(dp_rank: int, dp_world: int) -> StreamingLoader:
        config = LoaderConfig.debug(
            spec["shards"], seq_len=spec["seq_len"], batch_size=run.parallel.micro_batch, seed=run.train.seed
        )
        return StreamingLoader(config, tokenizer, dp_rank=dp_rank, dp_world=dp_world)

    if spec["mode"] == "pipeline_init":
        from pipeline.parallel.checkpoints import run_config_dict
        from pipeline.parallel.trainer import PipelineEngine, init_distributed, prepare

        topology, split, configs, model_dict, _ = prepare(run, tokenizer, int(spec["world_size"]))
        device = init_distributed()
        engine = PipelineEngine(topology, split, configs, tokenizer, device, model_cfg=run.model, data=run.data,
                                parallel=run.parallel, optim=run.optim, train=run.train,
                                record=run_config_dict(run), model_dict=model_dict)  # fmt: skip
        torch.save(
            engine.module.model_state_dict(), f"{spec['result']}.rank{torch.distributed.get_rank()}.pt"
        )
        out = {"stage": engine.stage, "loaded": engine.loaded_encoder_parts}
    else:
        from pipeline.parallel.data_parallel import run_data_parallel_training
        from pipeline.train.job import build_run_model

        if spec.get("nan_steps"):
            accum = run.parallel.global_batch // run.parallel.micro_batch // int(spec["world_size"])
            _poison(set(spec["nan_steps"]), accum)
        out = rank_outcome(
            lambda: run_data_parallel_training(
                run,
                tokenizer=tokenizer,
                loader_factory=loader_factory,
                model_factory=lambda: build_run_model(
                    run.model, tokenizer, loss_chunk_tokens=run.parallel.loss_chunk_tokens
                ),
            )  # fmt: skip
        )
    write_rank_result(spec, out)


if __name__ == "__main__":
    main(sys.argv[1])
