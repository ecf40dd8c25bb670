"""Pipeline units of the full and debug models and their split into stages."""

import itertools

import pytest

from pipeline.config import ModelConfig
from pipeline.parallel.partition import UnitCount, balanced_parts, build_units, partition
from pipeline.units import Unit

# ../shared/spec/architecture.md: release total; SAM+neck 89,670,912 + compressor 5,898,240;
# CLIP 303,177,728 incl. the dead 602,112-parameter patch conv; projector 2,622,720;
# two vectors of 1280; embed = lm_head = 165,478,400; decoder total 2,934,734,080.
RELEASE_TOTAL = 3_336_106_240
SAM = 89_670_912 + 5_898_240
CLIP_UNIT = 303_177_728 + 2_622_720 + 2 * 1280 + 165_478_400
HEAD = 165_478_400 + 1280


@pytest.fixture(scope="module")
def full_units():
    return build_units(ModelConfig(encoder="full", decoder="full", freeze_sam=True))


@pytest.fixture(scope="module")
def debug_units():
    return build_units(ModelConfig(encoder="debug", decoder="debug", freeze_sam=False))


@pytest.mark.unit
def test_full_units_count_the_release_parameters(full_units):
    from decoder import decoder_config

    names = [u.name for u in full_units]
    assert names == [
        "sam+compressor",
        "clip+projector+embed+merge",
        *[f"decoder.{i}" for i in range(12)],
        "head",
    ]
    assert sum(u.params for u in full_units) == RELEASE_TOTAL
    sam, clip, *layers, head = full_units
    assert (sam.trainable, sam.frozen) == (0, SAM)  # frozen in stage 2
    assert clip.params == CLIP_UNIT and clip.frozen == 602_112  # the unused patch conv
    assert head.params == HEAD and head.frozen == 0
    # decoder layers agree with the decoder config's own arithmetic
    dec = decoder_config("full")
    assert [u.params for u in layers] == [dec._layer_params(i, activated=False) for i in range(12)]
    assert [u.layer_idx for u in layers] == list(range(12))


@pytest.mark.unit
def test_freeze_sam_only_moves_sam_to_frozen():
    units = build_units(ModelConfig(encoder="debug", decoder="debug", freeze_sam=True))
    unfrozen = build_units(ModelConfig(encoder="debug", decoder="debug", freeze_sam=False))
    assert units[0].trainable == 0 and unfrozen[0].frozen == 0
    assert units[0].frozen == unfrozen[0].trainable
    assert [u.params for u in units] == [u.params for u in unfrozen]


@pytest.mark.unit
def test_mismatched_projector_width_is_refused():
    with pytest.raises(ValueError, match=r"encoder_overrides\.n_embed=768"):
        build_units(ModelConfig(encoder="full", decoder="dense-125m", encoder_overrides={"n_embed": 1280}))
    # without an override the projector follows the decoder width (as pipeline.model.build_model)
    assert sum(u.params for u in build_units(ModelConfig(encoder="full", decoder="dense-125m"))) > 0


@pytest.mark.unit
def test_paper_partitions(full_units):
    p4 = partition(full_units, 4)
    assert p4.parts == [0, 1, 2, 8, 15] and p4.method == "paper"
    assert [s.label() for s in p4.stages] == [
        "sam+compressor",
        "clip+projector+embed+merge",
        "decoder.0-5",
        "decoder.6-11 + head",
    ]
    # engine_notes.md: PP3 = 6 MoE layers + lm_head, ~1.57B parameters
    assert p4.stages[3].params == pytest.approx(1.57e9, rel=0.005)
    assert p4.stages[0].trainable == 0
    assert partition(full_units, 2).parts == [0, 8, 15]
    assert partition(full_units, 1).parts == [0, 15]
    p8 = partition(full_units, 8)
    assert p8.parts == [0, 1, 2, 4, 6, 8, 10, 12, 15]
    assert p8.stage_of("decoder.11") == 7 == p8.stage_of("head")
    # every split covers each unit once, in order
    for p in (p4, p8):
        assert [u for s in p.stages for u in s.units] == full_units


@pytest.mark.unit
def test_explicit_boundaries_and_their_errors(full_units):
    p = partition(full_units, 3, parts=[0, 2, 9, 15])
    assert p.method == "explicit" and [len(s.units) for s in p.stages] == [2, 7, 6]
    with pytest.raises(ValueError, match=r"pp\+1=4 unit boundaries from 0 to 15"):
        partition(full_units, 3, parts=[0, 9, 15])
    with pytest.raises(ValueError, match="strictly increasing"):
        partition(full_units, 3, parts=[0, 9, 9, 15])
    with pytest.raises(ValueError, match=r"paper split here is \[0, 1, 2, 8, 15\]"):
        partition(full_units, 4, parts=[0, 1, 2, 15, 15])


@pytest.mark.unit
def test_more_stages_than_units_is_refused(debug_units, full_units):
    assert len(debug_units) == 6  # 3 debug decoder layers
    assert partition(debug_units, 6).parts == list(range(7))
    with pytest.raises(ValueError, match="exceeds the 6 pipeline units"):
        partition(debug_units, 7)
    with pytest.raises(ValueError, match="at most 15 stages"):
        partition(full_units, 16)


