"""Draining one worker (`shardline drain`, DRAIN_WORKER) with real processes.

- A 2-worker PP=2 cluster where either worker can hold the whole model: greedy generations are
  running when `shardline drain local-1` is run; the coordinator lets the steps in flight finish,
  re-plans onto local-0 alone, shuts local-1 down (it exits 0, as the launcher reports) and
  recomputes the running sequences, so every request completes with the tokens of an undisturbed
  run; new requests are served by local-0 alone.
- A 2-worker cluster whose workers each offer too little memory for the whole model: draining
  either is refused (no plan fits), nothing changes and the running request is not disturbed; an
  unknown worker id is refused with NOT_FOUND.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from shardline.client import Client, InvalidRequestError, ShardlineError
from shardline.local import LocalCluster
from shardline.protocol import ErrorCode
from tests.integration.conftest import assert_same_greedy, generate_in_threads, pp_config
from tests.integration.test_faults import _alive, _no_process_left, _wait_tokens, _worker_pids

PROMPTS = ["The history of the printing press", "Write a short poem about rivers", "List three uses of copper"]
GEN = {"max_tokens": 64, "temperature": 0.0, "ignore_eos": True, "logprobs": 2}
# each worker: half the model and a small KV pool, never the whole model (92.1 MiB of weights as
# the planner counts them + 16 float16 KV blocks of 30 layers, 5.6 MiB, > 0.09 GiB = 92.2 MiB)
SMALL_WORKERS_GB = 0.09


def _cli(*args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardline.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s)


def _wait_output(cluster: LocalCluster, line: str, bound_s: float = 60.0) -> None:
    deadline = time.monotonic() + bound_s
    while line not in cluster.output():
        assert time.monotonic() < deadline, f"{line!r} not in the launcher's output:\n{cluster.output()[-3000:]}"
        time.sleep(0.1)  # poll interval


def test_drain_worker_mid_generation_moves_work_to_the_other_worker():
    cfg = pp_config(2)
    # a drain re-plans onto fewer workers even where a loss would wait for a replacement
    cfg["coordinator"] = {"recovery_timeout_s": 120.0, "replan_on_fewer_workers": False}
    cluster = LocalCluster(cfg).start()
    client = cluster.client
    pids = _worker_pids(client)
    all_pids = list(pids.values()) + [client.stats()["coordinator"]["pid"]]
    try:
        assert client.stats()["plan"]["pp_size"] == 2
        reference = [client.generate(p, **GEN) for p in PROMPTS]  # undisturbed
        base = client.stats()["generation_tokens_total"]
        results, errors, _, threads = generate_in_threads(cluster.address, PROMPTS, GEN)
        _wait_tokens(client, base, 24)
        t0 = time.monotonic()
        done = _cli("drain", "--address", cluster.address, "--json", "local-1")
        drain_s = time.monotonic() - t0
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        assert reply["worker_id"] == "local-1"
        assert [a["worker_id"] for a in reply["plan"]["assignments"]] == ["local-0"]
        assert reply["plan"]["pp_size"] == 1
        assert reply["requests_resumed"] >= 1, reply  # the drain landed mid-generation
        _wait_output(cluster, "shardline: worker local-1 exited (rc=0)")
        assert not _alive(pids["local-1"])

        for t in threads:
            t.join(240)
        assert not errors, f"clients saw errors: {errors}"
        for i, ref in enumerate(reference):
            got = results[i]
            assert got.finish_reason == "length" and len(got.token_ids) == GEN["max_tokens"]
            assert_same_greedy(ref, got)
        assert sum(results[i].usage["num_preemptions"] for i in results) >= 1, "nothing was recomputed?"

        # new requests: served by local-0 alone
        steps_before = _steps(client, "local-0")
        again = client.generate(PROMPTS[0], **GEN)
        assert_same_greedy(reference[0], again)
        stats = client.stats()
        assert [a["worker_id"] for a in stats["plan"]["assignments"]] == ["local-0"]
        gone = [w for w in stats["workers"] if w["worker_id"] == "local-1"]
        assert [(w["alive"], w["drained"]) for w in gone] == [(False, True)]
        assert stats["worker_drain"] is None
        deadline = time.monotonic() + 10  # step counts arrive with the next heartbeat
        while _steps(client, "local-0") <= steps_before:
            assert time.monotonic() < deadline, "local-0 ran no step for the new request"
            time.sleep(0.2)  # poll interval
        health = client.health()
        # a drained worker is not missing (the gateway's /health would answer 503 otherwise)
        assert health["status"] == "ok" and health["workers_up"] == health["workers_expected"] == 1, health
        print(f"\ndrain local-1 mid-generation: `shardline drain` returned after {drain_s:.1f} s "
              f"(coordinator: {reply['drain_s']:.1f} s, {reply['requests_resumed']} sequences resumed); "
              f"local-1 exited 0; {len(PROMPTS)} requests equal to the undisturbed run")
    finally:
        rc = _no_process_left(cluster, all_pids)
    assert rc == 0


def _steps(client: Client, worker_id: str) -> int:
    return next(w["num_steps"] for w in client.stats()["workers"] if w["worker_id"] == worker_id)


def test_drain_refused_when_no_plan_fits_without_the_worker():
    cfg = pp_config(2)
    cfg["workers"]["memory_gb"] = SMALL_WORKERS_GB
    cluster = LocalCluster(cfg).start()
    client = cluster.client
    pids = _worker_pids(client)
    all_pids = list(pids.values()) + [client.stats()["coordinator"]["pid"]]
    try:
        before = client.stats()
        reference = client.generate(PROMPTS[0], **GEN)
        base = client.stats()["generation_tokens_total"]
        results, errors, _, threads = generate_in_threads(cluster.address, PROMPTS[:1], GEN)
        _wait_tokens(client, base, 8)

        with pytest.raises(InvalidRequestError, match="cannot drain worker local-1: no plan fits"):
            client.drain_worker("local-1")
        with pytest.raises(ShardlineError, match="'no-such-worker' is not registered") as err:
            client.drain_worker("no-such-worker")
        assert err.value.code == ErrorCode.NOT_FOUND
        refused = _cli("drain", "--address", cluster.address, "local-0")
        assert refused.returncode == 1 and "no plan fits" in refused.stderr, refused.stderr

        for t in threads:
            t.join(180)
        assert not errors, errors
        assert_same_greedy(reference, results[0])
        assert results[0].usage["num_preemptions"] == 0  # not disturbed
        after = client.stats()
        assert after["plan"] == before["plan"]
        assert all(w["alive"] and not w["drained"] for w in after["workers"])
        assert all(_alive(p) for p in pids.values())
        assert client.generate("hello", max_tokens=4).finish_reason == "length"
        print(f"\ndrain refused ({SMALL_WORKERS_GB} GiB workers): {refused.stderr.strip()}")
    finally:
        rc = _no_process_left(cluster, all_pids)
    assert rc == 0
