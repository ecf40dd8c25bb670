"""Typed configuration of the streaming data path: sources, mixture, modes, packing.

A `LoaderConfig` holds one `SourceSpec` per shard set. Mixture weights are relative
(normalised over the sources), so the paper's stage-2 mix (arXiv 2510.18234 section
3.5: 70% OCR 1.0+2.0, 20% general vision, 10% text-only; ../shared/spec/training.md)
is three sources weighted 0.7 / 0.2 / 0.1 (`paper_mixture`). Each source names its
default prompt (a `pipeline.prompts.PROMPTS` key or a literal) and its image modes:
one fixed mode, or a distribution that `pipeline.processing.select_mode` samples per
sample (the paper trains Tiny/Small/Base/Large/Gundam jointly; its proportions are
unpublished, `paper_mixture` uses uniform weights).

The Hydra schema (`pipeline.config.DataConfig`) is converted by `from_run_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.processing import MODES, PAPER_MODES, mode_weights
from pipeline.prompts import get_prompt
from pipeline.tokenizer import IMAGE_TOKEN

KINDS = ("ocr", "text")
SPLITS = ("auto", "shard", "sample")
PAD_SIDES = ("right", "left")


@dataclass
class SourceSpec:
    """One shard set of the mixture.

    shards: brace pattern(s)/glob(s) of uncompressed webdataset tars.
    weight: relative mixture weight (> 0).
    prompt: PROMPTS key or literal prompt; a sample's JSON `prompt` overrides it. An
      "ocr" source's prompt has exactly one `<image>`; a "text" source's has none.
    modes: a mode name, or {mode: weight} sampled per sample. A sample's JSON `mode`
      (a known mode name) overrides it. Ignored for "text" sources.
    kind: "ocr" (image samples) or "text" (text-only: JSON `text`, or `prompt` + `answer`).
      The kind sets what the default prompt may be; each sample needs an image exactly
      when its own prompt (else the default) has `<image>` (pipeline.data.samples).
    start_after: a curriculum: the source joins the mixture after this many samples of the
      run (over all ranks and workers; each consumer waits for its share). 0 = from the start.
    """

    name: str
    shards: str | list[str]
    weight: float = 1.0
    prompt: str = "free_ocr"
    modes: dict[str, float] | str = "base"
    kind: str = "ocr"
    start_after: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"source name must be a non-empty string, got {self.name!r}")
        shards = [self.shards] if isinstance(self.shards, str) else list(self.shards)
        if not shards or not all(isinstance(s, str) and s.strip() for s in shards):
            raise ValueError(
                f"source {self.name!r}: shards must be non-empty path patterns, got {self.shards!r}"
            )
        self.shards = shards
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"source {self.name!r}: weight must be finite and > 0, got {self.weight}")
        if self.kind not in KINDS:
            raise ValueError(f"source {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.start_after, int) or self.start_after < 0:
            raise ValueError(
                f"source {self.name!r}: start_after must be an int >= 0, got {self.start_after!r}"
            )
        self.prompt = get_prompt(self.prompt)
        tags = self.prompt.count(IMAGE_TOKEN)
        if self.kind == "ocr" and tags != 1:
            raise ValueError(
                f"source {self.name!r}: an ocr prompt needs exactly one {IMAGE_TOKEN}, got {self.prompt!r}"
            )
        if self.kind == "text" and tags:
            raise ValueError(f"source {self.name!r}: a text-only prompt cannot contain {IMAGE_TOKEN}")
        if isinstance(self.modes, str):
            self._check_mode(self.modes)
        else:
            self.modes = dict(self.modes)
            if not self.modes:
                raise ValueError(f"source {self.name!r}: modes is empty; give a mode name or weights")
            for mode, weight in self.modes.items():
                self._check_mode(mode)
                if not (math.isfinite(weight) and weight >= 0):
                    raise ValueError(
                        f"source {self.name!r}: mode weight {mode}={weight} must be finite and >= 0"
                    )
            if sum(self.modes.values()) <= 0:
                raise ValueError(f"source {self.name!r}: mode weights {self.modes} sum to 0")

    def _check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"source {self.name!r}: unknown mode {mode!r}; known: {sorted(MODES)}")


@dataclass
class LoaderConfig:
    """The streaming loader of one data-parallel rank.

    seq_len: row length (8192 stage 2, 4096 stage 1); longer samples are skipped.
    batch_size: rows per micro-batch. packing: pack several samples per row (training);
      False gives one sample per row padded to the batch max (evaluation, generation).
    pack_buffer: samples held for best-fit packing. seed: order, mixture and modes.
    shuffle: seeded shard/sample permutations per epoch (False: file order).
    infinite: start a new epoch (new permutation) when a source ends; False stops
      after one pass over every source (evaluation).
    split: "shard", "sample" or "auto" (see pipeline.data.stream).
    num_workers: DataLoader worker processes per rank (0 = in the calling process).
    max_pixels: images above this are skipped. min_tiles/max_tiles: Gundam tiling.
    pad_side: unpacked batches only; "left" for generation.
    """

    sources: list[SourceSpec]
    seq_len: int = 8192
    batch_size: int = 1
    packing: bool = True
    pack_buffer: int = 16
    seed: int = 0
    shuffle: bool = True
    infinite: bool = True
    split: str = "auto"
    num_workers: int = 0
    prefetch_factor: int = 2
    max_pixels: int = 40_000_000
    min_tiles: int = 2
    max_tiles: int = 9
    pad_side: str = "right"

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("LoaderConfig needs at least one source")
        self.sources = [s if isinstance(s, SourceSpec) else SourceSpec(**s) for s in self.sources]
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if all(s.start_after for s in self.sources):
            raise ValueError(
                f"every source has start_after > 0 ({ {s.name: s.start_after for s in self.sources} }): "
                "the mixture needs at least one source from the start"
            )
        for attr in ("seq_len", "batch_size", "pack_buffer", "max_pixels", "prefetch_factor"):
            if getattr(self, attr) < 1:
                raise ValueError(f"{attr} must be >= 1, got {getattr(self, attr)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles}, {self.max_tiles}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.pad_side not in PAD_SIDES:
            raise ValueError(f"pad_side must be one of {PAD_SIDES}, got {self.pad_side!r}")
        if self.packing and self.pad_side != "right":
            raise ValueError("packed rows pad at the end only; pad_side='left' needs packing=False")

    @property
    def mixture(self) -> dict[str, float]:
        """Normalised source weights (once every source has joined; see SourceSpec.start_after)."""
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}

    @classmethod
    def debug(cls, shards: str | list[str], **overrides: Any) -> LoaderConfig:
        """Tiny CPU preset: one OCR source in the 128-px debug modes, rows of 512 tokens."""
        source = SourceSpec("debug", shards, modes={"debug": 1.0, "debug-pad": 1.0, "debug-gundam": 1.0})
        return cls(**{"sources": [source], "seq_len": 512, "batch_size": 2, "pack_buffer": 8, **overrides})


def paper_mixture(
    ocr: str | list[str], vision: str | list[str], text: str | list[str], **overrides: Any
) -> LoaderConfig:
    """The stage-2 mix: 70% OCR, 20% general vision, 10% text-only, all modes jointly."""
    modes = dict.fromkeys(PAPER_MODES, 1.0)
    sources = [
        SourceSpec("ocr", ocr, 0.7, "free_ocr", modes, "ocr"),
        SourceSpec("vision", vision, 0.2, "describe", modes, "ocr"),
        SourceSpec("text", text, 0.1, "text_only", "base", "text"),
    ]
    return LoaderConfig(**{"sources": sources, "seq_len": 8192, **overrides})


def from_run_config(data: Any, *, batch_size: int, seed: int, **overrides: Any) -> LoaderConfig:
    """Build from the Hydra schema `pipeline.config.DataConfig` (kind "webdataset")."""
    sources = [
        SourceSpec(s.name, s.shards, float(s.weight), s.prompt, mode_weights(s.modes), s.kind, s.start_after)
        for s in data.sources
    ]
    return LoaderConfig(
        **{
            "sources": sources,
            "seq_len": data.seq_len,
            "batch_size": batch_size,
            "packing": data.pack,
            "seed": seed,
            "num_workers": data.num_workers,
            "max_pixels": data.max_pixels,
            "max_tiles": data.max_tiles,
            **overrides,
        }
    )
