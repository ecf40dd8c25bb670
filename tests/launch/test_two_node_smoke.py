"""launch/two_node_smoke.sh for real on the CPU: two launcher invocations (node ranks 0 and 1,
two gloo processes each) against one rendezvous train a PP 2 x DP 2 job through dsocr-train on
freshly rendered shards, and every rank reports the same losses and the saved checkpoint."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_node_smoke_trains_pp2_dp2_on_cpu(tmp_path):
    env = {
        **{k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")},
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "MASTER_PORT": str(29300 + os.getpid() % 300),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "SMOKE_STEPS": "2",
        "SMOKE_SAMPLES": "48",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "two_node_smoke.sh"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    logs = "".join(
        (tmp_path / f"node{n}.log").read_text() for n in (0, 1) if (tmp_path / f"node{n}.log").exists()
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs[-4000:]
    done = re.findall(r"\[job\] rank (\d) \(stage (\d), dp (\d)\): 2 steps, loss ([\d.]+) -> ([\d.]+)", logs)
    assert sorted((int(r), int(s), int(d)) for r, s, d, _, _ in done) == [
        (0, 0, 0),
        (1, 0, 1),
        (2, 1, 0),
        (3, 1, 1),
    ]
    assert len({(first, last) for *_, first, last in done}) == 1  # one loss sequence on every rank
    assert (tmp_path / "runs" / "two_node" / "checkpoints" / "step_00000002").is_dir()
