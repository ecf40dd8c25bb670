"""The streaming loader of one data-parallel rank: mixture -> decode -> pack -> PackedBatch.

`StreamingLoader(config, tokenizer, dp_rank=, dp_world=)` is an endless (or, with
`infinite=False`, one-pass) iterable of `PackedBatch`es. The data-parallel rank and
world are explicit arguments and the environment (RANK, WORLD_SIZE) is never read:
under pipeline parallelism every stage of one pipeline passes the same dp_rank and
therefore gets identical batches (../shared/spec/engine_notes.md, data sharding).

Workers: with `num_workers = W > 0` a torch DataLoader runs W consumers; consumer
`c = dp_rank * W + slot` owns its share of every source (`pipeline.data.stream`) and
builds whole batches (packing happens in the worker). The DataLoader returns worker
outputs strictly round-robin, each batch carrying its consumer's state *after* that
batch; the loader keeps the state of the last batch it handed out per consumer.

Exact resume: `state_dict()` = per consumer {mixture draws, per-source position,
references of the samples waiting in the packing buffer, skip counts, packing
totals} + the slot whose batch comes next. `load_state_dict()` restores them; the
buffered samples are re-read by reference and re-decoded (deterministically), and
worker w of the new DataLoader runs slot (w + next_slot) % W, so the round-robin
order continues where it stopped: the resumed stream is batch-for-batch the stream
that was interrupted. Iterating the loader again also continues (it never restarts).

`skip_counts`: each distinct bad sample or shard once, however many epochs or consumers
meet it; `skip_encounters`: every time one was met (a bad sample once per epoch, a bad
shard once per consumer that opens it per epoch).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.batch import Example, PackedBatch
from pipeline.data.config import LoaderConfig
from pipeline.data.packing import Packer, PackingStats, collate_packed, collate_unpacked
from pipeline.data.samples import SampleDecoder
from pipeline.data.shards import SkipCounter, merge_skip_states
from pipeline.data.stream import MixtureStream, SampleRef
from pipeline.tokenizer import OCRTokenizer

STATE_VERSION = 2  # 2: buffered references hold shard names relative to the source root


class ConsumerStream:
    """Batches of one consumer (one rank's worker slot), with a resumable state."""

    def __init__(
        self,
        config: LoaderConfig,
        tokenizer: OCRTokenizer,
        consumer: int,
        num_consumers: int,
        state: dict | None = None,
    ) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.consumer, self.num_consumers = consumer, num_consumers
        self.skips = SkipCounter()
        self.stats = PackingStats()
        self.decoder = SampleDecoder(config, tokenizer, self.skips)
        self.mixture = MixtureStream(config, self.decoder, consumer, num_consumers, self.skips)
        self.packer: Packer[tuple[Example, SampleRef]] = Packer(
            config.seq_len, config.pack_buffer, lambda item: len(item[0])
        )
        if state is not None:
            self.load_state_dict(state)

    def __iter__(self) -> Iterator[PackedBatch]:
        cfg = self.config
        while True:
            if cfg.packing:
                rows = []
                while (
                    len(rows) < cfg.batch_size
                    and (row := self.packer.next_row(self.mixture.next)) is not None
                ):
                    rows.append([example for example, _ in row])
                if not rows:
                    return
                batch = collate_packed(rows, cfg.seq_len, self.tokenizer.pad_id, self.tokenizer.image_id)
            else:
                examples = []
                while len(examples) < cfg.batch_size and (item := self.mixture.next()) is not None:
                    examples.append(item[0])
                if not examples:
                    return
                batch = collate_unpacked(examples, self.tokenizer.pad_id, self.tokenizer.image_id, cfg.pad_side)
            self.stats.update(batch)
            yield batch

    def state_dict(self) -> dict:
        return {
            "consumer": self.consumer,
            "mixture": self.mixture.state_dict(),
            "buffer": [ref.to_state() for _, ref in self.packer.buffer],
            "ended": self.packer.ended,
            "skips": self.skips.state(),
            "packing": self.stats.as_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["consumer"] != self.consumer:
            raise ValueError(f"state of consumer {state['consumer']} loaded into consumer {self.consumer}")
        self.mixture.load_state_dict(state["mixture"])
        restored = SkipCounter(state["skips"])
        self.skips.counts, self.skips.unique = restored.counts, restored.unique
        self.stats = PackingStats(**state["packing"])
        self.packer.buffer, self.packer.ended = [], bool(state["ended"])
        for ref_state in state["buffer"]:
            ref = self.mixture.ref_from_state(ref_state)
            example = self.decoder(ref)  # decoded fine before the checkpoint; None only if the shard changed
            if example is not None:
                self.packer.buffer.append((example, ref))


class _WorkerStreams(IterableDataset):
    """DataLoader view: worker w runs slot (w + rotation) % W and yields (batch, slot, state)."""

    def __init__(self, loader: StreamingLoader, rotation: int) -> None:
        self.config, self.tokenizer = loader.config, loader.tokenizer
        self.dp_rank, self.dp_world, self.workers = loader.dp_rank, loader.dp_world, loader.workers
        self.states, self.rotation = dict(loader.consumer_states), rotation

    def __iter__(self) -> Iterator[tuple[PackedBatch, int, dict]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = (worker + self.rotation) % self.workers
        stream = ConsumerStream(
            self.config,
            self.tokenizer,
            self.dp_rank * self.workers + slot,
            self.dp_world * self.workers,
            self.states.get(slot),
        )
        for batch in stream:
            yield batch, slot, stream.state_dict()


class StreamingLoader:
    """Iterable of PackedBatch for one data-parallel rank; see the module docstring.

    skip_counts: skipped samples by reason, summed over this rank's consumers.
    packing_efficiency: non-pad fraction of the rows handed out so far.
    """

    def __init__(self, config: LoaderConfig, tokenizer: OCRTokenizer, *, dp_rank: int, dp_world: int) -> None:
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ValueError(f"need 0 <= dp_rank < dp_world, got dp_rank={dp_rank}, dp_world={dp_world}")
        self.config, self.tokenizer = config, tokenizer
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.workers = max(config.num_workers, 1)
        self.consumer_states: dict[int, dict] = {}
        self.next_slot = 0
        self._local: ConsumerStream | None = None

    def __iter__(self) -> Iterator[PackedBatch]:
        cfg = self.config
        if cfg.num_workers == 0:
            if self._local is None:
                self._local = ConsumerStream(
                    cfg, self.tokenizer, self.dp_rank, self.dp_world, self.consumer_states.get(0)
                )
            for batch in self._local:
                self.consumer_states[0] = self._local.state_dict()
                yield batch
            return
        loader = DataLoader(
            _WorkerStreams(self, self.next_slot),
            batch_size=None,
            num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch_factor,
            in_order=True,
        )
        for batch, slot, state in loader:
            self.consumer_states[slot] = state
            self.next_slot = (slot + 1) % self.workers
            yield batch

    @property
    def skip_counts(self) -> dict[str, int]:
        """Distinct bad samples (and shards) by reason over this rank's consumers."""
        return merge_skip_states([state["skips"] for state in self._states()]).as_dict()

    @property
    def skip_encounters(self) -> dict[str, int]:
        """How often bad samples were met by reason (a bad sample once per epoch)."""
        return merge_skip_states([state["skips"] for state in self._states()]).encounters()

    @property
    def packing_stats(self) -> PackingStats:
        total = PackingStats()
        for state in self._states():
            for name, value in state["packing"].items():
                setattr(total, name, getattr(total, name) + value)
        return total

    @property
    def packing_efficiency(self) -> float:
        return self.packing_stats.efficiency

    def _states(self) -> list[dict]:
        return list(self.consumer_states.values())

    def state_dict(self) -> dict:
        """The position after the last batch handed out (plain Python types; torch.save-able)."""
        return {
            "version": STATE_VERSION,
            "seed": self.config.seed,
            "dp_rank": self.dp_rank,
            "dp_world": self.dp_world,
            "num_workers": self.config.num_workers,
            "next_slot": self.next_slot,
            "consumers": {int(slot): state for slot, state in self.consumer_states.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; the layout (seed, dp rank/world, workers) must match."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} != {STATE_VERSION}")
        mine = {
            "seed": self.config.seed,
            "dp_rank": self.dp_rank,
            "dp_world": self.dp_world,
            "num_workers": self.config.num_workers,
        }
        saved = {k: state[k] for k in mine}
        if saved != mine:
            raise ValueError(
                f"data state was saved with {saved}, this loader has {mine}; an exact resume needs the "
                "same seed, data-parallel layout and worker count (or start the data stream afresh)"
            )
        self.consumer_states = {int(slot): s for slot, s in state["consumers"].items()}
        self.next_slot = int(state["next_slot"])
        self._local = None
