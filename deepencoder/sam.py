"""SAM ViT-B image encoder (ViTDet) with neck and DeepSeek-OCR's 16x token compressor.

Follows segment-anything `modeling/image_encoder.py` (window attention, decomposed relative
positions, neck) and DeepSeek-OCR's `deepencoder/sam_vary_sdpa.py` (absolute positions resized
bicubically in fp32 for other view sizes, `net_2`/`net_3` stride-2 convs after the neck).
Module names match the released checkpoint (`model.sam_model.*`), see
../shared/spec/architecture.md sections 1.1 and 6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepencoder.attention import rel_pos_attention
from deepencoder.config import SamConfig


class PatchEmbed(nn.Module):
    """Conv2d patchifier: (B, 3, S, S) -> (B, S/p, S/p, C), channels last."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H, W, C)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) map (ConvNeXt / SAM neck)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class SamAttention(nn.Module):
    """Multi-head attention with decomposed relative positions on a (B, H, W, C) grid."""

    def __init__(self, config: SamConfig, rel_size: int) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.impl = config.attn_impl
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size - 1, config.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size - 1, config.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)  # (B, HW, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, HW, hd)
        out = rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w), self.impl)
        out = out.transpose(1, 2).reshape(b, h, w, c)  # (B, H, W, C)
        return self.proj(out)


class SamMLP(nn.Module):
    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        self.lin1 = nn.Linear(config.embed_dim, config.mlp_dim)
        self.lin2 = nn.Linear(config.mlp_dim, config.embed_dim)
        self.act = nn.GELU()  # exact (erf) GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad (B, H, W, C) to multiples of `window` and cut (B*nWin, window, window, C)."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)  # (B*nWin, win, win, C)
    return windows, (hp, wp)


def window_unpartition(windows: torch.Tensor, window: int, padded: tuple[int, int], hw: tuple[int, int]):
    """Inverse of `window_partition`: (B*nWin, window, window, C) -> (B, H, W, C), padding dropped."""
    hp, wp = padded
    h, w = hw
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)  # (B, Hp, Wp, C)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


class SamBlock(nn.Module):
    """Pre-norm ViT block; window attention (zero-padded windows) unless `layer_idx` is global."""

    def __init__(self, config: SamConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.window_size = config.block_window(layer_idx)
        rel_size = self.window_size if self.window_size > 0 else config.pos_grid
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.attn = SamAttention(config, rel_size)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = SamMLP(config)
        self.gradient_checkpointing = False

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            x, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded, hw)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


def resize_abs_pos(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, G, G, C) position table -> (1, grid, grid, C): bicubic, antialias, in fp32."""
    if pos_embed.shape[1] == grid and pos_embed.shape[2] == grid:
        return pos_embed
    resized = F.interpolate(
        pos_embed.permute(0, 3, 1, 2).float(),  # (1, C, G, G)
        size=(grid, grid),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )
    return resized.to(pos_embed.dtype).permute(0, 2, 3, 1)  # (1, grid, grid, C)


class SamEncoder(nn.Module):
    """patch_embed -> +pos -> blocks -> neck -> net_2 -> net_3: (B, 3, S, S) -> (B, C, S/64, S/64)."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        g = config.pos_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, config.embed_dim))
        self.blocks = nn.ModuleList(SamBlock(config, i) for i in range(config.depth))
        self.neck = nn.Sequential(
            nn.Conv2d(config.embed_dim, config.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(config.out_chans, eps=config.layer_norm_eps),
            nn.Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans, eps=config.layer_norm_eps),
        )
        c2, c3 = config.compressor_channels
        self.net_2 = nn.Conv2d(config.out_chans, c2, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init (the release / SAM checkpoint normally overwrites it).

        Linear: truncated normal std 0.02, zero bias; convs: PyTorch default (kaiming-uniform);
        LayerNorms: ones/zeros; pos_embed: truncated normal 0.02; rel_pos: zeros (SAM's
        rel_pos_zero_init).
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, LayerNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                m.reset_parameters()
            elif isinstance(m, SamAttention):
                nn.init.zeros_(m.rel_pos_h)
                nn.init.zeros_(m.rel_pos_w)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for block in self.blocks:
            block.gradient_checkpointing = enabled

    def trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        """ViT trunk: (B, 3, S, S) -> (B, S/16, S/16, embed_dim), channels last."""
        x = self.patch_embed(pixels)  # (B, H, W, C)
        x = x + resize_abs_pos(self.pos_embed, x.shape[1])
        for block in self.blocks:
            x = block(x)
        return x

    def neck_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Trunk + neck (what segment-anything's ImageEncoderViT returns): (B, out_chans, S/16, S/16)."""
        return self.neck(self.trunk(pixels).permute(0, 3, 1, 2))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net_3(self.net_2(self.neck_features(pixels)))  # (B, C3, S/64, S/64)
