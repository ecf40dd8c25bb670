"""Topology arithmetic, DeepSpeed's rank layout, launcher environment and argv handling."""

import pytest

from pipeline.parallel.topology import DistEnv, Topology, dist_env, strip_local_rank_arg


@pytest.mark.unit
def test_paper_topology_derives_dp_and_accumulation():
    t = Topology(world_size=160, pp=4, micro_batch=1, global_batch=640)
    assert (t.dp, t.grad_accum) == (40, 16)
    assert t.deepspeed_batch_config() == {
        "train_batch_size": 640,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 16,
    }
    assert t.bubble_fraction == pytest.approx(3 / 19)
    # the same global batch on one node of 8 and on one GPU: only the accumulation changes
    assert Topology(8, 4, 1, 640).grad_accum == 320
    assert Topology(1, 1, 1, 640).grad_accum == 640


@pytest.mark.unit
def test_rank_layout_matches_deepspeed_pipe_data_topology():
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    t = Topology(world_size=12, pp=3, micro_batch=1, global_batch=8)
    ds = PipeDataParallelTopology(num_pp=3, num_dp=4)
    for rank in range(12):
        coord = ds.get_coord(rank)
        assert (t.stage(rank), t.dp_rank(rank)) == (coord.pipe, coord.data)
        assert t.rank_of(t.stage(rank), t.dp_rank(rank)) == rank
    assert t.stage_ranks(1) == [4, 5, 6, 7]
    assert t.pipeline_ranks(2) == [2, 6, 10]
    assert t.logging_rank() == 8 and t.is_last_stage(8) and not t.is_last_stage(7)
    with pytest.raises(ValueError, match="outside"):
        t.stage(12)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world_size": 6, "pp": 4, "micro_batch": 1, "global_batch": 8}, r"parallel\.pp=4 does not divide"),
        ({"world_size": 24, "pp": 4, "micro_batch": 1, "global_batch": 640}, r"636 or 642"),
        ({"world_size": 8, "pp": 2, "micro_batch": 3, "global_batch": 16}, r"multiple of 12"),
        ({"world_size": 80, "pp": 4, "micro_batch": 1, "global_batch": 640, "dp": 40}, r"parallel\.dp=null"),
        ({"world_size": 0, "pp": 1, "micro_batch": 1, "global_batch": 8}, r"world_size must be"),
        ({"world_size": 4, "pp": 1, "micro_batch": 1, "global_batch": 2}, r"multiple of 4"),
    ],
)
def test_invalid_layouts_name_the_field_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Topology(**kwargs)


@pytest.mark.unit
def test_dist_env_reads_the_environment():
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu01",
        "MASTER_PORT": "29511",
        "GROUP_RANK": "1",
    }
    assert dist_env(env) == DistEnv(5, 1, 8, 4, "gpu01", 29511, 1)
    # the deepspeed launcher's names
    ds = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1"}
    got = dist_env(ds)
    assert (got.local_world_size, got.node_rank, got.master_addr, got.master_port) == (
        2,
        1,
        "127.0.0.1",
        29500,
    )
    single = dist_env({})
    assert (single.rank, single.world_size, single.distributed) == (0, 1, False)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "0"}, "RANK and WORLD_SIZE"),
        ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, r"RANK=4 must lie"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "LOCAL_RANK is not set"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "must be an integer"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2"),
        ({"MASTER_PORT": "70000"}, "not a TCP port"),
    ],
)
def test_dist_env_rejects_broken_launcher_environments(env, message):
    with pytest.raises(ValueError, match=message):
        dist_env(env)


@pytest.mark.unit
def test_strip_local_rank_arg_removes_only_the_launcher_flag():
    argv = ["experiment=paper_stage2", "--local_rank=3", "optim.lr=1e-4", "--local-rank", "2", "name=x"]
    assert strip_local_rank_arg(argv) == ["experiment=paper_stage2", "optim.lr=1e-4", "name=x"]
    assert strip_local_rank_arg(["--local_rank", "train.max_steps=5"]) == ["train.max_steps=5"]
    assert strip_local_rank_arg(["--local_rankings=1", "a=1"]) == ["--local_rankings=1", "a=1"]
