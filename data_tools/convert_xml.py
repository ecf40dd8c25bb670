"""PAGE-XML / ALTO ground truth (files, folders, OCR-D workspaces) to webdataset shards.

Line samples by default: exactly one per text line with non-empty text, the page image cropped
to the bounds of the line's polygon (or box) plus `margin` pixels, optionally with everything
outside the polygon painted white (`mask`). Page samples on request: the page image as stored,
its lines' text in reading order joined by newlines. Every sample records `source`, `lang`
(the line's, the page's, or the configured default), `origin` (`<xml>#<line id>`) and `page`
(the XML path relative to the dataset root, the unit of a split).

Image references resolve against the XML's folder and then each folder above it up to the
dataset root (an OCR-D workspace names `OCR-D-IMG/x.tif` relative to its root), and never to a
file outside that root. A split file assigns pages or whole documents (folders) to named splits,
each written as its own shard set, so no page can land in two of them.

Bad input is counted by reason, logged and skipped: `broken_xml`, `unknown_namespace`,
`other_format`, `missing_image`, `image_outside_root`, `corrupt_image` (per page), `empty_text`,
`missing_polygon`, `polygon_outside_image`, `label_too_long` (per line), `no_text_lines`
(page samples of pages without text).
"""

from __future__ import annotations

import io
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from data_tools.images import load_rgb
from data_tools.layout_xml import LayoutError, LayoutLine, LayoutPage, read_layout
from data_tools.paths import OutsideRootError, resolve_inside
from data_tools.shards import Sample, ShardWriter, ShardWriterConfig
from data_tools.validate import Reject, ValidationConfig, check_image_file, check_label

logger = logging.getLogger(__name__)

UNITS = ("line", "page")
CROP_FORMATS = ("auto", "png", "jpeg")
# not layout files although they are XML: OCR-D's METS, eScriptorium/Transkribus metadata
NON_LAYOUT_NAMES = ("mets.xml", "metadata.xml", "doc.xml")


@dataclass
class XmlConvertConfig:
    """How layout files become samples.

    unit: "line" (one crop per text line) or "page" (the page image with all its text).
    margin: pixels added on each side of a line's bounds before cropping.
    mask: paint the crop white outside the line polygon (neighbouring lines' ascenders, stamps).
    crop_format: "auto" stores crops of JPEG pages as JPEG (quality 95) and others as PNG.
    """

    source: str
    lang: str = "und"
    unit: str = "line"
    margin: int = 4
    mask: bool = False
    prompt: str | None = None
    mode: str | None = None
    crop_format: str = "auto"
    format: str | None = None  # "page" or "alto": files of the other format are skipped (other_format)
    validation: ValidationConfig | None = None

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source must be a non-empty dataset name")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0 pixels, got {self.margin}")
        if self.format not in (None, "page", "alto"):
            raise ValueError(f"format must be 'page', 'alto' or None, got {self.format!r}")
        if self.crop_format not in CROP_FORMATS:
            raise ValueError(f"crop_format must be one of {CROP_FORMATS}, got {self.crop_format!r}")
        if self.prompt is not None:
            if self.prompt.count("<image>") > 1:
                raise ValueError(
                    f"prompt {self.prompt!r} has more than one <image> tag; one image per sample"
                )
            if "<image>" not in self.prompt:
                self.prompt = f"<image>\n{self.prompt}"
        self.validation = self.validation or ValidationConfig()

    @property
    def key_prefix(self) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "_", self.source)


# ------------------------------------------------------------------------------ inputs
def find_layout_files(input_path: Path, root: Path | None = None) -> tuple[Path, list[Path]]:
    """(dataset root, sorted layout XML files) for a file, a folder or an OCR-D workspace.

    The root defaults to the input folder (a file's own folder); images are never read outside it.
    """
    input_path = Path(input_path)
    if not input_path.exists():
        raise ValueError(f"input {input_path} does not exist")
    if input_path.is_file():
        files = [input_path]
        default_root = input_path.parent
    else:
        files = sorted(p for p in input_path.rglob("*") if p.suffix.lower() == ".xml" and p.is_file()
                       and p.name.lower() not in NON_LAYOUT_NAMES)  # fmt: skip
        default_root = input_path
    root = Path(root or default_root).resolve()
    for f in files:
        if not f.resolve().is_relative_to(root):
            raise ValueError(f"{f} is outside the dataset root {root}; pass --root to a folder above it")
    if not files:
        raise ValueError(f"no .xml files under {input_path}")
    return root, files


def resolve_in_root(root: Path, start: Path, name: str) -> Path | None:
    """The existing file `name` seen from folder `start` or a folder above it up to `root`, or
    None; each candidate passes the dataset-root rule of every converter (`paths.resolve_inside`:
    absolute names, `..` and links that leave `root` are refused)."""
    root = root.resolve()
    folder = start.resolve()
    while folder == root or root in folder.parents:
        try:
            candidate = resolve_inside(root, folder / name)
        except OutsideRootError:
            return None
        if candidate.is_file():
            return candidate
        if folder == root:
            return None
        folder = folder.parent
    return None


