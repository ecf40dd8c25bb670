"""CUDA checks of the full-size DeepEncoder (skipped without a GPU): every mode's token count,
augmented == plain relative-position attention at release shapes, and the augmented path
running on fused SDPA kernels only (no math fallback, no materialised bias)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from deepencoder import ENCODER_PRESETS, DeepEncoder, encoder_config
from deepencoder.attention import augmented_rel_pos_attention, decomposed_bias_attention
from deepencoder.sam import SamEncoder

pytestmark = pytest.mark.gpu

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.fixture(scope="module")
def full_model() -> DeepEncoder:
    torch.manual_seed(0)
    return DeepEncoder(ENCODER_PRESETS["full"]).cuda().to(torch.bfloat16).eval()


@pytest.mark.parametrize("view,tokens", [(512, 64), (640, 100), (1024, 256), (1280, 400)])
def test_full_encoder_token_counts(full_model, view, tokens):
    x = torch.randn(2, 3, view, view, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = full_model(x)
    assert out.shape == (2, tokens, 1280) and torch.isfinite(out).all()


@pytest.mark.parametrize("side", [14, 40, 64, 80])
def test_augmented_equals_bias_at_release_shapes_fp32(side):
    gen = torch.Generator(device="cuda").manual_seed(side)
    q, k, v = (torch.randn(2, 12, side * side, 64, device="cuda", generator=gen) for _ in range(3))
    rel_h, rel_w = (torch.randn(127, 64, device="cuda", generator=gen) * 0.3 for _ in range(2))
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        plain = decomposed_bias_attention(q, k, v, rel_h, rel_w, (side, side))
        aug = augmented_rel_pos_attention(q, k, v, rel_h, rel_w, (side, side))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    torch.testing.assert_close(aug, plain, rtol=1e-4, atol=1e-4)


def test_augmented_sam_runs_on_fused_kernels_and_matches_bias_in_bf16():
    torch.manual_seed(0)
    cfg = encoder_config("full").sam
    model = SamEncoder(cfg).cuda()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.rel_pos_h.normal_(std=0.3)
            block.attn.rel_pos_w.normal_(std=0.3)
    x = torch.randn(2, 3, 1024, 1024, device="cuda")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.impl = "bias"
        reference = model(x)  # fp32 plain formulation
        model.to(torch.bfloat16)
        plain_bf16 = model(x.bfloat16()).float()
        for block in model.blocks:
            block.attn.impl = "augmented"
        with sdpa_kernel(FUSED):
            aug_bf16 = model(x.bfloat16()).float()
    err_plain = (plain_bf16 - reference).abs().max()
    err_aug = (aug_bf16 - reference).abs().max()
    assert err_aug <= 1.5 * err_plain + 1e-2, (err_aug.item(), err_plain.item())
    with sdpa_kernel(FUSED):  # backward too
        model(x[:1].bfloat16()).float().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
