"""OCR quality metrics: CER/WER (corpus, mean, median, capped), text normalisation, loop detection,
Fox word-set precision, character precision/recall and normalised edit distance.

Follows ../shared/spec/training.md "Measuring OCR quality":
- CER = Levenshtein edits / reference characters; reported as corpus CER (sum of edits over sum of
  reference characters), mean and median of per-sample CER, and mean of per-sample CER capped at 1.
- WER is the same over whitespace-separated words.
- Normalised variants: NFKC, whitespace collapse, Arabic/Persian letter folding (ي/ى -> ی, ك -> ک),
  Arabic diacritics and tatweel removal, ZWNJ handling (`Normalizer`).
- Loop: no EOS, or an output longer than 3x its reference.
- Fox page OCR (github.com/ucaslcl/Fox, eval_tools/eval_ocr_test.py, the script behind DeepSeek-OCR
  Table 2): its "precision" is the fraction of *unique* ground-truth words that appear in the output
  (word sets, not counts); its edit distance is Levenshtein / max(len(pred), len(gt)), the same
  normalisation OmniDocBench uses.
- Character precision/recall: the longest common subsequence of characters over the output /
  the reference length.

Edit distances come from rapidfuzz (C++ Levenshtein/LCS over strings or word lists).
"""

from __future__ import annotations

import re
import statistics
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rapidfuzz.distance import LCSseq, Levenshtein

ZWNJ = "\u200c"
# zero-width characters with no OCR meaning: ZWSP, ZWJ, word joiner, BOM
_ZERO_WIDTH = "\u200b\u200d\u2060\ufeff"
# Arabic/Persian letter folding to the Persian forms
_ARABIC_FOLD = str.maketrans({"\u064a": "\u06cc", "\u0649": "\u06cc", "\u0643": "\u06a9"})
# Arabic harakat, Quranic annotation marks, superscript alef, tatweel
_ARABIC_DIACRITICS = re.compile(
    "[\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06dc\u06df-\u06e4\u06e7\u06e8\u06ea-\u06ed\u0640]"
)
# Arabic-Indic and extended (Persian) digits -> ASCII
_DIGIT_FOLD = str.maketrans(
    {**{chr(0x0660 + i): str(i) for i in range(10)}, **{chr(0x06F0 + i): str(i) for i in range(10)}}
)
_WHITESPACE = re.compile(r"\s+")
# one grounding entry `<|ref|>LABEL<|/ref|><|det|>[[...]]<|/det|>`; groups: label, boxes
GROUNDING_ENTRY = re.compile(r"<\|ref\|>(.*?)<\|/ref\|>\s*<\|det\|>(.*?)<\|/det\|>", re.DOTALL)
# Fox's test for Chinese text (it switches to a Chinese word segmenter when either side matches)
_FOX_CHINESE = re.compile(r"[\u4e00-\u9fa5]")
_CJK_OR_RUN = re.compile(r"[\u4e00-\u9fff]|[^\s\u4e00-\u9fff]+")


@dataclass(frozen=True)
class Normalizer:
    """Text normalisation applied to reference and prediction alike before scoring.

    Steps, in order: grounding-tag removal (off by default: scores the text of grounding outputs
    only); NFKC (also maps Arabic presentation forms to letters); zero-width character
    removal; Arabic/Persian letter folding; Arabic diacritics + tatweel removal; digit folding;
    ZWNJ handling ("remove" drops it, "space" turns it into a space, "keep" leaves it);
    case folding; whitespace collapse (runs of whitespace -> one space, ends stripped).
    """

    strip_grounding: bool = False
    nfkc: bool = True
    remove_zero_width: bool = True
    fold_arabic_letters: bool = True
    remove_arabic_diacritics: bool = True
    fold_digits: bool = False
    zwnj: Literal["remove", "space", "keep"] = "remove"
    casefold: bool = False
    collapse_whitespace: bool = True

    def __post_init__(self) -> None:
        if self.zwnj not in ("remove", "space", "keep"):
            raise ValueError(f"Normalizer.zwnj must be 'remove', 'space' or 'keep', got {self.zwnj!r}")

    @classmethod
    def identity(cls) -> Normalizer:
        """A normaliser that changes nothing (the raw metrics)."""
        return cls(
            strip_grounding=False,
            nfkc=False,
            remove_zero_width=False,
            fold_arabic_letters=False,
            remove_arabic_diacritics=False,
            fold_digits=False,
            zwnj="keep",
            casefold=False,
            collapse_whitespace=False,
        )

    def __call__(self, text: str) -> str:
        if self.strip_grounding:
            text = GROUNDING_ENTRY.sub("", text)
        if self.nfkc:
            text = unicodedata.normalize("NFKC", text)
        if self.remove_zero_width:
            text = text.translate({ord(c): None for c in _ZERO_WIDTH})
        if self.fold_arabic_letters:
            text = text.translate(_ARABIC_FOLD)
        if self.remove_arabic_diacritics:
            text = _ARABIC_DIACRITICS.sub("", text)
        if self.fold_digits:
            text = text.translate(_DIGIT_FOLD)
        if self.zwnj == "remove":
            text = text.replace(ZWNJ, "")
        elif self.zwnj == "space":
            text = text.replace(ZWNJ, " ")
        if self.casefold:
            text = text.casefold()
        if self.collapse_whitespace:
            text = _WHITESPACE.sub(" ", text).strip()
        return text


def _require_reference(reference: str) -> None:
    if not reference.strip():
        raise ValueError("empty reference: error rates are undefined for an empty ground truth")


