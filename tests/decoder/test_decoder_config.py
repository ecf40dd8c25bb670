"""Decoder presets and parameter arithmetic: exact counts of the released model, counted on a
meta-device build, and config validation."""

import pytest
import torch

from decoder import DECODER_PRESETS, DecoderConfig, DecoderModel, MoEConfig, decoder_config


def count(model, predicate=lambda name: True):
    return sum(p.numel() for n, p in model.named_parameters() if predicate(n))


@pytest.mark.unit
def test_full_preset_exact_parameter_counts():
    cfg = decoder_config("full")
    with torch.device("meta"):
        model = DecoderModel(cfg)
    assert count(model) == 2_934_734_080 == cfg.total_params()
    assert count(model, lambda n: n.startswith("lm_head")) == 165_478_400
    assert count(model, lambda n: n.startswith("embed_tokens")) == 165_478_400
    # transformers' DeepseekOcr2TextModel with these sizes (no lm_head): 2,769,255,680
    assert count(model, lambda n: not n.startswith("lm_head")) == 2_769_255_680
    # activated per token: all non-routed weights of the matmul path + top-6 of 64 experts
    routed = count(model, lambda n: ".mlp.experts." in n)
    embed = count(model, lambda n: n.startswith("embed_tokens"))
    assert cfg.activated_params() == 574_127_360
    assert cfg.activated_params() == count(model) - embed - routed + routed * 6 // 64
    assert [layer.is_moe for layer in model.layers] == [False] + [True] * 11
    moe = model.layers[1].mlp
    assert tuple(moe.experts.gate_up_proj.shape) == (64, 2 * 896, 1280)
    assert tuple(moe.experts.down_proj.shape) == (64, 1280, 896)
    assert tuple(moe.shared_experts.gate_proj.weight.shape) == (1792, 1280)
    assert cfg.head_dim == 128


@pytest.mark.unit
def test_meta_build_then_init_weights():
    cfg = decoder_config("debug")
    with torch.device("meta"):
        model = DecoderModel(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert torch.equal(model.norm.weight, torch.ones(cfg.hidden_size))
    std = model.layers[1].mlp.experts.gate_up_proj.std().item()
    assert abs(std - cfg.initializer_range) < 0.002
    expected = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    torch.testing.assert_close(model.rotary.inv_freq, expected)
    assert torch.isfinite(model(torch.randint(0, cfg.vocab_size, (1, 4))).logits).all()


@pytest.mark.unit
def test_presets_shapes():
    dense = DECODER_PRESETS["dense-125m"]
    assert dense.moe is None and not any(dense.is_moe_layer(i) for i in range(dense.num_layers))
    assert (dense.num_layers, dense.hidden_size, dense.num_heads, dense.intermediate_size) == (
        12,
        768,
        12,
        3072,
    )
    debug = decoder_config("debug", vocab_size=1000)
    assert debug.vocab_size == 1000 and DECODER_PRESETS["debug"].vocab_size != 1000
    assert [debug.is_moe_layer(i) for i in range(3)] == [False, True, True]
    every_other = decoder_config("full", first_k_dense_replace=2, moe_layer_freq=2)
    assert every_other.moe_layer_indices == [2, 4, 6, 8, 10]
    assert decoder_config("debug", moe={"num_experts_per_tok": 3}).moe.num_experts_per_tok == 3


@pytest.mark.unit
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: decoder_config("nope"), "unknown decoder preset"),
        (lambda: decoder_config("debug", hidden=3), "unknown DecoderConfig fields"),
        (lambda: DecoderConfig(hidden_size=100, num_heads=3), "divisible"),
        (lambda: MoEConfig(n_routed_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (lambda: MoEConfig(experts_backend="magic"), "experts_backend"),
        (lambda: DecoderConfig(attn_backend="xformers"), "attn_backend"),
        (lambda: DecoderConfig(vocab_size=1, bos_token_id=0, eos_token_id=1), "eos_token_id"),
        (lambda: decoder_config("full").is_moe_layer(12), "layer_idx"),
    ],
)
def test_invalid_configs_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()
