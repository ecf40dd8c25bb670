"""The model options a training job applies after building or loading its DeepSeekOCR.

Typed fields of `pipeline.config.ModelConfig` (configs/model/*.yaml, experiment presets):

- `encoder_init`: a stage-1 encoder export (or any released-layout directory): the encoder
  parts it holds are loaded strictly (`pipeline.stage1.export.load_encoder_init`); stage 2's
  one config line after stage 1;
- `sam_init` / `clip_init`: stage 1's upstream SAM ViT-B / CLIP-L/14 checkpoints
  (`pipeline.stage1.upstream`);
- `freeze_sam` (stage 2's frozen PP0: SAM + compressor) and `freeze`, a list of parts from
  `pipeline.stage1.parts.MODEL_PARTS` kept frozen; stage 1 trains everything by default;
- `export_encoder` / `export_projector`: at the end of a stage-1 job the encoder is written to
  `<out_dir>/encoder_export` in the released layout (`export_encoder_if_requested`).

`validate_model_options` runs every check that needs no model (files exist, part names, no
conflicting sources) so a job fails before any heavy work. `apply_model_options` is called by
the job between building the model and creating the optimizer (and, for DeepSpeed, before
`deepspeed.initialize`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from deepencoder import EncoderConfig
from pipeline.config import ModelConfig
from pipeline.model import DeepSeekOCR
from pipeline.stage1.export import encoder_init_state, export_encoder, is_encoder_export, load_encoder_init
from pipeline.stage1.parts import MODEL_PARTS, check_part_names, freeze_parts, trainable_by_part
from pipeline.stage1.upstream import (
    check_part_state,
    clip_init_state,
    encoder_shapes,
    load_clip_init,
    load_sam_init,
    sam_init_state,
)

EXPORT_DIR = "encoder_export"


@dataclass
class AppliedOptions:
    """What `apply_model_options` did: sources loaded per part, parts frozen, parameter counts."""

    loaded: dict[str, str] = field(default_factory=dict)  # part -> source path
    frozen: list[str] = field(default_factory=list)
    trainable: dict[str, tuple[int, int]] = field(default_factory=dict)  # part -> (trainable, all)

    def summary(self) -> str:
        rows = [f"{p}: {t:,}/{n:,} trainable" for p, (t, n) in self.trainable.items()]
        loaded = ", ".join(f"{p} <- {s}" for p, s in self.loaded.items()) or "none"
        return f"init: {loaded}; frozen: {self.frozen or 'none'}; " + "; ".join(rows)


def frozen_parts(m: ModelConfig) -> list[str]:
    """The parts a config freezes: `freeze_sam` (SAM + compressor) plus `freeze`, in MODEL_PARTS order."""
    wanted = set(check_part_names(m.freeze, MODEL_PARTS, "model.freeze"))
    if m.freeze_sam:
        wanted |= {"sam", "compressor"}
    return [p for p in MODEL_PARTS if p in wanted]


def validate_model_options(m: ModelConfig) -> None:
    """ValueError for a bad combination or a missing file, before any model is built."""
    if frozen_parts(m) == list(MODEL_PARTS):
        raise ValueError("model.freeze (with model.freeze_sam) freezes every part: nothing would train")
    if m.encoder_init and (m.sam_init or m.clip_init):
        raise ValueError(
            "model.encoder_init cannot be combined with model.sam_init / model.clip_init: the export "
            "already holds SAM and CLIP; pick one source"
        )
    for name in ("encoder_init", "sam_init", "clip_init"):
        value = getattr(m, name)
        if value and not Path(value).exists():
            raise ValueError(f"model.{name}={value}: no such file or directory")
    if m.init_from and is_encoder_export(m.init_from):
        raise ValueError(
            f"model.init_from={m.init_from} is a stage-1 encoder export (encoder only): initialise stage 2 "
            f"from it with model.encoder_init={m.init_from}"
        )
    if m.export_projector and not m.export_encoder:
        warnings.warn("model.export_projector is ignored without model.export_encoder=true", stacklevel=2)


def apply_model_options(model: DeepSeekOCR, m: ModelConfig) -> AppliedOptions:
    """Load the configured encoder weights into `model` and freeze the configured parts."""
    validate_model_options(m)
    applied = AppliedOptions()
    if m.encoder_init:
        for part in load_encoder_init(model.encoder, m.encoder_init):
            applied.loaded[part] = m.encoder_init
    if m.sam_init:
        for part in load_sam_init(model.encoder, m.sam_init):
            applied.loaded[part] = m.sam_init
    if m.clip_init:
        for part in load_clip_init(model.encoder, m.clip_init):
            applied.loaded[part] = m.clip_init
    applied.frozen = frozen_parts(m)
    if applied.frozen:
        freeze_parts(model, applied.frozen)
    applied.trainable = trainable_by_part(model)
    return applied


@dataclass
class EncoderSource:
    """One configured encoder initialisation, converted to DeepEncoder keys and checked strictly."""

    source: str  # "model.encoder_init=PATH", ...
    parts: list[str]
    state: dict  # DeepEncoder key -> tensor (CPU)


def encoder_sources(m: ModelConfig, config: EncoderConfig) -> list[EncoderSource]:
    """The `encoder_init` / `sam_init` / `clip_init` tensors for engines that load by key (the
    pipeline, where each stage holds only some parts). Each source must cover its parts of an
    encoder of `config` exactly (missing / unexpected / mis-shaped keys raise ValueError listing
    them); apply them in the returned order, as `apply_model_options` does."""
    validate_model_options(m)
    shapes = encoder_shapes(config)
    found = []
    if m.encoder_init:
        state, parts = encoder_init_state(m.encoder_init, config)
        found.append(EncoderSource(f"model.encoder_init={m.encoder_init}", parts, state))
    if m.sam_init:
        state, source = sam_init_state(m.sam_init, config)
        found.append(EncoderSource(source, ["sam"], state))
    if m.clip_init:
        state, source = clip_init_state(m.clip_init, config)
        found.append(EncoderSource(source, ["clip"], state))
    for src in found:
        check_part_state(src.state, shapes, set(src.parts), src.source)
    return found


def export_encoder_if_requested(
    model: DeepSeekOCR, m: ModelConfig, out_dir: str | Path, *, run_name: str, step: int | None = None
) -> Path | None:
    """`<out_dir>/encoder_export` when `model.export_encoder` is set (call once, at the end of the job)."""
    if not m.export_encoder:
        return None
    source = {"run": run_name, "step": step, "encoder": m.encoder, "decoder": m.decoder}
    return export_encoder(
        model.encoder, Path(out_dir) / EXPORT_DIR, include_projector=m.export_projector, source=source
    )
