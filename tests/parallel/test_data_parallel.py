"""Data-parallel training on DeepSpeed's engine (PP=1, DP=2; gloo on CPU, debug preset): one step
equals the single-process model on the same global batch (loss and updated weights, the frozen
SAM bit-identical), the checkpoint consolidates to the released layout, a stopped and resumed run
gives bitwise the uninterrupted loss sequence, and NaN losses skip steps then stop the run. Also:
the pipeline (PP=2) initialises its encoder from a stage-1 export, each stage its own part."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint_io import load_any, save_checkpoint
from pipeline.model import build_model
from pipeline.parallel.consolidate import consolidate, read_checkpoint_state
from pipeline.stage1.export import export_encoder
from pipeline.train.checkpoint import checkpoint_root, complete_checkpoints
from tests.parallel import harness
from tests.parallel.harness import ALPHABET, debug_model_and_shards, truncate_one_file
from tests.parallel.test_pipeline_parity import OPTIM, SEQ_LEN, assert_same_model, reference_step

pytestmark = pytest.mark.distributed

DP_WORKER = Path(__file__).with_name("dp_worker.py")


def launch(spec: dict, world_size: int, work: Path, monkeypatch) -> list[dict]:
    monkeypatch.setattr(harness, "WORKER", DP_WORKER)
    return harness.launch(spec, world_size, work)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("dp")
    tok, shards, model = debug_model_and_shards(work)
    save_checkpoint(model, tok, work / "ours")
    return work, tok, shards


def dp_spec(work, shards, out: str, *, max_steps: int, global_batch: int, zero: int = 1, **train) -> dict:
    return {
        "mode": "dp",
        "run": {
            "model": {"init_from": str(work / "ours"), "freeze_sam": True},
            "parallel": {"pp": 1, "micro_batch": 1, "global_batch": global_batch, "dtype": "fp32",
                         "zero_stage": zero},
            "train": {"max_steps": max_steps, "out_dir": str(work / out), "log_every": 1,
                      "deterministic": True, **train},
            "optim": OPTIM,
        },
        "shards": shards,
        "alphabet": ALPHABET,
        "seq_len": SEQ_LEN,
    }  # fmt: skip


@pytest.mark.parametrize("zero", [1, 2])
def test_dp2_one_step_matches_single_process_and_consolidates(setup, monkeypatch, zero):
    work, tok, shards = setup
    name = f"dp2-z{zero}"
    results = launch(dp_spec(work, shards, name, max_steps=1, global_batch=4, zero=zero), 2, work / f"l-{name}",
                     monkeypatch)  # fmt: skip
    ref_loss, ref_state = reference_step(work / "ours", tok, shards, dp=2, accum=2)
    assert sorted(r["dp_rank"] for r in results) == [0, 1]
    for r in results:
        assert r["losses"][0] == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    initial, _ = load_any(work / "ours")
    consolidated, _ = load_any(consolidate(work / name, work / f"{name}-release"))
    assert_same_model(consolidated.state_dict(), ref_state, initial.state_dict())
    exported, _ = load_any(work / name / "model")  # the job's own export (fp32 masters)
    for key, value in consolidated.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value), key


@pytest.mark.slow
def test_dp_resume_is_bitwise_exact(setup, monkeypatch):
    work, _, shards = setup
    spec = lambda out, steps: dp_spec(  # noqa: E731
        work, shards, out, max_steps=steps, global_batch=2, save_every=2, keep_last=2
    )
    optim = {**OPTIM, "warmup_steps": 2, "schedule": "cosine"}  # lr of steps 0-1 independent of max_steps
    full_spec, cut1, cut2 = spec("full", 4), spec("cut", 2), spec("cut", 4)
    for s in (full_spec, cut1, cut2):
        s["run"]["optim"] = optim
    full = launch(full_spec, 2, work / "l-full", monkeypatch)
    first = launch(cut1, 2, work / "l-cut1", monkeypatch)
    root = checkpoint_root(work / "cut")
    shutil.copytree(root / "step_00000002", root / ".tmp-step_00000004")  # a save killed half-way
    (root / ".tmp-step_00000004" / "meta.json").unlink()
    truncate_one_file(root / "step_00000002", root / "step_00000003")  # newer, but incomplete
    second = launch(cut2, 2, work / "l-cut2", monkeypatch)
    for rank in range(2):
        assert first[rank]["steps"] == 2 and len(second[rank]["losses"]) == 2
        assert first[rank]["losses"] + second[rank]["losses"] == full[rank]["losses"]  # bitwise
    assert [p.name for p in complete_checkpoints(work / "cut")] == ["step_00000002", "step_00000004"]
    resumed, _ = read_checkpoint_state(root / "step_00000004")
    uninterrupted, _ = read_checkpoint_state(checkpoint_root(work / "full") / "step_00000004")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.slow
def test_dp_nan_loss_skips_steps_and_stops(setup, monkeypatch):
    work, _, shards = setup
    # attempt 1 is NaN: skipped, training goes on (step 2); attempts 3 and 4 in a row stop the run
    spec = dp_spec(work, shards, "nan", max_steps=4, global_batch=2, max_bad_steps=2, save_every=1)
    runs = launch({**spec, "nan_steps": [1, 3, 4]}, 2, work / "l-nan", monkeypatch)
    assert all("2 non-finite losses in a row at step 2" in r["error"] for r in runs)
    assert [p.name for p in complete_checkpoints(work / "nan")] == ["step_00000001", "step_00000002"]
    meta = json.loads((checkpoint_root(work / "nan") / "step_00000002" / "meta.json").read_text())
    assert meta["kind"] == "data_parallel" and meta["dp"] == 2


def test_pipeline_encoder_init_from_stage1_export(setup, monkeypatch):
    """Stage 2 on a PP=2 pipeline starts from a stage-1 export: each stage's encoder tensors equal
    the export, every other tensor stays model.init_from's."""
    work, tok, shards = setup
    torch.manual_seed(1)  # a "stage-1 trained" encoder: different weights from the init checkpoint
    stage1 = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)  # fmt: skip
    export = export_encoder(stage1.encoder, work / "stage1_export", include_projector=True)
    spec = {
        "mode": "pipeline_init",
        "run": {
            "model": {"init_from": str(work / "ours"), "encoder_init": str(export), "freeze_sam": True},
            "parallel": {"pp": 2, "micro_batch": 1, "global_batch": 2, "dtype": "fp32", "zero_stage": 1},
            "train": {"max_steps": 1, "out_dir": str(work / "pp-init")},
            "optim": OPTIM,
        },
        "shards": shards,
        "alphabet": ALPHABET,
        "seq_len": SEQ_LEN,
    }
    work_dir = work / "l-pp-init"
    results = launch(spec, 2, work_dir, monkeypatch)
    assert [r["stage"] for r in results] == [0, 1]
    source = f"model.encoder_init={export}"
    # paper split for PP=2 puts SAM + compressor + CLIP + projector on stage 0
    assert results[0]["loaded"] == {source: ["clip", "compressor", "projector", "sam"]}
    assert results[1]["loaded"] == {source: []}
    state = {}
    for rank in range(2):
        state.update(torch.load(work_dir / f"result.rank{rank}.pt", weights_only=True))
    initial = load_any(work / "ours")[0].state_dict()
    exported = {f"encoder.{k}": v for k, v in stage1.encoder.state_dict().items()}
    assert state.keys() == initial.keys()
    for key, value in state.items():
        want = exported[key] if key.startswith("encoder.") else initial[key]
        assert torch.equal(value, want), key
    assert not torch.equal(state["encoder.sam_model.patch_embed.proj.weight"],
                           initial["encoder.sam_model.patch_embed.proj.weight"])  # fmt: skip
