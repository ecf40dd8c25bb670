"""The table a sweep ends with, read from the files its jobs leave."""

import json

import yaml

from pipeline.train.sweep import summarize_sweep


def job(root, num, overrides, losses=None, cers=None, finetune=None):
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if losses:
        (d / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in losses)
        )
    if cers:
        (d / "eval").mkdir()
        for stem, cer in zip(("before", "after"), cers):
            (d / "eval" / f"{stem}_report.json").write_text(json.dumps({"raw": {"corpus_cer": cer}}))
    if finetune:
        (d / "finetune_summary.json").write_text(json.dumps(finetune))


def test_one_row_per_job_with_the_swept_keys(tmp_path):
    job(tmp_path, 0, ["experiment=x", "optim.lr=0.001"], losses=[(1, 4.0), (20, 2.5)], cers=[0.9, 0.4])
    job(tmp_path, 1, ["experiment=x", "optim.lr=0.01"], losses=[(1, 4.0), (20, 3.25)], cers=[0.9, 0.6])
    job(tmp_path, 2, ["experiment=x", "optim.lr=0.1"])  # failed before writing anything
    job(tmp_path, 10, ["experiment=x", "optim.lr=1"],
        finetune={"steps": 60, "first_loss": 2.0, "last_loss": 1.0, "cer": {"target_before": 0.5, "target_after": 0.25}})  # fmt: skip
    lines = summarize_sweep(tmp_path).splitlines()
    assert (
        lines[0] == "| job | optim.lr | steps | first loss | last loss | CER before | CER after |"
    )  # experiment: same
    assert lines[2] == "| 0 | 0.001 | 20 | 4 | 2.5 | 0.9 | 0.4 |"
    assert lines[3] == "| 1 | 0.01 | 20 | 4 | 3.25 | 0.9 | 0.6 |"
    assert lines[4] == "| 2 | 0.1 | - | - | - | - | - |"
    assert lines[5] == "| 10 | 1 | 60 | 2 | 1 | 0.5 | 0.25 |"  # numeric job order
    assert (tmp_path / "sweep_summary.md").read_text().splitlines() == lines
