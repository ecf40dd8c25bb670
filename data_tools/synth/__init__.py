"""Synthetic multi-script OCR data: lines, pages, charts (see data_tools/README.md)."""

from data_tools.synth.fonts import FontFile, MissingFontError, find_fonts, fonts_available
from data_tools.synth.render import LineSampler, render_line

__all__ = ["FontFile", "LineSampler", "MissingFontError", "find_fonts", "fonts_available", "render_line"]
