"""dsocr-infer / dsocr-eval on damaged inputs: a truncated weight file, a bad config.json and a
missing tokenizer give one line naming the file (exit 2, no traceback); a batch with a bad image
still gives the good images' results and lists the bad one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.cli import eval as eval_cli
from pipeline.cli.infer import main
from tests.pipeline.test_generation_infer_cli import setup  # noqa: F401 (fixture)

pytestmark = pytest.mark.unit


def damaged_copy(root, name, damage):
    target = root / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(root / "ckpt", target)
    damage(target)
    return target


def truncate(ckpt):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def bad_config(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "deepseek_vl_v2",')


def no_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()


@pytest.mark.parametrize(("damage", "file", "problem"), [
    (truncate, "model.safetensors", "truncated or corrupt"),
    (bad_config, "config.json", "not valid JSON"),
    (no_tokenizer, "tokenizer.json", "no tokenizer.json"),
])  # fmt: skip
def test_damaged_checkpoints_give_one_line_naming_the_file(setup, capsys, damage, file, problem):  # noqa: F811
    root, _, _, paths = setup
    ckpt = damaged_copy(root, damage.__name__, damage)
    assert main(["--checkpoint", str(ckpt), "--mode", "debug", "--max-new-tokens", "2", paths[0]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and file in err and problem in err, err
    with pytest.raises(ValueError, match=file):
        eval_cli.load_model(str(ckpt), "cpu", "fp32")


def test_a_bad_image_does_not_cost_the_good_ones(setup, capsys):  # noqa: F811
    root, _, _, paths = setup
    broken = root / "broken.png"
    broken.write_bytes(b"not a png")
    argv = ["--checkpoint", str(root / "ckpt"), "--mode", "debug", "--max-new-tokens", "2", "--json"]
    assert main([*argv, "--batch-size", "3", paths[0], str(broken), paths[1]]) == 1
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    good = [r for r in records if "error" not in r]
    assert [r["image"] for r in good] == [paths[0], paths[1]] and all("text" in r for r in good)
    assert "broken.png" in captured.err and "1 of 3 images failed" in captured.err


def test_eval_run_scores_the_good_pages_and_lists_the_bad_one(setup, tmp_path, capsys):  # noqa: F811
    root, _, _, paths = setup
    rows = [
        {"key": "good0", "image": paths[0], "answer": "ab"},
        {"key": "good1", "image": paths[1], "answer": "cd"},
    ]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows.insert(1, {"key": "broken", "image": str(tmp_path / "broken.png"), "answer": "x"})
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["run", "--checkpoint", str(root / "ckpt"), "--data", str(data), "--mode", "debug",
            "--max-new-tokens", "2", "--device", "cpu", "--dtype", "fp32", "--out", str(out),
            "--allow-root", str(Path(paths[0]).parent)]  # fmt: skip  (the good pages live beside the checkpoint)
    assert eval_cli.main(argv) == eval_cli.PARTIAL_FAILURE
    records = {r["key"]: r for r in map(json.loads, (out / "eval_samples.jsonl").read_text().splitlines())}
    assert records.keys() == {"good0", "good1", "broken"}
    assert (
        records["broken"]["error"] and not records["good0"].get("error") and not records["good1"].get("error")
    )
    err = capsys.readouterr().err
    assert "broken" in err and "1 of 3 pages failed" in err
