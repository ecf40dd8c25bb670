"""Resuming into a run directory: a changed config is refused or recorded; the first loss survives a resume."""

import json

import pytest
import yaml

from pipeline.train.checkpoint import save_checkpoint
from pipeline.train.run_dir import config_differences, first_logged_loss, record_config

BASE = {
    "name": "a",
    "optim": {"lr": 0.001},
    "train": {"max_steps": 20, "save_every": 10},
    "data": {"sources": [{"shards": "x"}]},
}


def dump(**changes) -> str:
    config = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        *path, leaf = dotted.split("__")
        node = config
        for key in path:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[leaf] = value
    return yaml.safe_dump(config)


def checkpointed(tmp_path, config_yaml: str):
    record_config(tmp_path, config_yaml, resume=True, allow_change=False)
    save_checkpoint(tmp_path, 10, lambda d: (d / "state").write_text("x"), keep_last=1)


def test_differences_skip_run_length_fields_and_reach_into_lists():
    assert config_differences(dump(), dump(train__max_steps=200, train__save_every=50)) == []
    changes = config_differences(dump(), dump(optim__lr=0.01, data__sources__0__shards="y"))
    assert changes == [("data.sources.0.shards", "x", "y"), ("optim.lr", 0.001, 0.01)]
    # an option the earlier run did not know yet, left empty, is no change; set, it is
    assert config_differences(dump(), dump(finetune={"mode": ""})) == []
    assert config_differences(dump(), dump(finetune={"mode": "base"})) == [
        ("finetune.mode", "<unset>", "base")
    ]


def test_resume_under_another_config_is_refused_with_the_differences(tmp_path):
    checkpointed(tmp_path, dump())
    with pytest.raises(ValueError, match=r"optim\.lr: 0\.001 -> 0\.01") as err:
        record_config(tmp_path, dump(optim__lr=0.01), resume=True, allow_change=False)
    assert "train.allow_config_change=true" in str(err.value)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.001  # untouched
    # a longer run of the same config continues
    record_config(tmp_path, dump(train__max_steps=40), resume=True, allow_change=False)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["max_steps"] == 40


def test_an_allowed_change_keeps_both_configs(tmp_path):
    checkpointed(tmp_path, dump())
    record_config(tmp_path, dump(optim__lr=0.01), resume=True, allow_change=True)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.01
    kept = yaml.safe_load((tmp_path / "config.until_step_00000010.yaml").read_text())
    assert kept["optim"]["lr"] == 0.001


def test_no_checkpoint_or_no_resume_means_a_fresh_config(tmp_path):
    record_config(tmp_path, dump(), resume=True, allow_change=False)
    record_config(tmp_path, dump(optim__lr=0.5), resume=True, allow_change=False)  # nothing trained yet
    checkpointed(tmp_path, dump(optim__lr=0.5))
    record_config(tmp_path, dump(optim__lr=0.7), resume=False, allow_change=False)  # train.resume=false
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.7


def test_first_loss_is_the_runs_first_step_across_a_resume(tmp_path):
    lines = [{"step": 1, "loss": 4.5}, {"step": 5, "loss": 3.0}, {"event": "resume", "step": 5, "loss": 9.9},
             {"step": 6, "loss": 2.9}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n{cut")
    assert first_logged_loss(tmp_path) == 4.5
    # a run restarted from scratch in the same directory: its own step 1
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("\n" + json.dumps({"step": 1, "loss": 7.0}) + "\n")
    assert first_logged_loss(tmp_path) == 7.0
    assert first_logged_loss(tmp_path / "none") is None
