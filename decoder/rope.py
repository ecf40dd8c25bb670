"""Rotary position embedding of the DeepSeek-OCR decoder (full head dim, rotate_half, theta 10000).

Follows the LLaMA/DeepseekV2 (non-MLA) form used by the released model: frequencies
theta^(-2i/d) computed in fp32, angles = position * frequency in fp32, cos/sin of the
angles duplicated over both halves and cast to the activation dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import DecoderConfig


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """(head_dim // 2,) fp32 inverse frequencies."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin), each (B, T, head_dim), from integer position_ids (B, T).

    Stateless apart from the non-persistent inv_freq buffer, so every pipeline stage can
    own one and rebuild the tables from the position_ids it receives.
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.register_buffer("inv_freq", torch.empty(self.head_dim // 2), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.inv_freq.copy_(rope_inv_freq(self.head_dim, self.theta, device=self.inv_freq.device))

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, nh, hd); cos/sin (B, T, hd) broadcast over heads."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, hd)
    return x * cos + rotate_half(x) * sin
