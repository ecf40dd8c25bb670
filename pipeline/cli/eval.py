"""`dsocr-eval`: evaluate a checkpoint on an eval set, score prediction files, run the tesseract
baseline, the compression study, markdown export and training-run plots.

Subcommands (all write into --out):
  run          checkpoint + eval set -> eval_samples.jsonl, eval_report.{json,txt}
               (--tesseract adds the baseline on the same pages and a side-by-side table;
               --markdown writes per-page markdown for grounding prompts)
  score        re-score a prediction JSONL (optionally against another reference set)
  tesseract    the tesseract baseline alone
  compression  Table 2 protocol: evaluate several modes (or reuse prediction files) and bucket
               pages by ground-truth tokens
  markdown     prediction JSONL -> per-page markdown files (+ edit distance against --references)
  plots        a run's metrics.jsonl -> PNGs

Checkpoints are loaded with `pipeline.checkpoint_io.load_any` (our layout or the released one,
e.g. an `export_release` of a consolidated training checkpoint), strictly: weights of a different
size than the config describes fail with the mismatching tensors named. Metrics: docs/evaluation.md.

Exit status: 0 done; 1 done, but some pages failed (listed on stderr, counted in the reports);
2 nothing ran (a config, data or checkpoint error, one line naming the file).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli.help import DefaultsHelpFormatter
from pipeline.eval.compression import (
    DEFAULT_BUCKET_EDGES,
    NOMINAL_VISION_TOKENS,
    compression_study,
    count_text_tokens,
    vision_tokens_of,
)
from pipeline.eval.data import EvalSample, read_eval_set, references_of
from pipeline.eval.markdown import MarkdownConfig, score_markdown, write_markdown_pages
from pipeline.eval.metrics import Normalizer
from pipeline.eval.plots import plot_run
from pipeline.eval.report import EvalReport, build_report, format_comparison, read_records_jsonl
from pipeline.eval.tesseract import TesseractConfig, TesseractNotFoundError, run_tesseract
from pipeline.processing import MODES

PARTIAL_FAILURE = 1  # exit status: the command ran, some inputs failed (listed on stderr)

log = logging.getLogger("dsocr-eval")


# --------------------------------------------------------------------------- arguments
def _add_normalizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("normalised metrics")
    g.add_argument("--zwnj", choices=("remove", "space", "keep"), default="remove", help="ZWNJ handling")
    g.add_argument("--no-fold-arabic", action="store_true", help="keep ي/ى/ك as they are")
    g.add_argument("--keep-diacritics", action="store_true", help="keep Arabic diacritics and tatweel")
    g.add_argument("--fold-digits", action="store_true", help="Arabic-Indic/Persian digits -> ASCII")
    g.add_argument("--casefold", action="store_true", help="case-insensitive normalised metrics")
    g.add_argument(
        "--strip-grounding", action="store_true", help="normalised metrics ignore <|ref|>/<|det|> tags"
    )
    g.add_argument("--loop-factor", type=float, default=3.0, help="output > this x reference = loop")


def _normalizer(args: argparse.Namespace) -> Normalizer:
    return Normalizer(
        strip_grounding=args.strip_grounding,
        fold_arabic_letters=not args.no_fold_arabic,
        remove_arabic_diacritics=not args.keep_diacritics,
        fold_digits=args.fold_digits,
        zwnj=args.zwnj,
        casefold=args.casefold,
    )


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help=".jsonl, .csv, .tar, shard pattern or folder of shards")
    p.add_argument("--reference-field", default=None, help="JSON/CSV field of the reference text")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N pages only")
    p.add_argument(
        "--allow-root",
        default=None,
        help="folder that image paths of a JSONL/CSV set may lead into besides the set's own folder",
    )


def _add_model_args(p: argparse.ArgumentParser, modes: bool = False) -> None:
    p.add_argument("--checkpoint", required=not modes, help="checkpoint directory (release layout or ours)")
    if not modes:
        p.add_argument("--mode", default=None, help="image mode, one of " + ", ".join(sorted(MODES))
                       + " (default: the checkpoint's training_info.json, else gundam)")  # fmt: skip
    p.add_argument("--prompt", default=None, help="prompt name or literal prompt with <image> "
                   "(default: the checkpoint's training_info.json, else free_ocr)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8192)
    p.add_argument("--no-repeat-ngram", type=int, default=30, help="0 disables the no-repeat rule")
    p.add_argument("--no-repeat-window", type=int, default=90)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on GPU, fp32 on CPU"
    )


def _add_tesseract_args(p: argparse.ArgumentParser, flag: bool) -> None:
    if flag:
        p.add_argument("--tesseract", action="store_true", help="also run the tesseract baseline")
    p.add_argument("--tesseract-langs", nargs="+", default=["eng"], help="e.g. eng fas ara chi_sim")
    p.add_argument("--tesseract-psm", type=int, default=3)
    p.add_argument("--tesseract-workers", type=int, default=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsocr-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "run", formatter_class=DefaultsHelpFormatter, help="evaluate a checkpoint on an eval set"
    )
    _add_data_args(p)
    _add_model_args(p)
    _add_tesseract_args(p, flag=True)
    _add_normalizer_args(p)
    p.add_argument("--markdown", action="store_true", help="also write per-page markdown files")
    p.add_argument("--keep-boxes", action="store_true", help="markdown keeps the grounding tags")
    p.add_argument("--out", required=True)

    p = sub.add_parser("score", formatter_class=DefaultsHelpFormatter, help="score a prediction JSONL")
    p.add_argument(
        "--predictions", required=True, help="JSONL with key, prediction (+ reference, hit_eos, ...)"
    )
    p.add_argument("--references", default=None, help="eval set whose references replace the file's")
    p.add_argument("--reference-field", default=None)
    p.add_argument("--name", default="")
    _add_normalizer_args(p)
    p.add_argument("--out", required=True)

    p = sub.add_parser(
        "tesseract", formatter_class=DefaultsHelpFormatter, help="tesseract baseline on an eval set"
    )
    _add_data_args(p)
    _add_tesseract_args(p, flag=False)
    _add_normalizer_args(p)
    p.add_argument("--out", required=True)

    p = sub.add_parser(
        "compression",
        formatter_class=DefaultsHelpFormatter,
        help="compression study (paper Table 2 protocol)",
    )
    _add_data_args(p)
    _add_model_args(p, modes=True)
    p.add_argument("--modes", nargs="+", default=["tiny", "small"])
    p.add_argument(
        "--predictions", nargs="+", default=None, metavar="MODE=FILE", help="reuse per-mode prediction JSONL"
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer dir for token counts (default: the checkpoint's)"
    )
    p.add_argument("--edges", nargs="+", type=int, default=list(DEFAULT_BUCKET_EDGES))
    p.add_argument("--out", required=True)

    p = sub.add_parser(
        "markdown",
        formatter_class=DefaultsHelpFormatter,
        help="prediction JSONL -> per-page markdown (+ edit distance)",
    )
    p.add_argument("--predictions", required=True)
    p.add_argument("--references", default=None, help="eval set with known markdown to score against")
    p.add_argument("--reference-field", default=None)
    p.add_argument("--keep-boxes", action="store_true")
    p.add_argument("--out", required=True)

    p = sub.add_parser(
        "plots", formatter_class=DefaultsHelpFormatter, help="training-run plots from metrics.jsonl"
    )
    p.add_argument("--log", required=True, help="the run's metrics.jsonl")
    p.add_argument("--out", required=True)
    return parser


# --------------------------------------------------------------------------- model loading
def load_model(checkpoint: str, device: str, dtype: str):
    """(model, tokenizer) from our checkpoint directory or a release-layout one
    (`pipeline.checkpoint_io.load_any`), on device/dtype, in eval mode. Weights that do not fit the
    model the directory's config describes (a checkpoint of a different size) raise ValueError."""
    import torch

    from pipeline.checkpoint_io import load_any

    path = Path(checkpoint)
    if not path.is_dir():
        raise ValueError(f"checkpoint {checkpoint} is not a directory")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bf16" if torch.device(device).type == "cuda" else "fp32"
    try:
        model, tokenizer = load_any(
            path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, device=device
        )
    except RuntimeError as exc:  # load_state_dict: size mismatch / missing / unexpected keys
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[:4])
        raise ValueError(
            f"checkpoint {checkpoint} does not fit the model its config describes: {detail}"
        ) from exc
    return model.eval(), tokenizer


