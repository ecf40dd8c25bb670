"""`dsocr-data inspect`: statistics and a contact sheet for webdataset shards.

Counts samples per source / mode / language / task, histograms of target lengths in
characters (and in tokens when a `tokenizer.json` is given), image sizes, and optionally
checks every shard against its manifest (count, bytes, sha256). The contact sheet is a PNG grid
of randomly chosen samples (reservoir sampling, seeded), each with its prompt and target.
"""

from __future__ import annotations

import json
import math
import random
import textwrap
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from data_tools.images import load_rgb
from data_tools.shards import MANIFEST_NAME, file_sha256, iter_shard, sample_image_ext

_BINS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def target_text(meta: dict) -> str:
    return meta.get("answer") if meta.get("answer") is not None else meta.get("text", "")


def histogram(values: list[int], bins: tuple[int, ...] = _BINS) -> dict[str, int]:
    """Counts per bin `<= b` (and one `> last`), in bin order; empty bins included."""
    labels = [f"<={b}" for b in bins] + [f">{bins[-1]}"]
    counts = dict.fromkeys(labels, 0)
    for v in values:
        for b, label in zip(bins, labels):
            if v <= b:
                counts[label] += 1
                break
        else:
            counts[labels[-1]] += 1
    return counts


def _load_tokenizer(path: str):
    from tokenizers import Tokenizer  # optional: only for token histograms

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(f"tokenizer file {p} not found (give a tokenizer.json or a directory holding one)")
    return Tokenizer.from_file(str(p))


def verify_manifest(paths: list[Path]) -> list[str]:
    """Problems found comparing shards with the manifest.json beside them ([] = all good)."""
    problems = []
    by_dir: dict[Path, list[Path]] = {}
    for p in paths:
        by_dir.setdefault(p.parent, []).append(p)
    for d, shard_paths in by_dir.items():
        mpath = d / MANIFEST_NAME
        if not mpath.is_file():
            problems.append(f"{d}: no {MANIFEST_NAME}")
            continue
        entries = {s["name"]: s for s in json.loads(mpath.read_text(encoding="utf-8"))["shards"]}
        for p in shard_paths:
            e = entries.get(p.name)
            if e is None:
                problems.append(f"{p}: not listed in the manifest")
            elif p.stat().st_size != e["bytes"]:
                problems.append(f"{p}: {p.stat().st_size} bytes, manifest says {e['bytes']}")
            elif file_sha256(p) != e["sha256"]:
                problems.append(f"{p}: sha256 differs from the manifest")
        for name in sorted(set(entries) - {p.name for p in shard_paths}):
            problems.append(f"{d / name}: listed in the manifest but missing")
    return problems


def inspect_shards(
    paths: list[Path],
    tokenizer: str | None = None,
    n_sheet: int = 0,
    seed: int = 0,
    verify: bool = False,
) -> tuple[dict, list[dict]]:
    """Statistics over all samples of `paths`, plus `n_sheet` randomly chosen samples."""
    tok = _load_tokenizer(tokenizer) if tokenizer else None
    rng = random.Random(seed)
    counts = {k: Counter() for k in ("source", "mode", "lang", "task", "kind", "image_ext")}
    chars, tokens, pixels = [], [], []
    chosen: list[dict] = []
    n = 0
    for path in paths:
        for sample in iter_shard(path):
            meta = sample.get("json") or {}
            ext = sample_image_ext(sample)
            counts["source"][meta.get("source", "?")] += 1
            counts["mode"][meta.get("mode", "-")] += 1
            counts["lang"][meta.get("lang", "?")] += 1
            counts["task"][meta.get("task", "-")] += 1
            counts["kind"]["image" if ext else "text-only"] += 1
            counts["image_ext"][ext or "-"] += 1
            text = target_text(meta)
            chars.append(len(text))
            if tok is not None:
                tokens.append(len(tok.encode(text, add_special_tokens=False).ids))
            if ext and "width" in meta and "height" in meta:
                pixels.append(int(meta["width"]) * int(meta["height"]))
            n += 1
            if n_sheet > 0:  # reservoir sampling keeps a uniform random subset
                if len(chosen) < n_sheet:
                    chosen.append(sample)
                else:
                    j = rng.randrange(n)
                    if j < n_sheet:
                        chosen[j] = sample
    report = {
        "samples": n,
        "shards": len(paths),
        **{f"per_{k}": dict(v.most_common()) for k, v in counts.items()},
        "chars": _summary(chars),
        "chars_histogram": histogram(chars),
    }
    if tok is not None:
        report["tokens"] = _summary(tokens)
        report["tokens_histogram"] = histogram(tokens)
    if pixels:
        report["megapixels"] = {k: round(v / 1e6, 3) for k, v in _summary(pixels).items()}
    if verify:
        report["manifest_problems"] = verify_manifest(paths)
    return report, chosen


def _summary(values: list[int]) -> dict:
    if not values:
        return {"min": 0, "mean": 0, "max": 0, "total": 0}
    return {
        "min": min(values),
        "mean": round(sum(values) / len(values), 1),
        "max": max(values),
        "total": sum(values),
    }


