"""data.kind=real_lines: synthetic scans + a real ALTO corpus (written here), split by document,
trained and evaluated through the job; the corpus' held-out pages never reach training."""

import json

import pytest
from PIL import Image, ImageDraw

from data_tools.shards import expand_shard_paths, iter_samples
from pipeline.cli.train import CONFIG_DIR
from pipeline.config import register_configs, to_run_config
from pipeline.train.job import loader_config, prepare_job_data, run_job
from pipeline.train.real_lines import prepare_real_lines

ALTO4 = "http://www.loc.gov/standards/alto/ns-v4#"


def write_corpus(root):
    """docA, docB: 2 pages each of 3 typed lines, ALTO v4 beside each PNG (like the Tapuscorpus)."""
    for doc in ("docA", "docB"):
        (root / "data" / doc).mkdir(parents=True)
        for p in range(2):
            img = Image.new("RGB", (220, 120), (235, 230, 210))
            draw = ImageDraw.Draw(img)
            body = ""
            for k in range(3):
                text = f"{doc} été {p}{k}"
                y = 10 + 35 * k
                draw.text((10, y), text, fill=(30, 30, 30))
                body += (f'<TextLine ID="l{k}" HPOS="8" VPOS="{y - 2}" WIDTH="120" HEIGHT="16">'
                         f'<String CONTENT="{text}"/></TextLine>')  # fmt: skip
            img.save(root / "data" / doc / f"{p}.png")
            xml = (f'<alto xmlns="{ALTO4}"><Description><sourceImageInformation><fileName>{p}.png</fileName>'
                   f'</sourceImageInformation></Description><Layout><Page WIDTH="220" HEIGHT="120">'
                   f'<PrintSpace><TextBlock ID="b">{body}</TextBlock></PrintSpace></Page></Layout></alto>')  # fmt: skip
            (root / "data" / doc / f"{p}.xml").write_text(xml)


def compose_run(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    (tmp_path / "split.txt").write_text("heldout data/docB\n")
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="train", overrides=[
            f"train.out_dir={tmp_path / 'run'}", "data.kind=real_lines", f"data.real_root={corpus}",
            f"data.real.split_file={tmp_path / 'split.txt'}", "data.real.start_after=16", "data.scan.num_train=48",
            "data.scan.num_val=4", "data.scan.max_chars=16", "data.scan.font_px=[10,14]", "data.scan.bundled_only=true",
            "eval.mode=debug-lines", "eval.num_samples=8", "eval.max_new_tokens=20", *overrides,
        ])  # fmt: skip
    return to_run_config(cfg)


def test_real_lines_are_split_by_document_mixed_after_the_synthetic_ones_and_evaluated(tmp_path):
    run = compose_run(tmp_path, "train.max_steps=3", "train.log_every=1", "train.device=cpu")
    job = run_job(run)
    data = tmp_path / "run" / "data"
    pages = {split: {s["json"]["page"] for s in iter_samples(expand_shard_paths([str(data / "real" / split)]))}
             for split in ("train", "heldout")}  # fmt: skip
    assert pages == {
        "train": {"data/docA/0.xml", "data/docA/1.xml"},
        "heldout": {"data/docB/0.xml", "data/docB/1.xml"},
    }
    assert json.loads((data / "real" / "heldout" / "manifest.json").read_text())["total_samples"] == 6
    after = json.loads((job.out_dir / "eval" / "after_report.json").read_text())
    assert after["num_samples"] == 6  # the held-out real lines drive the main evaluation
    assert {"raw", "normalized", "loop_rate"} <= set(after) and "corpus_wer" in after["raw"]
    assert json.loads((job.out_dir / "eval" / "after_scan_report.json").read_text())["num_samples"] == 4
    assert set(job.other_sets) == {"scan"}


