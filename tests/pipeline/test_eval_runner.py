"""Eval runner on the debug model: batched records equal direct per-page generation, failures
(undecodable image, generation error) are recorded and scored, batch errors are isolated."""

import pytest
import torch

from data_tools.images import load_rgb
from pipeline.data.testing import png_bytes
from pipeline.eval.data import EvalSample
from pipeline.eval.runner import EvalRunConfig, evaluate, training_eval_hook
from pipeline.generation import generate
from pipeline.model import build_model
from pipeline.processing import process_image
from pipeline.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.unit

PROMPT = "<image>\nFree OCR."


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer("abcdefghij .\nFreOCR")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(5)
    m = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id).eval()
    with torch.no_grad():  # sharpen the random logits so greedy choices are far from ties
        m.decoder.lm_head.weight.mul_(20)
    return m


@pytest.fixture(scope="module")
def samples():
    pages = [EvalSample(f"p{i}", "abc def"[: 3 + i], png_bytes(64 + 16 * i, 48, seed=i)) for i in range(4)]
    pages.insert(2, EvalSample("broken", "abc", b"not an image"))
    return pages


def _config(**kw):
    return EvalRunConfig(
        mode="debug", prompt=PROMPT, batch_size=3, max_new_tokens=6, no_repeat_window=6, **kw
    )


def test_records_match_direct_generation(tok, model, samples):
    report = evaluate(model, tok, samples, _config(no_repeat_ngram_size=2), name="debug")
    assert [r.key for r in report.records] == ["p0", "p1", "broken", "p2", "p3"]
    for rec, sample in zip(report.records, samples):
        if sample.key == "broken":
            assert rec.error.startswith("image failed:") and "broken" in rec.error
            continue
        views = process_image(load_rgb(sample.image), "debug")
        direct = generate(
            model, tok, [[views]], [PROMPT], max_new_tokens=6, no_repeat_ngram_size=2, no_repeat_window=6
        )[0]
        assert (rec.prediction, rec.hit_eos) == (direct.text, direct.hit_eos)
        assert rec.tokens == len(direct.token_ids) + direct.hit_eos
        assert rec.error is None and rec.seconds > 0
    assert report.num_failed == 1 and report.per_sample[2]["cer"] == 1.0
    assert report.meta["mode"] == "debug" and report.meta["prompt"] == PROMPT
    assert report.tokens_per_s == pytest.approx(report.total_tokens / report.seconds)
    assert report.num_loops == sum(
        not r.hit_eos or len(r.prediction) > 3 * len(r.reference) for r in report.records if r.error is None
    )


def test_generation_errors_are_isolated(tok, model, samples):
    poison = process_image(load_rgb(samples[3].image), "debug").global_view  # page p2
    calls = []

    def flaky_generate(model, tokenizer, images, prompts, **kw):
        calls.append(len(images))
        if len(images) > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        if torch.equal(images[0][0].global_view, poison):
            raise ValueError("prompt too long (simulated)")
        return generate(model, tokenizer, images, prompts, **kw)

    report = evaluate(model, tok, samples, _config(), generate_fn=flaky_generate)
    # batches [p0, p1, broken] -> 2 decodable pages, [p2, p3] -> 2; each fails and is retried one by one
    assert calls == [2, 1, 1, 2, 1, 1]
    errors = {r.key: r.error for r in report.records}
    assert errors["p2"] == "generation failed: ValueError: prompt too long (simulated)"
    assert errors["broken"].startswith("image failed:")
    assert [k for k, e in errors.items() if e is None] == ["p0", "p1", "p3"]
    assert report.num_failed == 2


def test_config_validation_and_hook(tok, model, samples):
    with pytest.raises(ValueError, match="unknown image mode"):
        EvalRunConfig(mode="huge")
    with pytest.raises(ValueError, match="exactly one <image>"):
        EvalRunConfig(prompt="Free OCR.")
    with pytest.raises(ValueError, match="at least one sample"):
        evaluate(model, tok, [], _config())
    hook = training_eval_hook(tok, samples[:2], _config())
    metrics = hook(model, 7)
    report = evaluate(model, tok, samples[:2], _config())
    assert metrics["cer"] == pytest.approx(report.raw.corpus_cer)
    assert metrics["eval_failed"] == 0 and set(metrics) >= {
        "cer",
        "cer_norm",
        "loop_rate",
        "eval_pages_per_s",
    }
