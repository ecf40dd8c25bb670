"""Checkpoint I/O: release export -> import reproduces every tensor and the logits (debug size); the
full preset's export has exactly the release's key table and config.json (meta device, no allocation)."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pipeline.checkpoint_io import (
    _APPLIED_FIELDS,
    _FIXED_FIELDS,
    EXTRA_KEY,
    configs_from_release,
    export_release,
    import_release,
    load_any,
    load_checkpoint,
    release_config,
    release_state_dict,
    save_checkpoint,
)
from pipeline.data.packing import collate_unpacked
from pipeline.model import build_model
from pipeline.processing import process_image
from pipeline.prompts import build_example
from pipeline.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.unit

# config.json of deepseek-ai/DeepSeek-OCR (../shared/spec/release_config.json), less the duplicated
# top-level decoder fields, which are checked against language_config below.
RELEASE_LANGUAGE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_deepseekv2.DeepseekV2Config",
        "AutoModel": "modeling_deepseek.DeepseekV2Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
    },
    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1, "hidden_size": 1280,
    "intermediate_size": 6848, "kv_lora_rank": None, "lm_head": True, "max_position_embeddings": 8192,
    "moe_intermediate_size": 896, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "num_attention_heads": 10, "num_experts_per_tok": 6, "num_hidden_layers": 12, "num_key_value_heads": 10,
    "q_lora_rank": None, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "rm_head": False, "topk_group": 1,
    "topk_method": "greedy", "torch_dtype": "bfloat16", "use_mla": False, "v_head_dim": 0, "vocab_size": 129280,
}  # fmt: skip
RELEASE_CONFIG = {
    "_name_or_path": "deepseek-ai/DeepSeek-OCR",
    "candidate_resolutions": [[1024, 1024]],
    "global_view_pos": "head",
    "architectures": ["DeepseekOCRForCausalLM"],
    "auto_map": {
        "AutoConfig": "modeling_deepseekocr.DeepseekOCRConfig",
        "AutoModel": "modeling_deepseekocr.DeepseekOCRForCausalLM",
    },
    "language_config": RELEASE_LANGUAGE,
    "model_type": "deepseek_vl_v2",
    "projector_config": {"input_dim": 2048, "model_type": "mlp_projector", "n_embed": 1280, "projector_type": "linear"},
    "tile_tag": "2D",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "vision_config": {
        "image_size": 1024, "mlp_ratio": 3.7362, "model_name": "deeplip_b_l", "model_type": "vision",
        "width": {
            "clip-l-14-224": {"heads": 16, "image_size": 224, "layers": 24, "patch_size": 14, "width": 1024},
            "sam_vit_b": {
                "downsample_channels": [512, 1024], "global_attn_indexes": [2, 5, 8, 11],
                "heads": 12, "layers": 12, "width": 768,
            },
        },
    },
    **{k: v for k, v in RELEASE_LANGUAGE.items() if k not in ("architectures", "auto_map", "torch_dtype")},
}  # fmt: skip


def spec_key_table():
    """The released checkpoint's keys, written out from architecture.md section 6."""
    keys = [
        "model.sam_model.patch_embed.proj.weight",
        "model.sam_model.patch_embed.proj.bias",
        "model.sam_model.pos_embed",
    ]
    for i in range(12):
        b = f"model.sam_model.blocks.{i}."
        keys += [
            b + f"{n}.{p}"
            for n in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")
            for p in ("weight", "bias")
        ]
        keys += [b + "attn.rel_pos_h", b + "attn.rel_pos_w"]
    keys += ["model.sam_model.neck.0.weight", "model.sam_model.neck.2.weight"]
    keys += [f"model.sam_model.neck.{i}.{p}" for i in (1, 3) for p in ("weight", "bias")]
    keys += ["model.sam_model.net_2.weight", "model.sam_model.net_3.weight"]
    v = "model.vision_model."
    keys += [
        v + "embeddings.class_embedding",
        v + "embeddings.patch_embedding.weight",
        v + "embeddings.position_embedding.weight",
    ]
    keys += [v + "pre_layrnorm.weight", v + "pre_layrnorm.bias"]
    for i in range(24):
        b = f"{v}transformer.layers.{i}."
        names = (
            "layer_norm1",
            "layer_norm2",
            "self_attn.qkv_proj",
            "self_attn.out_proj",
            "mlp.fc1",
            "mlp.fc2",
        )
        keys += [b + f"{n}.{p}" for n in names for p in ("weight", "bias")]
    keys += [
        "model.projector.layers.weight",
        "model.projector.layers.bias",
        "model.image_newline",
        "model.view_seperator",
    ]
    keys += ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(12):
        b = f"model.layers.{i}."
        keys += [b + "input_layernorm.weight", b + "post_attention_layernorm.weight"]
        keys += [b + f"self_attn.{p}_proj.weight" for p in "qkvo"]
        if i == 0:
            keys += [b + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        else:
            keys += [b + "mlp.gate.weight"]
            keys += [
                b + f"mlp.experts.{e}.{p}_proj.weight" for e in range(64) for p in ("gate", "up", "down")
            ]
            keys += [b + f"mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")]
    return keys


