"""Font discovery for the synthetic OCR generator, per script.

Fonts come only from packages the project installs itself: the DejaVu fonts that
ship inside matplotlib (pip; Latin, Cyrillic, Arabic/Persian) and the Debian packages that
launch/install_system_deps.sh installs (Noto core + CJK, Amiri, Liberation). We look for known
file names in those packages' directories, never for whatever else the machine has, and check
each candidate's character map (fontTools) covers the script's test characters.
Extra directories can be added with the DSOCR_FONT_DIRS environment variable (os.pathsep list).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from fontTools.ttLib import TTCollection, TTFont
from PIL import ImageFont, features

SCRIPTS = ("latin", "cyrillic", "arabic", "persian", "chinese")
RTL_SCRIPTS = ("arabic", "persian")

# Characters a font must have to be used for a script.
COVERAGE = {
    "latin": "AaBbZz0123456789.,;:!?()-äéßñ",
    "cyrillic": "АаБбЖжЩщЫыЁёЯя",
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي٠١٢٣",
    "persian": "ابپتچژکگلمنوهی۰۱۲۳۴۵۶۷۸۹",
    "chinese": "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动",
}

_MPL_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
_NOTO = Path("/usr/share/fonts/truetype/noto")
_NOTO_CJK = Path("/usr/share/fonts/opentype/noto")
_AMIRI = Path("/usr/share/fonts/opentype/fonts-hosny-amiri")
_LIBERATION = Path("/usr/share/fonts/truetype/liberation2")

# (directory, file name, face index in a collection, bold, debian package or "matplotlib")
_CANDIDATES: dict[str, list[tuple[Path, str, int, bool, str]]] = {
    "latin": [
        (_MPL_DIR, "DejaVuSans.ttf", 0, False, "matplotlib"),
        (_MPL_DIR, "DejaVuSerif.ttf", 0, False, "matplotlib"),
        (_MPL_DIR, "DejaVuSansMono.ttf", 0, False, "matplotlib"),
        (_MPL_DIR, "DejaVuSans-Bold.ttf", 0, True, "matplotlib"),
        (_MPL_DIR, "DejaVuSerif-Bold.ttf", 0, True, "matplotlib"),
        (_NOTO, "NotoSans-Regular.ttf", 0, False, "fonts-noto-core"),
        (_NOTO, "NotoSerif-Regular.ttf", 0, False, "fonts-noto-core"),
        (_NOTO, "NotoSans-Bold.ttf", 0, True, "fonts-noto-core"),
        (_LIBERATION, "LiberationSans-Regular.ttf", 0, False, "fonts-liberation2"),
        (_LIBERATION, "LiberationSerif-Regular.ttf", 0, False, "fonts-liberation2"),
        (_LIBERATION, "LiberationMono-Regular.ttf", 0, False, "fonts-liberation2"),
        (_LIBERATION, "LiberationSans-Bold.ttf", 0, True, "fonts-liberation2"),
    ],
    "arabic": [
        (_MPL_DIR, "DejaVuSans.ttf", 0, False, "matplotlib"),
        (_MPL_DIR, "DejaVuSans-Bold.ttf", 0, True, "matplotlib"),
        (_NOTO, "NotoNaskhArabic-Regular.ttf", 0, False, "fonts-noto-core"),
        (_NOTO, "NotoSansArabic-Regular.ttf", 0, False, "fonts-noto-core"),
        (_NOTO, "NotoKufiArabic-Regular.ttf", 0, False, "fonts-noto-core"),
        (_NOTO, "NotoNaskhArabic-Bold.ttf", 0, True, "fonts-noto-core"),
        (_NOTO, "NotoSansArabic-Bold.ttf", 0, True, "fonts-noto-core"),
        (_AMIRI, "Amiri-Regular.ttf", 0, False, "fonts-hosny-amiri"),
        (_AMIRI, "Amiri-Bold.ttf", 0, True, "fonts-hosny-amiri"),
    ],
    "chinese": [
        (_NOTO_CJK, "NotoSansCJK-Regular.ttc", 2, False, "fonts-noto-cjk"),  # face 2 = SC
        (_NOTO_CJK, "NotoSerifCJK-Regular.ttc", 2, False, "fonts-noto-cjk"),
        (_NOTO_CJK, "NotoSansCJK-Bold.ttc", 2, True, "fonts-noto-cjk"),
        (_NOTO_CJK, "NotoSerifCJK-Bold.ttc", 2, True, "fonts-noto-cjk"),
    ],
}
_CANDIDATES["cyrillic"] = _CANDIDATES["latin"]
_CANDIDATES["persian"] = _CANDIDATES["arabic"]


class MissingFontError(RuntimeError):
    """No usable font for a script; the message names what to install."""


@dataclass(frozen=True)
class FontFile:
    path: str
    index: int = 0
    bold: bool = False

    @property
    def name(self) -> str:
        return Path(self.path).stem + (f"#{self.index}" if self.index else "")


def script_of_lang(lang: str) -> str:
    table = {"en": "latin", "de": "latin", "fr": "latin", "es": "latin", "ru": "cyrillic",
             "uk": "cyrillic", "ar": "arabic", "fa": "persian", "zh": "chinese"}  # fmt: skip
    if lang not in table:
        raise ValueError(f"unknown language {lang!r}; known: {sorted(table)}")
    return table[lang]


def _extra_dirs() -> list[Path]:
    return [Path(d) for d in os.environ.get("DSOCR_FONT_DIRS", "").split(os.pathsep) if d]


@functools.cache
def font_cmap(path: str, index: int) -> frozenset[int]:
    if path.lower().endswith((".ttc", ".otc")):
        font = TTCollection(path, lazy=True).fonts[index]
    else:
        font = TTFont(path, lazy=True, fontNumber=index)
    return frozenset(font.getBestCmap() or {})


def covers(font: FontFile, script: str) -> bool:
    cmap = font_cmap(font.path, font.index)
    return all(ord(ch) in cmap for ch in COVERAGE[script])


@functools.cache
def find_fonts(script: str) -> tuple[FontFile, ...]:
    """All installed candidate fonts for `script` that cover its characters (stable order)."""
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; known: {SCRIPTS}")
    found: list[FontFile] = []
    for directory, name, index, bold, _pkg in _CANDIDATES[script]:
        for d in [directory, *_extra_dirs()]:
            p = d / name
            if p.is_file():
                font = FontFile(str(p), index, bold)
                if covers(font, script):
                    found.append(font)
                break
    if not found:
        pkgs = sorted({pkg for *_, pkg in _CANDIDATES[script] if pkg != "matplotlib"})
        raise MissingFontError(
            f"no font for script '{script}': install the Debian package(s) {', '.join(pkgs)} "
            "(run `sudo bash launch/install_system_deps.sh`) or add a directory holding "
            f"{[c[1] for c in _CANDIDATES[script]][:3]} to DSOCR_FONT_DIRS"
        )
    return tuple(found)


def fonts_available(script: str) -> tuple[bool, str]:
    """(True, "") when `script` has a font, else (False, install hint) — for pytest skips."""
    try:
        find_fonts(script)
    except MissingFontError as e:
        return False, str(e)
    return True, ""


def raqm_available() -> bool:
    return bool(features.check("raqm"))


def layout_engine(script: str) -> ImageFont.Layout:
    """RAQM (HarfBuzz + FriBiDi) for RTL scripts, BASIC (faster) elsewhere."""
    if script in RTL_SCRIPTS:
        if not raqm_available():
            raise MissingFontError(
                f"script '{script}' needs Pillow's raqm layout engine for shaping: install libraqm0 "
                "libfribidi0 libharfbuzz0b (launch/install_system_deps.sh)"
            )
        return ImageFont.Layout.RAQM
    return ImageFont.Layout.BASIC


@functools.lru_cache(maxsize=4096)
def load_font(path: str, size: int, index: int = 0, script: str = "latin") -> ImageFont.FreeTypeFont:
    """A cached FreeTypeFont; loading is the slow part of rendering a short line."""
    return ImageFont.truetype(path, size=size, index=index, layout_engine=layout_engine(script))
