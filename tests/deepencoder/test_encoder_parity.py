"""Parity of the DeepEncoder parts against independent implementations (fp32, CPU, rel. tol 1e-5).

Oracles: segment-anything `ImageEncoderViT` (SAM trunk + neck), transformers' DeepSeek-OCR-2 SAM
encoder (`downsample_channels` = our compressor; SAM + compressor at sizes that resize the
position tables), transformers `CLIPVisionModel` (its `CLIPEncoderLayer` blocks, quick_gelu) and
open_clip's `VisionTransformer`. Random weights go through our adapters (`deepencoder.adapters`).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepencoder.adapters import (
    clip_state_from_hf,
    clip_state_from_open_clip,
    load_into,
    sam_state_from_segment_anything,
)
from deepencoder.clip import ClipVisionModel
from deepencoder.config import ClipConfig, SamConfig
from deepencoder.sam import SamEncoder

pytestmark = pytest.mark.parity


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * scale, f"max abs err {err:.3e} > {tol} * max |expected| {scale:.3e}"


@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> None:
    """Fill every parameter with N(0, 0.5^2) (non-zero rel-pos tables and positions included)."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    assert all(k.startswith(prefix) for k in sd)
    return {k[len(prefix) :]: v for k, v in sd.items()}


# ----------------------------------------------------------------------------- SAM


SAM_CASES = [
    # (img_size, window, global indexes, impl): window 4 tiles the 8x8 grid; window 3 pads it to 9x9.
    (128, 4, (1, 3), "augmented"),
    (128, 3, (0, 2), "augmented"),
    (128, 3, (0, 2), "bias"),
]


@pytest.mark.parametrize("img_size,window,globals_,impl", SAM_CASES)
def test_sam_trunk_and_neck_match_segment_anything(img_size, window, globals_, impl):
    from segment_anything.modeling import ImageEncoderViT

    ref = ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        embed_dim=32,
        depth=4,
        num_heads=2,
        mlp_ratio=4.0,
        out_chans=16,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
        use_abs_pos=True,
        use_rel_pos=True,
        window_size=window,
        global_attn_indexes=globals_,
    ).eval()
    randomize(ref, seed=0)
    cfg = SamConfig(
        img_size=img_size,
        embed_dim=32,
        depth=4,
        num_heads=2,
        out_chans=16,
        window_size=window,
        global_attn_indexes=globals_,
        compressor_channels=(24, 32),
        attn_impl=impl,
    )
    ours = SamEncoder(cfg).eval()
    state = sam_state_from_segment_anything(ref.state_dict(), cfg, prefix="")
    load_into(ours, strip(state, "sam_model."), allow_missing=("net_2.", "net_3."))

    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_rel_close(ours.neck_features(x), ref(x))


HF_SAM_KEYS = {
    "patch_embed.projection.": "patch_embed.proj.",
    "neck.conv1.": "neck.0.",
    "neck.layer_norm1.": "neck.1.",
    "neck.conv2.": "neck.2.",
    "neck.layer_norm2.": "neck.3.",
    "proj.conv1.": "net_2.",
    "proj.conv2.": "net_3.",
}


