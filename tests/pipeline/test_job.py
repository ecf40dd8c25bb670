"""The embedded default, shortened: the same job the README's first command runs."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.cli.train import CONFIG_DIR
from pipeline.config import register_configs, to_run_config
from pipeline.train.job import run_job

CUDA = torch.cuda.is_available()


def compose_run(out_dir, *overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="train", overrides=[f"train.out_dir={out_dir}", *overrides])
    return to_run_config(cfg)


@pytest.mark.slow
def test_embedded_default_loss_falls_and_run_leaves_artifacts(tmp_path):
    run = compose_run(
        tmp_path / "run",
        "data.synth.num_train=600",
        "data.synth.num_val=16",
        "eval.num_samples=16",
        "train.max_steps=80",
        "train.log_every=10",
        "train.save_every=40",
        "train.eval_every=40",
        "optim.warmup_steps=20",
    )
    job = run_job(run)
    # From ~ln(vocab) = 4.6 nats at init, 80 steps of the default recipe reach < 2.9
    # (the character-frequency plateau is ~3.0); measured ~2.0-2.5 on 2 cores.
    assert job.first_loss > 4.0
    assert job.last_loss < job.first_loss - 1.5, (job.first_loss, job.last_loss)
    out = job.out_dir
    for rel in (
        "metrics.jsonl",
        "model/config.json",
        "eval/before_report.json",
        "eval/after_report.json",
        "eval/contact_sheet.png",
        "plots/losses.png",
        "tokenizer",
    ):
        assert (out / rel).exists(), rel
    assert job.checkpoint is not None and job.checkpoint.name == "step_00000080"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and any(r["step"] == 80 for r in records)
    logged = [r for r in records if "loss" in r and "event" not in r]
    assert logged and all(0.0 <= r["data_wait"] <= 1.0 for r in logged)  # fraction of the step
    periodic = [r for r in records if r.get("event") == "eval" and "capped_cer" in r]
    assert [r["step"] for r in periodic] == [40, 80]
    assert all(0.0 <= r["capped_cer"] <= 1.0 for r in periodic)


@pytest.mark.unit
def test_job_refuses_pipeline_layouts(tmp_path):
    run = compose_run(tmp_path / "run", "parallel.pp=2")
    with pytest.raises(ValueError, match="parallel.pp=2"):
        run_job(run)


@pytest.mark.slow
def test_paragraph_and_persian_sets_are_trained_and_evaluated_separately_within_the_time_box(tmp_path):
    run = compose_run(
        tmp_path / "run",
        "data.synth.num_train=200",
        "data.synth.paragraphs=60",
        "data.synth.persian=60",
        "data.synth.paragraph_lines=4",
        "data.synth.paragraph_chars=16",
        "data.synth.num_val=6",
        "data.seq_len=256",
        "eval.num_samples=6",
        "train.max_steps=100000",
        "train.max_minutes=0.02",  # ~1 s of training: the time box, not max_steps, ends the run
        "train.eval_every=0",
        "train.save_every=0",
    )
    job = run_job(run)
    assert 0 < job.steps < 100000
    assert set(job.other_sets) == {"paragraphs", "persian"}
    assert all(before is not None and after is not None for before, after in job.other_sets.values())
    out = job.out_dir
    for name in ("paragraphs", "persian"):
        for rel in (f"before_{name}_report.json", f"after_{name}_report.json", f"contact_sheet_{name}.png"):
            assert (out / "eval" / rel).exists(), rel
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "time_limit" for r in records)
    # the character tokenizer covers every Persian character the generator can produce
    from pipeline.tokenizer import load_tokenizer
    from pipeline.train.synth_lines import lang_alphabet

    tokenizer = load_tokenizer(str(out / "tokenizer"))
    unk = tokenizer.encode("\uffff")[0]
    assert unk not in tokenizer.encode(lang_alphabet("fa"))


@pytest.mark.unit
def test_reading_ranks_refuse_missing_synth_shards(tmp_path):
    """In a multi-process job only one rank renders; a rank that reads must find complete shards."""
    from pipeline.train.job import prepare_job_data

    run = compose_run(tmp_path / "run", "data.synth.num_train=8", "data.synth.num_val=2")
    with pytest.raises(ValueError, match="no complete shards of reading-lines-train"):
        prepare_job_data(run.data, run.eval, tmp_path / "run", render=False)


@pytest.mark.config
def test_lines_first_holds_back_the_other_sets(tmp_path):
    from pipeline.train.job import loader_config

    run = compose_run(tmp_path / "run", "data.synth.paragraphs=60", "data.synth.persian=30",
                      "data.synth.lines_first=5000")  # fmt: skip
    shards = {name: f"/data/{name}-*.tar" for name in ("lines", "paragraphs", "persian")}
    cfg = loader_config(run.data, run.eval, shards, batch_size=run.parallel.micro_batch, seed=run.train.seed)
    assert {s.name: s.start_after for s in cfg.sources} == {
        "reading-lines": 0,
        "reading-paragraphs": 5000,
        "reading-persian": 5000,
    }
    assert [s.weight for s in cfg.sources] == [run.data.synth.num_train, 60, 30]


@pytest.mark.config
def test_paragraphs_can_have_their_own_page_size_and_mode(tmp_path):
    from pipeline.train.job import loader_config, set_eval_config
    from pipeline.train.synth_lines import synth_sets

    run = compose_run(tmp_path / "run", "data.synth.paragraphs=60", "data.synth.persian=30",
                      "data.synth.paragraph_size=1024", "data.synth.paragraph_mode=base")  # fmt: skip
    sets = {s.name: s for s in synth_sets(run.data)}
    assert {name: (s.train.width, s.val.width, s.mode) for name, s in sets.items()} == {
        "lines": (256, 256, "debug-256"), "paragraphs": (1024, 1024, "base"), "persian": (256, 256, "debug-256")
    }  # fmt: skip
    shards = {name: f"/data/{name}-*.tar" for name in sets}
    sources = loader_config(
        run.data, run.eval, shards, batch_size=run.parallel.micro_batch, seed=run.train.seed
    ).sources
    assert [s.modes for s in sources] == ["debug-256", "base", "debug-256"]
    assert set_eval_config(run.data, run.eval, "paragraphs").mode == "base"
    assert set_eval_config(run.data, run.eval, "persian").mode == "debug-256"
    bad = compose_run(tmp_path / "bad", "data.synth.paragraphs=60", "data.synth.paragraph_mode=huge")
    with pytest.raises(ValueError, match="unknown mode 'huge'"):
        loader_config(bad.data, bad.eval, {"lines": "/l.tar", "paragraphs": "/p.tar"}, batch_size=1, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")])],
)
def test_continued_job_resumes_and_keeps_the_untrained_reports(tmp_path, device):
    common = [f"train.device={device}", "data.synth.num_train=200", "data.synth.paragraphs=20", "data.synth.paragraph_lines=3",
              "data.synth.paragraph_chars=16", "data.synth.num_val=4", "data.seq_len=256",
              "eval.num_samples=4", "train.eval_every=0", "train.save_every=0"]  # fmt: skip
    first = run_job(compose_run(tmp_path / "run", *common, "train.max_steps=4"))
    reports = sorted((first.out_dir / "eval").glob("before*_report.json"))
    assert [p.name for p in reports] == ["before_paragraphs_report.json", "before_report.json"]
    stamps = [p.stat().st_mtime_ns for p in reports]
    second = run_job(compose_run(tmp_path / "run", *common, "train.max_steps=8"))
    assert (first.steps, second.steps) == (4, 8)
    assert [p.stat().st_mtime_ns for p in reports] == stamps  # not evaluated again
    assert (second.cer_before, second.capped_before) == (first.cer_before, first.capped_before)
    assert second.other_sets["paragraphs"][0] == first.other_sets["paragraphs"][0]
    records = [json.loads(line) for line in (second.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" and r["step"] == 4 for r in records)


def test_each_data_kind_checks_its_paths_before_any_build(tmp_path):
    """The job asks the data kind, never branches on it: an unknown kind and a real_lines run
    without its corpus are refused by validate_data_paths, naming the field."""
    from dataclasses import replace

    from pipeline.config import RunConfig, SourceConfig
    from pipeline.train.data_kinds import KINDS, data_kind
    from pipeline.train.job import validate_data_paths

    run = RunConfig()
    assert data_kind(run.data) is KINDS["synth_lines"]  # the embedded default is one kind among three
    validate_data_paths(run.data)
    with pytest.raises(ValueError, match="data.real_root"):
        validate_data_paths(replace(run.data, kind="real_lines"))
    source = SourceConfig(name="mine", shards=str(tmp_path / "none-*.tar"))
    missing = replace(run.data, kind="webdataset", sources=[source])
    with pytest.raises(ValueError, match=r"data.sources\[0\].shards="):
        validate_data_paths(missing)
    run.data.kind = "csv"  # past the schema (a config edited after composition)
    with pytest.raises(ValueError, match="data.kind must be one of synth_lines, real_lines, webdataset"):
        data_kind(run.data)
