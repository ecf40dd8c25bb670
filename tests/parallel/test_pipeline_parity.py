"""One optimizer step of the DeepSpeed pipeline (PP=4, and PP=2 x DP=2; gloo on CPU, debug preset)
against the single-process DeepSeekOCR on the same global batch: same loss, same updated weights;
the frozen SAM stage bit-identical; the pipeline checkpoint consolidates to the released layout."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.checkpoint_io import export_release, load_any, save_checkpoint
from pipeline.cli.convert import main as convert_main
from pipeline.config import OptimConfig
from pipeline.data.config import LoaderConfig
from pipeline.data.loader import StreamingLoader
from pipeline.parallel.consolidate import consolidate
from pipeline.train.optim import build_optimizer, param_groups
from tests.parallel.harness import ALPHABET, debug_model_and_shards, launch

pytestmark = pytest.mark.distributed

SEQ_LEN = 128
OPTIM = {
    "lr": 1e-3,
    "warmup_steps": 0,
    "schedule": "constant",
    "weight_decay": 0.1,
    "eps": 1e-6,
    "grad_clip": 1.0,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("pp")
    tok, shards, model = debug_model_and_shards(work)
    save_checkpoint(model, tok, work / "ours")
    export_release(model, tok, work / "release")
    return work, tok, shards


def reference_step(init, tok, shards, *, dp: int, accum: int):
    """The single-process model on the pipeline's global batch: accum micro-batches of each dp rank."""
    model, _ = load_any(init)
    model.train()
    model.encoder.freeze_sam()
    batches = []
    for rank in range(dp):
        config = LoaderConfig.debug(shards, seq_len=SEQ_LEN, batch_size=1, seed=0)
        stream = iter(StreamingLoader(config, tok, dp_rank=rank, dp_world=dp))
        batches += [next(stream) for _ in range(accum)]
    optimizer = build_optimizer(param_groups(model, OPTIM["weight_decay"]), OptimConfig(**OPTIM))
    losses = []
    for batch in batches:
        out = model(batch)
        (out.loss / len(batches)).backward()
        losses.append(float(out.loss.detach()))
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(trainable, OPTIM["grad_clip"])
    optimizer.step()
    return sum(losses) / len(losses), model.state_dict()


def pipeline_step(
    work, init, shards, *, pp: int, dp: int, accum: int, name: str, parallel: dict | None = None
):
    spec = {
        "run": {
            "model": {"init_from": str(init), "freeze_sam": True},
            "parallel": {
                "pp": pp,
                "micro_batch": 1,
                "global_batch": accum * dp,
                "dtype": "fp32",
                "zero_stage": 1,
                **(parallel or {}),
            },
            "train": {"max_steps": 1, "out_dir": str(work / name), "log_every": 1, "deterministic": True},
            "optim": OPTIM,
        },
        "shards": shards,
        "alphabet": ALPHABET,
        "seq_len": SEQ_LEN,
    }
    return launch(spec, pp * dp, work / f"{name}-launch"), work / name


def assert_same_model(consolidated, reference, initial):
    assert set(consolidated) == set(reference)
    for key, ref in reference.items():
        got = consolidated[key]
        if key.startswith("encoder.sam_model."):  # the frozen stage never changes, not even by rounding
            assert torch.equal(got, initial[key]), key
        else:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5, msg=key)
    trainable = [k for k in reference if not k.startswith("encoder.sam_model.")]
    unchanged = [k for k in trainable if torch.equal(consolidated[k], initial[k])]
    # every trainable tensor moved, except CLIP's dead patch conv (never used, so no gradient)
    assert trainable and unchanged == ["encoder.vision_model.embeddings.patch_embedding.weight"]


# PP=4 layouts of the debug model (units: sam, clip, decoder.0-2, head). "balanced" weighs units
# by training FLOPs: [sam | clip + decoder.0 | decoder.1 | decoder.2 + head]; the explicit split
# is the shape the balanced split takes for the full model (SAM + CLIP + decoder layers on PP0,
# the head with few layers last). Both recompute some stages and chunk the loss (16 tokens).
LAYOUTS = {
    "paper": {},
    "balanced": {"partition_method": "balanced", "loss_chunk_tokens": 16, "checkpoint_stages": [1, 3]},
    "sam-clip-first": {"partition": [0, 3, 4, 5, 6], "loss_chunk_tokens": 16, "checkpoint_stages": [0, 2]},
}
LAYOUT_PARTS = {"paper": [0, 1, 2, 4, 6], "balanced": [0, 1, 3, 4, 6], "sam-clip-first": [0, 3, 4, 5, 6]}


@pytest.mark.parametrize(
    "layout", ["paper", "balanced", pytest.param("sam-clip-first", marks=pytest.mark.slow)]
)
def test_pp4_one_step_matches_single_process_and_consolidates(setup, layout):
    from pipeline.config import ParallelConfig, RunConfig
    from pipeline.parallel.engine import run_partition

    run = RunConfig(parallel=ParallelConfig(pp=4, **LAYOUTS[layout]))
    assert run_partition(run.model, run.data, run.parallel).parts == LAYOUT_PARTS[layout]
    work, tok, shards = setup
    name = f"pp4-{layout}"
    results, run_dir = pipeline_step(
        work, work / "ours", shards, pp=4, dp=1, accum=2, name=name, parallel=LAYOUTS[layout]
    )
    ref_loss, ref_state = reference_step(work / "ours", tok, shards, dp=1, accum=2)
    assert [r["stage"] for r in results] == [0, 1, 2, 3]
    for r in results:
        assert r["losses"][0] == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)

    out = work / f"{name}-release"
    assert convert_main(["consolidate", str(run_dir), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_vl_v2"
    consolidated, _ = load_any(out)
    initial, _ = load_any(work / "ours")
    assert_same_model(consolidated.state_dict(), ref_state, initial.state_dict())


def test_pp2_dp2_from_release_layout_matches_single_process(setup):
    work, tok, shards = setup
    results, run_dir = pipeline_step(work, work / "release", shards, pp=2, dp=2, accum=2, name="pp2dp2")
    ref_loss, ref_state = reference_step(work / "ours", tok, shards, dp=2, accum=2)
    assert sorted((r["stage"], r["dp_rank"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in results:
        assert r["losses"][0] == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    consolidated, _ = load_any(consolidate(run_dir, work / "pp2dp2-release"))
    initial, _ = load_any(work / "ours")
    assert_same_model(consolidated.state_dict(), ref_state, initial.state_dict())
