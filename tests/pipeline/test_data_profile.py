"""Own data: shards from a CSV, read as a directory, profiled into seq_len / eval budget / mode."""

import dataclasses
import io
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_tools.convert import ConvertConfig, convert_records, read_csv
from data_tools.shards import ShardWriterConfig
from pipeline.data.config import LoaderConfig, SourceSpec
from pipeline.data.profile import DataProfile, derive_settings, profile_data
from pipeline.data.samples import SampleDecoder
from pipeline.data.shards import SkipCounter, expand_shards, index_shard
from pipeline.data.stream import SampleRef
from pipeline.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.unit
LABELS = ["ab", "abcdefghij abcdefghij", "cab", "bad"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("csv")
    rows = ["image_file,text_label"]
    for i, label in enumerate(LABELS):
        buf = io.BytesIO()
        Image.effect_noise((48 + 8 * i, 32), 40).convert("RGB").save(buf, format="PNG")
        (root / f"{i}.png").write_bytes(buf.getvalue())
        rows.append(f"{i}.png,{label}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    out = root / "shards"
    convert_records(read_csv(root / "data.csv"), ShardWriterConfig(str(out), max_count=3),
                    ConvertConfig(source="mine", mode="base", progress=False))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer("abcdefghij .\n")


def loader(shards, **kw):
    return LoaderConfig(sources=[SourceSpec("mine", str(shards), modes={"gundam": 1.0})], batch_size=1, **kw)


def test_a_directory_stands_for_the_shards_its_manifest_lists(shards, tmp_path):
    assert expand_shards(str(shards)) == [str(shards / "shard-000000.tar"), str(shards / "shard-000001.tar")]
    (tmp_path / "b.tar").write_bytes(b"")
    (tmp_path / "a.tar").write_bytes(b"")
    assert expand_shards(str(tmp_path)) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]  # no manifest
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no shard"):
        expand_shards(str(tmp_path / "empty"))


def test_profile_measures_what_training_decodes(shards, tok):
    profile = profile_data(loader(shards), tok, LABELS)
    assert profile.samples == 4 and profile.skipped == {}
    assert profile.modes == {"base": 4}  # the converter's per-sample mode beats the source's gundam
    assert profile.longest_label == len(LABELS[1]) + 1  # one token per character, + EOS
    # the longest sample fits exactly that row length, and no shorter one
    refs = [
        SampleRef(0, s, e.key, e.files, 0, Path(s).name)
        for s in expand_shards(str(shards))
        for e in index_shard(s, SkipCounter())
    ]
    for seq_len, decoded in ((profile.longest_sequence, 4), (profile.longest_sequence - 1, 3)):
        decoder = SampleDecoder(dataclasses.replace(loader(shards), seq_len=seq_len), tok, SkipCounter())
        assert sum(decoder(r) is not None for r in refs) == decoded


def test_derived_settings_name_their_overrides():
    profile = DataProfile(4, 300, 23, Counter(base=4), {})
    derived = derive_settings(profile, seq_len=128, max_new_tokens=5, eval_mode="gundam")
    assert (derived.seq_len, derived.max_new_tokens, derived.eval_mode) == (320, 3 * 23 + 8, "base")
    assert [n.split()[0] for n in derived.notes] == ["data.seq_len", "eval.max_new_tokens", "eval.mode"]
    assert "data.seq_len=N" in derived.notes[0] and "eval.max_new_tokens=N" in derived.notes[1]
    same = derive_settings(profile, seq_len=4096, max_new_tokens=40, eval_mode="base")  # 23 <= 40 <= 77
    assert (same.seq_len, same.max_new_tokens, same.eval_mode, same.notes) == (4096, 40, "base", [])
    pages = derive_settings(profile, seq_len=4096, max_new_tokens=4096, eval_mode="base")  # a page budget
    assert pages.max_new_tokens == 77 and pages.notes[0].startswith("eval.max_new_tokens 4096 -> 77")
    with pytest.raises(ValueError, match="bad_image 4"):
        derive_settings(
            DataProfile(0, 0, 3, Counter(), {"bad_image": 4}), seq_len=1, max_new_tokens=1, eval_mode="base"
        )


def test_fine_tune_data_follows_the_mode_the_base_was_trained_in(tmp_path):
    from pipeline.cli.dryrun import compose_config
    from pipeline.config import to_run_config
    from pipeline.finetune.data import FinetuneData, with_target_mode
    from pipeline.training_info import TrainingInfo

    run = to_run_config(compose_config(["experiment=finetune_lora"]))
    data = FinetuneData([SourceSpec("t", "x.tar", modes={"gundam": 1.0})], None, "val", "")
    assert (
        with_target_mode(run.finetune, run.eval, data, tmp_path) is data and run.eval.mode == "gundam"
    )  # the release: as set
    TrainingInfo("debug-256", "free_ocr", {"debug-256": 1.0}).write(tmp_path)
    moved = with_target_mode(run.finetune, run.eval, data, tmp_path)
    assert moved.target_train[0].modes == {"debug-256": 1.0} and run.eval.mode == "debug-256"
    run.finetune.mode = "base"  # an explicit choice wins
    assert with_target_mode(run.finetune, run.eval, data, tmp_path).target_train[0].modes == {"base": 1.0}
