"""The data-parallel path's configuration (no process group, no model): dsocr-train dispatches pp=1
with world size > 1 to it and pp >= 2 to the pipeline; bad layouts and precision fail with a
ValueError naming the field; its DeepSpeed config; a pipeline checkpoint is not resumed as a DP
one; the stage-1 encoder sources the pipeline loads are strict (missing / unexpected keys listed)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.atomic import write_manifest
from pipeline.config import ModelConfig, RunConfig, SourceConfig
from pipeline.data.testing import write_ocr_shards
from pipeline.model import build_model
from pipeline.parallel import data_parallel, trainer
from pipeline.parallel.data_parallel import data_parallel_ds_config, prepare_data_parallel
from pipeline.parallel.engine_base import EngineResult
from pipeline.parallel.topology import Topology
from pipeline.stage1.export import export_encoder
from pipeline.stage1.options import encoder_sources
from pipeline.tokenizer import build_char_tokenizer
from pipeline.train import job

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer("abcdefghijklmnopqrstuvwxyz ")


def dp_run(tmp_path, **parallel) -> RunConfig:
    run = RunConfig()
    run.train.out_dir = str(tmp_path / "run")
    for key, value in {"pp": 1, "micro_batch": 1, "global_batch": 8, **parallel}.items():
        setattr(run.parallel, key, value)
    return run


@pytest.mark.parametrize(
    ("parallel", "world", "message"),
    [
        ({"zero_stage": 3}, 2, "supports ZeRO stage 0, 1 or 2"),
        ({"dtype": "bf16", "zero_stage": 0}, 2, "set parallel.zero_stage=1"),
        ({"dp": 4}, 2, "parallel.dp=4 with parallel.pp=1 needs 4 processes"),
        ({"global_batch": 6, "micro_batch": 2}, 2, "parallel.global_batch=6 is not divisible"),
        ({"partition": [0, 6]}, 2, "parallel.partition is a pipeline setting"),
        ({"dtype": "fp16"}, 2, "parallel.dtype=.fp16.: use one of"),
    ],
)
def test_bad_data_parallel_layout_is_refused(tmp_path, tok, parallel, world, message):
    with pytest.raises(ValueError, match=message):
        prepare_data_parallel(dp_run(tmp_path, **parallel), tok, world)


@pytest.mark.parametrize(("zero", "dtype"), [(0, "fp32"), (1, "bf16"), (2, "bf16")])
def test_data_parallel_deepspeed_config(tmp_path, zero, dtype):
    run = dp_run(tmp_path, zero_stage=zero, dtype=dtype, global_batch=1280, micro_batch=2)
    cfg = data_parallel_ds_config(
        run.parallel, run.optim, run.train, Topology(world_size=160, pp=1, micro_batch=2, global_batch=1280)
    )
    batch = (
        cfg["train_batch_size"],
        cfg["train_micro_batch_size_per_gpu"],
        cfg["gradient_accumulation_steps"],
    )
    assert batch == (1280, 2, 4)
    assert cfg["zero_optimization"] == {"stage": zero} and "pipeline" not in cfg
    assert cfg["bf16"]["enabled"] == (dtype == "bf16")
    assert cfg.get("data_types") == ({"grad_accum_dtype": "fp32"} if zero == 1 and dtype == "bf16" else None)
    assert cfg["gradient_clipping"] == run.optim.grad_clip


def test_pipeline_checkpoint_is_not_resumed_by_data_parallel(tmp_path, tok):
    run = dp_run(tmp_path)
    _, model_dict, resume = prepare_data_parallel(run, tok, 2)
    assert resume is None
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    meta = {"kind": "pipeline", "step": 2, "pp": 2, "dp": 1, "parts": [0, 4, 6], "model": model_dict}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    write_manifest(ckpt)  # a complete checkpoint of that meta
    with pytest.raises(ValueError, match="not the 'data_parallel' trainer"):
        prepare_data_parallel(run, tok, 2)
    meta.update(kind="data_parallel", pp=1, dp=4, parts=None)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    write_manifest(ckpt)  # a complete checkpoint of that meta
    with pytest.raises(ValueError, match="exact resume needs the same layout"):
        prepare_data_parallel(run, tok, 2)


@pytest.mark.config
@pytest.mark.parametrize(("pp", "expected"), [(1, "data_parallel"), (2, "pipeline")])
def test_world_of_two_dispatches_by_pp(tmp_path, monkeypatch, pp, expected):
    shards = write_ocr_shards(tmp_path / "shards", num_shards=2, per_shard=2)
    run = dp_run(tmp_path, pp=pp, global_batch=2)
    run.data.kind = "webdataset"
    run.data.sources = [SourceConfig(name="ocr", shards=shards[0], modes={"debug": 1.0})]
    called = []
    monkeypatch.setattr(
        data_parallel,
        "run_data_parallel_training",
        lambda run, **kw: called.append(("data_parallel", kw)) or EngineResult(0),
    )
    monkeypatch.setattr(trainer, "run_pipeline_training",
                        lambda run, **kw: called.append(("pipeline", kw)) or EngineResult(0))  # fmt: skip
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    assert job.run_from_config(run) is None
    assert [c[0] for c in called] == [expected]
    loader = iter(called[0][1]["loader_factory"](1, 2))  # keyed on the data-parallel rank
    assert next(loader).input_ids.shape[0] == 1
    if expected == "data_parallel":  # the model builder applies the stage-1 options
        model = called[0][1]["model_factory"]()
        assert not any(p.requires_grad for p in model.encoder.sam_model.parameters())  # freeze_sam


def test_pipeline_refuses_model_freeze(tmp_path, tok):
    run = dp_run(tmp_path, pp=4)
    run.model.freeze = ["clip"]
    with pytest.raises(ValueError, match=r"model.freeze=\['clip'\]: the pipeline engine freezes only SAM"):
        trainer.prepare(run, tok, world_size=4)


def test_encoder_sources_are_strict(tmp_path, tok):
    torch.manual_seed(0)
    model = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id)
    export = export_encoder(model.encoder, tmp_path / "export")
    m = ModelConfig(encoder_init=str(export))
    (src,) = encoder_sources(m, model.encoder.config)
    assert src.parts == ["sam", "compressor", "clip"]
    assert all(torch.equal(src.state[k], v) for k, v in model.encoder.state_dict().items() if k in src.state)
    weights = export / "model.safetensors"
    tensors = load_file(weights)
    missing = "model.vision_model.pre_layrnorm.weight"
    assert missing in tensors
    save_file({k: v for k, v in tensors.items() if k != missing}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 \['vision_model.pre_layrnorm.weight'\]"):
        encoder_sources(m, model.encoder.config)
    tensors["sam.blocks.0.norm1.weight"] = tensors[
        "model.sam_model.blocks.0.norm1.weight"
    ].clone()  # wrong prefix
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"not encoder keys of this model.*sam\.blocks\.0\.norm1\.weight"):
        encoder_sources(m, model.encoder.config)
