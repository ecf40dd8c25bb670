"""PAGE-XML / ALTO conversion: line crops, page samples, reading order, bad input, splits.

Every layout file and image is written by the test itself."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import run as cli_run
from data_tools.convert_xml import SplitPlan, XmlConvertConfig, convert_layout_files, find_layout_files
from data_tools.layout_xml import LayoutError, read_layout
from data_tools.shards import ShardWriterConfig, expand_shard_paths, iter_samples

PAGE19 = "http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15"
PAGE13 = "http://schema.primaresearch.org/PAGE/gts/pagecontent/2013-07-15"
ALTO4 = "http://www.loc.gov/standards/alto/ns-v4#"
ALTO2 = "http://www.loc.gov/standards/alto/ns-v2#"


def page_image(path, w=200, h=120, fmt="PNG"):
    """A page with a distinct grey level per 10-pixel row band (so crops can be located)."""
    arr = np.tile((np.arange(h) * 2 % 256).astype(np.uint8)[:, None], (1, w))
    arr[:, ::7] = 0  # some texture across the columns
    Image.fromarray(arr, "L").convert("RGB").save(path, format=fmt)
    return np.asarray(Image.open(path).convert("RGB"))


def page_xml(image, lines_by_region, order=None, ns=PAGE19, lang="French", w=200, h=120) -> str:
    """PAGE XML: lines_by_region = {region id: [(line id, "x,y x,y ...", text or None)]}."""
    ro = ""
    if order:
        refs = "".join(f'<RegionRefIndexed index="{i}" regionRef="{r}"/>' for i, r in enumerate(order))
        ro = f'<ReadingOrder><OrderedGroup id="g">{refs}</OrderedGroup></ReadingOrder>'
    regions = ""
    for rid, lines in lines_by_region.items():
        body = ""
        for lid, points, text in lines:
            equiv = "" if text is None else f"<TextEquiv><Unicode>{text}</Unicode></TextEquiv>"
            body += f'<TextLine id="{lid}"><Coords points="{points}"/>{equiv}</TextLine>'
        regions += f'<TextRegion id="{rid}"><Coords points="0,0 1,1 1,0"/>{body}</TextRegion>'
    return (f'<?xml version="1.0" encoding="UTF-8"?><PcGts xmlns="{ns}"><Metadata/>'
            f'<Page imageFilename="{image}" imageWidth="{w}" imageHeight="{h}" primaryLanguage="{lang}">'
            f"{ro}{regions}</Page></PcGts>")  # fmt: skip


def alto_xml(image, lines, ns=ALTO4, w=200, h=120) -> str:
    """ALTO: lines = [(id, inner xml of the TextLine, attributes)]."""
    body = "".join(f'<TextLine ID="{lid}" {attrs}>{inner}</TextLine>' for lid, inner, attrs in lines)
    return (f'<alto xmlns="{ns}"><Description><MeasurementUnit>pixel</MeasurementUnit><sourceImageInformation>'
            f"<fileName>{image}</fileName></sourceImageInformation></Description><Layout>"
            f'<Page WIDTH="{w}" HEIGHT="{h}" ID="p"><PrintSpace><TextBlock ID="b" LANG="de">{body}</TextBlock>'
            f"</PrintSpace></Page></Layout></alto>")  # fmt: skip


def convert(tmp_path, src, **kw):
    plan = kw.pop("plan", None)
    root, files = find_layout_files(src)
    cfg = XmlConvertConfig(source="gt", lang="fr", **kw)
    manifests = convert_layout_files(files, root, ShardWriterConfig(str(tmp_path / "out")), cfg, plan)
    return manifests


def samples_of(directory):
    return list(iter_samples(expand_shard_paths([str(directory)])))


def decode(sample):
    ext = "png" if "png" in sample else "jpg"
    return np.asarray(Image.open(io.BytesIO(sample[ext])).convert("RGB"))


def test_page_lines_follow_reading_order_and_crop_the_polygon_bounds(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pixels = page_image(src / "p.png")
    regions = {
        "r1": [("l1", "10,10 90,12 90,30 10,28", "second region"), ("l2", "5,40 60,40 60,50 5,50", "  ")],
        "r2": [("l3", "100,60 180,60 180,80 100,80", "first &amp; foremost"),
               ("l4", "300,300 400,300 400,310", "outside"), ("l5", "1,1 2,2 a,b", "no points")],
    }  # fmt: skip
    (src / "p.xml").write_text(page_xml("p.png", regions, order=["r2", "r1"]))
    manifests = convert(tmp_path, src, margin=3)
    m = manifests["all"]
    assert m["total_samples"] == 2
    assert m["skipped"] == {"empty_text": 1, "missing_polygon": 1, "polygon_outside_image": 1}
    got = samples_of(tmp_path / "out")
    assert [s["json"]["answer"] for s in got] == ["first & foremost", "second region"]
    assert all(s["json"]["lang"] == "fr" and s["json"]["source"] == "gt" for s in got)  # PAGE "French" -> fr
    assert got[0]["json"]["origin"] == "p.xml#l3" and got[0]["json"]["page"] == "p.xml"
    # bounds (100..180, 60..80) + 3 px margin, pixel for pixel the page's region
    np.testing.assert_array_equal(decode(got[0]), pixels[57:83, 97:183])
    np.testing.assert_array_equal(decode(got[1]), pixels[7:33, 7:93])


def test_mask_whitens_outside_the_polygon_only(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pixels = page_image(src / "p.png")
    triangle = "20,20 120,20 20,60"
    (src / "p.xml").write_text(page_xml("p.png", {"r": [("l", triangle, "tri")]}, ns=PAGE13))
    convert(tmp_path, src, margin=0, mask=True)
    crop = decode(samples_of(tmp_path / "out")[0])
    assert crop.shape[:2] == (40, 100)
    assert (crop[35, 90] == 255).all()  # far corner, outside the triangle
    np.testing.assert_array_equal(crop[2, 2], pixels[22, 22])  # inside: untouched


def test_alto_polygon_box_strings_and_hyphen(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pixels = page_image(src / "a.jpg", fmt="JPEG")
    lines = [
        ("t1", '<Shape><Polygon POINTS="10 10 50 10 50 20 10 20"/></Shape><String CONTENT="Franz"/>'
               '<SP/><String CONTENT="Kafka"/><HYP CONTENT="-"/>', ""),
        ("t2", '<String CONTENT="word"/><String CONTENT="level"/>', 'HPOS="20" VPOS="40" WIDTH="30" HEIGHT="10"'),
        ("t3", '<String CONTENT=""/>', 'HPOS="20" VPOS="40" WIDTH="30" HEIGHT="10"'),
    ]  # fmt: skip
    (src / "a.xml").write_text(alto_xml("a.jpg", lines))
    m = convert(tmp_path, src, margin=0)["all"]
    assert m["skipped"] == {"empty_text": 1}
    got = samples_of(tmp_path / "out")
    assert [s["json"]["answer"] for s in got] == ["Franz Kafka-", "word level"]
    assert all(s["json"]["lang"] == "de" for s in got)  # TextBlock@LANG wins over the default
    assert "jpg" in got[1] and decode(got[1]).shape[:2] == (10, 30)
    assert np.abs(decode(got[1]).astype(int) - pixels[40:50, 20:50]).mean() < 3  # JPEG q95 of the same pixels


def test_alto_v2_page_samples_join_lines_and_keep_the_image_bytes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    page_image(src / "a.png")
    lines = [(f"t{i}", f'<String CONTENT="line {i}"/>', f'HPOS="5" VPOS="{10 * i}" WIDTH="50" HEIGHT="9"')
             for i in range(3)]  # fmt: skip
    (src / "a.xml").write_text(alto_xml("a.png", lines, ns=ALTO2))
    assert read_layout(src / "a.xml").format == "alto-v2"
    convert(tmp_path, src, unit="page")
    (sample,) = samples_of(tmp_path / "out")
    assert sample["json"]["answer"] == "line 0\nline 1\nline 2"
    assert sample["png"] == (src / "a.png").read_bytes()


def test_bad_files_are_counted_and_good_pages_still_written(tmp_path):
    src = tmp_path / "root" / "src"
    src.mkdir(parents=True)
    page_image(src / "ok.png")
    page_image(tmp_path / "root" / "outside.png")  # above the dataset root src/
    good = {"r": [("l", "10,10 50,10 50,20 10,20", "good")]}
    (src / "ok.xml").write_text(page_xml("ok.png", good))
    (src / "broken.xml").write_text("<PcGts><Page")
    (src / "foreign.xml").write_text('<PcGts xmlns="http://example.org/other"><Page/></PcGts>')
    (src / "noimage.xml").write_text(page_xml("gone.png", good))
    (src / "escape.xml").write_text(page_xml("../outside.png", good))
    (src / "corrupt.png").write_bytes(b"not a png")
    (src / "corrupt.xml").write_text(page_xml("corrupt.png", good))
    (src / "alto.xml").write_text(
        alto_xml("ok.png", [("t", '<String CONTENT="x"/>', 'HPOS="1" VPOS="1" WIDTH="9" HEIGHT="9"')])
    )
    m = convert(tmp_path, src, format="page")["all"]
    assert m["total_samples"] == 1
    assert m["skipped"] == {"broken_xml": 1, "corrupt_image": 1, "image_outside_root": 1, "missing_image": 1,
                            "other_format": 1, "unknown_namespace": 1}  # fmt: skip
    with pytest.raises(LayoutError) as e:
        read_layout(src / "foreign.xml")
    assert e.value.reason == "unknown_namespace"


def test_ocrd_workspace_images_resolve_from_the_workspace_root(tmp_path):
    ws = tmp_path / "ws"
    (ws / "OCR-D-IMG").mkdir(parents=True)
    (ws / "OCR-D-GT-SEG-LINE").mkdir()
    page_image(ws / "OCR-D-IMG" / "FILE_0001.png")
    (ws / "mets.xml").write_text("<mets/>")  # not a layout file: ignored, not counted
    xml = page_xml("OCR-D-IMG/FILE_0001.png", {"r": [("l", "10,10 50,10 50,20 10,20", "ocrd")]})
    (ws / "OCR-D-GT-SEG-LINE" / "FILE_0001.xml").write_text(xml)
    m = convert(tmp_path, ws)["all"]
    assert m["total_samples"] == 1 and m["skipped_total"] == 0


def _documents(tmp_path):
    src = tmp_path / "corpus"
    for doc in ("docA", "docB"):
        (src / doc).mkdir(parents=True)
        for p in range(3):
            page_image(src / doc / f"{p}.png")
            lines = {"r": [(f"l{k}", f"10,{10 + 20 * k} 90,{10 + 20 * k} 90,{25 + 20 * k}", f"{doc} p{p} l{k}")
                           for k in range(2)]}  # fmt: skip
            (src / doc / f"{p}.xml").write_text(page_xml(f"{p}.png", lines))
    return src


def test_split_file_keeps_documents_and_pages_apart(tmp_path):
    src = _documents(tmp_path)
    split = tmp_path / "split.txt"
    split.write_text("# held out\nheldout docB\nval docA/2.xml\n")
    plan = SplitPlan.read(split)
    manifests = convert(tmp_path, src, plan=plan)
    assert {k: m["total_samples"] for k, m in manifests.items()} == {"train": 4, "val": 2, "heldout": 6}
    pages = {name: {s["json"]["page"] for s in samples_of(tmp_path / "out" / name)} for name in manifests}
    assert pages["heldout"] == {f"docB/{p}.xml" for p in range(3)}
    assert pages["val"] == {"docA/2.xml"} and pages["train"] == {"docA/0.xml", "docA/1.xml"}
    assert all(
        json.loads((tmp_path / "out" / n / "manifest.json").read_text())["split"] == n for n in manifests
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("heldout docB\ntrain docB/1.xml\n", "both"),
        ("heldout docC\n", "matches no XML"),
        ("heldout\n", "SPLIT PATH"),
    ],
)
def test_split_file_errors(tmp_path, text, message):
    src = _documents(tmp_path)
    (tmp_path / "split.txt").write_text(text)
    root, files = find_layout_files(src)
    with pytest.raises(ValueError, match=message):
        SplitPlan.read(tmp_path / "split.txt").assign(root, files)


def test_cli_convert_pagexml_writes_split_shard_sets(tmp_path, capsys):
    src = _documents(tmp_path)
    (tmp_path / "split.txt").write_text("heldout docA\n")
    argv = ["convert-pagexml", str(src), "--out", str(tmp_path / "cli"), "--lang", "fr", "--no-progress",
            "--split-file", str(tmp_path / "split.txt")]  # fmt: skip
    assert cli_run(argv) == 0
    out = capsys.readouterr().out
    assert "[train] wrote 6 samples" in out and "[heldout] wrote 6 samples" in out
    assert cli_run(["convert-alto", str(src), "--out", str(tmp_path / "alto"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "alto" / "manifest.json").read_text())["skipped"] == {"other_format": 6}


@pytest.mark.parametrize(
    ("mode", "ext", "expected"),
    [("I;16", "png", 200), ("I", "tif", 200), ("1", "png", 255), ("P", "png", 200), ("CMYK", "tif", 200),
     ("RGBA", "png", 255), ("LA", "png", 255)],
)  # fmt: skip
def test_page_images_of_every_mode_become_l_or_rgb_with_the_right_levels(tmp_path, mode, ext, expected):
    from data_tools.convert_xml import open_image

    if mode == "I;16":
        img = Image.fromarray(np.full((10, 20), 200 * 256, dtype=np.uint16))
    elif mode in ("RGBA", "LA"):
        img = Image.new(mode, (20, 10), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))  # fully transparent
    else:
        img = Image.new("L", (20, 10), 200 if mode != "1" else 255).convert(mode)
    img.save(tmp_path / f"p.{ext}")
    out = open_image(tmp_path / f"p.{ext}")
    assert out.mode in ("L", "RGB")
    value = out.getpixel((3, 3))
    assert (value if out.mode == "L" else value[0]) == pytest.approx(expected, abs=2)


def test_alto_mm10_coordinates_are_scaled_to_the_image(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    page_image(src / "p.png", w=200, h=120)
    line = [("t", '<String CONTENT="scaled"/>', 'HPOS="100" VPOS="200" WIDTH="300" HEIGHT="100"')]
    xml = alto_xml("p.png", line, w=1000, h=600).replace(">pixel<", ">mm10<")  # page 1000 x 600 mm10
    (src / "p.xml").write_text(xml)
    convert(tmp_path, src, margin=0)
    (sample,) = samples_of(tmp_path / "out")
    assert (sample["json"]["width"], sample["json"]["height"]) == (60, 20)  # x 0.2: (20..80, 40..60)
