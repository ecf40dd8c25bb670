"""Typed configuration of the DeepEncoder (SAM ViT-B + 16x compressor + CLIP-L + projector).

Numbers follow ../shared/spec/architecture.md sections 1.1-1.3 (DeepSeek-OCR, arXiv 2510.18234,
and the released checkpoint `deepseek-ai/DeepSeek-OCR`). `ENCODER_PRESETS["full"]` is the
release; `ENCODER_PRESETS["debug"]` is a tiny model with the same structure for CPU tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Total downsampling from pixels to encoder tokens: patch 16, then two stride-2 convs.
VIEW_STRIDE = 64

ATTN_IMPLS = ("augmented", "bias")


@dataclass
class SamConfig:
    """SAM ViTDet image encoder with neck and the two-conv 16x token compressor.

    img_size is the pretraining resolution the absolute position table and the global-block
    relative position tables are built for; other view sizes interpolate them.
    attn_impl: "augmented" folds the decomposed relative-position bias into extra q/k channels
    (plain SDPA, no additive mask); "bias" materialises the bias and passes it as attn_mask.
    Both compute the same function (tests/deepencoder/test_attention.py).
    """

    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256
    qkv_bias: bool = True
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    layer_norm_eps: float = 1e-6
    compressor_channels: tuple[int, int] = (512, 1024)
    attn_impl: str = "augmented"

    def __post_init__(self) -> None:
        self.global_attn_indexes = tuple(int(i) for i in self.global_attn_indexes)
        self.compressor_channels = tuple(int(c) for c in self.compressor_channels)
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "out_chans"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SamConfig.{name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"SamConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.img_size % self.patch_size != 0:
            raise ValueError(
                f"SamConfig.img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.window_size < 0:
            raise ValueError(f"SamConfig.window_size must be >= 0 (0 = all global), got {self.window_size}")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if bad or len(set(self.global_attn_indexes)) != len(self.global_attn_indexes):
            raise ValueError(
                f"SamConfig.global_attn_indexes {self.global_attn_indexes} must be distinct block "
                f"indexes in [0, {self.depth})"
            )
        if len(self.compressor_channels) != 2 or min(self.compressor_channels) <= 0:
            raise ValueError(
                f"SamConfig.compressor_channels must be two positive ints (net_2, net_3 outputs), "
                f"got {self.compressor_channels}"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"SamConfig.mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"SamConfig.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def pos_grid(self) -> int:
        """Side of the absolute position table (64 for the release)."""
        return self.img_size // self.patch_size

    @property
    def out_channels(self) -> int:
        """Channels of the compressed output (net_3), i.e. the CLIP input width."""
        return self.compressor_channels[1]

    def block_window(self, layer_idx: int) -> int:
        """Window side of block `layer_idx`; 0 means global attention."""
        return 0 if layer_idx in self.global_attn_indexes else self.window_size


@dataclass
class ClipConfig:
    """CLIP ViT (OpenAI CLIP-L/14-224 for the release) fed with compressed SAM features.

    image_size / patch_size only size the position table ((image_size/patch_size)^2 + 1 rows)
    and the unused patch conv that the released checkpoint carries.
    """

    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    image_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("width", "layers", "heads", "mlp_dim", "image_size", "patch_size", "in_chans"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ClipConfig.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.heads != 0:
            raise ValueError(f"ClipConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"ClipConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def pos_grid(self) -> int:
        """Side of the patch part of the position table (16 for CLIP-L/14-224)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.pos_grid**2 + 1


@dataclass
class EncoderConfig:
    """The whole DeepEncoder: SAM(+compressor) -> CLIP -> concat(CLIP, SAM) -> Linear -> n_embed."""

    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    n_embed: int = 1280

    def __post_init__(self) -> None:
        if isinstance(self.sam, dict):
            self.sam = SamConfig(**self.sam)
        if isinstance(self.clip, dict):
            self.clip = ClipConfig(**self.clip)
        if not isinstance(self.sam, SamConfig) or not isinstance(self.clip, ClipConfig):
            raise TypeError(
                "EncoderConfig.sam / .clip must be SamConfig / ClipConfig (or dicts of their fields)"
            )
        if self.n_embed <= 0:
            raise ValueError(f"EncoderConfig.n_embed must be positive, got {self.n_embed}")
        if self.sam.out_channels != self.clip.width:
            raise ValueError(
                f"the compressor output ({self.sam.out_channels} channels) is CLIP's patch embedding and "
                f"must equal ClipConfig.width ({self.clip.width})"
            )
        if self.sam.patch_size * 4 != VIEW_STRIDE:
            raise ValueError(
                f"SamConfig.patch_size must be {VIEW_STRIDE // 4} so one token covers {VIEW_STRIDE} pixels, "
                f"got {self.sam.patch_size}"
            )

    @property
    def feature_dim(self) -> int:
        """Projector input: CLIP width + compressor channels (2048 for the release)."""
        return self.clip.width + self.sam.out_channels


def _full() -> EncoderConfig:
    return EncoderConfig(sam=SamConfig(), clip=ClipConfig(), n_embed=1280)


def _debug() -> EncoderConfig:
    # Same structure, tiny widths: SAM grid 8 at 128 px (window 4, globals at 1 and 3),
    # CLIP position grid 4 (so 64/128 px views exercise the interpolation paths).
    return EncoderConfig(
        sam=SamConfig(
            img_size=128,
            embed_dim=32,
            depth=4,
            num_heads=2,
            out_chans=16,
            window_size=4,
            global_attn_indexes=(1, 3),
            compressor_channels=(24, 32),
        ),
        clip=ClipConfig(width=32, layers=2, heads=2, mlp_dim=128, image_size=56, patch_size=14),
        n_embed=64,
    )


def _small() -> EncoderConfig:
    # One-GPU demonstration size (~25M): the release's structure at a quarter of its widths.
    return EncoderConfig(
        sam=SamConfig(
            embed_dim=256,
            depth=6,
            num_heads=4,
            out_chans=128,
            window_size=14,
            global_attn_indexes=(2, 5),
            compressor_channels=(256, 512),
        ),
        clip=ClipConfig(width=512, layers=6, heads=8, mlp_dim=2048),
        n_embed=512,
    )


ENCODER_PRESETS: dict[str, EncoderConfig] = {"full": _full(), "small": _small(), "debug": _debug()}


def encoder_config(name: str, **overrides) -> EncoderConfig:
    """A fresh copy of preset `name`; `overrides` replace top-level fields (sam=..., clip=..., n_embed=...).

    `sam` / `clip` overrides may be dicts of field updates, e.g. `encoder_config("debug",
    sam={"attn_impl": "bias"})`.
    """
    if name not in ENCODER_PRESETS:
        raise ValueError(f"unknown encoder preset {name!r}; known presets: {sorted(ENCODER_PRESETS)}")
    base = ENCODER_PRESETS[name]
    unknown = set(overrides) - {f.name for f in dataclasses.fields(EncoderConfig)}
    if unknown:
        raise ValueError(f"unknown EncoderConfig fields {sorted(unknown)}; known: sam, clip, n_embed")
    sam = overrides.pop("sam", base.sam)
    clip = overrides.pop("clip", base.clip)
    if isinstance(sam, dict):
        sam = dataclasses.replace(base.sam, **sam)
    if isinstance(clip, dict):
        clip = dataclasses.replace(base.clip, **clip)
    return EncoderConfig(
        sam=dataclasses.replace(sam),
        clip=dataclasses.replace(clip),
        n_embed=overrides.get("n_embed", base.n_embed),
    )
