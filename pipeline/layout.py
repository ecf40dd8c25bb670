"""Where every image feature goes in the token sequence: the layout plan, computed on the data side.

Implements ../shared/spec/architecture.md section 3 (token layout) after the release's
`DeepseekOCRModel.forward`: every view is encoded to a q x q grid of features (q = side / 64);
per image the stitched local grid ((h*q) x (w*q), `image_newline` after each stitched row) comes
first when there are tiles, then the global grid (newline after each row), then
`view_seperator`; the result fills the `<image>` placeholder positions in order.

`layout_images` runs once per batch in the loader's collate (a worker process, on the CPU) and
returns tensors only, so the model's step reads nothing back from the device:

    pixels[k]     (N_k, 3, S_k, S_k) uint8 views of the k-th view side in batch order (`processing.view_sizes()`; a side the
                  batch lacks has an empty (0, 3, S_k, S_k) slot: the slot layout never changes)
    gather_index  (P,) int64 rows of the feature table cat(features of slot 0 flattened to
                  (N_0 * q_0^2, H), slot 1, ..., image_newline, view_seperator) for the P
                  placeholders of the batch in (row, position) order
    row_counts    (B,) int64 placeholders per row
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.batch import ImageViews
from pipeline.processing import VIEW_DOWNSAMPLE
from pipeline.processing import view_sizes as mode_view_sizes

_NEWLINE, _SEPARATOR = -1, -2  # sentinels in the layout before the table size is known


@dataclass
class ImageLayout:
    """The images of a batch as the model consumes them (see the module docstring)."""

    pixels: tuple[torch.Tensor, ...]
    gather_index: torch.Tensor
    row_counts: torch.Tensor


def _grid_layout(first_cells: torch.Tensor, w: int, h: int, q: int) -> torch.Tensor:
    """Table indices of a stitched w x h grid of q x q views, with a newline per stitched row."""
    cells = torch.arange(q * q, dtype=torch.long).view(1, 1, q, q)
    tiles = first_cells.view(h, w, 1, 1) + cells  # (h, w, q, q)
    stitched = tiles.permute(0, 2, 1, 3).reshape(h * q, w * q)  # (h*q, w*q)
    newline = torch.full((h * q, 1), _NEWLINE, dtype=torch.long)
    return torch.cat([stitched, newline], dim=1).flatten()  # (h*q*(w*q+1),)


def layout_images(
    images: Sequence[Sequence[ImageViews]], view_sizes: Sequence[int] | None = None
) -> ImageLayout:
    """Group every view of the batch by side into the slots (default: every mode's view sizes)
    and compute the gather index."""
    view_sizes = tuple(mode_view_sizes() if view_sizes is None else view_sizes)
    slot_of = {side: k for k, side in enumerate(view_sizes)}
    groups: list[list[torch.Tensor]] = [[] for _ in view_sizes]

    def place(view: torch.Tensor) -> tuple[int, int]:
        side = view.shape[-1]
        if side not in slot_of:
            raise ValueError(f"view side {side} is not an image-mode view size; sizes: {list(view_sizes)}")
        if view.dtype != torch.uint8:
            raise TypeError(f"views must be uint8 RGB (the model normalises them), got {view.dtype}")
        k = slot_of[side]
        groups[k].append(view)
        return k, len(groups[k]) - 1

    refs = []
    for row_images in images:
        row_refs = []
        for views in row_images:
            tile_refs = []
            if views.tiles is not None:
                w, h = views.grid
                if views.tiles.shape[0] != w * h:
                    raise ValueError(f"ImageViews has {views.tiles.shape[0]} tiles for grid {views.grid}")
                tile_refs = [place(tile) for tile in views.tiles]
            row_refs.append((tile_refs, views.grid, place(views.global_view)))
        refs.append(row_refs)

    offsets, total = [], 0
    for side, group in zip(view_sizes, groups):
        offsets.append(total)
        total += len(group) * (side // VIEW_DOWNSAMPLE) ** 2

    def first_cell(ref: tuple[int, int]) -> int:
        k, j = ref
        return offsets[k] + j * (view_sizes[k] // VIEW_DOWNSAMPLE) ** 2

    pieces, row_counts = [], []
    for row_refs in refs:
        count = 0
        for tile_refs, (w, h), global_ref in row_refs:
            parts = []
            if tile_refs:
                q = view_sizes[tile_refs[0][0]] // VIEW_DOWNSAMPLE
                firsts = torch.tensor([first_cell(r) for r in tile_refs], dtype=torch.long)
                parts.append(_grid_layout(firsts, w, h, q))
            q = view_sizes[global_ref[0]] // VIEW_DOWNSAMPLE
            parts.append(_grid_layout(torch.tensor([first_cell(global_ref)]), 1, 1, q))
            parts.append(torch.tensor([_SEPARATOR], dtype=torch.long))
            layout = torch.cat(parts)
            count += layout.numel()
            pieces.append(layout)
        row_counts.append(count)
    index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    index = torch.where(index == _NEWLINE, total, index)
    index = torch.where(index == _SEPARATOR, total + 1, index)
    pixels = tuple(
        torch.stack(group) if group else torch.zeros(0, 3, side, side, dtype=torch.uint8)
        for side, group in zip(view_sizes, groups)
    )  # (N_k, 3, S_k, S_k) each
    return ImageLayout(pixels, index, torch.tensor(row_counts, dtype=torch.long))
