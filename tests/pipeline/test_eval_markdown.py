"""Grounding output -> markdown pages, and the normalised edit-distance scorer."""

import pytest

from pipeline.eval.markdown import (
    MarkdownConfig,
    grounding_to_markdown,
    normalize_markdown,
    page_file_name,
    score_markdown,
    write_markdown_pages,
)

pytestmark = pytest.mark.unit

OUTPUT = (
    "<|ref|>title<|/ref|><|det|>[[10, 20, 500, 60]]<|/det|>\n# Report\n\n\n"
    "<|ref|>text<|/ref|><|det|>[[10, 80, 900, 200]]<|/det|>\nWe define $a \\coloneqq b$.\n\n"
    "<|ref|>image<|/ref|><|det|>[[10, 300, 400, 600]]<|/det|>\n\n\n"
    "<|ref|>image<|/ref|><|det|>[[500, 300, 900, 600], [1, 2, 3, 4]]<|/det|>\n\n"
    "<|ref|>table<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n<table><tr><td>1</td></tr></table>"
    "<｜end▁of▁sentence｜>"
)


def test_strip_boxes():
    md = grounding_to_markdown(OUTPUT, page="p1")
    assert md == (
        "# Report\n\nWe define $a := b$.\n\n![](images/p1_0.jpg)\n\n![](images/p1_1.jpg)\n\n"
        "<table><tr><td>1</td></tr></table>\n"
    )
    no_images = grounding_to_markdown(OUTPUT, config=MarkdownConfig(image_links=False, latex_fixes=False))
    assert no_images == "# Report\n\nWe define $a \\coloneqq b$.\n\n<table><tr><td>1</td></tr></table>\n"


def test_keep_boxes():
    md = grounding_to_markdown(OUTPUT, config=MarkdownConfig(boxes="keep"))
    assert md.startswith("<|ref|>title<|/ref|><|det|>[[10, 20, 500, 60]]<|/det|>\n# Report")
    assert "end▁of▁sentence" not in md and md.count("<|det|>") == 5
    with pytest.raises(ValueError, match="boxes"):
        MarkdownConfig(boxes="drop")


def test_write_pages(tmp_path):
    paths = write_markdown_pages({"doc/p1": OUTPUT, "doc/p2": "plain text"}, tmp_path)
    assert paths["doc/p1"].name == "doc_p1.md"
    assert "![](images/doc_p1_0.jpg)" in paths["doc/p1"].read_text()
    assert paths["doc/p2"].read_text() == "plain text\n"
    assert page_file_name("a b:c") == "a_b_c.md"
    with pytest.raises(ValueError, match="both map"):
        write_markdown_pages({"a/b": "x", "a_b": "y"}, tmp_path)


def test_score_markdown():
    refs = {"p1": "# Title\n\nHello world", "p2": "| a | b |"}
    preds = {
        "p1": "<|ref|>title<|/ref|><|det|>[[0, 0, 9, 9]]<|/det|>\n# Title\n\nHello word<｜end▁of▁sentence｜>",
        "p2": "| a | b |\n![](images/p2_0.jpg)",
    }
    assert normalize_markdown(preds["p1"]) == "# Title Hello word"
    scores = score_markdown(refs, preds)
    assert scores.per_page == {"p1": pytest.approx(1 / 19), "p2": 0.0}
    assert scores.mean == pytest.approx(1 / 38)
    assert scores.overall == pytest.approx(1 / (19 + 9))
    with pytest.raises(ValueError, match="missing predictions"):
        score_markdown(refs, {"p1": "x"})
    with pytest.raises(ValueError, match="empty reference"):
        score_markdown({"p": "  "}, {"p": "x"})
