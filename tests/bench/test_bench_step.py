"""The full-step benchmark on CPU through the GPU run's code paths: the peer computes our model's
loss from the copied weights, and every variant of measure_full_step (trainer, trainer + compile,
peer) trains through pipeline.train's Trainer over LocalEngine. (The chunked loss head equals the
full-logits one: tests/pipeline/test_loss.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from bench.full_step import FullStepSettings, build_inputs, build_ours, build_peer, measure_full_step

DEBUG = dict(encoder="debug", decoder="debug", mode="debug", seq_len=192, text_range=(20, 40))


@pytest.mark.parity
def test_peer_computes_our_loss_from_the_copied_weights():
    settings = FullStepSettings(**DEBUG, rows=1, steps=1, warmup=1)
    (batch,), vocab, image_token_id = build_inputs(settings)
    assert batch.image_positions.numel() > 0  # the SAM -> CLIP -> projector path is in the loss
    model = build_ours(settings, vocab, image_token_id, torch.device("cpu"))
    with torch.no_grad():
        model.decoder.lm_head.weight.mul_(40)  # sharp logits: the loss depends on every weight
    peer = build_peer(model, torch.device("cpu"))
    with torch.no_grad():
        ours, theirs = model.train()(batch).lm_loss, peer(batch).loss
    assert abs(float(ours) - math.log(vocab)) > 1.0  # far from the uniform loss any weights give
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.unit
def test_settings_reject_uneven_steps():
    with pytest.raises(ValueError, match="multiples of rows"):
        FullStepSettings(rows=2, steps=3, warmup=2)
    with pytest.raises(ValueError, match="compile_backend"):
        FullStepSettings(compile_backend="cudagraphs")


@pytest.mark.slow
def test_every_variant_trains_through_the_trainer_on_cpu():
    settings = FullStepSettings(**DEBUG, rows=1, steps=2, warmup=2, compile_backend="aot_eager")
    torch._dynamo.reset()
    res = measure_full_step(settings, torch.device("cpu"), peak_tflops=1.0)
    assert res["errors"] == {}
    assert set(res["variants"]) == {"peer", "trainer", "trainer_compiled"}
    assert int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) > 0  # compile_layers compiled
    peer = res["variants"]["peer"]
    for key, v in res["variants"].items():
        assert v["tokens_per_s"] > 0 and v["tokens_per_step"] == peer["tokens_per_step"], key
        assert math.isfinite(v["loss"]) and math.isfinite(v["first_loss"]) and v["bad_steps"] == 0, key
        assert v["mfu"] == pytest.approx(v["tflops_per_step"] * 1e12 / (v["step_ms"] / 1e3) / 1e12), key
        # the frozen SAM runs once per view size and stays out of autograd
        assert v["sam_calls_per_step"] == v["view_groups_per_step"] == 1 and v["sam_graph"] is False, key
        assert v["host_syncs"] is None and v["sync_sites"] is None and v["peak_gib"] is None, key  # CUDA only
        assert v["peak_gib_full_logits"] is None, key  # the trainer's full-logits step: CUDA memory too
    # the peer starts from our weights: the first losses (same batch, bf16 autocast) agree up to
    # our MoE aux loss (alpha 0.001); the compiled variant goes on from the eager one's weights
    assert abs(res["variants"]["trainer"]["first_loss"] - peer["first_loss"]) < 0.01
    assert res["variants"]["trainer_compiled"]["first_loss"] < res["variants"]["trainer"]["first_loss"]