def char_edits(reference: str, prediction: str) -> int:
    """Levenshtein distance between the two strings in characters (unit costs)."""
    return Levenshtein.distance(reference, prediction)


def word_edits(reference: str, prediction: str) -> int:
    """Levenshtein distance between the whitespace-split word sequences."""
    return Levenshtein.distance(reference.split(), prediction.split())


def cer(reference: str, prediction: str) -> float:
    """Per-sample character error rate: edits / reference characters (may exceed 1)."""
    _require_reference(reference)
    return char_edits(reference, prediction) / len(reference)


def wer(reference: str, prediction: str) -> float:
    """Per-sample word error rate: word edits / reference words (may exceed 1)."""
    _require_reference(reference)
    return word_edits(reference, prediction) / len(reference.split())


def is_loop(reference: str, prediction: str, hit_eos: bool, factor: float = 3.0) -> bool:
    """A repetition loop: generation stopped without EOS, or the output is > factor x the reference."""
    return (not hit_eos) or len(prediction) > factor * len(reference)


def normalized_edit_distance(reference: str, prediction: str) -> float:
    """Levenshtein / max(len(reference), len(prediction)) in [0, 1] (Fox / OmniDocBench); 0 if both empty."""
    longest = max(len(reference), len(prediction))
    return Levenshtein.distance(reference, prediction) / longest if longest else 0.0


def char_precision_recall(reference: str, prediction: str) -> tuple[float, float]:
    """Character precision and recall from the longest common subsequence.

    precision = LCS / len(prediction) (0 for an empty prediction), recall = LCS / len(reference).
    """
    _require_reference(reference)
    common = LCSseq.similarity(reference, prediction)
    precision = common / len(prediction) if prediction else 0.0
    return precision, common / len(reference)


def fox_words(text: str, other: str = "", cjk: Literal["chars", "jieba"] = "chars") -> list[str]:
    """Split text into words as the Fox script does.

    Without Chinese in `text` or `other`: whitespace split. With Chinese (Fox's test), Fox uses the
    jieba segmenter (`cjk="jieba"`, needs `pip install jieba`); `cjk="chars"` instead takes each
    CJK character as a word and other non-space runs as words.
    """
    if not (_FOX_CHINESE.search(text) or _FOX_CHINESE.search(other)):
        return text.split()
    if cjk == "jieba":
        try:
            import jieba
        except ImportError as exc:
            raise ImportError("cjk='jieba' needs the jieba package: pip install jieba") from exc
        return jieba.lcut(text)
    if cjk != "chars":
        raise ValueError(f"cjk must be 'chars' or 'jieba', got {cjk!r}")
    return _CJK_OR_RUN.findall(text)


@dataclass(frozen=True)
class FoxScores:
    """Fox page-OCR scores for one page.

    precision: unique ground-truth words found in the output / unique ground-truth words (what the
    Fox script and DeepSeek-OCR Table 2 call precision). recall: unique output words that are
    ground-truth words / unique output words. f_measure: their harmonic mean (0 if either is 0).
    edit_distance: normalised character edit distance.
    """

    precision: float
    recall: float
    f_measure: float
    edit_distance: float


def fox_scores(reference: str, prediction: str, cjk: Literal["chars", "jieba"] = "chars") -> FoxScores:
    """Fox script scores (see `FoxScores`) of one prediction against its ground truth."""
    _require_reference(reference)
    truth = set(fox_words(reference, prediction, cjk))
    found = set(fox_words(prediction, reference, cjk))
    common = len(truth & found)
    precision = common / len(truth) if truth else 0.0
    recall = common / len(found) if found else 0.0
    f_measure = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    return FoxScores(precision, recall, f_measure, normalized_edit_distance(reference, prediction))


@dataclass(frozen=True)
class SampleScore:
    """Edit counts of one sample; rates are derived so corpus sums stay exact."""

    char_edits: int
    ref_chars: int
    word_edits: int
    ref_words: int

    @property
    def cer(self) -> float:
        return self.char_edits / self.ref_chars

    @property
    def wer(self) -> float:
        return self.word_edits / self.ref_words


def score_sample(reference: str, prediction: str) -> SampleScore:
    """Character and word edit counts of one (already normalised) sample."""
    _require_reference(reference)
    return SampleScore(
        char_edits(reference, prediction),
        len(reference),
        word_edits(reference, prediction),
        len(reference.split()),
    )


@dataclass(frozen=True)
class CorpusMetrics:
    """Aggregate error rates over a set of samples (fractions, not percent)."""

    num_samples: int
    corpus_cer: float
    mean_cer: float
    median_cer: float
    capped_cer: float
    corpus_wer: float
    mean_wer: float
    median_wer: float

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def corpus_metrics(scores: Sequence[SampleScore]) -> CorpusMetrics:
    """Corpus, mean, median and capped-at-1 CER plus corpus/mean/median WER."""
    if not scores:
        raise ValueError("corpus_metrics needs at least one sample")
    cers = [s.cer for s in scores]
    wers = [s.wer for s in scores]
    return CorpusMetrics(
        num_samples=len(scores),
        corpus_cer=sum(s.char_edits for s in scores) / sum(s.ref_chars for s in scores),
        mean_cer=statistics.fmean(cers),
        median_cer=statistics.median(cers),
        capped_cer=statistics.fmean(min(c, 1.0) for c in cers),
        corpus_wer=sum(s.word_edits for s in scores) / sum(s.ref_words for s in scores),
        mean_wer=statistics.fmean(wers),
        median_wer=statistics.median(wers),
    )
