"""Parity of DecoderModel with transformers' DeepSeek-OCR-2 text model (DeepseekOcr2TextModel).

The oracle is an independent implementation of the same DeepseekV2-style MoE decoder; weights
go ours -> release layout (decoder_state_to_release) -> the oracle's own layout (converted
here), so the release adapter is on the path. The oracle has no lm_head: its final hidden
states go through our lm_head weight.
"""

import pytest
import torch
import torch.nn.functional as F

from decoder import DecoderModel, decoder_config, decoder_state_to_release

hf = pytest.importorskip("transformers.models.deepseek_ocr2")


def oracle_config(c):
    return hf.DeepseekOcr2TextConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        n_routed_experts=c.moe.n_routed_experts,
        num_experts_per_tok=c.moe.num_experts_per_tok,
        moe_intermediate_size=c.moe.moe_intermediate_size,
        n_shared_experts=c.moe.n_shared_experts,
        routed_scaling_factor=c.moe.routed_scaling_factor,
        topk_method="greedy",
        mlp_layer_types=["sparse" if c.is_moe_layer(i) else "dense" for i in range(c.num_layers)],
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )


def release_to_oracle(release, num_layers, num_experts):
    """Release keys -> DeepseekOcr2TextModel keys (fused gate_up per expert, gate rows first)."""
    out = {}
    for key, value in release.items():
        if key == "lm_head.weight" or ".mlp.experts." in key:
            continue
        out[key.removeprefix("model.")] = value
    for i in range(num_layers):
        base = f"model.layers.{i}.mlp.experts"
        if f"{base}.0.gate_proj.weight" not in release:
            continue
        out[f"layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [
                torch.cat([release[f"{base}.{e}.gate_proj.weight"], release[f"{base}.{e}.up_proj.weight"]])
                for e in range(num_experts)
            ]
        )
        out[f"layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [release[f"{base}.{e}.down_proj.weight"] for e in range(num_experts)]
        )
    return out


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = decoder_config("debug")
    ours = DecoderModel(cfg)
    # non-trivial norm weights so the norm/weight order matters
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    oracle = hf.DeepseekOcr2TextModel(oracle_config(cfg))
    release = decoder_state_to_release(ours.state_dict())
    oracle.load_state_dict(release_to_oracle(release, cfg.num_layers, cfg.moe.n_routed_experts), strict=True)
    return cfg, ours, oracle


def oracle_logits(oracle, ours, ids, attention_mask=None):
    hidden = oracle(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    return F.linear(hidden, ours.lm_head.weight).float()


def assert_rel_close(a, b, rtol=1e-5):
    err = (a - b).abs().max() / b.abs().max()
    assert err < rtol, f"relative error {err:.2e}"


@pytest.mark.parity
@pytest.mark.parametrize("train", [False, True])
def test_logits_match_transformers(pair, train):
    cfg, ours, oracle = pair
    ours.train(train)
    oracle.train(train)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.set_grad_enabled(train):
        out = ours(ids)
        ref = oracle_logits(oracle, ours, ids)
    assert out.logits.dtype == torch.float32
    assert_rel_close(out.logits, ref)
    if train:
        assert out.aux_loss.item() > 0
    else:
        assert out.aux_loss.item() == 0


@pytest.mark.parity
def test_left_padded_batch_matches_transformers(pair):
    cfg, ours, oracle = pair
    ours.eval()
    oracle.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0  # row 0 left-padded by 5
    with torch.no_grad():
        out = ours(ids, attention_mask=mask).logits
        ref = oracle_logits(oracle, ours, ids, attention_mask=mask)
    valid = mask.bool()
    assert_rel_close(out[valid], ref[valid])
