"""The full DeepSeek-OCR model: DeepEncoder + DeepSeek3B-MoE decoder joined by the embedding merge.

The forward is the fold of the unit list of `pipeline.units` (SAM + compressor, CLIP + projector +
merge, the decoder layers, the chunked-loss head) over this model, on a `PackedBatch` whose image
layout the loader's collate computed (`pipeline.layout`): the same units a DeepSpeed pipeline
stage runs, and nothing read back from the device. The pieces the units call:
`sam_features` (normalisation on the device, SAM + compressor per view size),
`clip_features` (CLIP + projector), `image_table` + `merge` (the features placed into the
token embeddings at the placeholder positions, release order: architecture.md section 3).

`model_configs` is the one translation of a `ModelConfig` (presets + overrides + the tokenizer's
ids) into component configs; `build_model` builds from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from decoder import DecoderConfig, DecoderModel, decoder_config
from deepencoder import DeepEncoder, EncoderConfig, encoder_config
from pipeline.batch import PackedBatch
from pipeline.config import ModelConfig
from pipeline.loss import IGNORE_INDEX, next_token_loss  # noqa: F401 (re-exported: one loss for all paths)
from pipeline.processing import normalize_pixels
from pipeline.units import UnitContext, fold, model_units

DEFAULT_LOSS_CHUNK_TOKENS = 2048

# Dynamo keeps one cache per code object, and one code object serves every block of a kind:
# SAM's windowed and global blocks (rel-pos tables of two sizes) for each view size in use, with
# batch size 1 specialised apart. Two view sizes (Small lines + Base paragraphs) already pass the
# default of 8 graphs, after which the blocks run eagerly (one warning; seen on GPU).
BLOCK_RECOMPILE_LIMIT = 64


def allow_block_recompiles(limit: int = BLOCK_RECOMPILE_LIMIT) -> None:
    """Raise dynamo's per-code-object graph limit for regionally compiled blocks (never lowers it)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


