"""dsocr-infer end to end on a debug checkpoint: same text as calling generate() directly."""

import json

import pytest
import torch
from PIL import Image

from data_tools.images import load_rgb
from pipeline.checkpoint_io import export_release
from pipeline.cli.infer import main
from pipeline.generation import generate
from pipeline.model import build_model
from pipeline.processing import process_image
from pipeline.prompts import PROMPTS
from pipeline.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    tok = build_char_tokenizer("abcdefghij .\n[],0123456789")
    torch.manual_seed(1)
    model = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id).eval()
    export_release(model, tok, root / "ckpt")
    paths = []
    for i, size in enumerate([(150, 90), (40, 60)]):
        path = root / f"img{i}.png"
        Image.new("RGB", size, (30 * i, 200, 100)).save(path)
        paths.append(str(path))
    return root, model, tok, paths


def test_infer_cli_matches_generate(setup, capsys):
    root, model, tok, paths = setup
    argv = ["--checkpoint", str(root / "ckpt"), "--mode", "debug-gundam", "--max-new-tokens", "8", "--json"]
    assert main([*argv, "--batch-size", "2", *paths]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    views = [[process_image(load_rgb(p), "debug-gundam")] for p in paths]
    expected = generate(model, tok, views, [PROMPTS["free_ocr"]] * 2, max_new_tokens=8)
    assert [r["image"] for r in records] == paths
    assert [r["text"] for r in records] == [e.text for e in expected]
    assert [r["hit_eos"] for r in records] == [e.hit_eos for e in expected]


def test_infer_cli_help_and_errors(setup, capsys):
    root, _, _, paths = setup
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    argv = ["--checkpoint", str(root / "ckpt"), "--mode", "debug", "--max-new-tokens", "2"]
    assert main([*argv, "--prompt", "no image tag", paths[0]]) == 2
    assert "exactly one <image>" in capsys.readouterr().err
    assert main([*argv, str(root / "missing.png")]) == 1  # ran, one input failed
    assert "missing.png" in capsys.readouterr().err
