"""bench/pipeline_probe.py on a CPU pipeline (PP=2, gloo, debug preset, fixed boundary shapes):
the engine's instructions are timed per rank with the 1F1B schedule's counts, the profiled step
leaves a trace and a summary, and `render` lays the ranks side by side."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from bench.pipeline_probe import render
from pipeline.checkpoint_io import save_checkpoint
from tests.parallel.harness import ALPHABET, debug_model_and_shards, launch

ACCUM = 2


@pytest.mark.distributed
def test_probe_times_every_instruction_and_profiles_one_step(tmp_path):
    tok, shards, model = debug_model_and_shards(tmp_path)
    save_checkpoint(model, tok, tmp_path / "init")
    out = tmp_path / "run"
    spec = {
        "run": {
            "model": {"init_from": str(tmp_path / "init"), "freeze_sam": True},
            "parallel": {"pp": 2, "micro_batch": 1, "global_batch": ACCUM, "dtype": "fp32", "zero_stage": 1},
            "train": {"max_steps": 4, "out_dir": str(out), "log_every": 1},
        },
        "shards": shards,
        "alphabet": ALPHABET,
        "seq_len": 128,
        "probe": {"warmup": 1, "profile_step": 3},
    }
    results = launch(spec, 2, tmp_path / "launch")
    reports = [r["probe"] for r in results]
    assert [(r["rank"], r["stage"]) for r in reports] == [(0, 0), (1, 1)]
    for r in reports:
        assert r["steps"] == 2  # steps 2 and 4: step 1 is warm-up, step 3 ran under the profiler
        calls = r["calls_per_step"]
        assert calls["ForwardPass"] == calls["BackwardPass"] == calls["LoadMicroBatch"] == ACCUM
        assert calls["OptimizerStep"] == 1
        assert 0 < sum(r["instructions_ms"].values()) <= r["step_ms"] + 0.5
        assert r["profile"]["step_ms"] > 0 and r["profile"]["gpu_busy_ms"] == 0  # CPU: no kernels
        with gzip.open(Path(out) / r["profile"]["trace"], "rt") as f:
            trace = json.load(f)
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"dsocr_full_step", "pipe.ForwardPass", "pipe.BackwardPass"} <= names
    first, last = (r["calls_per_step"] for r in reports)
    assert first["SendActivation"] == first["RecvGrad"] == ACCUM and "RecvActivation" not in first
    assert last["RecvActivation"] == last["SendGrad"] == ACCUM and "SendActivation" not in last

    table = render(reports).splitlines()
    assert table[0] == "| ms per step | rank 0 (stage 0) | rank 1 (stage 1) |"
    assert any(line.startswith("| ForwardPass | ") and "(x2)" in line for line in table)
    assert any(line.startswith("rank 1 profiled step: ") for line in table)
