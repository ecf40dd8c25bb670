"""DeepSeek3B-MoE decoder of DeepSeek-OCR: embedding, 12 pre-norm blocks, final RMSNorm, untied lm_head.

Block (DeepseekV2DecoderLayer without MLA): x += attn(RMSNorm(x)); x += mlp(RMSNorm(x)), where
mlp is a dense SwiGLU or the MoE of decoder/moe.py (architecture.md section 2). RMSNorm is
computed in fp32 and cast back before the weight multiply, as in the reference.

Written to be cut into pipeline stages (torchtitan style): layers are built from
(config, layer_idx) with tensor-in/tensor-out forwards `layer(hidden, rope, attn_info, cache)`;
a stage rebuilds `rope` with `RotaryEmbedding` (or `DecoderModel.prepare`) and `attn_info`
with `build_attention_info` from the int64 position_ids/doc_ids it receives; the last stage
calls `head`. The MoE balance loss is returned, never hidden in the graph: the trainer adds
`aux_loss` to its objective (the reference attaches it with an identity autograd function).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, AttnInfo, build_attention_info, positions_from_doc_ids
from .cache import KVCache
from .config import DecoderConfig
from .moe import MoE, SwiGLU
from .rope import RotaryEmbedding


class RMSNorm(nn.Module):
    """weight * x * rsqrt(mean(x^2) + eps), computed in fp32 (torch's fused rms_norm upcasts)
    and rounded once to x's dtype; the reference rounds x_normed before the weight multiply,
    so bf16 results agree to rounding and fp32 results exactly."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), eps=self.eps)


@dataclass
class DecoderOutput:
    """logits (B, T, V) fp32; aux_loss: scalar fp32 sum of the MoE balance losses (0 in eval and
    for dense models); expert_counts (n_moe_layers, E) int64 tokens per expert, or None."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    expert_counts: torch.Tensor | None


class DecoderLayer(nn.Module):
    """One pre-norm block; `forward(hidden, rope, attn_info, cache) -> (hidden, aux_loss)`."""

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_moe:
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.initializer_range)
        self.gradient_checkpointing = False

    def init_weights(self) -> None:
        self.input_layernorm.init_weights()
        self.self_attn.init_weights()
        self.post_attention_layernorm.init_weights()
        self.mlp.init_weights()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.gradient_checkpointing = enabled

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_info: AttnInfo,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
            return checkpoint(self._block, hidden, rope, attn_info, None, use_reentrant=False)
        return self._block(hidden, rope, attn_info, cache)

    def _block(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_info: AttnInfo,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rope, attn_info, cache)
        x = self.post_attention_layernorm(hidden)
        if self.is_moe:
            out, aux = self.mlp(x, attn_info.token_mask)
        else:
            out, aux = self.mlp(x), torch.zeros((), device=x.device, dtype=torch.float32)
        return hidden + out, aux


class DecoderModel(nn.Module):
    """The language model. See `forward` for the inputs of the packed, padded and cached modes."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self._init_ends()

    @torch.no_grad()
    def _init_ends(self) -> None:
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=self.config.initializer_range)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=self.config.initializer_range)

    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer, e.g. after building on the meta device."""
        self._init_ends()
        for layer in self.layers:
            layer.init_weights()
        self.norm.init_weights()
        self.rotary.init_weights()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        # a pipeline stage keeps only its own layers, in a ModuleDict keyed by layer index
        layers = self.layers.values() if isinstance(self.layers, nn.ModuleDict) else self.layers
        for layer in layers:
            layer.set_gradient_checkpointing(enabled)

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty KVCache on this model's device, in its activation dtype."""
        param = self.embed_tokens.weight
        return KVCache(self.config, batch_size, capacity, device=param.device, dtype=param.dtype)

    def compile_layers(self, **compile_kwargs) -> None:
        """torch.compile every layer in place (regional compilation; state-dict keys unchanged).
        Fuses the norm, RoPE, SwiGLU and routing elementwise work around the matmuls."""
        for layer in self.layers:
            layer.compile(**compile_kwargs)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head; logits returned in fp32 (B, T, V)."""
        return self.lm_head(self.norm(hidden)).float()

    def expert_counts(self) -> torch.Tensor | None:
        """(n_moe_layers, E) int64 tokens per expert of the last forward, or None for dense models."""
        counts = [layer.mlp.last_expert_counts for layer in self.layers if layer.is_moe]
        if not counts or any(c is None for c in counts):
            return None
        return torch.stack(counts)

    def prepare(
        self,
        batch: int,
        seq: int,
        device: torch.device,
        dtype: torch.dtype,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], AttnInfo]:
        """RoPE tables and attention info shared by all layers (also what a pipeline stage needs).

        Missing position_ids are derived: continuing the cache, from attention_mask (left
        padding), restarting per document from doc_ids, or 0..T-1.
        With a cache this records the validity of the new tokens in it.
        """
        if cache is not None:
            cache.check_room(batch, seq)
            new_valid = None
            if attention_mask is not None:
                if attention_mask.shape[1] == cache.length + seq:
                    new_valid = attention_mask[:, cache.length :]
                elif attention_mask.shape[1] == seq:
                    new_valid = attention_mask
                else:
                    raise ValueError(
                        f"with a cache, attention_mask must cover the new tokens ({seq}) or all tokens "
                        f"({cache.length + seq}), got length {attention_mask.shape[1]}"
                    )
            if position_ids is None:
                position_ids = cache.next_positions(batch, seq, new_valid)
            ones = torch.ones(batch, seq, dtype=torch.bool, device=device)
            cache.set_valid(ones if new_valid is None else new_valid)
            info = build_attention_info(batch, seq, device, cache=cache, backend=self.config.attn_backend)
        else:
            if position_ids is None:
                if attention_mask is not None:
                    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
                elif doc_ids is not None:
                    position_ids = positions_from_doc_ids(doc_ids)
                else:
                    position_ids = torch.arange(seq, device=device).expand(batch, seq)
            info = build_attention_info(
                batch,
                seq,
                device,
                doc_ids=doc_ids,
                attention_mask=attention_mask,
                backend=self.config.attn_backend,
            )
        if position_ids.shape != (batch, seq):
            raise ValueError(f"position_ids must be (B, T) = {(batch, seq)}, got {tuple(position_ids.shape)}")
        return self.rotary(position_ids.to(device), dtype), info

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> DecoderOutput:
        """input_ids (B, T) or inputs_embeds (B, T, H). doc_ids (B, T): packed documents, attention
        causal within equal ids, -1 = padding. attention_mask (B, T) 1/0: left-padded rows.
        cache: KVCache to read and extend (generation). logits_to_keep > 0: only the last
        positions' logits (prefill for generation)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if input_ids is not None else inputs_embeds
        b, t, _ = hidden.shape
        rope, info = self.prepare(
            b,
            t,
            hidden.device,
            hidden.dtype,
            position_ids=position_ids,
            doc_ids=doc_ids,
            attention_mask=attention_mask,
            cache=cache,
        )
        aux = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for layer in self.layers:
            hidden, layer_aux = layer(hidden, rope, info, cache)
            aux = aux + layer_aux
        if cache is not None:
            cache.advance(t)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        return DecoderOutput(logits=self.head(hidden), aux_loss=aux, expert_counts=self.expert_counts())
