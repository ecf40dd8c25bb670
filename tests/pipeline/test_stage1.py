"""Stage 1 (pipeline.stage1): strict SAM / CLIP initialisation from upstream-layout files made by
the upstream libraries themselves (segment-anything, open_clip, transformers), part freezing,
and the stage-1 -> stage-2 hand-over (export in the released layout, `model.encoder_init`)."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model import build_model
from pipeline.stage1 import (
    EXPORT_FORMAT,
    MODEL_PARTS,
    apply_model_options,
    encoder_state_for_model,
    export_encoder,
    freeze_parts,
    load_clip_init,
    load_encoder_init,
    load_sam_init,
    trainable_by_part,
    validate_model_options,
)
from pipeline.stage1.__main__ import main as stage1_cli

pytestmark = pytest.mark.unit

VOCAB, IMAGE_ID = 96, 5


def stage1_model(seed: int = 0):
    """Debug DeepEncoder + a dense debug LM of width 64 (the compact LM stand-in)."""
    torch.manual_seed(seed)
    return build_model("debug", "debug", VOCAB, image_token_id=IMAGE_ID, moe=None, first_k_dense_replace=0)


def stage2_model(seed: int = 1):
    """Debug DeepEncoder + the MoE debug decoder of width 128 (a wider LM than stage 1's)."""
    torch.manual_seed(seed)
    return build_model("debug", "debug", VOCAB, image_token_id=IMAGE_ID, hidden_size=128)


def randomize(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


def encoder_params(model, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.encoder.state_dict().items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- parts / freezing


def test_parts_cover_the_model_and_freeze_exactly_the_named_ones():
    model = stage1_model()
    counts = trainable_by_part(model)
    assert list(counts) == list(MODEL_PARTS)
    assert sum(n for _, n in counts.values()) == sum(p.numel() for p in model.parameters())
    unused = model.encoder.vision_model.embeddings.patch_embedding.weight  # CLIP's pixel conv: never used
    assert not unused.requires_grad and counts["clip"][1] - counts["clip"][0] == unused.numel()
    assert all(t == n > 0 for part, (t, n) in counts.items() if part != "clip")  # stage 1: everything trains
    frozen = freeze_parts(model, ["compressor", "projector"])
    assert (
        frozen["compressor"]
        == model.encoder.sam_model.net_2.weight.numel() + model.encoder.sam_model.net_3.weight.numel()
    )
    assert (
        not model.encoder.image_newline.requires_grad
        and not model.encoder.projector.layers.bias.requires_grad
    )
    assert model.encoder.sam_model.blocks[0].attn.qkv.weight.requires_grad
    counts = trainable_by_part(model)
    assert counts["compressor"][0] == counts["projector"][0] == 0 and counts["sam"][0] == counts["sam"][1]
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['vit'\]"):
        freeze_parts(model, ["vit"])


def test_frozen_sam_trunk_gets_no_gradient_while_the_compressor_trains():
    model = stage1_model()
    freeze_parts(model, ["sam"])
    pixels = torch.randn(2, 3, 128, 128)
    model.encoder(pixels).square().mean().backward()
    assert model.encoder.sam_model.blocks[0].attn.qkv.weight.grad is None
    assert model.encoder.sam_model.net_2.weight.grad.abs().sum() > 0
    assert model.encoder.vision_model.pre_layrnorm.weight.grad is not None


# ----------------------------------------------------------------------------- upstream SAM / CLIP


def segment_anything_checkpoint(path, config, *, prefix="image_encoder.", seed=3):
    """A sam_vit_b-layout file from segment-anything's own ImageEncoderViT at debug size."""
    from segment_anything.modeling import ImageEncoderViT

    ref = ImageEncoderViT(
        img_size=config.img_size, patch_size=16, embed_dim=config.embed_dim, depth=config.depth,
        num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, out_chans=config.out_chans, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU, use_abs_pos=True, use_rel_pos=True,
        window_size=config.window_size, global_attn_indexes=config.global_attn_indexes,
    )  # fmt: skip
    randomize(ref, seed)
    state = {prefix + k: v for k, v in ref.state_dict().items()}
    state["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 8)  # parts SAM-for-OCR drops
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 8)
    torch.save(state, path)
    return ref.state_dict()


def test_sam_init_loads_trunk_and_neck_strictly(tmp_path):
    model = stage1_model()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    ref = segment_anything_checkpoint(tmp_path / "sam_vit_b_01ec64.pth", model.encoder.config.sam)
    assert load_sam_init(model.encoder, tmp_path) == ["sam"]  # a directory holding the file works too
    sam = model.encoder.sam_model
    assert torch.equal(sam.blocks[1].attn.rel_pos_h, ref["blocks.1.attn.rel_pos_h"])
    assert torch.equal(sam.patch_embed.proj.weight, ref["patch_embed.proj.weight"])
    assert torch.equal(sam.neck[3].bias, ref["neck.3.bias"])
    after = model.encoder.state_dict()
    for key in before:  # compressor, CLIP, projector: untouched
        if not key.startswith("sam_model.") or key.startswith("sam_model.net_"):
            assert torch.equal(after[key], before[key]), key


def test_sam_init_with_a_wrong_prefix_or_a_missing_key_fails_listing_them(tmp_path):
    model = stage1_model()
    cfg = model.encoder.config.sam
    segment_anything_checkpoint(tmp_path / "bad.pth", cfg, prefix="encoder.")
    with pytest.raises(
        ValueError, match=r"missing \d+ keys: image_encoder\.blocks\.0\..*unexpected .*encoder\.blocks"
    ):
        load_sam_init(model.encoder, tmp_path / "bad.pth")
    segment_anything_checkpoint(tmp_path / "short.pth", cfg)
    state = torch.load(tmp_path / "short.pth")
    del state["image_encoder.blocks.2.mlp.lin1.bias"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"missing 1 keys: image_encoder\.blocks\.2\.mlp\.lin1\.bias"):
        load_sam_init(model.encoder, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="not found"):
        load_sam_init(model.encoder, tmp_path / "nope.pth")


def test_clip_init_reads_open_clip_and_transformers_files(tmp_path):
    from open_clip.transformer import QuickGELU, VisionTransformer
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = stage1_model()
    cfg = model.encoder.config.clip
    ref = randomize(VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width,
                                      layers=cfg.layers, heads=cfg.heads, mlp_ratio=cfg.mlp_dim / cfg.width,
                                      output_dim=16, act_layer=QuickGELU), seed=4)  # fmt: skip
    state = {"visual." + k: v for k, v in ref.state_dict().items()}
    state["token_embedding.weight"] = torch.zeros(7, 4)  # text tower: skipped
    torch.save({"state_dict": state}, tmp_path / "open_clip_pytorch_model.bin")
    assert load_clip_init(model.encoder, tmp_path / "open_clip_pytorch_model.bin") == ["clip"]
    ours = model.encoder.vision_model
    assert torch.equal(ours.embeddings.position_embedding.weight, ref.positional_embedding)
    assert torch.equal(
        ours.transformer.layers[1].self_attn.qkv_proj.weight, ref.transformer.resblocks[1].attn.in_proj_weight
    )

    hf = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ))  # fmt: skip
    randomize(hf, seed=5)
    hf.save_pretrained(tmp_path / "hf")  # transformers 5 writes unprefixed keys
    assert load_clip_init(model.encoder, tmp_path / "hf") == ["clip"]
    layer = hf.encoder.layers[0].self_attn
    fused = ours.transformer.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(fused, torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))
    prefixed = {"vision_model." + k: v for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()}
    save_file(prefixed, tmp_path / "clipmodel.safetensors")  # CLIPModel files carry vision_model.*
    assert load_clip_init(model.encoder, tmp_path / "clipmodel.safetensors") == ["clip"]

    save_file({"clip." + k: v for k, v in prefixed.items()}, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="cannot tell the CLIP checkpoint layout"):
        load_clip_init(model.encoder, tmp_path / "wrong.safetensors")
    small = {k: v for k, v in prefixed.items() if "layers.1." not in k}
    save_file(small, tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match=r"missing \d+ keys: vision_model\.encoder\.layers\.1\."):
        load_clip_init(model.encoder, tmp_path / "small.safetensors")


