"""Weight adapters for the DeepEncoder: explicit key tables, strict conversion, file loading.

Layouts (../shared/spec/architecture.md section 6 and "Upstream checkpoints"):
- released DeepSeek-OCR: `model.sam_model.*`, `model.vision_model.*`, `model.projector.layers.*`,
  `model.image_newline`, `model.view_seperator` (no `position_ids`); import and export.
- segment-anything SAM ViT-B (`sam_vit_b_01ec64.pth`): `image_encoder.*`, trunk + neck only
  (the compressor `net_2`/`net_3` has no upstream weights and stays as initialised).
- OpenAI CLIP ViT-L/14 in open_clip's layout (`visual.*`, fused `in_proj_weight`) or in the
  transformers `CLIPVisionModel` layout (`vision_model.*`, separate q/k/v fused here into
  `qkv_proj` in [q; k; v] row order).
Returned state dicts use DeepEncoder-relative keys (`sam_model.*`, `vision_model.*`, ...).
Every conversion is strict: missing keys, unexpected keys and shape mismatches raise
ValueError listing them; only keys of a documented foreign part (decoder, SAM prompt/mask
decoder, CLIP text tower and heads) are skipped. Model classes never open files (STYLE.md).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from deepencoder.config import ENCODER_PRESETS, ClipConfig, EncoderConfig, SamConfig

Tensor = torch.Tensor

# Release keys outside the encoder belong to the decoder adapter.
RELEASE_FOREIGN_PREFIXES = ("embed_tokens.", "layers.", "norm.")
RELEASE_FOREIGN_TOP = ("lm_head.",)
# Parts of a full SAM checkpoint that DeepSeek-OCR does not use.
SAM_FOREIGN_PREFIXES = ("prompt_encoder.", "mask_decoder.", "pixel_mean", "pixel_std")
# CLIP parts DeepSeek-OCR drops: final norm and projection of the vision tower.
OPEN_CLIP_UNUSED = ("ln_post.weight", "ln_post.bias", "proj")
HF_CLIP_UNUSED = ("post_layernorm.weight", "post_layernorm.bias", "embeddings.position_ids")


# ----------------------------------------------------------------------------- key tables


def sam_keys(config: SamConfig, *, compressor: bool = True) -> list[str]:
    """Keys of `SamEncoder` (relative to it), in the segment-anything naming."""
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"]
    for i in range(config.depth):
        b = f"blocks.{i}."
        keys += [b + f"{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias")]
        keys += [b + f"attn.{n}.{p}" for n in ("qkv", "proj") for p in ("weight", "bias")]
        keys += [b + "attn.rel_pos_h", b + "attn.rel_pos_w"]
        keys += [b + f"mlp.{n}.{p}" for n in ("lin1", "lin2") for p in ("weight", "bias")]
    keys += ["neck.0.weight", "neck.1.weight", "neck.1.bias", "neck.2.weight", "neck.3.weight", "neck.3.bias"]
    if compressor:
        keys += ["net_2.weight", "net_3.weight"]
    return keys


def clip_keys(config: ClipConfig) -> list[str]:
    """Keys of `ClipVisionModel` (relative to it), in the released naming."""
    keys = [
        "embeddings.class_embedding",
        "embeddings.patch_embedding.weight",
        "embeddings.position_embedding.weight",
        "pre_layrnorm.weight",
        "pre_layrnorm.bias",
    ]
    for i in range(config.layers):
        b = f"transformer.layers.{i}."
        keys += [b + f"{n}.{p}" for n in ("layer_norm1", "layer_norm2") for p in ("weight", "bias")]
        keys += [b + f"self_attn.{n}.{p}" for n in ("qkv_proj", "out_proj") for p in ("weight", "bias")]
        keys += [b + f"mlp.{n}.{p}" for n in ("fc1", "fc2") for p in ("weight", "bias")]
    return keys


def encoder_keys(config: EncoderConfig) -> list[str]:
    """Every key of `DeepEncoder(config).state_dict()`."""
    return (
        ["sam_model." + k for k in sam_keys(config.sam)]
        + ["vision_model." + k for k in clip_keys(config.clip)]
        + ["projector.layers.weight", "projector.layers.bias", "image_newline", "view_seperator"]
    )


def release_key_table(config: EncoderConfig, prefix: str = "model.") -> dict[str, str]:
    """Release key -> our key. The release names our modules identically under `prefix`."""
    return {prefix + k: k for k in encoder_keys(config)}


def sam_key_table(config: SamConfig, prefix: str = "image_encoder.") -> dict[str, str]:
    """segment-anything key -> our key (trunk and neck; no compressor upstream)."""
    return {prefix + k: "sam_model." + k for k in sam_keys(config, compressor=False)}


def open_clip_key_table(config: ClipConfig, prefix: str = "visual.") -> dict[str, str]:
    """open_clip / OpenAI CLIP visual key -> our key."""
    ours = "vision_model."
    table = {
        prefix + "class_embedding": ours + "embeddings.class_embedding",
        prefix + "conv1.weight": ours + "embeddings.patch_embedding.weight",
        prefix + "positional_embedding": ours + "embeddings.position_embedding.weight",
        prefix + "ln_pre.weight": ours + "pre_layrnorm.weight",
        prefix + "ln_pre.bias": ours + "pre_layrnorm.bias",
    }
    pairs = [
        ("ln_1", "layer_norm1"),
        ("ln_2", "layer_norm2"),
        ("attn.out_proj", "self_attn.out_proj"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp.c_proj", "mlp.fc2"),
    ]
    for i in range(config.layers):
        src, dst = f"{prefix}transformer.resblocks.{i}.", f"{ours}transformer.layers.{i}."
        for a, b in pairs:
            for p in ("weight", "bias"):
                table[f"{src}{a}.{p}"] = f"{dst}{b}.{p}"
        table[src + "attn.in_proj_weight"] = dst + "self_attn.qkv_proj.weight"
        table[src + "attn.in_proj_bias"] = dst + "self_attn.qkv_proj.bias"
    return table


def hf_clip_key_table(config: ClipConfig, prefix: str = "vision_model.") -> dict[str, str | tuple[str, int]]:
    """transformers CLIPVisionModel key -> our key, or (our qkv key, slot 0/1/2) for q/k/v."""
    ours = "vision_model."
    table: dict[str, str | tuple[str, int]] = {
        prefix + "embeddings.class_embedding": ours + "embeddings.class_embedding",
        prefix + "embeddings.patch_embedding.weight": ours + "embeddings.patch_embedding.weight",
        prefix + "embeddings.position_embedding.weight": ours + "embeddings.position_embedding.weight",
        prefix + "pre_layrnorm.weight": ours + "pre_layrnorm.weight",
        prefix + "pre_layrnorm.bias": ours + "pre_layrnorm.bias",
    }
    same = ("layer_norm1", "layer_norm2", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    for i in range(config.layers):
        src, dst = f"{prefix}encoder.layers.{i}.", f"{ours}transformer.layers.{i}."
        for p in ("weight", "bias"):
            for n in same:
                table[f"{src}{n}.{p}"] = f"{dst}{n}.{p}"
            for slot, n in enumerate(("q_proj", "k_proj", "v_proj")):
                table[f"{src}self_attn.{n}.{p}"] = (f"{dst}self_attn.qkv_proj.{p}", slot)
    return table


# ----------------------------------------------------------------------------- strictness


def _fmt(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_keys(
    source: str, given: Iterable[str], expected: Iterable[str], ignored: Iterable[str] = ()
) -> None:
    given, expected, ignored = set(given), set(expected), set(ignored)
    missing = expected - given
    unexpected = given - expected - ignored
    if missing or unexpected:
        msg = [f"{source}: state dict does not match the expected key table"]
        if missing:
            msg.append(f"missing {len(missing)} keys: {_fmt(missing)}")
        if unexpected:
            msg.append(f"unexpected {len(unexpected)} keys: {_fmt(unexpected)}")
        if missing and unexpected:
            msg.append("(a wrong key prefix or a different model size?)")
        raise ValueError("; ".join(msg))


def expected_shapes(config: EncoderConfig) -> dict[str, torch.Size]:
    """Shapes of every DeepEncoder tensor, from a model built on the meta device."""
    from deepencoder.encoder import DeepEncoder

    with torch.device("meta"):
        model = DeepEncoder(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def _check_shapes(source: str, ours: Mapping[str, Tensor], config: EncoderConfig) -> None:
    shapes = expected_shapes(config)
    bad = [f"{k} {tuple(v.shape)} != {tuple(shapes[k])}" for k, v in ours.items() if v.shape != shapes[k]]
    if bad:
        raise ValueError(f"{source}: shape mismatch for {len(bad)} tensors: {_fmt(bad)}")


def _full_if_none(config: EncoderConfig | None) -> EncoderConfig:
    return ENCODER_PRESETS["full"] if config is None else config


# ----------------------------------------------------------------------------- conversions


def encoder_state_from_release(
    sd: Mapping[str, Tensor], prefix: str = "model.", config: EncoderConfig | None = None
) -> dict[str, Tensor]:
    """Released DeepSeek-OCR layout -> DeepEncoder state dict (strict; decoder keys are skipped)."""
    config = _full_if_none(config)
    table = release_key_table(config, prefix)
    foreign = [
        k
        for k in sd
        if (k.startswith(prefix) and k[len(prefix) :].startswith(RELEASE_FOREIGN_PREFIXES))
        or k.startswith(RELEASE_FOREIGN_TOP)
    ]
    _check_keys("release checkpoint (encoder part)", sd.keys(), table, foreign)
    ours = {dst: sd[src] for src, dst in table.items()}
    _check_shapes("release checkpoint (encoder part)", ours, config)
    return ours


def encoder_state_to_release(
    our_sd: Mapping[str, Tensor], prefix: str = "model.", config: EncoderConfig | None = None
) -> dict[str, Tensor]:
    """DeepEncoder state dict -> released layout (strict)."""
    config = _full_if_none(config)
    table = release_key_table(config, prefix)
    _check_keys("DeepEncoder state dict", our_sd.keys(), table.values())
    _check_shapes("DeepEncoder state dict", our_sd, config)
    return {src: our_sd[dst] for src, dst in table.items()}


def sam_state_from_segment_anything(
    sd: Mapping[str, Tensor], config: SamConfig | None = None, prefix: str = "image_encoder."
) -> dict[str, Tensor]:
    """segment-anything checkpoint -> `sam_model.*` trunk + neck keys (compressor not included).

    `prefix=""` accepts a bare `ImageEncoderViT.state_dict()`.
    """
    config = ENCODER_PRESETS["full"].sam if config is None else config
    table = sam_key_table(config, prefix)
    foreign = [k for k in sd if k.startswith(SAM_FOREIGN_PREFIXES)]
    _check_keys("segment-anything SAM checkpoint", sd.keys(), table, foreign)
    ours = {dst: sd[src] for src, dst in table.items()}
    shapes = {"sam_model." + k: s for k, s in _sam_shapes(config).items()}
    _check_subset_shapes("segment-anything SAM checkpoint", ours, shapes)
    return ours


def clip_state_from_open_clip(
    sd: Mapping[str, Tensor], config: ClipConfig | None = None, prefix: str = "visual."
) -> dict[str, Tensor]:
    """open_clip / OpenAI CLIP checkpoint -> `vision_model.*` keys (text tower, ln_post, proj dropped)."""
    config = ENCODER_PRESETS["full"].clip if config is None else config
    table = open_clip_key_table(config, prefix)
    ignored = [k for k in sd if not k.startswith(prefix) or k[len(prefix) :] in OPEN_CLIP_UNUSED]
    _check_keys("open_clip CLIP checkpoint", sd.keys(), table, ignored)
    ours = {dst: sd[src] for src, dst in table.items()}
    _check_subset_shapes("open_clip CLIP checkpoint", ours, _clip_shapes(config))
    return ours


def clip_state_from_hf(
    sd: Mapping[str, Tensor], config: ClipConfig | None = None, prefix: str = "vision_model."
) -> dict[str, Tensor]:
    """transformers CLIPVisionModel / CLIPModel checkpoint -> `vision_model.*` keys, q/k/v fused.

    Files (e.g. `openai/clip-vit-large-patch14`) carry `vision_model.*`; a transformers 5
    `CLIPVisionModel.state_dict()` in memory has no prefix: pass `prefix=""`.
    """
    config = ENCODER_PRESETS["full"].clip if config is None else config
    table = hf_clip_key_table(config, prefix)
    ignored = [k for k in sd if not k.startswith(prefix) or k[len(prefix) :] in HF_CLIP_UNUSED]
    _check_keys("transformers CLIP checkpoint", sd.keys(), table, ignored)
    ours: dict[str, Tensor] = {}
    parts: dict[str, list[Tensor | None]] = {}
    for src, dst in table.items():
        if isinstance(dst, tuple):
            key, slot = dst
            parts.setdefault(key, [None, None, None])[slot] = sd[src]
        else:
            ours[dst] = sd[src]
    for key, (q, k, v) in parts.items():
        ours[key] = torch.cat([q, k, v], dim=0)  # rows [q; k; v] = [3][heads][head_dim]
    _check_subset_shapes("transformers CLIP checkpoint", ours, _clip_shapes(config))
    return ours


def _sam_shapes(config: SamConfig) -> dict[str, torch.Size]:
    from deepencoder.sam import SamEncoder

    with torch.device("meta"):
        return {k: v.shape for k, v in SamEncoder(config).state_dict().items()}


def _clip_shapes(config: ClipConfig) -> dict[str, torch.Size]:
    from deepencoder.clip import ClipVisionModel

    with torch.device("meta"):
        return {"vision_model." + k: v.shape for k, v in ClipVisionModel(config).state_dict().items()}


def _check_subset_shapes(source: str, ours: Mapping[str, Tensor], shapes: Mapping[str, torch.Size]) -> None:
    bad = [f"{k} {tuple(v.shape)} != {tuple(shapes[k])}" for k, v in ours.items() if v.shape != shapes[k]]
    if bad:
        raise ValueError(f"{source}: shape mismatch for {len(bad)} tensors: {_fmt(bad)}")


def load_into(module: nn.Module, state: Mapping[str, Tensor], *, allow_missing: Iterable[str] = ()) -> None:
    """Copy `state` into `module`; raise ValueError on unexpected keys or on missing keys that do
    not start with one of `allow_missing` (e.g. ("sam_model.net_", "vision_model.", "projector.",
    "image_newline", "view_seperator") when loading only the upstream SAM weights)."""
    allow = tuple(allow_missing)
    result = module.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(allow)] if allow else result.missing_keys
    if missing or result.unexpected_keys:
        raise ValueError(
            f"load_into {type(module).__name__}: missing {len(missing)} keys [{_fmt(missing)}], "
            f"unexpected {len(result.unexpected_keys)} keys [{_fmt(result.unexpected_keys)}]"
        )


# ----------------------------------------------------------------------------- files


def load_state_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a local checkpoint: .safetensors, a torch pickle (state dict, optionally nested under
    "state_dict"/"model"), or a TorchScript archive (OpenAI CLIP's .pt). Never downloads."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            scripted = any(n.endswith("constants.pkl") for n in zf.namelist())
        if scripted:
            return {k: v for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    return obj


def save_state_file(
    path: str | os.PathLike, sd: Mapping[str, Tensor], metadata: dict[str, str] | None = None
):
    """Write `sd` as safetensors (contiguous CPU copies; shared storage is split)."""
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}, os.fspath(path), metadata
    )


def load_release_encoder(
    path: str | os.PathLike, config: EncoderConfig | None = None, prefix: str = "model."
) -> dict[str, Tensor]:
    """Encoder part of a released DeepSeek-OCR checkpoint file -> DeepEncoder state dict."""
    return encoder_state_from_release(load_state_file(path), prefix, config)


def save_release_encoder(
    path: str | os.PathLike,
    our_sd: Mapping[str, Tensor],
    config: EncoderConfig | None = None,
    prefix="model.",
) -> None:
    """Write a DeepEncoder state dict in the released layout (safetensors, format "pt")."""
    save_state_file(path, encoder_state_to_release(our_sd, prefix, config), {"format": "pt"})


def load_segment_anything_sam(path: str | os.PathLike, config: SamConfig | None = None) -> dict[str, Tensor]:
    """`sam_vit_b_01ec64.pth` -> `sam_model.*` trunk + neck state (load with `load_into`)."""
    return sam_state_from_segment_anything(load_state_file(path), config)


def load_open_clip(
    path: str | os.PathLike, config: ClipConfig | None = None, prefix: str = "visual."
) -> dict[str, Tensor]:
    """open_clip `ViT-L-14`/`openai` weights (or OpenAI's TorchScript .pt) -> `vision_model.*` state."""
    return clip_state_from_open_clip(load_state_file(path), config, prefix)


def load_hf_clip(
    path: str | os.PathLike, config: ClipConfig | None = None, prefix: str = "vision_model."
) -> dict[str, Tensor]:
    """transformers `CLIPVisionModel` / `CLIPModel` weights file -> `vision_model.*` state."""
    return clip_state_from_hf(load_state_file(path), config, prefix)
