"""The plan lifecycle without sockets: plan -> ASSIGN -> every READY -> serving; a member lost ->
recovering -> a new plan that resumes the unfinished sequences; recovery timed out -> degraded;
an operator's drain of one worker through its two phases; the graceful shutdown."""

from __future__ import annotations

import time

from shardline import messages as M
from shardline import protocol as P
from shardline.coordinator.lifecycle import ClusterState, DrainPhase
from shardline.protocol import ErrorCode, MsgType
from tests.fake_cluster import FakeCluster

CLIENT = b"client-1"
OPERATOR = b"operator"


def _error(c: FakeCluster, client: bytes) -> M.Error:
    errors = c.outbox.to(client, MsgType.ERROR)
    assert errors, c.outbox.client_messages
    return errors[-1]


def _decode_step(c: FakeCluster, steps: list[M.Step], token: int) -> tuple[int, list[M.Step]]:
    """Answer the one sequence's step with `token` and run a loop turn: (seq id, the next steps)."""
    (entry,) = steps[0].seqs
    c.step_result(steps[0], {entry.seq_id: token})
    return entry.seq_id, c.run_loop_turn()


def test_plan_waits_for_the_workers_then_for_every_ready():
    c = FakeCluster(workers={"count": 2})
    c.register("w0")
    assert c.lifecycle.state is ClusterState.WAITING_FOR_WORKERS and c.outbox.worker_messages == []
    assert c.coord.health() == M.HealthReply(status="waiting_for_workers", workers_up=1, workers_expected=2,
                                             model="smollm2-135m")
    c.generate(CLIENT, "early")
    assert _error(c, CLIENT) == P.error(ErrorCode.UNAVAILABLE, "cluster not serving: waiting_for_workers",
                                        request_id="early")
    c.register("w1")
    assigns = [c.outbox.to(w, MsgType.ASSIGN) for w in ("w0", "w1")]
    assert [len(a) for a in assigns] == [1, 1] and c.lifecycle.state is ClusterState.LOADING
    (a0,), (a1,) = assigns
    assert (a0.stage, a1.stage, a0.layer_start, a0.layer_end, a1.layer_end) == (
        0, 1, 0, a1.layer_start, c.coord.model.spec.num_layers)
    assert a0.plan_id == a1.plan_id == 1 and a0.store_prefix == "plan1/"
    c.ready("w0", plan_id=0)  # a READY answering an older plan
    c.ready("w0")
    assert c.lifecycle.state is ClusterState.LOADING and c.coord.health().status == "loading"
    c.ready("w1")
    assert c.lifecycle.state is ClusterState.SERVING and c.coord.health().status == "ok"
    assert [w.worker_id for w in c.coord.dispatcher.workers] == ["w0", "w1"]
    assert c.coord.dispatcher.max_in_flight == 2  # one step per pipeline stage; no continuations (READY said so)
    assert c.coord.stats_snapshot().state == "serving"


def test_no_plan_fits_is_plan_failed():
    c = FakeCluster(workers={"count": 2})
    c.register("w0", memory_gb=0.01)
    c.register("w1", memory_gb=0.01)
    assert c.lifecycle.state is ClusterState.PLAN_FAILED and c.lifecycle.plan is None
    status = c.coord.health().status
    assert status.startswith("plan_failed: ") and status == f"plan_failed: {c.lifecycle.reason}" and c.lifecycle.reason


