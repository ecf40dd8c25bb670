"""The one-GPU stage-1 preset end to end: `dsocr-train experiment=stage1_small` (full DeepEncoder +
dense-125m, from scratch, rendered lines in Tiny mode) trains with a falling loss within the preset's
time box, reads held-out lines (CER well below 1), and its encoder export initialises the full
stage-2 encoder exactly.

    DSOCR_STAGE1_STEPS=1500 .venv/bin/python -m pytest tests/pipeline/test_stage1_gpu.py -s
"""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from deepencoder import DeepEncoder, encoder_config
from pipeline.checkpoint_io import load_any
from pipeline.cli.train import CONFIG_DIR
from pipeline.config import register_configs, to_run_config
from pipeline.stage1 import is_encoder_export, load_encoder_init
from pipeline.stage1.__main__ import main as stage1_cli

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_stage1_small_learns_to_read_and_hands_over(tmp_path):
    from pipeline.train.job import run_job

    steps = int(os.environ.get("DSOCR_STAGE1_STEPS", "1500"))
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(
            config_name="train",
            overrides=[
                "experiment=stage1_small",
                f"train.out_dir={tmp_path / 'run'}",
                f"train.max_steps={steps}",
                "train.save_every=0",
            ],
        )
    job = run_job(to_run_config(cfg))
    print(
        f"\nstage1_small: {job.steps} steps, loss {job.first_loss:.3f} -> {job.last_loss:.3f}, "
        f"held-out CER {job.cer_before:.3f} -> {job.cer_after:.3f}"
    )
    # the preset's time box (train.max_minutes) may end the run before max_steps on a slower GPU
    assert steps // 2 <= job.steps <= steps
    assert job.last_loss < job.first_loss - 2.0  # ln(~100) = 4.6 at init; the unigram plateau is ~3
    assert job.cer_after < min(0.8, job.cer_before - 0.2), (job.cer_before, job.cer_after)

    export = job.out_dir / "encoder_export"
    if not is_encoder_export(export):  # a job without the export hook: export from the saved model
        assert stage1_cli(["export", str(job.out_dir / "model"), str(export)]) == 0
    stage2 = DeepEncoder(encoder_config("full"))  # stage 2's encoder: projector to the 1280-wide MoE
    assert stage2.config.n_embed == 1280
    parts = load_encoder_init(stage2, export)
    assert parts == ["sam", "compressor", "clip"]
    trained, _ = load_any(job.out_dir / "model")
    ours, theirs = trained.encoder.state_dict(), stage2.state_dict()
    for key, value in ours.items():
        if key.startswith(("sam_model.", "vision_model.")):
            assert torch.equal(theirs[key], value.to(theirs[key].dtype)), key
