"""Integration tier: real coordinator and worker processes on localhost with the real model."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest

from shardline.local import LocalCluster

MAX_ALIVE = 3  # clusters kept running at once (each holds a copy of the weights per worker)


class ClusterPool:
    """Starts clusters by configuration and reuses them across tests of the session."""

    def __init__(self):
        self.alive: OrderedDict[str, LocalCluster] = OrderedDict()

    def get(self, overrides: dict) -> LocalCluster:
        key = json.dumps(overrides, sort_keys=True)
        if key in self.alive:
            self.alive.move_to_end(key)
            return self.alive[key]
        while len(self.alive) >= MAX_ALIVE:
            _, old = self.alive.popitem(last=False)
            old.stop()
        cluster = LocalCluster(overrides).start()
        self.alive[key] = cluster
        return cluster

    def close(self):
        while self.alive:
            self.alive.popitem()[1].stop()


@pytest.fixture(scope="session")
def clusters():
    pool = ClusterPool()
    yield pool
    pool.close()


def pp_config(pp: int, **scheduler) -> dict:
    cfg = {"workers": {"count": pp, "threads": 1}, "parallel": {"pipeline_parallel": pp, "tensor_parallel": 1}}
    if scheduler:
        cfg["scheduler"] = scheduler
    return cfg


@pytest.fixture
def default_cluster(clusters):
    """The default layout: 2 workers, pipeline 2."""
    return clusters.get(pp_config(2))
