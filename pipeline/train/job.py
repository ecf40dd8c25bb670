"""One training job from a typed RunConfig: data -> shards -> loader -> model -> loop -> checkpoint -> eval.

The embedded default (`data.kind=synth_lines`) renders fixed-pitch reading lines with
data_tools into webdataset shards inside the run directory, then trains through exactly
the path a cluster run uses (StreamingLoader with packing, DeepSeekOCR, the training
loop, checkpoints, the eval runner). It leaves in the run directory: the resolved config,
checkpoints, `metrics.jsonl`, loss/CER plots, eval reports (JSON + text) before and after
training, a contact sheet of held-out predictions, and the final model in our layout.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from decoder import DecoderModel
from deepencoder import DeepEncoder
from pipeline.checkpoint_io import export_release, load_any
from pipeline.config import DataConfig, EvalConfig, ModelConfig, RunConfig
from pipeline.data.loader import StreamingLoader
from pipeline.data.profile import apply_to_run
from pipeline.eval.data import EvalSample, read_eval_set
from pipeline.eval.plots import plot_run
from pipeline.eval.report import EvalReport
from pipeline.eval.runner import EvalRunConfig, evaluate, training_eval_hook
from pipeline.model import DeepSeekOCR, model_configs
from pipeline.parallel.checkpoints import check_init_from
from pipeline.parallel.topology import dist_env
from pipeline.stage1.options import apply_model_options, export_encoder_if_requested, validate_model_options
from pipeline.threads import set_torch_threads
from pipeline.tokenizer import OCRTokenizer, build_char_tokenizer, build_tokenizer, load_tokenizer
from pipeline.train.checkpoint import latest_checkpoint
from pipeline.train.data_kinds import data_kind, loader_config
from pipeline.train.local_engine import local_trainer
from pipeline.train.logging import RunLogger
from pipeline.train.run_dir import first_logged_loss, record_config
from pipeline.train.trainer import exit_preempted
from pipeline.training_info import TrainingInfo, mode_mix

DEMO_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " "


@dataclass
class JobResult:
    out_dir: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    cer_before: float | None
    cer_after: float | None
    capped_before: float | None
    capped_after: float | None
    checkpoint: Path | None
    preempted: bool = False  # SIGTERM stopped training (after its checkpoint): the job ends requeueable
    other_sets: dict[str, tuple[float | None, float | None]] = field(
        default_factory=dict
    )  # corpus CER before/after


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


# ----------------------------------------------------------------------------- data
def build_tokenizer_for(spec: str, corpus: list[str], alphabet: str = DEMO_ALPHABET) -> OCRTokenizer:
    """`data.tokenizer`: "char" over the alphabet and the corpus, "bpe" trained on it, or a local path."""
    if spec == "char":
        return build_char_tokenizer(alphabet + "".join(sorted(set("".join(corpus)))))
    if spec == "bpe":
        return build_tokenizer(corpus, vocab_size=4096)
    return load_tokenizer(spec)


# ----------------------------------------------------------------------------- model
def build_run_model(m: ModelConfig, tokenizer: OCRTokenizer, *, loss_chunk_tokens: int) -> DeepSeekOCR:
    """The model of `model.*` (presets, or `model.init_from`), then its stage-1 options and
    checkpointing; `loss_chunk_tokens` is `parallel.loss_chunk_tokens`."""
    if m.init_from:
        check_init_from(m, tokenizer)  # the configured size, or a ValueError naming both
        model, _ = load_any(m.init_from)
    else:
        enc, dec = model_configs(
            m, tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id
        )
        model = DeepSeekOCR(DeepEncoder(enc), DecoderModel(dec), tokenizer.image_id, loss_chunk_tokens)
    applied = apply_model_options(model, m)  # encoder_init / sam_init / clip_init, freezing
    print(f"[job] {applied.summary()}", flush=True)
    set_step_options(model, m, loss_chunk_tokens)
    return model


def set_step_options(model: DeepSeekOCR, m: ModelConfig, loss_chunk_tokens: int) -> None:
    """The loss head's chunk (`parallel.loss_chunk_tokens`) and `model.gradient_checkpointing`: every
    training path's model gets them, also one loaded from a checkpoint (a fine-tune's base)."""
    model.loss_chunk_tokens = loss_chunk_tokens
    if m.gradient_checkpointing:
        model.set_gradient_checkpointing(True)


# ----------------------------------------------------------------------------- eval
@dataclass(frozen=True)
class SavedScores:
    """The CERs of an evaluation report written earlier (`<stem>_report.json`)."""

    corpus_cer: float
    capped_cer: float

    @classmethod
    def read(cls, path: Path) -> SavedScores:
        raw = json.loads(path.read_text())["raw"]
        return cls(raw["corpus_cer"], raw["capped_cer"])


def eval_config(data: DataConfig, ev: EvalConfig) -> EvalRunConfig:
    """The evaluation settings of the first held-out set (its mode: the data kind's choice)."""
    return EvalRunConfig(mode=data_kind(data).eval_mode(data, ev), prompt="free_ocr", batch_size=ev.batch_size,
                         max_new_tokens=ev.max_new_tokens, no_repeat_ngram_size=ev.no_repeat_ngram_size,
                         no_repeat_window=ev.no_repeat_window)  # fmt: skip


def set_eval_config(data: DataConfig, ev: EvalConfig, name: str) -> EvalRunConfig:
    """The evaluation settings of the held-out set `name` (the data kind's choice)."""
    return data_kind(data).set_eval(data, name, eval_config(data, ev))


def run_eval(model, tokenizer, samples, cfg: EvalRunConfig, out_dir: Path, name: str) -> EvalReport:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        report = evaluate(model, tokenizer, samples, cfg, name=name)
    model.train(was_training)
    report.write(out_dir, name)
    return report


def contact_sheet(samples: list[EvalSample], report: EvalReport, path: Path, limit: int = 24) -> Path:
    """Held-out images with prediction vs target, one row each."""
    from PIL import Image, ImageDraw

    preds = {r.key: r.prediction for r in report.records}
    rows = samples[:limit]
    lines = max(1, *(s.reference.count("\n") + 1 for s in rows))
    thumb_w, thumb_h, text_w = 256, max(64, 28 * lines + 8), 360  # one text line is ~12 px; two blocks
    sheet = Image.new("RGB", (thumb_w + text_w, thumb_h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, sample in enumerate(rows):
        image = sample.load_image().convert("RGB")
        image.thumbnail((thumb_w, thumb_h))
        sheet.paste(image, (0, i * thumb_h))
        pred = preds.get(sample.key, "?")
        ok = pred == sample.reference
        draw.text((thumb_w + 8, i * thumb_h + 8), f"target: {sample.reference}", fill="black")
        draw.text(
            (thumb_w + 8, i * thumb_h + 14 * lines + 18), f"output: {pred}", fill="darkgreen" if ok else "red"
        )
    sheet.save(path)
    return path


# ----------------------------------------------------------------------------- job
@dataclass
class JobData:
    train_shards: dict[str, str] | None  # synth / real_lines set -> train shards (None: data.sources)
    val_sets: dict[str, list[EvalSample]]  # held-out sets; the first one drives eval during training
    tokenizer: OCRTokenizer

    @property
    def val_samples(self) -> list[EvalSample]:
        return next(iter(self.val_sets.values()), [])


def prepare_job_data(data: DataConfig, ev: EvalConfig, out: Path, *, render: bool = True) -> JobData:
    """Shards, held-out samples and the tokenizer; identical on every rank of a job.

    A kind that renders its shards into the run directory (synth_lines, real_lines) does so on
    one rank of a multi-process job (render=True); the others, after a barrier, read them
    (render=False)."""
    kind = data_kind(data).prepare(data, out / "data", render)
    val_shards = kind.val
    val_sets = {name: read_eval_set(pattern, limit=ev.num_samples) for name, pattern in val_shards.items()}
    corpus = [s.reference for samples in val_sets.values() for s in samples]
    tokenizer = build_tokenizer_for(data.tokenizer, corpus, DEMO_ALPHABET + kind.alphabet)
    return JobData(kind.train, val_sets, tokenizer)


def validate_data_paths(data: DataConfig) -> None:
    """ValueError naming the field when the data kind's configured paths are wrong (before any
    model is built; the typed schemas check every other field when the config is composed)."""
    data_kind(data).check_paths(data)


def run_from_config(run: RunConfig, resolved_yaml: str | None = None) -> JobResult | None:
    """Entry of `dsocr-train`: one process (`run_job`), or this rank of a multi-process job
    (`run_distributed_job`: parallel.pp >= 2 -> pipeline, parallel.pp = 1 -> data parallel)."""
    validate_model_options(run.model)
    validate_data_paths(run.data)
    out = Path(run.train.out_dir)
    env = dist_env()
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if resolved_yaml is not None:
            record_config(
                out, resolved_yaml, resume=run.train.resume, allow_change=run.train.allow_config_change
            )
    if run.parallel.pp > 1 or env.world_size > 1:
        preempted = run_distributed_job(run, out, env.rank)
        if preempted:
            exit_preempted()
        return None
    job = run_job(run)
    if job.preempted:
        exit_preempted()
    return job


def run_distributed_job(run: RunConfig, out: Path, rank: int) -> bool:
    """This rank's share of a multi-process job (launch/ starts one process per GPU): the DeepSpeed
    pipeline for parallel.pp >= 2, data parallelism over the whole model for parallel.pp = 1.
    True when SIGTERM stopped it (after its checkpoint)."""
    from pipeline.parallel.data_parallel import prepare_data_parallel, run_data_parallel_training
    from pipeline.parallel.trainer import init_distributed, run_pipeline_training

    if data_kind(run.data).renders:  # rank 0 renders the shards once, the others read them
        init_distributed()
        if rank == 0:
            data = prepare_job_data(run.data, run.eval, out)
        torch.distributed.barrier()
        if rank != 0:
            data = prepare_job_data(run.data, run.eval, out, render=False)
    else:
        data = prepare_job_data(run.data, run.eval, out)
    if rank == 0:
        data.tokenizer.save(out / "tokenizer")
    config = loader_config(
        run.data, run.eval, data.train_shards, batch_size=run.parallel.micro_batch, seed=run.train.seed
    )

    def loader_factory(dp_rank: int, dp_world: int) -> StreamingLoader:
        return StreamingLoader(config, data.tokenizer, dp_rank=dp_rank, dp_world=dp_world)

    if run.parallel.pp == 1:
        prepare_data_parallel(run, data.tokenizer, dist_env().world_size)  # config errors before the model
        periodic = None
        if run.train.eval_every and data.val_samples:  # held-out CER, run by rank 0 (the others wait)
            periodic = training_eval_hook(
                data.tokenizer, data.val_samples, eval_config(run.data, run.eval), out_dir=out / "eval"
            )
        chunk = run.parallel.loss_chunk_tokens
        result = run_data_parallel_training(run, tokenizer=data.tokenizer, loader_factory=loader_factory,
                                            model_factory=lambda: build_run_model(run.model, data.tokenizer,
                                                                                  loss_chunk_tokens=chunk),
                                            eval_hook=periodic)  # fmt: skip
        where = f"dp {result.dp_rank}"
    else:
        result = run_pipeline_training(run, tokenizer=data.tokenizer, loader_factory=loader_factory)
        where = f"stage {result.stage}, dp {result.dp_rank}"
    if result.losses:
        print(f"[job] rank {rank} ({where}): {result.steps} steps, loss {result.losses[0]:.3f} -> "
              f"{result.losses[-1]:.3f}; checkpoint {result.last_checkpoint}", flush=True)  # fmt: skip
    return result.stopped_by_signal


def run_job(run: RunConfig) -> JobResult:
    """The single-process job (PP=1, one device): train, evaluate before/after, export."""
    out = Path(run.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if run.parallel.pp != 1 or (run.parallel.dp or 1) != 1:
        raise ValueError(
            f"parallel.pp={run.parallel.pp}, parallel.dp={run.parallel.dp}: this entry runs one process; "
            "start pipeline/data-parallel jobs through launch/ (torchrun / deepspeed / SLURM)"
        )
    set_torch_threads(run.train.threads)
    torch.manual_seed(run.train.seed)
    torch.use_deterministic_algorithms(run.train.deterministic, warn_only=True)
    device = resolve_device(run.train.device)

    data = prepare_job_data(run.data, run.eval, out)
    tokenizer, val_samples = data.tokenizer, data.val_samples
    tokenizer.save(out / "tokenizer")
    batch, seed = run.parallel.micro_batch, run.train.seed
    if data_kind(run.data).derives_from_data:  # row length, eval budget and mode, before any eval
        profiled = loader_config(run.data, run.eval, None, batch_size=batch, seed=seed)
        apply_to_run(run, tokenizer, profiled, [s.reference for s in val_samples], "job")
    train_data = loader_config(run.data, run.eval, data.train_shards, batch_size=batch, seed=seed)
    loader = StreamingLoader(train_data, tokenizer, dp_rank=0, dp_world=1)

    model = build_run_model(run.model, tokenizer, loss_chunk_tokens=run.parallel.loss_chunk_tokens)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"[job] {run.name}: model {run.model.encoder}+{run.model.decoder}, {n_params:,} parameters "
          f"({n_train:,} trainable), device {device}, out {out}", flush=True)  # fmt: skip

    ecfg = eval_config(run.data, run.eval)
    other_sets = {name: samples for name, samples in list(data.val_sets.items())[1:] if samples}
    other_cfg = {name: set_eval_config(run.data, run.eval, name) for name in other_sets}
    # a resumed run (e.g. a time-boxed job continued) keeps the reports of the untrained model
    resuming = run.train.resume and latest_checkpoint(out) is not None

    def before_eval(samples, cfg, stem):
        saved = out / "eval" / f"{stem}_report.json"
        if resuming and saved.exists():
            return SavedScores.read(saved)
        return run_eval(model, tokenizer, samples, cfg, out / "eval", stem).raw

    before = before_eval(val_samples, ecfg, "before") if val_samples else None
    other_before = {name: before_eval(samples, other_cfg[name], f"before_{name}")
                    for name, samples in other_sets.items()}  # fmt: skip

    logger = RunLogger(out, run.logger, asdict(run), run.name)
    periodic = None
    if run.train.eval_every and val_samples:  # held-out CER during training (cer in metrics.jsonl)
        periodic = training_eval_hook(tokenizer, val_samples, ecfg, out_dir=out / "eval")
    trainer = local_trainer(model, loader, train=run.train, optim=run.optim, parallel=run.parallel,
                            seq_len=run.data.seq_len, device=device, logger=logger, evaluate=periodic,
                            meta={"model": {"encoder": run.model.encoder, "decoder": run.model.decoder}})  # fmt: skip
    trainer.resume()
    result = trainer.train()
    export_release(model, tokenizer, out / "model")
    TrainingInfo(ecfg.mode, ecfg.prompt, mode_mix(train_data.sources)).write(out / "model")
    export_encoder_if_requested(model, run.model, out, run_name=run.name, step=trainer.step)

    after = None
    if val_samples and not result.stopped_by_signal:
        after = run_eval(model, tokenizer, val_samples, ecfg, out / "eval", "after")
        logger.log({"event": "eval", "step": trainer.step, "cer": after.raw.corpus_cer}, console=False)
        contact_sheet(val_samples, after, out / "eval" / "contact_sheet.png")
    other_after = {}
    for name, samples in other_sets.items():
        if result.stopped_by_signal:
            break
        other_after[name] = run_eval(
            model, tokenizer, samples, other_cfg[name], out / "eval", f"after_{name}"
        )
        logger.log({"event": "eval", "step": trainer.step, f"cer_{name}": other_after[name].raw.corpus_cer},
                   console=False)  # fmt: skip
        contact_sheet(samples, other_after[name], out / "eval" / f"contact_sheet_{name}.png")
    logger.close()
    plot_run(out / "metrics.jsonl", out / "plots")

    job = JobResult(
        out_dir=out,
        steps=result.steps,
        first_loss=first_logged_loss(out),  # the run's first step, also after a resume
        last_loss=sum(result.losses[-20:]) / len(result.losses[-20:]) if result.losses else None,
        cer_before=before.corpus_cer if before else None,
        cer_after=after.raw.corpus_cer if after else None,
        capped_before=before.capped_cer if before else None,
        capped_after=after.raw.capped_cer if after else None,
        checkpoint=result.last_checkpoint,
        preempted=result.stopped_by_signal,
        other_sets={
            name: (
                other_before[name].corpus_cer,
                other_after[name].raw.corpus_cer if name in other_after else None,
            )
            for name in other_sets
        },  # fmt: skip
    )
    print_summary(job)
    return job


def print_summary(job: JobResult) -> None:
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    print("\n=== run summary ===")
    print(f"steps trained        {job.steps}")
    print(f"train loss           {fmt(job.first_loss)} -> {fmt(job.last_loss)} (mean of the last 20 steps)")
    print(f"held-out CER         {fmt(job.cer_before)} before -> {fmt(job.cer_after)} after (corpus)")
    print(
        f"  capped at 1        {fmt(job.capped_before)} before -> {fmt(job.capped_after)} after (mean per line)"
    )
    for name, (cer_before, cer_after) in job.other_sets.items():
        print(f"{'  ' + name:<21}{fmt(cer_before)} before -> {fmt(cer_after)} after (corpus CER)")
    print(f"run directory        {job.out_dir}")
    print(f"  checkpoint         {job.checkpoint}")
    print(f"  model (release)    {job.out_dir / 'model'}")
    print(f"  metrics log        {job.out_dir / 'metrics.jsonl'}")
    print(f"  plots              {job.out_dir / 'plots'}")
    print(f"  eval reports       {job.out_dir / 'eval'} (before*, after*, contact_sheet*.png)", flush=True)


__all__ = ["JobResult", "run_from_config", "run_job"]
