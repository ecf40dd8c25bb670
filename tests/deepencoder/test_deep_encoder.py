"""DeepEncoder behaviour on the debug preset: shapes, composition, validation, freezing,
gradient checkpointing, meta-device build, bf16-safe position interpolation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepencoder import ENCODER_PRESETS, DeepEncoder, encoder_config
from deepencoder.clip import resize_clip_pos
from deepencoder.sam import resize_abs_pos

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model() -> DeepEncoder:
    torch.manual_seed(0)
    return DeepEncoder(ENCODER_PRESETS["debug"]).eval()


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [64, 128, 192, 256])
def test_shapes_and_token_counts(model, size):
    g = size // 64
    with torch.no_grad():
        compressed = model.sam_features(pixels(2, size))
        out = model(pixels(2, size))
    assert compressed.shape == (2, 32, g, g)
    assert out.shape == (2, DeepEncoder.tokens_per_view(size), 64)
    assert torch.isfinite(out).all()


def test_forward_is_clip_then_sam_concat_through_projector(model):
    x = pixels(1, 128, seed=1)
    with torch.no_grad():
        compressed = model.sam_model(x)
        clip_tokens = model.vision_model(compressed)[:, 1:]  # (1, 4, 32)
        sam_tokens = compressed.flatten(2).transpose(1, 2)  # (1, 4, 32)
        w, b = model.projector.layers.weight, model.projector.layers.bias
        expected = clip_tokens @ w[:, :32].T + sam_tokens @ w[:, 32:].T + b  # CLIP occupies the first columns
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_views_are_independent_in_a_batch(model):
    x = pixels(3, 128, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1:2], model(x[1:2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(1, 1, 128, 128),  # wrong channel count
        torch.zeros(1, 3, 100, 100),  # not a multiple of 64
        torch.zeros(1, 3, 128, 64),  # not square
        torch.zeros(3, 128, 128),  # no batch axis
        torch.zeros(1, 3, 128, 128, dtype=torch.uint8),  # not floating
    ],
)
def test_bad_pixels_raise_value_error_naming_the_shape(model, bad):
    with pytest.raises(ValueError, match=r"\(N, 3, S, S\)"):
        model(bad)


def test_bad_compressed_features_raise(model):
    with pytest.raises(ValueError, match=r"\(N, 32, g, g\)"):
        model.clip_project(torch.zeros(1, 16, 2, 2))


def test_frozen_sam_runs_without_graph_and_clip_still_trains():
    model = DeepEncoder(ENCODER_PRESETS["debug"])
    x = pixels(1, 128).requires_grad_()  # as DeepSpeed's reentrant checkpointing would leave it
    assert model.sam_features(x).grad_fn is not None
    model.freeze_sam()
    assert all(not p.requires_grad for p in model.sam_model.parameters())
    compressed = model.sam_features(x)
    assert compressed.grad_fn is None and not compressed.requires_grad  # nothing stored for backward
    model.clip_project(compressed).sum().backward()
    assert x.grad is None
    assert model.vision_model.transformer.layers[0].self_attn.qkv_proj.weight.grad is not None
    assert model.projector.layers.weight.grad is not None


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = DeepEncoder(encoder_config("debug", sam={"window_size": 3}))  # 8x8 grid: padded windows
    with torch.no_grad():  # non-zero rel-pos tables so every parameter gets a gradient signal
        for block in model.sam_model.blocks:
            block.attn.rel_pos_h.normal_(std=0.1)
            block.attn.rel_pos_w.normal_(std=0.1)
    x = pixels(2, 128, seed=3)
    target = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(4))

    def grads(enabled: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.set_gradient_checkpointing(enabled)
        F.mse_loss(model(x), target).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    blocks = list(model.sam_model.blocks) + list(model.vision_model.transformer.layers)
    assert all(b.gradient_checkpointing for b in blocks)
    assert plain.keys() == ckpt.keys()
    assert len(plain) == sum(p.requires_grad for p in model.parameters()) - 2  # newline/separator unused here
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    model.set_gradient_checkpointing(False)
    assert not any(b.gradient_checkpointing for b in blocks)


def test_meta_build_then_to_empty_and_init_weights():
    with torch.device("meta"):
        model = DeepEncoder(ENCODER_PRESETS["debug"])
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(5)
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.sam_model.blocks[0].attn.rel_pos_h.abs().sum() == 0  # SAM's rel_pos_zero_init
    assert model.image_newline.std().item() == pytest.approx(64**-0.5, rel=0.5)
    with torch.no_grad():
        assert model(pixels(1, 64)).shape == (1, 1, 64)


def test_position_interpolation_runs_in_fp32_for_bf16_weights():
    gen = torch.Generator().manual_seed(6)
    sam_pos = torch.randn(1, 8, 8, 16, generator=gen)
    clip_pos = torch.randn(17, 16, generator=gen)
    for table, fn, size in ((sam_pos, resize_abs_pos, 5), (clip_pos, resize_clip_pos, 3)):
        want = fn(table, size).bfloat16()  # resize in fp32, round once
        got = fn(table.bfloat16().float(), size).bfloat16()
        assert torch.equal(fn(table.bfloat16(), size), got)
        assert (got.float() - want.float()).abs().max() < 0.05
    # bicubic + antialias + align_corners=False, CLS row untouched
    expected = F.interpolate(
        clip_pos[1:].reshape(1, 4, 4, 16).permute(0, 3, 1, 2), (3, 3), mode="bicubic", antialias=True
    )
    out = resize_clip_pos(clip_pos, 3)
    torch.testing.assert_close(out[0], clip_pos[0])
    torch.testing.assert_close(out[1:], expected.permute(0, 2, 3, 1).reshape(9, 16))


def test_bf16_forward_is_finite_and_close_to_fp32():
    model = DeepEncoder(encoder_config("debug")).eval()
    x = pixels(1, 192, seed=7)
    with torch.no_grad():
        ref = model(x)
        low = model.to(torch.bfloat16)(x.bfloat16()).float()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()
