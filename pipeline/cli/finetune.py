"""`dsocr-finetune`: fine-tune a released or trained checkpoint (LoRA or full, with replay).

    dsocr-finetune                                    # embedded default: CPU, Latin base -> Cyrillic lines
    dsocr-finetune experiment=finetune_lora model.init_from=ckpt/deepseek-ocr \
        data.sources.0.shards=data/my_lang/train finetune.val=data/my_lang/val \
        finetune.replay.shards=data/orig/train finetune.replay.val=data/orig/val
    dsocr-finetune experiment=finetune_full ...       # full fine-tune (SAM frozen)
    dsocr-finetune --cfg job                          # print the composed config and exit

Data parallel on several GPUs: launch with torchrun (WORLD_SIZE > 1 dispatches to
pipeline.finetune.distributed), e.g. `torchrun --nproc-per-node 8 -m pipeline.cli.finetune
experiment=finetune_lora parallel.dp=8 parallel.global_batch=16`.

Composes the same config tree as `dsocr-train` (configs/train.yaml + the `finetune` schema,
pipeline.finetune.config); without an `experiment=` override it applies
`experiment=finetune_demo`. CSV (`image_file,text_label`) or JSONL data: convert to shards
first with `dsocr-data convert-csv` / `convert-jsonl` (data_tools/convert.py), which counts and
skips bad rows; row length, evaluation budget and mode then follow from the data (docs/finetune.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
DEFAULT_EXPERIMENT = "finetune_demo"


def with_default_experiment(argv: list[str]) -> list[str]:
    """argv + `experiment=finetune_demo` unless an experiment is chosen already."""
    chosen = any(a.lstrip("+~").startswith("experiment=") for a in argv)
    return argv if chosen else [*argv, f"experiment={DEFAULT_EXPERIMENT}"]


def main() -> None:
    from pipeline.threads import passive_openmp_waits

    passive_openmp_waits()  # before torch loads the OpenMP runtime
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from pipeline.config import register_configs, to_run_config
    from pipeline.parallel.topology import dist_env, strip_local_rank_arg

    # its own --help (title, examples) over the shared config tree
    argv = with_default_experiment(strip_local_rank_arg(sys.argv[1:]))
    sys.argv = [sys.argv[0], *argv, "hydra/help=dsocr_finetune"]
    register_configs()

    @hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
    def _run(cfg: DictConfig) -> None:
        run = to_run_config(cfg)
        resolved = OmegaConf.to_yaml(cfg, resolve=True)
        if dist_env().world_size > 1:
            from pipeline.finetune.distributed import run_finetune_dp

            job = run_finetune_dp(run, resolved)
        else:
            from pipeline.finetune.job import run_finetune

            job = run_finetune(run, resolved)
        if job is not None and job.preempted:
            from pipeline.train.trainer import exit_preempted

            exit_preempted()

    _run()


if __name__ == "__main__":
    main()
