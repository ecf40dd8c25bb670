"""DeepEncoder configs: presets, validation, exact parameter counts of the release (meta device)."""

from __future__ import annotations

import pytest
import torch

from deepencoder import ENCODER_PRESETS, ClipConfig, DeepEncoder, EncoderConfig, SamConfig, encoder_config
from deepencoder.adapters import encoder_keys

pytestmark = pytest.mark.unit


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_preset_parameter_counts_match_the_release():
    with torch.device("meta"):
        model = DeepEncoder(ENCODER_PRESETS["full"])
    compressor = n_params(model.sam_model.net_2) + n_params(model.sam_model.net_3)
    assert n_params(model.sam_model) - compressor == 89_670_912
    assert compressor == 5_898_240
    assert n_params(model.vision_model) == 303_177_728
    assert (
        n_params(model.vision_model.embeddings.patch_embedding) == 602_112
    )  # dead conv, kept for the layout
    assert n_params(model.projector) == 2_622_720
    assert model.image_newline.shape == model.view_seperator.shape == (1280,)
    assert n_params(model) == 401_372_160
    assert ENCODER_PRESETS["full"].feature_dim == 2048
    # the explicit key table of the adapters names every tensor
    assert sorted(encoder_keys(model.config)) == sorted(model.state_dict())
    assert not any("position_ids" in k for k in model.state_dict())


def test_full_preset_values():
    cfg = ENCODER_PRESETS["full"]
    assert (cfg.sam.embed_dim, cfg.sam.depth, cfg.sam.num_heads, cfg.sam.mlp_dim) == (768, 12, 12, 3072)
    assert cfg.sam.global_attn_indexes == (2, 5, 8, 11) and cfg.sam.window_size == 14
    assert cfg.sam.pos_grid == 64 and cfg.sam.layer_norm_eps == 1e-6
    assert (cfg.clip.width, cfg.clip.layers, cfg.clip.heads, cfg.clip.mlp_dim) == (1024, 24, 16, 4096)
    assert cfg.clip.num_positions == 257 and cfg.clip.layer_norm_eps == 1e-5
    assert cfg.n_embed == 1280


@pytest.mark.parametrize("view,tokens", [(512, 64), (640, 100), (1024, 256), (1280, 400), (64, 1), (128, 4)])
def test_tokens_per_view(view, tokens):
    assert DeepEncoder.tokens_per_view(view) == tokens


@pytest.mark.parametrize("view", [0, 100, 1000, -64, 64.0])
def test_tokens_per_view_rejects_bad_sizes(view):
    with pytest.raises(ValueError, match="multiple of 64"):
        DeepEncoder.tokens_per_view(view)


def test_debug_preset_is_small_and_structurally_alike():
    cfg = ENCODER_PRESETS["debug"]
    assert cfg.sam.global_attn_indexes and cfg.sam.window_size > 0
    assert cfg.feature_dim == cfg.clip.width + cfg.sam.out_channels
    assert n_params(DeepEncoder(cfg)) < 200_000


def test_encoder_config_copies_and_overrides():
    cfg = encoder_config("debug", sam={"attn_impl": "bias"}, n_embed=48)
    assert cfg.sam.attn_impl == "bias" and cfg.n_embed == 48
    assert ENCODER_PRESETS["debug"].sam.attn_impl == "augmented"  # the registry is not mutated
    assert encoder_config("full") is not ENCODER_PRESETS["full"]
    assert encoder_config("full").sam == ENCODER_PRESETS["full"].sam


def test_encoder_config_unknown_name_lists_presets():
    with pytest.raises(ValueError, match=r"known presets: \['debug', 'full', 'small'\]"):
        encoder_config("huge")
    with pytest.raises(ValueError, match="unknown EncoderConfig fields"):
        encoder_config("debug", width=3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"embed_dim": 30, "num_heads": 4}, "divisible"),
        ({"global_attn_indexes": (0, 12)}, "global_attn_indexes"),
        ({"global_attn_indexes": (1, 1)}, "global_attn_indexes"),
        ({"img_size": 1000}, "multiple of patch_size"),
        ({"compressor_channels": (512,)}, "compressor_channels"),
        ({"attn_impl": "flash"}, "attn_impl"),
        ({"window_size": -1}, "window_size"),
    ],
)
def test_sam_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamConfig(**kwargs)


def test_clip_and_encoder_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        ClipConfig(width=100, heads=16)
    with pytest.raises(ValueError, match="must equal ClipConfig.width"):
        EncoderConfig(sam=SamConfig(), clip=ClipConfig(width=768, heads=12), n_embed=1280)
    with pytest.raises(ValueError, match="patch_size"):
        EncoderConfig(sam=SamConfig(patch_size=32), clip=ClipConfig())
    with pytest.raises(ValueError, match="n_embed"):
        EncoderConfig(n_embed=0)
