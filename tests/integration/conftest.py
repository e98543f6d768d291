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


NEAR_TIE = 0.02  # logprob gap (nats) below which fp32 rounding differences may flip a greedy choice


def assert_same_greedy(a, b) -> None:
    """Two greedy runs of one prompt (GenerationResults with logprobs >= 2) must agree token for
    token, except that they may part at a near tie: where the first difference sits, the top two
    candidates of run `a` differ by less than NEAR_TIE nats. Batch composition, chunking and
    recomputation change the floating-point summation order (GEMV vs GEMM kernels), which moves
    logits by ~1e-5 and can only flip such ties."""
    ta, tb = a.token_ids, b.token_ids
    for i, (x, y) in enumerate(zip(ta, tb)):
        if x != y:
            top = a.logprobs[i][1]
            gap = top[0][1] - top[1][1]
            assert gap < NEAR_TIE, f"outputs part at token {i} ({x} vs {y}) where the top-2 gap is {gap:.4f} nats"
            return
    assert len(ta) == len(tb)


def generate_in_threads(address: str, prompts: list[str], gen: dict, timeout_s: float = 180.0):
    """Generate each prompt (with `gen` parameters) in its own thread and Client. Returns
    ({i: result}, {i: exception}, {i: seconds until the call returned}, the started threads)."""
    import threading
    import time

    from shardline import Client

    results, errors, ended = {}, {}, {}
    t0 = time.monotonic()

    def one(i: int, prompt: str) -> None:
        with Client(address, timeout_s=timeout_s) as c:
            try:
                results[i] = c.generate(prompt, **gen)
            except Exception as exc:  # recorded: what the client saw
                errors[i] = exc
            ended[i] = time.monotonic() - t0

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    return results, errors, ended, threads
