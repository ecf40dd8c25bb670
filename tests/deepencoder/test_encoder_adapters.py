"""Weight adapters: release round trip (memory and safetensors), strict key/shape checks, upstream
SAM / CLIP loading from local files (debug-sized stand-ins built here; nothing is downloaded)."""

from __future__ import annotations

import dataclasses
import zipfile

import pytest
import torch

from deepencoder import ENCODER_PRESETS, DeepEncoder
from deepencoder.adapters import (
    clip_state_from_hf,
    encoder_keys,
    encoder_state_from_release,
    encoder_state_to_release,
    hf_clip_key_table,
    load_hf_clip,
    load_into,
    load_open_clip,
    load_release_encoder,
    load_segment_anything_sam,
    load_state_file,
    open_clip_key_table,
    release_key_table,
    sam_key_table,
    save_release_encoder,
    save_state_file,
)

pytestmark = pytest.mark.unit

DEBUG = ENCODER_PRESETS["debug"]


@pytest.fixture(scope="module")
def model() -> DeepEncoder:
    torch.manual_seed(0)
    m = DeepEncoder(DEBUG)
    with torch.no_grad():  # every tensor distinct and non-trivial
        for p in m.parameters():
            p.normal_()
    return m


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_release_key_layout_matches_the_spec():
    table = release_key_table(ENCODER_PRESETS["full"])
    assert len(table) == len(encoder_keys(ENCODER_PRESETS["full"]))
    for key in [
        "model.sam_model.patch_embed.proj.weight",
        "model.sam_model.pos_embed",
        "model.sam_model.blocks.11.attn.rel_pos_w",
        "model.sam_model.blocks.0.mlp.lin2.bias",
        "model.sam_model.neck.3.bias",
        "model.sam_model.net_3.weight",
        "model.vision_model.embeddings.position_embedding.weight",
        "model.vision_model.pre_layrnorm.weight",
        "model.vision_model.transformer.layers.23.self_attn.qkv_proj.weight",
        "model.vision_model.transformer.layers.0.mlp.fc2.bias",
        "model.projector.layers.weight",
        "model.image_newline",
        "model.view_seperator",
    ]:
        assert key in table
    assert not any("position_ids" in k for k in table)


def test_release_round_trip_in_memory(model):
    ours = model.state_dict()
    release = encoder_state_to_release(ours, config=DEBUG)
    assert all(k.startswith("model.") for k in release)
    assert_same_state(encoder_state_from_release(release, config=DEBUG), ours)


def test_release_round_trip_through_safetensors_in_bf16(model, tmp_path):
    ours = {k: v.bfloat16() for k, v in model.state_dict().items()}
    path = tmp_path / "encoder.safetensors"
    save_release_encoder(path, ours, config=DEBUG)
    assert_same_state(load_release_encoder(path, config=DEBUG), ours)
    fresh = DeepEncoder(DEBUG).to(torch.bfloat16)
    load_into(fresh, load_release_encoder(path, config=DEBUG))
    assert_same_state(fresh.state_dict(), ours)


def test_release_import_skips_decoder_keys_only(model):
    release = encoder_state_to_release(model.state_dict(), config=DEBUG)
    full = release | {
        "model.embed_tokens.weight": torch.zeros(3, 2),
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2),
        "model.norm.weight": torch.zeros(2),
        "lm_head.weight": torch.zeros(3, 2),
    }
    assert_same_state(encoder_state_from_release(full, config=DEBUG), model.state_dict())
    with pytest.raises(ValueError, match=r"unexpected 1 keys: model\.sam_model\.extra"):
        encoder_state_from_release(full | {"model.sam_model.extra": torch.zeros(1)}, config=DEBUG)


def test_release_import_is_strict(model):
    release = encoder_state_to_release(model.state_dict(), config=DEBUG)
    wrong_prefix = {"module." + k[len("model.") :]: v for k, v in release.items()}
    with pytest.raises(ValueError, match="missing .* keys.*unexpected.*wrong key prefix"):
        encoder_state_from_release(wrong_prefix, config=DEBUG)
    missing = dict(release)
    del missing["model.view_seperator"]
    with pytest.raises(ValueError, match=r"missing 1 keys: model\.view_seperator"):
        encoder_state_from_release(missing, config=DEBUG)
    reshaped = release | {"model.image_newline": torch.zeros(65)}
    with pytest.raises(ValueError, match=r"shape mismatch for 1 tensors: image_newline \(65,\) != \(64,\)"):
        encoder_state_from_release(reshaped, config=DEBUG)
    with pytest.raises(ValueError, match="missing"):  # a debug state is not the full release
        encoder_state_from_release(release)
    with pytest.raises(ValueError, match="missing 1 keys"):
        encoder_state_to_release(
            {k: v for k, v in model.state_dict().items() if k != "image_newline"}, config=DEBUG
        )


def test_load_into_is_strict(model):
    fresh = DeepEncoder(DEBUG)
    sam_only = {k: v for k, v in model.state_dict().items() if k.startswith("sam_model.")}
    with pytest.raises(ValueError, match="missing"):
        load_into(fresh, sam_only)
    load_into(
        fresh, sam_only, allow_missing=("vision_model.", "projector.", "image_newline", "view_seperator")
    )
    assert torch.equal(fresh.sam_model.pos_embed, model.sam_model.pos_embed)
    with pytest.raises(ValueError, match="unexpected 1 keys"):
        load_into(
            fresh,
            sam_only | {"bogus": torch.zeros(1)},
            allow_missing=("vision_model.", "projector.", "i", "v"),
        )


