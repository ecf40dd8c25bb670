"""The pipeline units of DeepSeek-OCR as modules, and the tensors that cross stage boundaries.

One unit per entry of `pipeline.parallel.partition.build_units` (same order, same names):
`SamUnit` (SAM + compressor, frozen in stage 2), `ClipEmbedUnit` (CLIP + projector +
image_newline/view_seperator + token embedding + the merge), one `DecoderLayerUnit` per decoder
layer, `HeadUnit` (final norm + lm_head + loss). Each unit builds the full `DeepSeekOCR` on the
meta device, materialises only its own children and sets the others to None (torchtitan's
pipeline split), so it runs the model's own methods (`sam_features`, `clip_features`,
`image_table`, `merge`, `DecoderModel.prepare`, `head`) and its state-dict keys are
`"model." + DeepSeekOCR key`: consolidation is a union of unit state dicts.

Boundary tuples (the SAM features' sizes change per micro-batch: a split with SAM's output on a
boundary builds the engine with `dynamic_shape=True`, every other split with fixed shapes).
K = len(view_sizes) pixel / feature slots, one per view side in ascending order; a side absent
from the micro-batch has an empty (0, ...) slot, so the layout and the dtype at every index never
change (DeepSpeed reuses its receive buffers by index). Between stages float tensors come first, int64 after:

    inputs  (data -> stage 0):  input_ids, labels, position_ids, doc_ids (B, L) int64,
                                gather_index (P,) int64, row_counts (B,) int64,
                                pixels_1..pixels_K (N_k, 3, S_k, S_k) in the views' dtype, uint8
                                (raw RGB) from the loader, empty slots alike; `sam_features`
                                normalises them on the device
    vision  (after SAM):        link (1,) fp32, feats_1..feats_K (N_k, C, S_k/64, S_k/64),
                                input_ids, labels, position_ids, doc_ids, gather_index, row_counts
    hidden  (after CLIP/merge   aux (1,) fp32 running MoE balance loss, hidden (B, L, H),
             and every layer):  labels, position_ids, doc_ids; across a stage boundary packed
                                into one float tensor (`pack_hidden`): carrier (B*L*H + 2,),
                                labels, position_ids, doc_ids
    output  (HeadUnit):         loss () fp32 = next-token loss + aux

The head computes the loss with `pipeline.loss.chunked_next_token_loss` (loss_chunk_tokens > 0:
the row's (L, vocab) logits never exist at once) or `next_token_loss` on full logits (0), the
same loss the single-process `DeepSeekOCR.forward` computes.

The `inputs` tuple never crosses a p2p boundary: the first stage loads it from the data
iterator (DeepSpeed's `_exec_load_micro_batch` clones it to the device and, under reentrant
checkpointing, marks only floating tensors as requiring grad), so uint8 pixels travel as uint8
up to SAM.

Labels ride along in the tuple, so the last stage computes the loss from exactly the rows the
first stage embedded (the engine's `loss_fn` is unused). DeepSpeed marks every received float
tensor as requiring grad and sends its gradient back, and calls backward on every float output
of a non-last stage: hence `link` = (sum(frozen_link) + sum(frozen_link_matrix)) * 0, trainable
parameters joined with weight zero, so the frozen SAM stage has a graph (and optimizer
parameters) without computing any SAM gradient, and empty feature slots are touched with weight
zero on the next stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from decoder import DecoderConfig, DecoderModel
from deepencoder import DeepEncoder, EncoderConfig
from pipeline.batch import PackedBatch
from pipeline.loss import chunked_next_token_loss, next_token_loss
from pipeline.model import DeepSeekOCR, plan_images
from pipeline.processing import MODES, VIEW_DOWNSAMPLE

# Every view side any image mode produces (global views and Gundam tiles).
VIEW_SIZES: tuple[int, ...] = tuple(sorted({s for m in MODES.values() for s in (m.base_size, m.image_size)}))
NUM_TEXT = 4  # input_ids, labels, position_ids, doc_ids
UNIT_PREFIX = "model."  # unit state-dict key = UNIT_PREFIX + DeepSeekOCR key
LINK_KEYS = ("frozen_link", "frozen_link_matrix")  # the SAM unit's zero-weight parameters; not model weights
# DeepSpeed's bf16 / ZeRO optimizers pack a stage's trainable parameters back to back into one flat
# buffer per group and point the parameters into it. A parameter whose size is not a multiple of
# this many elements moves every later one off 16-byte alignment, and cuBLAS then runs align-1
# GEMM kernels (seen on H200: 1-element links made them ~40% of PP0's GPU time).
FLAT_ALIGN = 64


def micro_batch_inputs(
    batch: PackedBatch, view_sizes: Sequence[int] = VIEW_SIZES
) -> tuple[torch.Tensor, ...]:
    """The first stage's input tuple for one micro-batch (layout `inputs` in the module docstring)."""
    plan = plan_images(batch.images)
    unknown = sorted(set(plan.sizes) - set(view_sizes))
    if unknown:
        raise ValueError(f"view sides {unknown} have no pipeline slot; slots: {list(view_sizes)}")
    by_size = dict(zip(plan.sizes, plan.pixels))
    dtype = plan.pixels[0].dtype if plan.pixels else torch.uint8  # uint8 from the loader
    pixels = [by_size.get(s, torch.zeros(0, 3, s, s, dtype=dtype)) for s in view_sizes]
    text = (batch.input_ids, batch.labels, batch.position_ids, batch.doc_ids)
    counts = torch.tensor(plan.row_counts, dtype=torch.long)
    return (*(t.long() for t in text), plan.gather_index.long(), counts, *pixels)