def test_sources_curriculum_tokenizer_and_reuse(tmp_path):
    run = compose_run(tmp_path)
    out = tmp_path / "run"
    data = prepare_job_data(run.data, run.eval, out)
    sources = loader_config(
        run.data, run.eval, data.train_shards, batch_size=run.parallel.micro_batch, seed=run.train.seed
    ).sources
    assert [(s.name, s.start_after) for s in sources] == [("scan-lines", 0), ("real-lines", 16)]
    assert all(s.modes == "debug-lines" for s in sources)  # the eval mode: trained as evaluated
    unk = data.tokenizer.tokenizer.token_to_id("<unk>")
    assert unk not in data.tokenizer.encode("docB été _ Réf. n° l’")  # real and synthetic characters have ids
    shard = next((out / "data" / "real" / "train").glob("real-*.tar"))
    stamp = shard.stat().st_mtime_ns
    prepare_real_lines(run.data, out / "data")  # same settings: converted shards are reused
    assert shard.stat().st_mtime_ns == stamp
    (tmp_path / "split.txt").write_text("heldout data/docB\nval data/docA/1.xml\n")  # another split file
    real = prepare_real_lines(run.data, out / "data")
    assert sorted(p.name for p in (out / "data" / "real").iterdir() if p.is_dir()) == [
        "heldout",
        "train",
        "val",
    ]
    assert len(expand_shard_paths([str(out / "data" / "real" / s) for s in ("train", "val")])) == 2
    from pipeline.data.shards import expand_shards

    assert len(expand_shards(real.train["real"])) == 2  # both training splits are trained on
    (tmp_path / "split.txt").write_text("heldout data/docZ\n")
    with pytest.raises(ValueError, match="matches no XML"):
        prepare_real_lines(run.data, out / "data")


def warmup_run(tmp_path, *overrides):
    """(sources, warm-up samples, their reading-lines manifest) of a run with 8 warm-up lines; every
    warm-up answer has token ids."""
    run = compose_run(tmp_path, "data.scan.warmup_lines=8", *overrides)
    out = tmp_path / "run"
    data = prepare_job_data(run.data, run.eval, out)
    sources = loader_config(
        run.data, run.eval, data.train_shards, batch_size=run.parallel.micro_batch, seed=run.train.seed
    ).sources
    warmup = list(iter_samples(expand_shard_paths([str(out / "data" / "scan" / "warmup")])))
    unk = data.tokenizer.tokenizer.token_to_id("<unk>")
    assert all(unk not in data.tokenizer.encode(s["json"]["answer"]) for s in warmup)
    manifest = json.loads((out / "data" / "scan" / "warmup" / "manifest.json").read_text())["reading_lines"]
    return sources, warmup, manifest


def test_warmup_lines_are_short_fixed_pitch_typed_text_trained_alone_first(tmp_path):
    sources, warmup, reading = warmup_run(tmp_path, "data.scan.warmup_max_chars=14", "data.scan.warmup_weight=0.25",
                                          "data.scan.warmup_text=typed")  # fmt: skip
    assert [(s.name, s.start_after, s.weight) for s in sources] == [
        ("scan-warmup", 0, 0.25), ("scan-lines", 8, 1.0), ("real-lines", 16, 1.0)]  # fmt: skip
    assert len(warmup) == 8 and all(1 <= len(s["json"]["answer"]) <= 14 for s in warmup)
    assert (reading["text"], reading["width"], reading["aspect"], reading["lang"]) == ("typed", 640, 4, "fr")
    assert all(s.modes == "debug-lines" for s in sources)


def test_warmup_lines_of_gpu1_lines_in_their_own_mode(tmp_path):
    sources, warmup, reading = warmup_run(tmp_path, "data.scan.warmup_max_chars=8", "data.scan.warmup_width=256",
                                          "data.scan.warmup_mode=debug-256")  # fmt: skip
    assert [s.modes for s in sources] == ["debug-256", "debug-lines", "debug-lines"]
    assert len(warmup) == 8 and all(1 <= len(s["json"]["answer"]) <= 8 for s in warmup)
    assert (reading["text"], reading["width"], reading["lang"]) == ("short", 256, "en")


@pytest.mark.parametrize(
    ("override", "message"),
    [("data.scan.warmup_max_chars=0", "data.scan.warmup_max_chars"), ("data.scan.warmup_max_chars=81", "7..80"),
     ("data.scan.warmup_text=random", "data.scan.warmup_text"), ("data.scan.warmup_mode=huge", "warmup_mode"),
     ("data.scan.warmup_width=30", "data.scan.warmup_width"),
     ("data.scan.warmup_lines=-1", "data.scan.warmup_lines")],
)  # fmt: skip
def test_bad_warmup_settings_are_refused_at_config_time(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        compose_run(tmp_path, override)


@pytest.mark.parametrize(
    ("override", "message"),
    [("data.real_root=", "needs data.real_root"), ("data.real_root=/nonexistent/corpus", "is not a folder"),
     ("data.real.split_file=missing.txt", "does not exist"), ("data.real.split_file=", "needs data.real.split_file"),
     ("data.real.format=hocr", "'alto' or 'page'")],
)  # fmt: skip
def test_bad_real_settings_fail_before_any_rendering(tmp_path, override, message):
    run = compose_run(tmp_path, override)
    with pytest.raises(ValueError, match=message):
        prepare_real_lines(run.data, tmp_path / "run" / "data")
    assert not (tmp_path / "run" / "data" / "scan").exists()
