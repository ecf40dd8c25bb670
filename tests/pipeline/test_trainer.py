"""The one training loop (pipeline/train/trainer.py) over the one-device engine: a non-finite step
is a no-op (the run equals one that never saw its batch, bitwise), is counted, and too many in a
row stop the run naming the last good checkpoint; the time box ends a run like a finished one;
every logged step record carries the common keys."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
from torch import nn

from pipeline.config import LoggerConfig, OptimConfig, ParallelConfig, TrainConfig
from pipeline.data.config import LoaderConfig
from pipeline.data.loader import StreamingLoader
from pipeline.data.testing import write_ocr_shards
from pipeline.model import build_model
from pipeline.tokenizer import build_char_tokenizer
from pipeline.train.local_engine import local_trainer
from pipeline.train.logging import RunLogger
from pipeline.train.trainer import STEP_KEYS

pytestmark = pytest.mark.unit

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 _"
OPTIM = OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
PARALLEL = ParallelConfig(micro_batch=1, global_batch=2)  # two micro-batches per step


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = build_char_tokenizer(ALPHABET)
    shards = write_ocr_shards(tmp_path_factory.mktemp("shards"), num_shards=1, per_shard=12)
    loader = StreamingLoader(LoaderConfig.debug(shards, seq_len=256, batch_size=1), tok, dp_rank=0, dp_world=1)
    return tok, list(itertools.islice(iter(loader), 16))


class PoisonedSteps(nn.Module):
    """The model whose loss is NaN on the chosen micro-batch calls (0-based)."""

    def __init__(self, model: nn.Module, poisoned: set[int]) -> None:
        super().__init__()
        self.model, self.poisoned, self.calls = model, poisoned, 0

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    @property
    def decoder(self) -> nn.Module:
        return self.model.decoder

    def forward(self, batch):
        out = self.model(batch)
        if self.calls in self.poisoned:
            out = dataclasses.replace(out, loss=out.loss * float("nan"))
        self.calls += 1
        return out


def train(tmp_path, tok, batches, *, steps: int, poisoned=frozenset(), **train_cfg):
    torch.manual_seed(0)
    model = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id,
                        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)  # fmt: skip
    cfg = TrainConfig(max_steps=steps, out_dir=str(tmp_path), log_every=1, **train_cfg)
    logger = RunLogger(tmp_path, LoggerConfig(), {}, "t")
    trainer = local_trainer(PoisonedSteps(model, set(poisoned)), batches, train=cfg, optim=OPTIM,
                            parallel=PARALLEL, seq_len=256, device=torch.device("cpu"), logger=logger)  # fmt: skip
    result = trainer.train(final_checkpoint=False)
    logger.close()
    return result, model


def test_a_non_finite_step_is_a_no_op_and_counted(tmp_path, setup):
    tok, batches = setup
    # step 2 (micro-batches 2, 3) is poisoned in one micro-batch: the whole step is dropped
    result, model = train(tmp_path / "bad", tok, batches, steps=4, poisoned={3})
    clean, reference = train(tmp_path / "ref", tok, batches[:2] + batches[4:], steps=4)
    assert result.steps == clean.steps == 4 and result.bad_steps == 1 and clean.bad_steps == 0
    assert result.losses == clean.losses  # the same schedule position and weights at every good step
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    events = [json.loads(line) for line in (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()]
    assert [e["in_row"] for e in events if e.get("event") == "bad_loss"] == [1]
    records = [e for e in events if "loss" in e and "event" not in e]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["bad_steps"] == 1
    assert all(set(STEP_KEYS) - {"mfu"} <= r.keys() for r in records)  # mfu only with a known GPU peak


def test_too_many_non_finite_steps_in_a_row_stop_the_run(tmp_path, setup):
    tok, batches = setup
    with pytest.raises(RuntimeError, match=r"2 non-finite losses in a row at step 1.*step_00000001"):
        train(tmp_path, tok, batches, steps=6, poisoned={2, 4, 6}, max_bad_steps=2, save_every=1)


def test_the_time_box_ends_the_run_at_a_step_boundary(tmp_path, setup):
    tok, batches = setup
    result, _ = train(tmp_path, tok, batches, steps=6, max_minutes=1e-9)
    assert result.stopped_by_time and result.steps == 1 and not result.stopped_by_signal
