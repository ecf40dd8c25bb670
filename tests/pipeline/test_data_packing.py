"""Best-fit packing and the packed/unpacked collates (pipeline/data/packing.py)."""

import random

import pytest
import torch

from pipeline.batch import Example, ImageViews
from pipeline.data.packing import Packer, PackingStats, collate_packed, collate_unpacked
from pipeline.processing import view_sizes

pytestmark = pytest.mark.unit
PAD, IMG = 2, 7
PER_VIEW = 3  # placeholders of one 64 x 64 view: q * (q + 1) + 1 with q = 1


def doc(n, tag, *, n_images=0, prompt=1):
    """n tokens with value tag*100+i, the first 3 * n_images of them `<image>` placeholders of
    64 x 64 views whose pixels are tag*10+j; the first `prompt` labels masked."""
    ids = [tag * 100 + i for i in range(n)]
    ids[: PER_VIEW * n_images] = [IMG] * (PER_VIEW * n_images)
    labels = [-100] * max(prompt, PER_VIEW * n_images) + ids[max(prompt, PER_VIEW * n_images) :]
    images = [
        ImageViews(torch.full((3, 64, 64), tag * 10 + j, dtype=torch.uint8), num_placeholders=PER_VIEW)
        for j in range(n_images)
    ]
    return Example(ids, labels, images, source="s", key=str(tag))


def run_packer(lengths, seq_len, buffer):
    items = iter(range(len(lengths)))
    packer = Packer(seq_len, buffer, lambda i: lengths[i])
    rows = []
    while (row := packer.next_row(lambda: next(items, None))) is not None:
        rows.append(row)
    return rows


def test_packer_emits_every_item_once_within_the_row_length():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    rows = run_packer(lengths, 128, buffer=16)
    flat = [i for row in rows for i in row]
    assert sorted(flat) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    # every row starts with the oldest item not yet packed (no starvation)
    done = set()
    for row in rows:
        assert row[0] == min(set(range(500)) - done)
        done.update(row)
    used = sum(lengths) / (128 * len(rows))
    assert used > 0.965  # best-fit with a 16-item look-ahead on 1..100-token docs (first-fit: 0.93)
    assert used > sum(lengths) / (128 * len(run_packer(lengths, 128, buffer=1)))  # beats no look-ahead


def test_packer_without_lookahead_is_greedy_in_order():
    assert run_packer([60, 50, 30, 70, 10], 100, buffer=1) == [[0], [1, 2], [3, 4]]
    assert run_packer([60, 50, 30, 70, 10], 100, buffer=4) == [[0, 2, 4], [1], [3]]


def test_collate_packed_layout_matches_hand_built_rows():
    a, b, c = doc(3, 1), doc(4, 2), doc(5, 3)
    batch = collate_packed([[a, b], [c]], seq_len=8, pad_id=PAD, image_token_id=IMG)
    assert batch.input_ids.tolist() == [
        [100, 101, 102, 200, 201, 202, 203, PAD],
        [300, 301, 302, 303, 304, PAD, PAD, PAD],
    ]
    assert batch.labels.tolist() == [
        [-100, 101, 102, -100, 201, 202, 203, -100],
        [-100, 301, 302, 303, 304, -100, -100, -100],
    ]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 0, 0]]
    assert batch.doc_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, -1], [0, 0, 0, 0, 0, -1, -1, -1]]
    assert batch.keys == [["s/1", "s/2"], ["s/3"]]
    assert batch.num_tokens == 12 and batch.num_documents == 3
    # loss positions: t whose next label is set; targets are those labels
    assert batch.loss_positions.tolist() == [0, 1, 3, 4, 5, 8, 9, 10, 11]
    assert batch.loss_targets.tolist() == [101, 102, 201, 202, 203, 301, 302, 303, 304]
    assert batch.num_label_tokens == 9


def test_collate_packed_places_images_in_row_order():
    a, b, c = doc(4, 1, n_images=1), doc(7, 2, n_images=2), doc(5, 3)
    batch = collate_packed([[a, b], [c]], seq_len=12, pad_id=PAD, image_token_id=IMG)
    slot = view_sizes().index(64)
    assert batch.pixels[slot][:, 0, 0, 0].tolist() == [10, 20, 21]
    assert all(p.shape[0] == 0 for k, p in enumerate(batch.pixels) if k != slot)
    assert batch.image_positions.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    # view j: feature j, then newline (3), then separator (4): table = 3 features + newline + separator
    assert batch.gather_index.tolist() == [0, 3, 4, 1, 3, 4, 2, 3, 4]
    assert batch.row_counts.tolist() == [9, 0] and batch.num_images == 3


def test_collate_packed_masks_the_first_label_of_each_document():
    unmasked = doc(3, 4, prompt=0)  # a producer that did not mask the first label
    batch = collate_packed([[doc(2, 1), unmasked]], seq_len=6, pad_id=PAD, image_token_id=IMG)
    assert batch.labels.tolist() == [[-100, 101, -100, 401, 402, -100]]
    with pytest.raises(ValueError, match="seq_len"):
        collate_packed([[doc(4, 1), doc(4, 2)]], seq_len=6, pad_id=PAD, image_token_id=IMG)


def test_packing_stats_efficiency():
    stats = PackingStats()
    stats.update(
        collate_packed([[doc(3, 1), doc(4, 2)], [doc(5, 3)]], seq_len=8, pad_id=PAD, image_token_id=IMG)
    )
    assert (stats.docs, stats.rows, stats.tokens, stats.slots) == (3, 2, 12, 16)
    assert stats.efficiency == pytest.approx(0.75)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_unpacked_pads_to_the_longest(side):
    batch = collate_unpacked(
        [doc(2, 1), doc(4, 2, n_images=1)], pad_id=PAD, image_token_id=IMG, pad_side=side
    )
    row0 = [100, 101, PAD, PAD] if side == "right" else [PAD, PAD, 100, 101]
    assert batch.input_ids.tolist() == [row0, [IMG, IMG, IMG, 203]]
    real = batch.doc_ids[0] == 0
    assert batch.position_ids[0][real].tolist() == [0, 1]
    assert batch.labels[0][~real].tolist() == [-100, -100]
    assert batch.doc_ids[1].tolist() == [0, 0, 0, 0]
    assert batch.row_counts.tolist() == [0, PER_VIEW] and batch.image_positions.tolist() == [4, 5, 6]
