"""Every experiment and every group option composes through Hydra exactly as `dsocr-train` would,
validates against the typed schema, and describes a layout that divides; the paper presets carry
the paper's numbers; the documented sweep expands to one job per combination with its own run
directory and a shared wandb group; the wandb logger follows its config.
"""

import json
import re
import shutil
import subprocess
import sys
import types

import pytest

from pipeline.cli.dryrun import CONFIG_DIR, compose_config, resolve_cluster, sweep_jobs
from pipeline.config import to_run_config
from pipeline.parallel.topology import Topology

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
GROUP_OPTIONS = sorted(
    (group.name, p.stem)
    for group in CONFIG_DIR.iterdir()
    if group.is_dir() and group.name != "experiment"
    for p in group.glob("*.yaml")
)


@pytest.mark.config
def test_the_presets_exist():
    assert {"paper_stage1", "paper_stage2", "node8_stage2", "gpu1_stage2", "finetune_sweep"} <= set(
        EXPERIMENTS
    )
    assert {("parallel", "pp4"), ("parallel", "pp2dp2"), ("logger", "wandb"), ("logger", "none")} <= set(
        GROUP_OPTIONS
    )


@pytest.mark.config
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(experiment):
    from pipeline.data.config import from_run_config

    path = CONFIG_DIR / "experiment" / f"{experiment}.yaml"
    assert path.read_text().startswith("# @package _global_\n"), "experiment files are global diffs"
    run = to_run_config(compose_config([f"experiment={experiment}"]))
    assert run.name == experiment  # the run directory runs/<name> is the experiment's
    assert run.train.out_dir.endswith(f"runs/{experiment}")
    par = run.parallel
    assert par.dp is not None, "cluster presets pin their data-parallel degree"
    topo = Topology(par.pp * par.dp, par.pp, par.micro_batch, par.global_batch, dp=par.dp)
    assert topo.grad_accum * par.micro_batch * par.dp == par.global_batch
    assert resolve_cluster(run, {}).world_size == par.pp * par.dp
    if run.data.kind == "webdataset":  # the data loader accepts the sources (prompts, modes, kinds)
        loader = from_run_config(run.data, batch_size=par.micro_batch, seed=0)
        assert loader.seq_len == run.data.seq_len


@pytest.mark.config
@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    cfg = compose_config([f"{group}={option}"])
    run = to_run_config(cfg)
    if group == "debug":  # global-package diffs: they must change the default run
        assert run != to_run_config(compose_config([]))
    else:
        assert cfg[group] is not None


@pytest.mark.config
@pytest.mark.parametrize(
    "body",
    [
        "paralel:\n  pp: 4\n",  # misspelt group key
        "parallel:\n  pp: four\n",  # wrong type
        "optim:\n  lr: 3e-5\n  shedule: step\n",  # unknown field
        "defaults:\n  - override /model: fulll\n",  # missing option
    ],
)
def test_a_broken_experiment_fails_composition(tmp_path, body):
    from hydra.errors import HydraException

    shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    (tmp_path / "configs" / "experiment" / "broken.yaml").write_text("# @package _global_\n" + body)
    with pytest.raises(HydraException):
        compose_config(["experiment=broken"], config_dir=tmp_path / "configs")


@pytest.mark.config
def test_paper_stage2_numbers():
    from pipeline.data.config import paper_mixture

    run = to_run_config(compose_config(["experiment=paper_stage2"]))
    assert (run.parallel.pp, run.parallel.dp, run.parallel.global_batch) == (4, 40, 640)
    assert (run.parallel.dtype, run.parallel.zero_stage) == ("bf16", 1)
    assert run.data.seq_len == 8192 and run.data.kind == "webdataset"
    assert (run.optim.lr, run.optim.schedule) == (3e-5, "step")
    assert (run.model.encoder, run.model.decoder, run.model.freeze_sam) == ("full", "full", True)
    assert run.logger.kind == "wandb" and run.logger.mode == "auto"
    # the 70/20/10 mixture, as the data package defines it
    paper = paper_mixture("o", "v", "t")
    ours = {s.name: (s.weight, s.prompt, s.kind, set(s.modes)) for s in run.data.sources}
    theirs = {s.name: (s.weight, s.prompt, s.kind) for s in paper.sources}
    assert {k: v[:1] + v[2:3] for k, v in ours.items()} == {k: v[:1] + v[2:] for k, v in theirs.items()}
    assert ours["ocr"][1] == "free_ocr" and ours["vision"][1] == "describe" and ours["text"][1] == "text_only"
    assert ours["ocr"][3] == {"tiny", "small", "base", "large", "gundam"} == ours["vision"][3]
    # node8 and gpu1 keep the global batch by accumulating more
    for name, (pp, dp, accum) in {"node8_stage2": (4, 2, 320), "gpu1_stage2": (1, 1, 640)}.items():
        other = to_run_config(compose_config([f"experiment={name}"]))
        assert (other.parallel.global_batch, other.data.seq_len, other.optim.lr) == (640, 8192, 3e-5)
        topo = Topology(pp * dp, other.parallel.pp, other.parallel.micro_batch, 640, dp=other.parallel.dp)
        assert (topo.pp, topo.dp, topo.grad_accum) == (pp, dp, accum)
        assert other.data.sources == run.data.sources


@pytest.mark.config
def test_paper_stage1_numbers():
    from pipeline.model import model_configs

    run = to_run_config(compose_config(["experiment=paper_stage1"]))
    assert (run.parallel.global_batch, run.data.seq_len) == (1280, 4096)
    assert (run.optim.lr, run.optim.schedule) == (5e-5, "cosine")
    assert (run.model.encoder, run.model.decoder, run.model.freeze_sam) == ("full", "dense-125m", False)
    enc, dec = model_configs(run.model)
    assert enc.n_embed == dec.hidden_size == 768
    # 2 epochs over ~169M samples at 1280 per step
    assert run.train.max_steps == pytest.approx(2 * 169e6 / 1280, rel=0.01)