def hf_sam_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Test-local key table: transformers DeepseekOcr2SamVisionEncoder -> our SamEncoder."""
    out = {}
    for k, v in sd.items():
        new = (
            k.replace("layers.", "blocks.")
            .replace(".layer_norm1.", ".norm1.")
            .replace(".layer_norm2.", ".norm2.")
        )
        for a, b in HF_SAM_KEYS.items():
            if k.startswith(a):
                new = b + k[len(a) :]
        out[new] = v
    return out


@pytest.mark.parametrize("impl", ["augmented", "bias"])
@pytest.mark.parametrize("view", [64, 128, 192, 320])
def test_sam_with_compressor_matches_transformers_deepseek_ocr2(view, impl):
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2SamVisionConfig
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2SamVisionEncoder

    hf_cfg = DeepseekOcr2SamVisionConfig(
        hidden_size=32,
        output_channels=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        image_size=128,
        patch_size=16,
        window_size=4,
        global_attn_indexes=[1, 3],
        downsample_channels=[24, 32],
        attn_implementation="eager",
    )
    ref = DeepseekOcr2SamVisionEncoder(hf_cfg).eval()
    randomize(ref, seed=2)
    cfg = SamConfig(
        img_size=128,
        embed_dim=32,
        depth=4,
        num_heads=2,
        out_chans=16,
        window_size=4,
        global_attn_indexes=(1, 3),
        compressor_channels=(24, 32),
        attn_impl=impl,
    )
    ours = SamEncoder(cfg).eval()
    load_into(ours, hf_sam_to_ours(ref.state_dict()))

    x = torch.randn(2, 3, view, view, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = ours(x)
        assert got.shape == (2, 32, view // 64, view // 64)
        assert_rel_close(got, ref(x).last_hidden_state)


# ----------------------------------------------------------------------------- CLIP

CLIP_CFG = ClipConfig(width=32, layers=2, heads=2, mlp_dim=128, image_size=56, patch_size=14)


def test_clip_matches_transformers_clip_vision_model():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf_cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attn_implementation="eager",
    )
    ref = CLIPVisionModel(hf_cfg).eval()
    randomize(ref, seed=4)
    ours = ClipVisionModel(CLIP_CFG).eval()
    # transformers 5 keeps no "vision_model." prefix in memory (files written by 4.x have it).
    load_into(ours, strip(clip_state_from_hf(ref.state_dict(), CLIP_CFG, prefix=""), "vision_model."))

    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        # DeepSeek-OCR feeds SAM features as patch embeddings; CLIP's own patch conv is the oracle's input path.
        patches = F.conv2d(pixels, ours.embeddings.patch_embedding.weight, stride=14)  # (2, 32, 4, 4)
        expected = ref(pixel_values=pixels).last_hidden_state  # (2, 17, 32), no final LayerNorm on it
        assert_rel_close(ours(patches), expected)


def test_clip_blocks_match_transformers_clip_encoder_layer():
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    hf_cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=128,
        num_attention_heads=2,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    hf_cfg._attn_implementation = "eager"
    ref = CLIPEncoderLayer(hf_cfg).eval()
    randomize(ref, seed=6)
    ours = ClipVisionModel(dataclasses.replace(CLIP_CFG, layers=1)).eval()
    sd = {f"vision_model.encoder.layers.0.{k}": v for k, v in ref.state_dict().items()}
    state = clip_state_from_hf(sd | _clip_stem(CLIP_CFG), dataclasses.replace(CLIP_CFG, layers=1))
    load_into(ours, strip(state, "vision_model."))
    x = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = ref(x, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        assert_rel_close(ours.transformer.layers[0](x), out)


def _clip_stem(cfg: ClipConfig) -> dict[str, torch.Tensor]:
    w = cfg.width
    return {
        "vision_model.embeddings.class_embedding": torch.zeros(w),
        "vision_model.embeddings.patch_embedding.weight": torch.zeros(w, 3, cfg.patch_size, cfg.patch_size),
        "vision_model.embeddings.position_embedding.weight": torch.zeros(cfg.num_positions, w),
        "vision_model.pre_layrnorm.weight": torch.ones(w),
        "vision_model.pre_layrnorm.bias": torch.zeros(w),
    }


def test_clip_matches_open_clip_vision_transformer():
    from open_clip.transformer import QuickGELU, VisionTransformer

    ref = VisionTransformer(
        image_size=56,
        patch_size=14,
        width=32,
        layers=2,
        heads=2,
        mlp_ratio=4.0,
        output_dim=16,
        act_layer=QuickGELU,
    ).eval()
    randomize(ref, seed=8)
    ours = ClipVisionModel(CLIP_CFG).eval()
    load_into(ours, strip(clip_state_from_open_clip(ref.state_dict(), CLIP_CFG, prefix=""), "vision_model."))

    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = ref.forward_intermediates(
            pixels, indices=1, output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
        )
        expected = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
        patches = F.conv2d(pixels, ours.embeddings.patch_embedding.weight, stride=14)
        assert_rel_close(ours(patches), expected)
