"""The chunked fused next-token loss against the plain one on materialised logits: value and
gradients of the hidden states and the lm_head weight (CPU)."""

from __future__ import annotations

import pytest
import torch

from pipeline.loss import IGNORE_INDEX, chunked_next_token_loss, next_token_loss


def _case(dtype: torch.dtype, *, b: int = 2, seq: int = 37, h: int = 16, v: int = 53, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, seq, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    labels = torch.randint(0, v, (b, seq), generator=g)
    labels[0, :5] = IGNORE_INDEX  # a prompt
    labels[1, 10:20] = IGNORE_INDEX  # image placeholders
    labels[:, -1] = IGNORE_INDEX
    return hidden, weight, labels


def _both(hidden, weight, labels, chunk):
    """(loss, d hidden, d weight) of the plain path and of the chunked path, upstream grad 0.7."""
    out = []
    for fused in (False, True):
        x = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        if fused:
            loss, count = chunked_next_token_loss(x, w, labels, chunk)
        else:
            loss, count = next_token_loss(x @ w.t(), labels)
        (loss * 0.7).backward()
        out.append((loss.detach(), count, x.grad, w.grad))
    return out


@pytest.mark.parity
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_equals_plain_loss_fp64(chunk):
    (lp, cp, xp, wp), (lf, cf, xf, wf) = _both(*_case(torch.float64), chunk)
    assert cp == cf == int((_case(torch.float64)[2][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(lf, lp, rtol=1e-13, atol=0)
    torch.testing.assert_close(xf, xp, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(wf, wp, rtol=1e-12, atol=1e-15)
    # ignored positions (and the last one) get exactly zero gradient
    assert torch.all(xf[0, :4] == 0) and torch.all(xf[1, 9:19] == 0) and torch.all(xf[:, -1] == 0)


@pytest.mark.parity
def test_chunked_loss_fp32_and_bf16_within_rounding():
    (lp, _, xp, wp), (lf, _, xf, wf) = _both(*_case(torch.float32, seq=300, v=1000), 128)
    torch.testing.assert_close(lf, lp, rtol=1e-6, atol=0)
    torch.testing.assert_close(xf, xp, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(wf, wp, rtol=1e-5, atol=1e-7)
    (lp, _, xp, wp), (lf, _, xf, wf) = _both(*_case(torch.bfloat16, seq=300, v=1000), 128)
    assert lf.dtype == lp.dtype == torch.float32  # the loss is computed in fp32 from bf16 logits
    torch.testing.assert_close(lf, lp, rtol=1e-6, atol=0)
    assert xf.dtype == wf.dtype == torch.bfloat16
    torch.testing.assert_close(xf.float(), xp.float(), rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(wf.float(), wp.float(), rtol=2e-2, atol=1e-4)


@pytest.mark.unit
def test_chunked_loss_against_an_independent_oracle():
    """Hand-written mean cross-entropy over the labelled next tokens (no shared helper)."""
    hidden, weight, labels = _case(torch.float64, seq=9, v=11)
    loss, count = chunked_next_token_loss(hidden, weight, labels, 4)
    terms = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y != IGNORE_INDEX:
                z = weight @ hidden[b, t]
                terms.append(torch.logsumexp(z, 0) - z[y])
    assert count == len(terms)
    assert float(loss) == pytest.approx(float(sum(terms) / len(terms)), rel=1e-13)


@pytest.mark.unit
def test_no_labelled_token_gives_zero_loss_and_zero_gradients():
    hidden, weight, labels = _case(torch.float32)
    x, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    loss, count = chunked_next_token_loss(x, w, torch.full_like(labels, IGNORE_INDEX), 8)
    loss.backward()
    assert count == 0 and float(loss.detach()) == 0.0
    assert torch.all(x.grad == 0) and torch.all(w.grad == 0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_next_token_loss(hidden, weight, labels, 0)


@pytest.mark.unit
def test_no_grad_forward_gives_the_same_value():
    hidden, weight, labels = _case(torch.float32)
    with torch.no_grad():
        loss, _ = chunked_next_token_loss(hidden, weight, labels, 5)
    ref, _ = next_token_loss(hidden @ weight.t(), labels)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
