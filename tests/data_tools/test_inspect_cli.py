"""`dsocr-data` command line and `inspect`: counts, histograms, token lengths, sheet, manifest check."""

from __future__ import annotations

import json

import pytest
from dt_images import png_bytes
from PIL import Image

from data_tools.cli import build_parser, main
from data_tools.inspect import histogram, inspect_shards
from data_tools.shards import Sample, ShardWriter, ShardWriterConfig, expand_shard_paths

pytestmark = pytest.mark.unit

SUBCOMMANDS = ("synth", "synth-scans", "convert-csv", "convert-jsonl", "convert-folder", "convert-text",
               "convert-pagexml", "convert-alto", "inspect")  # fmt: skip


def _run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_has_help(cmd, capsys):
    code, out, _ = _run([cmd, "--help"], capsys)
    assert code == 0 and f"dsocr-data {cmd}" in out
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(SUBCOMMANDS)


def _shards(tmp_path):
    """5 samples, known sources/langs/modes, answers of 3, 10, 44, 40 chars and a text-only doc of 14."""
    cfg = ShardWriterConfig(str(tmp_path / "s"), max_count=2)
    with ShardWriter(cfg) as w:
        w.write(
            Sample("a", {"answer": "abc", "source": "csv", "lang": "en", "mode": "tiny"}, png_bytes(), "png")
        )
        w.write(Sample("b", {"answer": "x" * 10, "source": "csv", "lang": "fa"}, png_bytes(), "png"))
        w.write(Sample("c", {"answer": "one two three four five six seven eight nine", "source": "jl",
                             "lang": "fa", "mode": "base"}, png_bytes(30, 20), "png"))  # fmt: skip
        w.write(Sample("d", {"answer": "y" * 40, "source": "jl", "lang": "zh"}, png_bytes(), "png"))
        w.write(Sample("e", {"text": "plain text doc", "source": "txt", "lang": "en"}))
    return tmp_path / "s"


def test_inspect_counts_and_histograms(tmp_path):
    paths = expand_shard_paths([str(_shards(tmp_path))])
    report, chosen = inspect_shards(paths, n_sheet=3, seed=1, verify=True)
    assert report["samples"] == 5 and report["shards"] == 3
    assert report["per_source"] == {"csv": 2, "jl": 2, "txt": 1}
    assert report["per_lang"] == {"en": 2, "fa": 2, "zh": 1}
    assert report["per_mode"] == {"-": 3, "tiny": 1, "base": 1}
    assert report["per_kind"] == {"image": 4, "text-only": 1}
    assert report["chars"] == {"min": 3, "mean": 22.2, "max": 44, "total": 111}
    assert report["chars_histogram"]["<=16"] == 3 and report["chars_histogram"]["<=64"] == 2
    assert report["manifest_problems"] == []
    assert len(chosen) == 3 and len({c["__key__"] for c in chosen}) == 3


def test_histogram_bins():
    h = histogram([1, 16, 17, 20000], bins=(16, 32))
    assert h == {"<=16": 2, "<=32": 1, ">32": 1}


def test_inspect_tokens_with_tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "one": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    paths = expand_shard_paths([str(_shards(tmp_path))])
    report, _ = inspect_shards(paths, tokenizer=str(tmp_path))
    # whitespace words: 1 + 1 + 9 + 1 + 3 (text-only "plain text doc")
    assert report["tokens"]["total"] == 15 and report["tokens"]["max"] == 9


def test_verify_detects_tampered_shard(tmp_path, capsys):
    d = _shards(tmp_path)
    shard = sorted(d.glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # inside the first member's payload: size unchanged, checksum not
    shard.write_bytes(bytes(data))
    code, out, _ = _run(["inspect", str(d), "--verify"], capsys)
    assert code == 1 and "sha256 differs" in out


def test_cli_convert_csv_then_inspect_with_sheet(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "t.csv").write_text("image_file,text_label\na.png,hello\nmissing.png,x\n,y\n")
    code, out, _ = _run(["convert-csv", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"), "--no-progress",
                         "--prompt", "Free OCR.", "--lang", "en", "--max-bad-share", "1"], capsys)  # fmt: skip
    assert code == 0 and "wrote 1 samples" in out and "missing_file=2" in out
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["skipped"] == {"missing_file": 2} and manifest["total_samples"] == 1
    sheet = tmp_path / "sheet.png"
    code, out, _ = _run(["inspect", str(tmp_path / "o"), "--sheet", str(sheet), "--json"], capsys)
    assert code == 0
    report = json.loads(out[: out.rindex("}") + 1])
    assert report["per_source"] == {"t": 1}
    assert Image.open(sheet).size[0] == 320
    # refuses to overwrite without --overwrite: a clear one-line error, exit 2
    code, _, err = _run(
        ["convert-csv", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"), "--no-progress"], capsys
    )
    assert code == 2 and "--overwrite" in err


def test_cli_synth_bundled_fonts(tmp_path, capsys):
    out_dir = tmp_path / "syn"
    code, out, _ = _run(["synth", "--out", str(out_dir), "-n", "4", "--langs", "en,fa", "--kinds", "line=1",
                         "--bundled-fonts", "--no-progress", "--seed", "5"], capsys)  # fmt: skip
    assert code == 0 and "wrote 4 samples" in out
    code, out, _ = _run(["inspect", str(out_dir), "--verify"], capsys)
    assert code == 0 and "manifest check: OK" in out and "synth-line=4" in out
    code, _, err = _run(["synth", "--out", str(tmp_path / "x"), "-n", "1", "--kinds", "line"], capsys)
    assert code == 2 and "NAME=WEIGHT" in err
