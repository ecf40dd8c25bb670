"""Checkpoint I/O of the full model: the released `deepseek-ai/DeepSeek-OCR` directory layout and ours.

Release layout (../shared/spec/architecture.md section 6, release_config.json): config.json
(`model_type` deepseek_vl_v2, the decoder fields at the top level and under
`language_config`, `projector_config`, `vision_config`), safetensors with the release's key
names, tokenizer files and processor_config.json. `import_release` reads such a local
directory into `DeepSeekOCR` (strict key tables: `deepencoder.adapters`, `decoder.adapters`);
`export_release` writes one back. Sizes not expressed by the release's fields (debug models)
travel in one extra config.json entry, `dsocr_train`, which the release loader ignores.

The release's config.json leaves several DeepseekV2Config fields at their defaults
(configuration_deepseekv2.py). Reading one, the fields the decoder implements (`_APPLIED_FIELDS`:
layer rule, RoPE base, norm epsilon, router options) are applied; a field the decoder implements
only at one value (`_FIXED_FIELDS`: sigmoid scoring, group-limited routing, biases, RoPE scaling,
tied embeddings...) refuses any other value with a ValueError naming it. Exporting writes them all,
so a reader never has to rely on defaults.

Our layout (`save_checkpoint` / `load_checkpoint`): model.safetensors with
`DeepSeekOCR.state_dict()` keys, dsocr_config.json, tokenizer files.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from decoder import (
    DecoderConfig,
    DecoderModel,
    MoEConfig,
    decoder_state_from_release,
    decoder_state_to_release,
)
from deepencoder import DeepEncoder, EncoderConfig, encoder_config
from deepencoder.adapters import encoder_state_from_release, encoder_state_to_release
from pipeline.model import DeepSeekOCR
from pipeline.processing import IMAGE_MEAN, IMAGE_STD
from pipeline.tokenizer import IMAGE_TOKEN, TOKENIZER_FILES, OCRTokenizer, load_tokenizer

RELEASE_WEIGHTS = "model.safetensors"
OUR_CONFIG = "dsocr_config.json"
EXTRA_KEY = "dsocr_train"
_DECODER_FIELDS = (
    "bos_token_id",
    "eos_token_id",
    "first_k_dense_replace",
    "hidden_size",
    "intermediate_size",
    "kv_lora_rank",
    "lm_head",
    "max_position_embeddings",
    "moe_intermediate_size",
    "n_group",
    "n_routed_experts",
    "n_shared_experts",
    "num_attention_heads",
    "num_experts_per_tok",
    "num_hidden_layers",
    "num_key_value_heads",
    "q_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "rm_head",
    "topk_group",
    "topk_method",
    "use_mla",
    "v_head_dim",
    "vocab_size",
)
# DeepseekV2Config field -> its default (what a config.json without the field means)
_APPLIED_FIELDS = {
    "moe_layer_freq": 1,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
}
# DeepseekV2Config field -> the values the decoder implements (the first one is written on export);
# "gready" is DeepseekV2Config's own spelling of its default, the same greedy top-k
_FIXED_FIELDS = {
    "topk_method": ("greedy", "gready"),
    "scoring_func": ("softmax",),
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "rope_scaling": (None,),
    "tie_word_embeddings": (False,),
    "lm_head": (True,),
    "rm_head": (False,),
}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


# ---------------------------------------------------------------- configs


def _init_fields(config) -> dict:
    """dataclass -> dict of its constructor fields (nested dataclasses as dicts)."""
    out = {}
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        out[f.name] = _init_fields(value) if dataclasses.is_dataclass(value) else value
    return out


def configs_to_dict(model: DeepSeekOCR) -> dict:
    return {
        "encoder": _init_fields(model.encoder.config),
        "decoder": _init_fields(model.decoder.config),
        "image_token_id": model.image_token_id,
    }


def configs_from_dict(data: dict) -> tuple[EncoderConfig, DecoderConfig, int]:
    try:
        return EncoderConfig(**data["encoder"]), DecoderConfig(**data["decoder"]), int(data["image_token_id"])
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"malformed model config ({err}); expected encoder, decoder, image_token_id"
        ) from err


def _decoder_release_fields(cfg: DecoderConfig) -> dict:
    moe = cfg.moe
    return {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "first_k_dense_replace": cfg.first_k_dense_replace if moe is not None else cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "kv_lora_rank": None,
        "lm_head": True,
        "max_position_embeddings": cfg.max_position_embeddings,
        "moe_intermediate_size": moe.moe_intermediate_size if moe else 0,
        "n_group": 1,
        "n_routed_experts": moe.n_routed_experts if moe else 0,
        "n_shared_experts": moe.n_shared_experts if moe else 0,
        "num_attention_heads": cfg.num_heads,
        "num_experts_per_tok": moe.num_experts_per_tok if moe else 0,
        "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_heads,
        "q_lora_rank": None,
        "qk_nope_head_dim": 0,
        "qk_rope_head_dim": 0,
        "rm_head": False,
        "topk_group": 1,
        "topk_method": "greedy",
        "use_mla": False,
        "v_head_dim": 0,
        "vocab_size": cfg.vocab_size,
    }


def _decoder_default_fields(cfg: DecoderConfig) -> dict:
    """The fields the release's config.json leaves at DeepseekV2Config's defaults, with our values."""
    moe = cfg.moe if cfg.moe is not None else MoEConfig()  # router fields of a dense decoder: unused
    applied = {
        "moe_layer_freq": cfg.moe_layer_freq,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "norm_topk_prob": moe.norm_topk_prob,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "aux_loss_alpha": moe.aux_loss_alpha,
        "seq_aux": moe.seq_aux,
    }
    assert set(applied) == set(_APPLIED_FIELDS)
    fixed = {
        name: values[0] for name, values in _FIXED_FIELDS.items() if name not in _decoder_release_fields(cfg)
    }
    return {**applied, **fixed}


def release_config(model: DeepSeekOCR, dtype: torch.dtype) -> dict:
    """config.json in the release's layout, sizes from our configs (+ our full configs under `dsocr_train`)."""
    enc, dec = model.encoder.config, model.decoder.config
    dtype_name = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    language = {
        "architectures": ["DeepseekV2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_deepseekv2.DeepseekV2Config",
            "AutoModel": "modeling_deepseek.DeepseekV2Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
        },
        **_decoder_release_fields(dec),
        "torch_dtype": dtype_name,
        **_decoder_default_fields(dec),
    }
    return {
        "_name_or_path": "deepseek-ai/DeepSeek-OCR",
        "candidate_resolutions": [[1024, 1024]],
        "global_view_pos": "head",
        "architectures": ["DeepseekOCRForCausalLM"],
        "auto_map": {
            "AutoConfig": "modeling_deepseekocr.DeepseekOCRConfig",
            "AutoModel": "modeling_deepseekocr.DeepseekOCRForCausalLM",
        },
        "language_config": language,
        "model_type": "deepseek_vl_v2",
        "projector_config": {
            "input_dim": enc.feature_dim,
            "model_type": "mlp_projector",
            "n_embed": enc.n_embed,
            "projector_type": "linear",
        },
        "tile_tag": "2D",
        "torch_dtype": dtype_name,
        "transformers_version": "4.46.3",
        "vision_config": {
            "image_size": enc.sam.img_size,
            "mlp_ratio": 3.7362,
            "model_name": "deeplip_b_l",
            "model_type": "vision",
            "width": {
                "clip-l-14-224": {
                    "heads": enc.clip.heads,
                    "image_size": enc.clip.image_size,
                    "layers": enc.clip.layers,
                    "patch_size": enc.clip.patch_size,
                    "width": enc.clip.width,
                },
                "sam_vit_b": {
                    "downsample_channels": list(enc.sam.compressor_channels),
                    "global_attn_indexes": list(enc.sam.global_attn_indexes),
                    "heads": enc.sam.num_heads,
                    "layers": enc.sam.depth,
                    "width": enc.sam.embed_dim,
                },
            },
        },
        **_decoder_release_fields(dec),
        **_decoder_default_fields(dec),
        EXTRA_KEY: configs_to_dict(model),
    }


