"""Pipeline runs (PP=2, gloo on CPU, deterministic): a run stopped after a checkpoint and resumed
gives bitwise the loss sequence of an uninterrupted run; a leftover half-written checkpoint is
ignored; NaN losses skip the step (weights unchanged) and stop the run after max_bad_steps."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.checkpoint_io import save_checkpoint
from pipeline.parallel.consolidate import read_pipeline_state
from pipeline.train.checkpoint import checkpoint_root, complete_checkpoints
from tests.parallel.harness import ALPHABET, debug_model_and_shards, launch, truncate_one_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("resume")
    tok, shards, model = debug_model_and_shards(work)
    save_checkpoint(model, tok, work / "init")
    return work, shards


def spec(work, shards, out: str, max_steps: int, **train):
    return {
        "run": {
            "model": {"init_from": str(work / "init"), "freeze_sam": True},
            "parallel": {"pp": 2, "micro_batch": 1, "global_batch": 2, "dtype": "fp32", "zero_stage": 1},
            "train": {
                "max_steps": max_steps,
                "out_dir": str(work / out),
                "log_every": 1,
                "save_every": 2,
                "keep_last": 2,
                "deterministic": True,
                **train,
            },
            "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"},
        },
        "shards": shards,
        "alphabet": ALPHABET,
        "seq_len": 128,
    }


def test_resume_is_bitwise_exact(setup):
    work, shards = setup
    full = launch(spec(work, shards, "full", 4), 2, work / "l-full")
    first = launch(spec(work, shards, "cut", 2), 2, work / "l-cut1")
    assert first[0]["steps"] == 2
    # a save killed half-way leaves a temporary directory: resume must not pick it up
    root = checkpoint_root(work / "cut")
    shutil.copytree(root / "step_00000002", root / ".tmp-step_00000004")
    (root / ".tmp-step_00000004" / "meta.json").unlink()
    truncate_one_file(root / "step_00000002", root / "step_00000003")  # newer, but incomplete
    second = launch(spec(work, shards, "cut", 4), 2, work / "l-cut2")
    for rank in range(2):
        assert first[rank]["losses"] + second[rank]["losses"] == full[rank]["losses"]  # bitwise
    assert [p.name for p in complete_checkpoints(work / "cut")] == ["step_00000002", "step_00000004"]
    assert not list(root.glob(".tmp-*"))
    resumed, _ = read_pipeline_state(root / "step_00000004")
    uninterrupted, _ = read_pipeline_state(checkpoint_root(work / "full") / "step_00000004")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_nan_loss_skips_steps_and_stops(setup):
    work, shards = setup
    # attempts 1 and 2 are NaN: skipped (weights untouched), then training continues
    runs = launch({**spec(work, shards, "nan", 2, save_every=0), "nan_steps": [1, 2]}, 2, work / "l-nan")
    assert all(r["bad_steps"] == 2 and r["steps"] == 2 for r in runs)
    clean = launch(spec(work, shards, "clean", 1, save_every=0), 2, work / "l-clean")
    assert runs[0]["losses"][0] == clean[0]["losses"][0]
    # max_bad_steps in a row: the run stops with a clear message, the last good checkpoint stays
    stop = launch(
        {**spec(work, shards, "stop", 4, max_bad_steps=2, save_every=1), "nan_steps": [1, 2, 3]},
        2,
        work / "l-stop",
    )
    assert all("2 non-finite losses in a row at step 1" in r["error"] for r in stop)
    assert [p.name for p in complete_checkpoints(work / "stop")] == ["step_00000001"]
