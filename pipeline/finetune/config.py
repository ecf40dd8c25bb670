"""Typed configuration of a fine-tuning job (`RunConfig.finetune`, Hydra key `finetune`).

A fine-tune starts from `model.init_from` (a released-layout directory, our checkpoint
directory or an `export_release` output, read by `pipeline.checkpoint_io.load_any`) and
trains either LoRA adapters (peft) or full parameters of chosen components, on the target
data (`data.sources`, or the embedded demo's rendered lines of a new script) mixed with a
share of original-domain replay data; it evaluates a held-out target set and a held-out
original-capability set before and after, and exports adapters and/or a merged release-layout
checkpoint. Defaults follow the common LoRA recipe (docs/finetune.md): r 16 / alpha 16 on the decoder's q,k,v,o,gate,up,down projections, encoder frozen.

Only dataclasses and validation live here (no torch), so `pipeline.config` can import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

METHODS = ("lora", "full")
# Model parts that can be trained or frozen as a whole (pipeline.finetune.lora.COMPONENT_PATHS).
COMPONENTS = ("sam", "clip", "projector", "embed", "decoder", "lm_head")
# Where LoRA target names are looked up ("decoder": blocks + lm_head).
LORA_SCOPES = ("sam", "clip", "projector", "decoder")
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # stacked routed-expert weights [E, out, in]
EXPORTS = ("adapter", "merged", "both", "none")
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSpec:
    """LoRA adapters (peft).

    targets: nn.Linear module names looked up inside `scope` components; an entry matches a
      module whose full name equals it or ends with "." + entry ("q_proj",
      "shared_experts.gate_proj", "layers.0.mlp.down_proj"). In the decoder the defaults reach
      attention (q,k,v,o), the dense layer-0 MLP and the shared experts (gate, up, down).
    expert_targets: stacked routed-expert parameters ("gate_up_proj", "down_proj") adapted
      through peft's `target_parameters` (one rank-r pair per expert; needs dropout 0).
      Empty by default: the routed experts stay frozen.
    """

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    scope: list[str] = field(default_factory=lambda: ["decoder"])
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    expert_targets: list[str] = field(default_factory=list)
    rslora: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"finetune.lora.r must be >= 1, got {self.r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"finetune.lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"finetune.lora.dropout must be in [0, 1), got {self.dropout}")
        bad = [s for s in self.scope if s not in LORA_SCOPES]
        if bad or not self.scope:
            raise ValueError(
                f"finetune.lora.scope must be a non-empty subset of {LORA_SCOPES}, got {self.scope}"
            )
        if not self.targets and not self.expert_targets:
            raise ValueError("finetune.lora: targets and expert_targets are both empty; nothing to adapt")
        bad = [t for t in self.expert_targets if t not in EXPERT_PARAMETERS]
        if bad:
            raise ValueError(
                f"finetune.lora.expert_targets: unknown {bad}; the routed experts have {EXPERT_PARAMETERS}"
            )
        if self.expert_targets and "decoder" not in self.scope:
            raise ValueError("finetune.lora.expert_targets needs 'decoder' in finetune.lora.scope")
        if self.expert_targets and self.dropout:
            raise ValueError(
                "finetune.lora.dropout must be 0 with expert_targets (peft applies parameter LoRA "
                "to the weight, where input dropout cannot be expressed)"
            )


@dataclass
class ReplaySpec:
    """Original-domain data mixed into every batch, so the base capability is rehearsed.

    share: fraction of the training samples drawn from the replay source (the loader's
      mixture weights: target 1 - share, replay share; per-sample draws, so a batch holds
      `share` of replay samples in expectation). 0 disables replay.
    shards: webdataset shards of original-domain data (webdataset runs); the embedded demo
      renders Latin reading lines instead.
    val: held-out original-capability eval set (any `read_eval_set` spec: shards, .jsonl, .csv);
      empty = no forgetting report (the demo renders one).
    """

    share: float = 0.25
    shards: str = ""
    prompt: str = "free_ocr"
    modes: dict[str, float] = field(default_factory=dict)  # empty = Base only (processing.mode_weights)
    val: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.share < 1.0:
            raise ValueError(f"finetune.replay.share must be in [0, 1), got {self.share}")


@dataclass
class DemoSpec:
    """The embedded default (data.kind=synth_lines): fine-tune on reading lines of a new script.

    lang: data_tools word-list language of the target lines ("ru": Cyrillic); the base model
      read only Latin lines. base_steps: when model.init_from is empty, a base model is first
      trained on the Latin lines for this many steps (the dsocr-train default, shorter).
    """

    lang: str = "ru"
    num_train: int = 4000
    num_val: int = 64
    base_steps: int = 600
    seed: int = 4321

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_val < 1 or self.base_steps < 1:
            raise ValueError(
                "finetune.demo: num_train, num_val and base_steps must be >= 1, got "
                f"{self.num_train}, {self.num_val}, {self.base_steps}"
            )


@dataclass
class FinetuneConfig:
    """method "lora" (adapters, base frozen) or "full" (train `train_components` fully).

    train_components: full method: the components trained (others frozen; default SAM frozen,
      as in stage 2). LoRA: components trained fully next to the adapters (peft
      `modules_to_save`; "decoder" is not allowed there, use method=full).
    extend_vocab: when target texts hold characters a character-level tokenizer lacks, add
      them (new embedding and lm_head rows, trained). False: such data is an error.
    export: "adapter" (peft adapter dir), "merged" (release layout, tokenizer copied),
      "both" or "none"; a full fine-tune has no adapter and writes the merged model only.
    val: held-out target eval set (empty: data.val_shards; the demo renders one).
    mode: image mode the target data is trained and evaluated in, over the sources' `modes`
      (a sample's own `mode` still wins). Empty: the mode in the base's training_info.json when
      it has one (a model exported by this repository), else the sources' modes.
    release_code: a released DeepSeek-OCR directory whose modeling files (*.py) the merged export
      copies, so transformers can load it with trust_remote_code like the release (empty: taken
      from model.init_from when that directory holds them; else config.json has no auto_map).
    """

    method: str = "lora"
    lora: LoraSpec = field(default_factory=LoraSpec)
    train_components: list[str] | None = None
    replay: ReplaySpec = field(default_factory=ReplaySpec)
    demo: DemoSpec = field(default_factory=DemoSpec)
    extend_vocab: bool = True
    export: str = "both"
    val: str = ""
    eval_samples: int = 64
    mode: str = ""
    release_code: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"finetune.method must be one of {METHODS}, got {self.method!r}")
        if self.export not in EXPORTS:
            raise ValueError(f"finetune.export must be one of {EXPORTS}, got {self.export!r}")
        if self.train_components is not None:
            bad = [c for c in self.train_components if c not in COMPONENTS]
            if bad:
                raise ValueError(f"finetune.train_components: unknown {bad}; components are {COMPONENTS}")
            if self.method == "lora" and "decoder" in self.train_components:
                raise ValueError(
                    "finetune.train_components may not hold 'decoder' with method=lora "
                    "(that is full fine-tuning: set finetune.method=full)"
                )
            if self.method == "full" and not self.train_components:
                raise ValueError("finetune.method=full with empty train_components trains nothing")
        if self.method == "full" and self.export == "adapter":
            raise ValueError("finetune.export=adapter needs method=lora; a full fine-tune exports 'merged'")
        if self.eval_samples < 1:
            raise ValueError(f"finetune.eval_samples must be >= 1, got {self.eval_samples}")

    @property
    def trained_components(self) -> list[str]:
        """Components trained as whole parameters (full method default: all but SAM)."""
        if self.train_components is not None:
            return list(self.train_components)
        return [c for c in COMPONENTS if c != "sam"] if self.method == "full" else []
