"""Checkpoints survive a kill at every phase of a save and of a re-save: the resumed run is
bitwise the uninterrupted one (losses and final weights); incomplete checkpoints are skipped with
a log line; training state is read without unpickling, so a planted pickle never runs."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import pipeline.atomic as atomic
import pipeline.train.local_engine as local_engine
from pipeline.config import OptimConfig, ParallelConfig, RunConfig, TrainConfig
from pipeline.data.config import LoaderConfig
from pipeline.data.loader import StreamingLoader
from pipeline.data.testing import write_ocr_shards
from pipeline.model import build_model
from pipeline.tokenizer import build_char_tokenizer
from pipeline.train.checkpoint import checkpoint_dir, complete_checkpoints, latest_checkpoint
from pipeline.train.state_io import load_state, save_state
from pipeline.train.trainer import Trainer

pytestmark = pytest.mark.unit

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 _"
STEPS = 4


class Killed(BaseException):
    """A simulated SIGKILL: nothing in the code under test catches it."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_ocr_shards(tmp_path_factory.mktemp("shards"), num_shards=2, per_shard=6)


def trainer(out_dir: Path, shards: list[str]) -> Trainer:
    torch.manual_seed(0)
    tok = build_char_tokenizer(ALPHABET)
    run = RunConfig(
        optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
        parallel=ParallelConfig(micro_batch=1, global_batch=1),
        train=TrainConfig(max_steps=STEPS, save_every=2, keep_last=3, out_dir=str(out_dir), log_every=1),
    )
    model = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id,
                        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)  # fmt: skip
    loader = StreamingLoader(
        LoaderConfig.debug(shards, seq_len=256, batch_size=1), tok, dp_rank=0, dp_world=1
    )
    return local_engine.local_trainer(model, loader, train=run.train, optim=run.optim, parallel=run.parallel,
                                      seq_len=256, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    t = trainer(tmp_path_factory.mktemp("ref"), shards)
    result = t.train()
    return result.losses, {k: v.clone() for k, v in t.engine.model.state_dict().items()}


def assert_same_weights(model, expected) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


class _FaultyOs:
    """`os` for pipeline.atomic whose `replace` call number `kill_at` (1-based) is a kill."""

    def __init__(self, kill_at: int) -> None:
        self.kill_at, self.calls = kill_at, 0

    def replace(self, src, dst):
        self.calls += 1
        if self.calls == self.kill_at:
            raise Killed(f"os.replace({src}, {dst})")
        return os.replace(src, dst)

    def __getattr__(self, name):
        return getattr(os, name)


def _raise_killed(*args, **kwargs):
    raise Killed("kill")


def inject(monkeypatch, phase: str) -> None:
    """Arm a kill at `phase` of the next checkpoint save."""
    if phase == "write":
        monkeypatch.setattr(local_engine, "save_state", _raise_killed)
    elif phase == "manifest":
        monkeypatch.setattr(atomic, "write_manifest", _raise_killed)
    elif phase.startswith("replace"):
        monkeypatch.setattr(atomic, "os", _FaultyOs(int(phase[-1])))
    elif phase == "delete_old":
        real = shutil.rmtree

        def rmtree(path, *a, **kw):
            if Path(path).name.startswith(".old-"):
                raise Killed("rmtree old")
            return real(path, *a, **kw)

        monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)


def resume_and_finish(out_dir: Path, shards) -> tuple[Trainer, int, list[float]]:
    t = trainer(out_dir, shards)
    ckpt = t.resume()
    start = t.step
    assert ckpt is not None and atomic.incomplete_reason(ckpt) is None
    return t, start, t.train().losses


