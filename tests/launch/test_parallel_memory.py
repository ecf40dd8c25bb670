"""Memory and FLOP estimates against hand-computed values and module-derived oracles."""

import pytest
import torch
from torch import nn

from decoder import decoder_config
from deepencoder import DeepEncoder, encoder_config
from pipeline.config import ModelConfig
from pipeline.parallel.memory import (
    ClusterSpec,
    Workload,
    clip_flops_per_vision_token,
    decoder_layer_elements,
    decoder_layer_flops,
    sam_flops_per_vision_token,
    sam_window_padding,
    stage_memory,
    step_flops,
    unit_costs,
)
from pipeline.parallel.partition import build_units, partition
from pipeline.parallel.topology import Topology

N = 8192  # tokens per micro-batch (micro 1 x seq 8192)


@pytest.fixture(scope="module")
def paper():
    units = build_units(ModelConfig(encoder="full", decoder="full", freeze_sam=True))
    return partition(units, 4), encoder_config("full"), decoder_config("full")


@pytest.mark.unit
def test_moe_layer_elements_by_hand():
    dec = decoder_config("full")
    # attention 8h + norms 2h + k=6 gathered in/out 2kh + 4 k I_e + shared 4 x 2 x 896 + fp32 router 2 E (4/2)
    assert (
        decoder_layer_elements(dec, 1, 2) == 8 * 1280 + 2 * 1280 + 2 * 6 * 1280 + 4 * 6 * 896 + 8 * 896 + 256
    )
    assert decoder_layer_elements(dec, 0, 2) == 10 * 1280 + 4 * 6848  # dense layer 0
    assert sam_window_padding(encoder_config("full")) == pytest.approx((70 / 64) ** 2)


@pytest.mark.unit
def test_last_paper_stage_by_hand(paper):
    part, enc, dec = paper
    topo = Topology(160, 4, 1, 640)
    work = Workload(seq_len=N, micro_batch=1, dtype="bf16", zero_stage=1, checkpointing=True)
    last = stage_memory(part, topo, enc, dec, work)[3]
    t = part.stages[3].trainable
    assert t == part.stages[3].params == 6 * 233_720_320 + 165_479_680
    assert last.weights == 2 * t
    assert last.gradients == (2 + 4) * t  # bf16 grads + fp32 accumulation buffer
    assert last.optimizer == 12 * t / 40  # fp32 master + Adam m, v sharded over DP 40
    assert last.in_flight == 1
    logits = 129_280 * N
    # whole-row loss: layer inputs + fp32 log-probabilities + input buffer kept; the backward
    # peak adds their gradient and the fp32 logits' gradient (larger than one recomputed layer)
    kept = 6 * 1280 * N * 2 + 4 * logits + 1280 * N * 2
    assert last.activations == pytest.approx(kept + 8 * logits)
    assert last.step_transient == 4 * t / 40  # foreach AdamW's sqrt(v) over the ZeRO-1 shard
    # chunked loss: the gradients formed in forward (hidden bf16 + lm_head fp32) are kept; one
    # chunk's bf16 logits + fp32 logits + fp32 log-probabilities is the transient
    chunked = Workload(N, 1, "bf16", 1, True, loss_chunk_tokens=2048)
    last = stage_memory(part, topo, enc, dec, chunked)[3]
    kept = 6 * 1280 * N * 2 + (1280 * N * 2 + 4 * 129_280 * 1280) + 1280 * N * 2
    assert last.activations == pytest.approx(kept + (2 + 8) * 2048 * 129_280)
    moe = 8 * 1280 + 2 * 1280 + 2 * 6 * 1280 + 4 * 6 * 896 + 8 * 896 + 256
    assert moe * N * 2 < (2 + 8) * 2048 * 129_280  # the chunk still outweighs one recomputed layer
    tiny = stage_memory(part, topo, enc, dec, Workload(N, 1, "bf16", 1, True, loss_chunk_tokens=256))[3]
    assert tiny.activations == pytest.approx(kept + moe * N * 2)
    # engine_notes.md: ~25 GB at 16 B/param unsharded, ~6.7 GB with ZeRO-1 over DP 40 (bf16 grads)
    assert t * 16 / 1e9 == pytest.approx(25.1, abs=0.1)
    assert (last.weights + 2 * t + 12 * t / 40) / 1e9 == pytest.approx(6.74, abs=0.05)


