"""Atomic multi-rank checkpoints of a DeepSpeed run, their compatibility checks, and `model.init_from`.

Two trainers write them: the pipeline (`pipeline.parallel.trainer`, meta kind "pipeline") and
data parallelism over the whole model (`pipeline.parallel.data_parallel`, kind "data_parallel").
Layout (the directory naming of `pipeline.train.checkpoint`, so `latest_checkpoint` and
keep-last-N pruning apply unchanged):

    <out_dir>/checkpoints/step_XXXXXXXX/
        engine/                 DeepSpeed `save_checkpoint` (tag "engine"). Pipeline:
                                layer_XX-model_states.pt per unit (XX = unit index),
                                mp_rank_0S_model_states.pt per stage (LR schedule, engine
                                counters). Data parallel: mp_rank_00_model_states.pt holding the
                                whole DeepSeekOCR state dict under "module". Optimizer shards per rank
        trainer_state/rankNNNNN.{safetensors,json}   per global rank (`pipeline.train.state_io`):
                                step, RNG states, data-loader position (pipeline: first and
                                last stage), skipped-step counters
        tokenizer/              tokenizer files (consolidation exports them)
        meta.json               step, kind, format + parts (pipeline), pp, dp, model configs, run config
        manifest.json           every file with its size (`pipeline.atomic`)
    <out_dir>/checkpoints/latest    name of the newest complete checkpoint

Every rank writes into one shared `.tmp-step_XXXXXXXX/` directory; after a barrier global rank
0 writes meta.json and commits it with `pipeline.atomic` (manifest, fsync, swap, delete the
replaced one), then prunes. A kill at any point leaves either the old set of complete
checkpoints or the new one (needs a filesystem shared by all ranks, as DeepSpeed's own
checkpoints do). DeepSpeed reads its engine files with `weights_only=False`, so before a resume
`check_engine_files` refuses any file whose pickle names a global outside the known set.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from decoder import DecoderConfig, DecoderModel
from deepencoder import DeepEncoder, EncoderConfig
from pipeline import atomic
from pipeline.checkpoint_io import OUR_CONFIG, configs_from_dict, configs_from_release, configs_to_dict
from pipeline.config import ModelConfig, RunConfig
from pipeline.model import DeepSeekOCR
from pipeline.train.checkpoint import checkpoint_dir, checkpoint_root, latest_checkpoint, prune_checkpoints
from pipeline.train.state_io import load_state, save_state

ENGINE_TAG = "engine"
STATE_DIR = "trainer_state"
TOKENIZER_DIR = "tokenizer"
META = "meta.json"
KIND = "pipeline"
DP_KIND = "data_parallel"
KINDS = (KIND, DP_KIND)
# Engine-state layout of pipeline checkpoints; 2: the SAM unit's links hold FLAT_ALIGN elements
# (format 1, no "format" key: one element each, which DeepSpeed cannot load into format 2).
PIPELINE_FORMAT = 2


def model_configs_dict(configs: tuple[EncoderConfig, DecoderConfig, int]) -> dict:
    """The {encoder, decoder, image_token_id} dict of `checkpoint_io.configs_to_dict`."""
    enc, dec, image_id = configs
    with torch.device("meta"):
        return configs_to_dict(DeepSeekOCR(DeepEncoder(enc), DecoderModel(dec), image_id))


def _shapes(configs: tuple[EncoderConfig, DecoderConfig, int]) -> dict[str, tuple[int, ...]]:
    enc, dec, image_id = configs
    with torch.device("meta"):
        model = DeepSeekOCR(DeepEncoder(enc), DecoderModel(dec), image_id)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def describe_size(configs: tuple[EncoderConfig, DecoderConfig, int]) -> str:
    """A model size in words: the SAM / CLIP / decoder widths and depths, experts and vocabulary."""
    enc, dec, _ = configs
    experts = f", {dec.moe.n_routed_experts} experts" if dec.moe is not None else ""
    return (
        f"SAM {enc.sam.embed_dim}x{enc.sam.depth}, CLIP {enc.clip.width}x{enc.clip.layers}, decoder "
        f"{dec.hidden_size}x{dec.num_layers}{experts}, vocabulary {dec.vocab_size}"
    )


def check_same_size(found: tuple[EncoderConfig, DecoderConfig, int], wanted, what: str) -> None:
    """ValueError when two model configs give different tensors (a different model size)."""
    have, want = _shapes(found), _shapes(wanted)
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if diff:
        details = ", ".join(f"{k}: {have.get(k)} vs {want.get(k)}" for k in diff[:3])
        raise ValueError(
            f"{what} is a different model size ({describe_size(found)}) than this run's model "
            f"({describe_size(wanted)}; {len(diff)} tensors differ, e.g. {details}): set model.encoder / "
            "model.decoder (and their overrides) to the checkpoint's sizes, or use another checkpoint"
        )


def check_init_from(model: ModelConfig, tokenizer) -> None:
    """ValueError, before anything is built, unless `model.init_from` holds the model that
    model.encoder / model.decoder (+ overrides) and the tokenizer describe."""
    from pipeline.parallel.engine import run_model_configs

    wanted = run_model_configs(model, vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_id,
                               bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)  # fmt: skip
    found = init_source_configs(model.init_from, tokenizer.image_id)
    if found[1].vocab_size != wanted[1].vocab_size:
        raise ValueError(
            f"model.init_from={model.init_from} has a vocabulary of {found[1].vocab_size} but "
            f"data.tokenizer gives {wanted[1].vocab_size}: use the checkpoint's tokenizer directory"
        )
    what = f"model.init_from={model.init_from} (model.encoder={model.encoder}, model.decoder={model.decoder})"
    check_same_size(found, wanted, what)


def init_source_configs(path: str | Path, image_token_id: int) -> tuple[EncoderConfig, DecoderConfig, int]:
    """Model configs of a `model.init_from` checkpoint, read from its config files only."""
    path = Path(path)
    if (path / OUR_CONFIG).is_file():
        return configs_from_dict(json.loads((path / OUR_CONFIG).read_text()))
    if (path / "config.json").is_file():
        return configs_from_release(json.loads((path / "config.json").read_text()), image_token_id)
    if (path / META).is_file() or (checkpoint_root(path)).is_dir():
        raise ValueError(
            f"model.init_from={path} is a pipeline training checkpoint: consolidate it first "
            f"(dsocr-convert consolidate {path} OUT) and pass OUT, or resume it with train.out_dir"
        )
    raise ValueError(
        f"model.init_from={path} is neither a released-layout directory (config.json) nor one of ours "
        f"({OUR_CONFIG}); consolidated pipeline checkpoints are released-layout directories"
    )


def load_init_state(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The full DeepSeekOCR state dict of a released / consolidated / our-layout checkpoint (CPU).

    Every rank reads the whole file and keeps its stage's tensors (bf16 full model: 6.7 GB of
    host memory per rank while loading).
    """
    from pipeline.checkpoint_io import load_any

    model, _ = load_any(path, dtype=dtype)
    return model.state_dict()


