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
    """A batch as the model consumes it: tensors only, built once by the loader's collate.

        input_ids, labels, position_ids, doc_ids: (B, L) int64. position_ids restart at 0 for each
        document; doc_ids number the documents of a row 0, 1, 2, ... and are -1 on the end-of-row
        padding (which also has label -100). Attention never crosses a doc_id boundary. Labels are
        aligned with input_ids (the loss shifts them).
        image_positions (P,) int64: flat positions b * L + t of the `<image>` placeholders in order;
        gather_index (P,), row_counts (B,), pixels (one slot per `processing.view_sizes()` side):
        the image layout of `pipeline.layout`.
        loss_positions (N,) int64: flat positions b * L + t whose next label labels[b, t + 1] is not
        -100; loss_targets (N,): those labels. Counts are host ints, so no step reads one back
    (num_tokens: non-padding tokens; num_documents: samples; num_images: images).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    image_positions: torch.Tensor
    gather_index: torch.Tensor
    row_counts: torch.Tensor
    pixels: tuple[torch.Tensor, ...]
    loss_positions: torch.Tensor
    loss_targets: torch.Tensor
    num_tokens: int
    num_documents: int
    num_images: int
    keys: list[list[str]] = field(default_factory=list)

    TENSORS = (
        "input_ids", "labels", "position_ids", "doc_ids", "image_positions", "gather_index",
        "row_counts", "loss_positions", "loss_targets",
    )  # fmt: skip

    @property
    def num_label_tokens(self) -> int:
        return int(self.loss_targets.numel())

    def map(self, fn) -> PackedBatch:
        """A copy with `fn` applied to every tensor (device moves, pinning)."""
        moved = {name: fn(getattr(self, name)) for name in self.TENSORS}
        return PackedBatch(
            **moved,
            pixels=tuple(fn(p) for p in self.pixels),
            num_tokens=self.num_tokens,
            num_documents=self.num_documents,
            num_images=self.num_images,
            keys=self.keys,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:
        """Page-locked host copies, so `to(cuda, non_blocking=True)` overlaps the step."""
        return self.map(lambda t: t.pin_memory())

    def model_inputs(self) -> tuple[torch.Tensor, ...]:
        """The first unit's input tuple (`pipeline.units`): the same on every training path."""
        return (
            self.input_ids, self.labels, self.position_ids, self.doc_ids,
            self.image_positions, self.gather_index, *self.pixels,
        )  # fmt: skip