@pytest.mark.unit
def test_state_memory_scales_as_documented(paper):
    part, enc, dec = paper
    base = Workload(seq_len=N, micro_batch=1, dtype="bf16", zero_stage=1, checkpointing=True)
    m40 = stage_memory(part, Topology(160, 4, 1, 640), enc, dec, base)
    m2 = stage_memory(part, Topology(8, 4, 1, 640), enc, dec, base)
    for a, b in zip(m40, m2):
        assert b.optimizer == pytest.approx(a.optimizer * 20)  # ZeRO-1 shards over DP
        assert (a.weights, a.gradients) == (b.weights, b.gradients)
    zero0 = stage_memory(part, Topology(160, 4, 1, 640), enc, dec, Workload(N, 1, "bf16", 0, True))
    assert zero0[2].optimizer == pytest.approx(m40[2].optimizer * 40)
    fp32 = stage_memory(part, Topology(160, 4, 1, 640), enc, dec, Workload(N, 1, "fp32", 1, True))
    t = part.stages[2].trainable
    assert (fp32[2].weights, fp32[2].gradients, fp32[2].optimizer) == (4 * t, 4 * t, 8 * t / 40)
    # frozen SAM stage: weights only, no gradient or optimizer state
    assert (m40[0].gradients, m40[0].optimizer) == (0, 0) and m40[0].weights == 2 * part.stages[0].params
    # 1F1B: stage s keeps min(pp - s, accumulation) micro-batches
    assert [m.in_flight for m in m40] == [4, 3, 2, 1]
    assert [m.in_flight for m in stage_memory(part, Topology(1280, 4, 1, 640), enc, dec, base)] == [
        2,
        2,
        2,
        1,
    ]
    assert [m.in_flight for m in stage_memory(part, Topology(2560, 4, 1, 640), enc, dec, base)] == [
        1,
        1,
        1,
        1,
    ]
    no_ckpt = stage_memory(part, Topology(160, 4, 1, 640), enc, dec, Workload(N, 1, "bf16", 1, False))
    assert all(n.activations > c.activations for n, c in zip(no_ckpt[1:], m40[1:]))
    text_only = stage_memory(part, Topology(160, 4, 1, 640), enc, dec, Workload(N, 1, "bf16", 1, True, 0.0))
    assert text_only[0].activations == 0 and text_only[3].activations == m40[3].activations


@pytest.mark.unit
def test_workload_and_cluster_validation():
    with pytest.raises(ValueError, match="ZeRO 0 or 1"):
        Workload(N, 1, "bf16", zero_stage=2)
    with pytest.raises(ValueError, match="parallel.dtype"):
        Workload(N, 1, "fp16")
    with pytest.raises(ValueError, match="vision_fraction"):
        Workload(N, 1, vision_fraction=1.5)
    with pytest.raises(ValueError, match="cluster.nodes"):
        ClusterSpec(nodes=0)
    with pytest.raises(ValueError, match="reserve_gb"):
        ClusterSpec(gpu_mem_gb=2, reserve_gb=2)
    assert ClusterSpec(nodes=20, gpus_per_node=8).world_size == 160


def _linear_and_conv_macs(module: nn.Module, per_position: dict[str, float]) -> float:
    """MACs per SAM/CLIP position from the modules' weights; convs scaled by their output density."""
    macs = 0.0
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            macs += m.weight.numel()
        elif isinstance(m, nn.Conv2d):
            macs += m.weight.numel() * per_position.get(name, 1.0)
    return macs


