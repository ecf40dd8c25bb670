"""Multi-head self-attention of the DeepSeek-OCR decoder (plain MHA, RoPE, no bias) and its masks.

`build_attention_info` turns doc_ids (packed rows), attention_mask (left-padded batches)
or a KV cache into an `AttnInfo` computed once per forward and shared by all layers:

- "causal": one document per row, no padding -> SDPA with is_causal=True (flash kernels on GPU);
- "full":   one new token per row attending to every cached key (decoding, no padding);
- "varlen": packed rows on CUDA with flash-attn installed -> flash_attn_varlen_func over
            the flattened documents (cu_seqlens);
- "flex":   packed rows on CUDA without flash-attn -> FlexAttention with a document block mask;
- "mask":   otherwise (CPU, padding, cache with offsets) -> SDPA with a boolean mask.

A document attends causally to itself only; padding (doc id -1) forms its own segment whose
outputs are never used. Every query may always attend to its own key, so no softmax row is
empty (left padding would otherwise produce NaN rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import DecoderConfig
from .rope import apply_rotary

try:  # optional fused varlen kernel (pip install flash-attn)
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_varlen_func = None

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - torch < 2.5
    create_block_mask = flex_attention = None

_compiled_flex = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


@dataclass
class AttnInfo:
    """How every layer of one forward attends (see the module docstring for `kind`).

    mask: (B, 1, Tq, Tk) bool, True = may attend ("mask" kind). cu_seqlens (n_docs+1,) int32 and
    max_seqlen for "varlen"; block_mask for "flex". token_mask (B, T) bool marks real tokens
    (None = all real); MoE load statistics and the aux loss ignore the others.
    """

    kind: str
    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    block_mask: object | None = None
    token_mask: torch.Tensor | None = None


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token inside its document (restarting at 0 per document)."""
    b, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device).expand(b, t)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T)
    return idx - first


def _causal_key_mask(key_valid: torch.Tensor, num_q: int, past: int) -> torch.Tensor:
    """(B, 1, Tq, Tk) bool: key valid and not in the future; the own position is always allowed."""
    tk = key_valid.shape[1]
    q_pos = torch.arange(num_q, device=key_valid.device)[:, None] + past  # (Tq, 1)
    k_pos = torch.arange(tk, device=key_valid.device)[None, :]  # (1, Tk)
    allowed = key_valid[:, None, :] & (k_pos <= q_pos)  # (B, Tq, Tk)
    allowed = allowed | (k_pos == q_pos)
    return allowed[:, None]  # (B, 1, Tq, Tk)


