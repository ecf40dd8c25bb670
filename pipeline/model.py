"""The full DeepSeek-OCR model: DeepEncoder + DeepSeek3B-MoE decoder joined by the embedding merge.

Implements ../shared/spec/architecture.md section 3 (token layout) after the release's
`DeepseekOCRModel.forward`: every view is encoded to a q x q grid of n_embed features; per
image the stitched local grid ((h*q) x (w*q), `image_newline` after each stitched row) comes
first when there are tiles, then the global grid (newline after each row), then
`view_seperator`; the result is scattered into the `<image>` placeholder positions in order.

The pieces are separately callable so a pipeline stage can run one of them:
`plan_images` (CPU, data side: uint8 pixels grouped by view size + an int64 gather index),
`sam_features` (normalisation on the device, SAM + compressor per size group),
`clip_features` (CLIP + projector),
`image_table` + `merge` (layout and scatter into the token embeddings), then the decoder.
Views of equal size are encoded in one call (one call per distinct size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from decoder import DecoderModel, decoder_config
from deepencoder import DeepEncoder, encoder_config
from pipeline.batch import ImageViews, PackedBatch
from pipeline.loss import IGNORE_INDEX, next_token_loss  # noqa: F401 (re-exported: one loss for all paths)
from pipeline.processing import VIEW_DOWNSAMPLE, normalize_pixels

_NEWLINE, _SEPARATOR = -1, -2  # sentinels in the layout before the table size is known


@dataclass
class ImagePlan:
    """How the images of a batch become placeholder embeddings (all tensors, PP-friendly).

    sizes[k]: view side of group k; pixels[k]: (N_k, 3, S_k, S_k) views of that side in
    batch order, uint8 RGB from `pipeline.processing` (or already-normalised floats).
    gather_index (P,) int64 indexes the table cat(features of group 0 flattened to
    (N_0*q_0^2, H), group 1, ..., image_newline, view_seperator) for the P placeholders of the
    batch in (row, position) order. row_counts[b]: placeholders of row b.
    """

    sizes: list[int]
    pixels: list[torch.Tensor]
    gather_index: torch.Tensor
    row_counts: list[int]

    @property
    def num_features(self) -> int:
        """Rows of the table before the newline and separator entries."""
        return sum(p.shape[0] * (s // VIEW_DOWNSAMPLE) ** 2 for s, p in zip(self.sizes, self.pixels))

    def to_tensors(self) -> tuple[torch.Tensor, ...]:
        """Flat tuple for a pipeline-stage boundary: (header, *pixels, gather_index, row_counts).

        header = [number of size groups, *sizes] (int64); everything else as in the fields.
        """
        header = torch.tensor([len(self.sizes), *self.sizes], dtype=torch.long)
        counts = torch.tensor(self.row_counts, dtype=torch.long)
        return (header, *self.pixels, self.gather_index, counts)

    @classmethod
    def from_tensors(cls, tensors: tuple[torch.Tensor, ...]) -> ImagePlan:
        """Inverse of `to_tensors`."""
        header = tensors[0].tolist()
        n = header[0]
        if len(tensors) != n + 3:
            raise ValueError(f"an ImagePlan with {n} size groups has {n + 3} tensors, got {len(tensors)}")
        return cls(
            sizes=header[1:],
            pixels=list(tensors[1 : 1 + n]),
            gather_index=tensors[1 + n],
            row_counts=tensors[2 + n].tolist(),
        )


def _grid_layout(first_cells: torch.Tensor, w: int, h: int, q: int) -> torch.Tensor:
    """Table indices of a stitched w x h grid of q x q views, with a newline per stitched row."""
    cells = torch.arange(q * q, dtype=torch.long).view(1, 1, q, q)
    tiles = first_cells.view(h, w, 1, 1) + cells  # (h, w, q, q)
    stitched = tiles.permute(0, 2, 1, 3).reshape(h * q, w * q)  # (h*q, w*q)
    newline = torch.full((h * q, 1), _NEWLINE, dtype=torch.long)
    return torch.cat([stitched, newline], dim=1).flatten()  # (h*q*(w*q+1),)


def plan_images(images: list[list[ImageViews]]) -> ImagePlan:
    """Group all views by size and compute the placeholder gather index (no model needed)."""
    groups: dict[int, list[torch.Tensor]] = {}
    refs: list[list[tuple[list[tuple[int, int]], tuple[int, int], tuple[int, int]]]] = []
    for row_images in images:
        row_refs = []
        for views in row_images:
            tile_refs: list[tuple[int, int]] = []
            if views.tiles is not None:
                w, h = views.grid
                if views.tiles.shape[0] != w * h:
                    raise ValueError(f"ImageViews has {views.tiles.shape[0]} tiles for grid {views.grid}")
                side = views.tiles.shape[-1]
                for tile in views.tiles:
                    tile_refs.append((side, len(groups.setdefault(side, []))))
                    groups[side].append(tile)
            side = views.global_view.shape[-1]
            global_ref = (side, len(groups.setdefault(side, [])))
            groups[side].append(views.global_view)
            row_refs.append((tile_refs, views.grid, global_ref))
        refs.append(row_refs)

    sizes = sorted(groups)
    for side in sizes:
        if side % VIEW_DOWNSAMPLE:
            raise ValueError(f"view side {side} is not a multiple of {VIEW_DOWNSAMPLE}")
    dtypes = {v.dtype for side in sizes for v in groups[side]}
    if len(dtypes) > 1:  # stacking would promote uint8 to float without normalising it
        raise ValueError(f"the views of a batch mix dtypes {sorted(map(str, dtypes))}; use uint8 throughout")
    offsets, total = {}, 0
    for side in sizes:
        offsets[side] = total
        total += len(groups[side]) * (side // VIEW_DOWNSAMPLE) ** 2

    def first_cell(ref: tuple[int, int]) -> int:
        side, j = ref
        return offsets[side] + j * (side // VIEW_DOWNSAMPLE) ** 2

    pieces, row_counts = [], []
    for row_refs in refs:
        count = 0
        for tile_refs, (w, h), global_ref in row_refs:
            parts = []
            if tile_refs:
                q = tile_refs[0][0] // VIEW_DOWNSAMPLE
                firsts = torch.tensor([first_cell(r) for r in tile_refs], dtype=torch.long)
                parts.append(_grid_layout(firsts, w, h, q))
            q = global_ref[0] // VIEW_DOWNSAMPLE
            parts.append(_grid_layout(torch.tensor([first_cell(global_ref)]), 1, 1, q))
            parts.append(torch.tensor([_SEPARATOR], dtype=torch.long))
            layout = torch.cat(parts)
            count += layout.numel()
            pieces.append(layout)
        row_counts.append(count)
    index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    index = torch.where(index == _NEWLINE, total, index)
    index = torch.where(index == _SEPARATOR, total + 1, index)
    pixels = [torch.stack(groups[side]) for side in sizes]  # (N_k, 3, S_k, S_k) each
    return ImagePlan(sizes=sizes, pixels=pixels, gather_index=index, row_counts=row_counts)


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
    """Encoder + decoder; `image_token_id` marks the placeholder positions in input_ids."""

    def __init__(self, encoder: DeepEncoder, decoder: DecoderModel, image_token_id: int) -> None:
        super().__init__()
        n_embed, hidden = encoder.config.n_embed, decoder.config.hidden_size
        if n_embed != hidden:
            raise ValueError(f"encoder n_embed ({n_embed}) must equal the decoder hidden_size ({hidden})")
        if not 0 <= image_token_id < decoder.config.vocab_size:
            raise ValueError(
                f"image_token_id {image_token_id} outside the vocabulary [0, {decoder.config.vocab_size})"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.image_token_id = image_token_id

    def init_weights(self) -> None:
        self.encoder.init_weights()
        self.decoder.init_weights()

    def compile_regions(self, backend: str = "inductor") -> None:
        """Regional torch.compile of the repeated blocks: decoder layers, SAM blocks, CLIP layers
        (state-dict keys unchanged). One compiled graph per block kind fuses the norms, RoPE, SwiGLU
        and routing elementwise work around the matmuls; "aot_eager" traces without generating kernels."""
        allow_block_recompiles()
        self.decoder.compile_layers(backend=backend)
        for block in self.encoder.sam_model.blocks:
            block.compile(backend=backend)
        for layer in self.encoder.vision_model.transformer.layers:
            layer.compile(backend=backend)

    # ---- vision side, one piece per pipeline stage ----

    def sam_features(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per size group (N, 3, S, S) -> compressed SAM features (N, C, S/64, S/64).

        uint8 views are copied to the encoder's device as uint8 and normalised there
        (`normalize_pixels`); floating views are taken as already normalised.
        """
        param = next(self.encoder.parameters())
        return [
            self.encoder.sam_features(normalize_pixels(p.to(param.device, non_blocking=True), param.dtype))
            for p in pixels
        ]

    def clip_features(self, compressed: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per size group (N, C, g, g) -> projected vision features (N, g*g, n_embed)."""
        return [self.encoder.clip_project(c) for c in compressed]

    def encode_images(self, plan: ImagePlan) -> list[torch.Tensor]:
        """All views of a plan -> per size group (N, g*g, n_embed); one encoder call per size."""
        return self.clip_features(self.sam_features(plan.pixels))

    def image_table(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(T + 2, n_embed): every view feature, then image_newline, then view_seperator."""
        flat = [f.flatten(0, 1) for f in features]  # (N*g*g, n_embed) each
        special = torch.stack([self.encoder.image_newline, self.encoder.view_seperator])  # (2, n_embed)
        return torch.cat([*(f.to(special.dtype) for f in flat), special])

    def merge(
        self,
        input_ids: torch.Tensor,
        table: torch.Tensor | None,
        gather_index: torch.Tensor | None,
        row_counts: list[int] | None = None,
    ) -> torch.Tensor:
        """Token embeddings (B, L, H) with the placeholders replaced by table[gather_index] in order."""
        embeds = self.decoder.embed_tokens(input_ids)  # (B, L, H)
        mask = input_ids == self.image_token_id  # (B, L)
        per_row = mask.sum(dim=1).tolist()
        if row_counts is not None and per_row != row_counts:
            bad = [(b, n, e) for b, (n, e) in enumerate(zip(per_row, row_counts)) if n != e]
            raise ValueError(
                "image placeholders in the text do not match the images: "
                + ", ".join(f"row {b} has {n} placeholders, its images need {e}" for b, n, e in bad)
            )
        total = sum(per_row)
        given = 0 if gather_index is None else gather_index.numel()
        if total != given:
            raise ValueError(f"{total} image placeholders in input_ids but {given} image embeddings")
        if total == 0:
            return embeds
        assert table is not None and gather_index is not None
        source = table[gather_index.to(table.device)].to(embeds.dtype)  # (P, H)
        return embeds.masked_scatter(mask.unsqueeze(-1), source)

    def embed_inputs(self, input_ids: torch.Tensor, images: list[list[ImageViews]]) -> torch.Tensor:
        """(B, L) ids + per-row images -> (B, L, H) decoder inputs (encoder run as needed)."""
        if len(images) != input_ids.shape[0]:
            raise ValueError(f"images lists {len(images)} rows, input_ids has {input_ids.shape[0]}")
        plan = plan_images(images)
        if plan.gather_index.numel() == 0:
            return self.merge(input_ids, None, None, plan.row_counts)
        table = self.image_table(self.encode_images(plan))
        return self.merge(input_ids, table, plan.gather_index, plan.row_counts)

    # ---- training forward ----

    def forward(self, batch: PackedBatch, *, return_logits: bool = False) -> ModelOutput:
        """Next-token loss over labels != -100 (labels aligned with input_ids) + the MoE aux loss."""
        embeds = self.embed_inputs(batch.input_ids, batch.images)
        out = self.decoder(inputs_embeds=embeds, position_ids=batch.position_ids, doc_ids=batch.doc_ids)
        lm_loss, count = next_token_loss(out.logits, batch.labels.to(out.logits.device))
        return ModelOutput(
            loss=lm_loss + out.aux_loss,
            lm_loss=lm_loss,
            aux_loss=out.aux_loss,
            logits=out.logits if return_logits else None,
            num_label_tokens=count,
            expert_counts=out.expert_counts,
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
    **decoder_overrides,
) -> DeepSeekOCR:
    """DeepSeekOCR from named presets; the vocabulary follows the tokenizer (`vocab_size`).

    decoder_overrides replace DecoderConfig fields; the encoder's n_embed follows the decoder
    width unless `encoder_overrides` sets it. Build under `torch.device("meta")` to get the
    structure without allocating (then `to_empty` + `init_weights`).
    """
    if vocab_size is not None:
        decoder_overrides["vocab_size"] = vocab_size
    dec_cfg = decoder_config(
        decoder_preset, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **decoder_overrides
    )
    enc_kwargs = {"n_embed": dec_cfg.hidden_size, **(encoder_overrides or {})}
    enc_cfg = encoder_config(encoder_preset, **enc_kwargs)
    return DeepSeekOCR(DeepEncoder(enc_cfg), DecoderModel(dec_cfg), image_token_id)