@dataclass
class ModelOutput:
    """loss = lm_loss + aux_loss (scalars); logits (B, L, V) fp32 when requested;
    num_label_tokens: tokens that contributed to lm_loss; expert_counts (n_moe_layers, E) or None."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    logits: torch.Tensor | None
    num_label_tokens: int
    expert_counts: torch.Tensor | None


class DeepSeekOCR(nn.Module):
    """Encoder + decoder; `image_token_id` marks the placeholder positions in input_ids.

    loss_chunk_tokens: rows of the lm_head projected at a time by the loss (0: whole logits).
    """

    def __init__(
        self,
        encoder: DeepEncoder,
        decoder: DecoderModel,
        image_token_id: int,
        loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
    ) -> None:
        super().__init__()
        n_embed, hidden = encoder.config.n_embed, decoder.config.hidden_size
        if n_embed != hidden:
            raise ValueError(f"encoder n_embed ({n_embed}) must equal the decoder hidden_size ({hidden})")
        if not 0 <= image_token_id < decoder.config.vocab_size:
            raise ValueError(
                f"image_token_id {image_token_id} outside the vocabulary [0, {decoder.config.vocab_size})"
            )
        if loss_chunk_tokens < 0:
            raise ValueError(f"loss_chunk_tokens must be >= 0, got {loss_chunk_tokens}")
        self.encoder = encoder
        self.decoder = decoder
        self.image_token_id = image_token_id
        self.loss_chunk_tokens = loss_chunk_tokens
        self.units = model_units(decoder.config.num_layers)  # a plain list: registers nothing

    def init_weights(self) -> None:
        self.encoder.init_weights()
        self.decoder.init_weights()

    def compile_regions(self, backend: str = "inductor") -> None:
        """Regional torch.compile of every unit's repeated blocks (SAM blocks, CLIP layers, decoder
        layers; state-dict keys unchanged). One compiled graph per block kind fuses the norms, RoPE,
        SwiGLU and routing elementwise work around the matmuls; "aot_eager" traces without kernels."""
        compile_blocks(self, self.units, backend)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute every unit's repeated blocks in backward (SAM, CLIP, decoder layers)."""
        checkpoint_blocks(self, self.units, enabled)

    # ---- the pieces the units run ----

    def sam_features(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per view size (N, 3, S, S) -> compressed SAM features (N, C, S/64, S/64).

        uint8 views are copied to the encoder's device as uint8 and normalised there
        (`normalize_pixels`); floating views are taken as already normalised.
        """
        param = next(self.encoder.sam_model.parameters())
        return [
            self.encoder.sam_features(normalize_pixels(p.to(param.device, non_blocking=True), param.dtype))
            for p in pixels
        ]

    def clip_features(self, compressed: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per view size (N, C, g, g) -> projected vision features (N, g*g, n_embed)."""
        return [self.encoder.clip_project(c) for c in compressed]

    def image_table(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(T + 2, n_embed): every view feature, then image_newline, then view_seperator."""
        flat = [f.flatten(0, 1) for f in features]  # (N*g*g, n_embed) each
        special = torch.stack([self.encoder.image_newline, self.encoder.view_seperator])  # (2, n_embed)
        return torch.cat([*(f.to(special.dtype) for f in flat), special])

    def merge(
        self,
        input_ids: torch.Tensor,
        table: torch.Tensor | None,
        image_positions: torch.Tensor,
        gather_index: torch.Tensor,
    ) -> torch.Tensor:
        """Token embeddings (B, L, H) with position image_positions[i] (flat b * L + t) replaced by
        table[gather_index[i]]; an index copy, so nothing is read back from the device."""
        embeds = self.decoder.embed_tokens(input_ids)  # (B, L, H)
        if image_positions.numel() != gather_index.numel():
            raise ValueError(
                f"{image_positions.numel()} image placeholders but {gather_index.numel()} image embeddings"
            )
        if image_positions.numel() == 0:
            return embeds
        if table is None:
            raise ValueError(f"{image_positions.numel()} image placeholders but no images")
        b, length, hidden = embeds.shape
        source = table[gather_index.to(table.device)].to(embeds.dtype)  # (P, H)
        flat = embeds.reshape(b * length, hidden).index_copy(0, image_positions.to(embeds.device), source)
        return flat.view(b, length, hidden)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """(B, L, H) decoder inputs of a batch: the SAM and CLIP + merge units (generation)."""
        _, hidden, *_ = fold(self.units[:2], self, batch.model_inputs(), UnitContext())
        return hidden

    # ---- training forward ----

    def forward(self, batch: PackedBatch, *, return_logits: bool = False) -> ModelOutput:
        """Next-token loss over labels != -100 (labels aligned with input_ids) + the MoE aux loss.

        The units in order; the head projects only the labelled positions the collate listed,
        `loss_chunk_tokens` at a time, so the (B, L, V) logits exist only when asked for."""
        ctx = UnitContext(
            loss_chunk_tokens=self.loss_chunk_tokens,
            loss_positions=batch.loss_positions,
            loss_targets=batch.loss_targets,
        )
        *body, head = self.units
        x = fold(body, self, batch.model_inputs(), ctx)
        loss, lm_loss, aux = head.forward(self, x, ctx)
        logits = None
        if return_logits:
            logits = self.decoder.head(x[1])  # (B, L, V) fp32
        counts = [ctx.expert_counts[i] for i in sorted(ctx.expert_counts)]
        return ModelOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux,
            logits=logits,
            num_label_tokens=batch.num_label_tokens,
            expert_counts=torch.stack(counts).long() if counts else None,
        )


def compile_blocks(model: nn.Module, units, backend: str = "inductor") -> dict[str, int]:
    """`Module.compile(backend=...)` every repeated block the `units` own in `model`, in place;
    returns the count compiled per unit kind (compilation happens at the first forward)."""
    validate_compile_options(True, backend)
    allow_block_recompiles()
    compiled: dict[str, int] = {}
    for unit in units:
        blocks = unit.blocks(model)
        for block in blocks:
            block.compile(backend=backend)
        compiled[unit.kind] = compiled.get(unit.kind, 0) + len(blocks)
    return compiled


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def validate_compile_options(compile_layers: object, backend: object) -> None:
    """ValueError naming parallel.compile_layers / parallel.compile_backend for bad values."""
    if not isinstance(compile_layers, bool):
        raise ValueError(f"parallel.compile_layers must be true or false, got {compile_layers!r}")
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"parallel.compile_backend must be one of {COMPILE_BACKENDS}, got {backend!r}")


def checkpoint_blocks(model: nn.Module, units, enabled: bool = True) -> int:
    """Activation checkpointing (recompute in backward, non-reentrant) of every repeated block the
    `units` own in `model`; returns the number of blocks set."""
    count = 0
    for unit in units:
        for block in unit.blocks(model):
            block.gradient_checkpointing = enabled
            count += 1
    return count


def component_configs(
    encoder_preset: str,
    decoder_preset: str,
    vocab_size: int | None = None,
    *,
    bos_token_id: int = 0,
    eos_token_id: int = 1,
    encoder_overrides: dict | None = None,
    decoder_overrides: dict | None = None,
) -> tuple[EncoderConfig, DecoderConfig]:
    """The one translation of presets + overrides into component configs.

    The vocabulary follows the tokenizer (`vocab_size`); a `vocab_size` in decoder_overrides may
    enlarge the embedding beyond it, never shrink it. The encoder's n_embed follows the decoder
    width unless `encoder_overrides` sets it, and must equal it.
    """
    overrides = dict(decoder_overrides or {})
    wanted = overrides.pop("vocab_size", vocab_size)
    if vocab_size is not None and wanted is not None and int(wanted) < vocab_size:
        raise ValueError(
            f"model.decoder_overrides.vocab_size={wanted} is smaller than the tokenizer's {vocab_size} ids"
        )
    if wanted is not None:
        overrides["vocab_size"] = int(wanted)
    dec = decoder_config(decoder_preset, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **overrides)
    enc = encoder_config(encoder_preset, **{"n_embed": dec.hidden_size, **dict(encoder_overrides or {})})
    if enc.n_embed != dec.hidden_size:
        raise ValueError(
            f"the encoder projects to n_embed={enc.n_embed} but decoder {decoder_preset!r} has "
            f"hidden_size={dec.hidden_size}: set model.encoder_overrides.n_embed={dec.hidden_size}"
        )
    return enc, dec


def model_configs(
    model: ModelConfig, vocab_size: int | None = None, *, bos_token_id: int = 0, eos_token_id: int = 1
) -> tuple[EncoderConfig, DecoderConfig]:
    """`component_configs` of a run's `ModelConfig` (the tokenizer's vocabulary and ids when given)."""
    return component_configs(
        model.encoder,
        model.decoder,
        vocab_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        encoder_overrides=dict(model.encoder_overrides),
        decoder_overrides=dict(model.decoder_overrides),
    )


def build_model(
    encoder_preset: str,
    decoder_preset: str,
    vocab_size: int | None = None,
    *,
    image_token_id: int,
    bos_token_id: int = 0,
    eos_token_id: int = 1,
    encoder_overrides: dict | None = None,
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
    **decoder_overrides,
) -> DeepSeekOCR:
    """DeepSeekOCR from named presets (`component_configs`). Build under `torch.device("meta")` to
    get the structure without allocating (then `to_empty` + `init_weights`)."""
    enc, dec = component_configs(
        encoder_preset,
        decoder_preset,
        vocab_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        encoder_overrides=encoder_overrides,
        decoder_overrides=decoder_overrides,
    )
    return DeepSeekOCR(DeepEncoder(enc), DecoderModel(dec), image_token_id, loss_chunk_tokens)
