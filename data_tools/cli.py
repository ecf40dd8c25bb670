"""`dsocr-data`: command line of the data tools (synth, convert-*, inspect).

    dsocr-data synth --out data/synth -n 10000 --langs en,ru,ar,fa,zh --workers 2
    dsocr-data convert-csv train.csv --out data/ft
    dsocr-data convert-jsonl swift.jsonl --out data/ft
    dsocr-data convert-folder scans/ --out data/scans
    dsocr-data convert-text corpus/ --out data/text --split paragraph
    dsocr-data convert-alto tapuscorpus/ --out data/tapus --lang fr --split-file split.txt
    dsocr-data convert-pagexml workspace/ --out data/gt --pages
    dsocr-data inspect data/ft --sheet sheet.png

Every converter prints a report (written; skipped per reason with the first rows; duplicates)
and writes it into manifest.json next to the shards; it exits with 1 when more than
--max-bad-share of the rows were bad. See data_tools/README.md for the shard format.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from data_tools.convert import (
    MODES,
    ConvertConfig,
    convert_records,
    expand_text_inputs,
    read_csv,
    read_folder,
    read_jsonl,
    read_text_files,
)
from data_tools.shards import MANIFEST_NAME, ShardWriterConfig, expand_shard_paths
from data_tools.synth.fonts import MissingFontError
from data_tools.validate import ValidationConfig


def _shard_args(p: argparse.ArgumentParser, prefix: str) -> None:
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--prefix", default=prefix, help=f"shard file prefix (default {prefix})")
    p.add_argument("--max-count", type=int, default=10_000, help="samples per shard (default 10000)")
    p.add_argument("--max-mb", type=float, default=1024.0, help="approximate MiB per shard (default 1024)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards of this prefix")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default 0: in-process)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _convert_args(p: argparse.ArgumentParser) -> None:
    _shard_args(p, "shard")
    p.add_argument("--source", help="dataset name stored in each sample (default: input file/folder name)")
    p.add_argument("--lang", default="und", help="language code stored in each sample (default und)")
    p.add_argument("--mode", choices=MODES, help="optional mode hint stored in each sample")
    p.add_argument(
        "--max-label-chars", type=int, default=16_384, help="longest accepted label (default 16384)"
    )
    p.add_argument(
        "--max-pixels", type=int, default=40_000_000, help="largest accepted image w*h (default 40M)"
    )
    p.add_argument("--min-side", type=int, default=8, help="smallest accepted image side (default 8 px)")
    p.add_argument(
        "--min-view-side",
        type=int,
        default=8,
        help="smallest side an image may keep once fitted into its mode's view (default 8 px)",
    )
    p.add_argument(
        "--allow-root",
        type=Path,
        help="folder that image paths in the data file may lead into besides the dataset's own folder",
    )
    p.add_argument(
        "--drop-duplicates", action="store_true", help="skip samples with the same image, prompt and label"
    )
    p.add_argument(
        "--max-bad-share",
        type=float,
        default=0.1,
        help="exit with 1 when more than this share of the rows is bad (default 0.1)",
    )


def _layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="an XML file, a folder of them, or an OCR-D workspace")
    p.add_argument(
        "--root", help="dataset root: images are searched up to it, never outside (default: input)"
    )
    p.add_argument(
        "--pages", action="store_true", help="page samples (image + all lines) instead of line crops"
    )
    p.add_argument("--margin", type=int, default=4, help="pixels around each line's bounds (default 4)")
    p.add_argument("--mask", action="store_true", help="paint line crops white outside the line polygon")
    p.add_argument("--split-file", help="lines `SPLIT PATH` (page XML or document folder, relative to the root); "
                   "writes OUT/<split>/ per split, unlisted pages to --default-split")  # fmt: skip
    p.add_argument("--default-split", default="train", help="split of pages the split file does not list")
    p.add_argument("--prompt", help="prompt stored with every sample (default: none, the loader's default)")
    p.add_argument("--crop-format", choices=("auto", "png", "jpeg"), default="auto",
                   help="line crops: auto = JPEG (q95) from JPEG pages, PNG otherwise")  # fmt: skip
    _convert_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsocr-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log every skipped sample at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate synthetic OCR samples (lines, pages, charts) into shards")
    _shard_args(p, "synth")
    p.add_argument("-n", "--num", type=int, required=True, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--langs", default="en,ru,ar,fa,zh", help="comma-separated languages (en,ru,ar,fa,zh)")
    p.add_argument("--kinds", default="line=0.3,page=0.5,chart=0.2", help="weights, e.g. line=1,page=0")
    p.add_argument("--p-grounding", type=float, default=0.5, help="share of pages with grounding targets")
    p.add_argument("--no-degrade", action="store_true", help="no blur/noise/rotation/JPEG")
    p.add_argument("--bundled-fonts", action="store_true", help="only the fonts inside matplotlib")

    p = sub.add_parser("synth-scans", help="synthetic scans of typed lines (<= 100 characters) or pages")
    _shard_args(p, "scan")
    p.add_argument("-n", "--num", type=int, required=True, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unit", choices=("line", "page"), default="line")
    p.add_argument("--lang", choices=("fr", "en"), default="fr", help="word list of the typed text")
    p.add_argument("--max-chars", type=int, default=100, help="longest line (default 100)")
    p.add_argument("--underline-prefix", default="", help="prefix of underlined words in the text (e.g. _)")
    p.add_argument("--scanner", default="", help="degradations, e.g. p_skew=0.5,p_jpeg=0,blur_radius=0.5:1.5 "
                   "(fields of ScannerConfig in data_tools/synth/scanner.py)")  # fmt: skip
    p.add_argument("--bundled-fonts", action="store_true", help="only the fonts inside matplotlib")

    p = sub.add_parser(
        "convert-csv", help="CSV with image_file,text_label columns (paths relative to the CSV)"
    )
    p.add_argument("csv", help="CSV file with a header row")
    p.add_argument("--image-column", default="image_file")
    p.add_argument("--text-column", default="text_label")
    p.add_argument("--prompt", help="prompt stored with every sample (default: none, the loader's default)")
    _convert_args(p)

    p = sub.add_parser("convert-jsonl", help="ms-swift JSONL (messages+images or query/response/images)")
    p.add_argument("jsonl", nargs="+", help="JSONL file(s); image paths relative to each file")
    _convert_args(p)

    p = sub.add_parser("convert-folder", help="folder of images with sidecar .txt labels")
    p.add_argument("folder")
    p.add_argument("--label-suffix", default=".txt")
    p.add_argument("--prompt", help="prompt stored with every sample (default: none)")
    _convert_args(p)

    p = sub.add_parser("convert-text", help="plain text files for the text-only share")
    p.add_argument("inputs", nargs="+", help="text files or directories (searched for --pattern)")
    p.add_argument("--pattern", default="*.txt")
    p.add_argument("--split", choices=("file", "paragraph", "line"), default="file")
    _convert_args(p)

    for fmt, name in (("page", "PAGE-XML (2013, 2019)"), ("alto", "ALTO (v2-v4)")):
        p = sub.add_parser(f"convert-{'pagexml' if fmt == 'page' else fmt}",
                           help=f"{name} files, folders or OCR-D workspaces: line crops or pages")  # fmt: skip
        _layout_args(p)
        p.set_defaults(layout_format=fmt)

    p = sub.add_parser("inspect", help="counts, length histograms and a contact sheet of shards")
    p.add_argument("shards", nargs="*", help="shard files or directories")
    p.add_argument("--degradations", metavar="PNG", help="write a contact sheet of the scanner degradations")
    p.add_argument("--tokenizer", help="tokenizer.json (or its directory) for token-length histograms")
    p.add_argument("--sheet", help="write a contact sheet PNG here")
    p.add_argument("--sheet-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true", help="check shards against manifest.json (sha256)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _writer_cfg(args) -> ShardWriterConfig:
    return ShardWriterConfig(
        args.out, args.prefix, args.max_count, int(args.max_mb * (1 << 20)), args.overwrite
    )


def _parse_kinds(spec: str) -> dict:
    out = {}
    for part in spec.split(","):
        name, _, weight = part.partition("=")
        try:
            out[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"--kinds entry {part!r} is not NAME=WEIGHT") from None
    return out


ROWS_SHOWN = 5  # rows printed per skip reason


def _parse_scanner(spec: str) -> dict:
    """`p_skew=0.5,blur_radius=0.5:1.5` -> ScannerConfig keyword arguments (ranges as LO:HI)."""
    out = {}
    for part in filter(None, spec.split(",")):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = tuple(float(v) for v in value.split(":")) if ":" in value else float(value)
        except ValueError:
            raise ValueError(f"--scanner entry {part!r} is not NAME=VALUE or NAME=LO:HI") from None
    return out


def _print_manifest(m: dict) -> None:
    print(f"wrote {m['total_samples']} samples in {len(m['shards'])} shard(s), {m['total_bytes']} bytes")
    print(f"skipped {m['skipped_total']}" + "".join(f", {k}={v}" for k, v in m["skipped"].items()))
    for reason, count in m["skipped"].items():
        examples = m["skipped_examples"].get(reason, [])[:ROWS_SHOWN]
        more = ", ..." if count > len(examples) else ""
        print(f"  {reason} ({count}): " + ", ".join(e["source"] for e in examples) + more)
        if examples and examples[0]["detail"]:
            print(f"    e.g. {examples[0]['detail']}")


def _print_report(m: dict) -> int:
    """The converter's summary; 1 when the share of bad rows is over the limit."""
    _print_manifest(m)
    dup = m["duplicates"]
    if dup["count"]:
        verb = "dropped" if dup["dropped"] else "kept (--drop-duplicates drops them)"
        pairs = ", ".join(f"{e['source']} = {e['same_as']}" for e in dup["examples"])
        print(
            f"duplicates {dup['count']}, {verb}: {pairs}"
            + (", ..." if dup["count"] > len(dup["examples"]) else "")
        )
    print(f"report: {m['report_path']}")
    if m["bad_share_exceeded"]:
        print(
            f"dsocr-data: error: {m['bad_rows']} of {m['rows']} rows ({m['bad_share']:.1%}) are bad, "
            f"over --max-bad-share={m['max_bad_share']}; the shards are written, check the rows above",
            file=sys.stderr,
        )
        return 1
    return 0


