"""Grounding markup: parsing bins back to pixels (release formula), round trip, malformed output."""

import pytest

from pipeline.grounding import format_grounding, parse_grounding, pixel_to_bin, strip_grounding

pytestmark = pytest.mark.unit


def test_parse_release_format():
    text = (
        "<|ref|>title<|/ref|><|det|>[[10, 20, 500, 60]]<|/det|>\n# Heading\n"
        "<|ref|>text<|/ref|><|det|>[[0, 0, 999, 999], [100,200,300,400]]<|/det|>\nbody"
    )
    out = parse_grounding(text, (2000, 1000))
    # x = int(bin / 999 * W): 10/999*2000 = 20.02 -> 20; 500/999*2000 = 1001.0 -> 1001
    assert out == [
        ("title", [(20, 20, 1001, 60)]),
        ("text", [(0, 0, 2000, 1000), (200, 200, 600, 400)]),
    ]
    assert strip_grounding(text) == "title\n# Heading\ntext\nbody"


def test_malformed_and_out_of_range_boxes():
    text = "<|ref|>a<|/ref|><|det|>[[1, 2, 3]] garbage [[5, 6, 7, 8]]<|/det|><|ref|>b<|/ref|><|det|>[[-5, 0, 1500, 999]]<|/det|>"
    out = parse_grounding(text, (999, 999))
    assert out == [("a", [(5, 6, 7, 8)]), ("b", [(0, 0, 999, 999)])]
    assert parse_grounding("<|ref|>open<|/ref|><|det|>[[1, 2", (10, 10)) == []
    with pytest.raises(ValueError):
        parse_grounding("", (0, 10))


def test_format_then_parse_round_trip():
    size = (1234, 877)
    boxes = [(0, 0, 1234, 877), (100.4, 37, 640, 500), (1233, 876, 1234, 877)]
    text = format_grounding("cell", boxes, size)
    assert text.startswith("<|ref|>cell<|/ref|><|det|>[[0, 0, 999, 999], ")
    ((label, parsed),) = parse_grounding(text, size)
    assert label == "cell" and len(parsed) == 3
    for box, back in zip(boxes, parsed):
        for value, restored, side in zip(box, back, size * 2):
            assert abs(value - restored) <= side / 999 + 1  # one bin plus int truncation
    assert pixel_to_bin(-3, 100) == 0 and pixel_to_bin(150, 100) == 999