def test_a_lost_member_is_replaced_by_a_plan_over_the_survivor_that_resumes_the_sequences():
    c = FakeCluster(workers={"count": 2})
    c.serve("w0", "w1")
    c.generate(CLIENT, "r1", "Hello there", max_tokens=4, stream=True)
    seq_id, steps = _decode_step(c, c.run_loop_turn(), 42)
    lost_step = steps[0].step_id  # in flight when w1 goes
    seq = c.coord.requests.get(seq_id).seq
    assert seq.num_computed_tokens == seq.num_prompt_tokens and seq.output_token_ids == [42]

    c.lifecycle.worker_lost(c.registry.workers["w1"], "no heartbeat for 9.0 s")
    # re-planned at once onto w0 alone (replan_on_fewer_workers), which loads the whole model
    assert c.lifecycle.state is ClusterState.LOADING and c.lifecycle.plan_id == 2
    assert c.coord.dispatcher.in_flight == {} and c.lifecycle.recovery_deadline is not None
    (assign,) = c.outbox.to("w0", MsgType.ASSIGN)[1:]
    assert (assign.plan_id, assign.layer_start, assign.layer_end, assign.store_prefix) == (
        2, 0, c.coord.model.spec.num_layers, "plan2/")
    c.generate(CLIENT, "r2")
    assert _error(c, CLIENT).message == "cluster not serving: loading"
    assert c.coord.health() == M.HealthReply(status="loading", workers_up=1, workers_expected=2, model="smollm2-135m")

    c.ready("w0")
    assert c.lifecycle.state is ClusterState.SERVING and c.lifecycle.recovery_deadline is None
    assert seq.num_preemptions == 1 and seq.num_computed_tokens == 0 and seq.output_token_ids == [42]
    (step,) = c.run_loop_turn()
    (entry,) = step.seqs
    assert step.step_id > lost_step and entry.reset and entry.start == 0
    assert P.unpack_ids(entry.tokens) == seq.prompt_token_ids + [42]  # recomputed from its tokens
    c.step_result(M.Step(step_id=lost_step, seqs=[M.StepSeq(seq_id=seq_id, start=0, n=1, tokens=b"", blocks=b"",
                                                          reset=False, sample=True)]), {seq_id: 7})
    assert seq.output_token_ids == [42]  # a late result of the abandoned plan matches no step
    for token in (43, 44, 45):
        _, steps = _decode_step(c, [step], token)
        step = steps[0] if steps else None
    (done,) = c.outbox.to(CLIENT, MsgType.DONE)
    assert P.unpack_ids(done.token_ids) == [42, 43, 44, 45] and done.finish_reason == "length"
    assert done.usage.num_preemptions == 1
    assert [len(P.unpack_ids(d.token_ids)) for d in c.outbox.to(CLIENT, MsgType.DELTA)] == [1, 1, 1, 1]


def test_a_data_plane_failure_waits_for_liveness_before_re_planning():
    c = FakeCluster(workers={"count": 2}, heartbeat={"interval_s": 1.0, "misses": 3})
    c.serve("w0", "w1")
    c.worker_says("w0", P.error(ErrorCode.UNAVAILABLE, "recv timed out", plan_id=0))
    assert c.lifecycle.state is ClusterState.SERVING  # a late report about a plan already replaced
    c.worker_says("w0", P.error(ErrorCode.UNAVAILABLE, "recv timed out", plan_id=1))
    assert c.lifecycle.state is ClusterState.RECOVERING and c.lifecycle.plan is None
    assert c.coord.health().status == "recovering: worker w0: recv timed out"
    assert len(c.outbox.to("w0", MsgType.ASSIGN)) == 1  # not yet: a peer may be dead
    now = c.lifecycle.replan_at + 0.1
    for w in c.registry.workers.values():
        w.last_heartbeat = now  # both still heartbeat
    c.run_loop_turn(now=now)
    assert c.lifecycle.state is ClusterState.LOADING and c.outbox.to("w1", MsgType.ASSIGN)[-1].plan_id == 2


