"""DeepSeek-OCR as one ordered list of units: the forward every training path runs.

The units, in order (`model_units`), and the tuples they pass on:

    0        "sam+compressor"              SAM ViT-B + neck + compressor (frozen in stage 2)
    1        "clip+projector+embed+merge"  CLIP-L, projector, image_newline / view_seperator, the
                                           token embedding, and the merge into the sequence
    2..L+1   "decoder.0" .. "decoder.L-1"  decoder layers
    L+2      "head"                        final RMSNorm + lm_head + next-token loss (chunked)

    inputs  (PackedBatch.model_inputs):  input_ids, labels, position_ids, doc_ids (B, L) int64,
                                         image_positions (P,), gather_index (P,) int64,
                                         pixels_1..pixels_K (N_k, 3, S_k, S_k) uint8, one slot per
                                         view side (`processing.view_sizes()`; empty slots alike)
    vision  (after SAM):                 aux (1,) fp32, feats_1..feats_K (N_k, C, S_k/64, S_k/64),
                                         input_ids, labels, position_ids, doc_ids, image_positions,
                                         gather_index
    hidden  (after CLIP and each layer): aux (1,) fp32 running MoE balance loss, hidden (B, L, H),
                                         labels, position_ids, doc_ids
    output  (head):                      (loss, lm_loss, aux_loss) fp32 scalars

`DeepSeekOCR.forward` (pipeline/model.py) folds these units over one model; the DeepSpeed
pipeline builds one `LayerSpec` per unit from the same list (pipeline/parallel/stages.py), each
holding only its own parts of the model. So the pipeline and the single process run the same
code by construction. A unit declares its name, kind, the part its parameters belong to (`part`:
freezing, LoRA and the partition's parameter counts), the model attributes it owns (`paths`: what
a pipeline stage materialises) and its repeated blocks (`blocks`: regional compile and activation
checkpointing). Its cost for the partition and the memory planner is per kind in
`pipeline.parallel.memory.unit_costs`.

The floating tensors every unit emits are in the autograd graph, as a DeepSpeed stage boundary
requires: `aux` starts as the SAM unit's zero-weight link (a pipeline stage holding only the frozen
SAM needs a trainable parameter), and empty view slots are joined with weight zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.loss import chunked_next_token_loss, next_token_loss
from pipeline.processing import VIEW_DOWNSAMPLE

UNIT_KINDS = ("sam", "clip", "decoder_layer", "head")
NUM_TEXT = 4  # input_ids, labels, position_ids, doc_ids
NUM_INDEX = 2  # image_positions, gather_index

_PATHS = {
    "sam": ("encoder.sam_model",),
    "clip": (
        "encoder.vision_model",
        "encoder.projector",
        "encoder.image_newline",
        "encoder.view_seperator",
        "decoder.embed_tokens",
    ),
    "head": ("decoder.norm", "decoder.lm_head"),
}


class PrepareCache:
    """RoPE tables + attention info of the last (position_ids, doc_ids) seen, shared by the decoder
    units that run on one device: the first layer computes them, the others reuse them."""

    def __init__(self) -> None:
        self.key: tuple[torch.Tensor, torch.Tensor, torch.dtype] | None = None
        self.value = None

    def get(self, decoder, hidden: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor):
        key = self.key
        if key is None or key[0] is not position_ids or key[1] is not doc_ids or key[2] != hidden.dtype:
            b, t, _ = hidden.shape
            self.value = decoder.prepare(
                b, t, hidden.device, hidden.dtype, position_ids=position_ids, doc_ids=doc_ids
            )
            self.key = (position_ids, doc_ids, hidden.dtype)
        return self.value


@dataclass
class UnitContext:
    """What a unit reads besides its input tuple.

    link: the SAM unit's zero-weight trainable scalar (pipeline stages; None = a zero constant).
    cache: RoPE / attention info shared by the decoder units of one device.
    loss_chunk_tokens: rows of the lm_head projected at a time (0: whole logits).
    loss_positions / loss_targets: the batch's precomputed label selection (`PackedBatch`), where
    the head has it (the single process); else the head selects from the labels it receives.
    expert_counts: tokens per expert of each MoE layer run, by layer index (filled by the units).
    """

    link: torch.Tensor | None = None
    cache: PrepareCache = field(default_factory=PrepareCache)
    loss_chunk_tokens: int = 2048
    loss_positions: torch.Tensor | None = None
    loss_targets: torch.Tensor | None = None
    expert_counts: dict[int, torch.Tensor] = field(default_factory=dict)


def module_at(model: nn.Module, path: str):
    """The submodule or parameter at a dotted path (list indices as numbers): a unit's `paths`."""
    obj = model
    for name in path.split("."):
        obj = obj[int(name)] if isinstance(obj, nn.ModuleList) else getattr(obj, name)
    return obj