def _run_config(args: argparse.Namespace, mode: str, normalizer: Normalizer | None = None):
    from pipeline.eval.runner import EvalRunConfig

    return EvalRunConfig(
        mode=mode,
        prompt=args.prompt,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        no_repeat_ngram_size=args.no_repeat_ngram or None,
        no_repeat_window=args.no_repeat_window,
        loop_factor=getattr(args, "loop_factor", 3.0),
        normalizer=normalizer or Normalizer(),
    )


def _progress(label: str):
    def report(done: int, total: int) -> None:
        print(f"\r{label}: {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    return report


def _tesseract(args: argparse.Namespace, samples: Sequence[EvalSample], normalizer: Normalizer) -> EvalReport:
    config = TesseractConfig(
        languages=tuple(args.tesseract_langs), psm=args.tesseract_psm, workers=args.tesseract_workers
    )
    records = run_tesseract(samples, config, progress=_progress("tesseract"))
    meta = {"languages": list(config.languages), "psm": config.psm}
    return build_report(
        records, name="tesseract", normalizer=normalizer, loop_factor=args.loop_factor, meta=meta
    )


def _write(out: Path, name: str, text: str) -> None:
    (out / name).write_text(text + "\n", encoding="utf-8")
    print(text)


# --------------------------------------------------------------------------- subcommands
def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.eval.runner import evaluate
    from pipeline.training_info import resolve_mode_prompt

    out = Path(args.out)
    normalizer = _normalizer(args)
    args.mode, args.prompt = resolve_mode_prompt(args.checkpoint, args.mode, args.prompt, "dsocr-eval run")
    config = _run_config(args, args.mode, normalizer)  # validates mode/prompt before loading anything
    samples = read_eval_set(
        args.data, reference_field=args.reference_field, limit=args.limit, allow_root=args.allow_root
    )
    model, tokenizer = load_model(args.checkpoint, args.device, args.dtype)
    meta = {"checkpoint": str(args.checkpoint), "data": str(args.data)}
    report = evaluate(model, tokenizer, samples, config, name="ours", meta=meta, progress=_progress("eval"))
    report.write(out, stem="eval")
    reports = [report]
    if args.tesseract:
        baseline = _tesseract(args, samples, normalizer)
        baseline.write(out, stem="tesseract")
        reports.append(baseline)
    _write(
        out,
        "comparison.txt" if args.tesseract else "summary.txt",
        format_comparison(reports, title=f"{args.data}"),
    )
    if args.markdown:
        outputs = {r.key: r.prediction for r in report.records if r.error is None}
        cfg = MarkdownConfig(boxes="keep" if args.keep_boxes else "strip")
        write_markdown_pages(outputs, out / "markdown", cfg)
    failed = [r for r in report.records if r.error is not None]
    if failed:  # the reports hold every page; the exit status says some could not be read
        for record in failed:
            print(f"dsocr-eval run: {record.key}: {record.error}", file=sys.stderr)
        print(f"dsocr-eval run: {len(failed)} of {len(report.records)} pages failed (counted as errors in "
              f"the reports written to {out})", file=sys.stderr)  # fmt: skip
        return PARTIAL_FAILURE
    return 0


def cmd_score(args: argparse.Namespace) -> None:
    references = None
    if args.references:
        references = references_of(read_eval_set(args.references, reference_field=args.reference_field))
    records = read_records_jsonl(args.predictions, references=references)
    report = build_report(records, name=args.name, normalizer=_normalizer(args), loop_factor=args.loop_factor)
    report.write(args.out, stem="score")
    print(report.to_table())


def cmd_tesseract(args: argparse.Namespace) -> None:
    samples = read_eval_set(
        args.data, reference_field=args.reference_field, limit=args.limit, allow_root=args.allow_root
    )
    report = _tesseract(args, samples, _normalizer(args))
    report.write(args.out, stem="tesseract")
    print(report.to_table())


def _parse_mode_files(items: Sequence[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        mode, sep, path = item.partition("=")
        if not sep or not mode or not path:
            raise ValueError(f"--predictions expects MODE=FILE, got {item!r}")
        pairs[mode] = path
    return pairs


def _page_vision_tokens(samples: Sequence[EvalSample], mode: str) -> dict[str, int]:
    """Per-page vision tokens of a variable mode (Gundam); an undecodable page (a failed record)
    gets the global view's count."""
    from pipeline.processing import get_mode, process_image

    counts = {}
    for sample in samples:
        try:
            counts[sample.key] = vision_tokens_of(process_image(sample.load_image(), mode), mode)
        except ValueError as exc:
            log.warning("page %s: %s; counting the global view only", sample.key, exc)
            counts[sample.key] = get_mode(mode).global_grid ** 2
    return counts


def cmd_compression(args: argparse.Namespace) -> None:
    from pipeline.tokenizer import load_tokenizer

    samples = read_eval_set(
        args.data, reference_field=args.reference_field, limit=args.limit, allow_root=args.allow_root
    )
    references = references_of(samples)
    records_by_mode = {}
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.predictions:
        for mode, path in _parse_mode_files(args.predictions).items():
            records_by_mode[mode] = read_records_jsonl(path, references=references)
    else:
        if not args.checkpoint:
            raise ValueError("compression needs --checkpoint (to generate) or --predictions MODE=FILE ...")
        from pipeline.eval.runner import evaluate
        from pipeline.training_info import resolve_mode_prompt

        args.prompt = resolve_mode_prompt(args.checkpoint, None, args.prompt, "dsocr-eval compression")[1]
        configs = {mode: _run_config(args, mode) for mode in args.modes}
        model, model_tokenizer = load_model(args.checkpoint, args.device, args.dtype)
        tokenizer = tokenizer or model_tokenizer
        for mode, config in configs.items():
            report = evaluate(model, model_tokenizer, samples, config, name=mode, progress=_progress(mode))
            report.write(args.out, stem=f"eval_{mode}")
            records_by_mode[mode] = report.records
    if tokenizer is None:
        raise ValueError("compression with --predictions needs --tokenizer to count ground-truth tokens")
    vision: dict[str, int | dict[str, int]] = {}
    for mode in records_by_mode:
        vision[mode] = NOMINAL_VISION_TOKENS.get(mode) or _page_vision_tokens(samples, mode)
    study = compression_study(
        records_by_mode, count_text_tokens(tokenizer.encode, references), vision, edges=args.edges
    )
    study.write(args.out)
    print(study.to_table())


def cmd_markdown(args: argparse.Namespace) -> None:
    records = read_records_jsonl(args.predictions)
    outputs = {r.key: r.prediction for r in records if r.error is None}
    skipped = [r.key for r in records if r.error is not None]
    if skipped:
        log.warning("%d failed page(s) have no markdown: %s", len(skipped), skipped[:10])
    out = Path(args.out)
    write_markdown_pages(outputs, out, MarkdownConfig(boxes="keep" if args.keep_boxes else "strip"))
    if args.references:
        refs = references_of(read_eval_set(args.references, reference_field=args.reference_field))
        predictions = {r.key: ("" if r.error is not None else r.prediction) for r in records}
        scores = score_markdown(refs, predictions)
        (out / "markdown_scores.json").write_text(json.dumps(scores.as_dict(), indent=2) + "\n")
        print(
            f"markdown edit distance: page mean {scores.mean:.4f}, overall {scores.overall:.4f} ({len(refs)} pages)"
        )


def cmd_plots(args: argparse.Namespace) -> None:
    result = plot_run(args.log, args.out)
    for key in ("losses", "cer"):
        if result[key] is not None:
            print(result[key])
    for path in result["expert_load"]:
        print(path)
    if result["skipped_lines"]:
        print(f"{result['skipped_lines']} unparseable line(s) skipped", file=sys.stderr)


COMMANDS = {
    "run": cmd_run,
    "score": cmd_score,
    "tesseract": cmd_tesseract,
    "compression": cmd_compression,
    "markdown": cmd_markdown,
    "plots": cmd_plots,
}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    try:
        return COMMANDS[args.command](args) or 0
    except (ValueError, TesseractNotFoundError) as exc:
        print(f"dsocr-eval {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
