"""Release-checkpoint key map: exact key set of the released decoder, round trip, strictness."""

import pytest
import torch

from decoder import DecoderModel, decoder_config, decoder_state_from_release, decoder_state_to_release


@pytest.mark.unit
def test_full_release_layout_on_meta():
    cfg = decoder_config("full")
    with torch.device("meta"):
        ours = DecoderModel(cfg).state_dict()
    release = decoder_state_to_release(ours, config=cfg)
    # the released checkpoint holds 2,710 tensors; 476 are vision/glue, 2,234 decoder
    assert len(release) == 2234
    assert sum(v.numel() for v in release.values()) == 2_934_734_080
    assert tuple(release["model.layers.5.mlp.experts.63.gate_proj.weight"].shape) == (896, 1280)
    assert tuple(release["model.layers.5.mlp.experts.0.down_proj.weight"].shape) == (1280, 896)
    assert tuple(release["model.layers.0.mlp.up_proj.weight"].shape) == (6848, 1280)
    assert tuple(release["model.layers.11.mlp.shared_experts.down_proj.weight"].shape) == (1280, 1792)
    assert tuple(release["model.layers.3.mlp.gate.weight"].shape) == (64, 1280)
    assert "lm_head.weight" in release and "model.norm.weight" in release
    assert "model.layers.0.mlp.gate.weight" not in release


@pytest.mark.unit
def test_round_trip_and_strict_load():
    torch.manual_seed(0)
    cfg = decoder_config("debug")
    model = DecoderModel(cfg)
    ours = model.state_dict()
    release = decoder_state_to_release(ours)
    e3 = release["model.layers.2.mlp.experts.3.up_proj.weight"]
    inter = cfg.moe.moe_intermediate_size
    assert torch.equal(e3, ours["layers.2.mlp.experts.gate_up_proj"][3, inter:])
    back = decoder_state_from_release(release, config=cfg)
    assert back.keys() == ours.keys()
    for key in ours:
        assert torch.equal(back[key], ours[key]), key
    fresh = DecoderModel(cfg)
    fresh.load_state_dict(back, strict=True)
    assert torch.equal(fresh.layers[1].mlp.experts.down_proj, model.layers[1].mlp.experts.down_proj)


@pytest.mark.unit
def test_strictness_lists_missing_and_unexpected_keys():
    cfg = decoder_config("debug")
    release = decoder_state_to_release(DecoderModel(cfg).state_dict())
    broken = dict(release)
    del broken["model.layers.1.self_attn.k_proj.weight"]
    broken["model.sam_model.pos_embed"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"missing keys \['layers.1.self_attn.k_proj.weight'\].*model.sam_model"
    ):
        decoder_state_from_release(broken)
    no_expert = dict(release)
    del no_expert["model.layers.2.mlp.experts.5.down_proj.weight"]
    with pytest.raises(ValueError, match="experts.5.down_proj"):
        decoder_state_from_release(no_expert)
    # against a config, a whole missing MoE layer is caught too
    partial = {k: v for k, v in release.items() if ".layers.2." not in k}
    with pytest.raises(ValueError, match="layers.2.mlp.gate.weight"):
        decoder_state_from_release(partial, config=cfg)
    with pytest.raises(ValueError, match="unexpected keys \\['extra'\\]"):
        decoder_state_to_release({**DecoderModel(cfg).state_dict(), "extra": torch.zeros(1)})