@pytest.mark.parametrize("phase", ["write", "manifest", "replace1"])
def test_kill_during_a_save_resumes_bitwise(tmp_path, shards, reference, monkeypatch, phase):
    losses, weights = reference
    t = trainer(tmp_path, shards)
    real_save = t.save

    def save():  # the save of step 2 goes through; the one of step 4 is killed at `phase`
        if t.step == STEPS:
            inject(monkeypatch, phase)
        return real_save()

    t.save = save
    with pytest.raises(Killed):
        t.train()
    monkeypatch.undo()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002"]
    resumed, start, more = resume_and_finish(tmp_path, shards)
    assert start == 2 and losses[:2] + more == losses  # bitwise
    assert_same_weights(resumed.engine.model, weights)


@pytest.mark.parametrize("phase", ["write", "manifest", "replace1", "replace2", "delete_old"])
def test_kill_during_a_resave_keeps_a_complete_checkpoint(tmp_path, shards, reference, monkeypatch, phase):
    """The end-of-run save of a step that already has its periodic checkpoint (max_steps a multiple
    of save_every, or SIGTERM right after a periodic save)."""
    losses, weights = reference
    t = trainer(tmp_path, shards)
    assert t.train().losses == losses
    inject(monkeypatch, phase)
    with pytest.raises(Killed):
        t.save()
    monkeypatch.undo()
    resumed, start, more = resume_and_finish(tmp_path, shards)
    # replace2: the old step 4 is set aside, the new one not yet in, so step 2 is the newest
    assert start == (2 if phase == "replace2" else STEPS)
    assert losses[:start] + more == losses
    assert_same_weights(resumed.engine.model, weights)
    trainer(tmp_path, shards).save()  # the next save clears the leftovers of the killed one
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_incomplete_checkpoints_are_skipped_and_logged(tmp_path, shards, caplog):
    t = trainer(tmp_path, shards)
    t.train()
    newest = checkpoint_dir(tmp_path, STEPS)
    state = newest / "trainer_state.safetensors"
    state.write_bytes(state.read_bytes()[:-10])  # a short file: the size differs from the manifest
    with caplog.at_level(logging.WARNING, logger="pipeline.atomic"):
        assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)
    assert "step_00000004" in caplog.text and "trainer_state.safetensors" in caplog.text
    (newest / atomic.MANIFEST).unlink()
    assert atomic.incomplete_reason(newest).startswith("no manifest.json")


def test_state_round_trips_exactly(tmp_path):
    import random

    import numpy as np

    state = {
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}],
        },  # fmt: skip
        "data": {"consumers": {0: {"buffer": [], "skips": {"unique": [["bad", "a.tar", "k"]]}}}},
        "tied": [torch.ones(2)] * 2,
    }
    save_state(state, tmp_path, "s")
    back = load_state(tmp_path, "s")
    assert back["rng"]["python"] == state["rng"]["python"]
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(back["rng"]["numpy"], state["rng"]["numpy"], strict=True))  # fmt: skip
    assert back["rng"]["numpy"][1].dtype == state["rng"]["numpy"][1].dtype
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert back["data"] == state["data"] and len(back["tied"]) == 2


class _Payload:
    """Unpickling this calls `Path(marker).touch()`: code a checkpoint file must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    save_state({"x": torch.ones(1)}, tmp_path, "trainer_state")
    with open(tmp_path / "trainer_state.safetensors", "wb") as f:
        pickle.dump(_Payload(marker), f)
    with pytest.raises(ValueError, match="trainer_state.safetensors"):
        load_state(tmp_path, "trainer_state")
    assert not marker.exists()
    # an engine file (DeepSpeed would load it with weights_only=False): refused before DeepSpeed sees it
    from pipeline.parallel.checkpoints import ENGINE_TAG, check_engine_files, load_engine_module

    engine = tmp_path / "ckpt" / ENGINE_TAG
    engine.mkdir(parents=True)
    torch.save(
        {"module": {"w": torch.ones(1)}, "evil": _Payload(marker)}, engine / "mp_rank_00_model_states.pt"
    )
    with pytest.raises(ValueError, match="would import"):
        check_engine_files(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt"):
        load_engine_module(engine / "mp_rank_00_model_states.pt")
    assert not marker.exists()
