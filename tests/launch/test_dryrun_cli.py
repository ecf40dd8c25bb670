"""`dsocr-dryrun`: the paper preset fits A100-40G; layouts that do not divide or fit are refused."""

import re

import pytest

from pipeline.cli.dryrun import compose_config, dry_run, main, parse_args, resolve_cluster
from pipeline.config import to_run_config
from pipeline.parallel.memory import GIB, ClusterSpec


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.unit
def test_paper_stage2_fits_a100_40g(capsys):
    rc, out, err = run_cli(
        capsys,
        "experiment=paper_stage2",
        "cluster.nodes=20",
        "cluster.gpus_per_node=8",
        "cluster.gpu_mem_gb=40",
    )
    assert rc == 0, err
    assert "20 node(s) x 8 GPU(s) = 160, 40 GiB" in out
    assert "PP 4 x DP 40; micro-batch 1, grad accumulation 16, global batch 640" in out
    assert "seq_len 8192" in out and "bf16" in out
    assert "parts [0, 1, 2, 8, 15]" in out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d\s+\d", line)]
    assert len(rows) == 4 and all(line.split()[7] == "fits" for line in rows)
    assert "decoder.6-11 + head" in out and "step FLOPs" in out


@pytest.mark.unit
def test_preset_shape_is_the_default_cluster():
    run = to_run_config(compose_config(["experiment=paper_stage2"]))
    cluster = resolve_cluster(run, {})
    assert (cluster.nodes, cluster.gpus_per_node, cluster.gpu_mem_gb) == (20, 8, 40.0)
    plan = dry_run(run, cluster)
    assert plan.fits and max(m.total for m in plan.memory) < 38 * GIB
    # the largest stage is the last one (logits over a 129,280-token vocabulary)
    assert max(plan.memory, key=lambda m: m.total).stage == 3
    node8 = to_run_config(compose_config(["experiment=node8_stage2"]))
    assert (resolve_cluster(node8, {}).world_size, dry_run(node8, resolve_cluster(node8, {})).fits) == (
        8,
        True,
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # one GPU of 40 GiB cannot hold 3.2B trainable parameters with Adam
        (["experiment=gpu1_stage2"], r"stage 0 .* needs ~\d+\.\d GiB, more than the 38\.0 GiB usable"),
        # the preset pins DP 40: half the cluster is refused, with the fix
        (["experiment=paper_stage2", "cluster.nodes=10"], r"parallel\.dp=40 with parallel\.pp=4 needs 160"),
        # 24 GPUs / PP 4 = DP 6 does not divide 640
        (["experiment=paper_stage2", "parallel.dp=null", "cluster.nodes=3"], r"not divisible .* 636 or 642"),
        (["experiment=paper_stage2", "parallel.pp=16", "parallel.dp=10"], r"exceeds the 15 pipeline units"),
        (["experiment=paper_stage2", "data.seq_len=16384"], r"max_position_embeddings=8192"),
        (
            # 4 rows of whole-row logits (4 x 8192 x 129,280) on the last stage; chunked, it fits
            ["experiment=paper_stage2", "parallel.micro_batch=4", "parallel.loss_chunk_tokens=0"],
            r"stage 3 .* needs",
        ),
        (["experiment=paper_stge2"], r"unknown experiment 'paper_stge2'"),
        (["experiment=paper_stage2", "cluster.gpus=8"], r"unknown dry-run option"),
        (["experiment=paper_stage2", "parallel.zero_stage=3"], r"ZeRO 0 or 1"),
        (["model=full", "parallel=pp4"], r"parallel\.dp is not pinned"),
    ],
)
def test_impossible_layouts_are_refused(capsys, argv, message):
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2
    assert re.search(message, err), err


@pytest.mark.unit
def test_gpu1_preset_fits_an_80g_gpu(capsys):
    rc, out, err = run_cli(capsys, "experiment=gpu1_stage2", "cluster.gpu_mem_gb=80")
    assert rc == 0, err
    assert "PP 1 x DP 1; micro-batch 1, grad accumulation 640, global batch 640" in out


@pytest.mark.unit
def test_parse_args_separates_dry_run_keys():
    own, overrides = parse_args(["cluster.nodes=2", "estimate.vision_fraction=0.25", "optim.lr=1e-4"])
    assert own == {"cluster.nodes": 2, "estimate.vision_fraction": 0.25}
    assert overrides == ["optim.lr=1e-4"]
    with pytest.raises(ValueError, match="needs a number"):
        parse_args(["cluster.gpu_mem_gb=big"])
    assert ClusterSpec(**{"nodes": 2}).gpus_per_node == 8


@pytest.mark.unit
def test_chunked_loss_and_balanced_split_fit_four_a100s_without_sharding():
    """The 4-GPU benchmark layout (PP 4 x DP 1, no ZeRO-1 sharding, 15% vision tokens): the whole-row
    logits put the paper split's last stage over 40 GiB (measured 41.3 GiB on H200); chunking
    the loss brings it under, and the balanced split spreads the states (largest stage ~21 GiB)."""
    run = to_run_config(
        compose_config(["experiment=paper_stage2", "parallel.dp=1", "parallel.global_batch=16"])
    )
    cluster = ClusterSpec(nodes=1, gpus_per_node=4, gpu_mem_gb=40)
    run.parallel.loss_chunk_tokens = 0
    whole = dry_run(run, cluster, 0.15)
    assert [m.stage for m in whole.memory if m.total > whole.budget] == [3]
    run.parallel.loss_chunk_tokens = 2048
    chunked = dry_run(run, cluster, 0.15)
    assert chunked.fits and chunked.memory[3].total < whole.memory[3].total - 5.5 * GIB
    run.parallel.partition_method = "balanced"
    balanced = dry_run(run, cluster, 0.15)
    assert balanced.partition.method == "balanced" and balanced.fits
    assert max(m.total for m in balanced.memory) < 0.85 * max(m.total for m in chunked.memory)
