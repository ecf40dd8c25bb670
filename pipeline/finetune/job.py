"""One fine-tuning job from a typed RunConfig: base -> adapters/freezing -> replay mix -> train -> eval -> export.

1. Base model: `model.init_from` (released-layout directory, our checkpoint, a consolidated
   pipeline checkpoint converted by `dsocr-convert consolidate`), read by `load_any`; a stage-1
   encoder export goes in `model.encoder_init` (loaded over the base's encoder, strict). The
   embedded default (data.kind=synth_lines, no init_from) first trains a tiny base on Latin reading lines (finetune.demo.base_steps).
2. Data: the data kind's (`DataKind.finetune_data`, pipeline/finetune/data.py): target =
   `data.sources` (webdataset) or, for the demo, reading lines of a new script
   (`pipeline.finetune.demo`); replay = `finetune.replay.shards` (the demo: the Latin lines),
   mixed per sample with weight `finetune.replay.share` in one `StreamingLoader`.
3. Trainable parameters: LoRA (peft) or per-component full training (`pipeline.finetune.lora`);
   a character vocabulary is extended to the target's new letters (`pipeline.finetune.vocab`).
4. Eval before and after on the held-out target set and the held-out original-capability set
   (`pipeline.eval`), so both the gain and any forgetting show in one table.
5. Train with `pipeline.train.trainer.Trainer` (same loop, checkpoints, resume and logs as
   `dsocr-train`), then export the adapter and/or the merged release-layout checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.checkpoint_io import load_any
from pipeline.config import DataConfig, ParallelConfig, RunConfig, TrainConfig
from pipeline.data.config import LoaderConfig, SourceSpec
from pipeline.data.loader import StreamingLoader
from pipeline.data.profile import apply_to_run
from pipeline.eval.data import read_eval_set
from pipeline.eval.plots import plot_run
from pipeline.eval.report import EvalReport, format_comparison
from pipeline.eval.runner import EvalRunConfig
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.data import FinetuneData
from pipeline.finetune.export import export_merged, save_adapter
from pipeline.finetune.lora import apply_lora, set_trainable, trainable_summary
from pipeline.finetune.vocab import cover_texts, is_char_tokenizer
from pipeline.model import DeepSeekOCR
from pipeline.threads import set_torch_threads
from pipeline.tokenizer import OCRTokenizer
from pipeline.train.data_kinds import data_kind
from pipeline.train.job import eval_config, resolve_device, run_eval, set_step_options
from pipeline.train.local_engine import local_trainer
from pipeline.train.logging import RunLogger
from pipeline.train.run_dir import first_logged_loss, record_config
from pipeline.training_info import TrainingInfo, mode_mix

log = logging.getLogger(__name__)
VOCAB_SCAN_LIMIT = 20_000  # training samples scanned for characters a char vocabulary lacks


@dataclass
class FinetuneResult:
    out_dir: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    reports: dict[str, EvalReport]  # "target_before", "target_after", "original_before", "original_after"
    added_chars: list[str]
    adapter_dir: Path | None
    merged_dir: Path | None
    preempted: bool = False  # SIGTERM stopped it after a checkpoint: resume with the same command

    def cer(self, name: str) -> float | None:
        report = self.reports.get(name)
        return report.raw.corpus_cer if report is not None else None


# ----------------------------------------------------------------------------- data
def loader_config(cfg: DataConfig, data: FinetuneData, *, batch_size: int, seed: int) -> LoaderConfig:
    """The target + replay mixture with the `data` section's row settings (`batch_size` is
    parallel.micro_batch, `seed` train.seed)."""
    sources = [*data.target_train, *([data.replay_train] if data.replay_train else [])]
    return LoaderConfig(sources=sources, seq_len=cfg.seq_len, batch_size=batch_size, packing=cfg.pack,
                        seed=seed, num_workers=cfg.num_workers, max_pixels=cfg.max_pixels,
                        max_tiles=cfg.max_tiles)  # fmt: skip


def training_texts(sources: list[SourceSpec], limit: int) -> list[str]:
    """Reference texts of the first `limit` samples of the target sources (vocabulary coverage)."""
    texts: list[str] = []
    for source in sources:
        for pattern in source.shards:
            texts += [s.reference for s in read_eval_set(pattern, limit=max(1, limit - len(texts)))]
            if len(texts) >= limit:
                return texts
    return texts


# ----------------------------------------------------------------------------- model
def prepare_model(model, tokenizer, ft: FinetuneConfig, texts: list[str]):
    """Cover the target texts, then freeze / inject LoRA. Returns (model, peft model or None, tokenizer, added)."""
    tokenizer, added = cover_texts(model, tokenizer, texts, extend=ft.extend_vocab)
    components = ft.trained_components
    if added:
        extra = [c for c in ("embed", "lm_head") if c not in components]
        if extra:
            print(
                f"[finetune] {len(added)} new characters: training {extra} fully for their new rows",
                flush=True,
            )
        components = [*components, *extra]
    if ft.method == "lora":
        return model, apply_lora(model, ft.lora, components), tokenizer, added
    set_trainable(model, components)
    return model, None, tokenizer, added


# ----------------------------------------------------------------------------- job
@dataclass
class Prepared:
    """Everything a fine-tune needs before its first step (built identically on every rank)."""

    base_path: Path
    data: FinetuneData
    model: DeepSeekOCR  # adapted in place when LoRA: train and evaluate this
    peft_model: object | None  # the peft wrapper, for saving and merging
    tokenizer: OCRTokenizer
    added: list[str]
    evals: dict[str, list]  # "target" / "original" -> EvalSample list (may be empty)


def prepare(run: RunConfig, out: Path) -> Prepared:
    """Base checkpoint, data, vocabulary coverage, freezing / adapters (no device move)."""
    ft = run.finetune
    kind = data_kind(run.data)
    base_path, data = kind.finetune_data(run, out)
    torch.manual_seed(run.train.seed)
    model, tokenizer = load_any(base_path)
    m = run.model
    if m.encoder_init or m.sam_init or m.clip_init:  # e.g. a stage-1 encoder export over the release
        from pipeline.stage1.options import apply_model_options

        print(
            f"[finetune] {apply_model_options(model, m).summary()}", flush=True
        )  # trainability is set below
    target_val = read_eval_set(data.target_val, limit=ft.eval_samples)
    original_val = read_eval_set(data.original_val, limit=ft.eval_samples) if data.original_val else []
    texts = [s.reference for s in target_val]
    if is_char_tokenizer(tokenizer):
        texts += training_texts(data.target_train, VOCAB_SCAN_LIMIT)
    if m.freeze or (m.freeze_sam and "sam" in ft.trained_components):
        log.warning("model.freeze / model.freeze_sam are not read by a fine-tune: finetune.train_components "
                    "(and finetune.method) decide what trains, here %s", ft.trained_components or "adapters only")  # fmt: skip
    model, peft_model, tokenizer, added = prepare_model(model, tokenizer, ft, texts)
    set_step_options(model, m, run.parallel.loss_chunk_tokens)
    if kind.derives_from_data:  # row length, eval budget and mode from the data, before any eval
        references = [s.reference for s in (*target_val, *original_val)]
        profiled = loader_config(run.data, data, batch_size=run.parallel.micro_batch, seed=run.train.seed)
        apply_to_run(run, tokenizer, profiled, references, "finetune")
    evals = {"target": target_val, "original": original_val}
    return Prepared(base_path, data, model, peft_model, tokenizer, added, evals)


def evaluate_sets(ecfg: EvalRunConfig, prep: Prepared, out: Path, when: str) -> dict[str, EvalReport]:
    """CER reports of the held-out target and original-capability sets, named "<set>_<when>"."""
    return {
        f"{name}_{when}": run_eval(prep.model, prep.tokenizer, samples, ecfg, out / "eval", f"{name}_{when}")
        for name, samples in prep.evals.items()
        if samples
    }


def finish(
    ft: FinetuneConfig,
    info: TrainingInfo,
    prep: Prepared,
    out: Path,
    reports,
    steps: int,
    losses: list[float],
) -> FinetuneResult:
    """Exports (adapter and/or merged release layout, each with `info`: how the model was
    trained and is to be prompted), summary file and the printed report."""
    adapter_dir = merged_dir = None
    if prep.peft_model is not None and ft.export in ("adapter", "both"):
        adapter_dir = save_adapter(prep.peft_model, prep.tokenizer, out / "adapter", base=str(prep.base_path),
                                   meta={"added_chars": "".join(prep.added)})  # fmt: skip
    if ft.export in ("merged", "both"):
        target = prep.peft_model if prep.peft_model is not None else prep.model
        merged_dir = export_merged(
            target, prep.tokenizer, out / "merged", modeling_from=release_code(ft, prep)
        )
    for folder in (adapter_dir, merged_dir):
        if folder is not None:
            info.write(folder)
    job = FinetuneResult(
        out_dir=out,
        steps=steps,
        first_loss=first_logged_loss(out),  # the run's first step, also after a resume
        last_loss=sum(losses[-20:]) / len(losses[-20:]) if losses else None,
        reports=reports,
        added_chars=prep.added,
        adapter_dir=adapter_dir,
        merged_dir=merged_dir,
    )
    write_summary(job)
    print_report(job)
    return job


def release_code(ft: FinetuneConfig, prep: Prepared) -> Path | None:
    """Where the merged export copies the release's modeling files from (config.json's auto_map
    names them): finetune.release_code, else the base when it is a released directory holding them."""
    if ft.release_code:
        return Path(ft.release_code)
    return prep.base_path if any(prep.base_path.glob("modeling_*.py")) else None


def start_output(train: TrainConfig, parallel: ParallelConfig, resolved_yaml: str | None) -> Path:
    out = Path(train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if resolved_yaml is not None:
        record_config(out, resolved_yaml, resume=train.resume, allow_change=train.allow_config_change)
    if parallel.pp != 1:
        raise ValueError(f"parallel.pp={parallel.pp}: a fine-tune runs data parallel only (pp=1)")
    set_torch_threads(train.threads)
    return out


def describe(name: str, ft: FinetuneConfig, prep: Prepared, device, out: Path) -> None:
    trainable, total = trainable_summary(prep.model)
    print(f"[finetune] {name}: base {prep.base_path}, method {ft.method}, {trainable:,} of "
          f"{total:,} parameters trainable, replay share {ft.replay.share}, device {device}, "
          f"out {out}", flush=True)  # fmt: skip


def run_finetune(run: RunConfig, resolved_yaml: str | None = None) -> FinetuneResult:
    """The single-process fine-tune (one device); see the module docstring."""
    out = start_output(run.train, run.parallel, resolved_yaml)
    if (run.parallel.dp or 1) != 1:
        raise ValueError(
            f"parallel.dp={run.parallel.dp}: this entry runs one process; launch data-parallel fine-tunes "
            "with torchrun (dsocr-finetune dispatches to pipeline.finetune.distributed when WORLD_SIZE > 1)"
        )
    device = resolve_device(run.train.device)
    prep = prepare(run, out)
    prep.tokenizer.save(out / "tokenizer")
    prep.model.to(device)
    describe(run.name, run.finetune, prep, device, out)
    ecfg = eval_config(run.data, run.eval)
    reports = evaluate_sets(ecfg, prep, out, "before")

    train_data = loader_config(run.data, prep.data, batch_size=run.parallel.micro_batch, seed=run.train.seed)
    loader = StreamingLoader(train_data, prep.tokenizer, dp_rank=0, dp_world=1)
    logger = RunLogger(out, run.logger, asdict(run), run.name)
    trainer = local_trainer(prep.model, loader, train=run.train, optim=run.optim, parallel=run.parallel,
                            seq_len=run.data.seq_len, device=device, logger=logger,
                            meta={"finetune": run.finetune.method})  # fmt: skip
    trainer.resume()
    result = trainer.train()
    if result.stopped_by_signal:  # the checkpoint is written; resume with the same command
        logger.close()
        return FinetuneResult(out, result.steps, None, None, reports, prep.added, None, None, preempted=True)
    after = evaluate_sets(ecfg, prep, out, "after")
    for name, report in after.items():
        logger.log(
            {"event": "eval", "set": name, "step": trainer.step, "cer": report.raw.corpus_cer}, console=False
        )
    logger.close()
    plot_run(out / "metrics.jsonl", out / "plots")
    info = TrainingInfo(ecfg.mode, ecfg.prompt, mode_mix(train_data.sources))
    return finish(run.finetune, info, prep, out, {**reports, **after}, result.steps, result.losses)


def write_summary(job: FinetuneResult) -> Path:
    summary = {
        "steps": job.steps,
        "first_loss": job.first_loss,
        "last_loss": job.last_loss,
        "added_chars": "".join(job.added_chars),
        "cer": {name: report.raw.corpus_cer for name, report in job.reports.items()},
        "cer_normalized": {name: report.normalized.corpus_cer for name, report in job.reports.items()},
        "adapter": str(job.adapter_dir) if job.adapter_dir else None,
        "merged": str(job.merged_dir) if job.merged_dir else None,
    }
    path = job.out_dir / "finetune_summary.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return path


def print_report(job: FinetuneResult) -> None:
    """Before/after CER of the target and original-capability sets, then where everything is."""
    fmt = lambda x: "n/a" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    order = [
        n for n in ("target_before", "target_after", "original_before", "original_after") if n in job.reports
    ]
    print("\n=== fine-tune report ===")
    if order:
        print(format_comparison([job.reports[n] for n in order], title="held-out sets, before / after"))
    print(f"target CER (corpus, raw)    {fmt(job.cer('target_before'))} -> {fmt(job.cer('target_after'))}")
    print(
        f"original CER (forgetting)   {fmt(job.cer('original_before'))} -> {fmt(job.cer('original_after'))}"
    )
    loss = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    print(
        f"train loss                  {loss(job.first_loss)} -> {loss(job.last_loss)} over {job.steps} steps"
    )
    if job.added_chars:
        print(f"characters added            {''.join(job.added_chars)}")
    print(f"adapter                     {job.adapter_dir or '-'}")
    print(f"merged (release layout)     {job.merged_dir or '-'}")
    print(f"summary                     {job.out_dir / 'finetune_summary.json'}", flush=True)
