"""dsocr-eval subcommands end to end on tiny inputs (the model loader is stubbed with the debug model)."""

import json
import shutil

import pytest
import torch

from pipeline.cli import eval as cli
from pipeline.data.testing import png_bytes
from pipeline.model import build_model
from pipeline.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.unit


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_score_and_clear_errors(tmp_path, capsys):
    preds = _jsonl(
        tmp_path / "preds.jsonl",
        [
            {"key": "a", "reference": "abcd", "prediction": "abce"},
            {"key": "b", "reference": "xy", "prediction": "", "error": "generation failed: OOM"},
        ],
    )
    assert cli.main(["score", "--predictions", str(preds), "--out", str(tmp_path / "s"), "--name", "x"]) == 0
    summary = json.loads((tmp_path / "s" / "score_report.json").read_text())
    assert summary["raw"]["corpus_cer"] == pytest.approx((1 + 2) / 6) and summary["num_failed"] == 1
    refs = _jsonl(tmp_path / "refs.jsonl", [{"key": "a", "answer": "abcd"}, {"key": "c", "answer": "z"}])
    args = ["score", "--predictions", str(preds), "--references", str(refs), "--out", str(tmp_path / "s2")]
    assert cli.main(args) == 2
    assert "do not match" in capsys.readouterr().err
    empty = _jsonl(tmp_path / "empty.jsonl", [{"key": "a", "answer": ""}])
    args[4] = str(empty)
    assert cli.main(args) == 2
    assert "empty reference" in capsys.readouterr().err


@pytest.fixture()
def page_set(tmp_path):
    rows = []
    for i, text in enumerate(["abc def", "ghij"]):
        (tmp_path / f"p{i}.png").write_bytes(png_bytes(64, 48, seed=i))
        rows.append({"key": f"p{i}", "image": f"p{i}.png", "answer": text})
    return _jsonl(tmp_path / "set.jsonl", rows)


