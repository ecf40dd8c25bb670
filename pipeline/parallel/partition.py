"""The split of the model's units (`pipeline.units.model_units`) into pipeline stages.

Parameter counts come from the real modules built on the meta device (no memory, no init
cost), counted by each unit's own `parameters`, so they follow whatever `deepencoder` /
`decoder` build for the configured presets.

Stage splits (DeepSpeed's `parts` convention: pp+1 unit boundaries, parts[0] = 0,
parts[-1] = number of units; stage s holds units parts[s]..parts[s+1]-1):
- "paper" (DeepSeek-OCR, arXiv 2510.18234 section 3.5; ../shared/spec/training.md):
  PP=4 is [sam+compressor | clip+... | decoder 0-5 | decoder 6-11 + head]; PP=2 is
  [sam, clip, decoder 0-5 | decoder 6-11 + head]; PP=1 is everything. PP >= 4 generalises
  the paper layout (SAM alone, CLIP alone, the decoder layers spread evenly over the other
  stages, earlier stages taking the remainder because the last also holds the head), e.g.
  PP=8 gives two decoder layers per stage. Any other PP falls back to "parameters".
- "balanced": contiguous split minimising the largest per-stage training cost, given per-unit
  costs (`pipeline.parallel.memory.unit_costs`: training FLOPs of one micro-batch, the frozen
  SAM forward only, the 129,280-wide head 3 x 2 h V per token). For the full preset at PP=4,
  8192-token rows with 15% vision tokens and checkpointing, it is
  [SAM + CLIP + decoder 0-1 | decoder 2-6 | decoder 7-10 | decoder 11 + head]: the paper split
  puts about twice the mean stage cost on its last stage and a fraction of it on the first two.
- "parameters": contiguous split minimising the largest per-stage trainable parameter
  count (what DeepSpeed's partition_method="parameters" balances; a frozen SAM weighs 0).
- explicit `parallel.partition` boundaries (override the method).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from decoder import DecoderModel
from deepencoder import DeepEncoder
from pipeline.config import ModelConfig
from pipeline.model import DeepSeekOCR, model_configs
from pipeline.units import Unit

METHODS = ("paper", "balanced", "parameters")


@dataclass(frozen=True)
class UnitCount:
    """One unit of `pipeline.units.model_units` with its trainable and frozen parameter counts."""

    unit: Unit
    trainable: int
    frozen: int

    @property
    def name(self) -> str:
        return self.unit.name

    @property
    def kind(self) -> str:
        return self.unit.kind

    @property
    def layer_idx(self) -> int | None:
        return self.unit.layer_idx

    @property
    def params(self) -> int:
        return self.trainable + self.frozen


@dataclass
class Stage:
    index: int
    units: list[UnitCount]

    @property
    def trainable(self) -> int:
        return sum(u.trainable for u in self.units)

    @property
    def frozen(self) -> int:
        return sum(u.frozen for u in self.units)

    @property
    def params(self) -> int:
        return self.trainable + self.frozen

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    def label(self) -> str:
        """Short human form: "decoder.0-5 + head"."""
        parts: list[str] = []
        layers = [u.layer_idx for u in self.units if u.kind == "decoder_layer"]
        for u in self.units:
            if u.kind != "decoder_layer":
                parts.append(u.name)
            elif u.layer_idx == layers[0]:
                parts.append(f"decoder.{layers[0]}" + (f"-{layers[-1]}" if len(layers) > 1 else ""))
        return " + ".join(parts)


@dataclass
class Partition:
    parts: list[int]
    stages: list[Stage]
    method: str
    units: list[UnitCount] = field(repr=False)

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def varying_boundary(self) -> bool:
        """Whether a stage boundary carries the SAM features, whose shapes follow each micro-batch's
        views; every other boundary carries the fixed (micro-batch, seq_len) hidden tuple."""
        return any(stage.units[-1].kind == "sam" for stage in self.stages[:-1])

    def stage_of(self, unit_name: str) -> int:
        for stage in self.stages:
            if unit_name in stage.names:
                return stage.index
        raise ValueError(f"unknown unit {unit_name!r}; units: {[u.name for u in self.units]}")


def build_units(model: ModelConfig) -> list[UnitCount]:
    """The units of the configured model (`pipeline.units.model_units`) with trainable/frozen
    parameter counts, from the real modules built on the meta device (`freeze_sam` applied);
    asserts that every parameter lands in exactly one unit."""
    enc_cfg, dec_cfg = model_configs(model)
    with torch.device("meta"):
        ocr = DeepSeekOCR(DeepEncoder(enc_cfg), DecoderModel(dec_cfg), image_token_id=0)
    if model.freeze_sam:
        ocr.encoder.freeze_sam()
    counted, seen = [], []
    for unit in ocr.units:
        params = unit.parameters(ocr)
        seen += [id(p) for p in params]
        trainable = sum(p.numel() for p in params if p.requires_grad)
        counted.append(UnitCount(unit, trainable, sum(p.numel() for p in params) - trainable))
    assert len(seen) == len(set(seen)) and set(seen) == {id(p) for p in ocr.parameters()}, (
        "pipeline units must cover each parameter once"
    )
    return counted


def _paper_parts(units: Sequence[UnitCount], pp: int) -> list[int] | None:
    """The paper layout for this PP, or None when it has none (PP=3, too few layers)."""
    n = len(units)
    layers = sum(u.kind == "decoder_layer" for u in units)
    if pp == 1:
        return [0, n]
    if pp == 2:
        return [0, 2 + (layers + 1) // 2, n]
    k = pp - 2  # decoder stages
    if pp < 4 or k > layers:
        return None
    base, extra = divmod(layers, k)
    parts, at = [0, 1, 2], 2
    for s in range(k - 1):
        at += base + (1 if s < extra else 0)
        parts.append(at)
    parts.append(n)
    return parts


def balanced_parts(weights: Sequence[float], pp: int) -> list[int]:
    """Contiguous split of `weights` into pp non-empty parts minimising the largest part sum.

    Exact dynamic programme over split points (O(pp n^2), n is a few dozen units). Among
    optimal splits the one with the earliest boundaries is returned (deterministic).
    """
    n = len(weights)
    if not 1 <= pp <= n:
        raise ValueError(f"cannot split {n} pipeline units into {pp} stages")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][j]: minimal max-part-sum splitting the first j units into k parts
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for k in range(1, pp + 1):
        for j in range(k, n - (pp - k) + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    parts = [n]
    for k in range(pp, 0, -1):
        parts.append(cut[k][parts[-1]])
    return parts[::-1]


def check_parts(parts: Sequence[int], pp: int, units: Sequence[UnitCount]) -> list[int]:
    """Validate explicit boundaries (DeepSpeed `parts`: pp+1 increasing ints from 0 to n)."""
    parts, n_units = [int(p) for p in parts], len(units)
    example = _paper_parts(units, pp)
    hint = f" (the paper split here is {example})" if example else ""
    if len(parts) != pp + 1 or parts[0] != 0 or parts[-1] != n_units:
        raise ValueError(
            f"parallel.partition={parts} must list pp+1={pp + 1} unit boundaries from 0 to {n_units} "
            f"(stage s holds units parts[s]..parts[s+1]-1){hint}"
        )
    if any(b <= a for a, b in zip(parts, parts[1:])):
        raise ValueError(f"parallel.partition={parts} must be strictly increasing (no empty stage){hint}")
    return parts


def partition(
    units: Sequence[UnitCount],
    pp: int,
    parts: Sequence[int] | None = None,
    method: str = "paper",
    costs: Sequence[float] | None = None,
) -> Partition:
    """Split `units` into `pp` stages: explicit `parts`, else `method` ("paper" | "balanced" |
    "parameters"); "balanced" needs one cost per unit (`pipeline.parallel.memory.unit_costs`)."""
    units = list(units)
    if pp < 1:
        raise ValueError(f"parallel.pp must be >= 1, got {pp}")
    if pp > len(units):
        raise ValueError(
            f"parallel.pp={pp} exceeds the {len(units)} pipeline units of this model "
            f"({units[0].name}, ..., {units[-1].name}): use at most {len(units)} stages"
        )
    if method not in METHODS:
        raise ValueError(f"partition method must be one of {METHODS}, got {method!r}")
    if method == "balanced" and parts is None and (costs is None or len(costs) != len(units)):
        raise ValueError(f"partition method 'balanced' needs one cost per unit ({len(units)}), got {costs}")
    if parts is not None:
        bounds, used = check_parts(parts, pp, units), "explicit"
    elif method == "balanced":
        assert costs is not None
        bounds, used = balanced_parts(costs, pp), "balanced"
    else:
        bounds = _paper_parts(units, pp) if method == "paper" else None
        used = "paper"
        if bounds is None:
            bounds, used = balanced_parts([u.trainable for u in units], pp), "parameters"
    stages = [Stage(s, units[bounds[s] : bounds[s + 1]]) for s in range(pp)]
    return Partition(parts=bounds, stages=stages, method=used, units=units)


def model_partition(model: ModelConfig, pp: int, parts: Sequence[int] | None = None) -> Partition:
    """`partition(build_units(model), pp, parts)` with the paper split as default."""
    return partition(build_units(model), pp, parts)
