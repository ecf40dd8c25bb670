"""The pipeline rows of dsocr-bench without GPUs: bench/pipeline_gpu.sh replaced by small bash scripts
that print a summary, crash, hang or leave their summary only in the per-layout log; every outcome
must become rows (FAILED with the reason where a layout has no summary), never an exception.
Also: the GPUs the script gets, the summaries parser, and that `bench` ships in the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import tomllib

from bench import pipeline_rows as pr
from bench import suite

ROOT = Path(__file__).resolve().parents[2]


def _summary(config: str, tps: float, indent: int | None = 2) -> str:
    name = pr.config_name(config)
    return json.dumps({"name": name, "layout": name[:7], "tokens_per_s_per_gpu": tps, "mfu": 0.3, "steps": 12,
                       "step_time_s": 2.1, "peak_gib_per_stage": {"0": 20.0, "1": 31.5}}, indent=indent)  # fmt: skip


def _fake_script(monkeypatch, tmp_path: Path, body: str, configs=pr.DEFAULT_CONFIGS) -> pr.PipelineSettings:
    script = tmp_path / "pipeline_gpu.sh"
    script.write_text('#!/usr/bin/env bash\nroot=$1\nsteps=$2\nshift 2\necho "configs $* timeout $CONFIG_TIMEOUT"\n'
                      'rm -f "$SUMMARY"\n' + body)  # fmt: skip
    monkeypatch.setattr(pr, "SCRIPT", script)
    monkeypatch.setattr(pr, "visible_gpus", lambda: 4)
    return pr.PipelineSettings(steps=5, timeout_s=20, data_dir=tmp_path / "data", configs=configs)


@pytest.mark.unit
def test_a_crash_after_the_first_configuration_gives_one_row_and_one_failed_row(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "not-here"))
    body = (f"echo '{_summary('4:paper:on:16', 26000.0, None)}' >> \"$SUMMARY\"\n"
            "[ -z \"${OUT:-}\" ] || echo 'OUT leaked'\n"
            "echo 'RuntimeError: NCCL error: boom' >&2\nexit 3\n")  # fmt: skip
    settings = _fake_script(monkeypatch, tmp_path, body)
    (tmp_path / "out").mkdir()
    rows, details = pr.pipeline_rows(settings, tmp_path / "out", 30000.0, None, quick=False)
    assert [(r.name, r.status) for r in rows] == [
        ("PP=4 x DP=1 (4:paper:on:16)", "ok"),
        ("PP=2 x DP=2 (2:paper:on:16)", "failed"),
    ]
    assert rows[0].ours == 26000.0 and rows[0].peer == 30000.0 and rows[0].target_met is True
    assert (
        "pp4_dp1_paper_ckpt_gb16_chunk2048: MFU 30.0%" in rows[0].notes
        and "peak/stage 31.5 GiB" in rows[0].notes
    )
    assert "exit 3" in rows[1].reason and "RuntimeError: NCCL error: boom" in rows[1].reason
    assert details["returncode"] == 3 and not details["timed_out"]
    log = (tmp_path / "out" / "pipeline_gpu.log").read_text()
    assert "NCCL error: boom" in log and "OUT leaked" not in log
    assert "configs 4:paper:on:16 2:paper:on:16 timeout 20" in log  # >= 60 s each, capped by the whole limit
    assert not (tmp_path / "not-here").exists()


@pytest.mark.unit
def test_a_hanging_script_is_ended_and_reported_and_summaries_come_from_the_logs(tmp_path, monkeypatch):
    # the first configuration's summary reached only its tee'd log, then the script hangs
    configs = ("4:balanced:off:32", "2:paper:1,3:16:0")
    body = f"cat > \"$root/pp4_x.log\" <<'EOF'\n[rank1] noise\n{_summary(configs[0], 12.5)}\nEOF\nsleep 60 & sleep 60\n"
    settings = _fake_script(monkeypatch, tmp_path, body, configs)
    settings.timeout_s = 1
    settings.data_dir.mkdir()
    (settings.data_dir / "pp2_old.log").write_text(_summary(configs[1], 99.0))  # a previous run's: stale
    start = time.perf_counter()
    rows, details = pr.pipeline_rows(settings, tmp_path, None, None, quick=False)
    assert time.perf_counter() - start < 15 and details["timed_out"]
    assert [(r.name, r.status, r.ours) for r in rows] == [
        ("PP=4 x DP=1 (4:balanced:off:32)", "ok", 12.5),
        ("PP=2 x DP=2 (2:paper:1,3:16:0)", "failed", None),
    ]
    assert "timed out" in rows[1].reason and rows[0].peer is None


@pytest.mark.unit
def test_config_names_match_the_scripts(tmp_path):
    from bench import pipeline_gpu

    for config, flags in [
        ("4:paper:on:16", ["--checkpointing"]),
        ("2:balanced:off:32:0", ["--no-checkpointing"]),
        ("4:parameters:1,2:16:4096", ["--no-checkpointing", "--checkpoint-stages", "1,2"]),
        ("4:balanced:off:32::1:on", ["--no-checkpointing", "--compile"]),
        ("4:balanced:off:64:1024:2:off", ["--no-checkpointing", "--no-compile"]),
        ("2:paper:on:16::4", ["--checkpointing"]),
    ]:  # the argument mapping of bench/pipeline_gpu.sh (checked against the script below)
        pp, partition, _, gb, *rest = config.split(":") + ["", ""]
        argv = ["train", str(tmp_path), "--pp", pp, "--partition", partition, "--global-batch", gb,
                "--loss-chunk", rest[0] or "2048", "--micro-batch", rest[1] or "1", *flags]  # fmt: skip
        args = pipeline_gpu.arg_parser().parse_args(argv)
        run, name, _ = pipeline_gpu.bench_run(tmp_path, args, world=4)
        assert pr.config_name(config) == name
        assert run.parallel.micro_batch == int(rest[1] or 1) and run.parallel.compile_layers == (
            "--compile" in flags
        )
    assert pr.config_name("4:balanced:off:32::2:on") == "pp4_dp1_balanced_nockpt_gb32_chunk2048_mb2_compile"
    for bad in ("3:paper:on:16", "4:even:on:16", "4:paper:on:16:2048:0", "4:paper:on:16:2048:2:yes"):
        with pytest.raises(ValueError, match="PP:PARTITION"):
            pr.PipelineSettings(configs=(bad,))


@pytest.mark.unit
def test_the_script_maps_each_config_to_its_flags_and_log_name(tmp_path):
    """bench/pipeline_gpu.sh itself, with torchrun and python3 replaced by recorders on PATH."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "python3").write_text("#!/usr/bin/env bash\nexit 0\n")
    (shims / "torchrun").write_text('#!/usr/bin/env bash\necho "torchrun $*"\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    root = tmp_path / "data"
    configs = [
        "4:paper:on:16",
        "4:balanced:off:32::1:on",
        "4:balanced:off:64:1024:2",
        "4:paper:on:16::1:maybe",
    ]
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "CONFIG_TIMEOUT": "0"}
    env.pop("OUT", None)
    res = subprocess.run(["bash", str(pr.SCRIPT), str(root), "5", *configs], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    logs = {p.stem: p.read_text().split() for p in root.glob("pp*.log")}
    flags = {tag: words[words.index("--pp") :] for tag, words in logs.items()}  # torchrun's train flags
    base = ["--pp", "4", "--partition"]
    assert flags == {
        "pp4_paper_ckpton_gb16_chunk2048": [*base, "paper", "--global-batch", "16", "--loss-chunk", "2048",
                                            "--micro-batch", "1", "--checkpointing", "--no-compile"],
        "pp4_balanced_ckptoff_gb32_chunk2048_compile": [*base, "balanced", "--global-batch", "32", "--loss-chunk",
                                                        "2048", "--micro-batch", "1", "--no-checkpointing", "--compile"],
        "pp4_balanced_ckptoff_gb64_chunk1024_mb2": [*base, "balanced", "--global-batch", "64", "--loss-chunk", "1024",
                                                    "--micro-batch", "2", "--no-checkpointing", "--no-compile"],
    }  # fmt: skip
    assert "COMPILE must be on or off, got 'maybe'" in res.stdout


@pytest.mark.unit
def test_a_timed_out_configuration_with_stray_children_does_not_hang_the_script(tmp_path):
    """A torchrun killed by CONFIG_TIMEOUT can leave children holding its stdout (inductor's compile
    workers): the script must go on to the next configuration and kill the strays."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "python3").write_text("#!/usr/bin/env bash\nexit 0\n")
    # the stray ignores SIGTERM (as a busy worker would) and keeps stdout open
    (shims / "torchrun").write_text(
        '#!/usr/bin/env bash\necho "torchrun $*"\n'
        "(trap '' TERM; echo $BASHPID >> \"$STRAY_PIDS\"; exec sleep 300) &\nexec sleep 300\n"
    )
    for shim in shims.iterdir():
        shim.chmod(0o755)
    root = tmp_path / "data"
    pids = tmp_path / "stray.pids"
    env = {
        **os.environ,
        "PATH": f"{shims}:{os.environ['PATH']}",
        "CONFIG_TIMEOUT": "1",
        "STRAY_PIDS": str(pids),
    }
    env.pop("OUT", None)
    res = subprocess.run(["bash", str(pr.SCRIPT), str(root), "5", "4:paper:on:16", "4:balanced:off:32"],
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("failed (exit 124)") == 2
    assert sorted(p.stem for p in root.glob("pp*.log")) == [
        "pp4_balanced_ckptoff_gb32_chunk2048", "pp4_paper_ckpton_gb16_chunk2048"
    ]  # fmt: skip
    strays = [int(pid) for pid in pids.read_text().split()]
    assert len(strays) == 2
    for pid in strays:  # killed with their group (a zombie until reaped by init counts as gone)
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z", pid


@pytest.mark.unit
def test_no_pipeline_rows_without_four_gpus_or_script(tmp_path, monkeypatch):
    monkeypatch.setattr(pr, "visible_gpus", lambda: 1)
    rows, _ = pr.pipeline_rows(pr.PipelineSettings(), tmp_path, None, None, quick=False)
    assert rows[0].status == "skipped" and "1 GPU(s) visible, needs 4" in rows[0].reason
    monkeypatch.setattr(pr, "visible_gpus", lambda: 8)
    monkeypatch.setattr(pr, "SCRIPT", tmp_path / "missing.sh")
    rows, _ = pr.pipeline_rows(pr.PipelineSettings(), tmp_path, None, None, quick=False)
    assert rows[0].status == "skipped" and "missing.sh not present" in rows[0].reason


@pytest.mark.unit
def test_the_suite_reports_a_broken_pipeline_as_failed_rows(tmp_path, monkeypatch):
    settings = _fake_script(monkeypatch, tmp_path, "exit 1\n")
    monkeypatch.setattr(suite, "visible_gpus", lambda: 0)  # no background make-data here
    s = suite.BenchSettings(
        device="cpu", quick=True, only=("pipeline",), out=tmp_path / "out", pipeline=settings
    )
    monkeypatch.setattr(s, "quick", False)  # the CPU run takes the GPU run's pipeline path
    result = suite.run_suite(s)
    assert [(r["section"], r["status"]) for r in result["rows"]] == [(pr.SECTION, "failed")] * 2
    assert set(result["section_wall_s"]) == {"pipeline"}


@pytest.mark.unit
def test_the_script_gets_the_first_four_of_the_visible_gpus():
    assert pr.pipeline_env({})["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert (
        "OUT" not in pr.pipeline_env({"OUT": "/out"}, 90)
        and pr.pipeline_env({}, 90)["CONFIG_TIMEOUT"] == "90"
    )
    assert pr.pipeline_env({"CUDA_VISIBLE_DEVICES": "4,5,6,7,0"})["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    with pytest.raises(ValueError, match="steps"):
        pr.PipelineSettings(steps=2)


@pytest.mark.unit
def test_pipeline_summaries_are_read_from_the_script_output():
    summary = {"layout": "pp4_dp1", "tokens_per_s_per_gpu": 26000.5, "peak_gib_per_stage": {"0": 20.0}}
    stdout = "[rank0] {not json}\nstep 3 {'a': 1}\n" + json.dumps(summary, indent=2) + "\n[rank1] done {}\n"
    stdout += json.dumps({**summary, "layout": "pp2_dp2", "tokens_per_s_per_gpu": 1}) + "\n"
    assert pr.pipeline_summaries(stdout) == [
        summary,
        {**summary, "layout": "pp2_dp2", "tokens_per_s_per_gpu": 1},
    ]
    assert pr.pipeline_summaries('{"layout": "x"}') == []  # no throughput figure


@pytest.mark.unit
def test_script_timeout_ends_the_whole_process_group():
    start = time.perf_counter()
    res = pr.run_script(["bash", "-c", "echo started; sleep 30 & sleep 30"], dict(os.environ), timeout_s=1)
    assert time.perf_counter() - start < 10  # the background sleep (a grandchild) was ended too
    assert res.stdout.strip() == "started" and "killed after 1 s" in res.stderr and res.timed_out


@pytest.mark.unit
def test_the_bench_package_and_its_script_are_in_the_distribution():
    from setuptools import find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = find_packages(str(ROOT), include=config["packages"]["find"]["include"])
    assert "bench" in packages and "pipeline.cli" in packages
    data = config["package-data"]["bench"]
    assert any((ROOT / "bench").glob(pattern) for pattern in data) and pr.SCRIPT.name == "pipeline_gpu.sh"
    assert {p.name for pattern in data for p in (ROOT / "bench").glob(pattern)} >= {"pipeline_gpu.sh"}


@pytest.mark.unit
def test_data_prep_runs_make_data_in_the_background(tmp_path, monkeypatch):
    driver = tmp_path / "driver.py"
    # the driver finishes only once the test creates `go`: DataPrep must return before that
    go = tmp_path / "go"
    driver.write_text(f"import sys, pathlib, time\nwhile not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
                      "pathlib.Path(sys.argv[2], 'args').write_text(' '.join(sys.argv[1:]))\nprint('made')\n")  # fmt: skip
    monkeypatch.setattr(pr, "DRIVER", driver)
    prep = pr.DataPrep(tmp_path / "data")
    assert prep.proc.poll() is None and not (tmp_path / "data" / "args").exists()  # running in the background
    go.touch()
    assert prep.wait().startswith("make-data exited 0 after")
    assert (tmp_path / "data" / "args").read_text() == f"make-data {tmp_path / 'data'}"
    assert prep.log.read_text().strip() == "made" and prep.wait() == prep.result  # idempotent


@pytest.mark.unit
def test_the_failed_row_quotes_the_most_telling_line():
    torchrun = (
        "[rank3]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.0 GiB\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "  exitcode  : -9 (pid: 7)  (SIGKILL)\nbench/pipeline_gpu.py FAILED\n=== 4:paper:on:16 failed\n"
    )
    assert (
        pr.last_error_line(torchrun)
        == "[rank3]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.0 GiB"
    )
    assert pr.last_error_line(torchrun.split("\n", 2)[2]) == "exitcode  : -9 (pid: 7)  (SIGKILL)"
    assert pr.last_error_line("step 1\nstep 2\n") == "step 2" and pr.last_error_line("") == "no output"


@pytest.mark.unit
def test_the_deadline_shrinks_or_skips_the_pipeline(tmp_path, monkeypatch):
    settings = _fake_script(monkeypatch, tmp_path, "exit 1\n")
    settings.timeout_s = 300
    monkeypatch.setattr(suite, "visible_gpus", lambda: 0)

    def run(deadline: float) -> dict:
        s = suite.BenchSettings(device="cpu", quick=True, only=("pipeline",), out=tmp_path / "out",
                                pipeline=settings, deadline_s=deadline)  # fmt: skip
        monkeypatch.setattr(s, "quick", False)
        return suite.run_suite(s)

    result = run(200.0)
    assert 150 < result["details"]["pipeline"]["timeout_s"] <= 200 - suite.DEADLINE_MARGIN_S
    assert settings.timeout_s == 300  # the settings object itself is left alone
    row = run(100.0)["rows"][0]
    assert row["status"] == "skipped" and "before --deadline-s 100" in row["reason"]
    with pytest.raises(ValueError, match="deadline"):
        suite.BenchSettings(device="cpu", quick=True, deadline_s=0)


@pytest.mark.unit
def test_the_summary_records_micro_batch_and_compile(tmp_path):
    from bench import pipeline_gpu

    argv = ["train", str(tmp_path), "--pp", "4", "--partition", "balanced", "--global-batch", "32",
            "--micro-batch", "2", "--compile", "--no-checkpointing", "--warmup", "1"]  # fmt: skip
    args = pipeline_gpu.arg_parser().parse_args(argv)
    run, name, layout = pipeline_gpu.bench_run(tmp_path, args, world=4)
    records = [{"step": i, "loss": 5.0 - i, "tokens_per_s": 4 * t, "tokens_per_s_per_gpu": t, "step_time": 1.0}
               for i, t in enumerate([100.0, 32.0, 10.0, 12.0])]  # fmt: skip
    summary = pipeline_gpu.summarize(run, name, layout, args, 4, [1.0, 2.0, 3.0, 4.0], records)
    assert summary["name"] == name == "pp4_dp1_balanced_nockpt_gb32_chunk2048_mb2_compile"
    assert summary["micro_batch"] == 2 and summary["compile"] is True
    assert summary["tokens_per_s_per_gpu"] == pytest.approx(18.0)  # mean after the warm-up step
    assert summary["tokens_per_s_per_gpu_median"] == 12.0
    assert summary["bubble_1f1b"] == pytest.approx(3 / (16 + 3))  # 32 rows = 2 x 16 micro-batches
    assert summary["peak_gib_per_stage"] == {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
