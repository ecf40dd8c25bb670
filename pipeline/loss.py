"""The next-token loss of DeepSeek-OCR training, with and without the full logits in memory.

Objective (../shared/spec/training.md): mean cross-entropy of the logits at position t against
the label at t+1, over labels != -100 (prompt, image placeholders and padding are ignored).

- `next_token_loss(logits, labels)`: from logits (B, L, V) that already exist (the
  single-process `DeepSeekOCR.forward`, whose decoder returns logits).
- `chunked_next_token_loss(hidden, weight, labels, chunk_tokens)`: from the final-normed hidden
  states (B, L, H) and the lm_head weight (V, H), for the pipeline's last stage: only the
  labelled positions are projected, `chunk_tokens` rows at a time, and each chunk's gradient
  (softmax - one-hot) is turned into the gradients of `hidden` and `weight` right away in the
  forward (the fused linear cross-entropy of Liger-Kernel / Apple's "Cut your losses"), so the
  (L, V) logits, their fp32 copy, the log-probabilities and their gradient never exist for the
  whole row, and nothing is recomputed in backward. Peak extra memory: about 10 bytes per
  element of one (chunk_tokens, V) block plus fp32 gradient buffers of `weight` and `hidden`.

Both compute each chunk with the same `_chunk_nll_sum` (logits upcast to fp32, log_softmax,
nll_loss summed) and divide by the number of labelled tokens, so they agree to the rounding of
summing chunk sums in a different order (parity test: tests/pipeline/test_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits -> fp32; fp32 and fp64 stay as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p(target) over targets != -100, log-probabilities) of logits (n, V)."""
    logp = torch.log_softmax(_upcast(logits), dim=-1)  # (n, V)
    return F.nll_loss(logp, targets, ignore_index=IGNORE_INDEX, reduction="sum"), logp


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of logits[:, t] (B, L, V) against labels[:, t+1] over labels != -100."""
    shifted = labels[:, 1:]  # (B, L-1)
    count = int((shifted != IGNORE_INDEX).sum())
    if count == 0:
        return logits.sum() * 0.0, 0
    total, _ = _chunk_nll_sum(logits[:, :-1].flatten(0, 1), shifted.flatten())
    return total / count, count


class _FusedLinearNLL(torch.autograd.Function):
    """sum_i -log softmax(x_i W^T)[y_i] over rows of x (n, H), computed `chunk` rows at a time;
    the gradients for unit upstream gradient are formed in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=total.dtype, device=weight.device) if need_w else None
        for start in range(0, x.shape[0], chunk):
            xc, yc = x[start : start + chunk], targets[start : start + chunk]  # (c, H), (c,)
            nll, logp = _chunk_nll_sum(xc @ weight.t(), yc)  # logits (c, V) live only here
            total += nll
            if need_x or need_w:
                grad = logp.exp_()  # softmax, in place of the log-probabilities
                grad[torch.arange(yc.shape[0], device=yc.device), yc] -= 1.0  # d nll / d logits
                grad = grad.to(x.dtype)  # the dtype the plain path's matmul backward sees
                if need_x:
                    grad_x[start : start + chunk] = grad @ weight
                if need_w:
                    grad_w += (grad.t() @ xc).to(grad_w.dtype)
            del logp
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        dx = None if grad_x is None else grad_x * grad_total.to(grad_x.dtype)
        dw = None if grad_w is None else (grad_w * grad_total).to(ctx.weight_dtype)
        return dx, dw, None, None


def chunked_next_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
    *,
    positions: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """`next_token_loss(hidden @ weight.T, labels)` without materialising the (B, L, V) logits.

    hidden (B, L, H): final-normed decoder states; weight (V, H): the lm_head weight (no bias);
    labels (B, L) int64. Only positions whose next label is not -100 are projected, in chunks
    of `chunk_tokens` rows. `positions` (N,) / `targets` (N,): that selection precomputed on the
    host (flat b * L + t and labels[b, t + 1], `PackedBatch.loss_positions`): then nothing is read
    back from the device; without them the selection is a boolean mask (one host sync).
    Returns (mean loss, number of labelled tokens).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if positions is not None:
        count = int(positions.numel())  # a shape: known on the host
        x = hidden.flatten(0, 1).index_select(0, positions.to(hidden.device))  # (count, H)
        y = targets.to(hidden.device)  # (count,)
    else:
        shifted = labels[:, 1:]  # (B, L-1)
        keep = shifted != IGNORE_INDEX  # (B, L-1)
        count = int(keep.sum())
        x = hidden[:, :-1][keep] if count else None  # (count, H)
        y = shifted[keep].to(hidden.device) if count else None  # (count,)
    if count == 0:  # keep hidden and weight in the graph with zero gradient
        return (hidden.sum() + weight.sum()) * 0.0, 0
    total = _FusedLinearNLL.apply(x, weight, y, chunk_tokens)
    return total / count, count
