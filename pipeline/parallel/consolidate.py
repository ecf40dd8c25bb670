"""Pipeline or data-parallel checkpoint (any PP / DP) -> one model in the released DeepSeek-OCR layout.

Data-parallel checkpoints (`pipeline.parallel.data_parallel`, meta kind "data_parallel") hold the
whole DeepSeekOCR state dict under "module" of `engine/mp_rank_00_model_states.pt` (ZeRO 0-2
shard only the optimizer states and gradients, never the weights); it is read as it is.
For pipelines, DeepSpeed writes one `layer_XX-model_states.pt` per pipeline unit (XX = unit index, written by
data-parallel rank 0 of the unit's stage) and has no converter to a single state dict. Unit
state-dict keys are "model." + the DeepSeekOCR key (`pipeline.parallel.stages`), so the union
of the unit files, without the SAM stage's zero-weight link, is the full `DeepSeekOCR` state
dict; it is loaded strictly and written with `pipeline.checkpoint_io.export_release`
(config.json + model.safetensors with the release's key names + tokenizer files). The result
loads with `load_any` / `import_release` and initialises a run of any PP (`model.init_from`).

    dsocr-convert consolidate RUN_DIR_OR_CHECKPOINT OUT_DIR [--dtype bf16]
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from decoder import DecoderConfig, DecoderModel
from deepencoder import DeepEncoder, EncoderConfig
from pipeline.checkpoint_io import _materialize, configs_from_dict, export_release
from pipeline.model import DeepSeekOCR
from pipeline.parallel.checkpoints import (
    DP_KIND,
    ENGINE_TAG,
    KIND,
    META,
    TOKENIZER_DIR,
    load_engine_module,
    newest_checkpoint,
)
from pipeline.parallel.stages import unit_key_to_model_key

_LAYER_FILE = re.compile(r"^layer_(\d+)-model_states\.pt$")
DP_MODEL_FILE = "mp_rank_00_model_states.pt"


def resolve_checkpoint(src: str | Path) -> Path:
    """A checkpoint directory, or the newest complete checkpoint of a run directory."""
    src = Path(src)
    if (src / META).is_file():
        return src
    found = newest_checkpoint(src)
    if found is None:
        raise ValueError(
            f"{src} is neither a pipeline checkpoint (no {META}) nor a run directory with complete "
            "checkpoints under checkpoints/step_*"
        )
    return found


def model_from_state(
    state: dict[str, torch.Tensor], configs: tuple[EncoderConfig, DecoderConfig, int]
) -> DeepSeekOCR:
    """A CPU DeepSeekOCR holding exactly `state` (strict: every tensor present, none extra)."""
    enc, dec, image_id = configs
    with torch.device("meta"):
        model = DeepSeekOCR(DeepEncoder(enc), DecoderModel(dec), image_id)
    _materialize(model, state, "cpu")
    return model


def read_pipeline_state(
    ckpt: Path,
) -> tuple[dict[str, torch.Tensor], tuple[EncoderConfig, DecoderConfig, int]]:
    """The full DeepSeekOCR state dict and model configs of one pipeline checkpoint."""
    meta = json.loads((ckpt / META).read_text())
    if meta.get("kind") != KIND:
        raise ValueError(f"{ckpt} is a {meta.get('kind')!r} checkpoint, not a pipeline one")
    files = {}
    for f in (ckpt / ENGINE_TAG).iterdir():
        match = _LAYER_FILE.match(f.name)
        if match:
            files[int(match.group(1))] = f
    expected = len(meta["units"])
    if sorted(files) != list(range(expected)):
        raise ValueError(
            f"{ckpt / ENGINE_TAG} has layer files {sorted(files)}, expected one per unit 0..{expected - 1}"
        )
    state: dict[str, torch.Tensor] = {}
    for index in range(expected):
        for key, tensor in torch.load(files[index], map_location="cpu", weights_only=True).items():
            model_key = unit_key_to_model_key(key)
            if model_key is None:
                continue
            if model_key in state:
                raise ValueError(f"{model_key} appears in two unit files of {ckpt}")
            state[model_key] = tensor
    return state, configs_from_dict(meta["model"])


def read_data_parallel_state(
    ckpt: Path,
) -> tuple[dict[str, torch.Tensor], tuple[EncoderConfig, DecoderConfig, int]]:
    """The full DeepSeekOCR state dict and model configs of one data-parallel checkpoint."""
    meta = json.loads((ckpt / META).read_text())
    if meta.get("kind") != DP_KIND:
        raise ValueError(f"{ckpt} is a {meta.get('kind')!r} checkpoint, not a data-parallel one")
    file = ckpt / ENGINE_TAG / DP_MODEL_FILE
    if not file.is_file():
        raise ValueError(f"{ckpt}: no {ENGINE_TAG}/{DP_MODEL_FILE} (an incomplete data-parallel checkpoint)")
    return load_engine_module(file), configs_from_dict(meta["model"])


def read_checkpoint_state(
    ckpt: Path,
) -> tuple[dict[str, torch.Tensor], tuple[EncoderConfig, DecoderConfig, int]]:
    """State dict + configs of a pipeline or a data-parallel checkpoint (by meta.json's kind)."""
    kind = json.loads((ckpt / META).read_text()).get("kind")
    if kind == DP_KIND:
        return read_data_parallel_state(ckpt)
    return read_pipeline_state(ckpt)


def consolidate(src: str | Path, out: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write the model of a pipeline / data-parallel checkpoint (or a run's newest one) in the released layout."""
    ckpt = resolve_checkpoint(src)
    state, configs = read_checkpoint_state(ckpt)
    model = model_from_state(state, configs)
    tokenizer = ckpt / TOKENIZER_DIR
    if not (tokenizer / "tokenizer.json").is_file():
        raise ValueError(f"{ckpt} has no {TOKENIZER_DIR}/tokenizer.json to export with the model")
    return export_release(model, tokenizer, out, dtype=dtype)
