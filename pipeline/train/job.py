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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.checkpoint_io import export_release, load_any
from pipeline.config import RunConfig
from pipeline.data.config import LoaderConfig, SourceSpec, from_run_config
from pipeline.data.loader import StreamingLoader
from pipeline.eval.data import EvalSample, read_eval_set
from pipeline.eval.plots import plot_run
from pipeline.eval.report import EvalReport
from pipeline.eval.runner import EvalRunConfig, evaluate, training_eval_hook
from pipeline.model import DeepSeekOCR, build_model
from pipeline.parallel.topology import dist_env
from pipeline.stage1.options import apply_model_options, export_encoder_if_requested, validate_model_options
from pipeline.tokenizer import OCRTokenizer, build_char_tokenizer, build_tokenizer, load_tokenizer
from pipeline.train.logging import RunLogger
from pipeline.train.loop import LocalTrainer
from pipeline.train.optim import build_optimizer, build_scheduler, param_groups

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


# ----------------------------------------------------------------------------- data
def prepare_synth_lines(run: RunConfig, data_dir: Path) -> tuple[str, str]:
    """Render the train/val reading lines into shards (reused when already complete)."""
    from data_tools.shards import ShardWriterConfig
    from data_tools.synth.reading import ReadingLinesConfig, write_reading_lines

    syn = run.data.synth
    patterns = []
    for split, n, seed in (("train", syn.num_train, syn.seed), ("val", syn.num_val, syn.seed + 7919)):
        cfg = ReadingLinesConfig(n=n, seed=seed, width=syn.image_size, min_chars=syn.min_chars,
                                 max_chars=syn.max_chars, source=f"reading-lines-{split}")  # fmt: skip
        out = data_dir / split
        manifest = out / "manifest.json"
        if not (manifest.exists() and json.loads(manifest.read_text()).get("reading_lines") == vars(cfg)):
            writer = ShardWriterConfig(str(out), prefix=split, max_count=5000, overwrite=True)
            write_reading_lines(cfg, writer, workers=syn.workers)
        patterns.append(str(out / f"{split}-*.tar"))
    return patterns[0], patterns[1]


def build_tokenizer_for(run: RunConfig, corpus: list[str]) -> OCRTokenizer:
    spec = run.data.tokenizer
    if spec == "char":
        return build_char_tokenizer(DEMO_ALPHABET + "".join(sorted(set("".join(corpus)))))
    if spec == "bpe":
        return build_tokenizer(corpus, vocab_size=4096)
    return load_tokenizer(spec)


def loader_config(run: RunConfig, train_shards: str | None) -> LoaderConfig:
    batch = run.parallel.micro_batch
    if run.data.kind == "synth_lines":
        source = SourceSpec("reading-lines", train_shards, prompt="free_ocr", modes=run.data.synth.mode)
        return LoaderConfig(sources=[source], seq_len=run.data.seq_len, batch_size=batch,
                            packing=run.data.pack, seed=run.train.seed, num_workers=run.data.num_workers)  # fmt: skip
    if run.data.kind == "webdataset":
        return from_run_config(run.data, batch_size=batch, seed=run.train.seed)
    raise ValueError(f"data.kind must be 'synth_lines' or 'webdataset', got {run.data.kind!r}")


# ----------------------------------------------------------------------------- model
def build_run_model(run: RunConfig, tokenizer: OCRTokenizer) -> DeepSeekOCR:
    m = run.model
    if m.init_from:
        model, loaded_tok = load_any(m.init_from)
        if loaded_tok.vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"model.init_from={m.init_from} has a vocabulary of {loaded_tok.vocab_size} but "
                f"data.tokenizer gives {tokenizer.vocab_size}: use the checkpoint's tokenizer directory"
            )
    else:
        model = build_model(m.encoder, m.decoder, tokenizer.vocab_size, image_token_id=tokenizer.image_id,
                            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                            encoder_overrides=dict(m.encoder_overrides), **dict(m.decoder_overrides))  # fmt: skip
    applied = apply_model_options(model, m)  # encoder_init / sam_init / clip_init, freezing
    print(f"[job] {applied.summary()}", flush=True)
    if m.gradient_checkpointing:
        model.encoder.set_gradient_checkpointing(True)
        model.decoder.set_gradient_checkpointing(True)
    return model


