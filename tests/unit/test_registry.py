"""The worker registry without sockets: registration checks, heartbeats and liveness, lost workers
that speak again, per-worker figures and cost (a coordinator whose outbox records messages)."""

from __future__ import annotations

import time

import pytest

from shardline import __version__
from shardline import messages as M
from shardline.coordinator.registry import HEARTBEAT_ID_SUFFIX, MAX_STEP_TIMES
from shardline.protocol import ErrorCode, MsgType
from tests.fake_cluster import GIB, FakeCluster
from tests.frames import raw_frame

COMM = M.CommStats(all_reduce_s=0.5, num_all_reduce=10, all_gather_s=0.0, num_all_gather=0, send_s=1.0, num_send=3,
                   recv_s=2.0, num_recv=3)


def _refusal(cluster: FakeCluster, worker_id: str) -> M.Error:
    errors = cluster.outbox.to(worker_id, MsgType.ERROR)
    assert len(errors) == 1, cluster.outbox.worker_messages
    return errors[0]


def test_registration_is_refused_with_the_reason():
    c = FakeCluster(workers={"count": 2}, coordinator={"max_spare_workers": 1})
    c.register("old", version="0.0.1")
    assert _refusal(c, "old").code == ErrorCode.VERSION_MISMATCH
    assert f"coordinator runs {__version__}" in _refusal(c, "old").message
    c.register("other", model_digest="ab" * 32, model_path="/models/other.gguf")
    msg = _refusal(c, "other").message
    assert _refusal(c, "other").code == ErrorCode.MODEL_MISMATCH and "/models/other.gguf" in msg
    assert c.coord.model.digest[:16] in msg and "abababab" in msg
    c.register("w0")
    c.worker_says("w0", M.Register(worker_id="w0", version=__version__, host="h", device="cpu", memory_bytes=GIB),
                  identity=b"impostor")
    assert _refusal(c, "impostor").code == ErrorCode.INVALID_REQUEST
    assert "in use by a live worker" in _refusal(c, "impostor").message
    c.register("cheap", price_per_hour=-1.0)
    assert _refusal(c, "cheap").code == ErrorCode.BAD_FRAME and "price_per_hour" in _refusal(c, "cheap").message
    c.register("fast", speed=0)
    assert _refusal(c, "fast").code == ErrorCode.BAD_FRAME and "speed" in _refusal(c, "fast").message
    assert set(c.registry.workers) == {"w0"}
    for wid in ("w1", "spare"):
        c.register(wid)
    c.register("one-too-many")
    err = _refusal(c, "one-too-many")
    assert err.code == ErrorCode.UNAVAILABLE and "2 planned and 1 spares" in err.message, err
    assert c.registry.order == ["w0", "w1", "spare"] and c.registry.num_alive == 3


def test_admit_checks_without_adding():
    c = FakeCluster(workers={"count": 2, "price_per_hour": 0.5})
    body = {"worker_id": "w0", "version": __version__, "host": "h", "device": "cpu", "memory_bytes": GIB,
            "incarnation": "a", "pid": 7, "speed": 2}
    w, restarted = c.registry.admit(b"w0", M.Register(**body))
    assert restarted is None and c.registry.workers == {}
    assert (w.worker_id, w.host, w.memory_bytes, w.incarnation, w.pid, w.speed, w.price_per_hour) == (
        "w0", "h", GIB, "a", 7, 2.0, 0.5)
    # a REGISTER without a required field is refused when decoded, naming the field
    c.worker_says("w0", raw_frame(MsgType.REGISTER, {k: v for k, v in body.items() if k != "memory_bytes"}))
    assert _refusal(c, "w0").code == ErrorCode.BAD_FRAME and "memory_bytes" in _refusal(c, "w0").message
    assert c.registry.workers == {}


def test_a_restarted_worker_replaces_its_lost_self():
    """The same worker id from the same routing id registers again (its process restarted): the
    old incarnation is lost, which breaks the plan, and the new one takes its place."""
    c = FakeCluster(workers={"count": 2})
    c.serve("w0", "w1")
    old = c.registry.workers["w1"]
    c.register("w1", incarnation="w1-2")
    new = c.registry.workers["w1"]
    assert new is not old and new.incarnation == "w1-2" and new.alive and not old.alive
    assert c.registry.order == ["w0", "w1"] and c.lifecycle.plan_id == 2  # re-planned with the new one


def test_heartbeats_keep_a_worker_alive_and_silence_loses_it():
    c = FakeCluster(workers={"count": 2}, heartbeat={"interval_s": 1.0, "misses": 3})
    c.serve("w0", "w1")
    hb = HEARTBEAT_ID_SUFFIX
    t0 = time.monotonic()
    assert c.registry.heartbeat(t0 + 2.0) == []
    assert c.outbox.types("w0")[-1] is MsgType.HEARTBEAT  # the coordinator heartbeats too
    c.registry.workers["w1"].last_heartbeat = t0 - 10
    c.worker_says("w0", M.Heartbeat(worker_id="w0", incarnation="w0-1"), identity=b"w0" + hb)
    silent = c.registry.heartbeat(time.monotonic())
    assert [(w.worker_id, why.startswith("no heartbeat for 1")) for w, why in silent] == [("w1", True)]
    # a heartbeat of another incarnation, or from another worker's socket, does not count
    w0 = c.registry.workers["w0"]
    w0.last_heartbeat = t0 - 10
    c.worker_says("w0", M.Heartbeat(worker_id="w0", incarnation="w0-0"), identity=b"w0" + hb)
    c.worker_says("w0", M.Heartbeat(worker_id="w0", incarnation="w0-1"), identity=b"w1" + hb)
    assert w0.last_heartbeat == t0 - 10
    assert [e.message for e in c.outbox.to("w1#hb", MsgType.ERROR)] == [
        "HEARTBEAT from b'w1#hb', which is not a live registered worker"]


