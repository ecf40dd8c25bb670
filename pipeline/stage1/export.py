"""The stage-1 -> stage-2 hand-over: the trained DeepEncoder in the released key layout.

DeepSeek-OCR's stage 1 produces "the encoder checkpoint that initialises stage 2" (arXiv
2510.18234 section 3.5). `export_encoder` writes a directory:

    model.safetensors     the exported parts under the release's names: `model.sam_model.*`
                          (SAM trunk + neck + compressor `net_2`/`net_3`), `model.vision_model.*`
                          (CLIP-L), optionally `model.projector.layers.*`, `model.image_newline`,
                          `model.view_seperator`; safetensors metadata format "pt"
    encoder_config.json   {"format": EXPORT_FORMAT, "parts": [...], "encoder": EncoderConfig fields,
                          "source": provenance (run name, step, ...)}

The projector and the two learned vectors are sized by the compact LM's width (768 for
`dense-125m`) while stage 2's decoder is 1280 wide, so they are left out by default.

`load_encoder_init(encoder, path)` is the stage-2 side (`model.encoder_init=<export>`): it reads
such a directory, a released DeepSeek-OCR / consolidated checkpoint directory (its encoder part)
or a bare safetensors file, finds which parts it holds, and loads them strictly: every tensor of
a present part must be there with this encoder's shape, and any other key (a wrong prefix) raises
ValueError listing them. Parts that are absent keep their current values.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from deepencoder import DeepEncoder, EncoderConfig
from deepencoder.adapters import (
    RELEASE_FOREIGN_PREFIXES,
    RELEASE_FOREIGN_TOP,
    release_key_table,
    save_state_file,
)
from pipeline.stage1.parts import ENCODER_PARTS, encoder_part_of
from pipeline.stage1.upstream import copy_part_state

EXPORT_FORMAT = "dsocr-stage1-encoder"
EXPORT_CONFIG = "encoder_config.json"
EXPORT_WEIGHTS = "model.safetensors"
DEFAULT_PARTS = ("sam", "compressor", "clip")
RELEASE_PREFIX = "model."


def export_encoder(
    encoder: DeepEncoder,
    out_dir: str | os.PathLike,
    *,
    include_projector: bool = False,
    dtype: torch.dtype | None = None,
    source: dict | None = None,
) -> Path:
    """Write SAM + compressor + CLIP (+ projector and newline/separator) of `encoder` to `out_dir`."""
    if not isinstance(encoder, DeepEncoder):
        raise TypeError(f"export_encoder expects a DeepEncoder, got {type(encoder).__name__}")
    parts = [*DEFAULT_PARTS, "projector"] if include_projector else list(DEFAULT_PARTS)
    table = release_key_table(encoder.config, RELEASE_PREFIX)  # release key -> ours
    state = encoder.state_dict()
    tensors = {}
    for release_key, key in table.items():
        if encoder_part_of(key) in parts:
            value = state[key].detach()
            tensors[release_key] = value.to(dtype) if dtype is not None else value
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_state_file(out / EXPORT_WEIGHTS, tensors, {"format": "pt", "layout": EXPORT_FORMAT})
    config = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "parts": parts,
        "encoder": dataclasses.asdict(encoder.config),
        "source": source or {},
    }
    (out / EXPORT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def is_encoder_export(path: str | os.PathLike) -> bool:
    """True for a directory written by `export_encoder`."""
    config = Path(path) / EXPORT_CONFIG
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == EXPORT_FORMAT
    except json.JSONDecodeError:
        return False


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"model.encoder_init={path}: expected a .safetensors file or a directory")
        return [path]
    if not path.is_dir():
        raise ValueError(f"model.encoder_init={path}: no such file or directory")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (path / EXPORT_WEIGHTS).is_file():
        return [path / EXPORT_WEIGHTS]
    raise ValueError(
        f"model.encoder_init={path}: no {EXPORT_WEIGHTS} (or sharded index) in the directory; expected a "
        "stage-1 encoder export (python -m pipeline.stage1 export) or a released-layout checkpoint"
    )


def _read_encoder_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor except the decoder's release keys (those are another adapter's business)."""
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                rel = key[len(RELEASE_PREFIX) :] if key.startswith(RELEASE_PREFIX) else None
                if key.startswith(RELEASE_FOREIGN_TOP) or (
                    rel is not None and rel.startswith(RELEASE_FOREIGN_PREFIXES)
                ):
                    continue
                state[key] = handle.get_tensor(key)
    return state


