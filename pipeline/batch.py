"""Typed containers that carry one sample and one packed batch through the data path.

Shared contract between image processing / prompt building (`pipeline.processing`,
`pipeline.prompts`), packing (`pipeline.data.packing`) and the model
(`pipeline.model`). Token layout follows ../shared/spec/architecture.md section 3-4.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageViews:
    """One image after mode processing.

    global_view: (3, S, S) uint8 RGB pixels of the global view (S = base_size or image_size);
        the model normalises them on its device (`pipeline.processing.normalize_pixels`), and
        takes floating views as already normalised.
    tiles: (n, 3, T, T) uint8 local crops (Gundam) in row-major order, or None.
    grid: (w, h) tile grid, (1, 1) when there are no tiles.
    num_placeholders: number of `<image>` tokens this image occupies in the text.
    """

    global_view: torch.Tensor
    tiles: torch.Tensor | None = None
    grid: tuple[int, int] = (1, 1)
    num_placeholders: int = 0


@dataclass
class Example:
    """One tokenized training/eval sample (unpacked).

    input_ids/labels have equal length; labels are -100 where no loss is taken
    (image placeholders, prompt) and otherwise equal input_ids: they are aligned
    with the inputs and the model shifts them (logits at t predict labels[t+1]).
    images are in the order their placeholders appear in input_ids. source/key
    identify the sample in logs.
    """

    input_ids: list[int]
    labels: list[int]
    images: list[ImageViews] = field(default_factory=list)
    source: str = ""
    key: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PackedBatch:
    """A batch of fixed-length rows, each holding one or more whole documents.

    input_ids, labels, position_ids, doc_ids: (B, L) int64. position_ids restart at 0
    for each document; doc_ids number the documents of a row 0, 1, 2, ... and are -1
    on the end-of-row padding (which also has label -100). Attention never crosses a
    doc_id boundary. images[b] lists the ImageViews of row b in placeholder order.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    images: list[list[ImageViews]]
    keys: list[list[str]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens in the batch."""
        return int((self.doc_ids >= 0).sum())

    @property
    def num_documents(self) -> int:
        """Samples packed into the batch (doc ids count 0, 1, ... per row)."""
        return int((self.doc_ids.max(dim=1).values + 1).sum())