@pytest.fixture(scope="module")
def full_meta():
    with torch.device("meta"):
        return build_model("full", "full", 129280, image_token_id=128815)


def test_full_preset_exports_the_release_key_table(full_meta):
    state = release_state_dict(full_meta)
    expected = spec_key_table()
    assert len(expected) == len(set(expected)) == 2710
    assert set(state) == set(expected)
    assert all(t.is_meta for t in state.values())
    assert sum(t.numel() for t in state.values()) == 3_336_106_240
    assert state["model.layers.5.mlp.experts.63.gate_proj.weight"].shape == (896, 1280)
    assert state["model.layers.5.mlp.experts.63.down_proj.weight"].shape == (1280, 896)


def test_full_preset_config_json_is_the_releases(full_meta):
    config = release_config(full_meta, torch.bfloat16)
    assert config.pop(EXTRA_KEY)["image_token_id"] == 128815
    # the published fields and order, then the DeepseekV2Config defaults the published file omits
    written_defaults = {**_APPLIED_FIELDS, **{k: v[0] for k, v in _FIXED_FIELDS.items()}}
    added = {k: v for k, v in written_defaults.items() if k not in RELEASE_CONFIG}
    assert set(added) == set(written_defaults) - {"lm_head", "rm_head", "topk_method"}
    assert {k: config.pop(k) for k in added} == added
    assert {k: config["language_config"].pop(k) for k in added} == added
    assert config == RELEASE_CONFIG
    assert list(config) == list(RELEASE_CONFIG)  # same field order as the published file
    # reading the release's own config.json (no dsocr_train entry) gives back the full presets
    encoder, decoder, image_id = configs_from_release(RELEASE_CONFIG, 128815)
    assert encoder == full_meta.encoder.config and image_id == 128815
    assert decoder == full_meta.decoder.config


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer("abcdefghijklmnopqrstuvwxyz .\n")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = build_model("debug", "debug", tok.vocab_size + 5, image_token_id=tok.image_id)
    with torch.no_grad():  # make every tensor distinct from a fresh init
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return m.eval()


def logits_of(model, tok):
    images = [[process_image(Image.new("RGB", (130, 70), (9, 99, 199)), "debug-gundam")], []]
    exs = [build_example(tok, "<image>\nFree OCR.", "ab", images[0]), build_example(tok, "", "text", [])]
    batch = collate_unpacked(exs, tok.pad_id, tok.image_id)
    with torch.no_grad():
        return model.decoder(inputs_embeds=model.embed(batch)).logits


def test_export_import_round_trip(model, tok, tmp_path):
    out = export_release(model, tok, tmp_path / "release")
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
    }
    stored = load_file(str(out / "model.safetensors"))
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in stored and "lm_head.weight" in stored
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == config["language_config"]["vocab_size"] == tok.vocab_size + 5
    # the release's fields (less auto_map: the folder holds none of the modules it would name) and
    # every decoder field the config translation applies or fixes
    assert set(config) == (set(RELEASE_CONFIG) - {"auto_map"}) | {EXTRA_KEY} | set(_APPLIED_FIELDS) | set(_FIXED_FIELDS)

    loaded, loaded_tok = import_release(out)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert torch.equal(loaded.decoder.rotary.inv_freq, model.decoder.rotary.inv_freq)
    assert loaded_tok.encode("abc .") == tok.encode("abc .") and loaded.image_token_id == tok.image_id
    assert torch.equal(logits_of(model, tok), logits_of(loaded, loaded_tok))

    bf16, _ = import_release(out, dtype=torch.bfloat16)
    assert bf16.decoder.embed_tokens.weight.dtype == torch.bfloat16


