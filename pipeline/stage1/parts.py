"""Named parts of DeepSeek-OCR for stage-1 freezing and the encoder export.

DeepSeek-OCR stage 1 (arXiv 2510.18234 section 3.5; ../shared/spec/training.md) trains the
whole DeepEncoder with a compact LM; stage 2 freezes SAM + compressor (PP0). The parts:

- `sam`: SAM ViT-B trunk + neck (`encoder.sam_model.*` except the compressor);
- `compressor`: the two stride-2 convs `encoder.sam_model.net_2` / `net_3` (16x token compressor);
- `clip`: the CLIP-L stage `encoder.vision_model.*`;
- `projector`: `encoder.projector.*` with `image_newline` / `view_seperator` (all three live
  in the language model's input width, so they travel together);
- `decoder`: the language model.

Keys are relative to `DeepSeekOCR` (`encoder.` / `decoder.` prefixes) or, with
`encoder_part_of`, to `DeepEncoder`.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

ENCODER_PARTS = ("sam", "compressor", "clip", "projector")
MODEL_PARTS = (*ENCODER_PARTS, "decoder")
COMPRESSOR_PREFIXES = ("sam_model.net_2.", "sam_model.net_3.")
PROJECTOR_KEYS = ("image_newline", "view_seperator")


def encoder_part_of(key: str) -> str:
    """Part of a `DeepEncoder.state_dict()` key (ValueError for a key outside the encoder)."""
    if key.startswith(COMPRESSOR_PREFIXES):
        return "compressor"
    if key.startswith("sam_model."):
        return "sam"
    if key.startswith("vision_model."):
        return "clip"
    if key.startswith("projector.") or key in PROJECTOR_KEYS:
        return "projector"
    raise ValueError(f"{key!r} is not a DeepEncoder key (sam_model.*, vision_model.*, projector.*, ...)")


def model_part_of(key: str) -> str:
    """Part of a `DeepSeekOCR.state_dict()` / `named_parameters()` key."""
    if key.startswith("encoder."):
        return encoder_part_of(key[len("encoder.") :])
    if key.startswith("decoder."):
        return "decoder"
    raise ValueError(f"{key!r} is neither an encoder.* nor a decoder.* key of DeepSeekOCR")


def check_part_names(parts: Iterable[str], allowed: tuple[str, ...], what: str) -> list[str]:
    """The names as a list; ValueError naming the unknown ones and the allowed set."""
    parts = list(parts)
    unknown = [p for p in parts if p not in allowed]
    if unknown:
        raise ValueError(f"{what}: unknown part(s) {unknown}; choose from {list(allowed)}")
    return parts


def freeze_parts(model: nn.Module, parts: Iterable[str]) -> dict[str, int]:
    """Set requires_grad=False on every parameter of `parts` of a DeepSeekOCR.

    Returns the number of parameters frozen per part (every named part must own some).
    """
    parts = check_part_names(parts, MODEL_PARTS, "model.freeze")
    frozen = dict.fromkeys(parts, 0)
    for name, param in model.named_parameters():
        part = model_part_of(name)
        if part in frozen:
            param.requires_grad_(False)
            frozen[part] += param.numel()
    empty = [p for p, n in frozen.items() if n == 0]
    assert not empty, f"parts without parameters: {empty}"
    return frozen


def trainable_by_part(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{part: (trainable parameters, all parameters)} of a DeepSeekOCR, in MODEL_PARTS order."""
    counts = {p: [0, 0] for p in MODEL_PARTS}
    for name, param in model.named_parameters():
        entry = counts[model_part_of(name)]
        entry[1] += param.numel()
        if param.requires_grad:
            entry[0] += param.numel()
    return {p: (t, n) for p, (t, n) in counts.items()}
