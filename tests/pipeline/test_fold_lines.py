"""The `lines` image mode: a line image laid out at a fixed scale on the square page."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.processing import MODES, fold_line, num_placeholders, process_image

pytestmark = pytest.mark.unit

PAPER = (240, 235, 220)


def words_image(n_words=24, word_w=50, space=22, height=40) -> Image.Image:
    """A line of dark 'words' (solid blocks, rows 10-29) separated by spaces, on light paper."""
    width = n_words * (word_w + space) + space
    img = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(img)
    for k in range(n_words):
        x = space + k * (word_w + space)
        draw.rectangle([x, 10, x + word_w - 1, 29], fill=(20, 20, 20))
    return img


def dark_runs(mask_row: np.ndarray) -> int:
    return int(np.sum(mask_row[1:] & ~mask_row[:-1]) + mask_row[0])


def text_rows(page: Image.Image) -> list[tuple[int, int]]:
    """(top, bottom) of each band of rows holding ink."""
    inked = (np.asarray(page.convert("L")) < 128).any(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], inked.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2], strict=True))


def test_a_wide_line_is_wrapped_at_word_spaces_on_the_page():
    page = fold_line(words_image(), 640)  # 1750 x 40 -> 80 px rows: 3500 px of text, 6 rows
    assert page.size == (640, 640)
    bands = text_rows(page)
    assert len(bands) == 6
    grey = np.asarray(page.convert("L")) < 128
    words = [dark_runs(grey[(top + bottom) // 2]) for top, bottom in bands]
    assert sum(words) == 24  # every word whole, none cut in two, none lost
    assert all(n >= 3 for n in words[:-1])  # rows filled up to the last space that fits
    assert tuple(np.asarray(page)[-1, -1]) == PAPER  # the rest of the page is paper


def test_every_line_is_seen_at_the_same_character_size():
    short, long = fold_line(words_image(n_words=2), 640), fold_line(words_image(n_words=24), 640)
    (top, bottom), *_ = text_rows(short)
    assert [b - t for t, b in text_rows(long)] == [bottom - top] * 6  # the same glyph height
    assert top == text_rows(long)[0][0]  # from the top left
    assert len(text_rows(short)) == 1


def test_a_line_too_long_for_the_page_is_scaled_down_until_it_fits():
    page = fold_line(words_image(n_words=120), 640)  # 8,700 px of text at 80 px rows
    grey = np.asarray(page.convert("L")) < 128
    bands = text_rows(page)
    assert sum(dark_runs(grey[(t + b) // 2]) for t, b in bands) == 120
    assert bands[0][1] - bands[0][0] < 40  # smaller glyphs than the 40 px of a line that fits


def test_the_lines_view_is_small_sized():
    views = process_image(words_image(), "lines")
    assert tuple(views.global_view.shape) == (3, 640, 640) and views.tiles is None
    assert views.num_placeholders == num_placeholders("small")
    assert tuple(process_image(words_image(), "debug-lines").global_view.shape) == (3, 256, 256)
    assert MODES["debug-lines"].fold and not MODES["small"].fold
