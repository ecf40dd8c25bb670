"""`dsocr-train`: the training entry point (Hydra).

    dsocr-train                              # embedded default: CPU, synthetic lines, minutes
    dsocr-train experiment=paper_stage2      # a preset from configs/experiment/
    dsocr-train optim.lr=1e-3 train.max_steps=200 logger=wandb
    dsocr-train --cfg job                    # print the composed config and exit

Every rank runs this main; launcher-appended `--local_rank=N` is dropped (rank and world
size come from the environment) so Hydra's parser does not reject it.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def main() -> None:
    from pipeline.threads import passive_openmp_waits

    passive_openmp_waits()  # before torch loads the OpenMP runtime
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from pipeline.config import register_configs, to_run_config
    from pipeline.parallel.topology import strip_local_rank_arg

    sys.argv = [sys.argv[0], *strip_local_rank_arg(sys.argv[1:])]
    register_configs()

    @hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
    def _run(cfg: DictConfig) -> None:
        from pipeline.train.job import run_from_config

        run_from_config(to_run_config(cfg), OmegaConf.to_yaml(cfg, resolve=True))

    _run()


if __name__ == "__main__":
    main()