def _doc_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: same document and not in the future."""
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


def _varlen_info(doc_ids: torch.Tensor, token_mask: torch.Tensor | None) -> AttnInfo:
    b, t = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = starts.reshape(-1).nonzero().squeeze(1)  # flattened (B*T) document starts
    total = torch.tensor([b * t], device=doc_ids.device, dtype=start_idx.dtype)
    cu = torch.cat([start_idx, total]).to(torch.int32)
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    return AttnInfo("varlen", cu_seqlens=cu, max_seqlen=max_seqlen, token_mask=token_mask)


def _flex_info(doc_ids: torch.Tensor, token_mask: torch.Tensor | None) -> AttnInfo:
    b, t = doc_ids.shape

    def doc_causal(bi, hi, qi, ki):
        return (doc_ids[bi, qi] == doc_ids[bi, ki]) & (qi >= ki)

    block_mask = create_block_mask(doc_causal, b, None, t, t, device=doc_ids.device)
    return AttnInfo("flex", block_mask=block_mask, token_mask=token_mask)


def build_attention_info(
    batch: int,
    seq: int,
    device: torch.device,
    *,
    doc_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    cache: KVCache | None = None,
    backend: str = "auto",
) -> AttnInfo:
    """Describe the attention pattern of one forward over `seq` new tokens per row.

    With a cache, call after `cache.set_valid(...)` for the new tokens and before `advance`.
    """
    if doc_ids is not None and attention_mask is not None:
        raise ValueError("pass doc_ids (packed rows, -1 = padding) or attention_mask, not both")
    if cache is not None:
        if doc_ids is not None:
            raise ValueError("doc_ids (packed documents) cannot be combined with a KV cache")
        past = cache.length
        key_valid = cache.valid[:, : past + seq]  # (B, past+T)
        token_mask = key_valid[:, past:]
        if bool(key_valid.all()):
            if seq == 1:
                return AttnInfo("full")
            if past == 0:
                return AttnInfo("causal")
            token_mask = None
        return AttnInfo("mask", mask=_causal_key_mask(key_valid, seq, past), token_mask=token_mask)
    if attention_mask is not None:
        if attention_mask.shape != (batch, seq):
            raise ValueError(
                f"attention_mask must be (B, T) = {(batch, seq)}, got {tuple(attention_mask.shape)}"
            )
        key_valid = attention_mask.to(device=device, dtype=torch.bool)
        if bool(key_valid.all()):
            return AttnInfo("causal")
        return AttnInfo("mask", mask=_causal_key_mask(key_valid, seq, 0), token_mask=key_valid)
    if doc_ids is None:
        return AttnInfo("causal")
    if doc_ids.shape != (batch, seq):
        raise ValueError(f"doc_ids must be (B, T) = {(batch, seq)}, got {tuple(doc_ids.shape)}")
    if doc_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"doc_ids must be an integer tensor, got {doc_ids.dtype}")
    # Packed rows always carry their token mask (exact when every token is real): testing whether
    # the rows are all one unpadded document would read the device back (a sync per step).
    token_mask = doc_ids >= 0
    on_cuda = doc_ids.device.type == "cuda"
    if backend == "flash" and (flash_attn_varlen_func is None or not on_cuda):
        raise ValueError("attn_backend='flash' needs flash-attn installed and CUDA tensors")
    if backend == "flex" and (create_block_mask is None or not on_cuda):
        raise ValueError("attn_backend='flex' needs torch.nn.attention.flex_attention and CUDA tensors")
    if on_cuda and backend in ("auto", "flash") and flash_attn_varlen_func is not None:
        return _varlen_info(doc_ids, token_mask)
    if on_cuda and backend in ("auto", "flex") and create_block_mask is not None:
        return _flex_info(doc_ids, token_mask)
    return AttnInfo("mask", mask=_doc_mask(doc_ids), token_mask=token_mask)


class Attention(nn.Module):
    """q/k/v/o projections without bias, RoPE on q and k, scaled dot-product attention."""

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.init_std = config.initializer_range
        h = config.hidden_size
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(lin.weight, mean=0.0, std=self.init_std)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        info: AttnInfo,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, t, h = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = apply_rotary(self.q_proj(x).view(shape), *rope)  # (B, T, nh, hd)
        k = apply_rotary(self.k_proj(x).view(shape), *rope)
        v = self.v_proj(x).view(shape)
        if info.kind == "varlen":
            flat = (b * t, self.num_heads, self.head_dim)
            out = flash_attn_varlen_func(
                q.reshape(flat),
                k.reshape(flat),
                v.reshape(flat),
                info.cu_seqlens,
                info.cu_seqlens,
                info.max_seqlen,
                info.max_seqlen,
                causal=True,
            )  # (B*T, nh, hd)
            return self.o_proj(out.reshape(b, t, h))
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, past+T, hd)
        if info.kind == "causal":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif info.kind == "full":
            out = F.scaled_dot_product_attention(q, k, v)
        elif info.kind == "mask":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=info.mask)
        elif info.kind == "flex":
            out = _flex(q, k, v, info.block_mask)
        else:
            raise AssertionError(f"unknown attention kind {info.kind!r}")
        out = out.transpose(1, 2).reshape(b, t, h)  # (B, T, H)
        return self.o_proj(out)