def configs_from_release(config: dict, image_token_id: int) -> tuple[EncoderConfig, DecoderConfig, int]:
    """Our configs from a release config.json (the `dsocr_train` entry wins when present)."""
    if EXTRA_KEY in config:
        return configs_from_dict(config[EXTRA_KEY])
    if config.get("model_type") != "deepseek_vl_v2":
        raise ValueError(f"config.json model_type is {config.get('model_type')!r}, expected 'deepseek_vl_v2'")
    lang = config.get("language_config", config)
    if lang.get("use_mla") or lang.get("kv_lora_rank") or lang.get("q_lora_rank"):
        raise ValueError("config.json describes an MLA decoder; DeepSeek-OCR's decoder uses plain MHA")
    if lang.get("num_key_value_heads", lang["num_attention_heads"]) != lang["num_attention_heads"]:
        raise ValueError(
            "grouped-query attention is not supported: num_key_value_heads != num_attention_heads"
        )
    for name, supported in _FIXED_FIELDS.items():
        if name in lang and lang[name] not in supported:
            raise ValueError(
                f"config.json {name}={lang[name]!r} is not supported: the decoder implements "
                f"{name}={supported[0]!r} only"
            )
    applied = {name: lang.get(name, default) for name, default in _APPLIED_FIELDS.items()}
    moe = None
    if lang.get("n_routed_experts"):
        moe = {
            "n_routed_experts": lang["n_routed_experts"],
            "num_experts_per_tok": lang["num_experts_per_tok"],
            "moe_intermediate_size": lang["moe_intermediate_size"],
            "n_shared_experts": lang.get("n_shared_experts") or 0,
            **{
                k: applied[k]
                for k in ("norm_topk_prob", "routed_scaling_factor", "aux_loss_alpha", "seq_aux")
            },
        }
    decoder = DecoderConfig(
        vocab_size=lang["vocab_size"],
        hidden_size=lang["hidden_size"],
        num_layers=lang["num_hidden_layers"],
        num_heads=lang["num_attention_heads"],
        intermediate_size=lang["intermediate_size"],
        first_k_dense_replace=lang.get("first_k_dense_replace", 0),
        moe_layer_freq=applied["moe_layer_freq"],
        moe=moe,
        rope_theta=applied["rope_theta"],
        rms_norm_eps=applied["rms_norm_eps"],
        max_position_embeddings=lang.get("max_position_embeddings", 8192),
        bos_token_id=lang.get("bos_token_id", 0),
        eos_token_id=lang.get("eos_token_id", 1),
    )
    vision = config["vision_config"]["width"]
    sam, clip = vision["sam_vit_b"], vision["clip-l-14-224"]
    encoder = encoder_config(
        "full",
        sam={
            "embed_dim": sam["width"],
            "depth": sam["layers"],
            "num_heads": sam["heads"],
            "global_attn_indexes": tuple(sam["global_attn_indexes"]),
            "compressor_channels": tuple(sam["downsample_channels"]),
            "img_size": config["vision_config"].get("image_size", 1024),
        },
        clip={k: clip[k] for k in ("heads", "layers", "width", "image_size", "patch_size")},
        n_embed=config["projector_config"]["n_embed"],
    )
    return encoder, decoder, image_token_id


