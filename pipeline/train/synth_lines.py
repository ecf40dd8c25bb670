"""Data of `data.kind=synth_lines` (the embedded default): fixed-pitch reading lines rendered
with data_tools into webdataset shards inside the run directory (reused when their settings
are unchanged), optionally with paragraph pages and Persian lines as further sets; each set is
trained and evaluated in its own image mode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.config import SourceSpec


@dataclass(frozen=True)
class SynthSet:
    """One rendered set of `data.kind=synth_lines`: its train / held-out configs."""

    name: str
    train: object  # data_tools.synth.reading.ReadingLinesConfig
    val: object
    mode: str  # pipeline.processing.MODES key the set is trained and evaluated in

    @property
    def max_new_tokens(self) -> int:
        """Generation budget that fits the set's longest reference (characters + newlines)."""
        return self.train.lines * (self.train.max_chars + 1) + 8


def synth_sets(data: DataConfig) -> list[SynthSet]:
    """The sets `data.synth` asks for: Latin lines always; paragraphs and Persian lines when counted."""
    from data_tools.synth.reading import ReadingLinesConfig

    syn = data.synth
    lines = dict(width=syn.image_size, min_chars=syn.min_chars, max_chars=syn.max_chars)
    wanted = [("lines", syn.num_train, {**lines}, syn.mode)]
    if syn.paragraphs:
        wanted.append(("paragraphs", syn.paragraphs, dict(width=syn.paragraph_size or syn.image_size, min_chars=1,
                       max_chars=syn.paragraph_chars, lines=syn.paragraph_lines), syn.paragraph_mode or syn.mode))  # fmt: skip
    if syn.persian:
        wanted.append(("persian", syn.persian, {**lines, "lang": "fa"}, syn.mode))
    sets = []
    for k, (name, n, kwargs, mode) in enumerate(wanted):
        # the Latin lines keep the sources and seeds of the embedded default
        tag = "reading-lines" if name == "lines" else f"reading-{name}"
        train = ReadingLinesConfig(n=n, seed=syn.seed + 104_729 * k, source=f"{tag}-train", **kwargs)
        val = ReadingLinesConfig(
            n=syn.num_val, seed=syn.seed + 104_729 * k + 7919, source=f"{tag}-val", **kwargs
        )
        sets.append(SynthSet(name, train, val, mode))
    return sets


def _render(cfg, out: Path, prefix: str, workers: int, render: bool = True) -> str:
    """Render one reading set into shards under `out` (reused when its manifest matches);
    render=False only checks that they are there (ranks that read what rank 0 rendered)."""
    from data_tools.shards import ShardWriterConfig
    from data_tools.synth.reading import write_reading_lines

    manifest = out / "manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("reading_lines") == vars(cfg)):
        if not render:
            raise ValueError(
                f"no complete shards of {cfg.source} in {out}: the rendering rank writes them first"
            )
        write_reading_lines(
            cfg, ShardWriterConfig(str(out), prefix=prefix, max_count=5000, overwrite=True), workers
        )
    return str(out / f"{prefix}-*.tar")


def _render_set(synth: SynthSet, data_dir: Path, workers: int, render: bool = True) -> tuple[str, str]:
    """One set's (train pattern, val pattern) under `data_dir`."""
    return (_render(synth.train, data_dir / "train", "train", workers, render),
            _render(synth.val, data_dir / "val", "val", workers, render))  # fmt: skip


def prepare_synth_sets(data: DataConfig, data_dir: Path, render: bool = True) -> dict[str, tuple[str, str]]:
    """Render every synth set's train/val shards; {set name: (train pattern, val pattern)}."""
    workers = data.synth.workers
    return {synth.name: _render_set(synth, data_dir if synth.name == "lines" else data_dir / synth.name,
                                    workers, render)
            for synth in synth_sets(data)}  # fmt: skip


def prepare_synth_lines(data: DataConfig, data_dir: Path) -> tuple[str, str]:
    """The Latin reading lines' train/val shards (the embedded default's data)."""
    return _render_set(synth_sets(data)[0], data_dir, data.synth.workers)


def lang_alphabet(lang: str) -> str:
    """Every character the synthetic text of `lang` can produce (word list, letters, digits, punctuation)."""
    from data_tools.synth import wordlists
    from data_tools.synth.fonts import script_of_lang

    script = script_of_lang(lang)
    chars = set("".join(wordlists.WORDS[lang])) | set(wordlists.LETTERS[script]) | set(wordlists.DIGITS)
    chars |= set(wordlists.LOCAL_DIGITS.get(script, "")) | set("".join(wordlists.PUNCT[script]))
    return "".join(sorted(chars - {"\n"}))


def synth_sources(data: DataConfig, train: dict[str, str]) -> list[SourceSpec]:
    """The sets mixed in proportion to their sizes; the lines alone for the first
    `data.synth.lines_first` samples."""
    sets = {s.name: s for s in synth_sets(data)}
    return [SourceSpec(f"reading-{name}", pattern, weight=float(sets[name].train.n), prompt="free_ocr",
                       modes=sets[name].mode, start_after=0 if name == "lines" else data.synth.lines_first)
            for name, pattern in train.items()]  # fmt: skip