def open_image(path: Path) -> Image.Image:
    """A page image decoded fully as 8-bit RGB with its content (the converters' one loader)."""
    return load_rgb(path)


# ------------------------------------------------------------------------------ splits
@dataclass
class SplitPlan:
    """Which split each page goes to: entries `SPLIT PATH` (PATH relative to the dataset root:
    an XML file = a page, a folder = a document), the rest to `default`."""

    entries: list[tuple[str, str]]
    default: str = "train"

    @classmethod
    def read(cls, path: Path, default: str = "train") -> SplitPlan:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"split file {path} does not exist")
        entries = []
        for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            split, _, rel = line.partition(" ")
            if not rel.strip() or not re.fullmatch(r"[A-Za-z0-9_-]+", split):
                raise ValueError(
                    f"{path}:{n}: expected `SPLIT PATH` (e.g. `heldout docs/a.xml`), got {raw!r}"
                )
            entries.append((split, rel.strip().strip("/")))
        return cls(entries, default)

    def assign(self, root: Path, files: list[Path]) -> dict[Path, str]:
        """{file: split}. ValueError for an entry matching no file, or a page two entries give
        to different splits (a document held out while one of its pages is listed for train)."""
        rels = {f: f.resolve().relative_to(root).as_posix() for f in files}
        out: dict[Path, str] = {}
        for split, entry in self.entries:
            matched = [f for f, rel in rels.items() if rel == entry or rel.startswith(entry + "/")]
            if not matched:
                raise ValueError(f"split entry {split} {entry!r} matches no XML file under {root}")
            for f in matched:
                if out.get(f, split) != split:
                    raise ValueError(f"{rels[f]} is assigned to both {out[f]} and {split}")
                out[f] = split
        return {f: out.get(f, self.default) for f in files}