def test_recovery_that_runs_out_of_time_ends_the_requests_and_degrades():
    c = FakeCluster(workers={"count": 2}, coordinator={"replan_on_fewer_workers": False, "recovery_timeout_s": 5})
    c.serve("w0", "w1")
    c.generate(CLIENT, "r1")
    c.run_loop_turn()
    c.lifecycle.worker_lost(c.registry.workers["w1"], "no heartbeat for 9.0 s")
    why = "recovering: worker w1 lost: no heartbeat for 9.0 s"
    assert c.lifecycle.state is ClusterState.RECOVERING and c.lifecycle.status == why
    c.generate(CLIENT, "r2")
    assert _error(c, CLIENT).message == f"cluster not serving: {why}"
    now = c.lifecycle.recovery_deadline + 0.1
    c.registry.workers["w0"].last_heartbeat = now
    c.run_loop_turn(now=now)
    assert _error(c, CLIENT) == P.error(ErrorCode.UNAVAILABLE, f"no worker plan within 5 s ({why})",
                                        request_id="r1")
    assert c.lifecycle.state is ClusterState.DEGRADED and len(c.coord.requests) == 0
    assert c.coord.health().status == "degraded: worker w1 lost: no heartbeat for 9.0 s"
    c.register("w2")  # a replacement brings the cluster back
    assert c.lifecycle.state is ClusterState.LOADING
    c.ready("w0")
    c.ready("w2")
    assert c.lifecycle.state is ClusterState.SERVING and c.coord.health().status == "ok"


def test_draining_a_member_quiesces_then_re_plans_without_it():
    c = FakeCluster(workers={"count": 2})
    c.serve("w0", "w1")
    c.register("w2")  # a spare, which takes w1's place
    c.generate(CLIENT, "r1", max_tokens=8)
    steps = c.run_loop_turn()
    c.client_says(OPERATOR, M.DrainWorker(worker_id="w1", request_id="d1"))
    drain = c.lifecycle.worker_drain
    assert drain.phase is DrainPhase.QUIESCE and c.coord.stats_snapshot().worker_drain.phase == "quiesce"
    c.client_says(OPERATOR, M.DrainWorker(worker_id="w0", request_id="d2"))
    assert _error(c, OPERATOR) == P.error(ErrorCode.UNAVAILABLE, "a drain of worker w1 is in progress",
                                          request_id="d2")
    c.generate(CLIENT, "r2")  # queued for the next plan, not refused
    assert c.outbox.types(CLIENT) == [MsgType.ACCEPTED, MsgType.ACCEPTED]

    # quiesce: the step in flight finishes and no new one starts
    (entry,) = steps[0].seqs
    c.step_result(steps[0], {entry.seq_id: 42})
    assert c.run_loop_turn() == []
    assert drain.phase is DrainPhase.REPLAN and c.outbox.to("w1", MsgType.SHUTDOWN) == [M.Shutdown(reason="drained")]
    assert c.lifecycle.state is ClusterState.LOADING
    assert [a.worker_id for a in c.lifecycle.plan.assignments] == ["w0", "w2"]
    assert c.outbox.to(OPERATOR, MsgType.DRAIN_WORKER_REPLY) == []  # answered when the new plan serves
    c.ready("w0")
    c.ready("w2")
    (reply,) = c.outbox.to(OPERATOR, MsgType.DRAIN_WORKER_REPLY)
    assert (reply.worker_id, reply.plan_id, reply.requests_resumed, reply.request_id) == (
        "w1", 2, 2, "d1")
    assert c.lifecycle.worker_drain is None and c.coord.stats_snapshot().worker_drain is None
    assert c.coord.health().workers_up == 2 and c.coord.health().workers_expected == 1
    c.worker_says("w1", M.Heartbeat(worker_id="w1", incarnation="w1-1"), identity=b"w1#hb")
    assert c.outbox.to("w1", MsgType.SHUTDOWN)[-1] == M.Shutdown(reason="drained")  # it may not come back