def pack_hidden(out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The `hidden` tuple as it crosses a stage boundary: (carrier, labels, position_ids, doc_ids).

    DeepSpeed 0.19 back-propagates each float output of a stage with its own `backward` call
    (retain_graph for all but the last). The running aux loss depends on every router of the
    stage, so its own backward would walk nearly the whole stage a second time per micro-batch.
    One float tensor per boundary makes it one walk: carrier = [hidden.flatten(), hi, lo] in
    hidden's dtype, with aux = hi + lo (hi = aux rounded, lo = the remainder: ~16 mantissa bits
    in bf16; the gradient reaches aux through lo)."""
    aux, hidden, *text = out
    aux = aux.reshape(1)
    hi = aux.detach().to(hidden.dtype)
    lo = (aux - hi.float()).to(hidden.dtype)
    return (torch.cat([hidden.reshape(-1), hi, lo]), *text)


def unpack_hidden(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Inverse of `pack_hidden`: (aux (1,) fp32, hidden (B, L, H) as a view, labels, ...)."""
    carrier, labels, *rest = inputs
    b, t = labels.shape
    aux = carrier[-2:].float().sum().reshape(1)
    return (aux, carrier[:-2].view(b, t, -1), labels, *rest)


def _materialize(module: nn.Module | None, device: torch.device | str) -> None:
    if module is not None:
        module.to_empty(device=device)


def build_stage_model(
    enc_cfg: EncoderConfig,
    dec_cfg: DecoderConfig,
    image_token_id: int,
    *,
    sam: bool = False,
    clip: bool = False,
    layers: Sequence[int] = (),
    rotary: bool = False,
    head: bool = False,
    seed: int = 0,
) -> DeepSeekOCR:
    """DeepSeekOCR with only the named parts materialised (CPU) and initialised; the rest None.

    Initialisation runs the model's own `init_weights()` under `torch.manual_seed(seed)`;
    parts still on the meta device take no values and draw no random numbers.
    """
    with torch.device("meta"):
        model = DeepSeekOCR(DeepEncoder(enc_cfg), DecoderModel(dec_cfg), image_token_id)
    enc, dec = model.encoder, model.decoder
    cpu = torch.device("cpu")
    if sam:
        _materialize(enc.sam_model, cpu)
    if clip:
        for part in (enc.vision_model, enc.projector, dec.embed_tokens):
            _materialize(part, cpu)
        enc.image_newline = nn.Parameter(torch.empty_like(enc.image_newline, device=cpu))
        enc.view_seperator = nn.Parameter(torch.empty_like(enc.view_seperator, device=cpu))
    for i in layers:
        _materialize(dec.layers[i], cpu)
    if rotary:
        _materialize(dec.rotary, cpu)
    if head:
        _materialize(dec.norm, cpu)
        _materialize(dec.lm_head, cpu)
    torch.manual_seed(seed)
    model.init_weights()

    if not sam:
        enc.sam_model = None
    if not clip:
        enc.vision_model = enc.projector = None
        enc.image_newline = enc.view_seperator = None
        dec.embed_tokens = None
    dec.layers = nn.ModuleDict({str(i): dec.layers[i] for i in layers})  # keys stay decoder.layers.{i}
    if not rotary:
        dec.rotary = None
    if not head:
        dec.norm = dec.lm_head = None
    return model


