"""Per-stage GPU memory and per-step FLOP estimates of a DeepSeek-OCR training job.

Everything is arithmetic on the configs (no GPU, no allocation); `dsocr-dryrun` prints it and
refuses layouts that do not fit. The formulas are upper-bound style estimates, written out so
they can be checked by hand. Notation: b = bytes per element of the training dtype (bf16 2,
fp32 4); P / T = all / trainable parameters of the stage; DP = data-parallel degree; N = tokens
per micro-batch = micro_batch x seq_len; V = vision tokens per micro-batch = vision_fraction x N.

Model states (DeepSpeed pipeline engine, ZeRO-0/1; ../shared/spec/engine_notes.md):
    weights    = b x P                                 (frozen weights included)
    gradients  = b x T  (+ 4 x T when bf16: the fp32 gradient-accumulation buffer,
                         `data_types.grad_accum_dtype: fp32`; not sharded by ZeRO-1)
    optimizer  = (4 [fp32 master copy, bf16 only] + 8 [Adam m, v]) x T / (DP if ZeRO-1 else 1)

Activations kept for backward per micro-batch, in elements per token (times b):
    decoder attention block  8h       (norm in/out, rotated q, k, v, attention out, residual)
    dense SwiGLU MLP         2h + 4I  (norm in/out, gate, up, silu(gate), gate*up)
    MoE MLP                  2h + 2kh + 4kI_e + 4I_s + 2E(4/b)
                             (norm in/out, k gathered copies in and out, k routed SwiGLUs,
                              the shared SwiGLU, fp32 router logits + probabilities)
    CLIP block (per V)       8c + 3m  (quick_gelu keeps its input and sigmoid)
    SAM block (per 16V)      8e + 2m  (x window padding (ceil(g/w) w / g)^2, g = SAM grid)
    lm_head + loss, whole row (loss_chunk_tokens 0; per logit, N x vocab of them):
                             keeps 4 (fp32 log-probabilities); backward peak 4 more each for
                             their gradient and the fp32 logits' gradient (12 in all)
    lm_head + loss, chunked (pipeline.loss.chunked_next_token_loss, chunk C):
                             keeps the gradients it formed in forward, h b per token + 4 per
                             lm_head weight (fp32); transient (b + 8) x C x vocab (dtype
                             logits, fp32 logits, fp32 log-probabilities; 8 when b = 4)
With activation checkpointing (per stage: parallel.checkpoint_stages, else every stage when
model.gradient_checkpointing, or the pipeline engine's activation_checkpoint_interval) a block
keeps only its input (h, c or e per token) and one block at a time is recomputed in backward.
A frozen SAM runs under no_grad: it keeps nothing, its transient peak is (2e + 2m) per SAM
token for one block.
Optimizer step: torch's foreach AdamW allocates one fp32 temporary (sqrt of v) over the
stage's optimizer shard, 4 x T / (DP if ZeRO-1 else 1) bytes, while activations are freed: a
stage peaks at weights + gradients + optimizer + max(activations, that temporary).
Under 1F1B, stage s holds min(pp - s, micro-batches) micro-batches in flight (DeepSpeed
`TrainSchedule.num_pipe_buffers`), plus an input and an output boundary buffer each. A fixed
`reserve_gb` covers the CUDA context, NCCL buffers and allocator fragmentation.

Per-unit training FLOPs of one micro-batch (`unit_train_flops`, what parallel.partition_method
"balanced" equalises): forward x1 for the frozen SAM, x3 for trained units, plus one forward
for every checkpointed (recomputed) block; decoder layer forward 2 x activated matmul
parameters + 2 x seq_len x h (causal attention) per token; head 2 x h x vocab per token (the
fused chunked loss recomputes nothing).

FLOPs are model FLOPs (no recomputation), forward x1 for the frozen no_grad SAM and x3
(forward + backward) for everything trained: decoder `DecoderConfig.matmul_flops_per_token`,
CLIP 2 x (4c^2 + 2cm) + 4c(g^2 + 1) per token and layer, SAM 2 x (4e^2 + 2em) + 4eL per SAM
token and block (L = window^2 or g_sam^2 for global blocks) plus patch embed, neck and
compressor convs, projector 2 x 2 x (c + c_sam) x n_embed. View-size dependent terms are
taken at SAM's pretraining resolution (`SamConfig.img_size`: 1024 px, Base mode, for the release).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from decoder import DecoderConfig
from deepencoder import EncoderConfig
from pipeline.config import DataConfig, ModelConfig, ParallelConfig
from pipeline.parallel.partition import Partition, Stage, UnitCount
from pipeline.parallel.topology import Topology

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
# Share of image-placeholder tokens the "balanced" partition is computed for: 8192-token rows
# of pages with 2-3k characters each (Base 273 / Gundam ~900 vision tokens) plus text-only rows
# (the mix of the 2026-11-21 stage-2 pipeline benchmark, README "Stage-2 pipeline on 4 GPUs")
# have 10-20%.
BALANCE_VISION_FRACTION = 0.15


@dataclass
class ClusterSpec:
    """The machines a job runs on. gpu_mem_gb is the usable device memory in GiB (A100-40G: 40);
    peak_tflops the dense bf16 peak per GPU (A100 312, H100 SXM 989) for the step-time bound."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 40.0
    peak_tflops: float = 312.0
    reserve_gb: float = 2.0

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"cluster.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("gpu_mem_gb", "peak_tflops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"cluster.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.reserve_gb < self.gpu_mem_gb:
            raise ValueError(f"cluster.reserve_gb must lie in [0, gpu_mem_gb), got {self.reserve_gb}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Workload:
    """What one micro-batch looks like to the memory model."""

    seq_len: int
    micro_batch: int
    dtype: str = "bf16"
    zero_stage: int = 1
    checkpointing: bool = True
    vision_fraction: float = 1.0  # share of the N tokens that are image placeholders (1.0 = worst case)
    checkpoint_stages: tuple[int, ...] | None = None  # stages that checkpoint; None = all if checkpointing
    loss_chunk_tokens: int = 0  # 0: the head materialises the whole row's logits

    def checkpointed(self, stage: int) -> bool:
        """Whether `stage` recomputes its blocks in backward."""
        if self.checkpoint_stages is None:
            return self.checkpointing
        return stage in self.checkpoint_stages

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"parallel.dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.zero_stage not in (0, 1):
            raise ValueError(
                f"parallel.zero_stage={self.zero_stage}: DeepSpeed pipelines support ZeRO 0 or 1 only"
            )
        if not 0.0 <= self.vision_fraction <= 1.0:
            raise ValueError(f"vision_fraction must lie in [0, 1], got {self.vision_fraction}")
        if self.seq_len < 1 or self.micro_batch < 1:
            raise ValueError("seq_len and micro_batch must be >= 1")
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"parallel.loss_chunk_tokens must be >= 0, got {self.loss_chunk_tokens}")
        if self.checkpoint_stages is not None:
            self.checkpoint_stages = tuple(int(s) for s in self.checkpoint_stages)

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    @property
    def vision_tokens(self) -> float:
        return self.vision_fraction * self.tokens


