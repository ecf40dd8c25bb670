"""parallel.compile_layers on DeepSpeed's pipeline (PP=2, gloo on CPU, debug preset, backend
aot_eager: dynamo + AOTAutograd trace forward and backward, no kernels generated): one optimizer
step gives the loss and the updated weights of the uncompiled PP=2 run on the same batch, the
compiled blocks really ran (dynamo captured graphs on every stage), and the checkpoint's
per-unit state dicts carry exactly the uncompiled keys (Module.compile adds no `_orig_mod.`).
Also: the stage walk of pipeline.parallel.regions and the validation of the two options."""

from __future__ import annotations

import json

import pytest
import torch

from decoder import DECODER_PRESETS
from deepencoder import ENCODER_PRESETS
from pipeline.checkpoint_io import load_any, save_checkpoint
from pipeline.config import RunConfig
from pipeline.parallel.consolidate import consolidate
from pipeline.parallel.ds_config import validate_training_config
from pipeline.parallel.regions import compile_stage_regions, stage_regions
from pipeline.parallel.stages import ClipEmbedUnit, DecoderLayerUnit, HeadUnit, SamUnit
from tests.parallel.harness import debug_model_and_shards
from tests.parallel.test_pipeline_parity import pipeline_step

COMPILED = {"compile_layers": True, "compile_backend": "aot_eager"}
N_LAST_STAGE_LAYERS = 1  # PP=2 paper split of the debug model (3 layers): [sam, clip, decoder 0-1 | 2, head]


def _layer_keys(run_dir) -> dict[str, list[str]]:
    """{layer file: its state-dict keys} of the newest checkpoint's DeepSpeed engine directory."""
    engine = sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "engine"
    files = sorted(engine.glob("layer_*-model_states.pt"))
    assert files, f"no layer files in {engine}"
    return {f.name: sorted(torch.load(f, map_location="cpu", weights_only=True)) for f in files}


@pytest.mark.distributed
@pytest.mark.slow
def test_pp2_compiled_step_matches_uncompiled_and_keeps_checkpoint_keys(tmp_path):
    tok, shards, model = debug_model_and_shards(tmp_path)
    save_checkpoint(model, tok, tmp_path / "ours")
    runs = {}
    for name, parallel in [("eager", {}), ("compiled", COMPILED)]:
        runs[name] = pipeline_step(
            tmp_path, tmp_path / "ours", shards, pp=2, dp=1, accum=2, name=name, parallel=parallel
        )
    (eager, eager_dir), (compiled, compiled_dir) = runs["eager"], runs["compiled"]
    assert [r["stage"] for r in compiled] == [0, 1]
    assert [r["dynamo_graphs"] for r in eager] == [0, 0]  # CPU attention is plain SDPA: no dynamo
    assert all(r["dynamo_graphs"] > 0 for r in compiled)  # both stages ran compiled blocks
    for e, c in zip(eager, compiled):
        assert c["losses"][0] == pytest.approx(e["losses"][0], rel=1e-5, abs=1e-6)
    records = [json.loads(line) for line in (compiled_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r.get("event") == "compile"]  # the last stage: decoder layers + head
    assert logged == [{**logged[0], "stage": 1, "backend": "aot_eager",
                       "regions": {"sam_block": 0, "clip_layer": 0, "decoder_layer": N_LAST_STAGE_LAYERS}}]  # fmt: skip

    assert _layer_keys(compiled_dir) == _layer_keys(eager_dir)
    keys = [k for ks in _layer_keys(compiled_dir).values() for k in ks]
    assert keys and not any("_orig_mod" in k for k in keys)
    initial, _ = load_any(tmp_path / "ours")
    want, _ = load_any(consolidate(eager_dir, tmp_path / "eager-release"))
    got, _ = load_any(consolidate(compiled_dir, tmp_path / "compiled-release"))
    want, got, initial = want.state_dict(), got.state_dict(), initial.state_dict()
    assert set(got) == set(want) == set(initial)
    for key, ref in want.items():
        torch.testing.assert_close(got[key], ref, rtol=1e-4, atol=2e-5, msg=key)
    moved = [k for k in want if not torch.equal(want[k], initial[k])]
    assert any(k.startswith("decoder.layers.") for k in moved)  # the step changed compiled blocks


@pytest.mark.unit
def test_stage_regions_walk_the_units_blocks_and_keep_their_keys():
    enc, dec = ENCODER_PRESETS["debug"], DECODER_PRESETS["debug"]
    units = [
        SamUnit(enc, dec, 3, freeze=True),
        ClipEmbedUnit(enc, dec, 3),
        DecoderLayerUnit(enc, dec, 3, layer_idx=1),
        HeadUnit(enc, dec, 3),
    ]
    before = [sorted(u.state_dict()) for u in units]
    regions = stage_regions(units)
    assert [id(b) for b in regions["sam_block"]] == [id(b) for b in units[0].model.encoder.sam_model.blocks]
    clip_layers = units[1].model.encoder.vision_model.transformer.layers
    assert [id(b) for b in regions["clip_layer"]] == [id(b) for b in clip_layers]
    assert regions["decoder_layer"] == [units[2].model.decoder.layers["1"]]
    counts = compile_stage_regions(units, backend="eager")
    assert counts == {"sam_block": enc.sam.depth, "clip_layer": enc.clip.layers, "decoder_layer": 1}
    assert all(b._compiled_call_impl is not None for blocks in regions.values() for b in blocks)
    assert units[3]._compiled_call_impl is None  # the head has no repeated block
    assert [sorted(u.state_dict()) for u in units] == before
    assert stage_regions([units[3]]) == {"sam_block": [], "clip_layer": [], "decoder_layer": []}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("compile_backend", "cudagraphs", "parallel.compile_backend must be one of"),
        ("compile_layers", "yes", "parallel.compile_layers must be true or false"),
    ],
)
def test_bad_compile_options_are_refused(field, value, message):
    run = RunConfig()
    setattr(run.parallel, field, value)
    with pytest.raises(ValueError, match=message):
        validate_training_config(run)


@pytest.mark.unit
def test_compiling_with_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="parallel.compile_backend must be one of"):
        compile_stage_regions([], backend="cudagraphs")
