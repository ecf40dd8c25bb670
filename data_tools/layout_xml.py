"""Read PAGE-XML (2013, 2019) and ALTO (v2-v4) ground truth into one page/line structure.

Both formats describe a scanned page: the image file it annotates, its size, and text lines
with a polygon (or a box) and their transcription. `read_layout` detects the format from the
root element's namespace and returns a `LayoutPage` whose lines are in reading order:

- PAGE (https://github.com/PRImA-Research-Lab/PAGE-XML): `Page@imageFilename`, `TextRegion`
  (nested regions too) -> `TextLine` -> `Coords@points` ("x,y x,y ..."), text from the line's
  own `TextEquiv/Unicode` (the one with the lowest `index`), else its `Word`s joined by spaces.
  Regions follow `ReadingOrder` (`*Indexed@index`, nested groups flattened); regions it does
  not name come after, in document order.
- ALTO (https://www.loc.gov/standards/alto/): `sourceImageInformation/fileName`, `Page@WIDTH/
  HEIGHT`, `TextLine` with `Shape/Polygon@POINTS` or `HPOS/VPOS/WIDTH/HEIGHT`, text from its
  `String@CONTENT`, `SP` (a space) and `HYP` (the hyphen). Lines in document order. Coordinates
  in `mm10` / `inch1200` units are scaled to the image by the caller (`LayoutPage.scale`).

A file that is not XML or has an unknown root namespace raises `LayoutError` with a reason the
converter counts (`broken_xml`, `unknown_namespace`); nothing here opens images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

PAGE_NAMESPACES = {
    "http://schema.primaresearch.org/PAGE/gts/pagecontent/2013-07-15": "page-2013",
    "http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15": "page-2019",
}
ALTO_NAMESPACES = {
    "http://www.loc.gov/standards/alto/ns-v2#": "alto-v2",
    "http://www.loc.gov/standards/alto/ns-v3#": "alto-v3",
    "http://www.loc.gov/standards/alto/ns-v4#": "alto-v4",
}
# PAGE names languages in English (`primaryLanguage="French"`); samples carry ISO 639-1 codes
PAGE_LANGUAGES = {
    "English": "en", "French": "fr", "German": "de", "Italian": "it", "Spanish": "es",
    "Portuguese": "pt", "Dutch": "nl", "Latin": "la", "Russian": "ru", "Arabic": "ar",
    "Persian": "fa", "Chinese": "zh", "Greek": "el", "Polish": "pl", "Czech": "cs",
}  # fmt: skip


class LayoutError(ValueError):
    """A layout file the converter skips; `reason` is its skip-count key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class LayoutLine:
    """One text line: its id, transcription and outline (polygon points in page pixels)."""

    id: str
    text: str
    points: list[tuple[float, float]]
    lang: str | None = None


@dataclass
class LayoutPage:
    """One page of ground truth. `image` is the file name as the XML writes it."""

    path: Path
    format: str  # a PAGE_NAMESPACES / ALTO_NAMESPACES value
    image: str
    width: int | None  # the page size the coordinates refer to (None: not given)
    height: int | None
    lines: list[LayoutLine] = field(default_factory=list)  # reading order
    lang: str | None = None
    unit: str = "pixel"  # ALTO MeasurementUnit

    def scaled_lines(self, image_size: tuple[int, int]) -> list[LayoutLine]:
        """Lines with coordinates in pixels of an image of `image_size` (ALTO mm10/inch1200 pages
        are scaled by image size / page size; pixel coordinates are kept as they are)."""
        if self.unit == "pixel" or not self.width or not self.height:
            return self.lines
        sx, sy = image_size[0] / self.width, image_size[1] / self.height
        return [
            LayoutLine(ln.id, ln.text, [(x * sx, y * sy) for x, y in ln.points], ln.lang) for ln in self.lines
        ]


def _local(tag) -> str:
    return etree.QName(tag).localname if isinstance(tag, str) else ""


def _parse_points(spec: str | None) -> list[tuple[float, float]]:
    """PAGE "x,y x,y" and ALTO "x y x y" / "x,y x,y" point lists; [] when unreadable."""
    if not spec:
        return []
    numbers = re.split(r"[\s,]+", spec.strip())
    try:
        values = [float(v) for v in numbers if v]
    except ValueError:
        return []
    if len(values) < 4 or len(values) % 2:
        return []
    return list(zip(values[0::2], values[1::2], strict=True))


def _int_attr(elem, name: str) -> int | None:
    try:
        return round(float(elem.get(name)))
    except (TypeError, ValueError):
        return None


def read_layout(path: Path) -> LayoutPage:
    """Parse one PAGE or ALTO file; LayoutError(broken_xml | unknown_namespace | no_page)."""
    try:
        root = etree.parse(str(path), etree.XMLParser(resolve_entities=False, no_network=True)).getroot()
    except (etree.XMLSyntaxError, OSError) as e:
        raise LayoutError("broken_xml", f"{path}: {e}") from None
    ns = etree.QName(root).namespace or ""
    if ns in PAGE_NAMESPACES and _local(root.tag) == "PcGts":
        return _read_page(path, root, ns)
    if ns in ALTO_NAMESPACES and _local(root.tag) == "alto":
        return _read_alto(path, root, ns)
    known = ", ".join([*PAGE_NAMESPACES, *ALTO_NAMESPACES])
    raise LayoutError(
        "unknown_namespace", f"{path}: root <{_local(root.tag)}> in namespace {ns!r}; known: {known}"
    )


