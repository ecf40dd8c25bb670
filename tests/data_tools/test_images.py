"""`load_rgb` / `to_rgb`: every image mode Pillow opens keeps its content (a dark stroke on a light
page stays dark on light), EXIF orientation, transparency on white, and the bad-input errors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data_tools.images import load_rgb, to_rgb

pytestmark = pytest.mark.unit

H, W = 32, 48
STROKE = (slice(12, 20), slice(8, 40))  # rows, cols of the dark stroke


def page(paper: float, ink: float, dtype=np.uint8) -> np.ndarray:
    """An (H, W) page of value `paper` with a stroke of value `ink`."""
    values = np.full((H, W), paper, dtype=dtype)
    values[STROKE] = ink
    return values


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): grey (H, W), grey+alpha
    (H, W, 2), RGB (H, W, 3) or RGBA (H, W, 4)."""
    channels = 1 if values.ndim == 2 else values.shape[-1]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    height, width = values.shape[:2]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def tiff16_rgb(values: np.ndarray) -> bytes:
    """An uncompressed 16-bit RGB TIFF written by hand (Pillow cannot write one): header, one IFD,
    the BitsPerSample triple, then the (H, W, 3) little-endian samples as a single strip."""
    height, width, _ = values.shape
    data = values.astype("<u2").tobytes()
    tags = {256: width, 257: height, 258: None, 259: 1, 262: 2, 273: None, 277: 3, 278: height,
            279: len(data), 284: 1}  # fmt: skip
    ifd_end = 8 + 2 + 12 * len(tags) + 4
    bits_at, data_at = ifd_end, ifd_end + 6
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)))
    for tag, value in tags.items():
        if tag == 258:  # three SHORTs do not fit in the entry: stored at bits_at
            out += struct.pack("<HHII", tag, 3, 3, bits_at)
        elif tag in (273, 279):
            out += struct.pack("<HHII", tag, 4, 1, data_at if tag == 273 else value)
        else:
            out += struct.pack("<HHIHH", tag, 3, 1, value, 0)
    out += struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + data
    return bytes(out)


def assert_stroke_on_paper(rgb: Image.Image, ink_max: int = 60, paper_min: int = 195) -> None:
    assert rgb.mode == "RGB" and rgb.size == (W, H)
    pixels = np.asarray(rgb).astype(int)  # (H, W, 3)
    ink = pixels[STROKE]
    paper = pixels.copy()
    paper[STROKE] = 255
    assert ink.max() <= ink_max, f"stroke lost: ink up to {ink.max()}"
    assert paper.min() >= paper_min, f"paper not light: down to {paper.min()}"


@pytest.mark.parametrize(
    "name, data",
    [
        ("L png", lambda: encoded(Image.fromarray(page(250, 5)), "PNG")),
        ("1 png", lambda: encoded(Image.fromarray(page(255, 0)).convert("1"), "PNG")),
        ("I;16 png", lambda: encoded(Image.fromarray(page(60000, 1000, np.uint16)), "PNG")),
        ("I;16 tiff", lambda: encoded(Image.fromarray(page(60000, 1000, np.uint16)), "TIFF")),
        ("I;16B tiff", lambda: encoded(big_endian_16(page(60000, 1000, np.uint16)), "TIFF")),
        ("I 16-bit values tiff", lambda: encoded(Image.fromarray(page(60000, 1000, np.int32)), "TIFF")),
        ("I 8-bit values tiff", lambda: encoded(Image.fromarray(page(250, 5, np.int32)), "TIFF")),
        ("I wide range tiff", lambda: encoded(Image.fromarray(page(900_000, -5_000, np.int32)), "TIFF")),
        ("F 0..1 tiff", lambda: encoded(Image.fromarray(page(0.95, 0.05, np.float32)), "TIFF")),
        ("F 0..255 tiff", lambda: encoded(Image.fromarray(page(240.0, 10.0, np.float32)), "TIFF")),
        ("F other range tiff", lambda: encoded(Image.fromarray(page(3.5, -2.0, np.float32)), "TIFF")),
        ("16-bit grey png", lambda: png16(page(64000, 500, np.uint16))),
        ("16-bit RGB png", lambda: png16(np.stack([page(64000, 500, np.uint16)] * 3, axis=-1))),
        ("16-bit RGB tiff", lambda: tiff16_rgb(np.stack([page(64000, 500, np.uint16)] * 3, axis=-1))),
        ("CMYK jpeg", lambda: encoded(cmyk_page(), "JPEG", quality=95)),
        ("CMYK tiff", lambda: encoded(cmyk_page(), "TIFF")),
        ("LAB tiff", lambda: encoded(Image.fromarray(page(250, 5)).convert("RGB").convert("LAB"), "TIFF")),
        (
            "YCbCr tiff",
            lambda: encoded(Image.fromarray(page(250, 5)).convert("RGB").convert("YCbCr"), "TIFF"),
        ),
        ("P png", lambda: encoded(Image.fromarray(page(250, 5)).convert("RGB").convert("P"), "PNG")),
    ],
)
def test_every_mode_keeps_a_dark_stroke_on_a_light_page(name, data):
    assert_stroke_on_paper(load_rgb(data(), source=name))


