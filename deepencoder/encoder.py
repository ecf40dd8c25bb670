"""DeepEncoder: SAM ViT-B + 16x compressor -> CLIP-L -> concat -> linear projector.

DeepSeek-OCR (arXiv 2510.18234, section 3.2; `DeepseekOCRModel` in the public inference code):
one square view (N, 3, S, S), S a multiple of 64, becomes (N, (S/64)^2, n_embed) vision
embeddings. The CLIP output (CLS dropped) comes first in the channel concat, then the
flattened compressor output. `image_newline` / `view_seperator` (sic, the released key name)
are the learned vectors that the token layout inserts; they are owned here and used by
`pipeline.model`. See ../shared/spec/architecture.md section 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deepencoder.clip import ClipVisionModel
from deepencoder.config import VIEW_STRIDE, EncoderConfig
from deepencoder.sam import SamEncoder


class LinearProjector(nn.Module):
    """`projector_type: linear` of the release: one Linear(feature_dim, n_embed) named `layers`."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.layers = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DeepEncoder(nn.Module):
    """Vision encoder of DeepSeek-OCR; children `sam_model`, `vision_model`, `projector`."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        if not isinstance(config, EncoderConfig):
            raise TypeError(f"DeepEncoder expects an EncoderConfig, got {type(config).__name__}")
        self.config = config
        self.sam_model = SamEncoder(config.sam)
        self.vision_model = ClipVisionModel(config.clip)
        self.projector = LinearProjector(config.feature_dim, config.n_embed)
        self.image_newline = nn.Parameter(torch.zeros(config.n_embed))
        self.view_seperator = nn.Parameter(torch.zeros(config.n_embed))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Set every value (safe to call again after `to_empty()` from the meta device)."""
        self.sam_model.init_weights()
        self.vision_model.init_weights()
        nn.init.trunc_normal_(self.projector.layers.weight, std=0.02)
        nn.init.zeros_(self.projector.layers.bias)
        std = 1.0 / math.sqrt(self.config.n_embed)  # randn / sqrt(n_embed), as the release's init
        nn.init.normal_(self.image_newline, std=std)
        nn.init.normal_(self.view_seperator, std=std)

    @staticmethod
    def tokens_per_view(view_size: int) -> int:
        """Vision tokens of one S x S view: (S/64)^2 (512 -> 64, 640 -> 100, 1024 -> 256, 1280 -> 400)."""
        if not isinstance(view_size, int) or view_size <= 0 or view_size % VIEW_STRIDE:
            raise ValueError(f"view_size must be a positive multiple of {VIEW_STRIDE}, got {view_size!r}")
        return (view_size // VIEW_STRIDE) ** 2

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each SAM and CLIP block in backward (non-reentrant checkpointing)."""
        for part in (self.sam_model, self.vision_model):
            if part is not None:  # a pipeline stage may hold only one of them
                part.set_gradient_checkpointing(enabled)

    def freeze_sam(self) -> None:
        """Freeze SAM + neck + compressor (stage-2 PP0); `sam_features` then runs under no_grad."""
        self.sam_model.requires_grad_(False)

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        c = self.config.sam.in_chans
        expected = f"(N, {c}, S, S) floating pixels with S a multiple of {VIEW_STRIDE}"
        if not isinstance(pixels, torch.Tensor):
            raise TypeError(f"pixels must be a torch.Tensor of shape {expected}, got {type(pixels).__name__}")
        if not pixels.is_floating_point():
            raise ValueError(f"pixels must be {expected}; got dtype {pixels.dtype}")
        if pixels.dim() != 4 or pixels.shape[1] != c:
            raise ValueError(f"pixels must be {expected}; got shape {tuple(pixels.shape)}")
        h, w = pixels.shape[-2:]
        if h != w or h % VIEW_STRIDE or h == 0:
            raise ValueError(f"pixels must be {expected}; got shape {tuple(pixels.shape)}")

    def sam_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> compressed SAM features (N, C, S/64, S/64); no graph when SAM is frozen."""
        self._check_pixels(pixels)
        if any(p.requires_grad for p in self.sam_model.parameters()):
            return self.sam_model(pixels)
        with torch.no_grad():
            return self.sam_model(pixels)

    def clip_project(self, compressed: torch.Tensor) -> torch.Tensor:
        """(N, C, g, g) compressed features -> (N, g*g, n_embed): CLIP, concat (CLIP first), projector."""
        c = self.config.clip.width
        if compressed.dim() != 4 or compressed.shape[1] != c or compressed.shape[2] != compressed.shape[3]:
            raise ValueError(
                f"compressed features must have shape (N, {c}, g, g); got {tuple(compressed.shape)}"
            )
        clip_out = self.vision_model(compressed)[:, 1:]  # (N, g*g, C_clip), CLS dropped
        sam_flat = compressed.flatten(2).transpose(1, 2)  # (N, g*g, C_sam)
        return self.projector(torch.cat([clip_out, sam_flat], dim=-1))  # (N, g*g, n_embed)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip_project(self.sam_features(pixels))