def format_report(report: dict) -> str:
    lines = [f"{report['samples']} samples in {report['shards']} shard(s)"]
    for key in ("per_source", "per_mode", "per_lang", "per_task", "per_kind", "per_image_ext"):
        lines.append(f"{key[4:]}: " + ", ".join(f"{k}={v}" for k, v in report[key].items()))
    for unit in ("chars", "tokens"):
        if unit not in report:
            continue
        s = report[unit]
        lines.append(
            f"target length in {unit}: min {s['min']}, mean {s['mean']}, max {s['max']}, total {s['total']}"
        )
        hist = report[f"{unit}_histogram"]
        top = max(hist.values()) or 1
        for label, c in hist.items():
            lines.append(f"  {label:>8} {c:>8} {'#' * round(40 * c / top)}")
    if "megapixels" in report:
        m = report["megapixels"]
        lines.append(f"image megapixels: min {m['min']}, mean {m['mean']}, max {m['max']}")
    if "manifest_problems" in report:
        probs = report["manifest_problems"]
        lines.append("manifest check: OK" if not probs else "manifest check FAILED:\n  " + "\n  ".join(probs))
    return "\n".join(lines)


def _cell_font(lang: str, size: int):
    from data_tools.synth.fonts import MissingFontError, find_fonts, load_font, script_of_lang

    try:
        script = script_of_lang(lang)
        font = find_fonts(script)[0]
    except (ValueError, MissingFontError):
        script, font = "latin", find_fonts("latin")[0]
    return load_font(font.path, size, font.index, script)


def contact_sheet(
    samples: list[dict], path: str | Path, cell: int = 320, text_lines: int = 9, cols: int = 4
) -> None:
    """A PNG grid: per sample its image (or 'text-only'), key, prompt and the start of its target."""
    if not samples:
        raise ValueError("no samples to draw")
    cols = min(cols, len(samples))
    rows = -(-len(samples) // cols)
    fs = 13
    text_h = (text_lines + 2) * (fs + 3)
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, sample in enumerate(samples):
        x0, y0 = (i % cols) * cell, (i // cols) * (cell + text_h)
        meta = sample.get("json") or {}
        ext = sample_image_ext(sample)
        if ext:
            try:
                img = load_rgb(sample[ext], max_aspect=math.inf, source=sample["__key__"])
                img.thumbnail((cell - 8, cell - 8))
                sheet.paste(img, (x0 + (cell - img.width) // 2, y0 + (cell - img.height) // 2))
            except ValueError as e:
                draw.text(
                    (x0 + 8, y0 + cell // 2), f"undecodable: {e}"[:40], fill="red", font=_cell_font("en", fs)
                )
        else:
            draw.text((x0 + 8, y0 + cell // 2), "text-only", fill="gray", font=_cell_font("en", fs * 2))
        draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell + text_h - 1], outline=(200, 200, 200))
        caption = Image.new("RGB", (cell - 2, text_h - 2), "white")  # drawn apart, so text is clipped
        cdraw = ImageDraw.Draw(caption)
        head = f"{sample['__key__']} [{meta.get('lang', '?')}] {meta.get('prompt', '(default prompt)')!r}"
        cdraw.text((3, 1), head, fill=(0, 0, 160), font=_cell_font("en", fs - 2))
        font = _cell_font(meta.get("lang", "en"), fs)
        body = textwrap.wrap(target_text(meta).replace("\n", " | "), width=44)[:text_lines]
        for j, line in enumerate(body):
            cdraw.text((3, (j + 1) * (fs + 3) + 2), line, fill="black", font=font)
        sheet.paste(caption, (x0 + 1, y0 + cell + 1))
    sheet.save(path)


def degradation_sheet(
    path: str | Path, columns: int = 4, seed: int = 0, bundled_only: bool = False
) -> list[str]:
    """A PNG with one row per scanner degradation of data_tools.synth.scanner (and the underline /
    strike marks, none, and all of them at their configured probabilities), `columns` synthetic
    lines each: the same line in every row of a column. Returns the row labels, top to bottom."""
    from data_tools.synth.scan import ScanConfig, render_scan
    from data_tools.synth.scanner import STEPS, ScannerConfig

    rows = [("none", ScannerConfig.off())] + [
        (s, ScannerConfig.only(s)) for s in (*STEPS, "underline", "strike")
    ]
    rows.append(("all (default p)", ScannerConfig()))
    cell_w, cell_h, label_w, fs = 420, 64, 150, 14
    sheet = Image.new("RGB", (label_w + columns * cell_w, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = _cell_font("en", fs)
    for r, (label, scanner) in enumerate(rows):
        draw.text((6, r * cell_h + cell_h // 2), label, fill="black", font=font, anchor="lm")
        cfg = ScanConfig(n=columns, seed=seed, max_chars=60, scanner=scanner, bundled_only=bundled_only)
        for c in range(columns):
            image, _ = render_scan(c, cfg)
            image = image.convert("RGB")
            image.thumbnail((cell_w - 8, cell_h - 6))
            sheet.paste(image, (label_w + c * cell_w + 4, r * cell_h + (cell_h - image.height) // 2))
        draw.line([(0, (r + 1) * cell_h - 1), (sheet.width, (r + 1) * cell_h - 1)], fill=(210, 210, 210))
    sheet.save(path)
    return [label for label, _ in rows]