def test_segment_anything_file_loads_trunk_and_neck(model, tmp_path):
    ours = model.state_dict()
    table = sam_key_table(DEBUG.sam)
    checkpoint = {src: ours[dst].clone() for src, dst in table.items()}
    checkpoint["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.zeros(2, 128)
    checkpoint["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    path = tmp_path / "sam_vit_b.pth"
    torch.save(checkpoint, path)
    state = load_segment_anything_sam(path, DEBUG.sam)
    assert set(state) == {k for k in ours if k.startswith("sam_model.") and ".net_" not in k}
    fresh = DeepEncoder(DEBUG)
    compressor_before = fresh.sam_model.net_2.weight.clone()
    load_into(
        fresh, state, allow_missing=("sam_model.net_", "vision_model.", "projector.", "image_", "view_")
    )
    assert torch.equal(fresh.sam_model.blocks[1].attn.rel_pos_h, model.sam_model.blocks[1].attn.rel_pos_h)
    assert torch.equal(fresh.sam_model.net_2.weight, compressor_before)  # compressor stays as initialised
    bad = {k.replace("image_encoder.", "encoder."): v for k, v in checkpoint.items()}
    torch.save(bad, path)
    with pytest.raises(ValueError, match="wrong key prefix"):
        load_segment_anything_sam(path, DEBUG.sam)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_open_clip_file_round_trip_and_torchscript(model, tmp_path):
    ours = model.state_dict()
    table = open_clip_key_table(DEBUG.clip)
    checkpoint = {src: ours[dst].clone() for src, dst in table.items()}
    extras = {
        "visual.ln_post.weight": torch.ones(32),
        "visual.proj": torch.zeros(32, 8),
        "logit_scale": torch.ones(()),
    }
    extras |= {
        "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3, 3),
        "token_embedding.weight": torch.zeros(5, 8),
    }
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({"state_dict": checkpoint | extras}, path)
    state = load_open_clip(path, DEBUG.clip)
    assert_same_state(state, {k: v for k, v in ours.items() if k.startswith("vision_model.")})

    class Holder(torch.nn.Module):  # OpenAI ships CLIP as a TorchScript archive
        def __init__(self):
            super().__init__()
            for i, v in enumerate(checkpoint.values()):
                self.register_buffer(f"t{i}", v)

        def forward(self, x):
            return x

    scripted = torch.jit.script(Holder())
    sd = {k: v for k, v in scripted.state_dict().items()}
    assert len(sd) == len(checkpoint)
    jit_path = tmp_path / "ViT-L-14.pt"
    scripted.save(str(jit_path))
    assert zipfile.is_zipfile(jit_path)
    assert set(load_state_file(jit_path)) == {f"t{i}" for i in range(len(checkpoint))}


def test_hf_clip_fuses_qkv_in_q_k_v_order(model, tmp_path):
    ours = model.state_dict()
    cfg = DEBUG.clip
    checkpoint = {}
    for src, dst in hf_clip_key_table(cfg).items():
        if isinstance(dst, tuple):
            key, slot = dst
            checkpoint[src] = ours[key].chunk(3, dim=0)[slot].clone()
        else:
            checkpoint[src] = ours[dst].clone()
    checkpoint["vision_model.post_layernorm.weight"] = torch.ones(cfg.width)
    checkpoint["vision_model.embeddings.position_ids"] = torch.arange(cfg.num_positions)[None]
    checkpoint["text_model.embeddings.token_embedding.weight"] = torch.zeros(7, 4)
    path = tmp_path / "model.safetensors"
    save_state_file(path, checkpoint)
    assert_same_state(
        load_hf_clip(path, cfg), {k: v for k, v in ours.items() if k.startswith("vision_model.")}
    )
    q = checkpoint["vision_model.encoder.layers.1.self_attn.q_proj.weight"]
    fused = clip_state_from_hf(checkpoint, cfg)["vision_model.transformer.layers.1.self_attn.qkv_proj.weight"]
    assert torch.equal(fused[: cfg.width], q)
    short = dataclasses.replace(cfg, layers=1)
    with pytest.raises(ValueError, match=r"unexpected .*encoder\.layers\.1\."):
        clip_state_from_hf(checkpoint, short)


def test_missing_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_state_file(tmp_path / "nope.safetensors")


def test_full_release_table_round_trips_on_meta_tensors():
    cfg = ENCODER_PRESETS["full"]
    with torch.device("meta"):
        ours = DeepEncoder(cfg).state_dict()
    release = encoder_state_to_release(ours)
    assert len(release) == len(ours) == 12 * 14 + 3 + 6 + 2 + 5 + 24 * 12 + 4  # 476
    back = encoder_state_from_release(release)
    assert back.keys() == ours.keys() and all(back[k] is ours[k] for k in ours)
    assert release["model.sam_model.blocks.2.attn.rel_pos_h"].shape == (127, 64)  # global block
    assert release["model.sam_model.blocks.3.attn.rel_pos_h"].shape == (27, 64)  # window 14
    assert release["model.vision_model.embeddings.position_embedding.weight"].shape == (257, 1024)
    assert release["model.projector.layers.weight"].shape == (1280, 2048)
