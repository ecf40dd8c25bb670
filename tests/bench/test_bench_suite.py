"""dsocr-bench on CPU: table structure, ratios from the two measured figures, failure rows, the README
fragment round trip, the full-step rows through the CLI, counted FLOPs against torch's
FlopCounterMode and the FLOP inputs of a packed batch. No timing assertion anywhere."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import suite
from bench.cli import main as bench_main
from bench.measure import decoder_train_flops, sam_forward_flops
from bench.report import Row, Target, load_result, render_markdown, render_text
from bench.step_data import flop_inputs, make_batches, make_documents
from decoder import decoder_config
from deepencoder.clip import ClipVisionModel
from deepencoder.config import VIEW_STRIDE, SamConfig, encoder_config
from deepencoder.sam import SamEncoder
from pipeline.batch import ImageViews
from pipeline.parallel.memory import clip_flops_per_vision_token
from pipeline.processing import num_placeholders


@pytest.mark.unit
def test_row_ratio_and_target_come_from_the_two_figures():
    row = Row("s", "v", "tokens/s", ours=300.0, peer=200.0, peer_name="p", target=Target("ratio", 1.5))
    assert row.ratio == 1.5 and row.target_met is True
    assert Row("s", "v", "x", ours=299.0, peer=200.0, target=Target("ratio", 1.5)).target_met is False
    assert Row("s", "v", "x", ours=5.0, target=Target("value", 4.0)).target_met is True
    assert Row("s", "v", "x", ours=5.0).ratio is None
    failed = Row("s", "v", "x", status="failed", reason="boom", target=Target("value", 1.0))
    assert failed.target_met is None and "FAILED" in render_text([failed]) and "boom" in render_text([failed])
    assert Row.from_dict(json.loads(json.dumps(row.to_dict()))) == row
    with pytest.raises(ValueError, match="threshold"):
        Target("ratio", 0.0)
    with pytest.raises(ValueError, match="status"):
        Row("s", "v", "x", status="maybe")


@pytest.mark.unit
def test_quick_sam_rows_json_and_fragment(tmp_path):
    settings = suite.BenchSettings(
        device="cpu", quick=True, only=("sam",), out=tmp_path, command="dsocr-bench test"
    )
    result = suite.run_suite(settings)
    rows = result["rows"]
    assert [r["section"].split(" (")[1].split(" px")[0] for r in rows] == ["128", "128", "64", "64"]
    assert [r["name"] for r in rows[:2]] == ["ours eager", "ours + compiled blocks"]  # aot_eager on CPU
    for r in rows:
        assert r["status"] == "ok" and r["unit"] == "images/s"
        assert r["ours"] > 0 and r["peer"] > 0
        assert r["ratio"] == pytest.approx(r["ours"] / r["peer"], rel=1e-12)
    # measured figures: ours and the peer per size in the details, the rows derived from them
    for side, detail in result["details"]["sam"].items():
        row = next(r for r in rows if f"({side} px" in r["section"])
        assert row["ours"] == detail["ours"]["images_per_s"] and row["peer"] == detail["peer"]["images_per_s"]
        assert detail["max_rel_diff"] < 0.05  # same weights: the two encoders compute the same function
    on_disk = load_result(tmp_path / "bench_results.json")
    md = (tmp_path / "PERFORMANCE.md").read_text()
    assert md == render_markdown(on_disk)
    assert "| benchmark | variant | unit | ours | peer (same run) | ratio | target | met | notes |" in md
    assert f"{rows[0]['ratio']:.2f}x" in md and "dsocr-bench test" in md and on_disk["date"] in md
    assert "6 * N_active * T" in md  # the FLOP formula footnote


@pytest.mark.unit
def test_a_failing_section_becomes_a_failed_row(tmp_path, monkeypatch):
    def boom(run):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setitem(suite.ROWS, "sam", ("frozen SAM", "images/s", boom))
    result = suite.run_suite(suite.BenchSettings(device="cpu", quick=True, only=("sam",), out=tmp_path))
    statuses = [(r["section"], r["status"], r["reason"]) for r in result["rows"]]
    assert statuses == [("frozen SAM", "failed", "RuntimeError: CUDA out of memory (simulated)")]
    assert "FAILED" in (tmp_path / "PERFORMANCE.md").read_text()


@pytest.mark.unit
def test_cli_render_and_bad_arguments(tmp_path, capsys):
    result = {
        "date": "2026-01-01 00:00 UTC", "command": "dsocr-bench", "quick": False, "wall_s": 1.0,
        "machine": {"device_name": "GPU", "device_count": 1}, "peak_tflops": 800.0, "peak_note": "n",
        "rows": [Row("a", "b", "tokens/s", 3.0, 2.0, "p").to_dict()], "footnotes": ["f"],
    }  # fmt: skip
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    assert bench_main(["--render", str(path)]) == 0
    assert "| a | b | tokens/s | 3.00 | 2.00 (p) | 1.50x |" in (tmp_path / "PERFORMANCE.md").read_text()
    for only in ("decoder,nope", "pipeline"):  # the pipeline rows went with bench/pipeline_gpu.sh
        assert bench_main(["--device", "cpu", "--quick", "--only", only, "--out", str(tmp_path)]) == 2
        assert "--only takes a comma list of decoder,sam,full,finetune,data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_main(["--profile"])  # removed with bench/profiling.py
    assert "unrecognized arguments: --profile" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_full_step_rows_through_the_cli(tmp_path):
    assert (
        bench_main(["--device", "cpu", "--quick", "--only", "full", "--out", str(tmp_path), "--strict"]) == 0
    )
    result = load_result(tmp_path / "bench_results.json")
    full = result["details"]["full"]
    assert full["errors"] == {} and set(full["variants"]) == {"peer", "trainer", "trainer_compiled"}
    rows = result["rows"]
    assert [r["name"] for r in rows] == ["trainer", "trainer + compile"]
    for row, key in zip(rows, ("trainer", "trainer_compiled")):
        assert row["status"] == "ok" and row["unit"] == "tokens/s"
        assert row["section"] == "full step (debug+debug, debug pages in 1x256 rows, bf16)"
        assert row["ours"] == full["variants"][key]["tokens_per_s"] > 0
        assert row["peer"] == full["variants"]["peer"]["tokens_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["ours"] / row["peer"])
        assert f"first loss {full['variants'][key]['first_loss']:.4f}" in row["notes"]
    assert "pages/row, packing" in rows[-1]["notes"]
    md = (tmp_path / "PERFORMANCE.md").read_text()
    assert "| trainer + compile | tokens/s |" in md and "Trainer over pipeline/train/local_engine.py" in md


# ----------------------------------------------------------------------------- counted FLOPs
# The counted forwards run SDPA on its math backend: its attention is then plain matmuls, which
# FlopCounterMode counts on every torch version. The fused CPU kernel torch picks by default has a
# FLOP formula in some versions and none in others (2.14 counts it as 0).


def counted_flops(run) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        run()
    return counter.get_total_flops()


@pytest.mark.parity
@pytest.mark.parametrize("side", [128, 192])
def test_sam_flops_match_flop_counter(side):
    # window 5 on a grid of 8 / 12 patches: zero-padded windows; "bias" = plain SDPA + einsum terms
    cfg = SamConfig(img_size=128, embed_dim=32, depth=3, num_heads=2, out_chans=16, window_size=5,
                    global_attn_indexes=(1,), compressor_channels=(24, 32), attn_impl="bias")  # fmt: skip
    model = SamEncoder(cfg).eval()
    assert sam_forward_flops(cfg, side) == counted_flops(lambda: model(torch.randn(1, 3, side, side)))


@pytest.mark.parity
@pytest.mark.parametrize("grid", [2, 3])
def test_clip_flops_match_flop_counter(grid):
    enc = encoder_config("debug")
    clip = ClipVisionModel(enc.clip)
    projector = torch.nn.Linear(enc.feature_dim, enc.n_embed)

    def forward():
        out = clip(torch.randn(1, enc.clip.width, grid, grid))[:, 1:]
        projector(torch.cat([out, torch.randn(1, grid * grid, enc.sam.out_channels)], dim=-1))

    # forward FLOPs of one view, the count full_step_flops takes from pipeline/ (x 3 for training)
    counted = clip_flops_per_vision_token(enc, grid * VIEW_STRIDE) * grid * grid
    assert counted == pytest.approx(counted_flops(forward), rel=1e-12)


@pytest.mark.unit
def test_decoder_flops_add_up_over_documents():
    cfg = decoder_config("full")
    assert decoder_train_flops(cfg, [8192]) == cfg.matmul_flops_per_token(8192) * 8192
    whole = decoder_train_flops(cfg, [1000, 3000])
    assert whole == decoder_train_flops(cfg, [1000]) + decoder_train_flops(cfg, [3000])
    assert whole < decoder_train_flops(cfg, [4000])  # packing removes cross-document attention


# ----------------------------------------------------------------------------- full-step inputs


def _debug_batches(rows: int):
    side = 128
    views = [
        ImageViews(
            torch.randint(0, 256, (3, side, side), dtype=torch.uint8), None, (1, 1), num_placeholders("debug")
        )
        for _ in range(3)
    ]
    docs = make_documents(views, 12, text_range=(10, 40), vocab_size=512, image_token_id=511, seed=1)
    return make_batches(docs, 160, rows, pad_id=1, image_token_id=511)


@pytest.mark.unit
def test_flop_inputs_count_every_view_and_document():
    batch = _debug_batches(2)[0]
    sides, lengths = flop_inputs(batch)
    assert sum(lengths) == batch.num_tokens and len(lengths) == batch.num_documents
    assert sides == [128] * batch.num_images  # one global view per page, no tiles