@dataclass
class StageMemory:
    stage: int
    label: str
    weights: float
    gradients: float
    optimizer: float
    activations: float
    in_flight: int
    notes: list[str] = field(default_factory=list)
    step_transient: float = 0.0  # the optimizer step's temporary (activations are freed by then)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + max(self.activations, self.step_transient)


# ---------------------------------------------------------------- activation elements per token


def decoder_layer_elements(dec: DecoderConfig, layer_idx: int, b: int) -> float:
    """Elements kept per token by decoder layer `layer_idx` without checkpointing."""
    h = dec.hidden_size
    attn = 8 * h
    if dec.is_moe_layer(layer_idx):
        m = dec.moe
        assert m is not None
        k = m.num_experts_per_tok
        mlp = 2 * h + 2 * k * h + 4 * k * m.moe_intermediate_size
        mlp += 4 * m.n_shared_experts * m.moe_intermediate_size + 2 * m.n_routed_experts * 4 / b
    else:
        mlp = 2 * h + 4 * dec.intermediate_size
    return attn + mlp


def sam_window_padding(enc: EncoderConfig, view: int | None = None) -> float:
    """Token overhead of zero-padding the SAM grid to whole windows (1.196 for 1024 px, window 14)."""
    g, w = (view or enc.sam.img_size) // enc.sam.patch_size, enc.sam.window_size
    return (math.ceil(g / w) * w / g) ** 2 if w else 1.0


def sam_tokens_per_vision_token(enc: EncoderConfig) -> int:
    """SAM grid positions per output token: the compressor downsamples 4x per side."""
    return 16


# ---------------------------------------------------------------- memory


def head_activations(dec: DecoderConfig, w: Workload) -> tuple[float, float]:
    """(kept bytes per micro-batch, transient peak bytes) of final norm + lm_head + loss."""
    b, n, vocab, h = w.bytes, w.tokens, dec.vocab_size, dec.hidden_size
    if w.loss_chunk_tokens == 0:
        return 4 * n * vocab, 8 * n * vocab
    chunk = min(w.loss_chunk_tokens, n)
    return n * h * b + 4 * vocab * h, (b + 8 if b < 4 else 8) * chunk * vocab


