"""The OpenMP wait policy a worker gets from its threads and the cores (shardline.cli); the
allocator setting is tested on a real prefill step in tests/integration/test_worker_allocator.py."""
from __future__ import annotations

import os

import pytest

from shardline import cli

@pytest.fixture
def clean_env(monkeypatch):
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.setenv(k, "")  # recorded, so the undo restores what was there (or nothing)
        monkeypatch.delenv(k)
    return monkeypatch


def test_threads_with_a_core_each_spin_before_sleeping(clean_env):
    clean_env.setattr(cli, "_usable_cpus", lambda: 2)
    cli._omp_wait_policy(2)
    assert os.environ.get("GOMP_SPINCOUNT") == str(cli.OMP_SPIN_COUNT)
    assert "OMP_WAIT_POLICY" not in os.environ


def test_more_threads_than_cores_sleep_at_once(clean_env):
    clean_env.setattr(cli, "_usable_cpus", lambda: 2)
    cli._omp_wait_policy(3)
    assert os.environ.get("OMP_WAIT_POLICY") == "PASSIVE"
    assert "GOMP_SPINCOUNT" not in os.environ


def test_the_environment_wins(clean_env):
    clean_env.setattr(cli, "_usable_cpus", lambda: 8)
    clean_env.setenv("OMP_WAIT_POLICY", "PASSIVE")
    cli._omp_wait_policy(2)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ
