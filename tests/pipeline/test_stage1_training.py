"""Stage-1 training on CPU through the project's loop (Trainer + LocalEngine, StreamingLoader, AdamW + cosine):
the debug DeepEncoder + a dense debug LM learn from rendered reading lines (loss falls by a stated
margin, every part of the encoder moves), frozen parts stay bit-identical, and the trained
encoder, exported, initialises a stage-2 model exactly."""

from __future__ import annotations

import string

import pytest
import torch

from data_tools.shards import ShardWriterConfig
from data_tools.synth.reading import ReadingLinesConfig, write_reading_lines
from pipeline.config import ModelConfig, OptimConfig, ParallelConfig, RunConfig, TrainConfig
from pipeline.data.config import LoaderConfig, SourceSpec
from pipeline.data.loader import StreamingLoader
from pipeline.model import build_model
from pipeline.stage1 import MODEL_PARTS, apply_model_options, export_encoder_if_requested
from pipeline.stage1.parts import model_part_of
from pipeline.tokenizer import build_char_tokenizer
from pipeline.train.local_engine import local_trainer

pytestmark = pytest.mark.unit

LOSS_DROP = 0.8  # nats: mean of the first 3 steps minus mean of the last 5 of 20 (observed 1.08)


@pytest.fixture(scope="module")
def lines(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("lines")
    cfg = ReadingLinesConfig(n=400, seed=3, width=128, min_chars=2, max_chars=6)
    write_reading_lines(cfg, ShardWriterConfig(str(out), prefix="train", max_count=200))
    return str(out / "train-*.tar")


def run_config(tmp_path, *, steps: int, **model) -> RunConfig:
    return RunConfig(
        model=ModelConfig(encoder="debug", decoder="debug", freeze_sam=False, export_encoder=True, **model),
        optim=OptimConfig(lr=3e-3, warmup_steps=5, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.01),
        parallel=ParallelConfig(micro_batch=8, global_batch=8),
        train=TrainConfig(max_steps=steps, log_every=1000, save_every=0, out_dir=str(tmp_path), device="cpu"),
        name="stage1-test",
    )


def train(run: RunConfig, shards: str):
    """The stage-1 job's model and training path at debug size; returns (model, before, result)."""
    tok = build_char_tokenizer(string.ascii_letters + string.digits + string.punctuation + " ")
    torch.manual_seed(0)
    model = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id, bos_token_id=tok.bos_id,
                        eos_token_id=tok.eos_id, moe=None, first_k_dense_replace=0)  # fmt: skip
    apply_model_options(model, run.model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    source = SourceSpec("lines", shards, prompt="free_ocr", modes="debug")
    loader = StreamingLoader(
        LoaderConfig([source], seq_len=64, batch_size=8, seed=0), tok, dp_rank=0, dp_world=1
    )
    result = local_trainer(model, loader, train=run.train, optim=run.optim, parallel=run.parallel, seq_len=64,
                           device=torch.device("cpu")).train(final_checkpoint=False)
    return model, before, result


def moved_parts(model, before) -> set[str]:
    return {model_part_of(k) for k, v in model.named_parameters() if not torch.equal(v, before[k])}


def test_stage1_loss_falls_every_part_trains_and_the_encoder_hands_over(tmp_path, lines):
    run = run_config(tmp_path, steps=20)
    model, before, result = train(run, lines)
    losses = result.losses
    assert len(losses) == 20 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert first - last > LOSS_DROP, f"loss {first:.3f} -> {last:.3f}"
    assert moved_parts(model, before) == set(MODEL_PARTS)  # SAM, compressor, CLIP, projector, LM

    out = export_encoder_if_requested(model, run.model, tmp_path, run_name=run.name, step=result.steps)
    assert out == tmp_path / "encoder_export"
    stage2 = build_model("debug", "debug", 64, image_token_id=5, hidden_size=128)  # wider MoE LM
    apply_model_options(stage2, ModelConfig(encoder="debug", decoder="debug", encoder_init=str(out)))
    ours, theirs = model.encoder.state_dict(), stage2.encoder.state_dict()
    for key, value in ours.items():
        if key.startswith(("sam_model.", "vision_model.")):
            assert torch.equal(theirs[key], value), key


def test_frozen_parts_stay_bit_identical(tmp_path, lines):
    run = run_config(tmp_path, steps=3, freeze=["clip", "projector"])
    model, before, _ = train(run, lines)
    for name, value in model.named_parameters():
        if model_part_of(name) in ("clip", "projector"):
            assert torch.equal(value, before[name]), name
    assert moved_parts(model, before) == {"sam", "compressor", "decoder"}