# ---------------------------------------------------------------- state dicts


def release_state_dict(model: DeepSeekOCR) -> dict[str, torch.Tensor]:
    """All model tensors under the release's key names (works on the meta device)."""
    enc = encoder_state_to_release(model.encoder.state_dict(), config=model.encoder.config)
    dec = decoder_state_to_release(model.decoder.state_dict(), config=model.decoder.config)
    overlap = set(enc) & set(dec)
    assert not overlap, f"encoder and decoder release keys overlap: {sorted(overlap)[:5]}"
    return {**enc, **dec}


def model_state_from_release(state: dict[str, torch.Tensor], model: DeepSeekOCR) -> dict[str, torch.Tensor]:
    """Release-keyed tensors -> `DeepSeekOCR.state_dict()` keys (strict on both halves)."""
    enc_cfg, dec_cfg = model.encoder.config, model.decoder.config
    enc_keys = set(encoder_state_to_release_keys(model))
    enc = encoder_state_from_release({k: v for k, v in state.items() if k in enc_keys}, config=enc_cfg)
    unknown = [k for k in state if k not in enc_keys]
    dec = decoder_state_from_release({k: state[k] for k in unknown}, config=dec_cfg)
    return {**{f"encoder.{k}": v for k, v in enc.items()}, **{f"decoder.{k}": v for k, v in dec.items()}}