def _convert(args, records, default_source: str, total: int | None = None) -> dict:
    cfg = ConvertConfig(
        source=args.source or default_source,
        lang=args.lang,
        mode=args.mode,
        validation=ValidationConfig(
            max_label_chars=args.max_label_chars,
            max_pixels=args.max_pixels,
            min_side=args.min_side,
            min_view_side=args.min_view_side,
        ),
        workers=args.workers,
        progress=not args.no_progress,
        drop_duplicates=args.drop_duplicates,
        max_bad_share=args.max_bad_share,
    )
    manifest = convert_records(records, _writer_cfg(args), cfg, total=total)
    return {**manifest, "report_path": str(Path(args.out) / MANIFEST_NAME)}


def _convert_layout(args) -> None:
    from data_tools.convert_xml import SplitPlan, XmlConvertConfig, convert_layout_files, find_layout_files

    if args.workers:
        logging.warning("--workers is ignored by %s: it converts in one process", args.command)
    root, files = find_layout_files(Path(args.input), args.root)
    plan = SplitPlan.read(Path(args.split_file), args.default_split) if args.split_file else None
    cfg = XmlConvertConfig(
        source=args.source or Path(args.input).resolve().stem, lang=args.lang,
        unit="page" if args.pages else "line", margin=args.margin, mask=args.mask, prompt=args.prompt,
        mode=args.mode, crop_format=args.crop_format, format=args.layout_format,
        validation=ValidationConfig(max_label_chars=args.max_label_chars, max_pixels=args.max_pixels),
    )  # fmt: skip
    print(f"{len(files)} layout files under {root}")
    for split, manifest in convert_layout_files(files, root, _writer_cfg(args), cfg, plan).items():
        print(f"[{split}] ", end="")
        _print_manifest(manifest)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(message)s"
    )

    if args.command == "synth":
        from data_tools.synth.degrade import DegradeConfig
        from data_tools.synth.generate import SynthConfig, generate
        from data_tools.synth.page import PageConfig

        page = PageConfig(bundled_only=args.bundled_fonts)
        if args.no_degrade:
            page.degrade = DegradeConfig.off()
        cfg = SynthConfig(
            n=args.num, seed=args.seed, langs=tuple(x for x in args.langs.split(",") if x),
            kinds=_parse_kinds(args.kinds), p_grounding=args.p_grounding, page=page,
            workers=args.workers, progress=not args.no_progress,
        )  # fmt: skip
        if args.no_degrade:
            cfg.line_degrade = DegradeConfig.off()
        _print_manifest(generate(cfg, _writer_cfg(args)))
    elif args.command == "convert-csv":
        records = read_csv(Path(args.csv), args.image_column, args.text_column, args.allow_root)
        for r in records:
            r.prompt = args.prompt
        return _print_report(_convert(args, records, Path(args.csv).stem, len(records)))
    elif args.command == "convert-jsonl":
        records = []
        for path in args.jsonl:
            for r in read_jsonl(Path(path), args.allow_root):
                r.index = len(records)
                records.append(r)
        return _print_report(_convert(args, records, Path(args.jsonl[0]).stem, len(records)))
    elif args.command == "convert-folder":
        records = read_folder(Path(args.folder), args.label_suffix, args.allow_root)
        for r in records:
            r.prompt = args.prompt
        return _print_report(_convert(args, records, Path(args.folder).resolve().name, len(records)))
    elif args.command == "convert-text":
        files = expand_text_inputs(args.inputs, args.pattern)
        records = read_text_files(files, args.split, args.max_label_chars)
        return _print_report(_convert(args, records, Path(args.inputs[0]).resolve().stem or "text"))
    elif args.command in ("convert-pagexml", "convert-alto"):
        _convert_layout(args)
    elif args.command == "synth-scans":
        from data_tools.synth.scan import ScanConfig, write_scans

        cfg = ScanConfig(n=args.num, seed=args.seed, unit=args.unit, lang=args.lang, max_chars=args.max_chars,
                         underline_prefix=args.underline_prefix, bundled_only=args.bundled_fonts,
                         scanner=_parse_scanner(args.scanner), source=f"scan-{args.unit}s")  # fmt: skip
        _print_manifest(write_scans(cfg, _writer_cfg(args), args.workers))
    elif args.command == "inspect":
        from data_tools.inspect import contact_sheet, degradation_sheet, format_report, inspect_shards

        if args.degradations:
            rows = degradation_sheet(args.degradations, seed=args.seed)
            print(f"degradation sheet: {args.degradations} (rows: {', '.join(rows)})")
            if not args.shards:
                return 0
        if not args.shards:
            raise ValueError("inspect needs shard files or directories (or --degradations PNG)")
        paths = expand_shard_paths(args.shards)
        n_sheet = args.sheet_samples if args.sheet else 0
        report, chosen = inspect_shards(paths, args.tokenizer, n_sheet, args.seed, args.verify)
        print(json.dumps(report, ensure_ascii=False, indent=2) if args.json else format_report(report))
        if args.sheet and chosen:
            contact_sheet(chosen, args.sheet)
            print(f"contact sheet: {args.sheet} ({len(chosen)} samples)")
        if report.get("manifest_problems"):
            return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except ValueError as e:  # user/config errors: one clear line, no traceback
        print(f"dsocr-data: error: {e}", file=sys.stderr)
        code = 2
    except MissingFontError as e:
        print(f"dsocr-data: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
