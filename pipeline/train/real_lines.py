"""Data of `data.kind=real_lines`: synthetic scanned lines, then real line ground truth mixed in.

Two shard sets are made in the run directory (and reused when their settings are unchanged):

- `data/scan/{train,val}`: typed lines of up to `data.scan.max_chars` characters rendered and
  degraded like scans by data_tools.synth.scan (the pretraining data, and a synthetic held-out);
- `data/scan/warmup` (when `data.scan.warmup_lines` > 0): short lines in a fixed-pitch font on
  clean paper (data_tools.synth.reading, gpu1_lines' reading lines), trained alone first;
- `data/real/<split>`: the PAGE-XML / ALTO files under `data.real_root` converted to line crops by
  data_tools.convert_xml, one shard set per split of `data.real.split_file`; the split named
  `data.real.heldout_split` is evaluated, every other one is trained on.

The mixture (the loader's curriculum): the warm-up lines alone for `data.scan.warmup_lines`
samples, then the long synthetic lines, then the real training lines from sample
`data.real.start_after` on, in the ratio of their weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.config import SourceSpec

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RealLinesData:
    train: dict[str, str]  # source name -> shard pattern ("warmup" only with data.scan.warmup_lines)
    val: dict[str, str]  # eval set name -> shard pattern; "real" first
    alphabet: str  # every character of the synthetic text and of the real transcriptions


def split_file_path(spec: str) -> Path:
    """`data.real.split_file` as given, or relative to the repository (configs/data/...)."""
    path = Path(spec)
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ValueError(
            f"data.real.split_file={spec!r} does not exist (tried {path}); give a `SPLIT PATH` list"
        )
    return path


def scan_configs(data: DataConfig):
    """The synthetic train / held-out ScanConfigs of data.scan and the warm-up ReadingLinesConfig
    (None without one)."""
    from data_tools.synth.reading import ReadingLinesConfig
    from data_tools.synth.scan import ScanConfig

    scan = data.scan
    lang = data.real.lang if data.real.lang in ("fr", "en") else "en"
    common = dict(lang=lang, min_chars=scan.min_chars, max_chars=scan.max_chars, font_px=tuple(scan.font_px),
                  underline_prefix=scan.underline_prefix, bundled_only=scan.bundled_only,
                  scanner=dict(scan.scanner))  # fmt: skip
    if scan.families:
        common["families"] = dict(scan.families)
    train = ScanConfig(n=scan.num_train, seed=scan.seed, source="scan-lines-train", **common)
    val = ScanConfig(n=scan.num_val, seed=scan.seed + 7919, source="scan-lines-val", **common)
    warmup = None
    if scan.warmup_lines:
        warmup = ReadingLinesConfig(n=scan.warmup_lines, seed=scan.seed + 104729, width=scan.warmup_width,
                                    min_chars=scan.min_chars, max_chars=scan.warmup_max_chars,
                                    source="reading-warmup", text=scan.warmup_text,
                                    lang=lang if scan.warmup_text == "typed" else "en")  # fmt: skip
    return train, val, warmup


def _render(cfg, out: Path, render: bool, workers: int) -> str:
    """Shards of a ScanConfig or ReadingLinesConfig in `out`, rendered unless the manifest its
    writer left there names the same settings."""
    from data_tools.shards import ShardWriterConfig
    from data_tools.synth.reading import ReadingLinesConfig, write_reading_lines
    from data_tools.synth.scan import write_scans

    key, write = ("reading_lines", write_reading_lines) if isinstance(cfg, ReadingLinesConfig) else ("scan", write_scans)
    manifest = out / "manifest.json"
    wanted = json.loads(json.dumps(cfg.manifest()))
    if not (manifest.exists() and json.loads(manifest.read_text()).get(key) == wanted):
        if not render:
            raise ValueError(
                f"no complete shards of {cfg.source} in {out}: the rendering rank writes them first"
            )
        write(cfg, ShardWriterConfig(str(out), prefix="scan", max_count=5000, overwrite=True), workers)
    return str(out / "scan-*.tar")


def _convert_real(data: DataConfig, out: Path, render: bool) -> dict[str, dict]:
    """Convert data.real_root (once per settings); {split: manifest}."""
    from data_tools.convert_xml import SplitPlan, XmlConvertConfig, convert_layout_files, find_layout_files
    from data_tools.shards import ShardWriterConfig

    real = data.real
    split = split_file_path(real.split_file)
    settings = {"root": str(Path(data.real_root).resolve()), "format": real.format, "lang": real.lang,
                "margin": real.margin, "split": hashlib.sha256(split.read_bytes()).hexdigest()}  # fmt: skip
    stamp = out / "settings.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/manifest.json"))}
    if not render:
        raise ValueError(f"no converted real lines in {out}: the rendering rank writes them first")
    if out.exists():  # other settings: no split of an earlier conversion may survive
        shutil.rmtree(out)
    root, files = find_layout_files(Path(data.real_root))
    plan = SplitPlan.read(split)
    cfg = XmlConvertConfig(source="real", lang=real.lang, margin=real.margin, format=real.format,
                           crop_format="auto")  # fmt: skip
    manifests = convert_layout_files(files, root, ShardWriterConfig(str(out), prefix="real", overwrite=True), cfg,
                                     plan)  # fmt: skip
    for name, m in manifests.items():
        print(f"[real_lines] {name}: {m['total_samples']} lines, skipped {m['skipped']}", flush=True)
    stamp.write_text(json.dumps(settings))
    return manifests


def _answers_alphabet(patterns: list[str]) -> set[str]:
    from data_tools.shards import iter_samples
    from pipeline.data.shards import expand_shards

    chars: set[str] = set()
    for sample in iter_samples(expand_shards(patterns)):
        chars |= set(sample["json"].get("answer", ""))
    return chars - {"\n"}


def check_real_config(data: DataConfig) -> None:
    """ValueError naming the setting when data.real cannot work (no root, no split file, format)."""
    real = data.real
    if not data.real_root:
        raise ValueError("data.kind=real_lines needs data.real_root=<folder of PAGE-XML/ALTO files and images>, "
                         "e.g. a clone of https://github.com/HTR-United/tapuscorpus")  # fmt: skip
    if not Path(data.real_root).is_dir():
        raise ValueError(f"data.real_root={data.real_root!r} is not a folder")
    if real.format not in ("alto", "page"):
        raise ValueError(f"data.real.format must be 'alto' or 'page', got {real.format!r}")
    if not real.split_file:
        raise ValueError(
            "data.kind=real_lines needs data.real.split_file (`SPLIT PATH` lines naming the held-out pages)"
        )
    split_file_path(real.split_file)


def prepare_real_lines(data: DataConfig, data_dir: Path, render: bool = True) -> RealLinesData:
    from data_tools.synth.scan_text import alphabet

    real = data.real
    check_real_config(data)  # before any rendering
    train_cfg, val_cfg, warmup_cfg = scan_configs(data)
    workers = data.scan.workers
    scan_train = _render(train_cfg, data_dir / "scan" / "train", render, workers)
    scan_val = _render(val_cfg, data_dir / "scan" / "val", render, workers)
    warmup = {"warmup": _render(warmup_cfg, data_dir / "scan" / "warmup", render, workers)} if warmup_cfg else {}
    manifests = _convert_real(data, data_dir / "real", render)
    if manifests.get(real.heldout_split, {}).get("total_samples", 0) == 0:
        raise ValueError(
            f"no held-out real lines: split {real.heldout_split!r} of data.real.split_file is empty"
        )
    splits = [s for s, m in manifests.items() if s != real.heldout_split and m["total_samples"]]
    if not splits:
        raise ValueError("no real training lines: every converted page is in the held-out split")
    folders = splits[0] if len(splits) == 1 else "{" + ",".join(splits) + "}"  # a brace pattern
    real_train = str(data_dir / "real" / folders / "real-*.tar")
    heldout = str(data_dir / "real" / real.heldout_split / "real-*.tar")
    chars = set(alphabet(train_cfg.lang)) | set(data.scan.underline_prefix)
    chars |= _answers_alphabet([real_train, heldout])
    if warmup_cfg and warmup_cfg.text == "short":
        from pipeline.train.synth_lines import lang_alphabet

        chars |= set(lang_alphabet(warmup_cfg.lang))
    train = {**warmup, "scan": scan_train, "real": real_train}
    return RealLinesData(train, {"real": heldout, "scan": scan_val}, "".join(sorted(chars)))


def real_sources(data: DataConfig, train: dict[str, str], mode: str) -> list[SourceSpec]:
    """The warm-up lines from the start (in data.scan.warmup_mode, default `mode`), the long
    synthetic lines after data.scan.warmup_lines samples, the real ones after
    data.real.start_after; those in image mode `mode` (eval.mode)."""
    scan = data.scan
    warmup = []
    if scan.warmup_lines:
        warmup = [SourceSpec("scan-warmup", train["warmup"], weight=scan.warmup_weight, prompt="free_ocr",
                             modes=scan.warmup_mode or mode)]  # fmt: skip
    return warmup + [
        SourceSpec("scan-lines", train["scan"], weight=scan.weight, prompt="free_ocr", modes=mode,
                   start_after=scan.warmup_lines),  # fmt: skip
        SourceSpec(
            "real-lines",
            train["real"],
            weight=data.real.weight,
            prompt="free_ocr",
            modes=mode,
            start_after=data.real.start_after,
        ),  # fmt: skip
    ]