# ----------------------------------------------------------------------------- export / hand-over


def test_stage2_encoder_equals_the_stage1_export(tmp_path):
    stage1 = randomize(stage1_model(), seed=7)  # "trained" weights: distinct from any init
    out = export_encoder(stage1.encoder, tmp_path / "export", source={"run": "t"})
    config = json.loads((out / "encoder_config.json").read_text())
    assert config["format"] == EXPORT_FORMAT and config["parts"] == ["sam", "compressor", "clip"]
    keys = set(load_file(out / "model.safetensors"))
    assert "model.sam_model.net_3.weight" in keys and "model.vision_model.pre_layrnorm.weight" in keys
    assert all(k.startswith(("model.sam_model.", "model.vision_model.")) for k in keys)

    stage2 = stage2_model()
    projector_before = stage2.encoder.projector.layers.weight.clone()
    applied = apply_model_options(
        stage2, ModelConfig(encoder="debug", decoder="debug", encoder_init=str(out))
    )
    assert set(applied.loaded) == {"sam", "compressor", "clip"} and applied.frozen == ["sam", "compressor"]
    s1, s2 = stage1.encoder.state_dict(), stage2.encoder.state_dict()
    moved = [k for k in s1 if not k.startswith("projector.") and k not in ("image_newline", "view_seperator")]
    assert len(moved) == len(keys)
    for key in moved:
        assert torch.equal(s1[key], s2[key]), key
    assert torch.equal(stage2.encoder.projector.layers.weight, projector_before)  # 128 wide, not exported
    assert not any(p.requires_grad for p in stage2.encoder.sam_model.parameters())  # stage-2 PP0 frozen
    pixels = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(stage1.encoder.sam_features(pixels), stage2.encoder.sam_features(pixels))


