"""DeepSeek3B-MoE decoder of DeepSeek-OCR (plain single-device PyTorch; see decoder/model.py)."""

from .adapters import decoder_state_from_release, decoder_state_to_release
from .attention import AttnInfo, build_attention_info, positions_from_doc_ids
from .cache import KVCache
from .config import DECODER_PRESETS, DecoderConfig, MoEConfig, decoder_config
from .model import DecoderLayer, DecoderModel, DecoderOutput, RMSNorm
from .moe import GroupedExperts, MoE, Router, SwiGLU, balance_loss
from .rope import RotaryEmbedding, apply_rotary

__all__ = [
    "DECODER_PRESETS",
    "AttnInfo",
    "DecoderConfig",
    "DecoderLayer",
    "DecoderModel",
    "DecoderOutput",
    "GroupedExperts",
    "KVCache",
    "MoE",
    "MoEConfig",
    "RMSNorm",
    "Router",
    "RotaryEmbedding",
    "SwiGLU",
    "apply_rotary",
    "balance_loss",
    "build_attention_info",
    "decoder_config",
    "decoder_state_from_release",
    "decoder_state_to_release",
    "positions_from_doc_ids",
]
