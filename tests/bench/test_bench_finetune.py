"""The fine-tuning benchmark on CPU (ours; the peer is the released model's code, which is not
shipped here): LoRA and full runs train through the Trainer from the same initial weights, and the
peer's LoRA target pattern names exactly the modules our default LoRA adapts, by the release's keys."""

from __future__ import annotations

import math
import re

import pytest
import torch

from bench.finetune_step import PEER_LORA_TARGETS, FinetuneStepSettings, build_model, measure_finetune
from pipeline.checkpoint_io import release_state_dict
from pipeline.finetune.config import LoraSpec
from pipeline.finetune.lora import apply_lora, trainable_summary

QUICK = dict(encoder="debug", decoder="debug", mode="debug-gundam", page=(128, 181), text_range=(20, 40),
             batch_sizes=(1, 2), steps=1, warmup=1, infer_pages=3, infer_batch=2, infer_tokens=5)  # fmt: skip


@pytest.mark.unit
def test_peer_lora_pattern_matches_our_adapted_modules():
    settings = FinetuneStepSettings(**QUICK)
    model = build_model(settings, image_token_id=3, device=torch.device("cpu"))
    release_keys = [k.removesuffix(".weight") for k in release_state_dict(model) if k.endswith(".weight")]
    matched = [k for k in release_keys if re.fullmatch(PEER_LORA_TARGETS, k)]
    shapes = {k.removesuffix(".weight"): v.shape for k, v in release_state_dict(model).items()}
    assert any("experts.0." in k for k in release_keys)  # the routed experts exist and are left out
    assert not any(".experts." in k for k in matched)
    r = 4
    apply_lora(model, LoraSpec(r=r, alpha=8.0))
    trainable, _ = trainable_summary(model)
    peer_trainable = sum(r * (shapes[k][0] + shapes[k][1]) for k in matched)  # A: r x in, B: out x r
    assert trainable == peer_trainable > 0


@pytest.mark.slow
def test_lora_and_full_train_through_the_trainer_without_the_peer():
    res = measure_finetune(FinetuneStepSettings(**QUICK), torch.device("cpu"))
    assert set(res["ours"]) == {"lora_b1", "lora_b2", "full_b1", "infer"}
    assert res["errors"] == {"peer": "no --release-code (the released model's modeling files)"}
    ours = res["ours"]
    infer = ours.pop("infer")  # the lm_head's EOS row is zero: every page gets all its new tokens
    assert infer["pages_per_s"] > 0 and infer["new_tokens_per_page"] == 5 and infer["batch"] == 2
    for key, v in ours.items():
        assert v["tokens_per_s"] > 0 and v["samples_per_s"] > 0 and math.isfinite(v["last_loss"]), key
        assert v["peak_gib"] is None, key  # CUDA memory only
    assert 0 < ours["lora_b1"]["trainable"] < ours["full_b1"]["trainable"] < ours["full_b1"]["total"]
    # same initial weights and first batch; LoRA's B starts at zero, so the first losses are equal
    assert ours["lora_b1"]["first_loss"] == pytest.approx(ours["full_b1"]["first_loss"], abs=1e-5)
    assert ours["lora_b2"]["tokens_per_step"] > ours["lora_b1"]["tokens_per_step"]


@pytest.mark.slow
def test_quick_finetune_rows_through_the_cli(tmp_path):
    from bench.cli import main as bench_main
    from bench.report import load_result

    assert bench_main(["--device", "cpu", "--quick", "--only", "finetune", "--out", str(tmp_path)]) == 0
    result = load_result(tmp_path / "bench_results.json")
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"LoRA r16, batch 1", "LoRA r16, batch 2", "full, batch 1", "generate, batch 2"}
    ours = result["details"]["finetune"]["ours"]
    for name, key in (
        ("LoRA r16, batch 1", "lora_b1"),
        ("full, batch 1", "full_b1"),
        ("generate, batch 2", "infer"),
    ):
        row = rows[name]
        assert row["status"] == "ok" and row["peer"] is None and row["ratio"] is None
        assert row["peer_name"] == "peer not run: no --release-code (the released model's modeling files)"
        assert row["ours"] == ours[key]["tokens_per_s" if key != "infer" else "pages_per_s"] > 0
    assert rows["generate, batch 2"]["unit"] == "pages/s" and rows["full, batch 1"]["unit"] == "tokens/s"
    assert f"first loss {ours['lora_b1']['first_loss']:.4f}" in rows["LoRA r16, batch 1"]["notes"]
