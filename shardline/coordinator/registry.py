"""The worker registry: who registered, who is alive, and what each worker reports.

A worker joins with REGISTER (checked: shardline version, model digest, worker id not in use by a
live worker, room among `workers.count` + `coordinator.max_spare_workers`, price and speed).
Liveness: every message a worker sends counts as a heartbeat; a worker silent for
`heartbeat.interval_s x heartbeat.misses` is lost. Workers heartbeat from a socket of their own
(routing id `<worker id>#hb`), so a long load or a blocked data-plane receive does not silence
them. A lost worker that speaks again is told to SHUTDOWN (it registers again as a new
incarnation). What happens to the plan when a worker is lost is the plan lifecycle's business
(`lifecycle.py`); this module only keeps the table and the per-worker figures (heartbeat age,
busy fraction, memory, price and cost).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from shardline import __version__
from shardline.config import ClusterConfig
from shardline.coordinator.metrics import CoordinatorMetrics, RateWindow
from shardline.coordinator.outbox import Outbox
from shardline.coordinator.planner import StageAssignment
from shardline.coordinator.served_model import ServedModel
from shardline import messages as M
from shardline.protocol import ErrorCode, ProtocolError

log = logging.getLogger("shardline.coordinator")

MAX_STEP_TIMES = 4096  # step durations taken from one heartbeat (the worker keeps no more)
HEARTBEAT_ID_SUFFIX = b"#hb"  # a worker's heartbeat socket's routing id: its worker id + this


@dataclass
class WorkerInfo:
    worker_id: str
    identity: bytes  # routing id of the worker's main socket
    host: str
    device: str
    memory_bytes: int
    incarnation: str
    pid: int
    last_heartbeat: float = field(default_factory=time.monotonic)
    ready: bool = False
    alive: bool = True
    weight_bytes: int = 0
    step_time_s: float = 0.0
    rss_bytes: int = 0
    kv_bytes: int = 0
    async_scheduling: bool = False  # READY said: can take continuations
    num_steps: int = 0
    busy_s: float = 0.0  # cumulative seconds in forward passes, as the worker reports it
    busy_window: RateWindow | None = None  # busy_s over coordinator time: the busy fraction
    price_per_hour: float | None = None
    registered_at: float = field(default_factory=time.monotonic)
    speed: float = 1.0  # relative speed the worker declared (planner input)
    comm: M.CommStats | None = None  # the worker's cumulative data-plane times, from its last HEARTBEAT
    lost_at: float | None = None
    drained: bool = False  # left by an operator's drain (not a failure)
    shutdown_sent_at: float = -math.inf  # when a lost worker that spoke again was last told to leave


class WorkerRegistry:
    """The registered workers, in registration order, by worker id and by routing id."""

    def __init__(self, config: ClusterConfig, model: ServedModel, outbox: Outbox, metrics: CoordinatorMetrics):
        self.config = config
        self.model = model
        self.outbox = outbox
        self.metrics = metrics
        self.workers: dict[str, WorkerInfo] = {}
        self._by_identity: dict[bytes, WorkerInfo] = {}
        self.order: list[str] = []  # worker ids in registration order

    # ---- joining -------------------------------------------------------------------------
    def admit(self, identity: bytes, body: M.Register) -> tuple[WorkerInfo, WorkerInfo | None]:
        """Check a REGISTER and build the worker it describes (not added yet: see `add`).
        Returns it, and the live worker of the same id and routing id if there is one: that
        worker's process restarted, and the caller declares it lost before adding the new one.

        Raises:
            ProtocolError: VERSION_MISMATCH (another shardline major.minor), MODEL_MISMATCH
                (another model digest), INVALID_REQUEST (the id is used by a live worker on another
                connection), UNAVAILABLE (no room for one more spare), BAD_FRAME (a price or speed
                out of range).
        """
        wid, version = body.worker_id, body.version
        if version.split(".")[:2] != __version__.split(".")[:2]:
            raise ProtocolError(f"worker {wid} runs shardline {version}, coordinator runs {__version__}",
                                ErrorCode.VERSION_MISMATCH)
        theirs = body.model_digest
        m = self.model
        if theirs is not None and theirs != m.digest:
            msg = (f"model mismatch: worker {wid} has {body.model_path or '?'} (sha256 {theirs[:16]}), "
                   f"coordinator serves {m.model_id} {m.path} (sha256 {m.digest[:16]})")
            log.error("refusing worker %s: %s", wid, msg)
            raise ProtocolError(msg, ErrorCode.MODEL_MISMATCH)
        restarted = self.workers.get(wid)
        if restarted is not None and not restarted.alive:
            restarted = None
        if restarted is not None and restarted.identity != identity:
            raise ProtocolError(f"worker id {wid!r} is in use by a live worker", ErrorCode.INVALID_REQUEST)
        alive = self.num_alive - (restarted is not None)
        cfg = self.config
        if alive >= cfg.workers.count + cfg.coordinator.max_spare_workers:
            raise ProtocolError(f"cluster has {alive} workers ({cfg.workers.count} planned and "
                                f"{cfg.coordinator.max_spare_workers} spares); worker {wid} not needed",
                                ErrorCode.UNAVAILABLE)
        price, speed = body.price_per_hour, body.speed
        if price is not None and not 0 <= price < math.inf:
            raise ProtocolError(f"REGISTER: price_per_hour={price!r} must be a number >= 0", ErrorCode.BAD_FRAME)
        if not 0 < speed < math.inf:
            raise ProtocolError(f"REGISTER: speed={speed!r} must be a number > 0", ErrorCode.BAD_FRAME)
        w = WorkerInfo(wid, identity, body.host, body.device, body.memory_bytes, body.incarnation, body.pid)
        w.price_per_hour = cfg.workers.price_per_hour if price is None else price
        w.busy_window = RateWindow(cfg.metrics.window_s)
        w.speed = speed
        return w, restarted

    def add(self, w: WorkerInfo) -> None:
        """Record a worker `admit` accepted (replacing a lost one of the same id)."""
        if w.worker_id not in self.workers:
            self.order.append(w.worker_id)
        self.workers[w.worker_id] = w
        self._by_identity[w.identity] = w
        log.info("worker %s registered from %s (%s, %.1f GiB) [%d/%d]", w.worker_id, w.host, w.device,
                 w.memory_bytes / 2**30, self.num_alive, self.config.workers.count)

    def on_ready(self, w: WorkerInfo, body: M.Ready) -> None:
        """READY: the worker loaded its shard; record what it reported."""
        w.ready = True
        w.weight_bytes, w.rss_bytes, w.kv_bytes = body.weight_bytes, body.rss_bytes, body.kv_bytes
        w.async_scheduling = body.async_scheduling
        log.info("worker %s ready (%.0f MB weights, loaded in %.1f s)", w.worker_id, w.weight_bytes / 1e6,
                 body.load_s)

    # ---- who is speaking -----------------------------------------------------------------
    def sender(self, identity: bytes, body: M.Message) -> WorkerInfo | None:
        """The live worker a worker-plane message comes from, or None. Heartbeats come from each
        worker's heartbeat socket (routing id `<worker id>#hb`) and name the worker and its
        incarnation; everything else from the worker's main socket. A worker declared lost that
        speaks again (it was frozen, cut off, or stalled) is sent SHUTDOWN {reason: lost}: it
        drops its state and registers again as a new incarnation, so it can rejoin a plan (a
        drained one gets {reason: drained} and exits)."""
        if isinstance(body, M.Heartbeat) and body.worker_id is not None:
            w = self.workers.get(body.worker_id)
            if w is None or identity not in (w.identity, w.identity + HEARTBEAT_ID_SUFFIX):
                return None
            if body.incarnation is not None and body.incarnation != w.incarnation:
                return None
        else:
            w = self._by_identity.get(identity)
        if w is not None and not w.alive:
            now = time.monotonic()
            if now - w.shutdown_sent_at >= self.config.heartbeat.interval_s:  # not one per queued heartbeat
                w.shutdown_sent_at = now
                self.outbox.to_worker(w, M.Shutdown(reason="drained" if w.drained else "lost"))
            return None
        if w is not None:
            w.last_heartbeat = time.monotonic()  # any message shows the worker is alive
        return w

    def is_early_heartbeat(self, identity: bytes, body: M.Message) -> bool:
        """A HEARTBEAT from the heartbeat socket of the worker it names (routing id `<worker
        id>#hb`), which has not registered (yet). Nothing reads replies on that socket, so it is
        dropped quietly; a heartbeat from any other identity still gets an ERROR."""
        if not isinstance(body, M.Heartbeat) or body.worker_id is None:
            return False
        return body.worker_id not in self.workers and identity == body.worker_id.encode() + HEARTBEAT_ID_SUFFIX

    def is_lost(self, identity: bytes, body: M.Message) -> bool:
        """Whether a message comes from a worker declared lost (its main or heartbeat socket)."""
        w = self._by_identity.get(identity)
        if (w is None and identity.endswith(HEARTBEAT_ID_SUFFIX) and isinstance(body, M.Heartbeat)
                and body.worker_id is not None):
            w = self.workers.get(body.worker_id)
            if w is not None and identity != w.identity + HEARTBEAT_ID_SUFFIX:
                w = None
        return w is not None and not w.alive

    # ---- liveness ------------------------------------------------------------------------
    def heartbeat(self, now: float) -> list[tuple[WorkerInfo, str]]:
        """Send HEARTBEAT to every live worker; returns the live workers silent for longer than
        `heartbeat.interval_s x heartbeat.misses`, with why (the caller declares them lost)."""
        cfg = self.config.heartbeat
        silent = []
        for w in list(self.workers.values()):
            if not w.alive:
                continue
            self.outbox.to_worker(w, M.Heartbeat(time=time.time()))
            if now - w.last_heartbeat > cfg.interval_s * cfg.misses:
                silent.append((w, f"no heartbeat for {now - w.last_heartbeat:.1f} s"))
        return silent

    def on_heartbeat(self, w: WorkerInfo, body: M.Heartbeat, stage: int | None) -> None:
        """A HEARTBEAT's report: step time, memory, data-plane times, and utilization: the
        cumulative forward-pass seconds `busy_s` and the forward-pass durations `step_times_s`
        since the previous heartbeat (`stage`: the worker's stage in the plan, for the metrics)."""
        w.step_time_s, w.rss_bytes, w.busy_s = body.step_time_s, body.rss_bytes, body.busy_s
        times = body.step_times_s
        if len(times) > MAX_STEP_TIMES:
            log.warning("worker %s reported %d step times; keeping the last %d", w.worker_id, len(times), MAX_STEP_TIMES)
            times = times[-MAX_STEP_TIMES:]
        if body.num_steps is not None:
            w.num_steps = body.num_steps
        w.busy_window.add(time.monotonic(), w.busy_s)
        self.metrics.on_worker_steps(w.worker_id, stage, w.busy_s, times)
        if body.comm is not None:
            w.comm = body.comm

    def mark_lost(self, w: WorkerInfo, why: str) -> None:
        """A live worker died, froze, was cut off or left: it is no longer alive nor ready."""
        assert w.alive, w.worker_id
        w.alive = w.ready = False
        w.lost_at = time.monotonic()
        self.metrics.on_worker_failure()
        log.error("worker %s lost: %s", w.worker_id, why)

    def mark_drained(self, w: WorkerInfo, now: float) -> None:
        """An operator's drain took `w` out of service (not a failure): it stays listed as drained."""
        w.alive = w.ready = False
        w.drained, w.lost_at = True, now

    def forget(self, w: WorkerInfo) -> None:
        """Drop a worker from the table (a lost spare, or one that never got a place)."""
        self.workers.pop(w.worker_id, None)
        self._by_identity.pop(w.identity, None)
        if w.worker_id in self.order:
            self.order.remove(w.worker_id)

    @property
    def num_alive(self) -> int:
        return sum(1 for w in self.workers.values() if w.alive)

    def alive_ids(self) -> list[str]:
        """Ids of the live workers, sorted."""
        return sorted(w.worker_id for w in self.workers.values() if w.alive)

    @property
    def num_drained(self) -> int:
        """Workers an operator drained: the cluster expects one fewer per drained worker."""
        return sum(1 for w in self.workers.values() if w.drained and not w.alive)

    # ---- figures -------------------------------------------------------------------------
    def stats(self, placement: dict[str, StageAssignment]) -> list[M.WorkerStats]:
        """One entry per registered worker for STATS_REPLY: liveness, memory, step time, its place
        in the plan (`placement`: assignment by worker id), busy fraction (forward-pass seconds /
        wall seconds over `metrics.window_s`) and hourly price."""
        now = time.monotonic()
        out = []
        for w in self.workers.values():
            a = placement.get(w.worker_id)
            busy = w.busy_window.rate() if w.busy_window is not None else None
            out.append(M.WorkerStats(
                worker_id=w.worker_id, host=w.host, pid=w.pid, alive=w.alive, ready=w.ready, drained=w.drained,
                heartbeat_age_s=now - w.last_heartbeat, step_time_s=w.step_time_s, weight_bytes=w.weight_bytes,
                rss_bytes=w.rss_bytes, kv_bytes=w.kv_bytes, speed=w.speed, comm=w.comm,
                stage=a.stage if a else None, layer_start=a.layer_start if a else None,
                layer_end=a.layer_end if a else None, tp_rank=a.tp_rank if a else None,
                num_steps=w.num_steps, busy_s=w.busy_s,
                # clipped: heartbeats arrive with jitter, so a window may see slightly more than 1
                busy_fraction=None if busy is None else min(1.0, max(0.0, busy)), price_per_hour=w.price_per_hour))
        return out

    def cost(self, generation_tokens_total: int, tokens_per_s: float | None) -> dict:
        """The cluster's cost for STATS_REPLY, all None when no worker has a price: `price_per_hour`
        (live workers, summed), `cost_total` (every worker's price x its time registered, until
        it was lost), `cost_per_million_tokens` (since the workers registered) and
        `recent_cost_per_million_tokens` (at the recent generation throughput `tokens_per_s`)."""
        now = time.monotonic()
        cost, priced = 0.0, False
        for w in self.workers.values():
            if w.price_per_hour is not None:
                priced = True
                cost += w.price_per_hour * ((w.lost_at or now) - w.registered_at) / 3600.0
        price = sum(w.price_per_hour or 0.0 for w in self.workers.values() if w.alive)
        if not priced:
            return {"price_per_hour": None, "cost_total": None, "cost_per_million_tokens": None,
                    "recent_cost_per_million_tokens": None}
        return {"price_per_hour": price, "cost_total": cost,
                "cost_per_million_tokens": cost / generation_tokens_total * 1e6 if generation_tokens_total > 0 else None,
                "recent_cost_per_million_tokens": price / (tokens_per_s * 3600.0) * 1e6 if tokens_per_s else None}
