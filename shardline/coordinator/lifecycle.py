"""The plan lifecycle: plan, assign, ready, serve; loss and recovery; an operator's drain of one
worker; the graceful shutdown.

    state                 left when                                                   for
    WAITING_FOR_WORKERS   `workers.count` workers registered and a plan fits          LOADING
                          `workers.count` workers registered and no layout fits       PLAN_FAILED
    PLAN_FAILED           a worker joins and a plan fits                              LOADING
    LOADING               every member sent READY                                     SERVING
                          a member is lost                                            RECOVERING
    SERVING               a member is lost, its data plane fails, or it is drained    RECOVERING
    RECOVERING            a plan fits the live workers: at once, one heartbeat        LOADING
                          timeout after a data-plane failure, or when a worker joins
                          `coordinator.recovery_timeout_s` passed (the requests end   DEGRADED
                          with ERROR UNAVAILABLE)
    DEGRADED              a worker joins and a plan fits                              LOADING

Recovery: the steps in flight are abandoned (step ids never repeat, so late results match
nothing); every unfinished sequence keeps its token history and is recomputed from it under the
next plan (`Scheduler.requeue`), so greedy output is the same as without the failure; each ASSIGN
carries a new store prefix, so the survivors leave the old torch.distributed group for a new one.

Draining one worker (DRAIN_WORKER, `shardline drain`): phase `quiesce`: no new steps on the current
plan and the steps in flight finish; phase `replan`: the plan is abandoned as after a loss, a new
one is made from the other live workers, the drained worker is sent SHUTDOWN, and the client is
answered once the new plan serves. Requests arriving meanwhile are queued, not refused.

Shutdown (SIGTERM/SIGINT): admission stops at once; running requests get
`coordinator.shutdown_timeout_s` to finish.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass

from shardline import __version__
from shardline.config import ClusterConfig
from shardline.coordinator.block_manager import BlockManager
from shardline.coordinator.dispatcher import Dispatcher
from shardline.coordinator.input_processor import RequestTable
from shardline.coordinator.outbox import Outbox
from shardline.coordinator.output_processor import OutputProcessor
from shardline.coordinator.planner import Plan, PlanError, StageAssignment, WorkerOffer, format_plan, plan_for_config
from shardline.coordinator.registry import WorkerInfo, WorkerRegistry
from shardline.coordinator.scheduler import RequestTooLarge, Scheduler
from shardline.coordinator.served_model import ServedModel
from shardline.coordinator.shard_server import ShardServer
from shardline import messages as M
from shardline.protocol import ErrorCode, ProtocolError

log = logging.getLogger("shardline.coordinator")


class ClusterState(enum.Enum):
    """Where the cluster stands; the value is the word users see (HEALTH `status`, STATS `state`)."""

    WAITING_FOR_WORKERS = "waiting_for_workers"  # fewer than workers.count registered, no plan yet
    LOADING = "loading"  # ASSIGN sent; waiting for every member's READY
    SERVING = "serving"
    PLAN_FAILED = "plan_failed"  # no layout fits the registered workers (no plan has been lost)
    RECOVERING = "recovering"  # the plan was lost; a new one must serve within recovery_timeout_s
    DEGRADED = "degraded"  # recovery timed out: requests are refused until a plan serves


_WITH_REASON = (ClusterState.PLAN_FAILED, ClusterState.RECOVERING, ClusterState.DEGRADED)


class DrainPhase(enum.Enum):
    QUIESCE = "quiesce"  # no new steps; the steps in flight finish
    REPLAN = "replan"  # the worker was told to SHUTDOWN; the plan without it loads


@dataclass
class WorkerDrain:
    """An operator's drain of one worker (DRAIN_WORKER), from acceptance to its answer.

    Phase QUIESCE lasts at most until `quiesce_deadline` (monotonic seconds); in phase REPLAN the
    client is answered when the new plan serves, or with ERROR if recovery fails."""

    worker_id: str
    client: bytes
    request_id: str
    started: float  # monotonic seconds
    quiesce_deadline: float
    phase: DrainPhase = DrainPhase.QUIESCE


class PlanLifecycle:
    """Makes plans over the registry's live workers and carries the cluster through the states of
    `ClusterState`; starts the dispatcher on each plan that serves with a new scheduler."""

    def __init__(self, config: ClusterConfig, model: ServedModel, registry: WorkerRegistry, dispatcher: Dispatcher,
                 requests: RequestTable, output: OutputProcessor, outbox: Outbox, shard_server: ShardServer):
        self.config = config
        self.model = model
        self.registry = registry
        self.dispatcher = dispatcher
        self.requests = requests
        self.output = output
        self.outbox = outbox
        self.shard_server = shard_server
        self.state = ClusterState.WAITING_FOR_WORKERS
        self.reason = ""  # why PLAN_FAILED, RECOVERING or DEGRADED
        self.plan: Plan | None = None
        self.plan_id = 0  # counts plans (ASSIGN, READY, ERROR, DRAIN_WORKER_REPLY `plan_id`)
        self.abandoned_members: set[str] = set()  # workers of the last abandoned plan (see worker_lost)
        self.recovery_deadline: float | None = None  # a plan was lost: serve again before this
        self.replan_at: float | None = None  # after a reported data-plane failure: re-plan no sooner
        self.worker_drain: WorkerDrain | None = None  # DRAIN_WORKER in progress (at most one)
        self.shutting_down = False  # SIGTERM/SIGINT: admission stopped, running requests finishing
        self.shutdown_deadline: float | None = None

    # ---- what users see ------------------------------------------------------------------
    @property
    def status(self) -> str:
        """The state as STATS `state`, errors and logs show it: its value, then ": <reason>" for
        plan_failed, recovering and degraded."""
        return f"{self.state.value}: {self.reason}" if self.state in _WITH_REASON else self.state.value

    @property
    def health_status(self) -> str:
        """HEALTH `status`: "ok" while serving, "draining" during a shutdown (the word clients
        and the gateway know), else `status`."""
        if self.shutting_down:
            return "draining"
        return "ok" if self.state is ClusterState.SERVING else self.status

    def refusal(self) -> str | None:
        """Why a new request is refused now, or None. Only a serving plan admits requests, and,
        during a worker drain, the plan loading without it (they queue for it); a shutdown
        admits none."""
        if self.shutting_down:
            return "draining (shutting down): not accepting requests"
        if self.state is not ClusterState.SERVING and self.worker_drain is None:
            return self.status
        return None

    @property
    def dispatching(self) -> bool:
        """Steps may be dispatched: a plan serves and no worker drain is quiescing it."""
        return self.state is ClusterState.SERVING and (
            self.worker_drain is None or self.worker_drain.phase is not DrainPhase.QUIESCE)

    def is_sampler(self, w: WorkerInfo) -> bool:
        """Whether `w` samples for the serving plan (the last stage's TP rank 0; assignments are
        stage-major, TP rank minor): only its STEP_RESULTs count."""
        if self.plan is None or self.state is not ClusterState.SERVING:
            return False
        return w.worker_id == self.plan.assignments[-self.plan.tp_size].worker_id

    def placement(self) -> dict[str, StageAssignment]:
        """The plan's assignment of each member, by worker id ({} without a plan)."""
        return {a.worker_id: a for a in self.plan.assignments} if self.plan is not None else {}

    def shard_of(self, worker_id: str) -> tuple[int, int, bool, bool, int, int] | None:
        """The worker's shard for a shard transfer: (layer_start, layer_end, is_first_stage,
        is_last_stage, tp_rank, tp_size), or None outside the plan."""
        a = self.placement().get(worker_id)
        if a is None:
            return None
        return a.layer_start, a.layer_end, a.stage == 0, a.stage == self.plan.pp_size - 1, a.tp_rank, self.plan.tp_size

    # ---- workers join, load, leave -------------------------------------------------------
    def on_register(self, identity: bytes, body: M.Register) -> None:
        """REGISTER: add the worker (`WorkerRegistry.admit`) and plan if it completes the cluster.

        Raises:
            ProtocolError: the registration is refused (the code and message say why).
        """
        w, restarted = self.registry.admit(identity, body)
        if restarted is not None:
            self.worker_lost(restarted, "registered again (the process restarted)")
        self.registry.add(w)
        self.maybe_plan()

    def on_ready(self, identity: bytes, body: M.Ready) -> None:
        """READY: a member loaded its shard; when every member has, the plan serves."""
        w = self.registry.workers.get(body.worker_id)
        if w is None or w.identity != identity or body.plan_id not in (None, self.plan_id):
            return  # a stranger's, or the READY of a plan that has since been replaced
        self.registry.on_ready(w, body)
        self.shard_server.done(w.worker_id)
        if self.state is ClusterState.LOADING and all(
                self.registry.workers[a.worker_id].ready for a in self.plan.assignments):
            self._serve()

    def worker_lost(self, w: WorkerInfo, why: str) -> None:
        """A worker died, froze, was cut off or left: forget a spare; for a member of the plan,
        abandon the plan and recover (`_plan_broken`)."""
        if not w.alive:
            return
        self.registry.mark_lost(w, why)
        if self.plan is not None and any(a.worker_id == w.worker_id for a in self.plan.assignments):
            self._plan_broken(f"worker {w.worker_id} lost: {why}")
        elif self.plan is None and w.worker_id in self.abandoned_members:
            # its plan broke first (a peer reported the data-plane failure before the heartbeats
            # ran out): it stays listed as lost, as when liveness finds it first
            pass
        else:  # a spare, or one that never got a place: forget it
            self.registry.forget(w)

    def on_data_plane_error(self, w: WorkerInfo, body: M.Error) -> None:
        """ERROR from a worker: its data plane failed, so a peer may be dead; liveness tells which."""
        if body.plan_id not in (None, self.plan_id):  # a survivor's late report on a plan already replaced
            log.warning("worker %s: data plane of plan %s failed (now %d): %s", w.worker_id,
                        body.plan_id, self.plan_id, body.message[:500])
            return
        self._plan_broken(f"worker {w.worker_id}: {body.message[:500]}", settle=True)

    def tick(self, now: float) -> None:
        """Once a heartbeat interval: heartbeat the workers and declare the silent ones lost;
        re-plan when a settling time has passed; when recovery has run out of time, end every
        request with ERROR UNAVAILABLE and become DEGRADED."""
        for w, why in self.registry.heartbeat(now):
            self.worker_lost(w, why)
        if self.replan_at is not None and now >= self.replan_at:
            self.replan_at = None
            self.maybe_plan()
        if self.recovery_deadline is not None and now > self.recovery_deadline and self.state is not ClusterState.SERVING:
            why = self.status
            timeout_s = self.config.coordinator.recovery_timeout_s
            log.error("no plan within coordinator.recovery_timeout_s=%.0f s; ending %d requests",
                      timeout_s, self.requests.num_requests)
            self.output.finish_all(self.dispatcher.scheduler, ErrorCode.UNAVAILABLE,
                                   f"no worker plan within {timeout_s:.0f} s ({why})")
            self.recovery_deadline = None
            self._end_worker_drain(ErrorCode.UNAVAILABLE, f"worker drained, but no plan serves without it ({why})")
            if self.state is not ClusterState.LOADING:
                self._set(ClusterState.DEGRADED, self.reason if self.state is ClusterState.RECOVERING else why)

    # ---- plans ---------------------------------------------------------------------------
    def maybe_plan(self, fewer: bool = False) -> None:
        """Plan when there is something to plan for: the first time `workers.count` workers are
        registered, or after a loss (recovering/degraded) whenever the live workers may fit.
        `fewer`: re-plan onto fewer workers even without `replan_on_fewer_workers` (a drain)."""
        if self.state in (ClusterState.SERVING, ClusterState.LOADING) or self.shutting_down:
            return
        if self.replan_at is not None:
            if time.monotonic() < self.replan_at:
                return
            self.replan_at = None
        alive = self.registry.num_alive
        if alive >= self.config.workers.count or (
                self.state is not ClusterState.WAITING_FOR_WORKERS and alive
                and (fewer or self.config.coordinator.replan_on_fewer_workers)):
            self._assign()

    def make_plan(self, exclude: str | None = None) -> Plan:
        """The planner's layout over the live workers (all but `exclude`): the first
        `workers.count` by id, or all of them when fewer (fewer stages, the same TP size).

        Raises:
            PlanError: no layout fits those workers (the message says why).
        """
        cfg = self.config
        workers = self.registry.workers
        ids = sorted(w for w in self.registry.order if workers[w].alive and w != exclude)[: cfg.workers.count]
        if len(ids) < cfg.workers.count:  # re-plan onto the survivors: fewer stages, same TP size
            tp = cfg.parallel.tensor_parallel
            if isinstance(tp, int):
                ids = ids[: len(ids) // tp * tp]
            cfg = cfg.model_copy(update={
                "workers": cfg.workers.model_copy(update={"count": max(1, len(ids))}),
                "parallel": cfg.parallel.model_copy(update={"pipeline_parallel": None if isinstance(tp, int) else "auto"})})
        offers = [WorkerOffer(w, workers[w].host, workers[w].memory_bytes, workers[w].device, workers[w].speed)
                  for w in ids]
        if not offers:
            raise PlanError(f"no live workers fit tensor_parallel={cfg.parallel.tensor_parallel}")
        return plan_for_config(cfg, self.model.spec, self.model.sizes, offers)

    def _assign(self) -> None:
        """Make a plan and send each member its ASSIGN; LOADING until every READY."""
        try:
            plan = self.make_plan()
        except PlanError as exc:
            log.error("no plan fits: %s", exc)
            if self.recovery_deadline is None:
                self._set(ClusterState.PLAN_FAILED, str(exc))
            else:
                self._set(ClusterState.RECOVERING, f"no plan fits the live workers ({exc})")
            return
        for w in self.registry.workers.values():
            w.ready = False
        self.plan = plan
        self.plan_id += 1
        log.info("plan %d:\n%s", self.plan_id, format_plan(plan))
        unreachable = []
        for a in plan.assignments:
            w = self.registry.workers[a.worker_id]
            if not self.outbox.to_worker(w, self._assign_body(plan, a)):
                unreachable.append(w)
        self._set(ClusterState.LOADING)
        for w in unreachable:  # its connection is gone: lost (this re-plans without it)
            self.worker_lost(w, "unreachable (connection closed)")

    def _assign_body(self, plan: Plan, a: StageAssignment) -> M.Assign:
        """The ASSIGN of one member (docs/protocol.md, ASSIGN)."""
        cfg, c, m = self.config, self.config.coordinator, self.model
        return M.Assign(
            plan_id=self.plan_id, rank=a.rank, world_size=plan.world_size, stage=a.stage, pp_size=plan.pp_size,
            tp_rank=a.tp_rank, tp_size=plan.tp_size, layer_start=a.layer_start, layer_end=a.layer_end,
            spec=m.spec.to_dict(), num_kv_blocks=plan.num_kv_blocks, block_size=plan.block_size,
            max_positions=m.max_model_len, store_host=c.advertise_host or c.host, store_port=c.rendezvous_port,
            store_prefix=f"plan{self.plan_id}/", data_plane_timeout_s=cfg.heartbeat.data_plane_timeout_s,
            heartbeat_interval_s=cfg.heartbeat.interval_s, heartbeat_misses=cfg.heartbeat.misses,
            quantization=cfg.quantization, quantization_group_size=cfg.quantization_group_size, dtype=cfg.dtype,
            gemm_weights=cfg.workers.gemm_weights, kv_cache_dtype=cfg.workers.kv_cache_dtype,
            token_stream=self._wants_async_scheduling(plan) and plan.pp_size > 1,
            model_path=m.path, model=cfg.model, model_digest=m.digest, version=__version__)

    def _wants_async_scheduling(self, plan: Plan) -> bool:
        """Async scheduling for this plan: asked for, and one rank per stage (the last stage's
        sampler hands its tokens to the first stage's one rank)."""
        return self.config.scheduler.async_scheduling and plan.tp_size == 1

    def _serve(self) -> None:
        """Every member is ready: a new scheduler (step ids carried on from the last one) takes
        the unfinished sequences, and the dispatcher starts on the plan."""
        cfg, plan = self.config.scheduler, self.plan
        members = [self.registry.workers[a.worker_id] for a in plan.assignments]
        micro_batches = cfg.pipeline_micro_batches or plan.pp_size
        # async scheduling: each micro-batch also has its continuation in flight
        lookahead = self._wants_async_scheduling(plan) and all(w.async_scheduling for w in members)
        scheduler = Scheduler(BlockManager(plan.num_kv_blocks, plan.block_size, cfg.enable_prefix_caching),
                              cfg.max_num_seqs, cfg.max_num_batched_tokens, self.model.max_model_len,
                              micro_batches, lookahead=lookahead)
        scheduler.eos_token_id = self.model.spec.eos_token_id
        if self.dispatcher.scheduler is not None:  # step ids stay unique across plans (a late result never matches)
            scheduler.continue_from(self.dispatcher.scheduler)
        self.dispatcher.start(scheduler, members, micro_batches * (2 if lookahead else 1))
        self._set(ClusterState.SERVING)
        resumed = self._resume_requests(scheduler)
        log.info("serving %s: %d KV blocks of %d tokens, %d micro-batches%s", self.model.model_id,
                 plan.num_kv_blocks, plan.block_size, micro_batches, ", async scheduling" if lookahead else "")
        self._end_worker_drain(resumed=resumed)

    def _plan_broken(self, why: str, settle: bool = False, fewer: bool = False) -> None:
        """The current plan cannot go on (a member lost, a data-plane failure, a drain): abandon
        its steps in flight, become RECOVERING (with a deadline, `coordinator.recovery_timeout_s`,
        if not already recovering) and re-plan from the live workers at once if they may fit.

        `settle`: a worker reported a data-plane failure, so some peer may be dead but not yet
        found so: re-plan only after one heartbeat timeout, when liveness has told which.
        `fewer`: re-plan onto fewer workers even without `replan_on_fewer_workers` (a drain).
        """
        if self.plan is None and self.state is ClusterState.WAITING_FOR_WORKERS:
            return
        d = self.worker_drain
        if d is not None and d.phase is DrainPhase.QUIESCE:
            self._end_worker_drain(ErrorCode.UNAVAILABLE, f"drain of worker {d.worker_id} abandoned: the plan "
                                                          f"broke ({why})")
        hb = self.config.heartbeat
        if settle:
            self.replan_at = time.monotonic() + hb.interval_s * (hb.misses + 1)
        # an operator's drain (`fewer`) is not a failure
        log.log(logging.INFO if fewer else logging.ERROR, "plan %d abandoned: %s", self.plan_id, why)
        self.dispatcher.abandon()
        if self.plan is not None:
            self.abandoned_members = {a.worker_id for a in self.plan.assignments}
        self.plan = None
        for w in self.registry.workers.values():
            w.ready = False
        if self.recovery_deadline is None:
            self.recovery_deadline = time.monotonic() + self.config.coordinator.recovery_timeout_s
        self._set(ClusterState.RECOVERING, why)
        self.maybe_plan(fewer=fewer)

    def _resume_requests(self, scheduler: Scheduler) -> int:
        """Under a new plan: requeue every unfinished sequence, to be recomputed from its token
        history (nothing the client saw is repeated). Returns the number of sequences requeued."""
        self.recovery_deadline = None
        seqs = self.requests.unfinished()
        for seq in seqs:
            try:
                scheduler.requeue(seq)
            except RequestTooLarge as exc:
                self.output.finish(seq.seq_id, "error", scheduler, ErrorCode.UNAVAILABLE, f"after re-planning: {exc}")
        if seqs:
            log.info("resuming %d sequences under plan %d (recomputed from their tokens)", len(seqs), self.plan_id)
        return len(seqs)

    def _set(self, state: ClusterState, reason: str = "") -> None:
        self.state, self.reason = state, reason

    # ---- draining one worker -------------------------------------------------------------
    def on_drain_worker(self, client: bytes, request_id: str, body: M.DrainWorker) -> None:
        """DRAIN_WORKER: check that the worker can go, then start the drain (`WorkerDrain`); the
        answer comes when the new plan serves (`_end_worker_drain`). A spare (no place in the
        plan) is shut down and answered at once.

        Raises:
            ProtocolError: NOT_FOUND for an unknown or no longer live worker; UNAVAILABLE when the
                cluster is not serving, shutting down, or another drain is in progress;
                INVALID_REQUEST when no plan fits the other workers (nothing is changed).
        """
        wid = body.worker_id
        w = self.registry.workers.get(wid)
        if w is None or not w.alive:
            live = ", ".join(self.registry.alive_ids()) or "none"
            why = "is not registered" if w is None else "has already left (drained or lost)"
            raise ProtocolError(f"worker {wid!r} {why}; live workers: {live}", ErrorCode.NOT_FOUND)
        if self.shutting_down:
            raise ProtocolError("coordinator is draining (shutting down)", ErrorCode.UNAVAILABLE)
        if self.worker_drain is not None:
            raise ProtocolError(f"a drain of worker {self.worker_drain.worker_id} is in progress", ErrorCode.UNAVAILABLE)
        if self.state is not ClusterState.SERVING:
            raise ProtocolError(f"cluster not serving ({self.status}): try again when it is", ErrorCode.UNAVAILABLE)
        if wid not in self.placement():  # a spare: nothing runs on it
            self.registry.mark_drained(w, time.monotonic())
            self.outbox.to_worker(w, M.Shutdown(reason="drained"))
            log.info("worker %s (a spare) drained", wid)
            self._reply_drained(client, request_id, wid, 0, 0.0)
            return
        try:
            self.make_plan(exclude=wid)
        except PlanError as exc:
            raise ProtocolError(f"cannot drain worker {wid}: no plan fits the other workers ({exc})",
                                ErrorCode.INVALID_REQUEST) from None
        now = time.monotonic()
        self.worker_drain = WorkerDrain(wid, client, request_id, now, now + self.config.heartbeat.data_plane_timeout_s)
        log.info("draining worker %s: no new steps; %d in flight finish, then re-plan without it",
                 wid, self.dispatcher.num_in_flight)

    def advance_worker_drain(self, now: float) -> None:
        """Phase QUIESCE -> REPLAN once no step is in flight (or the quiesce deadline passed: the
        steps left are abandoned and recomputed): mark the worker drained, abandon the plan and
        re-plan without it, then tell it to SHUTDOWN. Its data-plane peers are idle by then, so
        its leaving breaks no step of theirs."""
        d = self.worker_drain
        in_flight = self.dispatcher.num_in_flight
        if d is None or d.phase is not DrainPhase.QUIESCE or (in_flight and now < d.quiesce_deadline):
            return
        if in_flight:
            log.warning("drain of worker %s: %d steps still in flight after %.0f s; abandoning them", d.worker_id,
                        in_flight, self.config.heartbeat.data_plane_timeout_s)
        w = self.registry.workers[d.worker_id]
        self.registry.mark_drained(w, now)
        d.phase = DrainPhase.REPLAN
        self._plan_broken(f"worker {d.worker_id} drained", fewer=True)
        self.outbox.to_worker(w, M.Shutdown(reason="drained"))

    def _end_worker_drain(self, code: ErrorCode | None = None, message: str = "", resumed: int = 0) -> None:
        """Answer the drain in progress, if any: DRAIN_WORKER_REPLY when the new plan serves
        (`code` None), else ERROR `code` with `message`."""
        d = self.worker_drain
        if d is None or (code is None and d.phase is not DrainPhase.REPLAN):
            return
        self.worker_drain = None
        if code is not None:
            log.error("drain of worker %s failed: %s", d.worker_id, message)
            self.outbox.error_to_client(d.client, d.request_id, code, message)
            return
        drain_s = time.monotonic() - d.started
        log.info("worker %s drained in %.1f s; %d sequences resumed under plan %d", d.worker_id,
                 drain_s, resumed, self.plan_id)
        self._reply_drained(d.client, d.request_id, d.worker_id, resumed, drain_s)

    def _reply_drained(self, client: bytes, request_id: str, worker_id: str, resumed: int, drain_s: float) -> None:
        self.outbox.to_client(client, M.DrainWorkerReply(
            worker_id=worker_id, plan_id=self.plan_id, plan=self.plan.to_dict(), requests_resumed=resumed,
            drain_s=drain_s, request_id=request_id))

    # ---- shutdown ------------------------------------------------------------------------
    def begin_shutdown(self) -> bool:
        """Graceful shutdown (SIGTERM/SIGINT): refuse new requests and plans at once; running
        requests get `coordinator.shutdown_timeout_s` to finish. Returns False when a shutdown
        was already under way (a second signal: the caller stops at once)."""
        if self.shutting_down:
            return False
        timeout_s = self.config.coordinator.shutdown_timeout_s
        self.shutting_down = True
        self.shutdown_deadline = time.monotonic() + timeout_s
        log.info("shutting down: admission stopped; %d requests running (at most %.0f s)",
                 self.requests.num_requests, timeout_s)
        return True

    def close(self) -> None:
        """The coordinator stops: every worker is told to SHUTDOWN, every request and the drain in
        progress are answered with ERROR UNAVAILABLE."""
        for w in self.registry.workers.values():
            self.outbox.to_worker(w, M.Shutdown())
        for req in list(self.requests.by_seq.values()):
            self.outbox.error_to_client(req.client, req.request_id, ErrorCode.UNAVAILABLE, "coordinator shutting down")
        self._end_worker_drain(ErrorCode.UNAVAILABLE, "coordinator shutting down")
