"""DeepEncoder of DeepSeek-OCR: SAM ViT-B + 16x compressor + CLIP-L + linear projector.

Plain single-device PyTorch (no distributed, DeepSpeed or Hydra imports). See
../shared/spec/architecture.md section 1 and docs/interfaces.md.
"""

from deepencoder.config import ENCODER_PRESETS, ClipConfig, EncoderConfig, SamConfig, encoder_config
from deepencoder.encoder import DeepEncoder

__all__ = ["ENCODER_PRESETS", "ClipConfig", "DeepEncoder", "EncoderConfig", "SamConfig", "encoder_config"]
