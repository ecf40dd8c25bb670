"""The one image decoder of the project: any file Pillow opens -> an 8-bit RGB page with its content.

Converters, the training loader, inference and the evaluation readers all call `load_rgb`
(bytes or a path) or `to_rgb` (an image already open), so a page looks the same wherever it is read.

Pillow's own `convert("RGB")` loses content for several modes a scanner or a pipeline writes;
`to_rgb` handles each explicitly:

- EXIF orientation is applied first (a phone photo taken sideways is stored sideways);
- 16-bit greyscale (`I;16`, `I;16B`, `I;16L`, `I;16N`) is scaled from 0..65535 to 0..255 (Pillow
  clips every value above 255 to white, so a 16-bit scan becomes a blank page);
- 32-bit integer `I` (how some decoders hand over 16-bit data): values in 0..255 are kept (8-bit
  data in a wide type), values in 0..65535 are scaled as 16-bit, any other range is stretched
  from its own minimum..maximum;
- float `F`: 0..1 is scaled by 255, 0..255 is kept, any other range is stretched from min..max;
- palette, `1`, `L`, `CMYK`, `YCbCr`, `LAB`, `HSV` go through Pillow's conversion (CMYK without a
  colour profile: the naive formula, which keeps dark ink dark);
- transparency (an alpha band, a palette or `tRNS` transparency) is composed on white, the colour
  of paper: Pillow would drop alpha and show whatever colour the transparent pixels carry, often
  black.

16-bit colour PNG and TIFF reach Pillow's decoder as 8-bit `RGB`/`RGBA` already (it keeps the
high byte); they then follow the same path. Multi-frame files (TIFF pages, GIF) give the first frame.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # decompression-bomb limit of `load_rgb`
DEFAULT_MAX_ASPECT = 100.0  # longest side / shortest side accepted by `load_rgb`
PAPER_WHITE = (255, 255, 255)  # background under transparent pixels

_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")


def _to_uint8(values: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Scale `values` to 0..255: by 255 / full_scale, or from their own min..max when None."""
    values = values.astype(np.float64)
    if full_scale is None:
        low, high = float(values.min()), float(values.max())
        if high <= low:  # a uniform image: keep its level when it fits, else mid-grey
            level = low if 0 <= low <= 255 else 127
            return np.full(values.shape, round(level), dtype=np.uint8)
        values = (values - low) * (255.0 / (high - low))
    else:
        values = values * (255.0 / full_scale)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _grey_to_l(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image -> 8-bit `L` (see the module docstring)."""
    values = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_GREY:
        return Image.fromarray(_to_uint8(values, 65535.0), mode="L")
    low, high = float(values.min()), float(values.max())
    if image.mode == "I":
        scale = None if low < 0 or high > 65535 else (255.0 if high <= 255 else 65535.0)
    elif low >= 0 and high <= 1:
        scale = 1.0
    elif low >= 0 and high <= 255:
        scale = 255.0
    else:
        scale = None
    return Image.fromarray(_to_uint8(values, scale), mode="L")


def _on_white(image: Image.Image) -> Image.Image:
    """An image with transparency -> RGB composed on white."""
    rgba = image.convert("RGBA")
    page = Image.new("RGB", rgba.size, PAPER_WHITE)
    page.paste(rgba, mask=rgba.getchannel("A"))
    return page


def has_transparency(image: Image.Image) -> bool:
    """True if `image` carries an alpha band or palette/tRNS transparency."""
    return "A" in image.getbands() or "a" in image.mode or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """An open Pillow image -> 8-bit RGB with its content (EXIF orientation applied)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in (*_SIXTEEN_BIT_GREY, "I", "F"):
        image = _grey_to_l(image)
    if has_transparency(image):
        return _on_white(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(
    data: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    source: str | None = None,
) -> Image.Image:
    """Decode an image file (path or encoded bytes) fully into 8-bit RGB with `to_rgb`.

    Raises ValueError naming `source` for unreadable or truncated files, zero-pixel images,
    images above `max_pixels` (checked from the header, before decoding) and aspect ratios
    above `max_aspect`.
    """
    if source is None:
        source = str(data) if isinstance(data, (str, Path)) else f"<{len(data)} bytes>"
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ValueError(f"{source}: image has zero pixels (size {width}x{height})")
            if width * height > max_pixels:
                raise ValueError(
                    f"{source}: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
                    "(decompression-bomb limit; raise max_pixels if the image is genuine)"
                )
            if max(width, height) / min(width, height) > max_aspect:
                raise ValueError(f"{source}: aspect ratio {width}x{height} exceeds max_aspect={max_aspect}")
            if ImageFile.LOAD_TRUNCATED_IMAGES:
                warnings.warn(
                    "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated files are not detected",
                    stacklevel=2,
                )
            image.load()  # full decode: catches truncated files that open() accepts
            return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{source}: rejected as a decompression bomb by PIL ({err})") from err
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as err:
        raise ValueError(f"{source}: unreadable or truncated image ({type(err).__name__}: {err})") from err
