"""Stage-1 encoder initialisation from the upstream SAM ViT-B and CLIP-L checkpoints.

DeepSeek-OCR's DeepEncoder starts from SAM-base (segment-anything `sam_vit_b_01ec64.pth`) and
CLIP-large (OpenAI CLIP ViT-L/14-224) before stage-1 training (arXiv 2510.18234 sections 3.2,
3.5). The key tables and the strict conversion live in `deepencoder.adapters`; this module
picks the adapter for a file, and copies the converted tensors into the encoder so that the
part being loaded is covered exactly: a missing key, an unexpected key (a wrong prefix) or a
shape mismatch raises ValueError listing them, never leaving random weights behind silently
(the pitfall Vary/GOT users report, ../shared/spec/training.md). The compressor, projector and
newline/separator vectors have no upstream weights and keep their initialisation.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deepencoder import DeepEncoder, EncoderConfig
from deepencoder.adapters import (
    clip_state_from_hf,
    clip_state_from_open_clip,
    load_state_file,
    sam_state_from_segment_anything,
)
from pipeline.stage1.parts import encoder_part_of

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_OPEN_CLIP_WEIGHT_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")


def _weights_file(path: str | os.PathLike, names: tuple[str, ...], what: str) -> Path:
    """`path` itself, or the first of `names` inside it when it is a directory."""
    path = Path(path)
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise ValueError(f"{what}: no weights file ({', '.join(names)}) in directory {path}")
    if not path.is_file():
        raise ValueError(f"{what}: checkpoint not found: {path}")
    return path


def check_part_state(
    state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], parts: set[str], source: str
) -> None:
    """ValueError unless `state` (DeepEncoder keys) covers the `parts` of an encoder with these
    state-dict `shapes` exactly: missing, unexpected and mis-shaped keys are listed."""
    wanted = {k for k in shapes if encoder_part_of(k) in parts}
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - wanted)
    if missing or unexpected:
        raise ValueError(
            f"{source}: does not cover the {sorted(parts)} part(s) of this encoder exactly: "
            f"missing {len(missing)} {missing[:10]}, unexpected {len(unexpected)} {unexpected[:10]}"
        )
    bad = [f"{k} {tuple(v.shape)} != {shapes[k]}" for k, v in state.items() if tuple(v.shape) != shapes[k]]
    if bad:
        raise ValueError(f"{source}: shape mismatch for {len(bad)} tensors: {bad[:10]}")


def encoder_shapes(config: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of a DeepEncoder built from `config` (on the meta device: no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in DeepEncoder(config).state_dict().items()}


def copy_part_state(
    encoder: DeepEncoder, state: dict[str, torch.Tensor], parts: set[str], source: str
) -> None:
    """Copy `state` (DeepEncoder keys) into `encoder`; it must cover `parts` exactly."""
    own = encoder.state_dict()
    check_part_state(state, {k: tuple(v.shape) for k, v in own.items()}, parts, source)
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


def detect_clip_format(state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(layout, key prefix) of a CLIP checkpoint: ("open_clip", "visual.") for open_clip / OpenAI
    (TorchScript included), ("hf", "vision_model.") for a transformers CLIPModel file, ("hf", "")
    for a transformers 5 CLIPVisionModel file (saved without a prefix)."""
    has_open = any(k.startswith("visual.") for k in state)
    has_hf = any(k.startswith("vision_model.") for k in state)
    if has_open and not has_hf:
        return "open_clip", "visual."
    if has_hf and not has_open:
        return "hf", "vision_model."
    if not has_open and "embeddings.class_embedding" in state:
        return "hf", ""
    sample = sorted(state)[:5]
    raise ValueError(
        "cannot tell the CLIP checkpoint layout: expected open_clip / OpenAI keys `visual.*` or "
        f"transformers keys `vision_model.*` / `embeddings.*`, found {'both' if has_open else 'neither'} "
        f"(e.g. {sample})"
    )


def sam_init_state(path: str | os.PathLike, config: EncoderConfig) -> tuple[dict[str, torch.Tensor], str]:
    """(DeepEncoder-keyed SAM trunk + neck tensors, source label) of a segment-anything checkpoint."""
    file = _weights_file(path, ("sam_vit_b_01ec64.pth", "model.safetensors"), "model.sam_init")
    return sam_state_from_segment_anything(load_state_file(file), config.sam), f"model.sam_init={file}"


def clip_init_state(path: str | os.PathLike, config: EncoderConfig) -> tuple[dict[str, torch.Tensor], str]:
    """(DeepEncoder-keyed CLIP tensors, source label) of an open_clip / OpenAI / transformers file."""
    file = _weights_file(path, _HF_WEIGHT_FILES + _OPEN_CLIP_WEIGHT_FILES, "model.clip_init")
    raw = load_state_file(file)
    fmt, prefix = detect_clip_format(raw)
    if fmt == "open_clip":
        state = clip_state_from_open_clip(raw, config.clip, prefix)
    else:
        state = clip_state_from_hf(raw, config.clip, prefix)
    return state, f"model.clip_init={file}"


def load_sam_init(encoder: DeepEncoder, path: str | os.PathLike) -> list[str]:
    """segment-anything SAM checkpoint -> SAM trunk + neck of `encoder` (strict). Returns the parts."""
    state, source = sam_init_state(path, encoder.config)
    copy_part_state(encoder, state, {"sam"}, source)
    return ["sam"]


def load_clip_init(encoder: DeepEncoder, path: str | os.PathLike) -> list[str]:
    """CLIP-L/14 vision tower (open_clip / OpenAI .pt / transformers) -> `encoder.vision_model` (strict)."""
    state, source = clip_init_state(path, encoder.config)
    copy_part_state(encoder, state, {"clip"}, source)
    return ["clip"]
