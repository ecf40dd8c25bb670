"""Exports carry their training mode and prompt; inference defaults to them; auto_map only with its files."""

import json

import pytest
import torch
from PIL import Image

from data_tools.images import load_rgb
from pipeline.checkpoint_io import export_release, import_release
from pipeline.cli.infer import main as infer
from pipeline.data.config import SourceSpec
from pipeline.generation import generate
from pipeline.model import build_model
from pipeline.processing import process_image
from pipeline.prompts import PROMPTS
from pipeline.tokenizer import build_char_tokenizer
from pipeline.training_info import TrainingInfo, mode_mix, resolve_mode_prompt

pytestmark = pytest.mark.unit
RELEASE_CODE = ("modeling_deepseekocr.py", "modeling_deepseek.py", "configuration_deepseekv2.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    tok = build_char_tokenizer("abcdefghij .\n")
    torch.manual_seed(1)
    model = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id).eval()
    export_release(model, tok, root / "ckpt")
    TrainingInfo("debug", "free_ocr", {"debug": 1.0}).write(root / "ckpt")
    image = root / "line.png"
    Image.new("RGB", (120, 40), (20, 200, 90)).save(image)
    return root, model, tok, str(image)


def test_export_without_modeling_files_names_none(setup):
    root, _, _, _ = setup
    config = json.loads((root / "ckpt" / "config.json").read_text())
    assert "auto_map" not in config and "auto_map" not in config["language_config"]
    assert not list((root / "ckpt").glob("*.py"))


def test_modeling_files_from_a_release_directory_bring_auto_map(setup, tmp_path):
    _, model, tok, _ = setup
    release = tmp_path / "release"
    release.mkdir()
    for name in RELEASE_CODE:
        (release / name).write_text(f"# {name}\n")
    out = export_release(model, tok, tmp_path / "out", modeling_from=release)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_deepseekocr.DeepseekOCRForCausalLM"
    assert config["language_config"]["auto_map"]["AutoConfig"] == "configuration_deepseekv2.DeepseekV2Config"
    assert sorted(p.name for p in out.glob("*.py")) == sorted(RELEASE_CODE)
    import_release(out)  # still ours to load
    (release / "modeling_deepseek.py").unlink()  # the language model's module missing: its auto_map goes
    partial = json.loads(
        (export_release(model, tok, tmp_path / "p", modeling_from=release) / "config.json").read_text()
    )
    assert "auto_map" in partial and "auto_map" not in partial["language_config"]
    with pytest.raises(ValueError, match="no modeling files"):
        export_release(model, tok, tmp_path / "q", modeling_from=tmp_path / "out" / "nothing")


def test_mode_mix_weights_sources_and_skips_text():
    sources = [SourceSpec("a", "x.tar", 3.0, modes={"base": 1.0, "gundam": 1.0}), SourceSpec("b", "y.tar", 1.0, modes="tiny"),
               SourceSpec("t", "z.tar", 5.0, prompt="", kind="text")]  # fmt: skip
    assert mode_mix(sources) == {"base": 0.375, "gundam": 0.375, "tiny": 0.25}


def test_defaults_come_from_the_checkpoint_and_a_different_mode_warns(setup, tmp_path, capsys):
    root, _, _, _ = setup
    assert resolve_mode_prompt(root / "ckpt", None, None, "x") == ("debug", "free_ocr")
    assert capsys.readouterr().err == ""
    assert resolve_mode_prompt(root / "ckpt", "gundam", "describe", "x") == ("gundam", "describe")
    assert "trained in debug 1" in capsys.readouterr().err
    assert resolve_mode_prompt(tmp_path, None, None, "x") == (
        "gundam",
        "free_ocr",
    )  # no record: the release's


def test_infer_uses_the_trained_mode_by_default(setup, capsys):
    root, model, tok, image = setup
    assert infer(["--checkpoint", str(root / "ckpt"), "--max-new-tokens", "6", "--json", image]) == 0
    out = capsys.readouterr()
    expected = generate(
        model, tok, [[process_image(load_rgb(image), "debug")]], [PROMPTS["free_ocr"]], max_new_tokens=6
    )
    assert json.loads(out.out)["text"] == expected[0].text and "warning" not in out.err
    assert (
        infer(["--checkpoint", str(root / "ckpt"), "--mode", "gundam", "--max-new-tokens", "1", image]) == 0
    )
    assert "warning: --mode gundam" in capsys.readouterr().err