# ------------------------------------------------------------------------------ samples
def line_bounds(points, margin: int, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Integer crop box of `points` grown by `margin`, clipped to the image; None if it lies outside."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x1, y1 = max(0, int(min(xs)) - margin), max(0, int(min(ys)) - margin)
    x2, y2 = min(size[0], int(max(xs) + 0.999) + margin), min(size[1], int(max(ys) + 0.999) + margin)
    if x2 - x1 < 2 or y2 - y1 < 2 or max(xs) < 0 or max(ys) < 0 or min(xs) > size[0] or min(ys) > size[1]:
        return None
    return x1, y1, x2, y2


def crop_line(page: Image.Image, line: LayoutLine, box, mask: bool) -> Image.Image:
    crop = page.crop(box)
    if mask:
        inside = Image.new("L", crop.size, 0)
        ImageDraw.Draw(inside).polygon([(x - box[0], y - box[1]) for x, y in line.points], fill=255)
        white = Image.new(crop.mode, crop.size, 255 if crop.mode == "L" else (255, 255, 255))
        crop = Image.composite(crop, white, inside)
    return crop


def encode(img: Image.Image, fmt: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "jpg"
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue(), "png"


@dataclass
class _Writers:
    """One ShardWriter per split (created on first use), all with the same settings."""

    base: ShardWriterConfig
    split_dirs: bool
    extra: dict

    def __post_init__(self) -> None:
        self.writers: dict[str, ShardWriter] = {}

    def get(self, split: str) -> ShardWriter:
        if split not in self.writers:
            out = Path(self.base.out_dir) / split if self.split_dirs else Path(self.base.out_dir)
            cfg = ShardWriterConfig(str(out), self.base.prefix, self.base.max_count, self.base.max_bytes,
                                    self.base.overwrite)  # fmt: skip
            self.writers[split] = ShardWriter(cfg, extra_manifest={**self.extra, "split": split})
        return self.writers[split]


class _PageSkip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _load_page(path: Path, root: Path, fmt: str | None) -> tuple[LayoutPage, Path]:
    try:
        layout = read_layout(path)
    except LayoutError as e:
        raise _PageSkip(e.reason, str(e)) from None
    if fmt is not None and not layout.format.startswith(fmt):
        raise _PageSkip("other_format", f"{path}: a {layout.format} file, not {fmt}")
    if not layout.image:
        raise _PageSkip("missing_image", f"{path}: the XML names no image file")
    if re.match(r"^[a-z][a-z0-9+.-]*://", layout.image) and not layout.image.startswith("file://"):
        raise _PageSkip("missing_image", f"{path}: remote image {layout.image!r}; download it first")
    name = layout.image.removeprefix("file://")
    # exports that moved the images next to the XML keep the folders in the name: try the base name too
    image_path = resolve_in_root(root, path.parent, name) or resolve_in_root(
        root, path.parent, Path(name).name
    )
    if image_path is None:
        outside = (path.parent / name).resolve()
        escaped = outside.exists() and not outside.is_relative_to(root)
        where = f"in {path.parent} or above it up to {root}"
        raise _PageSkip("image_outside_root" if escaped else "missing_image",
                        f"{path}: image {layout.image!r} not found {where}; {len(layout.lines)} lines lost")  # fmt: skip
    return layout, image_path


def convert_layout_files(files: list[Path], root: Path, writer_cfg: ShardWriterConfig, cfg: XmlConvertConfig,
                         plan: SplitPlan | None = None) -> dict[str, dict]:  # fmt: skip
    """Convert `files` (inside `root`); returns {split: manifest}. Without a plan every sample goes
    to one shard set in writer_cfg.out_dir (split "all"); with one, to out_dir/<split>/."""
    start = time.time()
    splits = plan.assign(root, files) if plan else {f: "all" for f in files}
    writers = _Writers(writer_cfg, plan is not None, {"converter": {"source": cfg.source, "unit": cfg.unit}})
    index = 0
    try:
        for split in dict.fromkeys(splits.values()):  # every split gets a manifest, even an empty one
            writers.get(split)
        for path in files:
            writer = writers.get(splits[path])
            rel = path.resolve().relative_to(root).as_posix()
            try:
                layout, image_path = _load_page(path, root, cfg.format)
                page = open_image(image_path) if cfg.unit == "line" else None
            except _PageSkip as e:
                writer.skip(e.reason, rel, f"{cfg.key_prefix}-page", str(e))
                continue
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                writer.skip("corrupt_image", rel, f"{cfg.key_prefix}-page", f"{type(e).__name__}: {e}")
                continue
            if cfg.unit == "line":
                index = _write_lines(writer, layout, page, image_path, rel, cfg, index)
            else:
                index = _write_page(writer, layout, image_path, rel, cfg, index)
    except BaseException:
        for w in writers.writers.values():
            w.abort()
        raise
    manifests = {split: w.close() for split, w in writers.writers.items()}
    logger.info("converted %d layout files in %.1f s", len(files), time.time() - start)
    return manifests


def _meta(cfg: XmlConvertConfig, text: str, lang: str | None, origin: str, rel: str, size) -> dict:
    meta = {"answer": text, "source": cfg.source, "lang": lang or cfg.lang, "origin": origin, "page": rel,
            "width": size[0], "height": size[1]}  # fmt: skip
    if cfg.prompt is not None:
        meta["prompt"] = cfg.prompt
    if cfg.mode is not None:
        meta["mode"] = cfg.mode
    return meta


def _write_lines(writer: ShardWriter, layout: LayoutPage, page: Image.Image, image_path: Path, rel: str,
                 cfg: XmlConvertConfig, index: int) -> int:  # fmt: skip
    fmt = cfg.crop_format
    if fmt == "auto":
        fmt = "jpeg" if image_path.suffix.lower() in (".jpg", ".jpeg") else "png"
    for line in layout.scaled_lines(page.size):
        key, origin = f"{cfg.key_prefix}-{index:09d}", f"{rel}#{line.id}"
        index += 1
        text = line.text.strip()
        if not text:
            writer.skip("empty_text", origin, key)
            continue
        label = check_label(text, cfg.validation)
        if isinstance(label, Reject):
            writer.skip(label.reason, origin, key, label.detail)
            continue
        if not line.points:
            writer.skip("missing_polygon", origin, key, "no Coords/Polygon points and no box")
            continue
        box = line_bounds(line.points, cfg.margin, page.size)
        if box is None:
            writer.skip("polygon_outside_image", origin, key, f"image {page.size[0]}x{page.size[1]}")
            continue
        crop = crop_line(page, line, box, cfg.mask)
        data, ext = encode(crop, fmt)
        writer.write(
            Sample(key, _meta(cfg, label, line.lang or layout.lang, origin, rel, crop.size), data, ext)
        )
    return index


def _write_page(writer: ShardWriter, layout: LayoutPage, image_path: Path, rel: str, cfg: XmlConvertConfig,
                index: int) -> int:  # fmt: skip
    key = f"{cfg.key_prefix}-{index:09d}"
    text = "\n".join(t for t in (ln.text.strip() for ln in layout.lines) if t)
    if not text:
        writer.skip("no_text_lines", rel, key, f"{len(layout.lines)} lines, none with text")
        return index + 1
    label = check_label(text, cfg.validation)
    image = check_image_file(image_path, cfg.validation)
    for result in (label, image):
        if isinstance(result, Reject):
            writer.skip(result.reason, rel, key, result.detail)
            return index + 1
    langs = {ln.lang for ln in layout.lines if ln.lang}
    lang = layout.lang or (langs.pop() if len(langs) == 1 else None)
    writer.write(
        Sample(key, _meta(cfg, label, lang, rel, rel, (image.width, image.height)), image.data, image.ext)
    )
    return index + 1
