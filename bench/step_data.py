"""Inputs of the full training-step benchmark: packed Base-mode page rows, copied off the critical path.

`make_batches` builds what the loader yields in stage 2 (architecture.md section 3-4): documents
= BOS + `<image>` placeholders of one page view + a prompt + the page text + EOS (loss on the
text and EOS), packed best-fit into rows of `seq_len` by the real packer and collate
(`pipeline.data.packing`, which computes the image layout and every count on the host). Pages
are rendered text pages (bench/bench_data.py) run through the real mode transform; text ids are
random (the vocabulary of the full model has no tokenizer here). `Prefetcher` pins batches in a
background thread and copies the next batch to the device on a side stream while the current
step runs.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Iterator

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
    return [process_image(load_rgb(render_page(rng, size, 0)[0]), mode) for _ in range(count)]


def make_documents(
    views: list[ImageViews],
    count: int,
    *,
    text_range: tuple[int, int],
    vocab_size: int,
    image_token_id: int,
    bos_id: int = 0,
    eos_id: int = 1,
    prompt_len: int = 6,
    seed: int = 0,
) -> list[Example]:
    """`count` one-page documents: BOS, placeholders, prompt (masked), text + EOS (labelled)."""
    lo, hi = text_range
    if not 0 < lo <= hi:
        raise ValueError(f"text_range must be 0 < lo <= hi, got {text_range}")
    rng = random.Random(seed)
    special = {bos_id, eos_id, image_token_id}
    ordinary = [i for i in range(min(vocab_size, 4096)) if i not in special] if vocab_size < 4096 else None

    def token() -> int:
        if ordinary is not None:
            return rng.choice(ordinary)
        while True:
            t = rng.randrange(vocab_size)
            if t not in special:
                return t

    docs = []
    for i in range(count):
        view = views[i % len(views)]
        prompt = [token() for _ in range(prompt_len)]
        text = [token() for _ in range(rng.randint(lo, hi))] + [eos_id]
        head = [bos_id] + [image_token_id] * view.num_placeholders + prompt
        docs.append(
            Example(
                input_ids=head + text,
                labels=[IGNORE_INDEX] * len(head) + text,
                images=[view],
                source="bench",
                key=f"page{i:05d}",
            )
        )
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


class Prefetcher:
    """Endless iterator of device PackedBatches over `batches` (cycled).

    A daemon thread pins batches into a small queue; on CUDA the copy of batch k+1
    is issued on a side stream right after batch k is handed out, and the compute stream waits
    on its event only when k+1 is taken, so neither staging nor the host-to-device copy sits
    on the step's critical path. `wait_s` accumulates the time the consumer blocked on the queue.
    """

    def __init__(
        self,
        batches: list[PackedBatch],
        device: torch.device,
        depth: int = 2,
    ) -> None:
        if not batches:
            raise ValueError("Prefetcher needs at least one batch")
        self.device = device
        self.cuda = device.type == "cuda"
        self.wait_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def work() -> None:
            k = 0
            while not self._stop.is_set():
                staged = batches[k % len(batches)]
                staged = staged.pin_memory() if self.cuda else staged
                while not self._stop.is_set():
                    try:
                        self._queue.put(staged, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                k += 1

        self._thread = threading.Thread(target=work, name="bench-prefetch", daemon=True)
        self._thread.start()
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._pending: tuple[PackedBatch, torch.cuda.Event | None] | None = None

    def _take(self) -> PackedBatch:
        import time

        start = time.perf_counter()
        staged = self._queue.get()
        self.wait_s += time.perf_counter() - start
        return staged

    def _issue(self) -> tuple[PackedBatch, torch.cuda.Event | None]:
        staged = self._take()
        if not self.cuda:
            return staged, None
        with torch.cuda.stream(self._stream):
            moved = staged.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return moved, event

    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        batch, event = self._pending if self._pending is not None else self._issue()
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in (*(getattr(batch, n) for n in PackedBatch.TENSORS), *batch.pixels):
                t.record_stream(current)  # the allocator must not recycle them before the step ends
        self._pending = self._issue()
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
