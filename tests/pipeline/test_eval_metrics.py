"""Metrics against hand-computed cases: CER/WER aggregates, normalisation (Persian, CJK), Fox scores."""

import pytest

from pipeline.eval.metrics import (
    Normalizer,
    cer,
    char_precision_recall,
    corpus_metrics,
    fox_scores,
    fox_words,
    is_loop,
    normalized_edit_distance,
    score_sample,
    wer,
)

pytestmark = pytest.mark.unit


def test_cer_wer_hand_computed():
    assert cer("kitten", "sitting") == pytest.approx(3 / 6)  # k->s, e->i, +g
    assert cer("abc", "abc") == 0.0
    assert cer("ab", "xyzw") == pytest.approx(4 / 2)  # 2 substitutions + 2 insertions: CER may exceed 1
    assert wer("the cat sat", "the bat sat on") == pytest.approx(2 / 3)  # 1 substitution, 1 insertion
    assert wer("a b", "") == 1.0


def test_corpus_mean_median_capped():
    scores = [score_sample("abcd", "abce"), score_sample("ab", "xyzw"), score_sample("abcdef", "abcdef")]
    m = corpus_metrics(scores)
    assert m.num_samples == 3
    assert m.corpus_cer == pytest.approx((1 + 4 + 0) / (4 + 2 + 6))
    assert m.mean_cer == pytest.approx((0.25 + 2.0 + 0.0) / 3)
    assert m.median_cer == pytest.approx(0.25)
    assert m.capped_cer == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    # each reference is one word: the first two samples are 1 substitution (+ nothing) each
    assert m.corpus_wer == pytest.approx(2 / 3)
    assert m.median_wer == 1.0


def test_empty_reference_rejected():
    with pytest.raises(ValueError, match="empty reference"):
        cer("  ", "x")
    with pytest.raises(ValueError, match="empty reference"):
        score_sample("", "x")
    with pytest.raises(ValueError):
        corpus_metrics([])


def test_persian_letter_folding_and_diacritics():
    ref_arabic_kaf_yeh = "\u0643\u062a\u0627\u0628 \u0639\u0644\u064a"  # كتاب علي (Arabic kaf, yeh)
    pred_persian = "\u06a9\u062a\u0627\u0628 \u0639\u0644\u06cc"  # کتاب علی (Persian keheh, yeh)
    assert cer(ref_arabic_kaf_yeh, pred_persian) == pytest.approx(2 / 8)
    norm = Normalizer()
    assert cer(norm(ref_arabic_kaf_yeh), norm(pred_persian)) == 0.0
    # kasra/fatha + tatweel are dropped: كَتَـب -> کتب
    assert norm("\u0643\u064e\u062a\u064e\u0640\u0628") == "\u06a9\u062a\u0628"
    # presentation forms fold through NFKC then to the Persian yeh
    assert norm("\ufef1") == "\u06cc"


def test_zwnj_modes():
    ref = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # می‌خواهم (with ZWNJ), 8 code points
    joined = "\u0645\u06cc\u062e\u0648\u0627\u0647\u0645"  # میخواهم
    spaced = "\u0645\u06cc \u062e\u0648\u0627\u0647\u0645"  # می خواهم
    assert cer(ref, joined) == pytest.approx(1 / 8)
    assert cer(ref, spaced) == pytest.approx(1 / 8)
    remove = Normalizer(zwnj="remove")
    assert remove(ref) == joined and cer(remove(ref), remove(joined)) == 0.0
    space = Normalizer(zwnj="space")
    assert cer(space(ref), space(spaced)) == 0.0
    assert Normalizer(zwnj="keep")(ref) == ref
    with pytest.raises(ValueError, match="zwnj"):
        Normalizer(zwnj="drop")


def test_nfkc_whitespace_case():
    norm = Normalizer()
    assert norm(" \ufb01ne\u00a0 \uff21\uff22\n\tc ") == "fine AB c"  # ligature, NBSP, fullwidth
    assert Normalizer(casefold=True)("Straße") == "strasse"
    assert Normalizer(fold_digits=True)("\u06f1\u06f2\u0663") == "123"
    assert Normalizer.identity()("  a\u200cb  ") == "  a\u200cb  "
    assert norm("a\u200bb") == "ab"  # zero-width space dropped
    grounded = "<|ref|>title<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n# Hi\n\n<|ref|>text<|/ref|><|det|>[[5, 6, 7, 8]]<|/det|>\nthere"
    assert Normalizer(strip_grounding=True)(grounded) == "# Hi there"
    assert norm(grounded) == grounded.replace("\n\n", " ").replace("\n", " ")  # kept by default


def test_cjk_cer_and_fox_chars():
    ref, pred = "我爱北京天安门", "我爱北京"
    assert cer(ref, pred) == pytest.approx(3 / 7)
    assert wer(ref, pred) == 1.0  # no spaces: one word each, substituted
    assert fox_words("我爱 ab北京", cjk="chars") == ["我", "爱", "ab", "北", "京"]
    fox = fox_scores(ref, pred)
    assert fox.precision == pytest.approx(4 / 7) and fox.recall == 1.0
    assert fox.edit_distance == pytest.approx(3 / 7)


def test_fox_word_set_scores_english():
    # unique ground-truth words {the, cat, dog}; output words {the, dog, barked}
    fox = fox_scores("the cat the dog", "the dog barked")
    assert fox.precision == pytest.approx(2 / 3)
    assert fox.recall == pytest.approx(2 / 3)
    assert fox.f_measure == pytest.approx(2 / 3)
    # repeating found words does not raise the word-set precision
    assert fox_scores("a b c d", "a a a a a").precision == pytest.approx(1 / 4)
    empty = fox_scores("a b", "")
    assert (empty.precision, empty.recall, empty.f_measure, empty.edit_distance) == (0.0, 0.0, 0.0, 1.0)


def test_char_precision_recall_and_ned():
    p, r = char_precision_recall("abcdef", "abxdefgh")  # LCS "abdef" = 5
    assert p == pytest.approx(5 / 8) and r == pytest.approx(5 / 6)
    assert char_precision_recall("abc", "") == (0.0, 0.0)
    assert normalized_edit_distance("abc", "abd") == pytest.approx(1 / 3)
    assert normalized_edit_distance("ab", "abcd") == pytest.approx(2 / 4)
    assert normalized_edit_distance("", "") == 0.0
    assert normalized_edit_distance("abc", "") == 1.0


def test_loop_rule():
    assert is_loop("abc", "abc", hit_eos=False)
    assert not is_loop("abc", "abcabcabc", hit_eos=True)  # exactly 3x is not a loop
    assert is_loop("abc", "abcabcabca", hit_eos=True)
    assert not is_loop("abc", "abcabca", hit_eos=True, factor=3.0)
    assert is_loop("abc", "abcabca", hit_eos=True, factor=2.0)