def _unit_activations(
    unit: UnitCount, enc: EncoderConfig, dec: DecoderConfig, w: Workload, checkpointing: bool
) -> tuple[float, float]:
    """(kept bytes per micro-batch in flight, transient peak bytes of one recomputed block)."""
    b, n, v = w.bytes, w.tokens, w.vision_tokens
    if unit.kind == "decoder_layer":
        assert unit.layer_idx is not None
        full = decoder_layer_elements(dec, unit.layer_idx, b) * n * b
        if checkpointing:
            return dec.hidden_size * n * b, full
        return full, 0.0
    if unit.kind == "head":
        return head_activations(dec, w)
    if unit.kind == "clip":
        c, m, layers = enc.clip.width, enc.clip.mlp_dim, enc.clip.layers
        block = (8 * c + 3 * m) * v * b
        merge = (
            enc.feature_dim + enc.n_embed
        ) * v * b + 2 * dec.hidden_size * n * b  # projector, merged embeds
        if unit.trainable == 0:
            return merge, block
        if checkpointing:
            return c * v * b * layers + merge, block
        return block * layers + merge, 0.0
    # SAM + neck + compressor, on 16 SAM positions per vision token, window-padded
    e, m, depth = enc.sam.embed_dim, enc.sam.mlp_dim, enc.sam.depth
    sam_tokens = sam_tokens_per_vision_token(enc) * v * sam_window_padding(enc)
    if unit.trainable == 0:  # no_grad: nothing kept, one block's transient peak
        return 0.0, (2 * e + 2 * m) * sam_tokens * b
    block = (8 * e + 2 * m) * sam_tokens * b
    if checkpointing:
        return e * sam_tokens * b * depth, block
    return block * depth, 0.0


def _unit_output_elements(unit: UnitCount, enc: EncoderConfig, dec: DecoderConfig, w: Workload) -> float:
    if unit.kind == "sam":
        return enc.sam.out_channels * w.vision_tokens  # compressed grid, (N_img, C, g, g)
    if unit.kind == "head":
        return 0.0  # the loss
    return dec.hidden_size * w.tokens  # (B, T, h)


def _boundary_bytes(
    partition: Partition, stage: Stage, enc: EncoderConfig, dec: DecoderConfig, w: Workload
) -> float:
    """Input + output buffer of one micro-batch at a stage: the previous unit's output (pixels,
    64 x 64 x 3 per vision token, for stage 0) and the stage's last unit's output."""
    start = partition.parts[stage.index]
    if start == 0:
        inp = 3 * 64 * 64 * w.vision_tokens
    else:
        inp = _unit_output_elements(partition.units[start - 1], enc, dec, w)
    return (inp + _unit_output_elements(stage.units[-1], enc, dec, w)) * w.bytes


def stage_memory(
    partition: Partition, topology: Topology, enc: EncoderConfig, dec: DecoderConfig, workload: Workload
) -> list[StageMemory]:
    """Estimated peak bytes per pipeline stage (see the module docstring for the formulas)."""
    if partition.pp != topology.pp:
        raise ValueError(f"partition has {partition.pp} stages but the topology has pp={topology.pp}")
    b = workload.bytes
    shard = topology.dp if workload.zero_stage >= 1 else 1
    out = []
    for stage in partition.stages:
        t, p = stage.trainable, stage.params
        grads = b * t + (4 * t if workload.dtype == "bf16" else 0)
        optim = ((4 if workload.dtype == "bf16" else 0) + 8) * t / shard
        in_flight = 1 if topology.pp == 1 else min(topology.pp - stage.index, topology.grad_accum)
        kept, transient = 0.0, 0.0
        ckpt = workload.checkpointed(stage.index)
        for unit in stage.units:
            k, tr = _unit_activations(unit, enc, dec, workload, ckpt)
            kept, transient = kept + k, max(transient, tr)
        act = in_flight * (kept + _boundary_bytes(partition, stage, enc, dec, workload)) + transient
        notes = [] if t else ["no trainable parameter: the engine needs its (1,)-shaped stand-in"]
        step = 4 * t / shard  # foreach AdamW's fp32 temporary over the optimizer shard
        out.append(StageMemory(stage.index, stage.label(), b * p, grads, optim, act, in_flight, notes, step))
    return out


def workload_of(
    m: ModelConfig, data: DataConfig, p: ParallelConfig, vision_fraction: float = 1.0
) -> Workload:
    """The memory model's view of a run's micro-batch and settings."""
    return Workload(
        seq_len=data.seq_len,
        micro_batch=p.micro_batch,
        dtype=p.dtype,
        zero_stage=p.zero_stage,
        checkpointing=m.gradient_checkpointing or p.activation_checkpoint_interval > 0,
        vision_fraction=vision_fraction,
        checkpoint_stages=None if p.checkpoint_stages is None else tuple(p.checkpoint_stages),
        loss_chunk_tokens=p.loss_chunk_tokens,
    )


# ---------------------------------------------------------------- per-unit compute (balancing)