@pytest.mark.config
def test_sweep_expands_to_one_job_per_combination():
    jobs = sweep_jobs(["experiment=finetune_sweep"])
    assert len(jobs) == 9
    runs = [to_run_config(compose_config(job, job_num=i)) for i, job in enumerate(jobs)]
    combos = {(r.optim.lr, tuple(sorted(r.data.sources[0].modes.items()))) for r in runs}
    mixes = [
        (("base", 0.0), ("gundam", 1.0)),
        (("base", 1.0), ("gundam", 0.0)),
        (("base", 0.5), ("gundam", 0.5)),
    ]
    assert combos == {(lr, mix) for lr in (1e-4, 2e-4, 4e-4) for mix in mixes}
    assert len({r.train.out_dir for r in runs}) == 9
    # under a directory of the sweep's start time (one per sweep: the real --multirun test below)
    stamped = [re.fullmatch(r".*multirun/finetune_sweep/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d/(\d+)", r.train.out_dir)
               for r in runs]  # fmt: skip
    assert [int(m.group(1)) for m in stamped] == list(range(9))
    assert {r.logger.group for r in runs} == {"finetune_sweep"}
    # a command-line axis replaces the preset's axis for that key
    jobs = sweep_jobs(["experiment=finetune_sweep", "optim.lr=5e-5,1e-4"])
    assert len(jobs) == 6 and {j[0] for j in jobs} == {"optim.lr=5e-05", "optim.lr=0.0001"}


APP = """
import json, sys
import hydra
from hydra.core.hydra_config import HydraConfig
from pipeline.config import register_configs, to_run_config

register_configs()

@hydra.main(config_path={config_dir!r}, config_name="train", version_base=None)
def main(cfg):
    run = to_run_config(cfg)
    print("JOB " + json.dumps({{"num": HydraConfig.get().job.num, "out": run.train.out_dir,
          "lr": run.optim.lr, "modes": run.data.sources[0].modes, "group": run.logger.group}}))

main()
"""


@pytest.mark.config
def test_real_multirun_gives_each_job_its_own_directory(tmp_path):
    """Hydra's own --multirun with the basic sweeper, a stub task in place of training."""
    app = tmp_path / "app.py"
    app.write_text(APP.format(config_dir=str(CONFIG_DIR)))
    proc = subprocess.run(
        [sys.executable, str(app), "--multirun", "experiment=finetune_sweep", "optim.lr=1e-4,3e-4"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # one directory for this sweep (its start time): a second sweep of the same name gets another
    (sweep_dir,) = (tmp_path / "multirun" / "finetune_sweep").iterdir()
    jobs = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("JOB ")]
    assert [j["num"] for j in jobs] == list(range(6))
    assert [j["out"] for j in jobs] == [str(sweep_dir / str(i)) for i in range(6)]
    assert {j["group"] for j in jobs} == {"finetune_sweep"}
    assert {(j["lr"], j["modes"]["gundam"]) for j in jobs} == {
        (lr, g) for lr in (1e-4, 3e-4) for g in (0.0, 0.5, 1.0)
    }
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [str(i) for i in range(6)]
    # the sweep ends with its table: one row per job, the swept keys as columns
    table = (sweep_dir / "sweep_summary.md").read_text().splitlines()
    assert "optim.lr" in table[0] and "data.sources.0.modes" in table[0] and len(table) == 2 + 6
    assert "sweep summary" in proc.stdout


# ---------------------------------------------------------------- wandb


@pytest.mark.config
def test_logger_none_works_without_wandb(tmp_path, monkeypatch):
    from pipeline.train.logging import RunLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    run = to_run_config(compose_config(["logger=none"]))
    logger = RunLogger(tmp_path, run.logger, {"name": run.name}, run.name)
    logger.log({"step": 1, "loss": 2.5}, console=False)
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.5}
    with pytest.raises(ImportError):
        RunLogger(tmp_path, to_run_config(compose_config(["logger=wandb"])).logger, {}, "x")


@pytest.mark.config
def test_wandb_is_offline_without_credentials_and_logs_config_and_commit(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from pipeline.train import logging as run_logging

    inits, logged = [], []
    fake = types.SimpleNamespace(
        init=lambda **kw: inits.append(kw) or fake_run,
    )
    fake_run = types.SimpleNamespace(
        log=lambda data, step=None: logged.append((step, data)), finish=lambda: None
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setattr(run_logging, "git_commit", lambda: "abc123")

    cfg = compose_config(["experiment=finetune_sweep", "logger.tags=[a,b]", "logger.entity=lab"])
    run = to_run_config(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = run_logging.RunLogger(tmp_path, run.logger, resolved, run.name)
    logger.log({"step": 3, "loss": 1.5, "event": "train"}, console=False)
    logger.close()
    (kw,) = inits
    assert kw["mode"] == "offline"
    assert (kw["project"], kw["entity"], kw["group"], kw["tags"]) == (
        "deepseek-ocr-train",
        "lab",
        "finetune_sweep",
        ["a", "b"],
    )
    assert kw["config"]["git_commit"] == "abc123"
    assert kw["config"]["optim"]["lr"] == run.optim.lr and kw["config"]["name"] == "finetune_sweep"
    assert logged == [(3, {"loss": 1.5})]

    monkeypatch.setenv("WANDB_API_KEY", "k")
    run_logging.RunLogger(tmp_path, run.logger, resolved, run.name).close()
    assert inits[-1]["mode"] == "online"