@pytest.mark.unit
def test_pp3_falls_back_to_parameter_balancing(full_units):
    p3 = partition(full_units, 3)
    assert p3.method == "parameters"
    # brute force over all 3-way splits: the chosen one minimises the largest trainable stage
    weights = [u.trainable for u in full_units]
    best = min(
        max(sum(weights[a:b]) for a, b in itertools.pairwise([0, i, j, 15]))
        for i, j in itertools.combinations(range(1, 15), 2)
    )
    assert max(s.trainable for s in p3.stages) == best


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(5))
def test_balanced_parts_matches_brute_force(seed):
    import random

    rng = random.Random(seed)
    weights = [rng.randint(0, 100) for _ in range(9)]
    for pp in range(1, 10):
        parts = balanced_parts(weights, pp)
        assert parts[0] == 0 and parts[-1] == 9 and len(parts) == pp + 1
        assert all(a < b for a, b in itertools.pairwise(parts))
        got = max(sum(weights[a:b]) for a, b in itertools.pairwise(parts))
        best = min(
            max(sum(weights[a:b]) for a, b in itertools.pairwise([0, *cuts, 9]))
            for cuts in itertools.combinations(range(1, 9), pp - 1)
        )
        assert got == best


@pytest.mark.unit
def test_stage_label_compresses_layer_ranges():
    layers = [UnitCount(Unit(f"decoder.{i}", "decoder_layer", i), 1, 0) for i in range(2)]
    units = [*layers, UnitCount(Unit("head", "head"), 1, 0)]
    assert partition(units, 1).stages[0].label() == "decoder.0-1 + head"


def _full_run(method: str, checkpointing: bool = True, **parallel):
    from pipeline.config import RunConfig

    run = RunConfig()
    run.model = ModelConfig(
        encoder="full", decoder="full", freeze_sam=True, gradient_checkpointing=checkpointing
    )
    run.data.seq_len = 8192
    run.parallel.pp, run.parallel.dtype, run.parallel.partition_method = 4, "bf16", method
    for key, value in parallel.items():
        setattr(run.parallel, key, value)
    return run


def partition_of(run):
    """The stage split the engine uses for `run` (pipeline.parallel.engine.run_partition)."""
    from pipeline.parallel.engine import run_partition

    return run_partition(run.model, run.data, run.parallel)


@pytest.mark.unit
@pytest.mark.parametrize(("checkpointing", "parts"), [(True, [0, 4, 8, 12, 15]), (False, [0, 3, 8, 13, 15])])
def test_balanced_partition_of_the_full_model(checkpointing, parts):
    """PP=4 'balanced': SAM + CLIP + the first decoder layers on PP0, the head with 1-2 layers;
    the largest stage cost (training FLOPs per micro-batch) drops by ~45% against the paper's."""
    from pipeline.model import model_configs
    from pipeline.parallel.memory import BALANCE_VISION_FRACTION, stage_train_flops, workload_of

    run = _full_run("balanced", checkpointing)
    split = partition_of(run)
    assert split.method == "balanced" and split.parts == parts
    assert split.stages[0].names[:2] == ["sam+compressor", "clip+projector+embed+merge"]
    enc, dec = model_configs(run.model)
    work = workload_of(run.model, run.data, run.parallel, BALANCE_VISION_FRACTION)
    balanced = stage_train_flops(split, enc, dec, work)
    paper = stage_train_flops(partition_of(_full_run("paper", checkpointing)), enc, dec, work)
    assert max(balanced) < 0.6 * max(paper)
    assert max(balanced) / (sum(balanced) / 4) < 1.15  # within 15% of a perfect split
    assert sum(balanced) == pytest.approx(sum(paper))  # same work, moved
    # no contiguous split of these costs does better (brute force over all boundaries)
    costs = [sum(stage_train_flops(partition(split.units, 15, list(range(16))), enc, dec, work)[i:i + 1])
             for i in range(15)]  # fmt: skip
    best = min(
        max(sum(costs[a:b]) for a, b in zip((0, *cut), (*cut, 15)))
        for cut in itertools.combinations(range(1, 15), 3)
    )
    assert max(balanced) == pytest.approx(best)


@pytest.mark.unit
def test_balanced_needs_costs_and_checkpoint_stages_are_checked(full_units):

    with pytest.raises(ValueError, match="needs one cost per unit"):
        partition(full_units, 4, method="balanced")
    with pytest.raises(ValueError, match="partition method must be one of"):
        partition_of(_full_run("even"))
    with pytest.raises(ValueError, match=r"checkpoint_stages=\[1, 4\]: stages \[4\] outside"):
        partition_of(_full_run("paper", checkpoint_stages=[1, 4]))
    # explicit boundaries win over the method
    assert partition_of(_full_run("balanced", partition=[0, 1, 2, 8, 15])).method == "explicit"
