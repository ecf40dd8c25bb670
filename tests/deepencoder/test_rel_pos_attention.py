"""The augmented-q/k relative-position attention equals the plain (explicit bias matrix) one.

Oracle: an explicit softmax(scale * q k^T + B) v where B[i, j] = q_i . Rh[hi-hj+H-1] + q_i . Rw[wi-wj+W-1]
is gathered pair by pair (no decomposition, no SDPA), following segment-anything's definition.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepencoder import attention
from deepencoder.attention import augmented_rel_pos_attention, decomposed_bias_attention, resize_rel_pos

pytestmark = pytest.mark.unit


def explicit_oracle(q, k, v, rel_pos_h, rel_pos_w, hw):
    height, width = hw
    n = height * width
    rows = torch.arange(n) // width
    cols = torch.arange(n) % width
    rh = resize_rel_pos(rel_pos_h, 2 * height - 1)[rows[:, None] - rows[None, :] + height - 1]  # (n, n, C)
    rw = resize_rel_pos(rel_pos_w, 2 * width - 1)[cols[:, None] - cols[None, :] + width - 1]  # (n, n, C)
    bias = torch.einsum("bhic,ijc->bhij", q, rh + rw)
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias
    return logits.softmax(-1) @ v


def make_inputs(hw, head_dim, table_len, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = hw[0] * hw[1]
    q, k, v = (torch.randn(2, 3, n, head_dim, generator=gen, dtype=dtype) for _ in range(3))
    rel_h = torch.randn(2 * table_len[0] - 1, head_dim, generator=gen, dtype=dtype) * 0.5
    rel_w = torch.randn(2 * table_len[1] - 1, head_dim, generator=gen, dtype=dtype) * 0.5
    return q, k, v, rel_h, rel_w


CASES = [
    # (hw, head_dim, table built for): square window, non-square grid, resized tables, odd head dim
    ((4, 4), 16, (4, 4)),
    ((3, 5), 64, (3, 5)),
    ((8, 8), 16, (4, 4)),
    ((6, 6), 12, (10, 10)),
]


@pytest.mark.parametrize("hw,head_dim,table", CASES)
def test_augmented_equals_bias_and_explicit_oracle(hw, head_dim, table):
    q, k, v, rel_h, rel_w = make_inputs(hw, head_dim, table)
    expected = explicit_oracle(q, k, v, rel_h, rel_w, hw)
    plain = decomposed_bias_attention(q, k, v, rel_h, rel_w, hw)
    augmented = augmented_rel_pos_attention(q, k, v, rel_h, rel_w, hw)
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(augmented, expected, rtol=1e-5, atol=1e-5)
    padded_v = augmented_rel_pos_attention(q, k, v, rel_h, rel_w, hw, pad_value=True)
    torch.testing.assert_close(padded_v, expected, rtol=1e-5, atol=1e-5)


def test_augmented_gradients_equal_bias_gradients():
    hw = (5, 5)
    leaves = [t.requires_grad_() for t in make_inputs(hw, 16, (3, 3), seed=1)]
    grads = []
    for fn in (decomposed_bias_attention, augmented_rel_pos_attention):
        out = fn(*leaves, hw)
        grads.append(
            torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), leaves)
        )
    for g_plain, g_aug in zip(*grads):
        torch.testing.assert_close(g_aug, g_plain, rtol=1e-5, atol=5e-6)  # fp32 sums in another order (torch 2.14: 1.4e-6)


def test_augmented_calls_sdpa_without_mask(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape, args, kwargs))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    q, k, v, rel_h, rel_w = make_inputs((4, 4), 16, (4, 4))
    augmented_rel_pos_attention(q, k, v, rel_h, rel_w, (4, 4))
    ((shape, args, kwargs),) = calls
    assert args == () and kwargs.get("attn_mask") is None
    assert shape[-1] % 8 == 0 and shape[-1] >= 16 + 4 + 4  # head dim + H + W extra channels, aligned
    assert kwargs["scale"] == pytest.approx(16**-0.5)


def test_augmented_is_as_accurate_as_bias_in_bf16():
    hw = (14, 14)
    q, k, v, rel_h, rel_w = make_inputs(hw, 64, (14, 14), seed=2)
    reference = explicit_oracle(q, k, v, rel_h, rel_w, hw)
    low = [t.bfloat16() for t in (q, k, v, rel_h, rel_w)]
    err_plain = (decomposed_bias_attention(*low, hw).float() - reference).abs().max()
    err_aug = (augmented_rel_pos_attention(*low, hw).float() - reference).abs().max()
    assert err_aug <= 2 * err_plain + 1e-3, (err_aug, err_plain)


def test_resize_rel_pos_is_linear_and_fp32():
    table = torch.tensor([[0.0], [1.0], [2.0]])  # a linear ramp stays a ramp
    out = resize_rel_pos(table, 5)
    # align_corners=False sampling of 3 -> 5 points: src = (i + 0.5) * 3/5 - 0.5, clamped
    expected = torch.tensor([0.0, 0.4, 1.0, 1.6, 2.0]).unsqueeze(1)
    torch.testing.assert_close(out, expected)
    assert resize_rel_pos(table.bfloat16(), 5).dtype == torch.bfloat16
    assert resize_rel_pos(table, 3) is table
