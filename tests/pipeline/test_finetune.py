"""Fine-tuning units: component freezing, LoRA target resolution and errors, merged == adapter logits
through a release-layout export, adapter save/load, character-vocabulary extension, replay mixing,
config validation and the experiment presets."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pipeline.checkpoint_io import import_release, save_checkpoint
from pipeline.data.config import SourceSpec
from pipeline.data.loader import StreamingLoader
from pipeline.data.packing import collate_unpacked
from pipeline.data.testing import write_ocr_shards
from pipeline.finetune.config import COMPONENTS, FinetuneConfig, LoraSpec, ReplaySpec
from pipeline.finetune.export import export_merged, load_adapter, save_adapter
from pipeline.finetune.lora import (
    apply_lora,
    component_of,
    lora_candidates,
    resolve_lora_targets,
    set_trainable,
)
from pipeline.finetune.vocab import cover_texts, extend_char_tokenizer, uncovered_chars
from pipeline.model import build_model
from pipeline.processing import process_image
from pipeline.prompts import build_example
from pipeline.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.unit

LATIN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,"


def tiny_model(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("debug", "debug", tokenizer.vocab_size, image_token_id=tokenizer.image_id,
                       bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, hidden_size=64).eval()  # fmt: skip


def image_batch(tokenizer, answers=("hello", "abc 12")):
    examples = []
    for i, answer in enumerate(answers):
        image = Image.new("RGB", (96 + 32 * i, 64), (200 + 20 * i, 180, 160))
        views = process_image(image, "debug")
        examples.append(build_example(tokenizer, "<image>\nFree OCR.", answer, [views]))
    return collate_unpacked(examples, tokenizer.pad_id, tokenizer.image_id)


def randomise_adapters(model, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(LATIN)


# ------------------------------------------------------------------ components and targets


def test_components_partition_every_parameter(tokenizer):
    model = tiny_model(tokenizer)
    seen = {c: 0 for c in COMPONENTS}
    for name, param in model.named_parameters():
        seen[component_of(name)] += param.numel()
    assert sum(seen.values()) == sum(p.numel() for p in model.parameters())
    assert all(seen.values())
    counts = set_trainable(model, ["clip", "projector", "decoder"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("encoder.vision_model", "encoder.projector", "decoder.layers", "decoder.norm"))
               or n in ("encoder.image_newline", "encoder.view_seperator") for n in trainable)  # fmt: skip
    assert counts["sam"] == counts["embed"] == counts["lm_head"] == 0
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="unknown components"):
        set_trainable(model, ["vit"])


def test_default_lora_targets_are_decoder_attention_dense_and_shared_mlps(tokenizer):
    model = tiny_model(tokenizer)
    modules, params = resolve_lora_targets(model, LoraSpec())
    cfg = model.decoder.config
    n_moe = cfg.num_layers - cfg.first_k_dense_replace
    # 4 attention projections per layer + 3 per dense MLP + 3 per shared-expert MLP
    assert len(modules) == 4 * cfg.num_layers + 3 * cfg.first_k_dense_replace + 3 * n_moe
    assert all(m.startswith("decoder.layers.") for m in modules) and params == []
    assert not any(".experts." in m for m in modules)
    _, params = resolve_lora_targets(model, LoraSpec(expert_targets=["gate_up_proj", "down_proj"]))
    assert sorted(params) == sorted(
        f"decoder.layers.{i}.mlp.experts.{p}"
        for i in range(1, cfg.num_layers)
        for p in ("gate_up_proj", "down_proj")
    )
    linears, _ = lora_candidates(model, ["clip"])
    assert {n.rsplit(".", 1)[-1] for n in linears} == {"qkv_proj", "out_proj", "fc1", "fc2"}


def test_unknown_lora_target_lists_available_names(tokenizer):
    model = tiny_model(tokenizer)
    with pytest.raises(ValueError) as err:
        resolve_lora_targets(model, LoraSpec(targets=["q_proj", "query"]))
    message = str(err.value)
    assert "['query']" in message
    for name in ("q_proj", "o_proj", "gate_proj", "down_proj", "lm_head", "gate_up_proj"):
        assert name in message
    with pytest.raises(ValueError, match="qkv_proj"):
        resolve_lora_targets(model, LoraSpec(scope=["clip"], targets=["q_proj"]))


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        FinetuneConfig(method="qlora")
    with pytest.raises(ValueError, match="dropout must be 0"):
        LoraSpec(expert_targets=["down_proj"], dropout=0.1)
    with pytest.raises(ValueError, match="expert_targets"):
        LoraSpec(expert_targets=["up_proj"])
    with pytest.raises(ValueError, match="method=full"):
        FinetuneConfig(method="lora", train_components=["decoder"])
    with pytest.raises(ValueError, match="share"):
        ReplaySpec(share=1.0)
    with pytest.raises(ValueError, match="needs method=lora"):
        FinetuneConfig(method="full", export="adapter")
    assert FinetuneConfig(method="full").trained_components == [
        "clip",
        "projector",
        "embed",
        "decoder",
        "lm_head",
    ]
    assert FinetuneConfig().trained_components == []


# ------------------------------------------------------------------ merge and export


def test_merged_release_export_equals_adapter_logits(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    batch = image_batch(tokenizer)
    with torch.no_grad():
        base_logits = model(batch, return_logits=True).logits
    save_checkpoint(model, tokenizer, tmp_path / "base")
    spec = LoraSpec(r=4, alpha=8, expert_targets=["gate_up_proj", "down_proj"])
    peft_model = apply_lora(model, spec, ["projector", "lm_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    randomise_adapters(model)
    with torch.no_grad():
        adapter_logits = model(batch, return_logits=True).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapters change the function

    adapter_dir = save_adapter(peft_model, tokenizer, tmp_path / "adapter", base=str(tmp_path / "base"))
    merged_dir = export_merged(peft_model, tokenizer, tmp_path / "merged")
    assert (merged_dir / "config.json").is_file() and (merged_dir / "tokenizer.json").is_file()
    merged, merged_tok = import_release(merged_dir)
    assert merged_tok.vocab_size == tokenizer.vocab_size
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(batch, return_logits=True).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)

    reloaded, _ = load_adapter(adapter_dir)
    with torch.no_grad():
        reloaded_logits = reloaded(batch, return_logits=True).logits
    torch.testing.assert_close(reloaded_logits, adapter_logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ vocabulary


def test_char_vocabulary_extension_keeps_old_ids_and_logits(tokenizer):
    texts = ["привет мир", "abc"]
    missing = uncovered_chars(tokenizer, texts)
    assert missing == sorted(set("приветмир"))
    extended = extend_char_tokenizer(tokenizer, missing)
    old_vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    new_vocab = extended.tokenizer.get_vocab(with_added_tokens=True)
    assert all(new_vocab[t] == i for t, i in old_vocab.items())
    assert extended.decode(extended.encode("привет abc")) == "привет abc"

    model = tiny_model(tokenizer)
    batch = image_batch(tokenizer)
    with torch.no_grad():
        before = model(batch, return_logits=True).logits
    new_tok, added = cover_texts(model, tokenizer, texts, extend=True)
    assert (
        added == missing
        and model.decoder.config.vocab_size == new_tok.vocab_size == tokenizer.vocab_size + len(missing)
    )
    with torch.no_grad():
        after = model(batch, return_logits=True).logits
    torch.testing.assert_close(after[..., : tokenizer.vocab_size], before)
    with pytest.raises(ValueError, match="extend_vocab"):
        cover_texts(tiny_model(tokenizer), tokenizer, texts, extend=False)


# ------------------------------------------------------------------ replay


def test_replay_share_of_the_mixture(tokenizer, tmp_path):
    from pipeline.config import RunConfig
    from pipeline.finetune.job import FinetuneData, loader_config

    target = write_ocr_shards(
        tmp_path / "t", num_shards=1, per_shard=80, size=(32, 24), prefix="tgt", answer_chars=4
    )
    replay = write_ocr_shards(
        tmp_path / "r", num_shards=1, per_shard=80, size=(32, 24), prefix="rep", answer_chars=4
    )
    run = RunConfig()
    run.data.seq_len, run.data.pack, run.parallel.micro_batch = 64, False, 8
    data = FinetuneData(
        [SourceSpec("target", target, 0.75, "free_ocr", "debug")],
        SourceSpec("replay", replay, 0.25, "free_ocr", "debug"),
        "",
        "",
    )
    cfg = loader_config(run.data, data, batch_size=run.parallel.micro_batch, seed=run.train.seed)
    assert cfg.mixture == pytest.approx({"target": 0.75, "replay": 0.25})
    keys = []
    for batch, _ in zip(StreamingLoader(cfg, tokenizer, dp_rank=0, dp_world=1), range(10)):
        keys += [k for row in batch.keys for k in row]
    share = sum(k.startswith("rep") for k in keys) / len(keys)
    assert len(keys) == 80 and 0.15 < share < 0.35  # seeded draws: deterministic


# ------------------------------------------------------------------ presets and entry point


@pytest.mark.config
def test_finetune_presets_compose():
    from pipeline.cli.dryrun import compose_config
    from pipeline.cli.finetune import with_default_experiment
    from pipeline.config import to_run_config
    from pipeline.finetune.config import DEFAULT_LORA_TARGETS

    lora = to_run_config(compose_config(["experiment=finetune_lora"])).finetune
    assert (lora.method, lora.lora.r, lora.lora.alpha, lora.lora.scope) == ("lora", 16, 16.0, ["decoder"])
    assert lora.lora.targets == DEFAULT_LORA_TARGETS and lora.replay.share == 0.2
    full = to_run_config(compose_config(["experiment=finetune_full"]))
    assert full.finetune.method == "full" and "sam" not in full.finetune.trained_components
    assert full.finetune.replay.share == 0.2 and full.optim.lr == 2e-5 and full.finetune.export == "merged"
    demo = to_run_config(compose_config(["experiment=finetune_demo"]))
    assert (
        demo.data.kind == "synth_lines" and demo.model.init_from is None and demo.finetune.demo.lang == "ru"
    )
    assert with_default_experiment(["optim.lr=1"]) == ["optim.lr=1", "experiment=finetune_demo"]
    assert with_default_experiment(["experiment=finetune_lora"]) == ["experiment=finetune_lora"]


@pytest.mark.config
def test_lora_sweep_has_a_rank_axis():
    from pipeline.cli.dryrun import compose_config, sweep_jobs
    from pipeline.config import to_run_config

    jobs = sweep_jobs(["experiment=finetune_lora_sweep"])
    runs = [to_run_config(compose_config(job, job_num=i)) for i, job in enumerate(jobs)]
    combos = {(r.optim.lr, r.finetune.lora.r, r.finetune.lora.alpha) for r in runs}
    assert combos == {(lr, r, float(r)) for lr in (1e-4, 2e-4, 4e-4) for r in (8, 16, 32)}
    assert len({r.train.out_dir for r in runs}) == 9 and {r.logger.group for r in runs} == {
        "finetune_lora_sweep"
    }
