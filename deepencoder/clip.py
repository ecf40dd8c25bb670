"""CLIP-L vision transformer fed with compressed SAM features instead of its own patch conv.

Follows OpenAI CLIP ViT-L/14 (pre-norm blocks, quick_gelu, `pre_layrnorm`) as used by
DeepSeek-OCR's `deepencoder/clip_sdpa.py`: the input (B, C, g, g) is flattened into patch
embeddings, CLS is prepended, the 16x16 position table is resized bicubically (fp32,
antialias) to g x g with the CLS row kept, and there is no final LayerNorm. Module names
match the released checkpoint (`model.vision_model.*`), ../shared/spec/architecture.md 1.2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepencoder.config import ClipConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def resize_clip_pos(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + G*G, C) table (CLS row first) -> (1 + grid*grid, C); bicubic, antialias, fp32."""
    src = int(round((table.shape[0] - 1) ** 0.5))
    if src == grid:
        return table
    c = table.shape[1]
    patch = table[1:].reshape(1, src, src, c).permute(0, 3, 1, 2).float()  # (1, C, G, G)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patch = patch.to(table.dtype).permute(0, 2, 3, 1).reshape(grid * grid, c)  # (g*g, C)
    return torch.cat([table[:1], patch], dim=0)


class ClipEmbeddings(nn.Module):
    """CLS + given patch embeddings + (interpolated) learned positions.

    `patch_embedding` is CLIP's own patch conv; the released checkpoint carries it but DeepSeek-OCR
    never calls it. It is kept (frozen: it can receive no gradient) so the layout round-trips.
    """

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(config.width))
        self.patch_embedding = nn.Conv2d(
            config.in_chans, config.width, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.patch_embedding.weight.requires_grad_(False)
        self.position_embedding = nn.Embedding(config.num_positions, config.width)

    def forward(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        b, c, g, _ = patch_embeds.shape
        x = patch_embeds.flatten(2).transpose(1, 2)  # (B, g*g, C)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, c)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1)  # (B, 1+g*g, C)
        return x + resize_clip_pos(self.position_embedding.weight, g).to(x.dtype)


class ClipAttention(nn.Module):
    """Fused qkv_proj ([3][heads][head_dim] rows), SDPA, out_proj."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.num_heads = config.heads
        self.qkv_proj = nn.Linear(config.width, 3 * config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv_proj(x).view(b, t, 3, self.num_heads, -1)  # (B, T, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hd)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class ClipMLP(nn.Module):
    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class ClipBlock(nn.Module):
    """x += attn(LN(x)); x += mlp(LN(x))."""

    def __init__(self, config: ClipConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.self_attn = ClipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = ClipMLP(config)
        self.gradient_checkpointing = False

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class ClipTransformer(nn.Module):
    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipBlock(config, i) for i in range(config.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ClipVisionModel(nn.Module):
    """embeddings -> pre_layrnorm -> transformer: (B, C, g, g) -> (B, 1+g*g, C), CLS first."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = ClipEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.transformer = ClipTransformer(config)

    @torch.no_grad()
    def init_weights(self) -> None:
        """OpenAI CLIP-style init: class_embedding N(0, width^-1/2), positions N(0, 0.01),
        Linear truncated normal 0.02 with zero bias, LayerNorm ones/zeros, patch conv default."""
        width = self.config.width
        nn.init.normal_(self.embeddings.class_embedding, std=width**-0.5)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=0.01)
        self.embeddings.patch_embedding.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for layer in self.transformer.layers:
            layer.gradient_checkpointing = enabled

    def forward(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.pre_layrnorm(self.embeddings(patch_embeds)))