def _check_export_config(path: Path, config: EncoderConfig) -> list[str] | None:
    """The parts an export declares, after checking its encoder sizes match `config`."""
    file = path / EXPORT_CONFIG if path.is_dir() else None
    if file is None or not file.is_file():
        return None
    data = json.loads(file.read_text())
    if data.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{file}: format {data.get('format')!r}, expected {EXPORT_FORMAT!r}")
    saved = EncoderConfig(**data["encoder"])
    diffs = []
    for name in ("sam", "clip"):
        ours, theirs = dataclasses.asdict(getattr(config, name)), dataclasses.asdict(getattr(saved, name))
        diffs += [
            f"{name}.{k}: export {theirs[k]} vs model {ours[k]}"
            for k in ours
            if k != "attn_impl" and ours[k] != theirs[k]
        ]
    if "projector" in data["parts"] and saved.n_embed != config.n_embed:
        diffs.append(
            f"n_embed: export {saved.n_embed} vs model {config.n_embed} (re-export without the projector: "
            "python -m pipeline.stage1 export ... without --projector)"
        )
    if diffs:
        raise ValueError(
            f"model.encoder_init={path} was exported from a different encoder: {'; '.join(diffs)}; set "
            "model.encoder / model.encoder_overrides to the stage-1 encoder's sizes"
        )
    return list(data["parts"])


def encoder_init_state(
    path: str | os.PathLike, config: EncoderConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(DeepEncoder-keyed tensors, parts) of an export / release directory, checked against `config`.

    Strict: every key must be a release encoder key of `config` (decoder keys of a full release
    are skipped), and each part that appears must be complete.
    """
    path = Path(path)
    declared = _check_export_config(path, config)
    raw = _read_encoder_tensors(_weight_files(path))
    table = release_key_table(config, RELEASE_PREFIX)
    unexpected = sorted(k for k in raw if k not in table)
    if unexpected:
        hint = (
            " (a wrong key prefix? released keys start with 'model.')"
            if not any(k in table for k in raw)
            else ""
        )
        raise ValueError(
            f"model.encoder_init={path}: {len(unexpected)} keys are not encoder keys of this model{hint}: "
            f"{unexpected[:10]}"
        )
    state = {table[k]: v for k, v in raw.items()}
    present = [p for p in ENCODER_PARTS if any(encoder_part_of(k) == p for k in state)]
    if not present:
        raise ValueError(f"model.encoder_init={path}: holds no encoder tensors")
    if declared is not None and sorted(declared) != sorted(present):
        raise ValueError(
            f"model.encoder_init={path}: {EXPORT_CONFIG} lists parts {declared}, the weights hold {present}"
        )
    return state, present


def load_encoder_init(encoder: DeepEncoder, path: str | os.PathLike) -> list[str]:
    """Load every part `path` holds into `encoder` (strict per part); returns the parts loaded."""
    state, parts = encoder_init_state(path, encoder.config)
    copy_part_state(encoder, state, set(parts), f"model.encoder_init={path}")
    return parts


def encoder_state_for_model(path: str | os.PathLike, config: EncoderConfig) -> dict[str, torch.Tensor]:
    """The tensors of `path` under `DeepSeekOCR` keys (`encoder.*`), for engines that load by key."""
    state, _ = encoder_init_state(path, config)
    return {f"encoder.{k}": v for k, v in state.items()}
