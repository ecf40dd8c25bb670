"""Tiny in-memory test images for the data_tools tests."""

from __future__ import annotations

import io

from PIL import Image


def png_bytes(w: int = 24, h: int = 16, color=(10, 20, 30), fmt: str = "PNG") -> bytes:
    img = Image.new("RGB", (w, h), color)
    img.putpixel((1, 1), (250, 0, 0))  # not uniform, so formats cannot collapse it to nothing
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def noise_png(w: int = 64, h: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((w, h), 60).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()
