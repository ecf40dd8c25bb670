"""Document parsing output: grounding-markdown generations -> clean per-page markdown files, and a
normalised edit-distance scorer for pages with known markdown.

The conversion follows the release's PDF script (DeepSeek-OCR-vllm/run_dpsk_ocr_pdf.py): the
output of `<image>\\n<|grounding|>Convert the document to markdown.` is a sequence of blocks
`<|ref|>LABEL<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>` + block text. Image blocks become
`![](images/<page>_<i>.jpg)` links, every other grounding tag is dropped, `\\coloneqq` /
`\\eqqcolon` become `:=` / `=:`, and runs of blank lines shrink to one. `boxes="keep"` instead
keeps the raw output (the release's `_det.mmd`). The files feed OmniDocBench's end-to-end
script; its edit distance (Levenshtein / max length, lower is better) is what `score_markdown`
computes for our own synthetic pages.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rapidfuzz.distance import Levenshtein

from pipeline.eval.metrics import GROUNDING_ENTRY, Normalizer

EOS_TEXT = "<｜end▁of▁sentence｜>"
_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_BLANK_RUN = re.compile(r"\n{3,}")
_LATEX_FIXES = (("\\coloneqq", ":="), ("\\eqqcolon", "=:"))
_UNSAFE_NAME = re.compile(r"[^\w.\-]+")


@dataclass(frozen=True)
class MarkdownConfig:
    """How grounding output becomes a page's markdown.

    boxes: "strip" (clean markdown) or "keep" (raw output with the grounding tags).
    image_links: image blocks become `![](<image_dir>/<page>_<i>.jpg)` (else they vanish).
    latex_fixes: `\\coloneqq` -> `:=`, `\\eqqcolon` -> `=:` as the release does.
    """

    boxes: Literal["strip", "keep"] = "strip"
    image_links: bool = True
    image_dir: str = "images"
    latex_fixes: bool = True

    def __post_init__(self) -> None:
        if self.boxes not in ("strip", "keep"):
            raise ValueError(f"MarkdownConfig.boxes must be 'strip' or 'keep', got {self.boxes!r}")


def grounding_to_markdown(text: str, page: str = "0", config: MarkdownConfig | None = None) -> str:
    """One page's generated text -> markdown (see module docstring). The EOS text is removed."""
    config = config or MarkdownConfig()
    text = text.replace(EOS_TEXT, "")
    if config.boxes == "keep":
        return text.strip() + "\n"
    image_index = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal image_index
        if match.group(1).strip() != "image":
            return ""
        if not config.image_links:
            return ""
        link = f"![]({config.image_dir}/{page}_{image_index}.jpg)\n"
        image_index += 1
        return link

    text = GROUNDING_ENTRY.sub(replace, text)
    if config.latex_fixes:
        for old, new in _LATEX_FIXES:
            text = text.replace(old, new)
    text = _BLANK_RUN.sub("\n\n", text)
    return text.strip() + "\n"


def page_file_name(key: str) -> str:
    """A file name for a page key: characters outside [A-Za-z0-9_.-] become '_'."""
    name = _UNSAFE_NAME.sub("_", key).strip("._")
    if not name:
        raise ValueError(f"page key {key!r} gives an empty file name")
    return name + ".md"


def write_markdown_pages(
    outputs: Mapping[str, str], out_dir: str | Path, config: MarkdownConfig | None = None
) -> dict[str, Path]:
    """Write one `<key>.md` per page (key -> generated text) into out_dir; returns key -> path.

    Two keys that map to the same file name raise ValueError (one page would overwrite another).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    owners: dict[str, str] = {}
    for key in outputs:
        name = page_file_name(key)
        if name in owners:
            raise ValueError(f"page keys {owners[name]!r} and {key!r} both map to the file {name}")
        owners[name] = key
        paths[key] = out / name
    for key, text in outputs.items():
        paths[key].write_text(
            grounding_to_markdown(text, page=paths[key].stem, config=config), encoding="utf-8"
        )
    return paths


def normalize_markdown(text: str, normalizer: Normalizer | None = None, drop_images: bool = True) -> str:
    """Markdown for scoring: grounding tags and EOS removed, image links dropped (optional), then
    `normalizer` (default: NFKC + whitespace collapse, as for CER)."""
    text = GROUNDING_ENTRY.sub("", text.replace(EOS_TEXT, ""))
    if drop_images:
        text = _IMAGE_LINK.sub("", text)
    return (normalizer or Normalizer())(text)


@dataclass(frozen=True)
class MarkdownScores:
    """Edit distances of a page set: per page, their mean (OmniDocBench's page average) and the
    overall ratio sum(edits) / sum(max lengths)."""

    per_page: dict[str, float]
    mean: float
    overall: float

    def as_dict(self) -> dict:
        return {
            "mean": self.mean,
            "overall": self.overall,
            "num_pages": len(self.per_page),
            "per_page": self.per_page,
        }


def score_markdown(
    references: Mapping[str, str],
    predictions: Mapping[str, str],
    normalizer: Normalizer | None = None,
) -> MarkdownScores:
    """Normalised edit distance of predicted vs known markdown, both passed through
    `normalize_markdown`. Keys must match; an empty reference raises ValueError."""
    missing = sorted(set(references) - set(predictions))
    extra = sorted(set(predictions) - set(references))
    if missing or extra:
        raise ValueError(f"page keys differ: missing predictions {missing[:5]}, unknown pages {extra[:5]}")
    if not references:
        raise ValueError("score_markdown needs at least one page")
    per_page: dict[str, float] = {}
    edits = lengths = 0
    for key, ref_text in references.items():
        ref = normalize_markdown(ref_text, normalizer)
        if not ref:
            raise ValueError(f"page {key!r} has an empty reference markdown")
        pred = normalize_markdown(predictions[key], normalizer)
        dist = Levenshtein.distance(ref, pred)
        longest = max(len(ref), len(pred))
        per_page[key] = dist / longest
        edits += dist
        lengths += longest
    return MarkdownScores(per_page, statistics.fmean(per_page.values()), edits / lengths)
