"""Fixtures for data_tools tests: files for every kind of bad image input."""

from __future__ import annotations

import pytest
from dt_images import noise_png, png_bytes


@pytest.fixture
def bad_files(tmp_path):
    """Files for each image failure: truncated PNG, non-image bytes, empty file, huge image."""
    d = tmp_path / "img"
    d.mkdir()
    full = noise_png()
    (d / "truncated.png").write_bytes(full[: len(full) // 2])
    (d / "notimage.png").write_bytes(b"this is not an image at all" * 10)
    (d / "empty.png").write_bytes(b"")
    (d / "huge.png").write_bytes(png_bytes(400, 300))  # over max_pixels=100_000 in the tests
    return d
