"""Pipeline x data parallel layout: topology, stage partition and memory/FLOP estimates."""

from pipeline.parallel.partition import Partition, Stage, UnitCount, build_units, model_partition, partition
from pipeline.parallel.topology import DistEnv, Topology, dist_env, strip_local_rank_arg

__all__ = [
    "DistEnv",
    "Partition",
    "Stage",
    "Topology",
    "UnitCount",
    "build_units",
    "dist_env",
    "model_partition",
    "partition",
    "strip_local_rank_arg",
]
