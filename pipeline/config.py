"""Structured-config schemas for every training job (Hydra ConfigStore).

The YAML tree in `configs/` is validated against these dataclasses at compose
time, so a typo in a key fails before any work starts. Only the entry points
see a `DictConfig`; they convert it with `to_run_config` and pass typed objects
down (lightning-hydra-template `src/train.py`, torchtitan's thin `train.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pipeline.finetune.config import FinetuneConfig

SCHEDULES = ("step", "cosine", "constant")  # pipeline.train.optim.lr_factor
DTYPES = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
DATA_KINDS = ("synth_lines", "webdataset", "real_lines")
LOGGER_KINDS = ("none", "wandb")
LOGGER_MODES = ("online", "offline", "disabled", "auto")


def _require(ok: bool, field_name: str, value: object, fix: str) -> None:
    """ValueError naming the field, its value and the fix (config errors surface at compose time)."""
    if not ok:
        raise ValueError(f"{field_name}={value!r}: {fix}")


@dataclass
class ModelConfig:
    encoder: str = "debug"  # deepencoder.ENCODER_PRESETS key
    decoder: str = "debug"  # decoder.DECODER_PRESETS key
    encoder_overrides: dict[str, Any] = field(default_factory=dict)
    decoder_overrides: dict[str, Any] = field(default_factory=dict)
    # Local path to initialise from: a released-layout checkpoint directory, a
    # consolidated safetensors file (a stage-1 encoder export: encoder_init). None = random init.
    init_from: str | None = None
    freeze_sam: bool = True  # stage 2 trains with SAM + compressor frozen (PP0)
    gradient_checkpointing: bool = False
    # Encoder initialisation, frozen parts, encoder export (pipeline.stage1.options, applied
    # after the model is built / loaded from init_from). All loads are strict.
    encoder_init: str | None = None  # stage-1 encoder export (or a released-layout dir): its encoder parts
    sam_init: str | None = None  # segment-anything SAM ViT-B checkpoint -> SAM trunk + neck (stage 1)
    clip_init: str | None = None  # CLIP-L/14 vision tower, open_clip / OpenAI / transformers file (stage 1)
    freeze: list[str] = field(
        default_factory=list
    )  # more frozen parts: sam compressor clip projector decoder
    export_encoder: bool = False  # stage 1: write <out_dir>/encoder_export (released layout) at the end
    export_projector: bool = False  # ... including projector + image_newline/view_seperator


@dataclass
class SourceConfig:
    name: str = "ocr"
    shards: str = ""  # brace pattern or glob of webdataset tars
    weight: float = 1.0
    prompt: str = "free_ocr"  # pipeline.prompts.PROMPTS key, or a literal prompt with <image>
    modes: dict[str, float] = field(default_factory=dict)  # empty = Base only (processing.mode_weights)
    kind: str = "ocr"  # "ocr" (image + text) or "text" (text-only rows)
    start_after: int = 0  # curriculum: joins the mixture after this many samples of the run


@dataclass
class SynthConfig:
    """The embedded default data: short rendered lines made on the fly by data_tools."""

    num_train: int = 20000
    num_val: int = 64
    min_chars: int = 2
    max_chars: int = 8
    image_size: int = 256  # line width in pixels; lines are image_size x image_size/4
    mode: str = "debug-256"  # pipeline.processing.MODES key the lines are processed with
    workers: int = 0  # rendering processes (0 = in the job's process)
    seed: int = 1234
    # More sets, mixed into training in proportion to their sizes and evaluated separately
    # (num_val each): short paragraphs on square pages, and Persian (RTL) lines. 0 = none.
    paragraphs: int = 0
    paragraph_lines: int = 10  # at most this many lines per paragraph page (line height image_size / lines)
    # characters per paragraph line (the pitch: paragraph page side / paragraph_chars)
    paragraph_chars: int = 30
    # The paragraph pages' side and image mode (0 / "" = image_size / mode). At 2 characters per
    # image-token column, the lines' density, 30-character lines need Base mode's 16 columns.
    paragraph_size: int = 0
    paragraph_mode: str = ""
    persian: int = 0
    # Curriculum: the Latin lines alone for this many training samples, then every set
    # (learning to read short lines first; long paragraphs reward a text-only language model).
    lines_first: int = 0


@dataclass
class ScanSynthConfig:
    """`data.kind=real_lines`: synthetic scanned lines (data_tools.synth.scan), the pretraining data."""

    num_train: int = 2000
    num_val: int = 64
    min_chars: int = 1
    max_chars: int = 100
    font_px: list[int] = field(default_factory=lambda: [22, 44])
    families: dict[str, float] = field(default_factory=dict)  # {} = data_tools' typewriter/serif/sans mix
    underline_prefix: str = "_"  # how the real transcriptions mark underlined words
    scanner: dict[str, Any] = field(default_factory=dict)  # ScannerConfig overrides: p_* and ranges
    bundled_only: bool = False  # only matplotlib's fonts (the same pixels on every machine)
    seed: int = 4321
    workers: int = 0  # rendering processes
    weight: float = 1.0  # mixture weight (the real lines: data.real.weight)
    # Curriculum: this many short lines in a fixed-pitch font on clean paper (gpu1_lines' reading
    # lines: warmup_width x warmup_width / 4 px strips, pitch warmup_width / warmup_max_chars) alone
    # first, then the long scans join and the short ones stay at warmup_weight. A model from
    # scratch fed long or proportional lines at once learns the word lists' language model and
    # never reads. warmup_text: "short" (words, numbers, random letters: data_tools.synth.text) or
    # "typed" (the scans' French typed text); warmup_mode: their image mode ("" = eval.mode).
    warmup_lines: int = 0
    warmup_max_chars: int = 20
    warmup_weight: float = 0.5
    warmup_width: int = 640
    warmup_text: str = "short"
    warmup_mode: str = ""

    def __post_init__(self) -> None:
        _require(self.warmup_lines >= 0, "data.scan.warmup_lines", self.warmup_lines, "use 0 (none) or more")
        _require(self.warmup_width >= 64 and self.warmup_width % 4 == 0, "data.scan.warmup_width",
                 self.warmup_width, "use a multiple of 4, >= 64")  # fmt: skip
        low, high = max(7, self.min_chars), self.warmup_width // 8  # the strip's font fits; >= 8 px per character
        _require(low <= self.warmup_max_chars <= high, "data.scan.warmup_max_chars", self.warmup_max_chars,
                 f"use {low}..{high} (>= data.scan.min_chars; warmup_width / 8 at most)")  # fmt: skip
        _require(self.warmup_text in ("short", "typed"), "data.scan.warmup_text", self.warmup_text,
                 "use 'short' or 'typed'")  # fmt: skip
        if self.warmup_mode:
            from pipeline.processing import MODES

            _require(self.warmup_mode in MODES, "data.scan.warmup_mode", self.warmup_mode, f"use one of {sorted(MODES)}")
        _require(self.warmup_weight > 0, "data.scan.warmup_weight", self.warmup_weight, "use > 0")


@dataclass
class RealLinesConfig:
    """`data.kind=real_lines`: line ground truth (PAGE-XML or ALTO) under `data.real_root`."""

    format: str = "alto"  # "alto" | "page"
    split_file: str = ""  # required: `SPLIT PATH` lines (a path relative to the repository works anywhere)
    heldout_split: str = "heldout"  # the split evaluated; every other split is trained on
    lang: str = "fr"
    margin: int = 4  # pixels around each line's bounds
    weight: float = 1.0  # mixture weight of the real lines (the synthetic ones: data.scan.weight)
    start_after: int = 0  # the real lines join the mixture after this many samples of the run


@dataclass
class DataConfig:
    kind: str = "synth_lines"  # "synth_lines" | "webdataset" | "real_lines"
    sources: list[SourceConfig] = field(default_factory=list)
    synth: SynthConfig = field(default_factory=SynthConfig)
    real_root: str = ""  # data.kind=real_lines: the dataset folder (e.g. a clone of the Tapuscorpus)
    real: RealLinesConfig = field(default_factory=RealLinesConfig)
    scan: ScanSynthConfig = field(default_factory=ScanSynthConfig)
    tokenizer: str = "char"  # "char" (built offline), "bpe" (trained on the corpus), or a local path
    seq_len: int = 128
    pack: bool = True
    num_workers: int = 0
    max_pixels: int = 40_000_000
    max_tiles: int = 9
    val_shards: str = ""

    def __post_init__(self) -> None:
        _require(self.kind in DATA_KINDS, "data.kind", self.kind, f"use one of {DATA_KINDS}")
        _require(
            self.seq_len >= 16, "data.seq_len", self.seq_len, "a row needs >= 16 tokens (the model's prompt)"
        )
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "use 0 (in process) or more")
        _require(self.max_tiles >= 1, "data.max_tiles", self.max_tiles, "use >= 1")
        _require(self.max_pixels >= 1, "data.max_pixels", self.max_pixels, "use >= 1")
        if self.kind == "webdataset":
            _require(bool(self.sources), "data.sources", self.sources,
                     "data.kind=webdataset needs at least one source with shards")  # fmt: skip
            for i, source in enumerate(self.sources):
                _require(bool(source.shards), f"data.sources[{i}].shards", source.shards,
                         "give a brace pattern or glob of webdataset tars")  # fmt: skip


@dataclass
class OptimConfig:
    lr: float = 3e-5
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "step"  # "step" | "cosine" | "constant"
    step_milestones: list[float] = field(default_factory=lambda: [0.5, 0.8])  # fractions of max_steps
    step_gamma: float = 0.316
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _require(math.isfinite(self.lr) and self.lr > 0, "optim.lr", self.lr, "use a finite lr > 0")
        _require(
            0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "use a value in [0, 1]"
        )
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "use >= 0")
        betas = tuple(self.betas)
        _require(len(betas) == 2 and all(0 <= b < 1 for b in betas), "optim.betas", list(betas),
                 "use two values in [0, 1), e.g. [0.9, 0.95]")  # fmt: skip
        _require(self.eps > 0, "optim.eps", self.eps, "use > 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "use >= 0")
        _require(self.schedule in SCHEDULES, "optim.schedule", self.schedule, f"use one of {SCHEDULES}")
        milestones = list(self.step_milestones)
        _require(all(0 < m <= 1 for m in milestones) and milestones == sorted(milestones),
                 "optim.step_milestones", milestones, "use increasing fractions of max_steps in (0, 1]")  # fmt: skip
        _require(self.step_gamma > 0, "optim.step_gamma", self.step_gamma, "use > 0")
        _require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "use >= 0 (0 disables clipping)")


@dataclass
class ParallelConfig:
    pp: int = 1  # pipeline stages
    dp: int | None = None  # data-parallel degree; None = world_size // pp (pipeline.parallel.Topology)
    partition: list[int] | None = (
        None  # explicit stage boundaries in pipeline layers; None = partition_method
    )
    partition_method: str = "paper"  # "paper" | "balanced" | "parameters" (pipeline/parallel/partition.py)
    micro_batch: int = 1
    global_batch: int = 8
    zero_stage: int = 1
    dtype: str = "fp32"  # "fp32" | "bf16"
    activation_checkpoint_interval: int = 0
    # stages whose layers recompute activations in backward; None = every stage when
    # model.gradient_checkpointing, none otherwise
    checkpoint_stages: list[int] | None = None
    loss_chunk_tokens: int = 2048  # last stage: lm_head + loss over this many tokens at a time; 0 = whole row
    # torch.compile the repeated blocks each rank holds (SAM blocks, CLIP layers, decoder layers;
    # regional Module.compile, state-dict keys unchanged): pipeline.model.compile_blocks
    compile_layers: bool = False
    compile_backend: str = "inductor"  # "inductor" | "aot_eager" (traces fwd+bwd, no kernels) | "eager"

    def __post_init__(self) -> None:
        _require(self.pp >= 1, "parallel.pp", self.pp, "use >= 1 pipeline stages")
        _require(
            self.dp is None or self.dp >= 1, "parallel.dp", self.dp, "use >= 1, or null (world size / pp)"
        )
        _require(self.micro_batch >= 1, "parallel.micro_batch", self.micro_batch, "use >= 1")
        _require(self.global_batch >= 1, "parallel.global_batch", self.global_batch, "use >= 1")
        per_step = self.micro_batch * (self.dp or 1)
        _require(self.global_batch % per_step == 0, "parallel.global_batch", self.global_batch,
                 f"must be a multiple of parallel.micro_batch ({self.micro_batch}) x parallel.dp "
                 f"({self.dp or 1}) = {per_step}")  # fmt: skip
        _require(self.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", self.zero_stage, "use 0, 1, 2 or 3")
        _require(self.dtype in DTYPES, "parallel.dtype", self.dtype, f"use one of {DTYPES}")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 3
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    resume: bool = True
    max_bad_steps: int = 5  # consecutive NaN/Inf losses before the run stops
    deterministic: bool = False
    allow_config_change: bool = False  # resume under another config (pipeline.train.run_dir)
    threads: int = 0  # torch CPU threads, 0 = the free cores (pipeline.threads)
    max_minutes: float = 0.0  # stop training after this wall time, agreed by all ranks (0 = no limit)

    def __post_init__(self) -> None:
        _require(self.max_steps >= 1, "train.max_steps", self.max_steps, "train at least 1 step")
        _require(self.log_every >= 1, "train.log_every", self.log_every, "use >= 1")
        for name in ("eval_every", "save_every", "keep_last", "threads"):
            _require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "use >= 0 (0 = off)")
        _require(self.device in DEVICES, "train.device", self.device, f"use one of {DEVICES}")
        _require(self.max_bad_steps >= 1, "train.max_bad_steps", self.max_bad_steps, "use >= 1")
        _require(self.max_minutes >= 0, "train.max_minutes", self.max_minutes, "use >= 0 (0 = no limit)")


@dataclass
class EvalConfig:
    mode: str = "base"  # image mode of the held-out set (synth_lines uses data.synth.mode)
    num_samples: int = 64
    batch_size: int = 16
    max_new_tokens: int = 32
    no_repeat_ngram_size: int = 30
    no_repeat_window: int = 90

    def __post_init__(self) -> None:
        from pipeline.processing import MODES

        _require(self.mode in MODES, "eval.mode", self.mode, f"use one of {sorted(MODES)}")
        _require(self.num_samples >= 0, "eval.num_samples", self.num_samples, "use >= 0")
        _require(self.batch_size >= 1, "eval.batch_size", self.batch_size, "use >= 1")
        _require(self.max_new_tokens >= 1, "eval.max_new_tokens", self.max_new_tokens, "use >= 1")


@dataclass
class LoggerConfig:
    kind: str = "none"  # "none" | "wandb"
    project: str = "deepseek-ocr-train"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # "online" | "offline" | "disabled" | "auto" (offline without credentials)

    def __post_init__(self) -> None:
        _require(self.kind in LOGGER_KINDS, "logger.kind", self.kind, f"use one of {LOGGER_KINDS}")
        _require(self.mode in LOGGER_MODES, "logger.mode", self.mode, f"use one of {LOGGER_MODES}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # read by dsocr-finetune only
    name: str = "default"


def register_configs() -> None:
    """Register the schemas so `configs/*.yaml` are validated against them."""
    cs = ConfigStore.instance()
    # The entry config lists `run_schema` first: every group YAML merges into it
    # and is type-checked against these dataclasses.
    cs.store(name="run_schema", node=RunConfig)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Typed view of a composed config (raises on unknown keys or wrong types)."""
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
    run = OmegaConf.to_object(merged)
    assert isinstance(run, RunConfig)
    return run