def decoder_layer_flops(dec: DecoderConfig, layer_idx: int, seq_len: int) -> float:
    """Forward FLOPs per token of decoder layer `layer_idx`: 2 x activated matmul parameters
    (q, k, v, o; dense SwiGLU, or top-k + shared experts and the router) + causal attention."""
    h = dec.hidden_size
    if dec.is_moe_layer(layer_idx):
        m = dec.moe
        assert m is not None
        experts = m.num_experts_per_tok + m.n_shared_experts
        mlp = experts * 3 * h * m.moe_intermediate_size + m.n_routed_experts * h
    else:
        mlp = 3 * h * dec.intermediate_size
    return 2 * (4 * h * h + mlp) + 2 * seq_len * h


def unit_train_flops(
    unit: UnitCount, enc: EncoderConfig, dec: DecoderConfig, w: Workload, checkpointing: bool
) -> float:
    """Training FLOPs of one micro-batch through `unit` (forward, backward, recomputation)."""
    n, v = w.tokens, w.vision_tokens
    recompute = 1 if checkpointing else 0
    if unit.kind == "decoder_layer":
        assert unit.layer_idx is not None
        return (3 + recompute) * decoder_layer_flops(dec, unit.layer_idx, w.seq_len) * n
    if unit.kind == "head":
        return 3 * 2 * dec.hidden_size * dec.vocab_size * n
    if unit.kind == "clip":
        passes = 3 + recompute if unit.trainable else 1
        return passes * clip_flops_per_vision_token(enc) * v
    passes = 3 + recompute if unit.trainable else 1
    return passes * sam_flops_per_vision_token(enc) * v


def unit_costs(
    units: Sequence[UnitCount], enc: EncoderConfig, dec: DecoderConfig, w: Workload
) -> list[float]:
    """`unit_train_flops` of every unit, checkpointed as `w.checkpointing` says (the stage of
    a unit is not known before the split)."""
    return [unit_train_flops(u, enc, dec, w, w.checkpointing) for u in units]


def stage_train_flops(
    partition: Partition, enc: EncoderConfig, dec: DecoderConfig, w: Workload
) -> list[float]:
    """Training FLOPs of one micro-batch per stage, with each stage's own checkpointing."""
    return [
        sum(unit_train_flops(u, enc, dec, w, w.checkpointed(s.index)) for u in s.units)
        for s in partition.stages
    ]


# ---------------------------------------------------------------- FLOPs


@dataclass
class StepFlops:
    decoder: float
    clip: float
    sam: float

    @property
    def total(self) -> float:
        return self.decoder + self.clip + self.sam


def sam_flops_per_vision_token(enc: EncoderConfig, view: int | None = None) -> float:
    """Forward FLOPs of SAM + neck + compressor per output vision token of a `view` px view."""
    s = enc.sam
    g = (view or s.img_size) // s.patch_size
    per_pos = 2 * s.in_chans * s.patch_size**2 * s.embed_dim  # patch embed
    for i in range(s.depth):
        win = s.block_window(i)
        length = win * win if win else g * g
        per_pos += 2 * (4 * s.embed_dim**2 + 2 * s.embed_dim * s.mlp_dim) + 4 * s.embed_dim * length
    per_pos += 2 * (s.embed_dim * s.out_chans + 9 * s.out_chans**2)  # neck 1x1 + 3x3
    c1, c2 = s.compressor_channels
    per_pos += 2 * 9 * s.out_chans * c1 / 4 + 2 * 9 * c1 * c2 / 16  # net_2 at g/2, net_3 at g/4
    return per_pos * sam_tokens_per_vision_token(enc)


def clip_flops_per_vision_token(enc: EncoderConfig, view: int | None = None) -> float:
    """Forward FLOPs of CLIP (with CLS) + projector per vision token of a `view` px view."""
    c, m = enc.clip.width, enc.clip.mlp_dim
    g2 = ((view or enc.sam.img_size) // 64) ** 2
    per_layer = 2 * (4 * c * c + 2 * c * m) + 4 * c * (g2 + 1)
    return per_layer * enc.clip.layers * (g2 + 1) / g2 + 2 * enc.feature_dim * enc.n_embed


def step_flops(
    enc: EncoderConfig,
    dec: DecoderConfig,
    tokens_per_step: int,
    seq_len: int,
    vision_fraction: float,
    sam_frozen: bool,
) -> StepFlops:
    """Model FLOPs of one optimizer step over `tokens_per_step` tokens (global batch x seq_len)."""
    vision = vision_fraction * tokens_per_step
    return StepFlops(
        decoder=dec.matmul_flops_per_token(seq_len) * tokens_per_step,
        clip=3 * clip_flops_per_vision_token(enc) * vision,
        sam=(1 if sam_frozen else 3) * sam_flops_per_vision_token(enc) * vision,
    )
