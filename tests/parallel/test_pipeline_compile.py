"""parallel.compile_layers on DeepSpeed's pipeline (PP=2, gloo on CPU, debug preset, backend
aot_eager: dynamo + AOTAutograd trace forward and backward, no kernels generated): one optimizer
step gives the loss and the updated weights of the uncompiled PP=2 run on the same batch, the
compiled blocks really ran (dynamo captured graphs on every stage), and the checkpoint's
per-unit state dicts carry exactly the uncompiled keys (Module.compile adds no `_orig_mod.`).
Also: the stage units' block walk (`Unit.blocks`) and the validation of the two options."""

from __future__ import annotations

import json

import pytest
import torch

from decoder import DECODER_PRESETS
from deepencoder import ENCODER_PRESETS
from pipeline.checkpoint_io import load_any, save_checkpoint
from pipeline.config import RunConfig
from pipeline.model import compile_blocks
from pipeline.parallel.consolidate import consolidate
from pipeline.parallel.ds_config import validate_training_config
from pipeline.parallel.stages import StageUnit
from pipeline.units import model_units
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
                       "regions": {"sam": 0, "clip": 0, "decoder_layer": N_LAST_STAGE_LAYERS, "head": 0}}]  # fmt: skip

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
def test_stage_units_compile_their_own_blocks_and_keep_their_keys():
    enc, dec = ENCODER_PRESETS["debug"], DECODER_PRESETS["debug"]
    sam, clip, layer1, head = [model_units(dec.num_layers)[i] for i in (0, 1, 3, -1)]
    units = [StageUnit(u, enc, dec, 3, freeze=u.kind == "sam") for u in (sam, clip, layer1, head)]
    before = [sorted(u.state_dict()) for u in units]
    blocks = [u.unit.blocks(u.model) for u in units]
    assert [id(b) for b in blocks[0]] == [id(b) for b in units[0].model.encoder.sam_model.blocks]
    clip_layers = units[1].model.encoder.vision_model.transformer.layers
    assert [id(b) for b in blocks[1]] == [id(b) for b in clip_layers]
    assert blocks[2] == [units[2].model.decoder.layers["1"]]
    assert blocks[3] == []  # the head has no repeated block
    counts = {}
    for u in units:
        counts.update(compile_blocks(u.model, [u.unit], backend="eager"))
    assert counts == {"sam": enc.sam.depth, "clip": enc.clip.layers, "decoder_layer": 1, "head": 0}
    assert all(b._compiled_call_impl is not None for bs in blocks for b in bs)
    assert units[3]._compiled_call_impl is None
    assert [sorted(u.state_dict()) for u in units] == before


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
        validate_training_config(run.parallel, run.optim, run.train)


@pytest.mark.unit
def test_compiling_with_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="parallel.compile_backend must be one of"):
        compile_blocks(torch.nn.Module(), [], backend="cudagraphs")
