"""The units of `pipeline.units` as DeepSpeed pipeline layers, and the tensors between stages.

A pipeline layer is a `StageUnit`: one `pipeline.units.Unit` plus the part of the model it owns.
Each builds the full `DeepSeekOCR` on the meta device, materialises only the unit's `paths` and
sets the other parts to None (torchtitan's pipeline split), and runs the unit's own forward, the
one `DeepSeekOCR.forward` folds; its state-dict keys are `"model." + DeepSeekOCR key`, so
consolidation is a union of unit state dicts. The tuples are those of pipeline/units.py.

Across a stage boundary the `hidden` tuple is packed into one float tensor (`pack_hidden`):
carrier (B*L*H + 2,), labels, position_ids, doc_ids. The SAM features' sizes change per
micro-batch: a split with SAM's output on a boundary builds the engine with `dynamic_shape=True`,
every other split with fixed shapes.

The `inputs` tuple never crosses a p2p boundary: the first stage loads it from the data
iterator (DeepSpeed's `_exec_load_micro_batch` clones it to the device and, under reentrant
checkpointing, marks only floating tensors as requiring grad), so uint8 pixels travel as uint8
up to SAM. Labels ride along in the tuple, so the last stage computes the loss from exactly the
rows the first stage embedded (the engine's `loss_fn` is unused); there the head selects the
labelled positions from the labels it receives (one host sync on the last stage).

DeepSpeed marks every received float tensor as requiring grad and sends its gradient back, and
calls backward on every float output of a non-last stage: hence the SAM unit's `link` =
(sum(frozen_link) + sum(frozen_link_matrix)) * 0, trainable parameters joined with weight zero,
so the frozen SAM stage has a graph (and optimizer parameters) without computing any SAM
gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from decoder import DecoderConfig, DecoderModel
from deepencoder import DeepEncoder, EncoderConfig
from pipeline.model import DeepSeekOCR
from pipeline.units import PrepareCache, Unit, UnitContext, module_at

UNIT_PREFIX = "model."  # unit state-dict key = UNIT_PREFIX + DeepSeekOCR key
LINK_KEYS = ("frozen_link", "frozen_link_matrix")  # the SAM unit's zero-weight parameters; not model weights
# DeepSpeed's bf16 / ZeRO optimizers pack a stage's trainable parameters back to back into one flat
# buffer per group and point the parameters into it. A parameter whose size is not a multiple of
# this many elements moves every later one off 16-byte alignment, and cuBLAS then runs align-1
# GEMM kernels (seen on H200: 1-element links made them ~40% of PP0's GPU time).
FLAT_ALIGN = 64


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


def build_stage_model(
    enc_cfg: EncoderConfig, dec_cfg: DecoderConfig, image_token_id: int, unit: Unit, *, seed: int = 0
) -> DeepSeekOCR:
    """DeepSeekOCR with only `unit.paths` materialised (CPU) and initialised; the other parts None.

    Initialisation runs the model's own `init_weights()` under `torch.manual_seed(seed)`;
    parts still on the meta device take no values and draw no random numbers.
    """
    with torch.device("meta"):
        model = DeepSeekOCR(DeepEncoder(enc_cfg), DecoderModel(dec_cfg), image_token_id)
    cpu = torch.device("cpu")
    for path in unit.paths:
        owner, _, name = path.rpartition(".")
        obj = module_at(model, path)
        if isinstance(obj, nn.Parameter):
            setattr(module_at(model, owner), name, nn.Parameter(torch.empty_like(obj, device=cpu)))
        else:
            obj.to_empty(device=cpu)
    torch.manual_seed(seed)
    model.init_weights()

    owned = set(unit.paths)
    enc, dec = model.encoder, model.decoder
    for name in ("sam_model", "vision_model", "projector", "image_newline", "view_seperator"):
        if f"encoder.{name}" not in owned:
            setattr(enc, name, None)
    for name in ("embed_tokens", "rotary", "norm", "lm_head"):
        if f"decoder.{name}" not in owned:
            setattr(dec, name, None)
    layers = [unit.layer_idx] if unit.kind == "decoder_layer" else []
    dec.layers = nn.ModuleDict({str(i): dec.layers[i] for i in layers})  # keys stay decoder.layers.{i}
    return model


class StageUnit(nn.Module):
    """One unit as a pipeline layer: its part of the model, and the unit's own forward.

    The SAM unit holds the zero-weight link parameters (with `freeze`, SAM itself is frozen); the
    decoder units of a rank share one PrepareCache and sum their expert counts since the last
    reset; the head returns loss = lm_loss + aux and keeps both, and the labels it saw.
    """

    def __init__(
        self,
        unit: Unit,
        enc_cfg: EncoderConfig,
        dec_cfg: DecoderConfig,
        image_token_id: int,
        *,
        freeze: bool = False,
        loss_chunk_tokens: int = 0,
        cache: PrepareCache | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if loss_chunk_tokens < 0:
            raise ValueError(f"parallel.loss_chunk_tokens must be >= 0, got {loss_chunk_tokens}")
        self.unit = unit
        self.model = build_stage_model(enc_cfg, dec_cfg, image_token_id, unit, seed=seed)
        self.ctx = UnitContext(cache=cache or PrepareCache(), loss_chunk_tokens=loss_chunk_tokens)
        if unit.kind == "sam":
            # One zero-weight parameter per optimizer group (1-D: no decay; 2-D: decay): DeepSpeed's
            # ZeRO-1 all-reduces the gradient norm once per group across stages, so every stage
            # needs both groups. FLAT_ALIGN elements each: they come first in the flat buffers.
            self.frozen_link = nn.Parameter(torch.zeros(FLAT_ALIGN))
            self.frozen_link_matrix = nn.Parameter(torch.zeros(8, FLAT_ALIGN // 8))
            if freeze:
                self.model.encoder.freeze_sam()
        if unit.kind == "head":
            assert self.model.decoder.lm_head.bias is None, "the chunked loss assumes an unbiased lm_head"
        self.expert_counts: dict[int, torch.Tensor] = {}
        self.last_lm_loss: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None
        self.seen_labels: list[torch.Tensor] = []  # per micro-batch, checked against the data stream

    def forward(self, inputs: tuple[torch.Tensor, ...]):
        if self.unit.kind == "sam":
            self.ctx.link = (self.frozen_link.sum() + self.frozen_link_matrix.sum()) * 0  # in the graph, 0
        out = self.unit.forward(self.model, inputs, self.ctx)
        for layer, counts in self.ctx.expert_counts.items():
            counts = counts.long()
            self.expert_counts[layer] = (
                counts + self.expert_counts[layer] if layer in self.expert_counts else counts
            )
        self.ctx.expert_counts.clear()
        if self.unit.kind != "head":
            return out
        loss, lm_loss, aux = out
        self.last_lm_loss, self.last_aux_loss = lm_loss.detach(), aux.detach()
        self.seen_labels.append(inputs[2].detach().to("cpu"))
        return loss

    def reset_step_records(self) -> None:
        self.expert_counts = {}
        self.seen_labels.clear()


def unit_key_to_model_key(key: str) -> str | None:
    """A unit state-dict key -> the DeepSeekOCR key (None for the zero-weight link)."""
    if key in LINK_KEYS:
        return None
    if not key.startswith(UNIT_PREFIX):
        raise ValueError(f"unexpected pipeline unit key {key!r}")
    return key[len(UNIT_PREFIX) :]