def encoder_state_to_release_keys(model: DeepSeekOCR) -> list[str]:
    from deepencoder.adapters import release_key_table

    return list(release_key_table(model.encoder.config))


def _materialize(model: nn.Module, state: dict[str, torch.Tensor], device: torch.device | str) -> None:
    """Load `state` into a meta-device model without allocating twice; rebuild non-persistent buffers."""
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():
        stale = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not stale:
            continue
        for name in stale:
            buffer = module._buffers[name]
            module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="cpu")
        if not hasattr(module, "init_weights"):
            raise TypeError(
                f"{type(module).__name__} has non-persistent buffers {stale} but no init_weights()"
            )
        module.init_weights()
    model.to(device)


def _read_safetensors(files: list[Path], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key in state:
                        raise ValueError(f"tensor {key} appears in more than one shard ({file})")
                    tensor = handle.get_tensor(key)
                    state[key] = tensor.to(dtype) if dtype is not None else tensor
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"{file}: unreadable weight file ({err}); it is truncated or corrupt: copy or export it again"
            ) from err
    return state


def read_json(file: Path) -> dict:
    """A JSON config file; ValueError naming the file and the place of a syntax error."""
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{file}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: unreadable ({err})") from err


def _configs_from_file(file: Path, parse, *args):
    """`parse(read_json(file), *args)`; a missing or mistyped field is a ValueError naming the file."""
    try:
        return parse(read_json(file), *args)
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{file}: missing or malformed field {err}") from err


def _load_tokenizer(path: Path) -> OCRTokenizer:
    try:
        return load_tokenizer(path)
    except ValueError:
        raise
    except Exception as err:  # the tokenizers library raises plain Exceptions for corrupt files
        raise ValueError(f"{path / 'tokenizer.json'}: unreadable tokenizer ({err})") from err


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index)["weight_map"].values()))
        return [path / n for n in names]
    single = path / RELEASE_WEIGHTS
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors weights in {path}")
    return files


def _build_meta(encoder: EncoderConfig, decoder: DecoderConfig, image_token_id: int) -> DeepSeekOCR:
    with torch.device("meta"):
        return DeepSeekOCR(DeepEncoder(encoder), DecoderModel(decoder), image_token_id)


# ---------------------------------------------------------------- release directory


def _copy_tokenizer(tokenizer: str | Path | OCRTokenizer, out: Path) -> OCRTokenizer:
    if isinstance(tokenizer, OCRTokenizer):
        tokenizer.save(out)
        return tokenizer
    source = Path(tokenizer)
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if "tokenizer.json" not in copied:
        raise ValueError(f"no tokenizer.json in {source}")
    for name in copied:
        shutil.copyfile(source / name, out / name)
    for extra in (*source.glob("*.py"), source / "processor_config.json"):  # release remote code, if given
        if extra.is_file() and not (out / extra.name).exists():
            shutil.copyfile(extra, out / extra.name)
    return load_tokenizer(out)


def processor_config(tokenizer: OCRTokenizer) -> dict:
    """processor_config.json of the release with our tokenizer's pad token."""
    return {
        "add_special_token": False,
        "candidate_resolutions": [[1024, 1024]],
        "downsample_ratio": 4,
        "ignore_id": -100,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "image_token": IMAGE_TOKEN,
        "mask_prompt": False,
        "normalize": True,
        "pad_token": tokenizer.pad_token,
        "patch_size": 16,
        "processor_class": "DeepseekVLV2Processor",
        "sft_format": "deepseek",
    }


def copy_modeling_files(release_dir: str | Path, out: Path) -> list[str]:
    """Copy the release's remote-code modules (`*.py` of a released checkpoint directory) into `out`."""
    source = Path(release_dir)
    files = sorted(source.glob("*.py"))
    if not files:
        raise ValueError(f"{source} holds no modeling files (*.py): name the released DeepSeek-OCR directory")
    for f in files:
        shutil.copyfile(f, out / f.name)
    return [f.name for f in files]