def test_a_drain_whose_steps_do_not_return_abandons_them_at_the_quiesce_deadline():
    c = FakeCluster(workers={"count": 3}, parallel={"pipeline_parallel": 3, "tensor_parallel": 1})
    c.serve("w0", "w1", "w2")
    c.generate(CLIENT, "r1")
    c.run_loop_turn()
    c.client_says(OPERATOR, M.DrainWorker(worker_id="w2"))
    c.lifecycle.advance_worker_drain(time.monotonic())
    assert c.lifecycle.worker_drain.phase is DrainPhase.QUIESCE  # its step is still in flight
    c.lifecycle.advance_worker_drain(c.lifecycle.worker_drain.quiesce_deadline + 0.1)
    assert c.lifecycle.worker_drain.phase is DrainPhase.REPLAN and c.coord.dispatcher.in_flight == {}
    assert [a.worker_id for a in c.lifecycle.plan.assignments] == ["w0", "w1"]


def test_drain_refusals_and_a_spare_drained_at_once():
    c = FakeCluster(workers={"count": 2})
    c.client_says(OPERATOR, M.DrainWorker(worker_id="w0"))
    assert _error(c, OPERATOR).code == ErrorCode.NOT_FOUND
    c.register("w0", memory_gb=0.08)  # half the model each: one alone cannot hold it
    c.client_says(OPERATOR, M.DrainWorker(worker_id="w0"))
    assert _error(c, OPERATOR).message == "cluster not serving (waiting_for_workers): try again when it is"
    c.register("w1", memory_gb=0.08)
    c.ready("w0")
    c.ready("w1")
    c.register("w2", memory_gb=0.08)
    c.client_says(OPERATOR, M.DrainWorker(worker_id="nope"))
    assert _error(c, OPERATOR) == P.error(ErrorCode.NOT_FOUND, "worker 'nope' is not registered; live workers: "
                                                                    "w0, w1, w2", request_id="")
    c.client_says(OPERATOR, M.DrainWorker(worker_id="w2", request_id="spare"))
    (reply,) = c.outbox.to(OPERATOR, MsgType.DRAIN_WORKER_REPLY)
    assert (reply.worker_id, reply.plan_id, reply.requests_resumed, reply.drain_s) == ("w2", 1, 0, 0.0)
    assert c.outbox.to("w2", MsgType.SHUTDOWN) == [M.Shutdown(reason="drained")] and c.lifecycle.plan_id == 1
    c.client_says(OPERATOR, M.DrainWorker(worker_id="w2"))
    assert "has already left (drained or lost)" in _error(c, OPERATOR).message
    c.client_says(OPERATOR, M.DrainWorker(worker_id="w1"))
    err = _error(c, OPERATOR)
    assert err.code == ErrorCode.INVALID_REQUEST and err.message.startswith(
        "cannot drain worker w1: no plan fits the other workers")
    assert c.lifecycle.worker_drain is None and c.lifecycle.state is ClusterState.SERVING  # nothing changed


def test_shutdown_stops_admission_and_planning_then_answers_everyone():
    c = FakeCluster(workers={"count": 2})
    c.serve("w0", "w1")
    c.generate(CLIENT, "r1")
    assert c.lifecycle.begin_shutdown() and not c.lifecycle.begin_shutdown()  # a second signal: stop now
    assert c.coord.health().status == "draining"
    c.generate(CLIENT, "r2")
    assert _error(c, CLIENT).message == "cluster not serving: draining (shutting down): not accepting requests"
    c.client_says(OPERATOR, M.DrainWorker(worker_id="w1"))
    assert _error(c, OPERATOR).code == ErrorCode.UNAVAILABLE
    c.lifecycle.worker_lost(c.registry.workers["w1"], "no heartbeat for 9.0 s")
    assert c.lifecycle.state is ClusterState.RECOVERING and len(c.outbox.to("w0", MsgType.ASSIGN)) == 1  # no re-plan
    c.lifecycle.close()
    assert c.outbox.types("w0")[-1] is MsgType.SHUTDOWN and c.outbox.types("w1")[-1] is MsgType.SHUTDOWN
    assert _error(c, CLIENT) == P.error(ErrorCode.UNAVAILABLE, "coordinator shutting down", request_id="r1")
