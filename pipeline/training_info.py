"""`training_info.json`: the image mode and prompt an exported model was trained and evaluated with.

Written beside every export (`dsocr-train`'s model/, `dsocr-finetune`'s merged/ and adapter/), so
inference and evaluation default to the mode and prompt the model knows: a model trained on Base
views decodes garbage from Gundam tiles. `resolve_mode_prompt` picks the defaults and warns when
a given mode differs from the trained one.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

TRAINING_INFO = "training_info.json"
FALLBACK_MODE, FALLBACK_PROMPT = "gundam", "free_ocr"  # the released model's usual request


@dataclass(frozen=True)
class TrainingInfo:
    mode: str  # the mode the model was evaluated in (the main one of its training mix)
    prompt: str
    modes: dict[str, float] = field(default_factory=dict)  # the training mix of modes, if known

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / TRAINING_INFO
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: str | Path) -> TrainingInfo | None:
        """The folder's record, None when it has none (e.g. the released checkpoint)."""
        path = Path(folder) / TRAINING_INFO
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        try:
            return cls(mode=str(raw["mode"]), prompt=str(raw["prompt"]), modes=dict(raw.get("modes") or {}))
        except KeyError as err:
            raise ValueError(f"{path} lacks {err}: rewrite it or remove it") from None


def mode_mix(sources: list) -> dict[str, float]:
    """The share of each image mode in a mixture of image sources (pipeline.data.config.SourceSpec:
    a fixed mode name or {mode: weight}, each source weighted by its mixture weight)."""
    mix: dict[str, float] = {}
    image_sources = [s for s in sources if s.kind == "ocr"]
    total = sum(s.weight for s in image_sources)
    for s in image_sources:
        weights = {s.modes: 1.0} if isinstance(s.modes, str) else dict(s.modes)
        norm = sum(weights.values())
        for mode, w in weights.items():
            if w > 0:
                mix[mode] = mix.get(mode, 0.0) + s.weight / total * w / norm
    return {mode: round(share, 6) for mode, share in sorted(mix.items())}


def resolve_mode_prompt(checkpoint: str | Path, mode: str | None, prompt: str | None,
                        program: str) -> tuple[str, str]:  # fmt: skip
    """(mode, prompt): the given ones, else the checkpoint's training_info.json, else Gundam /
    free OCR; a warning on stderr when a given mode is not the one the checkpoint was trained in."""
    info = TrainingInfo.read(checkpoint)
    if info is not None and mode is not None and mode != info.mode:
        trained = ", ".join(f"{k} {v:g}" for k, v in info.modes.items()) or info.mode
        print(f"{program}: warning: --mode {mode} but {checkpoint} was trained in {trained} "
              f"(evaluated in {info.mode}); its output in another mode may be garbage", file=sys.stderr)  # fmt: skip
    chosen_mode = mode or (info.mode if info else FALLBACK_MODE)
    chosen_prompt = prompt or (info.prompt if info else FALLBACK_PROMPT)
    return chosen_mode, chosen_prompt
