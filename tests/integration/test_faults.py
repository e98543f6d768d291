"""Faults with real processes: a worker killed (SIGKILL) or frozen (SIGSTOP) mid-generation.

Each test measures the time to detection (kill/freeze -> the coordinator reports the worker dead),
records what the clients saw, and checks that the coordinator stays up, and that afterwards no
process of the cluster is left. Outputs are compared with an undisturbed greedy run of the same
prompts on the same cluster (`assert_same_greedy`: identical tokens, up to a stated near-tie).

- kill -9, `replan_on_fewer_workers: true`: the coordinator re-plans onto the survivor at once and
  the in-flight requests finish, recomputed from their token history, with the undisturbed output.
- SIGSTOP, `replan_on_fewer_workers: false`: no plan fits, so within `recovery_timeout_s` the
  in-flight request ends with UnavailableError and new ones are refused with UnavailableError; a
  replacement worker that joins brings the cluster back, with the undisturbed output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from shardline.client import Client, UnavailableError
from shardline.local import LocalCluster
from tests.integration.conftest import assert_same_greedy, generate_in_threads, pp_config

HEARTBEAT = {"interval_s": 0.5, "misses": 4, "data_plane_timeout_s": 10.0}  # death declared after 2 s of silence
DETECTION_BOUND_S = 0.5 * 4 + 2.0  # heartbeat timeout + one check interval + scheduling slack on 2 busy cores
PROMPTS = ["The history of the printing press", "Write a short poem about rivers", "List three uses of copper"]
GEN = {"max_tokens": 96, "temperature": 0.0, "ignore_eos": True, "logprobs": 2}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _worker_pids(client: Client) -> dict[str, int]:
    return {w["worker_id"]: w["pid"] for w in client.stats()["workers"] if w["alive"]}


def _wait_dead(client: Client, worker_id: str, t0: float, bound_s: float = 30.0) -> float:
    """Seconds from t0 until the coordinator reports `worker_id` dead."""
    while time.monotonic() - t0 < bound_s:
        if any(w["worker_id"] == worker_id and not w["alive"] for w in client.stats()["workers"]):
            return time.monotonic() - t0
        time.sleep(0.05)  # poll interval
    raise AssertionError(f"worker {worker_id} not declared dead within {bound_s} s")


def _wait_tokens(client: Client, base: int, n: int, bound_s: float = 60.0) -> None:
    """Until the cluster has generated `n` tokens beyond `base` (so the fault lands mid-generation)."""
    deadline = time.monotonic() + bound_s
    while client.stats()["generation_tokens_total"] < base + n:
        assert time.monotonic() < deadline, "generation did not start"
        time.sleep(0.02)  # poll interval


def _freeze_local1_mid_generation(cluster: LocalCluster):
    """Generate PROMPTS[0] alone (the reference), start it again in a thread, and SIGSTOP worker
    local-1 once 16 tokens are out. Returns (reference, results, errors, threads, victim pid,
    time of the SIGSTOP) with results/errors/threads as `generate_in_threads` gives them."""
    client = cluster.client
    reference = client.generate(PROMPTS[0], **GEN)
    base = client.stats()["generation_tokens_total"]
    results, errors, _, threads = generate_in_threads(cluster.address, PROMPTS[:1], GEN, timeout_s=120)
    _wait_tokens(client, base, 16)
    victim = _worker_pids(client)["local-1"]
    t_stop = time.monotonic()
    os.kill(victim, signal.SIGSTOP)
    return reference, results, errors, threads, victim, t_stop


def _no_process_left(cluster: LocalCluster, pids: list[int]) -> None:
    rc = cluster.stop()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)  # poll interval
    assert not [p for p in pids if _alive(p)], "cluster processes left after stop"
    return rc


def test_kill_worker_mid_generation_recomputes_on_survivor():
    cfg = pp_config(2)
    cfg["heartbeat"] = HEARTBEAT
    cfg["coordinator"] = {"recovery_timeout_s": 60.0, "replan_on_fewer_workers": True}
    cluster = LocalCluster(cfg).start()
    client = cluster.client
    pids = list(_worker_pids(client).values()) + [client.stats()["coordinator"]["pid"]]
    try:
        reference = [client.generate(p, **GEN) for p in PROMPTS]  # undisturbed
        base = client.stats()["generation_tokens_total"]
        results, errors, ended, threads = generate_in_threads(cluster.address, PROMPTS, GEN, timeout_s=120)
        _wait_tokens(client, base, 24)
        victim = _worker_pids(client)["local-1"]
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        detect_s = _wait_dead(client, "local-1", t_kill)
        for t in threads:
            t.join(180)
        done_s = time.monotonic() - t_kill
        assert not errors, f"clients saw errors: {errors}"
        for ref, got in zip(reference, (results[i] for i in range(len(PROMPTS)))):
            assert got.finish_reason == "length" and len(got.token_ids) == GEN["max_tokens"]
            assert_same_greedy(ref, got)
        assert all(results[i].usage["num_preemptions"] >= 1 for i in results), "not recomputed?"
        health = client.health()
        assert health["status"] == "ok" and health["workers_up"] == 1, health
        stats = client.stats()
        assert [w["alive"] for w in stats["workers"] if w["worker_id"] == "local-1"] == [False]
        assert stats["plan"]["pp_size"] == 1
        assert detect_s < DETECTION_BOUND_S, detect_s
        print(f"\nkill -9 local-1: detected in {detect_s:.2f} s; {len(PROMPTS)} in-flight requests completed "
              f"{done_s:.1f} s after the kill, outputs equal to the undisturbed run; clients saw no error")
    finally:
        rc = _no_process_left(cluster, pids)
    assert rc == 0


def test_frozen_worker_ends_requests_then_replacement_restores_service(tmp_path):
    cfg = pp_config(2)
    cfg["heartbeat"] = HEARTBEAT
    cfg["coordinator"] = {"recovery_timeout_s": 5.0, "replan_on_fewer_workers": False}
    cluster = LocalCluster(cfg).start()
    client = cluster.client
    pids = list(_worker_pids(client).values()) + [client.stats()["coordinator"]["pid"]]
    replacement = None
    victim = None
    try:
        reference, results, errors, threads, victim, t_stop = _freeze_local1_mid_generation(cluster)
        detect_s = _wait_dead(client, "local-1", t_stop)
        for t in threads:
            t.join(60)
        assert isinstance(errors.get(0), UnavailableError), (errors, results)
        seen_s = time.monotonic() - t_stop
        # a new request is refused at once (503-style) while no plan fits
        with pytest.raises(UnavailableError, match="not serving"):
            client.generate("hello", max_tokens=4)
        health = client.health()
        assert health["status"].startswith(("degraded", "recovering")) and health["workers_up"] == 1, health
        assert detect_s < DETECTION_BOUND_S, detect_s
        assert seen_s < DETECTION_BOUND_S + 5.0 + 5.0, seen_s  # detection + recovery_timeout_s + slack

        # a replacement joins: the coordinator re-plans onto 2 workers and serves again
        os.kill(victim, signal.SIGKILL)
        t_join = time.monotonic()
        replacement = subprocess.Popen(
            [sys.executable, "-m", "shardline.cli", "worker", "--coordinator", cluster.config.worker_address,
             "--threads", "1", "--worker-id", "local-2", "--memory-gb", "4"],
            stdout=open(tmp_path / "replacement.log", "wb"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # wait_ready() gives up on a degraded cluster; here the degraded state is expected to end
        deadline = time.monotonic() + 180
        while client.health()["status"] != "ok":
            assert time.monotonic() < deadline, client.health()
            time.sleep(0.2)  # poll interval
        restore_s = time.monotonic() - t_join
        again = client.generate(PROMPTS[0], **GEN)
        assert_same_greedy(reference, again)
        assert client.health()["workers_up"] == 2
        print(f"\nSIGSTOP local-1: detected in {detect_s:.2f} s; the in-flight request ended with "
              f"UnavailableError {seen_s:.1f} s after the freeze ({errors[0]}); new requests refused with "
              f"UnavailableError; a replacement restored service {restore_s:.1f} s after it started; "
              "output equal to the undisturbed run")
    finally:
        if victim is not None and _alive(victim):
            os.kill(victim, signal.SIGKILL)
        rc = _no_process_left(cluster, pids)
        if replacement is not None:
            # Known gap: a worker started outside the launcher does not always exit after the
            # coordinator stops (seen in this test); it is killed here so nothing is left behind.
            try:
                replacement.wait(30)
            except subprocess.TimeoutExpired:
                replacement.kill()
                replacement.wait()
    assert rc == 0


def test_frozen_worker_that_resumes_rejoins_and_restores_service():
    """A worker frozen long enough to be declared lost (a GC pause, swap, a stalled host) and
    then resumed is told SHUTDOWN {reason: lost}: it drops its shard, registers again as a new
    incarnation, and the coordinator, which had no plan without it, serves again with it.
    (Before, the returning worker was shut down and the cluster stayed down.)"""
    cfg = pp_config(2)
    cfg["heartbeat"] = HEARTBEAT
    cfg["coordinator"] = {"recovery_timeout_s": 120.0, "replan_on_fewer_workers": False}
    cluster = LocalCluster(cfg).start()
    client = cluster.client
    pids = list(_worker_pids(client).values()) + [client.stats()["coordinator"]["pid"]]
    victim = None
    try:
        reference, results, errors, threads, victim, t_stop = _freeze_local1_mid_generation(cluster)
        detect_s = _wait_dead(client, "local-1", t_stop)
        assert client.health()["status"].startswith("recovering"), client.health()
        os.kill(victim, signal.SIGCONT)
        t_cont = time.monotonic()
        for t in threads:
            t.join(180)
        assert not errors, errors
        assert_same_greedy(reference, results[0])  # the in-flight request finished, recomputed
        restore_s = time.monotonic() - t_cont
        assert client.health()["status"] == "ok" and client.health()["workers_up"] == 2
        assert _worker_pids(client)["local-1"] == victim  # the same process, rejoined
        assert_same_greedy(reference, client.generate(PROMPTS[0], **GEN))
        print(f"\nSIGSTOP local-1: declared lost after {detect_s:.2f} s; after SIGCONT it rejoined and the "
              f"in-flight request finished {restore_s:.1f} s later, equal to the undisturbed run")
    finally:
        if victim is not None and _alive(victim):
            os.kill(victim, signal.SIGCONT)
        _no_process_left(cluster, pids)


def test_sigterm_drains_running_requests_then_exits():
    """SIGTERM to the coordinator: admission stops at once (new requests get UnavailableError),
    the running request still completes in full, then the coordinator shuts the workers down and
    exits 0 (reported by the launcher), leaving no process behind."""
    cfg = pp_config(1)
    cfg["coordinator"] = {"shutdown_timeout_s": 60.0}
    cluster = LocalCluster(cfg).start()
    client = cluster.client
    coordinator = client.stats()["coordinator"]["pid"]
    pids = list(_worker_pids(client).values()) + [coordinator]
    try:
        base = client.stats()["generation_tokens_total"]
        results, errors, ended, threads = generate_in_threads(cluster.address, PROMPTS[:1], GEN, timeout_s=120)
        _wait_tokens(client, base, 8)
        t_term = time.monotonic()
        os.kill(coordinator, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while client.health()["status"] != "draining":
            assert time.monotonic() < deadline, client.health()
            time.sleep(0.02)  # poll interval
        with pytest.raises(UnavailableError, match="draining"):
            client.generate("hello", max_tokens=4)
        threads[0].join(120)
        assert not errors, errors
        assert results[0].finish_reason == "length" and len(results[0].token_ids) == GEN["max_tokens"]
        deadline = time.monotonic() + 30
        while _alive(coordinator):
            assert time.monotonic() < deadline, "coordinator still running after the drain"
            time.sleep(0.1)  # poll interval
        print(f"\nSIGTERM: the running request finished {ended[0]:.1f} s after it started; the coordinator "
              f"exited {time.monotonic() - t_term:.1f} s after the signal")
    finally:
        rc = _no_process_left(cluster, pids)
    assert rc == 0


def test_launcher_exits_cleanly_when_its_coordinator_is_stopped_during_start_up():
    """The coordinator gets SIGTERM before the launcher has seen the cluster ready (workers still
    loading): it exits 0, and so does the launcher, rather than reporting a start-up failure
    (rc 1; this race failed the test below in CI, when the test's own readiness poll was ahead
    of the launcher's)."""
    cluster = LocalCluster(pp_config(1)).start(wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        coordinator = None
        while coordinator is None:
            assert cluster.proc.poll() is None, cluster.output()
            assert time.monotonic() < deadline, "coordinator not answering"
            try:
                stats = cluster.client.stats(timeout_s=1.0)
                coordinator = stats["coordinator"]["pid"]
            except Exception:
                time.sleep(0.05)  # poll interval
        assert cluster.client.health(timeout_s=5.0)["status"] != "ok", "too late: the workers were ready"
        os.kill(coordinator, signal.SIGTERM)
        rc = cluster.proc.wait(60)
        assert rc == 0, f"launcher rc {rc}; its output:\n{cluster.output()}"
        assert "coordinator exited during start-up (rc=0)" in cluster.output()
    finally:
        cluster.stop()


def test_launcher_exits_cleanly_under_sigterm_after_the_coordinator_left():
    """SIGTERMs at the launcher from the moment its coordinator exited (after a drain) until the
    launcher is gone: it still exits 0. CPython resets Python signal handlers to the default
    early in its finalization; a SIGTERM in that window used to kill the launcher (rc -15, the
    flake of the test above in CI; reproduced 3 times out of 3 by this loop before the fix)."""
    cluster = LocalCluster(pp_config(1)).start()
    coordinator = cluster.client.stats()["coordinator"]["pid"]
    try:
        os.kill(coordinator, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(coordinator):
            assert time.monotonic() < deadline, "coordinator still running after SIGTERM"
            time.sleep(0.001)  # poll interval: the window after the coordinator's exit is what matters
        sent = 0
        while cluster.proc.poll() is None and time.monotonic() < deadline:
            try:
                cluster.proc.send_signal(signal.SIGTERM)
                sent += 1
            except ProcessLookupError:
                break
            try:  # the next SIGTERM 2 ms later, unless the launcher exits first
                cluster.proc.wait(0.002)
            except subprocess.TimeoutExpired:
                pass
        cluster.proc.wait(30)
        assert sent > 0
        assert cluster.proc.returncode == 0, (f"launcher rc {cluster.proc.returncode} after {sent} SIGTERMs; "
                                              f"its output:\n{cluster.output()}")
    finally:
        cluster.stop()