def test_export_with_projector_round_trips_into_an_equal_width_model(tmp_path):
    stage1 = randomize(stage1_model(), seed=8)
    out = export_encoder(stage1.encoder, tmp_path / "e", include_projector=True, dtype=torch.bfloat16)
    target = stage1_model(seed=9)
    assert load_encoder_init(target.encoder, out) == ["sam", "compressor", "clip", "projector"]
    for key, value in stage1.encoder.state_dict().items():
        assert torch.equal(target.encoder.state_dict()[key], value.to(torch.bfloat16).float()), key
    state = encoder_state_for_model(out, target.encoder.config)  # DeepSeekOCR keys, for engines
    assert set(state) == {f"encoder.{k}" for k in stage1.encoder.state_dict()}
    with pytest.raises(ValueError, match=r"n_embed: export 64 vs model 128.*without --projector"):
        load_encoder_init(stage2_model().encoder, out)


def test_a_release_directory_gives_its_whole_encoder(tmp_path):
    from pipeline.checkpoint_io import export_release
    from pipeline.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("abcdefgh")
    source = randomize(build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id), seed=10)
    export_release(source, tok, tmp_path / "release")  # decoder keys in the same file are skipped
    target = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id)
    assert load_encoder_init(target.encoder, tmp_path / "release") == [
        "sam",
        "compressor",
        "clip",
        "projector",
    ]
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(target.encoder.state_dict()[key], value), key


