"""One backward walk per micro-batch on every pipeline stage (PP=2, gloo on CPU, debug preset).

DeepSpeed 0.19 calls `backward` once per float tensor a stage sends; the running MoE aux loss
depends on every router of the stage, so sent as its own tensor it would walk the stage's layers
a second time per micro-batch. `pipeline.parallel.stages.pack_hidden` sends hidden and aux as one
tensor: each decoder layer's weights get exactly one gradient per micro-batch."""

from __future__ import annotations

import pytest

from pipeline.checkpoint_io import save_checkpoint
from tests.parallel.harness import ALPHABET, debug_model_and_shards, launch

ACCUM = 2


@pytest.mark.distributed
def test_every_decoder_layer_is_walked_once_per_micro_batch(tmp_path):
    tok, shards, model = debug_model_and_shards(tmp_path)
    assert model.decoder.config.moe.aux_loss_alpha > 0  # the aux loss exists and reaches the routers
    save_checkpoint(model, tok, tmp_path / "init")
    spec = {
        "run": {
            "model": {"init_from": str(tmp_path / "init"), "freeze_sam": True},
            "parallel": {"pp": 2, "micro_batch": 1, "global_batch": ACCUM, "dtype": "fp32", "zero_stage": 1},
            "train": {"max_steps": 2, "out_dir": str(tmp_path / "run"), "log_every": 1},
        },
        "shards": shards,
        "alphabet": ALPHABET,
        "seq_len": 128,
        "count_layer_backward": True,
    }
    results = launch(spec, 2, tmp_path / "launch")
    walks = {int(k): n for r in results for k, n in r["layer_backward_calls"].items()}
    assert walks == {i: ACCUM for i in range(model.decoder.config.num_layers)}