def test_run_with_stub_model(tmp_path, page_set, monkeypatch):
    tok = build_char_tokenizer("abcdefghij .\nFreOCR")
    torch.manual_seed(0)
    model = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id).eval()
    monkeypatch.setattr(cli, "load_model", lambda checkpoint, device, dtype: (model, tok))
    out = tmp_path / "run"
    args = [
        "run",
        "--checkpoint",
        str(tmp_path),
        "--data",
        str(page_set),
        "--mode",
        "debug",
        "--out",
        str(out),
    ]
    args += ["--prompt", "<image>\nFree OCR.", "--max-new-tokens", "4", "--markdown"]
    tesseract = shutil.which("tesseract") is not None
    if tesseract:
        args.append("--tesseract")
    assert cli.main(args) == 0
    lines = (out / "eval_samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["p0", "p1"]
    assert all(json.loads(line)["tokens"] <= 4 for line in lines)
    summary = json.loads((out / "eval_report.json").read_text())
    assert summary["meta"]["mode"] == "debug" and summary["num_samples"] == 2
    assert sorted(p.name for p in (out / "markdown").iterdir()) == ["p0.md", "p1.md"]
    table = (out / ("comparison.txt" if tesseract else "summary.txt")).read_text()
    assert "ours raw" in table and (("tesseract raw" in table) == tesseract)
    assert (
        cli.main(["run", "--checkpoint", "x", "--data", str(page_set), "--mode", "huge", "--out", str(out)])
        == 2
    )


def test_compression_from_prediction_files(tmp_path):
    tok = build_char_tokenizer("abcdefghij .\n")
    tok.save(tmp_path / "tok")
    refs = {"a": "abcdefghij abcd", "b": "abcdefghij abcdefghij abc"}  # 15 and 25 chars = tokens
    data = _jsonl(tmp_path / "set.jsonl", [{"key": k, "answer": v} for k, v in refs.items()])
    tiny = _jsonl(
        tmp_path / "tiny.jsonl",
        [{"key": "a", "prediction": "abcdefghij"}, {"key": "b", "prediction": refs["b"]}],
    )
    small = _jsonl(tmp_path / "small.jsonl", [{"key": k, "prediction": v} for k, v in refs.items()])
    out = tmp_path / "comp"
    args = [
        "compression",
        "--data",
        str(data),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--edges",
        "10",
        "20",
        "30",
    ]
    args += ["--predictions", f"tiny={tiny}", f"small={small}", "--out", str(out)]
    assert cli.main(args) == 0
    rows = json.loads((out / "compression.json").read_text())["rows"]
    assert [(r["mode"], r["lo"], r["fox_precision"], r["compression"]) for r in rows] == [
        ("tiny", 10, 0.5, pytest.approx(15 / 64)),  # words {abcdefghij, abcd}: one found
        ("tiny", 20, 1.0, pytest.approx(25 / 64)),
        ("small", 10, 1.0, pytest.approx(15 / 100)),
        ("small", 20, 1.0, pytest.approx(25 / 100)),
    ]
    assert (out / "compression.png").stat().st_size > 0


def test_markdown_and_plots(tmp_path):
    output = "<|ref|>title<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n# Title\n\nBody text"
    preds = _jsonl(tmp_path / "preds.jsonl", [{"key": "doc/1", "reference": "x", "prediction": output}])
    refs = _jsonl(tmp_path / "refs.jsonl", [{"key": "doc/1", "answer": "# Title\n\nBody test"}])
    out = tmp_path / "md"
    assert (
        cli.main(["markdown", "--predictions", str(preds), "--references", str(refs), "--out", str(out)]) == 0
    )
    assert (out / "doc_1.md").read_text() == "# Title\n\nBody text\n"
    scores = json.loads((out / "markdown_scores.json").read_text())
    assert scores["mean"] == pytest.approx(1 / len("# Title Body test"))
    log = _jsonl(
        tmp_path / "metrics.jsonl",
        [{"step": s, "loss": 3.0 / s, "aux_loss": 0.01, "lr": 1e-4} for s in (1, 2)],
    )
    assert cli.main(["plots", "--log", str(log), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "losses.png").is_file() and not (tmp_path / "plots" / "cer.png").exists()


def test_run_real_checkpoints_and_size_mismatch(tmp_path, page_set, capsys):
    from pipeline.checkpoint_io import export_release, save_checkpoint
    from pipeline.eval.data import read_eval_set
    from pipeline.eval.runner import EvalRunConfig, evaluate

    tok = build_char_tokenizer("abcdefghij .\nFreOCR")
    torch.manual_seed(1)
    model = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id).eval()
    config = EvalRunConfig(mode="debug", prompt="<image>\nFree OCR.", max_new_tokens=4)
    expected = [r.prediction for r in evaluate(model, tok, read_eval_set(page_set), config).records]
    common = [
        "--data",
        str(page_set),
        "--mode",
        "debug",
        "--prompt",
        "<image>\nFree OCR.",
        "--max-new-tokens",
        "4",
    ]
    common += ["--device", "cpu", "--dtype", "fp32"]
    for name, write in (("ours", save_checkpoint), ("release", export_release)):
        write(model, tok, tmp_path / name)
        out = tmp_path / f"out_{name}"
        assert cli.main(["run", "--checkpoint", str(tmp_path / name), "--out", str(out), *common]) == 0
        lines = (out / "eval_samples.jsonl").read_text().splitlines()
        assert [json.loads(line)["prediction"] for line in lines] == expected
    # weights of a model with a larger vocabulary under the debug model's config
    big_tok = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz .\nFreOCR")
    big = build_model("debug", "debug", big_tok.vocab_size, image_token_id=big_tok.image_id)
    save_checkpoint(big, big_tok, tmp_path / "big")
    shutil.copyfile(tmp_path / "big" / "model.safetensors", tmp_path / "ours" / "model.safetensors")
    assert (
        cli.main(["run", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "bad"), *common])
        == 2
    )
    err = capsys.readouterr().err
    assert "does not fit the model its config describes" in err and "size mismatch" in err
