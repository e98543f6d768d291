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


# Two runs of one prompt through different kernel paths. A step's GEMMs take the packed float32
# kernels for a few tokens and bf16 tiles for many (shardline/kernels/dispatch.py TILE_BF16: activations
# rounded to 8 significant bits), so batch composition, chunking and a preemption's recompute move
# the logprobs by up to ~0.05 nats over 96 tokens (measured: max |difference| of the chosen token's
# logprob between a preempting 1-stage cluster and the default cluster, 8 prompts x 96 tokens x 3
# rounds: 0.048 with the float32 KV cache, 0.068 with float16). A greedy choice can flip only where
# the top-2 gap is below the change of that gap, at most about twice the logprob change.
PATH_LOGPROB_ATOL = 0.15  # nats: the chosen tokens' logprobs agree this closely before any parting
PATH_NEAR_TIE = 2 * PATH_LOGPROB_ATOL  # nats: the runs may part only where run a's top-2 gap is below this


def assert_same_greedy(a, b) -> None:
    """Two greedy runs of one prompt (GenerationResults with logprobs >= 2) must agree token for
    token, with the chosen tokens' logprobs within PATH_LOGPROB_ATOL, except that they may part
    at a near tie: where the first difference sits, the top two candidates of run `a` differ by
    less than PATH_NEAR_TIE nats (see above: the runs may take different GEMM kernels). A wrong
    KV block, position or batch row moves logprobs by nats, not hundredths, and parts the
    outputs at once."""
    ta, tb = a.token_ids, b.token_ids
    for i, (x, y) in enumerate(zip(ta, tb)):
        if x != y:
            top = a.logprobs[i][1]
            gap = top[0][1] - top[1][1]
            assert gap < PATH_NEAR_TIE, f"outputs part at token {i} ({x} vs {y}) where the top-2 gap is {gap:.4f} nats"
            return
        assert abs(a.logprobs[i][0] - b.logprobs[i][0]) < PATH_LOGPROB_ATOL, (
            f"token {i} ({x}): logprob {a.logprobs[i][0]:.4f} vs {b.logprobs[i][0]:.4f}")
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
