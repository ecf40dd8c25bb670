"""bench/pipeline_gpu.py without GPUs: configuration flags -> RunConfig, the per-configuration
summary (throughput, losses, peaks per stage against the memory model) and the markdown table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "pipeline_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pipeline_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records(n: int) -> list[dict]:
    return [
        {"step": i + 1, "loss": 12.0 - i, "tokens_per_s": 4e4 * (i + 1), "tokens_per_s_per_gpu": 1e4 * (i + 1),
         "step_time": 2.0 / (i + 1), "mfu": 0.1}
        for i in range(n)
    ]  # fmt: skip


@pytest.mark.unit
def test_flags_to_run_config_and_summary(bench, tmp_path):
    args = bench.arg_parser().parse_args(
        ["train", str(tmp_path), "--partition", "balanced", "--no-checkpointing", "--global-batch", "32",
         "--steps", "5", "--warmup", "2", "--checkpoint-stages", "0,3"]
    )  # fmt: skip
    run, name, layout = bench.bench_run(tmp_path, args, world=4)
    assert (layout, name) == ("pp4_dp1", "pp4_dp1_balanced_ckpt03_gb32_chunk2048")
    p = run.parallel
    assert (p.pp, p.global_batch, p.partition_method, p.loss_chunk_tokens) == (4, 32, "balanced", 2048)
    assert p.checkpoint_stages == [0, 3] and run.model.gradient_checkpointing is False
    assert run.train.out_dir == str(tmp_path / name)

    peaks = [3.0, 20.5, 21.0, 15.25]
    summary = bench.summarize(run, name, layout, args, 4, peaks, _records(5))
    assert summary["parts"] == [0, 3, 8, 13, 15] and summary["partition"] == "balanced"
    assert summary["tokens_per_s_per_gpu"] == pytest.approx(4e4)  # mean of steps 3-5
    assert summary["step_time_s"] == pytest.approx((2 / 3 + 2 / 4 + 2 / 5) / 3)
    assert (summary["loss_first"], summary["loss_last"], summary["steps"]) == (12.0, 8.0, 5)
    assert summary["peak_gib_per_stage"] == {0: 3.0, 1: 20.5, 2: 21.0, 3: 15.25}
    assert summary["bubble_1f1b"] == pytest.approx(3 / 35)
    assert set(summary["estimated_gib_per_stage"]) == {0, 1, 2, 3}

    file = tmp_path / "summary.jsonl"
    file.write_text(json.dumps(summary) + "\n")
    table = bench.table(file).splitlines()
    assert len(table) == 3 and table[2].startswith("| pp4_dp1_balanced_ckpt03_gb32_chunk2048 |")
    assert "| 40,000 |" in table[2] and "12.00 -> 8.00" in table[2] and "8.6%" in table[2]


@pytest.mark.unit
def test_pp2_dp2_takes_the_largest_peak_of_each_stage(bench, tmp_path):
    args = bench.arg_parser().parse_args(["train", str(tmp_path), "--pp", "2", "--steps", "4"])
    run, name, layout = bench.bench_run(tmp_path, args, world=4)
    assert name == "pp2_dp2_paper_ckpt_gb16_chunk2048" and run.model.gradient_checkpointing
    summary = bench.summarize(run, name, layout, args, 4, [1.0, 2.0, 4.0, 3.0], _records(4))
    # DeepSpeed's topology: global rank = stage * DP + dp_rank
    assert summary["peak_gib_per_stage"] == {0: 2.0, 1: 4.0}
    assert summary["bubble_1f1b"] == pytest.approx(1 / 9)  # accumulation 16 / DP 2 = 8