# ----------------------------------------------------------------------------- eval
def eval_config(run: RunConfig) -> EvalRunConfig:
    mode = run.data.synth.mode if run.data.kind == "synth_lines" else run.eval.mode
    return EvalRunConfig(mode=mode, prompt="free_ocr", batch_size=run.eval.batch_size,
                         max_new_tokens=run.eval.max_new_tokens, no_repeat_ngram_size=run.eval.no_repeat_ngram_size,
                         no_repeat_window=run.eval.no_repeat_window)  # fmt: skip


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
    thumb_w, thumb_h, text_w = 256, 64, 360
    sheet = Image.new("RGB", (thumb_w + text_w, thumb_h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, sample in enumerate(rows):
        image = sample.load_image().convert("RGB")
        image.thumbnail((thumb_w, thumb_h))
        sheet.paste(image, (0, i * thumb_h))
        pred = preds.get(sample.key, "?")
        ok = pred == sample.reference
        draw.text((thumb_w + 8, i * thumb_h + 8), f"target: {sample.reference}", fill="black")
        draw.text((thumb_w + 8, i * thumb_h + 32), f"output: {pred}", fill="darkgreen" if ok else "red")
    sheet.save(path)
    return path


# ----------------------------------------------------------------------------- job
@dataclass
class JobData:
    train_shards: str | None
    val_samples: list[EvalSample]
    tokenizer: OCRTokenizer


def prepare_job_data(run: RunConfig, out: Path, *, rank: int = 0) -> JobData:
    """Shards, held-out samples and the tokenizer; identical on every rank of a job."""
    train_shards = None
    if run.data.kind == "synth_lines":
        if rank != 0:
            raise ValueError(
                "data.kind=synth_lines renders its data inside one process; for multi-process runs write "
                "shards first (dsocr-data synth / convert-*) and use data.kind=webdataset"
            )
        train_shards, val_shards = prepare_synth_lines(run, out / "data")
    else:
        val_shards = run.data.val_shards
    val_samples = read_eval_set(val_shards, limit=run.eval.num_samples) if val_shards else []
    tokenizer = build_tokenizer_for(run, [s.reference for s in val_samples])
    return JobData(train_shards, val_samples, tokenizer)


def run_from_config(run: RunConfig, resolved_yaml: str | None = None) -> JobResult | None:
    """Entry of `dsocr-train`: one process (`run_job`), or this rank of a multi-process job
    (`run_distributed_job`: parallel.pp >= 2 -> pipeline, parallel.pp = 1 -> data parallel)."""
    validate_model_options(run.model)
    out = Path(run.train.out_dir)
    env = dist_env()
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if resolved_yaml is not None:
            (out / "config.yaml").write_text(resolved_yaml)
    if run.parallel.pp > 1 or env.world_size > 1:
        run_distributed_job(run, out, env.rank)
        return None
    return run_job(run)


def run_distributed_job(run: RunConfig, out: Path, rank: int) -> None:
    """This rank's share of a multi-process job (launch/ starts one process per GPU): the DeepSpeed
    pipeline for parallel.pp >= 2, data parallelism over the whole model for parallel.pp = 1."""
    from pipeline.parallel.data_parallel import prepare_data_parallel, run_data_parallel_training
    from pipeline.parallel.trainer import init_distributed, run_pipeline_training

    if run.data.kind == "synth_lines":
        # rank 0 renders the shards once; after the barrier every other rank finds them complete
        # (prepare_synth_lines only compares their manifests) and reads the same files
        init_distributed()
        if rank == 0:
            data = prepare_job_data(run, out, rank=0)
        torch.distributed.barrier()
        if rank != 0:
            data = prepare_job_data(run, out, rank=0)
    else:
        data = prepare_job_data(run, out, rank=rank)
    if rank == 0:
        data.tokenizer.save(out / "tokenizer")
    config = loader_config(run, data.train_shards)

    def loader_factory(dp_rank: int, dp_world: int) -> StreamingLoader:
        return StreamingLoader(config, data.tokenizer, dp_rank=dp_rank, dp_world=dp_world)

    if run.parallel.pp == 1:
        prepare_data_parallel(run, data.tokenizer, dist_env().world_size)  # config errors before the model
        periodic = None
        if run.train.eval_every and data.val_samples:  # held-out CER, run by rank 0 (the others wait)
            periodic = training_eval_hook(
                data.tokenizer, data.val_samples, eval_config(run), out_dir=out / "eval"
            )
        result = run_data_parallel_training(run, tokenizer=data.tokenizer, loader_factory=loader_factory,
                                            model_factory=lambda: build_run_model(run, data.tokenizer),
                                            eval_hook=periodic)  # fmt: skip
        where = f"dp {result.dp_rank}"
    else:
        result = run_pipeline_training(run, tokenizer=data.tokenizer, loader_factory=loader_factory)
        where = f"stage {result.stage}, dp {result.dp_rank}"
    if result.losses:
        print(f"[job] rank {rank} ({where}): {result.steps} steps, loss {result.losses[0]:.3f} -> "
              f"{result.losses[-1]:.3f}; checkpoint {result.last_checkpoint}", flush=True)  # fmt: skip


def run_job(run: RunConfig) -> JobResult:
    """The single-process job (PP=1, one device): train, evaluate before/after, export."""
    out = Path(run.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if run.parallel.pp != 1 or (run.parallel.dp or 1) != 1:
        raise ValueError(
            f"parallel.pp={run.parallel.pp}, parallel.dp={run.parallel.dp}: this entry runs one process; "
            "start pipeline/data-parallel jobs through launch/ (torchrun / deepspeed / SLURM)"
        )
    if run.train.threads:
        torch.set_num_threads(run.train.threads)
    torch.manual_seed(run.train.seed)
    torch.use_deterministic_algorithms(run.train.deterministic, warn_only=True)
    device = resolve_device(run.train.device)

    data = prepare_job_data(run, out)
    tokenizer, val_samples = data.tokenizer, data.val_samples
    tokenizer.save(out / "tokenizer")
    loader = StreamingLoader(loader_config(run, data.train_shards), tokenizer, dp_rank=0, dp_world=1)

    model = build_run_model(run, tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"[job] {run.name}: model {run.model.encoder}+{run.model.decoder}, {n_params:,} parameters "
          f"({n_train:,} trainable), device {device}, out {out}", flush=True)  # fmt: skip

    ecfg = eval_config(run)
    before = run_eval(model, tokenizer, val_samples, ecfg, out / "eval", "before") if val_samples else None

    optimizer = build_optimizer(param_groups(model, run.optim.weight_decay), run.optim)
    scheduler = build_scheduler(optimizer, run.train.max_steps, run.optim)
    logger = RunLogger(out, run.logger, asdict(run), run.name)
    periodic = None
    if run.train.eval_every and val_samples:  # held-out CER during training (cer in metrics.jsonl)
        periodic = training_eval_hook(tokenizer, val_samples, ecfg, out_dir=out / "eval")
    trainer = LocalTrainer(
        model, optimizer, scheduler, loader, run, device=device, logger=logger, evaluate=periodic
    )
    trainer.maybe_resume()
    result = trainer.train()
    if not result.stopped_by_signal:
        result.last_checkpoint = trainer.save()
    export_release(model, tokenizer, out / "model")
    export_encoder_if_requested(model, run, out, step=trainer.step)

    after = None
    if val_samples and not result.stopped_by_signal:
        after = run_eval(model, tokenizer, val_samples, ecfg, out / "eval", "after")
        logger.log({"event": "eval", "step": trainer.step, "cer": after.raw.corpus_cer}, console=False)
        contact_sheet(val_samples, after, out / "eval" / "contact_sheet.png")
    logger.close()
    plot_run(out / "metrics.jsonl", out / "plots")

    job = JobResult(
        out_dir=out,
        steps=result.steps,
        first_loss=result.losses[0] if result.losses else None,
        last_loss=sum(result.losses[-20:]) / len(result.losses[-20:]) if result.losses else None,
        cer_before=before.raw.corpus_cer if before else None,
        cer_after=after.raw.corpus_cer if after else None,
        capped_before=before.raw.capped_cer if before else None,
        capped_after=after.raw.capped_cer if after else None,
        checkpoint=result.last_checkpoint,
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
    print(f"run directory        {job.out_dir}")
    print(f"  checkpoint         {job.checkpoint}")
    print(f"  model (release)    {job.out_dir / 'model'}")
    print(f"  metrics log        {job.out_dir / 'metrics.jsonl'}")
    print(f"  plots              {job.out_dir / 'plots'}")
    print(f"  eval reports       {job.out_dir / 'eval'} (before.*, after.*, contact_sheet.png)", flush=True)


__all__ = ["JobResult", "run_from_config", "run_job"]
