"""`dsocr-eval run` on a set whose image paths leave its folder: those pages fail with the reason
(counted in the report) unless `--allow-root` names the folder they lead into."""

import json

import pytest
import torch

from pipeline.cli import eval as cli
from pipeline.data.testing import png_bytes
from pipeline.model import build_model
from pipeline.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.unit


def test_run_refuses_paths_outside_the_set_unless_allowed(tmp_path, monkeypatch):
    root, outside = tmp_path / "set", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "in.png").write_bytes(png_bytes(64, 48, seed=0))
    (outside / "out.png").write_bytes(png_bytes(64, 48, seed=1))
    rows = [
        {"key": "in", "image": "in.png", "answer": "abc"},
        {"key": "out", "image": "../elsewhere/out.png", "answer": "de"},
    ]
    (root / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = build_char_tokenizer("abcde .\nFreOCR")
    torch.manual_seed(0)
    model = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id).eval()
    monkeypatch.setattr(cli, "load_model", lambda checkpoint, device, dtype: (model, tok))
    base = ["run", "--checkpoint", str(tmp_path), "--data", str(root / "set.jsonl"), "--mode", "debug",
            "--prompt", "<image>\nFree OCR.", "--max-new-tokens", "2"]  # fmt: skip

    assert cli.main([*base, "--out", str(tmp_path / "r1")]) == cli.PARTIAL_FAILURE  # one page refused
    records = {
        r["key"]: r
        for r in map(json.loads, (tmp_path / "r1" / "eval_samples.jsonl").read_text().splitlines())
    }
    assert records["in"].get("error") is None
    assert "outside the dataset root" in records["out"]["error"]
    assert json.loads((tmp_path / "r1" / "eval_report.json").read_text())["num_failed"] == 1

    assert cli.main([*base, "--out", str(tmp_path / "r2"), "--allow-root", str(outside)]) == 0
    assert json.loads((tmp_path / "r2" / "eval_report.json").read_text())["num_failed"] == 0