@dataclass(frozen=True)
class Unit:
    """One entry of the unit list; layer_idx is the decoder layer of kind "decoder_layer"."""

    name: str
    kind: str
    layer_idx: int | None = None

    @property
    def part(self) -> str:
        """The model part its parameters belong to: sam, clip, decoder or head."""
        return "decoder" if self.kind == "decoder_layer" else self.kind

    @property
    def paths(self) -> tuple[str, ...]:
        """The DeepSeekOCR attributes this unit owns (the rotary table has no parameters)."""
        if self.kind == "decoder_layer":
            return (f"decoder.layers.{self.layer_idx}", "decoder.rotary")
        return _PATHS[self.kind]

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        found: list[nn.Parameter] = []
        for path in self.paths:
            obj = module_at(model, path)
            found += [obj] if isinstance(obj, nn.Parameter) else list(obj.parameters())
        return found

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The repeated blocks (regional compile, activation checkpointing); none in the head."""
        if self.kind == "sam":
            return list(model.encoder.sam_model.blocks)
        if self.kind == "clip":
            return list(model.encoder.vision_model.transformer.layers)
        if self.kind == "decoder_layer":
            return [self.layer(model)]
        return []

    def layer(self, model: nn.Module) -> nn.Module:
        layers = model.decoder.layers  # a ModuleDict keyed by index on a pipeline stage
        return layers[str(self.layer_idx)] if isinstance(layers, nn.ModuleDict) else layers[self.layer_idx]

    def forward(
        self, model: nn.Module, x: tuple[torch.Tensor, ...], ctx: UnitContext
    ) -> tuple[torch.Tensor, ...]:
        return _FORWARD[self.kind](self, model, x, ctx)


def model_units(num_layers: int) -> list[Unit]:
    """The ordered unit list of a model with `num_layers` decoder layers."""
    return [
        Unit("sam+compressor", "sam"),
        Unit("clip+projector+embed+merge", "clip"),
        *(Unit(f"decoder.{i}", "decoder_layer", i) for i in range(num_layers)),
        Unit("head", "head"),
    ]


def _sam(unit: Unit, model, x, ctx: UnitContext):
    text, pixels = x[: NUM_TEXT + NUM_INDEX], x[NUM_TEXT + NUM_INDEX :]
    link = ctx.link if ctx.link is not None else torch.zeros(1, device=text[0].device)
    link = link.float().reshape(1)
    present = [p for p in pixels if p.shape[0] > 0]
    encoded = iter(model.sam_features(present))  # no SAM graph when frozen
    channels = model.encoder.config.clip.width
    feats = []
    for p in pixels:
        g = p.shape[-1] // VIEW_DOWNSAMPLE
        f = next(encoded) if p.shape[0] > 0 else link.new_zeros(0, channels, g, g)
        feats.append(f + link.to(f.dtype))  # (N_k, C, g, g), joined to the graph with weight 0
    return (link, *feats, *text)


def _clip(unit: Unit, model, x, ctx: UnitContext):
    k = len(x) - 1 - NUM_TEXT - NUM_INDEX
    aux, feats = x[0].float(), x[1 : 1 + k]
    input_ids, labels, position_ids, doc_ids, image_positions, gather_index = x[1 + k :]
    for f in feats:  # empty slots get a (zero) gradient too, as a pipeline boundary requires
        if f.shape[0] == 0:
            aux = aux + f.sum().float() * 0
    present = [f for f in feats if f.shape[0] > 0]
    table = model.image_table(model.clip_features(present)) if present else None
    hidden = model.merge(input_ids, table, image_positions, gather_index)
    return aux, hidden, labels, position_ids, doc_ids


def _decoder_layer(unit: Unit, model, x, ctx: UnitContext):
    aux, hidden, labels, position_ids, doc_ids = x
    rope, info = ctx.cache.get(model.decoder, hidden, position_ids, doc_ids)
    layer = unit.layer(model)
    hidden, layer_aux = layer(hidden, rope, info)
    counts = getattr(layer.mlp, "last_expert_counts", None)
    if counts is not None:
        ctx.expert_counts[unit.layer_idx] = counts.detach()
    return aux + layer_aux.float(), hidden, labels, position_ids, doc_ids


def _head(unit: Unit, model, x, ctx: UnitContext):
    aux, hidden, labels, _, _ = x
    decoder = model.decoder
    if ctx.loss_chunk_tokens:
        normed = decoder.norm(hidden)  # (B, L, H); decoder.head = lm_head(norm(.)), unbiased
        lm_loss, _ = chunked_next_token_loss(
            normed,
            decoder.lm_head.weight,
            labels,
            ctx.loss_chunk_tokens,
            positions=ctx.loss_positions,
            targets=ctx.loss_targets,
        )
    else:
        lm_loss, _ = next_token_loss(decoder.head(hidden), labels)  # logits (B, L, V) fp32
    aux = aux.sum()
    return lm_loss + aux, lm_loss, aux


_FORWARD = {"sam": _sam, "clip": _clip, "decoder_layer": _decoder_layer, "head": _head}


def fold(units: Sequence[Unit], model: nn.Module, x: tuple[torch.Tensor, ...], ctx: UnitContext):
    """Run `units` in order over `model` (the single-process forward)."""
    for unit in units:
        x = unit.forward(model, x, ctx)
    return x