def drop_missing_auto_map(config: dict, folder: Path) -> dict:
    """config.json without the `auto_map` entries whose module file `folder` lacks: transformers'
    trust_remote_code loading would fail on them, while our loader never reads them."""
    for section in (config, config.get("language_config", {})):
        auto_map = section.get("auto_map")
        if auto_map and not all((folder / f"{ref.split('.')[0]}.py").is_file() for ref in auto_map.values()):
            del section["auto_map"]
    return config


def export_release(
    model: DeepSeekOCR,
    tokenizer: str | Path | OCRTokenizer,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    modeling_from: str | Path | None = None,
) -> Path:
    """Write config.json + model.safetensors (release keys) + tokenizer files into `out_dir`.

    config.json names the release's modeling files in `auto_map` only when the folder holds them:
    `modeling_from` (a released checkpoint directory) copies them in, and so does a tokenizer
    given as such a directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if modeling_from is not None:
        copy_modeling_files(modeling_from, out)
    tok = _copy_tokenizer(tokenizer, out)
    if tok.image_id != model.image_token_id:
        raise ValueError(
            f"tokenizer <image> id {tok.image_id} != model image_token_id {model.image_token_id}"
        )
    if tok.vocab_size > model.decoder.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tok.vocab_size} ids, the model only {model.decoder.config.vocab_size}"
        )
    state = release_state_dict(model)
    dtype = dtype or next(model.parameters()).dtype
    tensors = {k: v.detach().to(device="cpu", dtype=dtype).contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(out / RELEASE_WEIGHTS), metadata={"format": "pt"})
    config = drop_missing_auto_map(release_config(model, dtype), out)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if not (out / "processor_config.json").exists():
        (out / "processor_config.json").write_text(json.dumps(processor_config(tok), indent=2) + "\n")
    return out


def import_release(
    path: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> tuple[DeepSeekOCR, OCRTokenizer]:
    """Load a local DeepSeek-OCR release directory (or an `export_release` output)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"no config.json in {path} (expected a DeepSeek-OCR checkpoint directory)")
    tokenizer = _load_tokenizer(path)
    encoder, decoder, image_id = _configs_from_file(config_file, configs_from_release, tokenizer.image_id)
    if image_id != tokenizer.image_id:
        raise ValueError(f"config image_token_id {image_id} != tokenizer <image> id {tokenizer.image_id}")
    model = _build_meta(encoder, decoder, image_id)
    state = model_state_from_release(_read_safetensors(_weight_files(path), dtype), model)
    _materialize(model, state, device)
    return model.eval(), tokenizer


# ---------------------------------------------------------------- our directory


def save_checkpoint(model: DeepSeekOCR, tokenizer: str | Path | OCRTokenizer, out_dir: str | Path) -> Path:
    """Our layout: model.safetensors (DeepSeekOCR keys) + dsocr_config.json + tokenizer files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer(tokenizer, out)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / RELEASE_WEIGHTS), metadata={"format": "pt", "layout": "dsocr_train"})
    (out / OUR_CONFIG).write_text(json.dumps(configs_to_dict(model), indent=2) + "\n")
    return out


def load_checkpoint(
    path: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> tuple[DeepSeekOCR, OCRTokenizer]:
    """Inverse of `save_checkpoint` (strict)."""
    path = Path(path)
    if not (path / OUR_CONFIG).is_file():
        raise ValueError(f"no {OUR_CONFIG} in {path} (not a dsocr checkpoint; a release directory?)")
    encoder, decoder, image_id = _configs_from_file(path / OUR_CONFIG, configs_from_dict)
    tokenizer = _load_tokenizer(path)
    model = _build_meta(encoder, decoder, image_id)
    _materialize(model, _read_safetensors(_weight_files(path), dtype), device)
    return model.eval(), tokenizer


def load_any(path: str | Path, **kwargs) -> tuple[DeepSeekOCR, OCRTokenizer]:
    """Our checkpoint directory or a release directory, whichever `path` is."""
    return (
        load_checkpoint(path, **kwargs)
        if (Path(path) / OUR_CONFIG).is_file()
        else import_release(path, **kwargs)
    )
