"""Regional torch.compile of the repeated blocks a pipeline stage holds (parallel.compile_layers).

The single-process counterpart is `DeepSeekOCR.compile_regions` (pipeline/model.py): every
repeated block is compiled in place with `nn.Module.compile`, which keeps the module tree and so
the state-dict keys (no `_orig_mod.` prefix), so DeepSpeed's per-layer checkpoints, resume and
`pipeline.parallel.consolidate` see the same keys as an uncompiled run. A pipeline stage holds
only some units (`pipeline.parallel.stages`), and compiles what they own:

    SamUnit           unit.model.encoder.sam_model.blocks                  "sam_block"
    ClipEmbedUnit     unit.model.encoder.vision_model.transformer.layers   "clip_layer"
    DecoderLayerUnit  unit.layer                                           "decoder_layer"
    HeadUnit          nothing (one norm + the lm_head / chunked loss: no repeated block)

One compiled graph per block kind fuses the norms, RoPE, SwiGLU and routing elementwise work
around the matmuls. Backends: "inductor" (GPU kernels), "aot_eager" (traces forward and backward
through AOTAutograd without generating kernels: CPU tests), "eager" (dynamo capture only).
DeepSpeed back-propagates a stage's float outputs one at a time with retain_graph=True, which
compiled backwards only allow with functorch's `donated_buffer` off
(`pipeline.parallel.trainer.run_pipeline_training` sets it).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from pipeline.model import allow_block_recompiles
from pipeline.parallel.stages import ClipEmbedUnit, DecoderLayerUnit, SamUnit

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
REGION_KINDS = ("sam_block", "clip_layer", "decoder_layer")


def validate_compile_options(compile_layers: object, backend: object) -> None:
    """ValueError naming parallel.compile_layers / parallel.compile_backend for bad values."""
    if not isinstance(compile_layers, bool):
        raise ValueError(f"parallel.compile_layers must be true or false, got {compile_layers!r}")
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"parallel.compile_backend must be one of {COMPILE_BACKENDS}, got {backend!r}")


def stage_regions(units: Iterable[nn.Module]) -> dict[str, list[nn.Module]]:
    """The repeated blocks of a stage's units by kind (REGION_KINDS order; empty kinds included)."""
    found: dict[str, list[nn.Module]] = {kind: [] for kind in REGION_KINDS}
    for unit in units:
        if isinstance(unit, SamUnit):
            found["sam_block"] += list(unit.model.encoder.sam_model.blocks)
        elif isinstance(unit, ClipEmbedUnit):
            found["clip_layer"] += list(unit.model.encoder.vision_model.transformer.layers)
        elif isinstance(unit, DecoderLayerUnit):
            found["decoder_layer"].append(unit.layer)
    return found


def compile_stage_regions(units: Iterable[nn.Module], backend: str = "inductor") -> dict[str, int]:
    """`Module.compile(backend=...)` every repeated block of `units` in place; returns the count
    compiled per kind (state-dict keys unchanged, compilation happens at the first forward)."""
    validate_compile_options(True, backend)
    allow_block_recompiles()
    regions = stage_regions(units)
    for blocks in regions.values():
        for block in blocks:
            block.compile(backend=backend)
    return {kind: len(blocks) for kind, blocks in regions.items()}


__all__ = [
    "COMPILE_BACKENDS",
    "REGION_KINDS",
    "compile_stage_regions",
    "stage_regions",
    "validate_compile_options",
]
