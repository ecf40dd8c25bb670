"""Evaluation runner: batched greedy generation over an eval set -> EvalReport.

Each batch: decode the images (`EvalSample.load_image`), build the views of the chosen mode
(`pipeline.processing.process_image`), then `pipeline.generation.generate` with the release's
windowed no-repeat rule (../shared/spec/architecture.md section 5). A page whose image cannot be
decoded is recorded as failed with the reason. When generation raises for a batch (ValueError:
prompt longer than the context; RuntimeError: e.g. out of memory), the batch is retried one page
at a time so only the pages that fail on their own are recorded as failed. Timing: each record
gets its share of its batch's wall time (image decoding included); pages/s and tokens/s use the
total wall time. Used standalone (`dsocr-eval`) and periodically inside training
(`training_eval_hook`, whose metrics the run log and `pipeline.eval.plots` pick up).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_tools.images import DEFAULT_MAX_PIXELS
from pipeline.batch import ImageViews
from pipeline.eval.data import EvalSample
from pipeline.eval.metrics import Normalizer
from pipeline.eval.report import EvalReport, SampleRecord, build_report
from pipeline.processing import get_mode, process_image
from pipeline.prompts import get_prompt
from pipeline.tokenizer import IMAGE_TOKEN, OCRTokenizer

log = logging.getLogger(__name__)
GenerateFn = Callable[..., list]


@dataclass(frozen=True)
class EvalRunConfig:
    """What to evaluate and how to decode.

    mode: image mode name (tiny/small/base/large/gundam). prompt: a PROMPTS name or a literal
    prompt with one `<image>`. no_repeat_ngram_size None/0 disables the rule; whitelist_ids None
    uses generation's default (`<td>`, `</td>`). loop_factor: outputs longer than this x the
    reference count as loops.
    """

    mode: str = "tiny"
    prompt: str = "free_ocr"
    batch_size: int = 8
    max_new_tokens: int = 8192
    no_repeat_ngram_size: int | None = 30
    no_repeat_window: int = 90
    whitelist_ids: tuple[int, ...] | None = None
    min_tiles: int = 2
    max_tiles: int = 9
    max_pixels: int = DEFAULT_MAX_PIXELS
    loop_factor: float = 3.0
    normalizer: Normalizer = field(default_factory=Normalizer)

    def __post_init__(self) -> None:
        get_mode(self.mode)  # ValueError for an unknown mode
        if get_prompt(self.prompt).count(IMAGE_TOKEN) != 1:
            raise ValueError(f"eval prompt must hold exactly one {IMAGE_TOKEN}, got {self.prompt!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"batch_size and max_new_tokens must be >= 1, got {self.batch_size}, {self.max_new_tokens}"
            )
        if self.no_repeat_ngram_size is not None and self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 or None, got {self.no_repeat_ngram_size}")
        if self.no_repeat_window < 1 or self.loop_factor <= 0:
            raise ValueError("no_repeat_window must be >= 1 and loop_factor > 0")


def _default_generate() -> GenerateFn:
    from pipeline.generation import generate

    return generate


def _views(sample: EvalSample, cfg: EvalRunConfig) -> ImageViews:
    image = sample.load_image(max_pixels=cfg.max_pixels)
    return process_image(image, cfg.mode, min_tiles=cfg.min_tiles, max_tiles=cfg.max_tiles, source=sample.key)


def _failure_reason(exc: BaseException) -> str:
    return f"generation failed: {type(exc).__name__}: {str(exc)[:300]}"


def _generate(
    model: nn.Module,
    tokenizer: OCRTokenizer,
    views: list[ImageViews],
    cfg: EvalRunConfig,
    generate_fn: GenerateFn,
) -> list:
    return generate_fn(
        model,
        tokenizer,
        [[v] for v in views],
        [get_prompt(cfg.prompt)] * len(views),
        max_new_tokens=cfg.max_new_tokens,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        no_repeat_window=cfg.no_repeat_window,
        whitelist_ids=cfg.whitelist_ids,
    )


def _run_batch(
    model: nn.Module,
    tokenizer: OCRTokenizer,
    batch: Sequence[EvalSample],
    cfg: EvalRunConfig,
    generate_fn: GenerateFn,
) -> list[SampleRecord]:
    start = time.perf_counter()
    records: dict[str, SampleRecord] = {}
    ready: list[tuple[EvalSample, ImageViews]] = []
    for sample in batch:
        try:
            ready.append((sample, _views(sample, cfg)))
        except ValueError as exc:
            log.warning("eval sample %s (%s): image failed: %s", sample.key, sample.source, exc)
            records[sample.key] = SampleRecord(sample.key, sample.reference, error=f"image failed: {exc}")
    if ready:
        try:
            results = _generate(model, tokenizer, [v for _, v in ready], cfg, generate_fn)
            if len(results) != len(ready):
                raise RuntimeError(f"generate returned {len(results)} results for {len(ready)} prompts")
            pairs = list(zip(ready, results))
        except (ValueError, RuntimeError) as exc:
            if len(ready) == 1:
                sample = ready[0][0]
                log.warning("eval sample %s (%s): %s", sample.key, sample.source, _failure_reason(exc))
                records[sample.key] = SampleRecord(sample.key, sample.reference, error=_failure_reason(exc))
                pairs = []
            else:
                log.warning("eval batch failed (%s); retrying its %d pages one by one", exc, len(ready))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                for record in (
                    r for sample, _ in ready for r in _run_batch(model, tokenizer, [sample], cfg, generate_fn)
                ):
                    records[record.key] = record
                pairs = []
        for (sample, _), result in pairs:
            tokens = len(result.token_ids) + int(result.hit_eos)  # generated ids incl. the EOS
            records[sample.key] = SampleRecord(
                sample.key, sample.reference, result.text, result.hit_eos, None, tokens
            )
    share = (time.perf_counter() - start) / len(batch)
    out = [records[s.key] for s in batch]
    for record in out:
        if record.seconds == 0.0:
            record.seconds = share
    return out


def evaluate(
    model: nn.Module,
    tokenizer: OCRTokenizer,
    samples: Sequence[EvalSample],
    config: EvalRunConfig | None = None,
    *,
    name: str = "",
    meta: dict[str, Any] | None = None,
    generate_fn: GenerateFn | None = None,
    progress: Callable[[int, int], None] | None = None,
    **overrides: Any,
) -> EvalReport:
    """Generate for every sample and score it; keyword overrides replace EvalRunConfig fields
    (e.g. `evaluate(model, tok, samples, mode="small", batch_size=4)`)."""
    cfg = dataclasses.replace(config or EvalRunConfig(), **overrides)
    if not samples:
        raise ValueError("evaluate needs at least one sample")
    generate_fn = generate_fn or _default_generate()
    records: list[SampleRecord] = []
    start = time.perf_counter()
    # generation runs eagerly: blocks compiled for training would recompile for every decode shape
    with torch.compiler.set_stance("force_eager"):
        for i in range(0, len(samples), cfg.batch_size):
            records += _run_batch(model, tokenizer, samples[i : i + cfg.batch_size], cfg, generate_fn)
            if progress is not None:
                progress(len(records), len(samples))
    wall = time.perf_counter() - start
    info = {"mode": cfg.mode, "prompt": get_prompt(cfg.prompt), "max_new_tokens": cfg.max_new_tokens}
    info.update(no_repeat_ngram_size=cfg.no_repeat_ngram_size, no_repeat_window=cfg.no_repeat_window)
    return build_report(
        records,
        name=name,
        normalizer=cfg.normalizer,
        loop_factor=cfg.loop_factor,
        wall_seconds=wall,
        meta={**info, **(meta or {})},
    )


def training_eval_hook(
    tokenizer: OCRTokenizer,
    samples: Sequence[EvalSample],
    config: EvalRunConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    generate_fn: GenerateFn | None = None,
) -> Callable[[nn.Module, int], dict[str, float]]:
    """`hook(model, step) -> metrics` for periodic evaluation inside training.

    The metrics are flat scalars for the run log (`cer` is what the CER plot reads); with
    out_dir each evaluation also writes its report and per-sample JSONL as `eval_step<N>_*`.
    """
    config = config or EvalRunConfig()
    if not samples:
        raise ValueError("training_eval_hook needs at least one eval sample")

    def hook(model: nn.Module, step: int) -> dict[str, float]:
        report = evaluate(model, tokenizer, samples, config, name=f"step {step}", generate_fn=generate_fn)
        if out_dir is not None:
            report.write(out_dir, stem=f"eval_step{step:08d}")
        return {
            "cer": report.raw.corpus_cer,
            "cer_norm": report.normalized.corpus_cer,
            "mean_cer": report.raw.mean_cer,
            "capped_cer": report.raw.capped_cer,
            "wer": report.raw.corpus_wer,
            "loop_rate": report.loop_rate,
            "eval_failed": report.num_failed,
            "eval_pages_per_s": report.pages_per_s,
            "eval_tokens_per_s": report.tokens_per_s,
        }

    return hook