def test_a_lost_worker_that_speaks_again_is_told_to_leave_once_per_interval():
    c = FakeCluster(workers={"count": 2}, heartbeat={"interval_s": 60.0})
    c.serve("w0", "w1")
    c.lifecycle.worker_lost(c.registry.workers["w1"], "test")
    c.outbox.clear()
    for _ in range(3):
        c.worker_says("w1", M.Heartbeat(worker_id="w1", incarnation="w1-1"), identity=b"w1#hb")
        c.worker_says("w1", M.StepResult(step_id=0, seq_ids=b"", tokens=b""))
    assert c.outbox.worker_messages == [("w1", MsgType.SHUTDOWN, M.Shutdown(reason="lost"))]  # no ERROR either
    assert c.registry.is_lost(b"w1", M.Heartbeat()) and c.registry.is_lost(b"w1#hb", M.Heartbeat(worker_id="w1"))
    assert not c.registry.is_lost(b"w0", M.Heartbeat())


def test_early_heartbeats_are_dropped_quietly():
    """A worker's heartbeat socket can be read before its REGISTER: no ERROR goes back to it."""
    c = FakeCluster()
    c.worker_says("w5", M.Heartbeat(worker_id="w5", incarnation="x"), identity=b"w5#hb")
    assert c.outbox.worker_messages == []
    c.worker_says("w5", M.Heartbeat(worker_id="w5", incarnation="x"), identity=b"w6#hb")
    assert c.outbox.types("w6#hb") == [MsgType.ERROR]


def test_heartbeat_reports_fill_the_worker_figures():
    c = FakeCluster(workers={"count": 2})
    c.serve("w0", "w1")
    w1 = c.registry.workers["w1"]
    t0 = time.monotonic()
    w1.busy_window.add(t0 - 4.0, 0.0)
    c.worker_says("w1", M.Heartbeat(
        worker_id="w1", incarnation="w1-1", num_steps=9, step_time_s=0.02, rss_bytes=5 * GIB, busy_s=2.0,
        step_times_s=[0.1] * (MAX_STEP_TIMES + 10), comm=COMM), identity=b"w1#hb")
    assert (w1.num_steps, w1.step_time_s, w1.rss_bytes, w1.busy_s, w1.comm) == (9, 0.02, 5 * GIB, 2.0, COMM)
    entry = next(d for d in c.registry.stats(c.lifecycle.placement()) if d.worker_id == "w1")
    assert entry.stage == 1 and entry.layer_end == c.coord.model.spec.num_layers and entry.alive
    assert entry.comm == COMM and 0.4 < entry.busy_fraction <= 0.5  # 2 busy seconds over about 4
    # malformed reports are refused when decoded, naming the field; the figures stay
    for bad in ({"step_times_s": {"a": 1}}, {"comm": {"send_s": "x"}}, {"num_steps": True}):
        c.worker_says("w1", raw_frame(MsgType.HEARTBEAT, {"worker_id": "w1", "incarnation": "w1-1", **bad}),
                      identity=b"w1#hb")
        (err,) = c.outbox.to("w1#hb", MsgType.ERROR)[-1:]
        assert err.code == ErrorCode.BAD_FRAME and f"$.{next(iter(bad))}" in err.message, err
    assert (w1.num_steps, w1.comm) == (9, COMM)


def test_cost_counts_each_worker_until_it_was_lost():
    c = FakeCluster(workers={"count": 2, "price_per_hour": 3.6})
    assert c.registry.cost(0, None)["price_per_hour"] is None  # no worker: nothing priced
    c.serve("w0", "w1")
    unpriced = FakeCluster(workers={"count": 1})
    unpriced.serve("w0")
    assert set(unpriced.registry.cost(100, 5.0).values()) == {None}
    t0 = time.monotonic()
    for w in c.registry.workers.values():
        w.registered_at = t0 - 1000.0
    c.registry.workers["w1"].lost_at = t0 - 500.0
    c.registry.workers["w1"].alive = False
    cost = c.registry.cost(2_000_000, 10.0)
    assert cost["price_per_hour"] == 3.6  # the live worker only
    assert cost["cost_total"] == pytest.approx(3.6 * (1000 + 500) / 3600, rel=1e-3)
    assert cost["cost_per_million_tokens"] == pytest.approx(cost["cost_total"] / 2, rel=1e-6)
    assert cost["recent_cost_per_million_tokens"] == pytest.approx(3.6 / 36000 * 1e6)
    assert c.registry.cost(0, None)["cost_per_million_tokens"] is None
