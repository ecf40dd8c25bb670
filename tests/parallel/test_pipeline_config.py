"""Bad pipeline configurations fail in `prepare()` (no process group, no model) with a ValueError
naming the field and the fix; the DeepSpeed config keeps the batch arithmetic and precision rules."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.atomic import write_manifest
from pipeline.checkpoint_io import save_checkpoint
from pipeline.config import RunConfig
from pipeline.model import build_model
from pipeline.parallel.ds_config import deepspeed_config
from pipeline.parallel.topology import Topology
from pipeline.parallel.trainer import prepare
from pipeline.processing import view_sizes
from pipeline.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer("abcdefghijklmnopqrstuvwxyz ")


def run_config(tmp_path, **parallel) -> RunConfig:
    run = RunConfig()
    run.train.out_dir = str(tmp_path / "run")
    for key, value in {"pp": 4, "micro_batch": 1, "global_batch": 8, **parallel}.items():
        setattr(run.parallel, key, value)
    return run


@pytest.mark.parametrize(
    ("parallel", "world", "message"),
    [
        ({"dp": 2}, 4, "parallel.dp=2 with parallel.pp=4 needs 8 processes"),
        ({"pp": 3}, 4, "parallel.pp=3 does not divide the world size 4"),
        ({"global_batch": 5}, 8, "parallel.global_batch=5 is not divisible"),
        ({"pp": 7}, 7, "parallel.pp=7 exceeds the 6 pipeline units"),
        ({"dtype": "fp16"}, 4, "parallel.dtype must be one of"),
        ({"zero_stage": 2}, 4, "set parallel.zero_stage=1"),
        ({"dtype": "bf16", "zero_stage": 0}, 4, "DeepSpeed provides with ZeRO-1 only"),
        ({"pp": 1}, 1, "parallel.pp=1 runs without the pipeline engine: use the data-parallel trainer"),
    ],
)
def test_bad_layout_is_refused_before_building(tmp_path, tok, parallel, world, message):
    with pytest.raises(ValueError, match=message):
        prepare(run_config(tmp_path, **parallel), tok, world)


def test_unknown_schedule_is_refused(tmp_path, tok):
    run = run_config(tmp_path)
    run.optim.schedule = "linear"
    with pytest.raises(ValueError, match="optim.schedule must be"):
        prepare(run, tok, 4)


def test_checkpoint_of_another_model_size_is_refused(tmp_path, tok):
    other = build_model(
        "debug", "debug", tok.vocab_size, image_token_id=tok.image_id, hidden_size=32, num_heads=2
    )
    save_checkpoint(other, tok, tmp_path / "small")
    run = run_config(tmp_path)
    run.model.init_from = str(tmp_path / "small")
    with pytest.raises(ValueError, match="different model size"):
        prepare(run, tok, 4)
    run.model.init_from = str(tmp_path)  # not a checkpoint at all
    with pytest.raises(ValueError, match="model.init_from"):
        prepare(run, tok, 4)


def test_resume_from_another_layout_is_refused(tmp_path, tok):
    run = run_config(tmp_path)
    topology, split, configs, model_dict, _ = prepare(run, tok, 4)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    meta = {
        "kind": "pipeline",
        "format": 2,
        "step": 2,
        "pp": 2,
        "dp": 2,
        "parts": [0, 4, 6],
        "model": model_dict,
    }
    (ckpt / "meta.json").write_text(json.dumps(meta))
    write_manifest(ckpt)  # a complete checkpoint of that meta
    with pytest.raises(ValueError, match="exact resume needs the same layout"):
        prepare(run, tok, 4)
    del meta["format"]  # written before the links held FLAT_ALIGN elements
    (ckpt / "meta.json").write_text(json.dumps(meta))
    write_manifest(ckpt)  # a complete checkpoint of that meta
    with pytest.raises(ValueError, match="pipeline checkpoint of format 1.*dsocr-convert consolidate"):
        prepare(run, tok, 4)
    assert split.parts == [0, 1, 2, 4, 6] and topology.grad_accum == 8


def test_deepspeed_config_batch_and_precision(tmp_path):
    run = run_config(tmp_path, pp=4, dp=40, global_batch=640, dtype="bf16", zero_stage=1)
    cfg = deepspeed_config(
        run.parallel,
        run.optim,
        run.train,
        Topology(world_size=160, pp=4, micro_batch=1, global_batch=640, dp=40),
    )
    assert (
        cfg["train_batch_size"],
        cfg["train_micro_batch_size_per_gpu"],
        cfg["gradient_accumulation_steps"],
    ) == (
        640,
        1,
        16,
    )
    assert cfg["bf16"]["enabled"] and cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["pipeline"]["use_reentrant"] is False
    assert cfg["gradient_clipping"] == run.optim.grad_clip
    # no device sync per micro-batch for DeepSpeed's throughput timer (the trainer times steps)
    assert cfg["timers"] == {"throughput": {"enabled": False}}


@pytest.mark.parametrize(
    "pp, method, pack, varying",
    [(4, "paper", True, True), (4, "balanced", True, False), (2, "paper", True, False), (4, "balanced", False, True)],
)  # fmt: skip
def test_shapes_vary_only_where_sam_features_or_unpacked_rows_cross(pp, method, pack, varying):
    """The full model's paper split sends SAM's features from PP0; its balanced split keeps SAM
    and CLIP on PP0 (hidden states of fixed shape on every boundary); PP=2 puts SAM and CLIP on
    the first stage."""
    from pipeline.config import ParallelConfig, RunConfig
    from pipeline.parallel.engine import engine_dynamic_shape, run_partition

    run = RunConfig(parallel=ParallelConfig(pp=pp, partition_method=method))
    run.model.encoder, run.model.decoder, run.data.pack = "full", "full", pack
    assert engine_dynamic_shape(run_partition(run.model, run.data, run.parallel), run.data.pack) is varying


def test_model_inputs_have_fixed_slots(tok):
    from pipeline.batch import Example, ImageViews
    from pipeline.data.packing import collate_packed

    ids = [tok.bos_id] + [tok.image_id] * 7 + [5, 6]
    view = torch.arange(3 * 128 * 128).view(3, 128, 128).remainder(256).to(torch.uint8)
    ex = Example(ids, [-100] * 8 + [5, 6], [ImageViews(global_view=view, num_placeholders=7)])
    inputs = collate_packed([[ex]], 12, tok.pad_id, tok.image_id).model_inputs()
    sizes = view_sizes()
    pixels = inputs[6:]
    assert len(pixels) == len(sizes)
    assert [p.shape[0] for p in pixels] == [1 if s == 128 else 0 for s in sizes]
    assert all(p.dtype == torch.uint8 for p in pixels)  # raw views, empty slots alike
    assert torch.equal(pixels[sizes.index(128)][0], view)
    assert inputs[4].tolist() == list(range(1, 8))  # placeholder positions
    assert inputs[5].tolist() == [0, 1, 4, 2, 3, 4, 5]  # gather index
    assert all(t.dtype == torch.long for t in inputs[:6])
    text = Example([tok.bos_id, 5, 6], [-100, 5, 6])
    assert all(
        p.dtype == torch.uint8 and p.shape[0] == 0
        for p in collate_packed([[text]], 4, tok.pad_id, tok.image_id).model_inputs()[6:]
    )


def test_stage1_freeze_is_refused_not_ignored(tmp_path, tok):
    run = run_config(tmp_path)
    run.model.freeze = ["clip"]
    with pytest.raises(ValueError, match=r"model.freeze=\['clip'\]: the pipeline engine freezes only SAM"):
        prepare(run, tok, world_size=4)


@pytest.mark.parametrize("field", ["encoder_init", "sam_init", "clip_init"])
def test_stage1_init_sources_are_checked_before_building(tmp_path, tok, field):
    run = run_config(tmp_path)
    setattr(run.model, field, str(tmp_path / "absent"))
    with pytest.raises(ValueError, match=f"model.{field}=.*absent: no such file or directory"):
        prepare(run, tok, world_size=4)


def test_expert_load_fields_measure_the_busiest_expert_against_the_mean():
    from pipeline.train.trainer import expert_load_fields

    fields = expert_load_fields(torch.tensor([[3, 1], [2, 2], [0, 0]]))  # skewed, balanced, idle layer
    assert fields["expert_counts"] == [[3, 1], [2, 2], [0, 0]]
    assert fields["expert_load_max_over_mean"] == pytest.approx((1.5 + 1.0 + 0.0) / 3)


def test_trainable_parameters_keep_deepspeed_flat_buffers_aligned(tok):
    """DeepSpeed packs a stage's trainable parameters back to back into flat buffers: each must
    hold a multiple of FLAT_ALIGN elements, or every later one (and every GEMM on it) is misaligned.
    Checked for the SAM unit's zero-weight links and every parameter of the full model."""
    from decoder import DecoderModel, decoder_config
    from deepencoder import DeepEncoder, encoder_config
    from pipeline.parallel.stages import FLAT_ALIGN, StageUnit
    from pipeline.units import model_units

    dec = decoder_config("debug", vocab_size=tok.vocab_size)
    enc = encoder_config("debug", n_embed=dec.hidden_size)
    unit = StageUnit(model_units(dec.num_layers)[0], enc, dec, tok.image_id, freeze=True)
    links = {n: p.numel() for n, p in unit.named_parameters() if p.requires_grad}
    assert set(links) == {"frozen_link", "frozen_link_matrix"}
    assert {p.dim() for p in unit.parameters() if p.requires_grad} == {1, 2}  # both optimizer groups
    assert all(n % FLAT_ALIGN == 0 for n in links.values()), links
    with torch.device("meta"):
        full_dec = decoder_config("full", vocab_size=129280)
        models = (DeepEncoder(encoder_config("full", n_embed=full_dec.hidden_size)), DecoderModel(full_dec))
    odd = [(n, p.numel()) for m in models for n, p in m.named_parameters() if p.numel() % FLAT_ALIGN]
    assert odd == []
