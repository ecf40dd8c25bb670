"""The `lines` image mode: wide line images folded into stacked rows before the square view."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.processing import MODES, fold_line, num_placeholders, process_image

pytestmark = pytest.mark.unit


def words_image(n_words=24, word_w=50, space=22, height=40) -> Image.Image:
    """A line of dark 'words' (solid blocks) separated by spaces, on light paper."""
    width = n_words * (word_w + space) + space
    img = Image.new("RGB", (width, height), (240, 235, 220))
    draw = ImageDraw.Draw(img)
    for k in range(n_words):
        x = space + k * (word_w + space)
        draw.rectangle([x, 10, x + word_w - 1, 29], fill=(20, 20, 20))
    return img


def dark_blocks_per_row(img: Image.Image, height: int, pitch: int) -> list[int]:
    """Number of separate dark runs along the middle of each stacked row."""
    grey = np.asarray(img.convert("L"))
    counts = []
    for top in range(0, img.height, pitch):
        row = grey[top + height // 2] < 128
        counts.append(int(np.sum(row[1:] & ~row[:-1]) + row[0]))
    return counts


def test_a_wide_line_becomes_near_square_rows_cut_between_words():
    line = words_image()  # 1750 x 40, aspect ~44
    folded = fold_line(line)
    rows = round(np.sqrt(line.width / line.height / 1.1))
    pitch = 40 + 4
    assert folded.height == rows * pitch - 4
    assert 0.5 < folded.width / folded.height < 2.0
    blocks = dark_blocks_per_row(folded, 40, pitch)
    assert len(blocks) == rows and sum(blocks) == 24  # every word whole, none cut in two
    ink = lambda im: int((np.asarray(im.convert("L")) < 128).sum())  # noqa: E731
    assert ink(folded) == ink(line)  # nothing lost or duplicated
    paper = np.asarray(folded)[-1, -1]
    assert tuple(paper) == (240, 235, 220)  # padding in the paper's colour


def test_short_or_square_images_are_unchanged_and_the_view_is_small_sized():
    line = words_image(n_words=1)
    assert fold_line(line) is line
    views = process_image(words_image(), "lines")
    assert tuple(views.global_view.shape) == (3, 640, 640) and views.tiles is None
    assert views.num_placeholders == num_placeholders("small")
    assert MODES["debug-lines"].fold and not MODES["small"].fold
