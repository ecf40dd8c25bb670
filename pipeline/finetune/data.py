"""The base model and data of a fine-tune, per data kind (`DataKind.finetune_data` in
pipeline/train/data_kinds.py calls these; the fine-tuning job never branches on `data.kind`):

- `synth_lines` (the embedded default): with no `model.init_from`, a tiny Latin base trained
  first with `pipeline.train.job.run_job` (finetune.demo.base_steps); the target is reading
  lines of a new script (`pipeline.finetune.demo`), replay and original capability the Latin lines;
- `webdataset`: the base is `model.init_from`; the target is `data.sources`, replay
  `finetune.replay.shards`, mixed per sample with weight `finetune.replay.share`; the target
  sources take finetune.mode, else the mode the base was trained in.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.checkpoint_io import OUR_CONFIG
from pipeline.config import DataConfig, EvalConfig, RunConfig
from pipeline.data.config import SourceSpec, from_run_config
from pipeline.finetune.config import FinetuneConfig
from pipeline.processing import mode_weights
from pipeline.train.job import run_job
from pipeline.train.synth_lines import prepare_synth_lines
from pipeline.training_info import TRAINING_INFO, TrainingInfo


@dataclass
class FinetuneData:
    target_train: list[SourceSpec]
    replay_train: SourceSpec | None
    target_val: str
    original_val: str


def demo_base(run: RunConfig, out: Path) -> Path:
    """Train (or reuse) the embedded default's Latin base model under out/base; returns its model dir.

    Reused only when it was trained with the same model, data, optimiser and step settings."""
    base_dir = out / "base"
    model_dir = base_dir / "model"
    recipe = json.loads(json.dumps(
        {"model": asdict(run.model), "data": asdict(run.data), "optim": asdict(run.optim),
         "steps": run.finetune.demo.base_steps, "batch": run.parallel.global_batch, "seed": run.train.seed},
        default=str,
    ))  # fmt: skip
    marker = base_dir / "finetune_base.json"
    if (model_dir / OUR_CONFIG).is_file() and marker.is_file() and json.loads(marker.read_text()) == recipe:
        print(f"[finetune] reusing the base model {model_dir}", flush=True)
        return model_dir
    base = copy.deepcopy(run)
    base.name = f"{run.name}-base"
    base.train.max_steps = run.finetune.demo.base_steps
    base.train.out_dir = str(base_dir)
    base.train.save_every = 0
    base.train.resume = False
    print(
        f"[finetune] no model.init_from: training a Latin base model for {base.train.max_steps} steps",
        flush=True,
    )
    run_job(base)
    marker.write_text(json.dumps(recipe, indent=2) + "\n")
    return model_dir


def demo_data(ft: FinetuneConfig, data: DataConfig, out: Path, original_dir: Path) -> FinetuneData:
    """Target = new-script lines; replay / original-capability = the Latin lines of the base."""
    from data_tools.synth.reading import ReadingLinesConfig
    from pipeline.finetune.demo import write_script_lines

    syn = data.synth
    latin_train, latin_val = prepare_synth_lines(data, original_dir)
    target = {}
    for split, n, seed in (
        ("train", ft.demo.num_train, ft.demo.seed),
        ("val", ft.demo.num_val, ft.demo.seed + 7919),
    ):
        cfg = ReadingLinesConfig(n=n, seed=seed, width=syn.image_size, min_chars=syn.min_chars,
                                 max_chars=syn.max_chars, source=f"{ft.demo.lang}-lines-{split}")  # fmt: skip
        target[split] = write_script_lines(cfg, ft.demo.lang, out / "data" / "target" / split, split)
    mode = syn.mode
    replay = (
        SourceSpec("replay", latin_train, ft.replay.share, "free_ocr", mode) if ft.replay.share > 0 else None
    )
    weight = 1.0 - ft.replay.share
    return FinetuneData([SourceSpec("target", target["train"], weight, "free_ocr", mode)], replay,
                        target["val"], ft.replay.val or latin_val)  # fmt: skip


def webdataset_data(ft: FinetuneConfig, data: DataConfig) -> FinetuneData:
    if not data.sources:
        raise ValueError("data.kind=webdataset needs data.sources (the target shards) for a fine-tune")
    specs = from_run_config(data, batch_size=1, seed=0).sources
    total = sum(s.weight for s in specs)
    weight = 1.0 - ft.replay.share
    targets = [dataclasses.replace(s, weight=s.weight / total * weight) for s in specs]
    replay = None
    if ft.replay.share > 0:
        if not ft.replay.shards:
            raise ValueError(
                f"finetune.replay.share={ft.replay.share} needs finetune.replay.shards (original-domain data, "
                "e.g. synthetic pages of the original languages from `dsocr-data synth`), or set share=0"
            )
        replay = SourceSpec(
            "replay", ft.replay.shards, ft.replay.share, ft.replay.prompt, mode_weights(ft.replay.modes)
        )
    val = ft.val or data.val_shards
    if not val:
        raise ValueError("a fine-tune needs a held-out target set: set finetune.val (or data.val_shards)")
    original_val = ft.replay.val
    if ft.replay.share == 0 and original_val and not Path(original_val).exists():
        # replay off needs no original-domain data; the forgetting report needs its held-out set
        print(f"[finetune] replay off and no {original_val}: no forgetting report "
              "(finetune.replay.val names the original-domain held-out set)", flush=True)  # fmt: skip
        original_val = ""
    return FinetuneData(targets, replay, val, original_val)


def with_target_mode(ft: FinetuneConfig, ev: EvalConfig, data: FinetuneData, base_path: Path) -> FinetuneData:
    """The target sources in finetune.mode, else in the mode the base was trained in (its
    training_info.json), else as configured; eval.mode follows."""
    info = TrainingInfo.read(base_path)
    mode = ft.mode or (info.mode if info is not None else "")
    if not mode:
        return data
    origin = "finetune.mode" if ft.mode else f"the base's {TRAINING_INFO}; finetune.mode=NAME sets another"
    print(f"[finetune] target data and evaluation in mode {mode} ({origin})", flush=True)
    ev.mode = mode
    targets = [dataclasses.replace(s, modes={mode: 1.0}) for s in data.target_train]
    return dataclasses.replace(data, target_train=targets)


def demo_finetune_data(run: RunConfig, out: Path) -> tuple[Path, FinetuneData]:
    """`data.kind=synth_lines`: the base (model.init_from, else the demo base trained here) and its data."""
    if run.model.init_from:
        return Path(run.model.init_from), demo_data(run.finetune, run.data, out, out / "data" / "original")
    return demo_base(run, out), demo_data(run.finetune, run.data, out, out / "base" / "data")


def webdataset_finetune_data(run: RunConfig) -> tuple[Path, FinetuneData]:
    """`data.kind=webdataset`: the base `model.init_from` and the shards, in the target mode."""
    if not run.model.init_from:
        raise ValueError("model.init_from must name the checkpoint to fine-tune (release dir or export)")
    base_path = Path(run.model.init_from)
    return base_path, with_target_mode(
        run.finetune, run.eval, webdataset_data(run.finetune, run.data), base_path
    )