class PrepareCache:
    """RoPE tables + attention info of the last (position_ids, doc_ids) seen, shared by the decoder
    units of one stage: the first layer of a stage computes them, the others reuse them."""

    def __init__(self) -> None:
        self.key: tuple[torch.Tensor, torch.Tensor, torch.dtype] | None = None
        self.value = None

    def get(
        self, decoder: DecoderModel, hidden: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor
    ):
        key = self.key
        if key is None or key[0] is not position_ids or key[1] is not doc_ids or key[2] != hidden.dtype:
            b, t, _ = hidden.shape
            self.value = decoder.prepare(
                b, t, hidden.device, hidden.dtype, position_ids=position_ids, doc_ids=doc_ids
            )
            self.key = (position_ids, doc_ids, hidden.dtype)
        return self.value


class SamUnit(nn.Module):
    """Unit 0: SAM + neck + compressor per view-size slot -> `vision` tuple."""

    def __init__(
        self,
        enc_cfg: EncoderConfig,
        dec_cfg: DecoderConfig,
        image_token_id: int,
        *,
        freeze: bool,
        view_sizes: Sequence[int] = VIEW_SIZES,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = build_stage_model(enc_cfg, dec_cfg, image_token_id, sam=True, seed=seed)
        self.view_sizes = tuple(view_sizes)
        self.channels = enc_cfg.clip.width
        # One zero-weight parameter per optimizer group (1-D: no decay; 2-D: decay): DeepSpeed's ZeRO-1
        # all-reduces the gradient norm once per group across stages, so every stage needs both groups.
        # FLAT_ALIGN elements each: they come first in the stage's flat parameter buffers.
        self.frozen_link = nn.Parameter(torch.zeros(FLAT_ALIGN))
        self.frozen_link_matrix = nn.Parameter(torch.zeros(8, FLAT_ALIGN // 8))
        if freeze:
            self.model.encoder.freeze_sam()

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        text, pixels = inputs[: NUM_TEXT + 2], inputs[NUM_TEXT + 2 :]
        assert len(pixels) == len(self.view_sizes), "pixel slots do not match the view sizes"
        link = ((self.frozen_link.sum() + self.frozen_link_matrix.sum()) * 0).reshape(1)  # in the graph, 0
        present = [p for p in pixels if p.shape[0] > 0]
        encoded = iter(self.model.sam_features(present))  # no SAM graph when frozen
        feats = []
        for side, p in zip(self.view_sizes, pixels):
            g = side // VIEW_DOWNSAMPLE
            f = next(encoded) if p.shape[0] > 0 else link.new_zeros(0, self.channels, g, g)
            feats.append(f + link.to(f.dtype))  # (N_k, C, g, g), joined to the graph
        return (link.float(), *feats, *text)


class ClipEmbedUnit(nn.Module):
    """Unit 1: CLIP + projector per slot, image table, token embedding + merge -> `hidden` tuple."""

    def __init__(
        self,
        enc_cfg: EncoderConfig,
        dec_cfg: DecoderConfig,
        image_token_id: int,
        *,
        view_sizes: Sequence[int] = VIEW_SIZES,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = build_stage_model(enc_cfg, dec_cfg, image_token_id, clip=True, seed=seed)
        self.num_slots = len(view_sizes)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        link, feats = inputs[0], inputs[1 : 1 + self.num_slots]
        input_ids, labels, position_ids, doc_ids, gather_index, row_counts = inputs[1 + self.num_slots :]
        aux = link.float()
        for f in feats:  # empty slots get a (zero) gradient too, as the engine requires
            if f.shape[0] == 0:
                aux = aux + f.sum().float() * 0
        present = [f for f in feats if f.shape[0] > 0]
        if present:
            table = self.model.image_table(self.model.clip_features(present))
            hidden = self.model.merge(input_ids, table, gather_index, row_counts.tolist())
        else:
            hidden = self.model.merge(input_ids, None, None, row_counts.tolist())
        return aux, hidden, labels, position_ids, doc_ids


class DecoderLayerUnit(nn.Module):
    """Units 2..L+1: one decoder layer; adds its MoE balance loss to the running aux scalar."""

    def __init__(
        self,
        enc_cfg: EncoderConfig,
        dec_cfg: DecoderConfig,
        image_token_id: int,
        *,
        layer_idx: int,
        cache: PrepareCache | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.model = build_stage_model(
            enc_cfg, dec_cfg, image_token_id, layers=[layer_idx], rotary=True, seed=seed
        )
        self.cache = cache or PrepareCache()
        self.expert_counts: torch.Tensor | None = None  # tokens per expert, summed since reset

    @property
    def layer(self) -> nn.Module:
        return self.model.decoder.layers[str(self.layer_idx)]

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        aux, hidden, labels, position_ids, doc_ids = inputs
        rope, info = self.cache.get(self.model.decoder, hidden, position_ids, doc_ids)
        hidden, layer_aux = self.layer(hidden, rope, info)
        counts = getattr(self.layer.mlp, "last_expert_counts", None)
        if counts is not None:
            counts = counts.detach().long()
            self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts
        return aux + layer_aux.float(), hidden, labels, position_ids, doc_ids


class HeadUnit(nn.Module):
    """Last unit: final norm + lm_head + next-token loss; returns loss = lm_loss + aux."""

    def __init__(
        self,
        enc_cfg: EncoderConfig,
        dec_cfg: DecoderConfig,
        image_token_id: int,
        *,
        loss_chunk_tokens: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if loss_chunk_tokens < 0:
            raise ValueError(f"parallel.loss_chunk_tokens must be >= 0, got {loss_chunk_tokens}")
        self.model = build_stage_model(enc_cfg, dec_cfg, image_token_id, head=True, seed=seed)
        self.loss_chunk_tokens = loss_chunk_tokens
        assert self.model.decoder.lm_head.bias is None, "the chunked loss assumes an unbiased lm_head"
        self.last_lm_loss: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None
        self.seen_labels: list[torch.Tensor] = []  # per micro-batch, checked against the data stream

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        aux, hidden, labels, _, _ = inputs
        decoder = self.model.decoder
        if self.loss_chunk_tokens:
            normed = decoder.norm(hidden)  # (B, L, H); decoder.head = lm_head(norm(.)), unbiased
            lm_loss, _ = chunked_next_token_loss(
                normed, decoder.lm_head.weight, labels, self.loss_chunk_tokens
            )
        else:
            lm_loss, _ = next_token_loss(decoder.head(hidden), labels)  # logits (B, L, V) fp32
        aux = aux.sum()
        self.last_lm_loss, self.last_aux_loss = lm_loss.detach(), aux.detach()
        self.seen_labels.append(labels.detach().to("cpu"))
        return lm_loss + aux


def unit_key_to_model_key(key: str) -> str | None:
    """A unit state-dict key -> the DeepSeekOCR key (None for the zero-weight link)."""
    if key in LINK_KEYS:
        return None
    if not key.startswith(UNIT_PREFIX):
        raise ValueError(f"unexpected pipeline unit key {key!r}")
    return key[len(UNIT_PREFIX) :]