def test_encoder_init_is_strict(tmp_path):
    out = export_encoder(randomize(stage1_model(), seed=11).encoder, tmp_path / "e")
    state = load_file(out / "model.safetensors")
    target = stage2_model().encoder
    before = {k: v.clone() for k, v in target.state_dict().items()}

    save_file({k.removeprefix("model."): v for k, v in state.items()}, tmp_path / "noprefix.safetensors")
    with pytest.raises(ValueError, match=r"wrong key prefix.*'sam_model\."):
        load_encoder_init(target, tmp_path / "noprefix.safetensors")
    partial_state = {
        k: v for k, v in state.items() if k != "model.vision_model.transformer.layers.1.mlp.fc2.bias"
    }
    save_file(partial_state, tmp_path / "partial.safetensors")
    with pytest.raises(
        ValueError, match=r"missing 1 \['vision_model\.transformer\.layers\.1\.mlp\.fc2\.bias'\]"
    ):
        load_encoder_init(target, tmp_path / "partial.safetensors")
    extra = {**state, "model.sam_model.blocks.4.norm1.weight": torch.ones(32)}  # a deeper SAM
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"not encoder keys of this model: \['model\.sam_model\.blocks\.4"):
        load_encoder_init(target, tmp_path / "extra.safetensors")
    config = json.loads((out / "encoder_config.json").read_text())
    config["encoder"]["clip"]["layers"] = 3
    (out / "encoder_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"different encoder: clip\.layers: export 3 vs model 2"):
        load_encoder_init(target, out)
    for key, value in target.state_dict().items():  # nothing was half-loaded
        assert torch.equal(value, before[key]), key


def test_options_fail_before_any_model_is_built(tmp_path):
    out = export_encoder(stage1_model().encoder, tmp_path / "e")
    with pytest.raises(ValueError, match="cannot be combined"):
        validate_model_options(ModelConfig(encoder_init=str(out), sam_init=str(out)))
    with pytest.raises(ValueError, match=r"model\.clip_init=.*no such file"):
        validate_model_options(ModelConfig(clip_init=str(tmp_path / "missing.bin")))
    with pytest.raises(ValueError, match=r"encoder export .* model\.encoder_init="):
        validate_model_options(ModelConfig(init_from=str(out)))
    with pytest.raises(ValueError, match="nothing would train"):
        validate_model_options(ModelConfig(freeze=["clip", "projector", "decoder"], freeze_sam=True))
    with pytest.raises(ValueError, match="unknown part"):
        validate_model_options(ModelConfig(freeze=["SAM"]))
    with pytest.warns(UserWarning, match="export_projector is ignored"):
        validate_model_options(ModelConfig(export_projector=True))


def test_cli_exports_a_saved_checkpoint_and_inspects_it(tmp_path, capsys):
    from pipeline.checkpoint_io import save_checkpoint
    from pipeline.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("abc")
    model = randomize(build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id,
                                  moe=None, first_k_dense_replace=0), seed=12)  # fmt: skip
    save_checkpoint(model, tok, tmp_path / "model")
    assert stage1_cli(["export", str(tmp_path / "model"), str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    state = load_file(tmp_path / "out" / "model.safetensors")
    assert state["model.sam_model.net_2.weight"].dtype == torch.bfloat16
    assert torch.equal(state["model.sam_model.net_2.weight"], model.encoder.sam_model.net_2.weight.bfloat16())
    capsys.readouterr()
    assert stage1_cli(["inspect", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = sum(v.numel() for k, v in model.encoder.state_dict().items() if not k.startswith("projector."))
    assert report["parts"] == ["sam", "compressor", "clip"]
    assert report["parameters"] == expected - 2 * model.encoder.config.n_embed
    assert stage1_cli(["inspect", str(tmp_path / "model")]) == 2  # not an export: error, exit 2


@pytest.mark.config
@pytest.mark.parametrize("experiment", ["paper_stage1", "stage1_small"])
def test_stage1_presets_train_everything_and_export(experiment, monkeypatch, tmp_path):
    from pipeline.cli.dryrun import compose_config
    from pipeline.config import to_run_config
    from pipeline.stage1 import frozen_parts

    monkeypatch.delenv("DSOCR_SAM_INIT", raising=False)
    monkeypatch.delenv("DSOCR_CLIP_INIT", raising=False)
    m = to_run_config(compose_config([f"experiment={experiment}"])).model
    assert (m.encoder, m.decoder) == ("full", "dense-125m")
    assert frozen_parts(m) == [] and m.export_encoder and not m.export_projector
    assert m.sam_init is None and m.clip_init is None
    validate_model_options(m)
    if experiment == "paper_stage1":  # upstream weights come from the environment
        sam = tmp_path / "sam_vit_b_01ec64.pth"
        sam.touch()
        monkeypatch.setenv("DSOCR_SAM_INIT", str(sam))
        monkeypatch.setenv("DSOCR_CLIP_INIT", str(tmp_path / "missing.pt"))
        m = to_run_config(compose_config([f"experiment={experiment}"])).model
        assert m.sam_init == str(sam)
        with pytest.raises(ValueError, match=r"model\.clip_init=.*missing\.pt: no such file"):
            validate_model_options(m)
