"""Evaluation suite (../shared/spec/training.md "Measuring OCR quality").

- metrics: CER/WER (corpus, mean, median, capped), `Normalizer` (NFKC, whitespace, Arabic/Persian
  folding, diacritics, ZWNJ), loop rule, Fox word-set precision, char precision/recall, NED.
- report: `SampleRecord` -> `EvalReport` (failures scored as CER 1, loop rate, pages/s, tokens/s),
  JSON + per-sample JSONL + table; `format_comparison` puts systems side by side.
- data: eval sets from JSONL / CSV / webdataset shards (`read_eval_set`).
- runner: `evaluate(model, tokenizer, samples, config)` (batched greedy generation) and
  `training_eval_hook` for periodic evaluation inside training.
- compression: the paper's Table 2 protocol (buckets by ground-truth tokens, table + plot).
- markdown: grounding output -> per-page markdown; normalised edit distance vs known markdown.
- tesseract: the classical baseline, scored by the same code.
- plots: loss / aux loss / CER curves and expert-load heatmaps from a run's metrics.jsonl.
Command line: `dsocr-eval` (pipeline/cli/eval.py).
"""
