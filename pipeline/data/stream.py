"""Deterministic, resumable sample order for one source and the weighted mixture of sources.

Why not webdataset's pipeline: its node/worker splitting reads the *global* rank from
RANK/WORLD_SIZE (wrong under pipeline parallelism, where every stage of one pipeline
must see the same batch: ../shared/spec/engine_notes.md), and its shuffle buffer and
resampled shard iterator carry state that cannot be saved, so a resumed run would
skip or repeat samples. Here the order is a pure function of (seed, source, epoch):

- epoch e of a source = its shards in a seeded permutation, and inside each shard its
  samples in a seeded permutation (tar random access, `pipeline.data.shards`);
- the stream is split over `num_consumers = dp_world * num_workers` consumers,
  consumer `c = dp_rank * num_workers + worker`. `split="shard"` gives consumer c the
  shards at permuted positions p % num_consumers == c (reads only its own shards);
  `split="sample"` walks all shards and keeps the samples at epoch positions
  g % num_consumers == c (for sources with fewer shards than consumers). "auto" picks
  "shard" when a source has at least as many shards as consumers. Either way the
  consumers of an epoch see disjoint samples that together cover it;
- shards are known by their path relative to the source's root (`shard_names`): the
  permutations are seeded with those names, so the order does not depend on where the
  shards lie;
- the position is (epoch, shard_pos, sample_pos, base): resuming re-indexes one
  shard and continues with exactly the next sample. Infinite streams start a new
  permutation each epoch (resampling); finite streams stop after epoch 0.

`MixtureStream` draws a source for each sample with weights from a counter-based
RNG (draw n of consumer c is seeded by (seed, c, n)), so its state is one integer
per consumer. A failed sample is retried from the *same* source, so the mixture
proportions hold over valid samples. A source with `start_after = S` (a curriculum)
takes part from draw ceil(S / num_consumers) of each consumer on: the run has drawn
about S samples from the other sources by then.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate

from pipeline.batch import Example
from pipeline.data.config import LoaderConfig
from pipeline.data.shards import SampleEntry, SkipCounter, expand_shards, index_shard


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from the parts' string forms (independent of PYTHONHASHSEED)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def shard_names(paths: list[str]) -> tuple[str, list[str]]:
    """(root, names): the deepest directory holding every shard, and each shard's path relative
    to it, sorted. Order and saved positions use the names only, so a run reads the same
    samples in the same order wherever its shards lie (another out_dir, a moved run directory)."""
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return root, sorted(os.path.relpath(p, root) for p in absolute)


@dataclass
class SampleRef:
    """Where one sample lives: enough to re-read and re-decode it identically.

    `name` is the shard's path relative to its source's root (what a saved state holds),
    `shard` the path it is read from now."""

    source: int
    shard: str
    key: str
    files: dict[str, tuple[int, int]]
    epoch: int
    name: str

    def to_state(self) -> dict:
        return {
            "source": self.source,
            "name": self.name,
            "key": self.key,
            "files": {ext: list(pos) for ext, pos in self.files.items()},
            "epoch": self.epoch,
        }


class SourceStream:
    """The sample references of one source that belong to one consumer, in epoch order."""

    def __init__(
        self,
        index: int,
        name: str,
        root: str,
        shards: list[str],
        *,
        seed: int,
        consumer: int,
        num_consumers: int,
        shuffle: bool,
        infinite: bool,
        split: str,
        skips: SkipCounter,
    ) -> None:
        if not 0 <= consumer < num_consumers:
            raise ValueError(f"consumer {consumer} out of range for {num_consumers} consumers")
        self.index, self.name, self.root, self.shards = index, name, root, shards
        self.seed, self.consumer, self.num_consumers = seed, consumer, num_consumers
        self.shuffle, self.infinite, self.skips = shuffle, infinite, skips
        if split == "auto":
            split = "shard" if len(shards) >= num_consumers else "sample"
        self.split = split
        self.epoch = self.shard_pos = self.sample_pos = self.base = 0
        self._cached: tuple[tuple[int, int], list[SampleEntry]] | None = None

    def _epoch_shards(self, epoch: int) -> list[str]:
        order = list(self.shards)
        if self.shuffle:
            random.Random(stable_seed(self.seed, self.name, epoch, "shards")).shuffle(order)
        if self.split == "shard":
            order = order[self.consumer :: self.num_consumers]
        return order

    def path(self, shard: str) -> str:
        return os.path.join(self.root, shard)

    def _entries(self, shard: str) -> list[SampleEntry]:
        where = (self.epoch, self.shard_pos)
        if self._cached is None or self._cached[0] != where:
            entries = index_shard(self.path(shard), self.skips)
            if self.shuffle:
                random.Random(stable_seed(self.seed, self.name, self.epoch, shard)).shuffle(entries)
            self._cached = (where, entries)
        return self._cached[1]

    def next(self) -> SampleRef | None:
        """The next reference of this consumer, or None when a finite stream is exhausted."""
        boundaries = 0
        while True:
            shards = self._epoch_shards(self.epoch)
            if self.shard_pos >= len(shards):
                if not self.infinite:
                    return None
                boundaries += 1
                if boundaries >= 2:
                    raise ValueError(
                        f"source {self.name!r} has no readable sample for consumer {self.consumer} of "
                        f"{self.num_consumers} in a whole epoch ({len(self.shards)} shards, split="
                        f"{self.split!r}); check the shard paths or use fewer workers/ranks"
                    )
                self.epoch, self.shard_pos, self.sample_pos, self.base = self.epoch + 1, 0, 0, 0
                continue
            shard = shards[self.shard_pos]
            entries = self._entries(shard)
            while self.sample_pos < len(entries):
                position = self.base + self.sample_pos
                entry = entries[self.sample_pos]
                self.sample_pos += 1
                if self.split == "sample" and position % self.num_consumers != self.consumer:
                    continue
                return SampleRef(
                    self.index, self.path(shard), entry.key, dict(entry.files), self.epoch, shard
                )
            self.base += len(entries)
            self.shard_pos, self.sample_pos = self.shard_pos + 1, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "sample_pos": self.sample_pos,
            "base": self.base,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.shard_pos = int(state["epoch"]), int(state["shard_pos"])
        self.sample_pos, self.base = int(state["sample_pos"]), int(state["base"])
        self._cached = None


@dataclass
class MixtureStream:
    """Weighted draws over the sources of `config`; decodes each reference into an Example.

    `decode(ref)` returns None for a bad sample (it counts and logs the reason); the
    stream then takes the next sample of the same source.
    """

    config: LoaderConfig
    decode: Callable[[SampleRef], Example | None]
    consumer: int
    num_consumers: int
    skips: SkipCounter
    draws: int = 0
    sources: list[SourceStream] = field(init=False)
    exhausted: set[int] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        cfg = self.config
        self.sources = [
            SourceStream(
                i,
                spec.name,
                *shard_names(expand_shards(spec.shards)),
                seed=cfg.seed,
                consumer=self.consumer,
                num_consumers=self.num_consumers,
                shuffle=cfg.shuffle,
                infinite=cfg.infinite,
                split=cfg.split,
                skips=self.skips,
            )
            for i, spec in enumerate(cfg.sources)
        ]

    def _joined(self, index: int) -> bool:
        start = self.config.sources[index].start_after
        return self.draws >= -(-start // self.num_consumers)  # ceil: this consumer's share of S

    def _draw(self, active: list[int]) -> int:
        weights = list(accumulate(self.config.sources[i].weight for i in active))
        u = random.Random(stable_seed(self.config.seed, "mixture", self.consumer, self.draws)).random()
        self.draws += 1
        return active[min(bisect.bisect_right(weights, u * weights[-1]), len(active) - 1)]

    def next(self) -> tuple[Example, SampleRef] | None:
        """The next valid example and its reference, or None when every finite source is exhausted."""
        while True:
            remaining = [i for i in range(len(self.sources)) if i not in self.exhausted]
            if not remaining:
                return None
            # a finite stream whose early sources ran out lets the waiting ones join at once
            active = [i for i in remaining if self._joined(i)] or remaining
            source = self.sources[self._draw(active)]
            start_epoch = source.epoch
            while True:
                ref = source.next()
                if ref is None:
                    self.exhausted.add(source.index)
                    break
                example = self.decode(ref)
                if example is not None:
                    return example, ref
                if source.epoch > start_epoch + 1:
                    raise ValueError(
                        f"source {source.name!r}: no valid sample in a whole epoch for consumer "
                        f"{self.consumer} (skip counts: {self.skips.as_dict()})"
                    )

    def ref_from_state(self, state: dict) -> SampleRef:
        """The reference `SampleRef.to_state` saved, read from where its source's shards are now."""
        source = self.sources[int(state["source"])]
        files = {ext: (int(pos[0]), int(pos[1])) for ext, pos in state["files"].items()}
        name = state["name"]
        return SampleRef(source.index, source.path(name), state["key"], files, int(state["epoch"]), name)

    def state_dict(self) -> dict:
        return {
            "draws": self.draws,
            "exhausted": sorted(self.exhausted),
            "sources": {s.name: s.state_dict() for s in self.sources},
        }

    def load_state_dict(self, state: dict) -> None:
        names = {s.name for s in self.sources}
        if set(state["sources"]) != names:
            raise ValueError(
                f"data state has sources {sorted(state['sources'])}, the config has {sorted(names)}; "
                "resuming with a different mixture cannot continue the saved position"
            )
        self.draws = int(state["draws"])
        self.exhausted = set(state["exhausted"])
        for source in self.sources:
            source.load_state_dict(state["sources"][source.name])
