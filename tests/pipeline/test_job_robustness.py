"""The training job as a cluster meets it: the data order does not depend on the run directory
(another out_dir, a moved and resumed run: bitwise the same losses and samples), a config error
is a ValueError naming the field before any model is built, model.init_from of another size is
refused before the build naming both sizes, and SIGTERM ends the job with the requeue status."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

import pipeline.train.job as job
import pipeline.train.local_engine as local_engine
import pipeline.train.trainer as trainer
from pipeline.model import DeepSeekOCR
from tests.pipeline.test_job import compose_run

pytestmark = pytest.mark.unit

TINY = ["train.device=cpu", "data.synth.num_train=48", "data.synth.num_val=2", "eval.num_samples=2",
        "eval.max_new_tokens=4", "data.seq_len=128", "train.log_every=1", "train.save_every=2",
        "optim.schedule=constant", "optim.warmup_steps=0", "parallel.micro_batch=1", "parallel.global_batch=2"]  # fmt: skip


def record_batches(monkeypatch) -> list[list]:
    """Every training batch's sample keys, in order (the real DeviceBatches still runs)."""
    seen, real = [], local_engine.DeviceBatches.__next__

    def take(self):
        host, batch = real(self)
        seen.append([list(row) for row in host.keys])
        return host, batch

    monkeypatch.setattr(local_engine.DeviceBatches, "__next__", take)
    return seen


def step_losses(out_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "event" not in r}


def test_order_is_independent_of_the_run_directory_and_survives_a_move(tmp_path, monkeypatch):
    seen = record_batches(monkeypatch)
    job.run_job(compose_run(tmp_path / "a", *TINY, "train.max_steps=4"))
    keys_a, seen[:] = list(seen), []
    job.run_job(compose_run(tmp_path / "elsewhere" / "b", *TINY, "train.max_steps=4"))
    assert seen == keys_a and step_losses(tmp_path / "a") == step_losses(tmp_path / "elsewhere" / "b")

    seen[:] = []
    job.run_job(compose_run(tmp_path / "c", *TINY, "train.max_steps=2"))
    shutil.move(tmp_path / "c", tmp_path / "moved")  # the run directory moves, shards and all
    job.run_job(compose_run(tmp_path / "moved", *TINY, "train.max_steps=4"))
    assert seen == keys_a  # 2 steps, then the resumed 2 steps: the same samples in the same order
    assert step_losses(tmp_path / "moved") == step_losses(tmp_path / "a")  # bitwise


BAD = [
    (["train.max_steps=-5"], "train.max_steps"),
    (["train.max_steps=0"], "train.max_steps"),
    (["parallel.micro_batch=2", "parallel.global_batch=7"], "parallel.global_batch"),
    (["parallel.dp=2", "parallel.global_batch=6", "parallel.micro_batch=2"], "parallel.global_batch"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=-1e-3"], "optim.lr"),
    (["optim.betas=[0.9,1.5]"], "optim.betas"),
    (["optim.schedule=linear"], "optim.schedule"),
    (["parallel.dtype=fp16"], "parallel.dtype"),
    (["eval.mode=huge"], "eval.mode"),
    (["data.seq_len=4"], "data.seq_len"),
    (["train.device=tpu"], "train.device"),
    (["data.kind=webdataset"], "data.sources"),
    (
        ["data.kind=webdataset", "data.sources=[{name:ocr,shards:'/nonexistent/x-*.tar'}]"],
        r"data.sources\[0\].shards",
    ),
]


@pytest.mark.parametrize(("overrides", "field"), BAD)
def test_config_errors_name_the_field_before_any_model_is_built(tmp_path, monkeypatch, overrides, field):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the config error was raised")

    monkeypatch.setattr(DeepSeekOCR, "__init__", no_model)
    with pytest.raises(ValueError, match=field):
        run = compose_run(tmp_path / "run", *TINY, *overrides)
        job.run_from_config(run)


def test_init_from_of_another_size_is_refused_before_the_build(tmp_path, monkeypatch):
    from pipeline.checkpoint_io import save_checkpoint
    from pipeline.parallel.checkpoints import check_init_from
    from pipeline.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(job.DEMO_ALPHABET)
    tok.save(tmp_path / "tok")
    ok = compose_run(tmp_path / "ok")
    model = job.build_run_model(ok.model, tok, loss_chunk_tokens=ok.parallel.loss_chunk_tokens)
    save_checkpoint(model, tok, tmp_path / "ckpt")
    init = f"model.init_from={tmp_path / 'ckpt'}"
    check_init_from(compose_run(tmp_path / "ok", init).model, tok)  # the configured size: accepted
    run = compose_run(tmp_path / "run", *TINY, f"data.tokenizer={tmp_path / 'tok'}", init,
                      "model.encoder=small", "model.decoder=small")  # fmt: skip

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the size check")

    monkeypatch.setattr(job, "load_any", no_build)
    monkeypatch.setattr(job, "DecoderModel", no_build)  # the real build in build_run_model
    with pytest.raises(
        ValueError, match=r"model.encoder=small, model.decoder=small\) is a different model size"
    ) as err:
        job.run_from_config(run)
    assert str(err.value).count("SAM ") == 2  # both sizes named


def test_sigterm_saves_and_exits_with_the_requeue_status(tmp_path, monkeypatch):
    seen = record_batches(monkeypatch)
    real = local_engine.DeviceBatches.__next__

    def take(self):  # the scheduler's SIGTERM arrives during step 1
        if len(seen) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(local_engine.DeviceBatches, "__next__", take)
    run = compose_run(tmp_path / "run", *TINY, "train.max_steps=4")
    with pytest.raises(SystemExit) as stop:
        job.run_from_config(run)
    assert stop.value.code == trainer.PREEMPTED_EXIT_CODE == 143
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")] == ["step_00000001"]


def test_compose_time_errors_come_from_the_schema():
    from pipeline.config import TrainConfig

    with pytest.raises(ValueError, match="train.max_steps=-5"):
        TrainConfig(max_steps=-5)


def test_logger_settings_are_checked_by_the_schema(tmp_path):
    """A misspelt logger kind or mode fails when the config is composed, not after the model is built."""
    from pipeline.config import LoggerConfig

    with pytest.raises(ValueError, match="logger.kind='wandbb'"):
        compose_run(tmp_path / "run", "logger.kind=wandbb")
    with pytest.raises(ValueError, match="logger.mode='ofline'"):
        LoggerConfig(kind="wandb", mode="ofline")
    assert LoggerConfig(kind="wandb", mode="offline").mode == "offline"
