"""Typed configuration of the DeepSeek3B-MoE decoder (DeepseekV2 family, plain MHA).

Numbers follow ../shared/spec/architecture.md section 2 (the released DeepSeek-OCR
`language_config`): 12 layers of width 1280, 10 heads of 128, layer 0 a dense SwiGLU of
width 6848, layers 1-11 MoE with 64 routed experts of width 896 (top-6 greedy, fp32
softmax, no renormalisation) plus 2 shared experts, vocab 129,280, untied lm_head.
The layer rule (`first_k_dense_replace`, `moe_layer_freq`) is DeepseekV2's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ATTN_BACKENDS = ("auto", "sdpa", "flex", "flash")
EXPERTS_BACKENDS = ("auto", "grouped_mm", "loop", "padded_bmm")


@dataclass
class MoEConfig:
    """Routed + shared experts of one MoE layer (DeepseekV2MoE with greedy top-k).

    experts_backend selects how the routed experts are computed: "grouped_mm" (torch's
    grouped GEMM, fused kernels on sm90+), "loop" (tokens sorted by expert, one matmul per
    contiguous slice), "padded_bmm" (groups padded to the largest one, one bmm; meant for
    Ampere where grouped_mm is a per-expert loop), or "auto" (see decoder/moe.py).
    """

    n_routed_experts: int = 64
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 896
    n_shared_experts: int = 2
    aux_loss_alpha: float = 0.001
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    seq_aux: bool = True
    experts_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.n_routed_experts < 1:
            raise ValueError(f"n_routed_experts must be >= 1, got {self.n_routed_experts}")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, n_routed_experts={self.n_routed_experts}], "
                f"got {self.num_experts_per_tok}"
            )
        if self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size must be >= 1, got {self.moe_intermediate_size}")
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.aux_loss_alpha < 0:
            raise ValueError(f"aux_loss_alpha must be >= 0, got {self.aux_loss_alpha}")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if self.experts_backend not in EXPERTS_BACKENDS:
            raise ValueError(
                f"experts_backend must be one of {EXPERTS_BACKENDS}, got {self.experts_backend!r}"
            )


@dataclass
class DecoderConfig:
    """The decoder-only language model. head_dim = hidden_size // num_heads (derived).

    Layer i is MoE iff `moe` is set, i >= first_k_dense_replace and i % moe_layer_freq == 0;
    other layers use a dense SwiGLU of width intermediate_size.
    attn_backend: "auto" (flash-attn varlen for packed rows when installed on CUDA, else
    FlexAttention on CUDA, else SDPA), or force "sdpa" / "flex" / "flash".
    """

    vocab_size: int = 129280
    hidden_size: int = 1280
    num_layers: int = 12
    num_heads: int = 10
    intermediate_size: int = 6848
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    bos_token_id: int = 0
    eos_token_id: int = 1
    initializer_range: float = 0.02
    attn_backend: str = "auto"
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.first_k_dense_replace < 0:
            raise ValueError(f"first_k_dense_replace must be >= 0, got {self.first_k_dense_replace}")
        if self.moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("rope_theta and rms_norm_eps must be > 0")
        if self.max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings must be >= 1, got {self.max_position_embeddings}")
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"{name}={getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})"
                )
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepseekV2's rule: MoE from first_k_dense_replace on, every moe_layer_freq layers."""
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx {layer_idx} outside [0, {self.num_layers})")
        return (
            self.moe is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    # ---- parameter arithmetic (checked against the built model in tests) ----

    def _attn_params(self) -> int:
        return 4 * self.hidden_size * self.hidden_size  # q, k, v, o; no bias

    def _moe_params(self, activated: bool) -> int:
        assert self.moe is not None
        m, h = self.moe, self.hidden_size
        experts = m.num_experts_per_tok if activated else m.n_routed_experts
        routed = experts * 3 * h * m.moe_intermediate_size
        shared = 3 * h * m.n_shared_experts * m.moe_intermediate_size
        return routed + shared + m.n_routed_experts * h  # + router

    def _layer_params(self, layer_idx: int, activated: bool) -> int:
        mlp = (
            self._moe_params(activated)
            if self.is_moe_layer(layer_idx)
            else 3 * self.hidden_size * self.intermediate_size
        )
        return self._attn_params() + mlp + 2 * self.hidden_size  # + two RMSNorm weights

    def total_params(self) -> int:
        """All parameters: embedding, layers, final norm and the untied lm_head."""
        layers = sum(self._layer_params(i, activated=False) for i in range(self.num_layers))
        return 2 * self.vocab_size * self.hidden_size + layers + self.hidden_size

    def activated_params(self) -> int:
        """Parameters one token multiplies through: every layer with top-k routed experts
        (+ shared + router), the final norm and the lm_head; the embedding lookup is excluded.
        574,127,360 for the full preset (the paper's "570M activated")."""
        layers = sum(self._layer_params(i, activated=True) for i in range(self.num_layers))
        return layers + self.hidden_size + self.vocab_size * self.hidden_size

    def matmul_flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Training FLOPs per token (fwd + bwd = 3x fwd): 6 * (activated params in matmuls)
        plus attention scores/values 6 * 2 * num_layers * seq_len * hidden (halved if causal).
        Norm weights are counted in activated_params but are negligible (< 0.01%)."""
        dense = 6 * self.activated_params()
        attn = 6 * 2 * self.num_layers * seq_len * self.hidden_size * (0.5 if causal else 1.0)
        return float(dense + attn)


DECODER_PRESETS: dict[str, DecoderConfig] = {
    # the released DeepSeek3B-MoE-A570M decoder
    "full": DecoderConfig(),
    # tiny MoE for CPU tests: layer 0 dense, layers 1-2 MoE, 8 experts top-2 of width 32
    "debug": DecoderConfig(
        vocab_size=512,
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        intermediate_size=128,
        first_k_dense_replace=1,
        moe=MoEConfig(
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=2
        ),
        max_position_embeddings=1024,
    ),
    # one-GPU demonstration size: 6 layers of width 512, layer 0 dense, 16 experts top-4
    "small": DecoderConfig(
        hidden_size=512,
        num_layers=6,
        num_heads=8,
        intermediate_size=1536,
        first_k_dense_replace=1,
        moe=MoEConfig(
            n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256, n_shared_experts=2
        ),
        max_position_embeddings=4096,
    ),
    # OPT-125M-sized dense decoder (stage-1 compact LM): 12 layers, width 768, SwiGLU 3072
    "dense-125m": DecoderConfig(
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        first_k_dense_replace=0,
        moe=None,
        max_position_embeddings=4096,
    ),
}


def decoder_config(name: str, **overrides) -> DecoderConfig:
    """A copy of preset `name` with fields replaced; `moe` may be given as a dict of MoE overrides."""
    if name not in DECODER_PRESETS:
        raise ValueError(f"unknown decoder preset {name!r}; choose from {sorted(DECODER_PRESETS)}")
    base = DECODER_PRESETS[name]
    fields = {f.name for f in dataclasses.fields(DecoderConfig) if f.init}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown DecoderConfig fields {sorted(unknown)}; valid: {sorted(fields)}")
    moe = overrides.pop("moe", base.moe)
    if isinstance(moe, dict):
        if base.moe is None:
            moe = MoEConfig(**moe)
        else:
            moe = dataclasses.replace(base.moe, **moe)
    elif moe is not None and not isinstance(moe, MoEConfig):
        raise TypeError(f"moe must be a MoEConfig, a dict of overrides or None, got {type(moe).__name__}")
    elif isinstance(moe, MoEConfig):
        moe = dataclasses.replace(moe)
    kwargs = {f: getattr(base, f) for f in fields}
    kwargs.update(overrides)
    kwargs["moe"] = moe
    return DecoderConfig(**kwargs)
