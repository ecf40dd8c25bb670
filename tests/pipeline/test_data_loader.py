"""End to end: shards with every kind of bad input -> StreamingLoader -> PackedBatch.

Checks that each valid sample comes through exactly once and each bad one is counted
under its reason, that data-parallel ranks split an epoch, that batches do not
depend on anything but (seed, dp_rank), and that a resumed loader continues with
exactly the next batch (in-process and with DataLoader workers).
"""

import io
import json
import string

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.batch import PackedBatch
from pipeline.data import LoaderConfig, SourceSpec, StreamingLoader
from pipeline.data.samples import SampleDecoder
from pipeline.data.shards import SkipCounter
from pipeline.data.stream import SampleRef
from pipeline.data.testing import png_bytes, sample_members, write_ocr_shards, write_tar
from pipeline.processing import candidate_grids, num_placeholders, view_sizes
from pipeline.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.unit
SEQ = 512


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(string.printable)


def bad_shard(directory):
    """One shard mixing valid samples with one of each kind of bad input.

    Returns the path, the keys of the valid samples and the expected skip counts.
    """
    good = png_bytes(64, 48, seed=7)
    members, valid = [], []
    for i in range(6):
        members += sample_members(f"good{i}", f"text {i}", png_bytes(80, 40, seed=i))
        valid.append(f"good{i}")
    corrupt = bytearray(good)
    corrupt[60:200] = bytes(140)
    members += sample_members("corrupt", "x", bytes(corrupt))
    members += sample_members("truncimg", "x", good[: len(good) // 2])
    members += sample_members("notimage", "x", b"hello, I am not a png")
    members += sample_members("noimage", "x")
    members += sample_members("empty", "", good)
    members += sample_members("blank", " \n\t ", good)
    members += sample_members("nolabel", None, good)
    members += [("badutf8.png", good), ("badutf8.json", b'{"answer": "ok \xff\xfe"}')]
    members += [("surrogate.png", good), ("surrogate.json", b'{"answer": "\\ud800"}')]
    members += [("badjson.png", good), ("badjson.json", b'{"answer": ')]
    members += [("onlypng.png", good)]
    members += sample_members("toolong", "y" * (SEQ + 10), good)
    members += sample_members("huge", "x", png_bytes(300, 300, seed=1))
    members += sample_members("hinted", "mode hint", png_bytes(160, 96, seed=3), mode="debug-gundam")
    members += sample_members("convo", "4", prompt="What is 2+2?")  # text-only sample among images
    members += sample_members("twoimg", "x", good, prompt="<image><image>\nFree OCR.")
    valid += ["hinted", "convo"]
    path = write_tar(directory / "bad.tar", members)
    expected = {
        "bad_image": 3,
        "missing_image": 1,
        "empty_label": 3,
        "bad_utf8": 2,
        "bad_json": 1,
        "missing_json": 1,
        "too_long": 1,
        "too_many_pixels": 1,
        "bad_prompt": 1,
    }
    return str(path), valid, expected


def truncated_shard(directory):
    """A shard cut inside the image of its 4th sample: 3 valid samples, then damage."""
    members = []
    for i in range(5):
        members += sample_members(f"cut{i}", f"c{i}", png_bytes(64, 48, seed=20 + i))
    full = write_tar(directory / "full.tar", members).read_bytes()
    offset = 0
    for _name, payload in members[:6]:  # headers (512) + payloads padded to 512
        offset += 512 + -(-len(payload) // 512) * 512
    path = directory / "cut.tar"
    path.write_bytes(full[: offset + 512 + 100])
    return str(path), ["cut0", "cut1", "cut2"]


def config(shards, **overrides):
    source = SourceSpec("ocr", shards, modes={"debug": 1.0, "debug-pad": 1.0}, prompt="free_ocr")
    text = overrides.pop("text", None)
    sources = [source] + ([SourceSpec("txt", text, 0.3, prompt="", kind="text")] if text else [])
    base = {"sources": sources, "seq_len": SEQ, "batch_size": 2, "pack_buffer": 4, "max_pixels": 50_000}
    return LoaderConfig(**{**base, **overrides})


def keys_of(batches):
    return [key.split("/")[-1] for batch in batches for row in batch.keys for key in row]


def test_every_valid_sample_once_and_every_bad_one_counted(tmp_path, tokenizer):
    bad, valid, expected = bad_shard(tmp_path)
    cut, cut_valid = truncated_shard(tmp_path)
    texts = []
    for i in range(4):
        texts.append((f"t{i}.json", json.dumps({"text": f"plain text number {i}"}).encode()))
    texts.append(("tblank.json", b'{"text": "   "}'))
    text_shard = str(write_tar(tmp_path / "text.tar", texts))
    shards = [bad, cut, str(tmp_path / "missing.tar")]
    loader = StreamingLoader(
        config(shards, infinite=False, text=text_shard), tokenizer, dp_rank=0, dp_world=1
    )
    batches = list(loader)
    keys = keys_of(batches)
    assert sorted(keys) == sorted(valid + cut_valid + [f"t{i}" for i in range(4)])
    expected = {**expected, "truncated_sample": 1, "truncated_shard": 1, "missing_shard": 1}
    expected["empty_label"] += 1  # tblank
    assert loader.skip_counts == dict(sorted(expected.items()))
    for batch in batches:
        assert batch.input_ids.shape[1] == SEQ
        # every row's placeholders are matched by its images' layout
        per_row = (batch.input_ids == tokenizer.image_id).sum(dim=1)
        assert torch.equal(per_row, batch.row_counts) and int(per_row.sum()) == batch.gather_index.numel()
        assert loader.packing_efficiency < 1.0
    stats = loader.packing_stats
    assert stats.docs == len(keys) and stats.tokens == sum(b.num_tokens for b in batches)


def test_modes_fixed_sampled_and_hinted(tmp_path, tokenizer):
    bad, _, _ = bad_shard(tmp_path)
    cfg = config(bad)
    decoder = SampleDecoder(cfg, tokenizer, SkipCounter())
    ref = SampleRef(0, bad, "good0", {}, epoch=0, name="bad.tar")
    modes = {decoder.mode_for(SampleRef(0, bad, f"k{i}", {}, epoch=0, name="bad.tar")) for i in range(40)}
    assert modes == {"debug", "debug-pad"}
    assert decoder.mode_for(ref) == decoder.mode_for(ref)  # a pure function of the sample
    assert decoder.mode_for(ref, "debug-gundam") == "debug-gundam"  # the sample's hint wins
    assert decoder.mode_for(ref, "no-such-mode") in {"debug", "debug-pad"}
    fixed = StreamingLoader(
        config(bad, infinite=False, packing=False, sources=[SourceSpec("ocr", bad, modes="debug-pad")]),
        tokenizer,
        dp_rank=0,
        dp_world=1,
    )
    counts = {
        key.split("/")[-1]: int(count)
        for batch in fixed
        for (key,), count in zip(batch.keys, batch.row_counts)  # unpacked: one sample per row
    }
    assert counts.pop("convo") == 0  # a text-only sample's row has no image
    hinted = counts.pop("hinted")  # 160x96 in debug-gundam gets tiles
    tiled = {num_placeholders("debug-gundam", g) for g in candidate_grids(2, 9)}
    assert hinted in tiled and hinted > num_placeholders("debug-gundam")
    assert set(counts.values()) == {num_placeholders("debug-pad")}


@pytest.mark.parametrize("workers", [0, 1])  # in process, and through a DataLoader worker's shared memory
def test_batches_carry_uint8_views_with_the_decoded_pixels(tmp_path, tokenizer, workers):
    pngs = {f"u{i}": png_bytes(128, 128, seed=i) for i in range(3)}
    members = [m for key, png in pngs.items() for m in sample_members(key, f"text {key}", png)]
    shard = str(write_tar(tmp_path / "u8.tar", members))
    cfg = config(
        shard, infinite=False, num_workers=workers, sources=[SourceSpec("ocr", shard, modes="debug")]
    )
    seen = {}
    slot = view_sizes().index(128)
    for batch in StreamingLoader(cfg, tokenizer, dp_rank=0, dp_world=1):
        assert all(p.shape[0] == 0 for k, p in enumerate(batch.pixels) if k != slot)  # no tiles
        for key, view in zip(sum(batch.keys, []), batch.pixels[slot]):  # one image per sample, in order
            seen[key.split("/")[-1]] = view
    assert sorted(seen) == sorted(pngs)
    for key, view in seen.items():
        assert view.dtype == torch.uint8
        decoded = np.array(Image.open(io.BytesIO(pngs[key])).convert("RGB"))  # 128 px: "debug" keeps it
        assert torch.equal(view, torch.from_numpy(decoded).permute(2, 0, 1)), key


def test_unpacked_batches_pad_to_the_longest(tmp_path, tokenizer):
    paths = write_ocr_shards(tmp_path, num_shards=1, per_shard=5)
    cfg = config(paths, packing=False, pad_side="left", batch_size=3, infinite=False)
    batches = list(StreamingLoader(cfg, tokenizer, dp_rank=0, dp_world=1))
    assert [b.input_ids.shape[0] for b in batches] == [3, 2]
    for batch in batches:
        assert (batch.doc_ids[:, -1] == 0).all()  # left padding: every row ends with text
        assert batch.input_ids.shape[1] == int((batch.doc_ids == 0).sum(1).max())


@pytest.mark.parametrize("num_shards", [1, 5])  # sample split and shard split
def test_dp_ranks_see_disjoint_samples_covering_the_epoch(tmp_path, tokenizer, num_shards):
    paths = write_ocr_shards(tmp_path, num_shards=num_shards, per_shard=12 // num_shards + 1)
    everything = keys_of(StreamingLoader(config(paths, infinite=False), tokenizer, dp_rank=0, dp_world=1))
    ranks = [
        keys_of(StreamingLoader(config(paths, infinite=False), tokenizer, dp_rank=r, dp_world=2))
        for r in (0, 1)
    ]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(everything)
    assert len(everything) == len(set(everything)) == num_shards * (12 // num_shards + 1)


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys == y.keys
        for name in PackedBatch.TENSORS:
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert all(torch.equal(a, b) for a, b in zip(x.pixels, y.pixels))


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_batches_depend_on_dp_rank_not_on_the_global_rank(tmp_path, tokenizer, monkeypatch):
    paths = write_ocr_shards(tmp_path, num_shards=4, per_shard=6)
    monkeypatch.setenv("RANK", "0")
    first_stage = take(StreamingLoader(config(paths), tokenizer, dp_rank=1, dp_world=2), 3)
    monkeypatch.setenv("RANK", "7")  # the last stage of the same pipeline: same dp_rank
    last_stage = take(StreamingLoader(config(paths), tokenizer, dp_rank=1, dp_world=2), 3)
    assert_same_batches(first_stage, last_stage)
    other_rank = take(StreamingLoader(config(paths), tokenizer, dp_rank=0, dp_world=2), 3)
    # within epoch 0 (12 samples per rank) the two ranks read disjoint samples
    assert not set(keys_of(first_stage)[:12]) & set(keys_of(other_rank)[:12])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_exactly_the_next_batch(tmp_path, tokenizer, workers):
    bad, _, _ = bad_shard(tmp_path)
    paths = write_ocr_shards(tmp_path, num_shards=3, per_shard=5)
    text = str(write_tar(tmp_path / "text.tar", [(f"t{i}.json", b'{"text": "some text"}') for i in range(7)]))
    cfg = config([bad, *paths], num_workers=workers, batch_size=1, seq_len=160, text=text)
    loader = StreamingLoader(cfg, tokenizer, dp_rank=0, dp_world=1)
    head = take(loader, 5)  # stops after a batch of worker slot 0 (odd count with 2 workers)
    state = loader.state_dict()
    skips = loader.skip_counts
    reference = take(loader, 8)  # iterating again continues the stream
    assert keys_of(reference)[:3] != keys_of(head)[:3]  # continued, not restarted

    resumed = StreamingLoader(cfg, tokenizer, dp_rank=0, dp_world=1)
    path = tmp_path / "data_state.pt"
    torch.save(state, path)
    resumed.load_state_dict(torch.load(path, weights_only=True))  # plain types only
    assert resumed.skip_counts == skips
    assert_same_batches(take(resumed, 8), reference)
    assert resumed.skip_counts == loader.skip_counts
    with pytest.raises(ValueError, match="data-parallel layout"):
        StreamingLoader(cfg, tokenizer, dp_rank=0, dp_world=2).load_state_dict(state)


def test_a_mode_added_to_processing_modes_reaches_loader_layout_tokens_and_model(
    tmp_path, tokenizer, monkeypatch
):
    """An image mode is defined once (`processing.MODES`): a new one is accepted by the loader's
    config, processed, given its own view-size slot by the layout, counted in placeholders, and
    encoded by the model, with no other change."""
    from pipeline.model import build_model
    from pipeline.processing import MODES, ModeSpec

    monkeypatch.setitem(MODES, "test-192", ModeSpec("test-192", 192, 192, pad=True))
    assert 192 in view_sizes()
    paths = write_ocr_shards(tmp_path, num_shards=1, per_shard=3)
    cfg = config(paths, infinite=False, packing=False, sources=[SourceSpec("ocr", paths, modes="test-192")])
    batches = list(StreamingLoader(cfg, tokenizer, dp_rank=0, dp_world=1))
    slot = view_sizes().index(192)
    assert sum(b.pixels[slot].shape[0] for b in batches) == 3
    assert all(p.shape[0] == 0 for b in batches for k, p in enumerate(b.pixels) if k != slot)
    q = 192 // 64
    assert num_placeholders("test-192") == q * (q + 1) + 1  # a 3 x 3 grid, newlines, separator
    assert {int(c) for b in batches for c in b.row_counts} == {num_placeholders("test-192")}
    torch.manual_seed(0)
    model = build_model("debug", "debug", tokenizer.vocab_size, image_token_id=tokenizer.image_id)
    out = model(batches[0])
    assert torch.isfinite(out.loss) and out.num_label_tokens > 0


def test_skip_counts_count_each_bad_sample_once_over_epochs(tmp_path, tokenizer):
    bad, valid, expected = bad_shard(tmp_path)
    loader = StreamingLoader(config([bad], infinite=True), tokenizer, dp_rank=0, dp_world=1)
    batches = iter(loader)
    seen = []
    while len(seen) < 3 * len(valid) + 1:  # into the fourth epoch
        seen += keys_of([next(batches)])
    assert loader.skip_counts == dict(sorted(expected.items()))  # distinct bad samples
    encounters = loader.skip_encounters
    assert encounters.keys() == loader.skip_counts.keys()
    assert all(encounters[r] >= 3 * n for r, n in expected.items())  # met once per epoch
    resumed = StreamingLoader(config([bad], infinite=True), tokenizer, dp_rank=0, dp_world=1)
    resumed.load_state_dict(loader.state_dict())
    next(iter(resumed))
    assert resumed.skip_counts == loader.skip_counts
