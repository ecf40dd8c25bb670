"""Stage 1 of DeepSeek-OCR: DeepEncoder pretraining with a compact language model (Vary style).

Paper: arXiv 2510.18234 section 3.5; ../shared/spec/training.md "Stage 1". The stage-1 model is
`pipeline.model.DeepSeekOCR` built from the DeepEncoder preset and the OPT-125M-sized dense
decoder preset `dense-125m` (the projector maps to its width, 768); it trains through the same
loop, engines, checkpoints and logging as stage 2. This package adds what is specific to the
stage, all driven by typed `ModelConfig` fields:

- `upstream`: initialise SAM / CLIP from the segment-anything and CLIP-L checkpoints (strict);
- `parts`: named parts (sam, compressor, clip, projector, decoder) for freezing and exporting;
- `options`: `validate_model_options` / `apply_model_options` (init + freeze, called by the job)
  and `export_encoder_if_requested` (end of the job);
- `export`: the hand-over directory in the released key layout and its strict loader
  (`model.encoder_init=<export>` in stage 2);
- `python -m pipeline.stage1 export|inspect`: export from a finished checkpoint, or list one.
"""

from pipeline.stage1.export import (
    EXPORT_FORMAT,
    encoder_init_state,
    encoder_state_for_model,
    export_encoder,
    is_encoder_export,
    load_encoder_init,
)
from pipeline.stage1.options import (
    AppliedOptions,
    apply_model_options,
    export_encoder_if_requested,
    frozen_parts,
    validate_model_options,
)
from pipeline.stage1.parts import ENCODER_PARTS, MODEL_PARTS, freeze_parts, trainable_by_part
from pipeline.stage1.upstream import load_clip_init, load_sam_init

__all__ = [
    "ENCODER_PARTS",
    "EXPORT_FORMAT",
    "MODEL_PARTS",
    "AppliedOptions",
    "apply_model_options",
    "encoder_init_state",
    "encoder_state_for_model",
    "export_encoder",
    "export_encoder_if_requested",
    "freeze_parts",
    "frozen_parts",
    "is_encoder_export",
    "load_clip_init",
    "load_encoder_init",
    "load_sam_init",
    "trainable_by_part",
    "validate_model_options",
]
