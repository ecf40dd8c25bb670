"""Inputs of the full training-step benchmark: packed Base-mode page rows.

`make_batches` builds what the loader yields in stage 2 (architecture.md section 3-4): documents
= BOS + `<image>` placeholders of one page view + a prompt + the page text + EOS (loss on the
text and EOS), packed best-fit into rows of `seq_len` by the real packer and collate
(`pipeline.data.packing`, which computes the image layout and every count on the host). Pages
are rendered text pages (bench/bench_data.py) run through the real mode transform; text ids are
random (the vocabulary of the full model has no tokenizer here).
"""

from __future__ import annotations

import random

import torch

from data_tools.images import load_rgb
from pipeline.batch import Example, ImageViews, PackedBatch
from pipeline.data.packing import IGNORE_INDEX, Packer, collate_packed
from pipeline.processing import get_mode, process_image


def render_views(mode: str, count: int, seed: int = 0) -> list[ImageViews]:
    """`count` rendered text pages (1024 px, ~40 lines) through the real `mode` transform."""
    from bench.bench_data import render_page

    rng = random.Random(seed)
    size = max(get_mode(mode).base_size, 256)
    return [process_image(load_rgb(render_page(rng, size)[0]), mode) for _ in range(count)]


def make_documents(views: list[ImageViews], count: int, *, text_range: tuple[int, int], vocab_size: int,
                   image_token_id: int, bos_id: int = 0, eos_id: int = 1, prompt_len: int = 6,
                   seed: int = 0) -> list[Example]:  # fmt: skip
    """`count` one-page documents: BOS, placeholders, prompt (masked), text + EOS (labelled)."""
    lo, hi = text_range
    if not 0 < lo <= hi:
        raise ValueError(f"text_range must be 0 < lo <= hi, got {text_range}")
    rng = random.Random(seed)
    special = {bos_id, eos_id, image_token_id}

    def token() -> int:  # uniform over the ids that are not special
        while (t := rng.randrange(vocab_size)) in special:
            pass
        return t

    docs = []
    for i in range(count):
        view = views[i % len(views)]
        prompt = [token() for _ in range(prompt_len)]
        text = [token() for _ in range(rng.randint(lo, hi))] + [eos_id]
        head = [bos_id] + [image_token_id] * view.num_placeholders + prompt
        docs.append(Example(input_ids=head + text, labels=[IGNORE_INDEX] * len(head) + text, images=[view],
                            source="bench", key=f"page{i:05d}"))  # fmt: skip
    return docs


def make_batches(
    docs: list[Example], seq_len: int, micro_batch: int, pad_id: int, image_token_id: int
) -> list[PackedBatch]:
    """Pack the documents best-fit (16-sample look-ahead) into (micro_batch, seq_len) PackedBatches."""
    too_long = [d.key for d in docs if len(d) > seq_len]
    if too_long:
        raise ValueError(f"{len(too_long)} documents are longer than seq_len={seq_len}: lower text_range")
    stream = iter(docs)
    packer: Packer[Example] = Packer(seq_len, 16, len)
    rows = []
    while (row := packer.next_row(lambda: next(stream, None))) is not None:
        rows.append(row)
    usable = len(rows) - len(rows) % micro_batch
    if usable == 0:
        raise ValueError(f"{len(docs)} documents fill {len(rows)} rows, fewer than micro_batch={micro_batch}")
    return [
        collate_packed(rows[i : i + micro_batch], seq_len, pad_id, image_token_id)
        for i in range(0, usable, micro_batch)
    ]


def flop_inputs(batch: PackedBatch) -> tuple[list[int], list[int]]:
    """(view sides of every view, document lengths) of a batch, for `bench.measure.full_step_flops`."""
    sides = [p.shape[-1] for p in batch.pixels for _ in range(p.shape[0])]
    lengths = []
    for row in batch.doc_ids:
        lengths += [int(c) for c in torch.bincount(row[row >= 0]) if c > 0]
    return sides, lengths