def check_resume_compatible(
    ckpt: Path, *, pp: int, dp: int, parts: list[int] | None, model: dict, kind: str = KIND
) -> dict:
    """meta.json of `ckpt` after checking it matches this run's trainer kind, layout and model."""
    meta = json.loads((ckpt / META).read_text())
    if meta.get("kind") != kind:
        raise ValueError(
            f"{ckpt} was written by a {meta.get('kind')!r} trainer, not the {kind!r} trainer of this run "
            "(parallel.pp decides: 1 = data parallel, >= 2 = pipeline): set train.resume=false or another "
            "train.out_dir, or consolidate it (dsocr-convert consolidate) and start from model.init_from"
        )
    check_engine_files(ckpt)
    if kind == KIND and meta.get("format", 1) != PIPELINE_FORMAT:
        raise ValueError(
            f"{ckpt} is a pipeline checkpoint of format {meta.get('format', 1)}, this code resumes format "
            f"{PIPELINE_FORMAT} (the SAM stage's zero-weight links changed size): consolidate it "
            f"(dsocr-convert consolidate {ckpt} OUT; the model weights are unchanged), set "
            "model.init_from=OUT and train.resume=false"
        )
    saved_model = meta["model"]
    if saved_model != model:
        check_same_size(configs_from_dict(saved_model), configs_from_dict(model), f"checkpoint {ckpt}")
    layout = {"pp": meta["pp"], "dp": meta["dp"], "parts": meta.get("parts")}
    if layout != {"pp": pp, "dp": dp, "parts": parts}:
        raise ValueError(
            f"checkpoint {ckpt} was saved with {layout}, this run has pp={pp}, dp={dp}, parts={parts}; an "
            "exact resume needs the same layout. To continue on another layout, consolidate it "
            f"(dsocr-convert consolidate {ckpt} OUT), set model.init_from=OUT and train.resume=false"
        )
    return meta


