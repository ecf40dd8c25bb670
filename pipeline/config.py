"""Structured-config schemas for every training job (Hydra ConfigStore).

The YAML tree in `configs/` is validated against these dataclasses at compose
time, so a typo in a key fails before any work starts. Only the entry points
see a `DictConfig`; they convert it with `to_run_config` and pass typed objects
down (lightning-hydra-template `src/train.py`, torchtitan's thin `train.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pipeline.finetune.config import FinetuneConfig


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
class DataConfig:
    kind: str = "synth_lines"  # "synth_lines" | "webdataset"
    sources: list[SourceConfig] = field(default_factory=list)
    synth: SynthConfig = field(default_factory=SynthConfig)
    tokenizer: str = "char"  # "char" (built offline), "bpe" (trained on the corpus), or a local path
    seq_len: int = 128
    pack: bool = True
    num_workers: int = 0
    max_pixels: int = 40_000_000
    max_tiles: int = 9
    val_shards: str = ""


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
    # regional Module.compile, state-dict keys unchanged): pipeline.parallel.regions
    compile_layers: bool = False
    compile_backend: str = "inductor"  # "inductor" | "aot_eager" (traces fwd+bwd, no kernels) | "eager"


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
    max_minutes: float = 0.0  # single-process runs: stop training after this wall time (0 = no limit)
    compile: bool = (
        False  # single-process runs: torch.compile the repeated blocks (DeepSeekOCR.compile_regions)
    )


@dataclass
class EvalConfig:
    mode: str = "base"  # image mode of the held-out set (synth_lines uses data.synth.mode)
    num_samples: int = 64
    batch_size: int = 16
    max_new_tokens: int = 32
    no_repeat_ngram_size: int = 30
    no_repeat_window: int = 90


@dataclass
class LoggerConfig:
    kind: str = "none"  # "none" | "wandb"
    project: str = "deepseek-ocr-train"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # "online" | "offline" | "disabled" | "auto" (offline without credentials)


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
