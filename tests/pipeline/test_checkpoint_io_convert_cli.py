"""dsocr-convert: release -> ours -> release keeps every tensor; inspect reports the configs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint_io import export_release
from pipeline.cli.convert import SUBCOMMANDS, main
from pipeline.model import build_model
from pipeline.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.unit


def test_convert_round_trip(tmp_path, capsys):
    tok = build_char_tokenizer("abc")
    model = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id)
    export_release(model, tok, tmp_path / "release")
    assert main(["from-release", str(tmp_path / "release"), str(tmp_path / "ours")]) == 0
    assert main(["to-release", str(tmp_path / "ours"), str(tmp_path / "back"), "--dtype", "bf16"]) == 0
    a = load_file(str(tmp_path / "release" / "model.safetensors"))
    b = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(a) == set(b)
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a)
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(ours) == set(model.state_dict())
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ours")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["decoder"]["vocab_size"] == tok.vocab_size and info["image_token_id"] == tok.image_id
    assert main(["from-release", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert set(SUBCOMMANDS) >= {"from-release", "to-release", "inspect"}
