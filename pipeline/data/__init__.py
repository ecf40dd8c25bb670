"""Streaming data path: webdataset shard mixture -> decoded Examples -> packed PackedBatches.

config (LoaderConfig, SourceSpec, paper_mixture), shards (tar indexing, skip counts),
stream (deterministic resumable order, dp-rank/worker split, mixture), samples
(decode one sample), packing (best-fit rows, collates), loader (StreamingLoader).
"""

from pipeline.data.config import LoaderConfig, SourceSpec, from_run_config, paper_mixture
from pipeline.data.loader import ConsumerStream, StreamingLoader
from pipeline.data.packing import Packer, PackingStats, collate_packed, collate_unpacked
from pipeline.data.samples import SampleDecoder
from pipeline.data.shards import SkipCounter, expand_shards, index_shard

__all__ = [
    "ConsumerStream",
    "LoaderConfig",
    "Packer",
    "PackingStats",
    "SampleDecoder",
    "SkipCounter",
    "SourceSpec",
    "StreamingLoader",
    "collate_packed",
    "collate_unpacked",
    "expand_shards",
    "from_run_config",
    "index_shard",
    "paper_mixture",
]