def big_endian_16(values: np.ndarray) -> Image.Image:
    # built from bytes: Pillow's convert("I;16B") clips every value to 255
    return Image.frombytes("I;16B", (W, H), values.astype(">u2").tobytes())


def cmyk_page() -> Image.Image:
    cmyk = np.zeros((H, W, 4), dtype=np.uint8)  # no ink: white paper
    cmyk[STROKE] = (0, 0, 0, 255)  # full black ink
    return Image.fromarray(cmyk, mode="CMYK")


def test_16_bit_colour_keeps_each_channel():
    values = np.full((H, W, 3), 65535, dtype=np.uint16)
    values[0, 0] = (1000, 30000, 65535)
    for data in (png16(values), tiff16_rgb(values)):
        assert load_rgb(data).getpixel((0, 0)) == (3, 117, 255)  # the high byte of each sample


def test_16_bit_grey_scales_linearly_not_clipped():
    values = np.full((H, W), 32768, dtype=np.uint16)
    values[0, 0], values[0, 1] = 0, 65535
    rgb = np.asarray(load_rgb(encoded(Image.fromarray(values), "PNG")))
    assert rgb[1, 1].tolist() == [128, 128, 128]  # 32768 * 255 / 65535 = 127.5 -> 128
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparent_pixels_become_white_paper(mode):
    rgba = np.zeros((H, W, 4), dtype=np.uint8)  # transparent black everywhere ...
    rgba[STROKE] = (0, 0, 0, 255)  # ... except an opaque black stroke
    image = Image.fromarray(rgba, mode="RGBA").convert(mode)
    # Pillow cannot write PA files: that one goes through `to_rgb`, the in-memory half of `load_rgb`
    assert_stroke_on_paper(to_rgb(image) if mode == "PA" else load_rgb(encoded(image, "PNG")))


def test_half_transparent_ink_is_composed_on_white():
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[...] = (0, 0, 0, 128)
    rgb = to_rgb(Image.fromarray(rgba, mode="RGBA"))
    assert np.asarray(rgb)[0, 0].tolist() == [127, 127, 127]


def test_palette_transparency_index_is_white_not_its_colour():
    values = page(1, 0)  # index 1 = paper, 0 = ink
    image = Image.fromarray(values, mode="P")
    image.putpalette([0, 0, 0] + [0, 0, 0] + [0, 0, 0] * 254)  # both indices black ...
    data = encoded(image, "PNG", transparency=1)  # ... and the paper's index transparent
    assert_stroke_on_paper(load_rgb(data))


def test_exif_orientation_is_applied():
    values = np.full((20, 40), 250, dtype=np.uint8)
    values[:, :8] = 5  # a dark band on the left edge as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise: the left edge goes on top
    loaded = np.asarray(load_rgb(encoded(Image.fromarray(values), "JPEG", quality=95, exif=exif.tobytes())))
    assert loaded.shape == (40, 20, 3)
    assert loaded[:6].max() < 60 and loaded[12:].min() > 195


def test_load_rgb_from_path(tmp_path):
    path = tmp_path / "page.png"
    Image.new("RGB", (30, 20), (200, 10, 60)).save(path)
    assert load_rgb(path).size == (30, 20)
    assert load_rgb(str(path)).getpixel((0, 0)) == (200, 10, 60)


def test_load_rgb_rejects_bad_inputs(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(noise), "PNG")
    with pytest.raises(ValueError, match="truncated"):
        load_rgb(data[: len(data) // 2], source="shard-0/key-7")
    with pytest.raises(ValueError, match="key-8"):
        load_rgb(b"not an image at all", source="shard-0/key-8")
    with pytest.raises(ValueError, match="max_pixels"):
        load_rgb(encoded(Image.new("RGB", (100, 100)), "PNG"), max_pixels=5_000)
    with pytest.raises(ValueError, match="aspect"):
        load_rgb(encoded(Image.new("RGB", (1, 10000)), "PNG"))
    with pytest.raises(ValueError, match="missing.png"):
        load_rgb(tmp_path / "missing.png")
