"""Default torch thread count: cgroup quota, free cores under load, precedence of explicit settings."""

import pytest

from pipeline.threads import cgroup_cpu_quota, choose_threads, free_cores, passive_openmp_waits


@pytest.mark.parametrize(
    ("text", "cores"),
    [("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000", 2), ("50000 100000", 1)],
)
def test_cgroup_v2_quota_in_whole_cores(tmp_path, text, cores):
    (tmp_path / "cpu.max").write_text(text)
    assert cgroup_cpu_quota(tmp_path / "cpu.max", (tmp_path / "q", tmp_path / "p")) == cores


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    quota, period = tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us"
    period.write_text("100000\n")
    quota.write_text("300000\n")
    assert cgroup_cpu_quota(tmp_path / "absent", (quota, period)) == 3
    quota.write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path / "absent", (quota, period)) is None
    assert cgroup_cpu_quota(tmp_path / "absent", (tmp_path / "a", tmp_path / "b")) is None


def test_free_cores_leave_the_load_of_other_work():
    assert free_cores(2, 0.2) == 2  # idle machine: every core
    assert free_cores(2, 1.0) == 1
    assert free_cores(2, 6.0) == 1  # oversubscribed: one thread, never zero
    assert free_cores(16, 3.4) == 13


def test_explicit_settings_win_over_the_measured_default():
    assert choose_threads(3, {"OMP_NUM_THREADS": "1"}).threads == 3
    assert choose_threads(0, {"OMP_NUM_THREADS": "4"}).threads == 4
    auto = choose_threads(0, {})
    assert auto.threads >= 1 and "cores available" in auto.reason


def test_passive_waits_keep_a_users_policy():
    env = {}
    passive_openmp_waits(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    passive_openmp_waits(env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"