def save_engine_checkpoint(
    engine,
    *,
    out_dir: str | Path,
    step: int,
    rank: int,
    rank_state: dict,
    meta: dict,
    tokenizer,
    keep_last: int,
    kind: str = KIND,
) -> Path:
    """Collective: every rank calls it; returns the published `step_XXXXXXXX` directory."""
    assert kind in KINDS, kind
    import torch.distributed as dist

    final = checkpoint_dir(out_dir, step)
    tmp = atomic.staging_dir(final)
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        atomic.begin(final)
        (tmp / STATE_DIR).mkdir()
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, client_state={"dsocr_step": step}, save_latest=False)
    save_state(rank_state, tmp / STATE_DIR, rank_state_name(rank))
    dist.barrier()
    if rank == 0:
        tokenizer.save(tmp / TOKENIZER_DIR)
        (tmp / META).write_text(json.dumps({"step": step, "kind": kind, **meta}, indent=2, default=str))
        atomic.commit(tmp, final)
        pointer = final.parent / ".latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, final.parent / "latest")
        prune_checkpoints(final.parent, keep_last)
    dist.barrier()
    return final


def rank_state_name(rank: int) -> str:
    return f"rank{rank:05d}"


def load_rank_state(ckpt: Path, rank: int) -> dict:
    return load_state(ckpt / STATE_DIR, rank_state_name(rank))


# What DeepSpeed pickles into its engine files besides tensors and containers
# (`torch.serialization.get_unsafe_globals_in_checkpoint` names them "module.qualname").
DEEPSPEED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


def _deepspeed_safe_globals() -> list:
    import importlib

    found = []
    for name in sorted(DEEPSPEED_GLOBALS):
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: it cannot have written it
            continue
    return found


def load_engine_module(file: Path) -> dict[str, torch.Tensor]:
    """The model state dict ("module") of a DeepSpeed model-states file, read with
    `weights_only=True` (DeepSpeed's own plain types allowed, nothing else)."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for a foreign global, RuntimeError for a damaged file
        raise ValueError(
            f"{file}: refused or unreadable engine checkpoint file ({str(err).splitlines()[0]})"
        ) from err
    return dict(saved["module"])


def check_engine_files(ckpt: Path) -> None:
    """ValueError unless every engine file pickles only tensors, containers and DeepSpeed's own
    plain types: DeepSpeed loads them with `weights_only=False`, so a planted file would run
    its code on resume. The scan reads the pickle opcodes only; nothing is executed."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for file in sorted((ckpt / ENGINE_TAG).rglob("*.pt")):
        try:
            unsafe = set(get_unsafe_globals_in_checkpoint(str(file))) - DEEPSPEED_GLOBALS
        except Exception as err:  # a truncated or foreign file
            raise ValueError(f"{file}: unreadable engine checkpoint file ({err})") from err
        if unsafe:
            raise ValueError(
                f"{file} would import {sorted(unsafe)} when loaded, which neither PyTorch nor DeepSpeed "
                "write into a checkpoint; refusing to resume from it (use another checkpoint)"
            )


def run_config_dict(run: RunConfig) -> dict:
    return dataclasses.asdict(run)


def newest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (`.tmp-*` leftovers of killed saves are never returned)."""
    return latest_checkpoint(out_dir)


__all__ = [
    "DP_KIND",
    "ENGINE_TAG",
    "KIND",
    "check_engine_files",
    "check_init_from",
    "check_resume_compatible",
    "check_same_size",
    "init_source_configs",
    "load_init_state",
    "load_rank_state",
    "model_configs_dict",
    "newest_checkpoint",
    "run_config_dict",
    "save_engine_checkpoint",
]