@pytest.mark.unit
@pytest.mark.parametrize("preset", ["full", "debug"])
def test_encoder_flops_match_module_weights(preset):
    enc = encoder_config(preset)
    with torch.device("meta"):
        model = DeepEncoder(enc)
    s, c = enc.sam, enc.clip
    g = s.img_size // s.patch_size
    attn = sum(4 * s.embed_dim * (s.block_window(i) ** 2 or g * g) for i in range(s.depth))
    sam_macs = _linear_and_conv_macs(model.sam_model, {"net_2": 1 / 4, "net_3": 1 / 16})
    assert sam_flops_per_vision_token(enc) == pytest.approx(16 * (2 * sam_macs + attn))
    q2 = (s.img_size // 64) ** 2
    clip_macs = _linear_and_conv_macs(model.vision_model, {"embeddings.patch_embedding": 0.0})
    expected = (2 * clip_macs + 4 * c.width * (q2 + 1) * c.layers) * (q2 + 1) / q2
    expected += 2 * model.projector.layers.weight.numel()
    assert clip_flops_per_vision_token(enc) == pytest.approx(expected)


@pytest.mark.unit
def test_step_flops_counts_backward_only_for_trained_parts():
    enc, dec = encoder_config("full"), decoder_config("full")
    tokens = 640 * N
    frozen = step_flops(enc, dec, tokens, N, 0.5, sam_frozen=True)
    trained = step_flops(enc, dec, tokens, N, 0.5, sam_frozen=False)
    assert trained.sam == pytest.approx(3 * frozen.sam) and trained.clip == frozen.clip
    assert frozen.decoder == dec.matmul_flops_per_token(N) * tokens
    assert frozen.clip == pytest.approx(3 * clip_flops_per_vision_token(enc) * tokens / 2)
    text = step_flops(enc, dec, tokens, N, 0.0, sam_frozen=True)
    assert (text.sam, text.clip, text.total) == (0, 0, frozen.decoder)


# Peaks measured on 4 x H200 with bench/pipeline_gpu.sh, since removed (README "Stage-2 pipeline on 4 GPUs":
# PP 4 x DP 1, global batch 16, paper split, checkpointing, loss over the whole row), GiB.
MEASURED_PAPER_PP4_DP1 = (0.9, 11.5, 27.0, 41.3)


@pytest.mark.unit
def test_estimate_tracks_the_measured_pipeline_peaks(paper):
    """The estimate of the benchmark's layout (pages + text rows: ~15% vision tokens) lies within
    1 GiB of each measured stage peak; the 23 GiB of the paper layout is DP 40's ZeRO-1 sharding."""
    part, enc, dec = paper
    work = Workload(N, 1, "bf16", 1, True, vision_fraction=0.15, loss_chunk_tokens=0)
    est = [m.total / 2**30 for m in stage_memory(part, Topology(4, 4, 1, 16), enc, dec, work)]
    for got, measured in zip(est, MEASURED_PAPER_PP4_DP1):
        assert abs(got - measured) < 1.0, (est, MEASURED_PAPER_PP4_DP1)
    chunked = Workload(N, 1, "bf16", 1, True, vision_fraction=0.15, loss_chunk_tokens=2048)
    last = stage_memory(part, Topology(4, 4, 1, 16), enc, dec, chunked)[3].total / 2**30
    assert last < est[3] - 5.5  # the logits of the whole row are gone


@pytest.mark.unit
def test_checkpointing_per_stage(paper):
    part, enc, dec = paper
    topo = Topology(160, 4, 1, 640)
    on = stage_memory(part, topo, enc, dec, Workload(N, 1, "bf16", 1, True))
    off = stage_memory(part, topo, enc, dec, Workload(N, 1, "bf16", 1, False))
    only2 = stage_memory(part, topo, enc, dec, Workload(N, 1, "bf16", 1, False, checkpoint_stages=(2,)))
    assert [m.activations for m in only2] == [
        off[0].activations,
        off[1].activations,
        on[2].activations,
        off[3].activations,
    ]
    assert Workload(N, 1, checkpointing=True, checkpoint_stages=()).checkpointed(0) is False
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        Workload(N, 1, loss_chunk_tokens=-1)


@pytest.mark.unit
def test_unit_flops_add_up_to_the_decoder_total():
    """Per-layer forward FLOPs x 3 + the head = the decoder config's own training FLOPs per token
    (which also counts the negligible norm weights)."""
    dec = decoder_config("full")
    per_token = sum(3 * decoder_layer_flops(dec, i, N) for i in range(12)) + 6 * 1280 * 129_280
    assert per_token == pytest.approx(dec.matmul_flops_per_token(N), rel=1e-4)
    units = build_units(ModelConfig(encoder="full", decoder="full", freeze_sam=True))
    enc = encoder_config("full")
    work = Workload(N, 1, "bf16", 1, checkpointing=False, vision_fraction=0.5)
    costs = unit_costs(units, enc, dec, work)
    step = step_flops(enc, dec, N, N, 0.5, sam_frozen=True)
    assert sum(costs) == pytest.approx(step.total, rel=1e-4)  # same model, one micro-batch
    ckpt = unit_costs(units, enc, dec, Workload(N, 1, "bf16", 1, checkpointing=True, vision_fraction=0.5))
    assert ckpt[0] == costs[0] and ckpt[-1] == costs[-1]  # frozen SAM, head: nothing recomputed
    assert ckpt[5] == pytest.approx(costs[5] * 4 / 3)  # a recomputed decoder layer: one more forward