# ------------------------------------------------------------------------------------ PAGE
def _page_text(line, ns: str) -> str:
    """The line's own TextEquiv (lowest index first), else its words' joined by spaces."""

    def equiv_text(elem) -> str | None:
        equivs = elem.findall(f"{{{ns}}}TextEquiv")
        if not equivs:
            return None
        equivs.sort(key=lambda e: _int_attr(e, "index") if _int_attr(e, "index") is not None else 1 << 30)
        unicode = equivs[0].find(f"{{{ns}}}Unicode")
        return unicode.text or "" if unicode is not None else None

    own = equiv_text(line)
    if own is not None:
        return own
    words = [equiv_text(w) for w in line.findall(f"{{{ns}}}Word")]
    return " ".join(w for w in words if w)


def _reading_order(page, ns: str) -> list[str]:
    """Region ids in the order of the page's ReadingOrder (nested groups flattened)."""
    order = page.find(f"{{{ns}}}ReadingOrder")
    if order is None:
        return []

    def walk(group) -> list[str]:
        children = [c for c in group if _local(c.tag) != "Labels" and isinstance(c.tag, str)]
        if all(c.get("index") is not None for c in children):
            children.sort(key=lambda c: _int_attr(c, "index") or 0)
        ids = []
        for child in children:
            if child.get("regionRef"):
                ids.append(child.get("regionRef"))
            ids.extend(walk(child))
        return ids

    return walk(order)


def _read_page(path: Path, root, ns: str) -> LayoutPage:
    page = root.find(f"{{{ns}}}Page")
    if page is None:
        raise LayoutError("broken_xml", f"{path}: PcGts has no Page element")
    lang = page.get("primaryLanguage")
    out = LayoutPage(path, PAGE_NAMESPACES[ns], page.get("imageFilename") or "",
                     _int_attr(page, "imageWidth"), _int_attr(page, "imageHeight"),
                     lang=PAGE_LANGUAGES.get(lang, lang))  # fmt: skip
    regions = list(page.iter(f"{{{ns}}}TextRegion"))
    rank = {rid: i for i, rid in enumerate(_reading_order(page, ns))}
    regions.sort(key=lambda r: rank.get(r.get("id"), len(rank)))  # stable: unranked keep document order
    for region in regions:
        region_lang = region.get("primaryLanguage")
        for line in region.findall(f"{{{ns}}}TextLine"):  # direct children: nested regions come on their own
            coords = line.find(f"{{{ns}}}Coords")
            points = _parse_points(coords.get("points")) if coords is not None else []
            lang = PAGE_LANGUAGES.get(region_lang, region_lang) if region_lang else None
            out.lines.append(LayoutLine(line.get("id") or "", _page_text(line, ns), points, lang))
    return out


# ------------------------------------------------------------------------------------ ALTO
def _alto_text(line, ns: str) -> str:
    """Strings joined by the line's SP elements; files without SP (one String per word or per
    line, as eScriptorium writes) get a space between Strings. HYP adds its hyphen."""
    children = [c for c in line if isinstance(c.tag, str)]
    spaced = any(_local(c.tag) == "SP" for c in children)
    parts: list[str] = []
    for child in children:
        name = _local(child.tag)
        if name == "String":
            if parts and not spaced:
                parts.append(" ")
            parts.append(child.get("CONTENT") or "")
        elif name == "SP":
            parts.append(" ")
        elif name == "HYP":
            parts.append(child.get("CONTENT") or "-")
    return "".join(parts)


def _alto_points(line, ns: str) -> list[tuple[float, float]]:
    polygon = line.find(f"{{{ns}}}Shape/{{{ns}}}Polygon")
    points = _parse_points(polygon.get("POINTS")) if polygon is not None else []
    if points:
        return points
    x, y, w, h = (_int_attr(line, k) for k in ("HPOS", "VPOS", "WIDTH", "HEIGHT"))
    if None in (x, y, w, h):
        return []
    return [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]


def _read_alto(path: Path, root, ns: str) -> LayoutPage:
    q = lambda name: f"{{{ns}}}{name}"  # noqa: E731
    file_name = root.find(f"{q('Description')}/{q('sourceImageInformation')}/{q('fileName')}")
    unit = root.find(f"{q('Description')}/{q('MeasurementUnit')}")
    page = root.find(f"{q('Layout')}/{q('Page')}")
    if page is None:
        raise LayoutError("broken_xml", f"{path}: alto has no Layout/Page element")
    image = (file_name.text or "").strip() if file_name is not None else ""
    out = LayoutPage(path, ALTO_NAMESPACES[ns], image, _int_attr(page, "WIDTH"), _int_attr(page, "HEIGHT"),
                     unit=(unit.text or "pixel").strip() if unit is not None else "pixel")  # fmt: skip
    for block in page.iter(q("TextBlock")):
        for line in block.findall(q("TextLine")):
            lang = line.get("LANG") or block.get("LANG")
            out.lines.append(
                LayoutLine(line.get("ID") or "", _alto_text(line, ns), _alto_points(line, ns), lang)
            )
    return out