def test_export_in_bf16_and_reexport_from_directory(model, tok, tmp_path):
    first = export_release(model, tok, tmp_path / "a", dtype=torch.bfloat16)
    loaded, _ = import_release(first)
    assert loaded.encoder.image_newline.dtype == torch.bfloat16
    second = export_release(loaded, first, tmp_path / "b")  # tokenizer files copied from a directory
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (second / "tokenizer_config.json").read_text() == (first / "tokenizer_config.json").read_text()


def test_strict_import_reports_missing_and_unexpected(model, tok, tmp_path):
    out = export_release(model, tok, tmp_path / "r")
    state = load_file(str(out / "model.safetensors"))
    del state["model.layers.2.mlp.experts.0.gate_proj.weight"]
    state["model.extra.weight"] = torch.zeros(1)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        import_release(out)
    with pytest.raises(ValueError, match="config.json"):
        import_release(tmp_path)


def test_our_checkpoint_round_trip(model, tok, tmp_path):
    save_checkpoint(model, tok, tmp_path / "ours")
    loaded, _ = load_checkpoint(tmp_path / "ours")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    again, _ = load_any(tmp_path / "ours")
    assert torch.equal(logits_of(model, tok), logits_of(again, tok))


def test_release_defaults_are_applied_from_config_json():
    edited = json.loads(json.dumps(RELEASE_CONFIG))
    edited["language_config"].update(
        moe_layer_freq=2, rope_theta=50000.0, rms_norm_eps=1e-5, norm_topk_prob=True,
        routed_scaling_factor=2.5, aux_loss_alpha=0.0, seq_aux=False,
        topk_method="gready", scoring_func="softmax", hidden_act="silu", rope_scaling=None,
    )  # fmt: skip
    _, decoder, _ = configs_from_release(edited, 128815)
    assert (decoder.moe_layer_freq, decoder.rope_theta, decoder.rms_norm_eps) == (2, 50000.0, 1e-5)
    moe = decoder.moe
    assert (moe.norm_topk_prob, moe.routed_scaling_factor, moe.aux_loss_alpha, moe.seq_aux) == (
        True,
        2.5,
        0.0,
        False,
    )
    assert [decoder.is_moe_layer(i) for i in range(4)] == [False, False, True, False]


@pytest.mark.parametrize(
    "field, value",
    [("scoring_func", "sigmoid"), ("topk_method", "group_limited_greedy"), ("hidden_act", "gelu"),
     ("attention_bias", True), ("rope_scaling", {"type": "yarn", "factor": 40}), ("tie_word_embeddings", True),
     ("lm_head", False)],
)  # fmt: skip
def test_unsupported_release_fields_are_refused_by_name(field, value):
    edited = json.loads(json.dumps(RELEASE_CONFIG))
    edited["language_config"][field] = value
    with pytest.raises(ValueError, match=f"{field}="):
        configs_from_release(edited, 128815)


def test_exported_defaults_round_trip_without_the_extra_entry():
    from decoder import MoEConfig

    moe = MoEConfig(norm_topk_prob=True, routed_scaling_factor=1.5, aux_loss_alpha=0.01, seq_aux=False)
    with torch.device("meta"):
        model = build_model("full", "full", 129280, image_token_id=128815, rope_theta=20000.0,
                            rms_norm_eps=1e-5, moe_layer_freq=2, moe=moe)  # fmt: skip
    config = release_config(model, torch.bfloat16)
    del config[EXTRA_KEY]  # read the release fields alone, as from a release directory
    assert config["language_config"]["rope_theta"] == config["rope_theta"] == 20000.0
    assert config["scoring_func"] == "softmax" and config["hidden_act"] == "silu"
    _, decoder, _ = configs_from_release(config, 128815)
    assert decoder == model.decoder.config
