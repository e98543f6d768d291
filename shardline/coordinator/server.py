"""Coordinator process: client plane, worker plane, rendezvous, and the serving loop.

Lifecycle: bind sockets and the rendezvous store -> wait for `workers.count` REGISTERs -> plan ->
ASSIGN each worker -> wait for every READY -> serve. The busy loop:

    1. read the inbox (client requests, worker results and heartbeats)
    2. schedule: while fewer than `pipeline_micro_batches` steps are in flight (twice that with
       async scheduling: each micro-batch's continuation too), ask the scheduler
    3. dispatch each new step plan to every worker
    4. collect: a STEP_RESULT from the last stage completes a step (arrives via step 1)
    5. emit text deltas / DONE messages, and check worker liveness (and advance a worker drain)

Draining one worker (DRAIN_WORKER, `shardline drain`): no new steps are dispatched on the current
plan and the steps in flight finish; then the plan is abandoned as after a loss, a new one is made
from the other live workers (shards reload, unfinished sequences are recomputed from their
tokens), the drained worker is sent SHUTDOWN, and the client is answered once the new plan serves.
Requests arriving meanwhile are queued, not refused.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass, field

import zmq

from shardline.coordinator.block_manager import BlockManager
from shardline.coordinator.metrics import CoordinatorMetrics, RateWindow
from shardline.coordinator.planner import (ModelSizes, Plan, PlanError, WorkerOffer, check_parallel, format_plan,
                                 plan_for_config)
from shardline.coordinator.shard_server import ShardError, ShardServer
from shardline.coordinator.scheduler import RequestTooLarge, Scheduler, SchedulerOutput
from shardline.coordinator.sequence import Sequence
from shardline.coordinator.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from shardline import __version__
from shardline import protocol as P
from shardline.config import ClusterConfig
from shardline.model_file import ModelError, read_model_spec, resolve_model_path
from shardline.protocol import ErrorCode, MsgType, ProtocolError
from shardline.sampling import SamplingParams, check_num_logprobs
from shardline.security import (CLIENT_DOMAIN, WORKER_DOMAIN, SecurityError, check_bind, configure_curve_server,
                                is_loopback, load_keypair, load_public_keys, start_authenticator)

log = logging.getLogger("shardline.coordinator")

METRICS_INTERVAL_S = 0.5  # how often the serving loop refreshes gauges and the throughput window
MAX_STEP_TIMES = 4096  # step durations taken from one heartbeat (the worker keeps no more)
HEARTBEAT_ID_SUFFIX = b"#hb"  # a worker's heartbeat socket's routing id: its worker id + this


@dataclass
class WorkerInfo:
    worker_id: str
    identity: bytes
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
    lookahead_ok: bool = False  # READY said: can take continuations (async scheduling)
    num_steps: int = 0
    busy_s: float = 0.0  # cumulative seconds in forward passes, as the worker reports it
    busy_window: RateWindow | None = None  # busy_s over coordinator time: the busy fraction
    price_per_hour: float | None = None
    registered_at: float = field(default_factory=time.monotonic)
    speed: float = 1.0  # relative speed the worker declared (planner input)
    comm: dict | None = None  # the worker's cumulative data-plane times (shardline.worker.comm.StageComm.stats)
    lost_at: float | None = None
    drained: bool = False  # left by an operator's drain (not a failure)
    shutdown_sent_at: float = -math.inf  # when a lost worker that spoke again was last told to leave


@dataclass
class WorkerDrain:
    """An operator's drain of one worker (DRAIN_WORKER), from acceptance to its answer.

    phase `quiesce`: no new steps; the steps in flight finish (at most until `quiesce_deadline`,
    monotonic seconds). phase `replan`: the worker has been told to SHUTDOWN and the new plan
    loads; the client is answered when it serves, or with ERROR if recovery fails."""

    worker_id: str
    client: bytes
    request_id: str
    started: float  # monotonic seconds
    quiesce_deadline: float
    phase: str = "quiesce"


@dataclass
class Request:
    """A client's request and its output stream state."""

    client: bytes
    request_id: str
    seq: Sequence
    stream: bool
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    num_logprobs: int
    text: str = ""
    num_tokens_sent: int = 0
    last_token_time: float | None = None  # monotonic time of the previous token (inter-token latency)
    index: int = 0  # choice index within the client's request (params.n > 1)
    choices: list["Request"] = field(default_factory=list)  # all choices of the request, shared, index order
    num_prompt_logprobs: int = 0  # top-k per prompt token (choice 0 only)
    prompt_logprobs: list | None = None  # choice 0: entry per prompt position (None at 0 and until computed)
    finished: bool = False  # this choice's sequence has ended


class Coordinator:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.model_path = str(resolve_model_path(config.model))
        self.spec = read_model_spec(self.model_path)
        self.model_id = config.model
        self.tokenizer = Tokenizer.from_model_path(self.model_path)
        self.model_sizes = ModelSizes.from_model(self.model_path, self.spec, config.quantization,
                                                 config.quantization_group_size, config.dtype)
        self.max_model_len = min(config.scheduler.max_model_len or self.spec.context_length, self.spec.context_length)
        if config.pipeline_parallel is not None and config.tensor_parallel is not None:
            check_parallel(self.spec, config.pipeline_parallel, config.tensor_parallel)  # fail before anything loads
        from shardline.shard import model_digest

        t0 = time.monotonic()
        self.model_digest = model_digest(self.model_path)  # the join handshake and shard transfers name it
        log.info("model %s: sha256 %s (%.1f s)", self.model_path, self.model_digest[:16], time.monotonic() - t0)
        self.shard_server = ShardServer(self.model_path, self.spec, self.model_digest)
        self.workers: dict[str, WorkerInfo] = {}
        self._by_identity: dict[bytes, WorkerInfo] = {}
        self.order: list[str] = []  # worker ids in registration order
        self.plan: Plan | None = None
        self.abandoned_members: set[str] = set()  # workers of the last abandoned plan (see _worker_lost)
        self.state = "waiting_for_workers"
        self.scheduler: Scheduler | None = None
        self.requests: dict[int, Request] = {}  # seq_id -> request
        self.by_client: dict[tuple[bytes, str], int] = {}  # (client, request_id) -> seq_id
        self.in_flight: dict[int, SchedulerOutput] = {}  # step_id -> step
        # sequences with a new token, streamed to their clients after the next steps are dispatched
        self._to_emit: list[Sequence] = []
        self.step_started: dict[int, float] = {}
        self._next_seq_id = 0
        self._stop = False
        self._shutting_down = False  # SIGTERM/SIGINT: admission stopped, running requests finishing
        self._reload_keys = False  # SIGHUP: re-read the allow-lists at the next loop turn
        self._refused_keys: set[str] = set()  # revoked keys whose messages were dropped (logged once)
        self.shutdown_deadline: float | None = None
        self.recovery_deadline: float | None = None  # a plan was lost: serve again before this
        self.replan_at: float | None = None  # after a reported data-plane failure: re-plan no sooner
        self.worker_drain: WorkerDrain | None = None  # DRAIN_WORKER in progress (at most one)
        self.generation = 0
        self.stats = {"requests_total": 0, "requests_finished": 0, "generation_tokens_total": 0,
                      "prompt_tokens_total": 0, "steps_total": 0, "step_time_s_total": 0.0}
        self.metrics = CoordinatorMetrics(self.model_id, self.max_model_len)
        self.throughput = RateWindow(config.metrics.window_s)  # generation_tokens_total over time

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        import torch.distributed as dist

        c = self.config.coordinator
        self.ctx = zmq.Context.instance()
        curve = self._start_security()
        self.client_sock = self.ctx.socket(zmq.ROUTER)
        self.worker_sock = self.ctx.socket(zmq.ROUTER)
        if curve is not None:  # CurveZMQ servers, one ZAP domain (allow-list) per plane
            configure_curve_server(self.client_sock, curve, CLIENT_DOMAIN)
            configure_curve_server(self.worker_sock, curve, WORKER_DOMAIN)
        for s in (self.client_sock, self.worker_sock):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.ROUTER_MANDATORY, 1)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.setsockopt(zmq.RCVHWM, 100_000)
        try:  # draft API in libzmq; without it a vanished client is found when a send to it fails
            self.client_sock.setsockopt(zmq.ROUTER_NOTIFY, zmq.NOTIFY_DISCONNECT)
        except (zmq.ZMQError, AttributeError):
            pass
        self.client_sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_CLIENT_FRAME_BYTES)
        self.worker_sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        self.client_sock.bind(f"tcp://{c.host}:{c.client_port}")
        self.worker_sock.bind(f"tcp://{c.host}:{c.worker_port}")
        self.store = host_rendezvous_store(c.host, c.rendezvous_port)
        if self.config.metrics.enabled:
            self.metrics.start_http_server(self.config.metrics.host, self.config.metrics.port)
        log.info("coordinator up: clients %s, workers %s, rendezvous %s:%d, model %s (%s)",
                 self.config.client_address, self.config.worker_address, c.host, c.rendezvous_port,
                 self.model_id, self.model_path)

    def _start_security(self) -> bytes | None:
        """The bind rule, and with `security.server_key` the ZAP authenticator of both planes.
        Returns the server's secret key (Z85), or None without keys. Raises SecurityError."""
        sec, host = self.config.security, self.config.coordinator.host
        check_bind(host, sec.server_key, sec.insecure)
        self.authenticator = None
        if sec.server_key is None:
            if not is_loopback(host):
                log.warning("security.insecure: client and worker planes on %s are unencrypted and open", host)
            return None
        _, secret = load_keypair(sec.server_key)
        allowed = {CLIENT_DOMAIN: None if sec.client_keys is None else load_public_keys(sec.client_keys),
                   WORKER_DOMAIN: None if sec.worker_keys is None else load_public_keys(sec.worker_keys)}
        self.authenticator = start_authenticator(self.ctx, allowed)
        self._allow_sources = {CLIENT_DOMAIN: sec.client_keys, WORKER_DOMAIN: sec.worker_keys}
        log.info("CurveZMQ on: %s client keys, %s worker keys allowed",
                 *("any" if k is None else len(k) for k in allowed.values()))
        return secret

    def reload_allow_lists(self) -> bool:
        """Re-read the allow-list files (`security.client_keys`, `security.worker_keys`), as on
        SIGHUP: a key added is admitted at its next handshake; a key removed is refused at its next
        handshake, and every message still arriving on a connection it opened before is dropped
        (a revoked worker stops counting as alive and is lost after the heartbeat timeout). An
        unreadable or empty list keeps every old list (a typo must not lock everyone out) and is
        logged. Returns whether the lists were replaced."""
        if self.authenticator is None:
            log.warning("SIGHUP: no CurveZMQ keys configured (security.server_key); nothing to reload")
            return False
        try:
            allowed = {d: None if src is None else load_public_keys(src) for d, src in self._allow_sources.items()}
        except SecurityError as exc:
            log.error("allow-lists not reloaded, the old ones stay: %s", exc)
            return False
        changes = self.authenticator.update(allowed)
        self._refused_keys.clear()
        log.info("allow-lists reloaded: %s", ", ".join(
            f"{d} plane {'any key' if allowed[d] is None else f'{len(allowed[d])} keys'} "
            f"(+{changes[d][0]} -{changes[d][1]})" for d in allowed))
        return True

    def _revoked(self, sock, frames: list) -> bool:
        """Whether a message (zmq.Frames) comes from a CURVE peer whose key has been taken off its
        plane's allow-list since it connected; logged once per key."""
        if self.authenticator is None or not frames[-1].bytes:
            return False
        try:
            key = frames[-1].get("User-Id")
        except zmq.ZMQError:  # no metadata (not a CURVE connection): ZAP admitted it as configured
            return False
        domain = CLIENT_DOMAIN if sock is self.client_sock else WORKER_DOMAIN
        if self.authenticator.allows(domain, key):
            return False
        if key not in self._refused_keys:
            self._refused_keys.add(key)
            log.warning("dropping messages on the %s plane from revoked public key %s", domain, key)
        return True

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        for w in self.workers.values():
            self._send_worker(w, MsgType.SHUTDOWN, {})
        for req in list(self.requests.values()):
            self._send_error(req.client, req.request_id, ErrorCode.UNAVAILABLE, "coordinator shutting down")
        self._end_worker_drain(ErrorCode.UNAVAILABLE, "coordinator shutting down")
        self.client_sock.close(linger=0)
        self.worker_sock.close(linger=0)
        if getattr(self, "authenticator", None) is not None:
            self.authenticator.stop()
        self.metrics.stop_http_server()
        del self.store

    def begin_shutdown(self) -> None:
        """Graceful shutdown (SIGTERM/SIGINT): refuse new requests at once, let running ones finish
        within `coordinator.shutdown_timeout_s`, then stop. A second signal stops at once."""
        if self._shutting_down:
            self._stop = True
            return
        self._shutting_down = True
        self.shutdown_deadline = time.monotonic() + self.config.coordinator.shutdown_timeout_s
        log.info("shutting down: admission stopped; %d requests running (at most %.0f s)",
                 len({id(r.choices) for r in self.requests.values()}), self.config.coordinator.shutdown_timeout_s)

    def serve_forever(self, install_signals: bool = True) -> int:
        """Serve until stopped. Returns the exit code: 0, or 3 when a shutdown timed out and running
        requests had to be ended with ERROR UNAVAILABLE."""
        if install_signals:
            signal.signal(signal.SIGTERM, lambda *_: self.begin_shutdown())
            signal.signal(signal.SIGINT, lambda *_: self.begin_shutdown())
            signal.signal(signal.SIGHUP, lambda *_: setattr(self, "_reload_keys", True))
        self.exit_code = 0
        self.start()
        # What start-up built (the tokenizer's vocabulary and merges: ~540K objects) stays for the
        # process's life, and every full collection walked it: 136-142 ms a pass, the loop and with
        # it every pipeline stage stalled. Full passes come once the objects surviving since the
        # last one reach a quarter of the heap (hours of serving, not a benchmark run). Frozen
        # (as vLLM does after start-up), collections look only at what serving allocates.
        gc.collect()
        gc.freeze()
        try:
            poller = zmq.Poller()
            poller.register(self.client_sock, zmq.POLLIN)
            poller.register(self.worker_sock, zmq.POLLIN)
            hb = self.config.heartbeat.interval_s
            last_hb = last_metrics = 0.0
            while not self._stop:
                # 1. read the inbox
                timeout_ms = 0 if self._can_dispatch() else int(hb * 1000 / 4)
                events = dict(poller.poll(timeout_ms))
                if self.worker_sock in events:
                    self._read_all(self.worker_sock, self._on_worker_frame)
                if self.client_sock in events:
                    self._read_all(self.client_sock, self._on_client_frame)
                # 2-3. schedule and dispatch
                while self._can_dispatch():
                    out = self.scheduler.schedule()
                    if out is None:
                        break
                    self._dispatch(out)
                # 4. stream the new tokens: after the dispatch, so the first stage is not idle while
                # 32-64 deltas are detokenized and sent (a stop string found here ends its sequence
                # one step late at most; that step's token is dropped like a cancelled one's)
                self._emit_pending()
                # 5. liveness
                now = time.monotonic()
                if now - last_hb >= hb:
                    last_hb = now
                    self._heartbeat(now)
                self._advance_worker_drain(now)
                if self._reload_keys:  # SIGHUP
                    self._reload_keys = False
                    self.reload_allow_lists()
                if self._shutting_down and (not self.requests or now > self.shutdown_deadline):
                    if self.requests:
                        log.error("shutdown timed out with %d sequences running", len(self.requests))
                        self.exit_code = 3
                    self._stop = True
                # 6. stats: throughput window and Prometheus gauges
                if now - last_metrics >= METRICS_INTERVAL_S:
                    last_metrics = now
                    self.throughput.add(now, self.stats["generation_tokens_total"])
                    self.metrics.set_state(self.stats_snapshot())
        finally:
            self.close()
        return self.exit_code

    def _read_all(self, sock, handler, limit: int = 1000) -> None:
        for _ in range(limit):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=self.authenticator is None)
            except zmq.Again:
                return
            if self.authenticator is not None:  # frames with metadata: check the sender's key
                if self._revoked(sock, frames):
                    continue
                frames = [f.bytes for f in frames]
            if len(frames) != 2:
                if sock is self.client_sock and frames:
                    self._send_error(frames[0], "", ErrorCode.BAD_FRAME, f"expected 1 frame, got {len(frames) - 1}")
                elif frames:
                    self._reply(sock, frames[0], MsgType.ERROR,
                                P.error_body(ErrorCode.BAD_FRAME, f"expected 1 frame, got {len(frames) - 1}"))
                continue
            identity, frame = frames
            if not frame:  # ROUTER_NOTIFY: the peer disconnected
                if sock is self.client_sock:
                    self._client_gone(identity)
                continue
            handler(identity, frame)

    # ---- worker plane --------------------------------------------------------------------
    def _send_worker(self, w: WorkerInfo, msg_type: MsgType, body: dict) -> bool:
        try:
            self.worker_sock.send_multipart([w.identity, P.encode(msg_type, body)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.warning("cannot reach worker %s: %s", w.worker_id, exc)
            return False

    def _on_worker_frame(self, identity: bytes, frame: bytes) -> None:
        try:
            msg_type, body = P.decode(frame)
            P.validate(msg_type, body)
            w = self._sender(identity, msg_type, body)
            if w is None and msg_type is not MsgType.REGISTER:
                if self._is_lost_worker(identity, body):
                    # a worker declared lost (told SHUTDOWN by `_sender`): dropped without an
                    # ERROR, which would make a worker that is re-registering think it was refused
                    log.debug("dropped %s from %r (not a live registered worker)", msg_type.name, identity)
                    return
                if self._is_early_heartbeat(identity, msg_type, body):
                    # a worker that started before this coordinator bound its socket: its queued
                    # heartbeats can be read before its REGISTER (ZeroMQ delivers per connection)
                    log.debug("heartbeat from %r before its worker registered", identity)
                    return
                raise ProtocolError(f"{msg_type.name} from {identity!r}, which is not a live registered worker")
            if w is not None:
                w.last_heartbeat = time.monotonic()  # any message shows the worker is alive
            if msg_type is MsgType.STEP_RESULT:
                # the sampler is the last stage's TP rank 0 (assignments are stage-major, TP rank minor)
                sampler = self.plan.assignments[-self.plan.tp_size] if self.plan is not None else None
                if sampler is None or w.worker_id != sampler.worker_id or self.state != "serving":
                    return  # a result of an abandoned plan, or from a worker that does not sample
                self._on_step_result(body)
            elif msg_type is MsgType.ERROR:  # its data plane failed: a peer may be dead, let liveness tell
                failed = body.get("generation", self.generation)
                if failed != self.generation:  # a survivor's late report on a plan already replaced
                    log.warning("worker %s: data plane of plan generation %s failed (now %d): %s", w.worker_id,
                                failed, self.generation, str(body.get("message", ""))[:500])
                    return
                self._plan_broken(f"worker {w.worker_id}: {str(body.get('message', ''))[:500]}", settle=True)
            elif msg_type is MsgType.HEARTBEAT:
                if w is not None:
                    w.step_time_s = float(body.get("step_time_s", 0.0))
                    w.rss_bytes = int(body.get("rss_bytes", 0))
                    self._on_worker_stats(w, body)
                    if isinstance(body.get("comm"), dict):
                        w.comm = {k: float(v) for k, v in body["comm"].items() if isinstance(v, (int, float))}
            elif msg_type is MsgType.REGISTER:
                self._on_register(identity, body)
            elif msg_type is MsgType.READY:
                self._on_ready(identity, body)
            elif msg_type in (MsgType.SHARD_REQUEST, MsgType.SHARD_FETCH):
                self._on_shard_message(w, identity, msg_type, body)
            else:
                raise ProtocolError(f"unexpected {msg_type.name} on the worker plane", ErrorCode.UNKNOWN_TYPE)
        except ProtocolError as exc:
            log.warning("bad frame from worker %r: %s", identity, exc)
            self._reply(self.worker_sock, identity, MsgType.ERROR, P.error_body(exc.code, str(exc)))
        except Exception:  # a bug or a hostile peer must not take the coordinator down
            log.exception("error handling a worker message from %r", identity)

    def _sender(self, identity: bytes, msg_type: MsgType, body: dict) -> WorkerInfo | None:
        """The live worker a worker-plane message comes from, or None. Heartbeats come from each
        worker's heartbeat socket (routing id `<worker id>#hb`) and name the worker and its
        incarnation; everything else from the worker's main socket. A worker declared lost that
        speaks again (it was frozen, cut off, or stalled) is sent SHUTDOWN {reason: lost}: it
        drops its state and registers again as a new incarnation, so it can rejoin a plan (a
        drained one gets {reason: drained} and exits)."""
        if msg_type is MsgType.HEARTBEAT and "worker_id" in body:
            w = self.workers.get(body["worker_id"])
            if w is None or identity not in (w.identity, w.identity + HEARTBEAT_ID_SUFFIX):
                return None
            if body.get("incarnation", w.incarnation) != w.incarnation:
                return None
        else:
            w = self._by_identity.get(identity)
        if w is not None and not w.alive:
            now = time.monotonic()
            if now - w.shutdown_sent_at >= self.config.heartbeat.interval_s:  # not one per queued heartbeat
                w.shutdown_sent_at = now
                self._send_worker(w, MsgType.SHUTDOWN, {"reason": "drained" if w.drained else "lost"})
            return None
        return w

    def _is_early_heartbeat(self, identity: bytes, msg_type: MsgType, body: dict) -> bool:
        """A HEARTBEAT from the heartbeat socket of the worker it names (routing id `<worker
        id>#hb`), which has not registered (yet). Nothing reads replies on that socket, so it is
        dropped quietly; a heartbeat from any other identity still gets an ERROR."""
        worker_id = body.get("worker_id")
        return (msg_type is MsgType.HEARTBEAT and isinstance(worker_id, str) and worker_id not in self.workers
                and identity == worker_id.encode() + HEARTBEAT_ID_SUFFIX)

    def _is_lost_worker(self, identity: bytes, body: dict) -> bool:
        w = self._by_identity.get(identity)
        if w is None and identity.endswith(HEARTBEAT_ID_SUFFIX) and isinstance(body.get("worker_id"), str):
            w = self.workers.get(body["worker_id"])
            if w is not None and identity != w.identity + HEARTBEAT_ID_SUFFIX:
                w = None
        return w is not None and not w.alive

    def _on_register(self, identity: bytes, body: dict) -> None:
        wid = P.require(body, "worker_id", str, "REGISTER")
        version = P.require(body, "version", str, "REGISTER")
        if version.split(".")[:2] != __version__.split(".")[:2]:
            self._reply(self.worker_sock, identity, MsgType.ERROR, P.error_body(
                ErrorCode.VERSION_MISMATCH, f"worker {wid} runs shardline {version}, coordinator runs {__version__}"))
            return
        theirs = body.get("model_digest")
        if theirs is not None and theirs != self.model_digest:
            msg = (f"model mismatch: worker {wid} has {body.get('model_path', '?')} (sha256 {str(theirs)[:16]}), "
                   f"coordinator serves {self.model_id} {self.model_path} (sha256 {self.model_digest[:16]})")
            log.error("refusing worker %s: %s", wid, msg)
            self._reply(self.worker_sock, identity, MsgType.ERROR, P.error_body(ErrorCode.MODEL_MISMATCH, msg))
            return
        old = self.workers.get(wid)
        if old is not None and old.alive:
            if old.identity != identity:
                self._reply(self.worker_sock, identity, MsgType.ERROR, P.error_body(
                    ErrorCode.INVALID_REQUEST, f"worker id {wid!r} is in use by a live worker"))
                return
            self._worker_lost(old, "registered again (the process restarted)")
        alive = sum(1 for x in self.workers.values() if x.alive)
        if alive >= self.config.workers.count + self.config.coordinator.max_spare_workers:
            self._reply(self.worker_sock, identity, MsgType.ERROR, P.error_body(
                ErrorCode.UNAVAILABLE, f"cluster has {alive} workers ({self.config.workers.count} planned and "
                                       f"{self.config.coordinator.max_spare_workers} spares); worker {wid} not needed"))
            return
        w = WorkerInfo(wid, identity, P.require(body, "host", str, "REGISTER"), P.require(body, "device", str, "REGISTER"),
                       P.require(body, "memory_bytes", int, "REGISTER"), str(body.get("incarnation", "")),
                       int(body.get("pid", 0)))
        price = body.get("price_per_hour")
        if price is not None and (not isinstance(price, (int, float)) or not 0 <= price < math.inf):
            raise ProtocolError(f"REGISTER: price_per_hour={price!r} must be a number >= 0", ErrorCode.BAD_FRAME)
        w.price_per_hour = self.config.workers.price_per_hour if price is None else float(price)
        w.busy_window = RateWindow(self.config.metrics.window_s)
        speed = body.get("speed", 1.0)
        if not isinstance(speed, (int, float)) or isinstance(speed, bool) or not 0 < speed < math.inf:
            raise ProtocolError(f"REGISTER: speed={speed!r} must be a number > 0", ErrorCode.BAD_FRAME)
        w.speed = float(speed)
        if wid not in self.workers:
            self.order.append(wid)
        self.workers[wid] = w
        self._by_identity[identity] = w
        log.info("worker %s registered from %s (%s, %.1f GiB) [%d/%d]", wid, w.host, w.device,
                 w.memory_bytes / 2**30, alive + 1, self.config.workers.count)
        self._maybe_plan()

    def _maybe_plan(self, fewer: bool = False) -> None:
        """Plan when there is something to plan for: the first time `workers.count` workers are
        registered, or after a loss (`recovering`/`degraded`) whenever the live workers may fit.
        `fewer`: re-plan onto fewer workers even without `replan_on_fewer_workers` (a drain)."""
        alive = sum(1 for w in self.workers.values() if w.alive)
        if self.state in ("serving", "loading") or self._shutting_down:
            return
        if self.replan_at is not None:
            if time.monotonic() < self.replan_at:
                return
            self.replan_at = None
        if alive >= self.config.workers.count or (
                self.state != "waiting_for_workers" and alive
                and (fewer or self.config.coordinator.replan_on_fewer_workers)):
            self._assign()

    def _make_plan(self, exclude: str | None = None) -> Plan:
        """The planner's layout over the live workers (all but `exclude`): the first
        `workers.count` by id, or all of them when fewer (fewer stages, the same TP size).

        Raises:
            PlanError: no layout fits those workers (the message says why).
        """
        cfg = self.config
        ids = sorted(w for w in self.order if self.workers[w].alive and w != exclude)[: cfg.workers.count]
        if len(ids) < cfg.workers.count:  # re-plan onto the survivors: fewer stages, same TP size
            tp = cfg.parallel.tensor_parallel
            if isinstance(tp, int):
                ids = ids[: len(ids) // tp * tp]
            cfg = cfg.model_copy(update={
                "workers": cfg.workers.model_copy(update={"count": max(1, len(ids))}),
                "parallel": cfg.parallel.model_copy(update={"pipeline_parallel": None if isinstance(tp, int) else "auto"})})
        offers = [WorkerOffer(w, self.workers[w].host, self.workers[w].memory_bytes, self.workers[w].device,
                              self.workers[w].speed) for w in ids]
        if not offers:
            raise PlanError(f"no live workers fit tensor_parallel={cfg.parallel.tensor_parallel}")
        return plan_for_config(cfg, self.spec, self.model_sizes, offers)

    def _assign(self) -> None:
        cfg = self.config
        try:
            plan = self._make_plan()
        except PlanError as exc:
            log.error("no plan fits: %s", exc)
            if self.recovery_deadline is None:
                self.state = f"plan_failed: {exc}"
            else:
                self.state = f"recovering: no plan fits the live workers ({exc})"
            return
        for w in self.workers.values():
            w.ready = False
        self.plan = plan
        self.generation += 1
        log.info("plan (generation %d):\n%s", self.generation, format_plan(plan))
        c = cfg.coordinator
        unreachable = []
        for a in plan.assignments:
            if not self._send_worker(self.workers[a.worker_id], MsgType.ASSIGN, {
                "rank": a.rank, "world_size": plan.world_size, "stage": a.stage, "pp_size": plan.pp_size,
                "tp_rank": a.tp_rank, "tp_size": plan.tp_size, "layer_start": a.layer_start, "layer_end": a.layer_end,
                "model_path": self.model_path, "spec": self.spec.to_dict(), "num_kv_blocks": plan.num_kv_blocks,
                "block_size": plan.block_size, "max_positions": self.max_model_len,
                "store_host": c.advertise_host or c.host, "store_port": c.rendezvous_port,
                "store_prefix": f"gen{self.generation}/", "generation": self.generation,
                "data_plane_timeout_s": cfg.heartbeat.data_plane_timeout_s,
                "heartbeat_interval_s": cfg.heartbeat.interval_s,
                "heartbeat_misses": cfg.heartbeat.misses, "quantization": cfg.quantization,
                "quantization_group_size": cfg.quantization_group_size, "dtype": cfg.dtype,
                "model": cfg.model, "model_digest": self.model_digest, "version": __version__,
                "gemm_weights": cfg.workers.gemm_weights, "kv_cache_dtype": cfg.workers.kv_cache_dtype,
                "token_ring": self._wants_lookahead(plan) and plan.pp_size > 1,
            }):
                unreachable.append(self.workers[a.worker_id])
        self.state = "loading"
        for w in unreachable:  # its connection is gone: lost (this re-plans without it)
            self._worker_lost(w, "unreachable (connection closed)")

    def _on_ready(self, identity: bytes, body: dict) -> None:
        w = self.workers.get(body.get("worker_id"))
        if w is None or w.identity != identity or body.get("generation", self.generation) != self.generation:
            return  # a stranger's, or the READY of a plan that has since been replaced
        w.ready = True
        self.shard_server.done(w.worker_id)
        w.weight_bytes = int(body.get("weight_bytes", 0))
        w.rss_bytes = int(body.get("rss_bytes", 0))
        w.kv_bytes = int(body.get("kv_bytes", 0))
        w.lookahead_ok = bool(body.get("lookahead_ok", False))
        log.info("worker %s ready (%.0f MB weights, loaded in %.1f s)", w.worker_id, w.weight_bytes / 1e6,
                 body.get("load_s", 0.0))
        if self.state == "loading" and all(self.workers[a.worker_id].ready for a in self.plan.assignments):
            cfg = self.config.scheduler
            bm = BlockManager(self.plan.num_kv_blocks, self.plan.block_size, cfg.enable_prefix_caching)
            micro_batches = cfg.pipeline_micro_batches or self.plan.pp_size
            # async scheduling: each micro-batch also has its continuation in flight
            lookahead = self._wants_lookahead(self.plan) and all(
                self.workers[a.worker_id].lookahead_ok for a in self.plan.assignments)
            self.max_in_flight = micro_batches * (2 if lookahead else 1)
            old = self.scheduler
            self.scheduler = Scheduler(bm, cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len,
                                       micro_batches, lookahead=lookahead)
            self.scheduler.eos_token_id = self.spec.eos_token_id
            if old is not None:  # step ids stay unique across plans (a late result never matches)
                self.scheduler.continue_from(old)
            self.state = "serving"
            resumed = self._resume_requests()
            log.info("serving %s: %d KV blocks of %d tokens, %d micro-batches%s", self.model_id,
                     self.plan.num_kv_blocks, self.plan.block_size, micro_batches,
                     ", async scheduling" if lookahead else "")
            self._end_worker_drain(resumed=resumed)

    def _wants_lookahead(self, plan: Plan) -> bool:
        """Async scheduling for this plan: asked for, and one rank per stage (the last stage's
        sampler hands its tokens to the first stage's one rank)."""
        return self.config.scheduler.async_scheduling and plan.tp_size == 1

    def _heartbeat(self, now: float) -> None:
        cfg = self.config.heartbeat
        # Heartbeats queued while the loop was busy (a long request parse, a big step) are read
        # before anyone is judged: a stalled coordinator must not declare its workers dead.
        self._read_all(self.worker_sock, self._on_worker_frame)
        for w in list(self.workers.values()):
            if not w.alive:
                continue
            self._send_worker(w, MsgType.HEARTBEAT, {"time": time.time()})
            # Workers heartbeat from a thread of their own, so a long load or a blocked data-plane
            # receive does not silence them; only a dead, frozen or cut-off process misses these.
            if now - w.last_heartbeat > cfg.interval_s * cfg.misses:
                self._worker_lost(w, f"no heartbeat for {now - w.last_heartbeat:.1f} s")
        if self.replan_at is not None and now >= self.replan_at:
            self._maybe_plan()
        if self.recovery_deadline is not None and now > self.recovery_deadline and self.state != "serving":
            why = self.state
            log.error("no plan within coordinator.recovery_timeout_s=%.0f s; ending %d requests",
                      self.config.coordinator.recovery_timeout_s, len({id(r.choices) for r in self.requests.values()}))
            for seq_id in list(self.requests):
                self._finish(seq_id, "error", ErrorCode.UNAVAILABLE,
                             f"no worker plan within {self.config.coordinator.recovery_timeout_s:.0f} s ({why})")
            self.recovery_deadline = None
            self._end_worker_drain(ErrorCode.UNAVAILABLE, f"worker drained, but no plan serves without it ({why})")
            if self.state != "loading":
                self.state = f"degraded: {why.removeprefix('recovering: ')}"

    def _on_shard_message(self, w: WorkerInfo | None, identity: bytes, msg_type: MsgType, body: dict) -> None:
        """SHARD_REQUEST -> SHARD_MANIFEST, SHARD_FETCH -> SHARD_CHUNK (shardline/coordinator/shard_server.py);
        a request that cannot be served is answered with ERROR naming why."""
        if w is None:
            raise ProtocolError(f"{msg_type.name} from a worker that has not registered", ErrorCode.BAD_FRAME)
        try:
            if msg_type is MsgType.SHARD_REQUEST:
                a = next((a for a in self.plan.assignments if a.worker_id == w.worker_id), None) if self.plan else None
                shard = None if a is None else (a.layer_start, a.layer_end, a.stage == 0,
                                                a.stage == self.plan.pp_size - 1, a.tp_rank, self.plan.tp_size)
                manifest = self.shard_server.on_request(w.worker_id, body, shard)
                log.info("worker %s: sending its shard (%s): %d tensors, %.1f MB in %d chunks", w.worker_id,
                         body.get("reason", ""), len(manifest["tensors"]), manifest["total_bytes"] / 1e6,
                         manifest["num_chunks"])
                self._send_worker(w, MsgType.SHARD_MANIFEST, manifest)
            else:
                self._send_worker(w, MsgType.SHARD_CHUNK, self.shard_server.on_fetch(w.worker_id, body))
        except ShardError as exc:
            log.error("shard transfer to worker %s refused: %s", w.worker_id, exc)
            self._send_worker(w, MsgType.ERROR, P.error_body(ErrorCode.INVALID_REQUEST, str(exc)))

    def _on_worker_stats(self, w: WorkerInfo, body: dict) -> None:
        """A heartbeat's utilization report: cumulative forward-pass seconds `busy_s` and the
        forward-pass durations `step_times_s` since the previous heartbeat."""
        busy_s = float(body.get("busy_s", 0.0))
        times = body.get("step_times_s") or []
        if not isinstance(times, list):
            raise ProtocolError(f"HEARTBEAT: step_times_s must be a list, got {type(times).__name__}", ErrorCode.BAD_FRAME)
        if len(times) > MAX_STEP_TIMES:
            log.warning("worker %s reported %d step times; keeping the last %d", w.worker_id, len(times), MAX_STEP_TIMES)
            times = times[-MAX_STEP_TIMES:]
        w.num_steps = int(body.get("num_steps", w.num_steps))
        w.busy_s = busy_s
        w.busy_window.add(time.monotonic(), busy_s)
        stage = next((a.stage for a in self.plan.assignments if a.worker_id == w.worker_id), None) if self.plan else None
        self.metrics.on_worker_steps(w.worker_id, stage, busy_s, [float(t) for t in times])

    def _worker_lost(self, w: WorkerInfo, why: str) -> None:
        """A worker died, froze, was cut off or left: forget a spare; for a member of the plan,
        abandon the plan (`_plan_broken`) and recover."""
        if not w.alive:
            return
        w.alive = w.ready = False
        w.lost_at = time.monotonic()
        self.metrics.on_worker_failure()
        log.error("worker %s lost: %s", w.worker_id, why)
        if self.plan is not None and any(a.worker_id == w.worker_id for a in self.plan.assignments):
            self._plan_broken(f"worker {w.worker_id} lost: {why}")
        elif self.plan is None and w.worker_id in self.abandoned_members:
            # its plan broke first (a peer reported the data-plane failure before the heartbeats
            # ran out): it stays listed as lost, as when liveness finds it first
            pass
        else:  # a spare, or one that never got a place: forget it
            self.workers.pop(w.worker_id, None)
            self._by_identity.pop(w.identity, None)
            if w.worker_id in self.order:
                self.order.remove(w.worker_id)

    def _plan_broken(self, why: str, settle: bool = False, fewer: bool = False) -> None:
        """The current plan cannot go on (a member lost, a data-plane failure). Recovery:

        1. steps in flight are abandoned (late results are ignored: step ids never repeat);
        2. every unfinished sequence keeps its token history (prompt + output so far) and is
           recomputed from it under the next plan (`_resume_requests`), so greedy output is the
           same as without the failure;
        3. a new plan is made at once from the live workers (`_maybe_plan`), or when a replacement
           registers; its ASSIGN carries a new store prefix, so survivors leave the old
           torch.distributed group and join a new one;
        4. if no plan is serving within `coordinator.recovery_timeout_s`, the requests end with
           ERROR UNAVAILABLE (`_heartbeat`), and new ones are refused until a plan serves.

        `settle`: a worker reported a data-plane failure, so some peer may be dead but not yet
        found so: re-plan only after one heartbeat timeout, when liveness has told which.
        `fewer`: re-plan onto fewer workers even without `replan_on_fewer_workers` (a drain).
        """
        if self.plan is None and self.state in ("waiting_for_workers",):
            return
        if self.worker_drain is not None and self.worker_drain.phase == "quiesce":
            self._end_worker_drain(ErrorCode.UNAVAILABLE, f"drain of worker {self.worker_drain.worker_id} "
                                                          f"abandoned: the plan broke ({why})")
        hb = self.config.heartbeat
        if settle:
            self.replan_at = time.monotonic() + hb.interval_s * (hb.misses + 1)
        # an operator's drain (`fewer`) is not a failure
        log.log(logging.INFO if fewer else logging.ERROR, "plan generation %d abandoned: %s", self.generation, why)
        self.in_flight.clear()
        self.step_started.clear()
        if self.plan is not None:
            self.abandoned_members = {a.worker_id for a in self.plan.assignments}
        self.plan = None
        for w in self.workers.values():
            w.ready = False
        if self.recovery_deadline is None:
            self.recovery_deadline = time.monotonic() + self.config.coordinator.recovery_timeout_s
        self.state = f"recovering: {why}"
        self._maybe_plan(fewer=fewer)

    def _resume_requests(self) -> int:
        """Under a new plan: queue every unfinished sequence again, to be recomputed from its
        token history (a preemption: KV state is rebuilt, nothing the client saw is repeated).
        Returns the number of sequences queued."""
        self.recovery_deadline = None
        seqs = sorted({r.seq.seq_id: r.seq for r in self.requests.values() if not r.seq.is_finished}.values(),
                      key=lambda s: s.seq_id)
        for seq in seqs:
            try:
                self.scheduler.requeue(seq)
            except RequestTooLarge as exc:
                self._finish(seq.seq_id, "error", ErrorCode.UNAVAILABLE, f"after re-planning: {exc}")
        if seqs:
            log.info("resuming %d sequences under plan generation %d (recomputed from their tokens)",
                     len(seqs), self.generation)
        return len(seqs)

    # ---- draining one worker -------------------------------------------------------------
    def _on_drain_worker(self, client: bytes, request_id: str, body: dict) -> None:
        """DRAIN_WORKER: check that the worker can go, then start the drain (`WorkerDrain`); the
        answer comes when the new plan serves (`_end_worker_drain`). A spare (no place in the
        plan) is shut down and answered at once.

        Raises:
            ProtocolError: NOT_FOUND for an unknown or no longer live worker; UNAVAILABLE when the
                cluster is not serving or another drain is in progress; INVALID_REQUEST when no plan
                fits the other workers (nothing is changed).
        """
        wid = P.require(body, "worker_id", str, "DRAIN_WORKER")
        w = self.workers.get(wid)
        if w is None or not w.alive:
            live = ", ".join(sorted(x.worker_id for x in self.workers.values() if x.alive)) or "none"
            why = "is not registered" if w is None else "has already left (drained or lost)"
            raise ProtocolError(f"worker {wid!r} {why}; live workers: {live}", ErrorCode.NOT_FOUND)
        if self._shutting_down:
            raise ProtocolError("coordinator is draining (shutting down)", ErrorCode.UNAVAILABLE)
        if self.worker_drain is not None:
            raise ProtocolError(f"a drain of worker {self.worker_drain.worker_id} is in progress", ErrorCode.UNAVAILABLE)
        if self.state != "serving":
            raise ProtocolError(f"cluster not serving ({self.state}): try again when it is", ErrorCode.UNAVAILABLE)
        echo = {"request_id": request_id} if request_id else {}
        if not any(a.worker_id == wid for a in self.plan.assignments):  # a spare: nothing runs on it
            w.alive, w.drained, w.lost_at = False, True, time.monotonic()
            self._send_worker(w, MsgType.SHUTDOWN, {"reason": "drained"})
            log.info("worker %s (a spare) drained", wid)
            self._reply(self.client_sock, client, MsgType.DRAIN_WORKER_REPLY, {
                "worker_id": wid, "generation": self.generation, "plan": self.plan.to_dict(),
                "requests_resumed": 0, "drain_s": 0.0, **echo})
            return
        try:
            self._make_plan(exclude=wid)
        except PlanError as exc:
            raise ProtocolError(f"cannot drain worker {wid}: no plan fits the other workers ({exc})",
                                ErrorCode.INVALID_REQUEST) from None
        now = time.monotonic()
        self.worker_drain = WorkerDrain(wid, client, request_id, now,
                                        now + self.config.heartbeat.data_plane_timeout_s)
        log.info("draining worker %s: no new steps; %d in flight finish, then re-plan without it",
                 wid, len(self.in_flight))

    def _advance_worker_drain(self, now: float) -> None:
        """Phase quiesce -> replan once no step is in flight (or the quiesce deadline passed: the
        steps left are abandoned and recomputed): mark the worker gone, abandon the plan and
        re-plan without it (`_plan_broken`), then tell it to SHUTDOWN. Its data-plane peers are
        idle by then, so its leaving breaks no step of theirs."""
        d = self.worker_drain
        if d is None or d.phase != "quiesce" or (self.in_flight and now < d.quiesce_deadline):
            return
        if self.in_flight:
            log.warning("drain of worker %s: %d steps still in flight after %.0f s; abandoning them", d.worker_id,
                        len(self.in_flight), self.config.heartbeat.data_plane_timeout_s)
        w = self.workers[d.worker_id]
        w.alive = w.ready = False
        w.drained, w.lost_at = True, now
        d.phase = "replan"
        self._plan_broken(f"worker {d.worker_id} drained", fewer=True)
        self._send_worker(w, MsgType.SHUTDOWN, {"reason": "drained"})

    def _end_worker_drain(self, code: ErrorCode | None = None, message: str = "", resumed: int = 0) -> None:
        """Answer the drain in progress, if any: DRAIN_WORKER_REPLY when the new plan serves
        (`code` None), else ERROR `code` with `message`."""
        d = self.worker_drain
        if d is None or (code is None and d.phase != "replan"):
            return
        self.worker_drain = None
        if code is not None:
            log.error("drain of worker %s failed: %s", d.worker_id, message)
            self._send_error(d.client, d.request_id, code, message)
            return
        drain_s = time.monotonic() - d.started
        log.info("worker %s drained in %.1f s; %d sequences resumed under plan generation %d", d.worker_id,
                 drain_s, resumed, self.generation)
        self._reply(self.client_sock, d.client, MsgType.DRAIN_WORKER_REPLY, {
            "worker_id": d.worker_id, "generation": self.generation, "plan": self.plan.to_dict(),
            "requests_resumed": resumed, "drain_s": drain_s, **({"request_id": d.request_id} if d.request_id else {})})

    # ---- steps ---------------------------------------------------------------------------
    def _can_dispatch(self) -> bool:
        return (self.state == "serving" and len(self.in_flight) < self.max_in_flight
                and (self.worker_drain is None or self.worker_drain.phase != "quiesce")
                and self.scheduler.has_work())

    def _dispatch(self, out: SchedulerOutput) -> None:
        seqs = []
        for s in out.scheduled:
            seq = s.seq
            entry = {"seq_id": seq.seq_id, "start": s.start, "n": s.num_new_tokens,
                     "tokens": P.pack_ids(seq.token_ids(s.start, s.start + s.num_new_tokens)),
                     "blocks": P.pack_ids(s.new_blocks), "reset": s.reset, "sample": s.sample}
            if s.prev_step is not None:  # a continuation: the input token is what step `prev` samples
                entry["tokens"] = b""
                entry["prev"] = s.prev_step
            if s.reset:
                req = self.requests[seq.seq_id]
                entry["params"] = seq.sampling_params.to_dict()
                entry["logprobs"] = req.num_logprobs
                entry["prompt_len"] = seq.num_prompt_tokens
                if req.num_prompt_logprobs:
                    entry["prompt_logprobs"] = req.num_prompt_logprobs
                if s.start and seq.sampling_params.needs_history:  # a cached prefix: penalties need its tokens
                    entry["history"] = P.pack_ids(seq.token_ids(0, s.start))
            seqs.append(entry)
        body = {"step_id": out.step_id, "seqs": seqs, "free": out.freed_seq_ids}
        frame = P.encode(MsgType.STEP, body)
        for a in self.plan.assignments:
            w = self.workers[a.worker_id]
            try:
                self.worker_sock.send_multipart([w.identity, frame], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                self._worker_lost(w, f"send failed: {exc}")
                return
        if out.scheduled:
            self.in_flight[out.step_id] = out
            self.step_started[out.step_id] = time.perf_counter()
        self.metrics.on_step(out.num_batched_tokens if out.scheduled else 0, out.num_preempted)

    def _on_step_result(self, body: dict) -> None:
        step_id = body.get("step_id")
        out = self.in_flight.pop(step_id, None)
        if out is None:
            return
        self.stats["steps_total"] += 1
        self.stats["step_time_s_total"] += time.perf_counter() - self.step_started.pop(step_id, time.perf_counter())
        seq_ids = P.unpack_ids(body["seq_ids"])
        tokens = P.unpack_ids(body["tokens"])
        logprobs = body.get("logprobs") or [None] * len(seq_ids)
        sampled = dict(zip(seq_ids, tokens))
        for sid, lp in zip(seq_ids, logprobs):
            req = self.requests.get(sid)
            # a finished sequence's token is dropped (a continuation computed after its stop)
            if req is not None and lp is not None and not req.seq.is_finished:
                req.seq.output_logprobs.append(lp)
        for sid, first, entries in body.get("prompt_logprobs") or ():
            req = self.requests.get(sid)
            if req is not None and req.prompt_logprobs is not None:
                entries = entries[: max(0, len(req.prompt_logprobs) - first)]
                req.prompt_logprobs[first:first + len(entries)] = entries
        self._to_emit.extend(self.scheduler.update(out, sampled))

    def _emit_pending(self) -> None:
        pending, self._to_emit = self._to_emit, []
        for seq in pending:
            self._emit(seq)

    # ---- outputs -------------------------------------------------------------------------
    def _emit(self, seq: Sequence) -> None:
        req = self.requests.get(seq.seq_id)
        if req is None:
            return
        self.stats["generation_tokens_total"] += 1
        t = seq.last_token_time
        if req.last_token_time is None:
            self.metrics.on_token(ttft_s=_dt(seq.arrival_time, t), itl_s=None)
        else:
            self.metrics.on_token(ttft_s=None, itl_s=_dt(req.last_token_time, t))
        req.last_token_time = t
        token = seq.output_token_ids[-1]
        delta = req.detokenizer.push([token])
        match = req.stop_matcher.push(delta)
        text = match.text
        if match.stopped and not seq.is_finished:
            seq.stop_reason = match.stop
            self.scheduler.finish(seq.seq_id, "stop")
        if seq.is_finished and not match.stopped:
            text += req.stop_matcher.push(req.detokenizer.flush()).text + req.stop_matcher.flush()
        req.text += text
        if req.stream:
            n = req.num_tokens_sent
            body = {"request_id": req.request_id, "index": req.index, "text": text,
                    "token_ids": P.pack_ids(seq.output_token_ids[n:])}
            if req.num_logprobs:
                body["logprobs"] = seq.output_logprobs[n:]
            if req.prompt_logprobs is not None and n == 0:
                body["prompt_logprobs"] = req.prompt_logprobs
                body["prompt_token_ids"] = P.pack_ids(seq.prompt_token_ids)
            if req.num_logprobs or "prompt_logprobs" in body:
                body["token_bytes"] = self._token_bytes(seq.output_token_ids[n:], body.get("logprobs"),
                                                        body.get("prompt_logprobs"), seq.prompt_token_ids)
            req.num_tokens_sent = seq.num_output_tokens
            self._reply(self.client_sock, req.client, MsgType.DELTA, body)
        if seq.is_finished:
            self._send_done(req)

    def _send_done(self, req: Request) -> None:
        """One choice has ended; when every choice of its request has, send the one DONE.
        Top-level fields describe choice 0; `choices` (n > 1) lists every choice."""
        req.finished = True
        if not all(r.finished for r in req.choices):
            return
        head = req.choices[0]
        seq = head.seq
        now = time.monotonic()
        t = {"queue_s": _dt(seq.arrival_time, seq.first_scheduled_time),
             "ttft_s": _dt(seq.arrival_time, seq.first_token_time),
             "e2e_s": now - seq.arrival_time}
        if seq.num_output_tokens > 1 and seq.first_token_time and seq.last_token_time:
            dt = seq.last_token_time - seq.first_token_time
            t["decode_tokens_per_s"] = (seq.num_output_tokens - 1) / dt if dt > 0 else None
        num_output = sum(r.seq.num_output_tokens for r in req.choices)
        body = {"request_id": head.request_id, "text": head.text, "token_ids": P.pack_ids(seq.output_token_ids),
                "finish_reason": seq.finish_reason, "stop_reason": seq.stop_reason,
                "usage": {"prompt_tokens": seq.num_prompt_tokens, "completion_tokens": num_output,
                          "cached_tokens": seq.num_cached_tokens,
                          "num_preemptions": sum(r.seq.num_preemptions for r in req.choices)},
                "timings": t}
        if head.num_logprobs:
            body["logprobs"] = seq.output_logprobs
        if len(req.choices) > 1:
            body["choices"] = [{"index": r.index, "text": r.text, "token_ids": P.pack_ids(r.seq.output_token_ids),
                                "finish_reason": r.seq.finish_reason, "stop_reason": r.seq.stop_reason,
                                **({"logprobs": r.seq.output_logprobs} if r.num_logprobs else {})}
                               for r in req.choices]
        if head.prompt_logprobs is not None:
            body["prompt_logprobs"] = head.prompt_logprobs
            body["prompt_token_ids"] = P.pack_ids(seq.prompt_token_ids)
        if head.num_logprobs or head.prompt_logprobs is not None:
            ids = [t for r in req.choices for t in r.seq.output_token_ids]
            entries = [e for r in req.choices for e in r.seq.output_logprobs]
            body["token_bytes"] = self._token_bytes(ids, entries, head.prompt_logprobs, seq.prompt_token_ids)
        self._reply(self.client_sock, head.client, MsgType.DONE, body)
        self._forget(seq.seq_id)
        self.stats["requests_finished"] += 1
        self.metrics.on_request_finished(seq.finish_reason, t["e2e_s"], t["queue_s"], seq.num_prompt_tokens,
                                         num_output)

    def _token_bytes(self, token_ids: list[int], entries: list | None, prompt_entries: list | None,
                     prompt_ids: list[int]) -> dict[str, bytes]:
        """{str(token id): its raw bytes} for every token a DELTA/DONE's logprobs name (sampled,
        top-k, scored prompt tokens), so clients can show token text without the tokenizer."""
        ids = set(token_ids)
        for e in entries or ():
            if e:
                ids.update(t for t, _ in e[1])
        if prompt_entries:
            for tok, e in zip(prompt_ids, prompt_entries):
                if e:
                    ids.add(tok)
                    ids.update(t for t, _ in e[1])
        return {str(i): self.tokenizer.token_bytes(i) for i in sorted(ids)}

    def _forget(self, seq_id: int) -> None:
        """Drop a request (every choice) from the tables."""
        req = self.requests.pop(seq_id, None)
        if req is not None:
            for r in req.choices:
                self.requests.pop(r.seq.seq_id, None)
            self.by_client.pop((req.client, req.request_id), None)

    def _finish(self, seq_id: int, reason: str, code: ErrorCode | None = None, message: str = "") -> None:
        """End a request early (abort, error), every choice of it, and tell its client."""
        req = self.requests.get(seq_id)
        if self.scheduler is not None:
            self.scheduler.finish(seq_id, reason)
        if req is None:
            return
        for r in req.choices:
            if self.scheduler is not None:
                self.scheduler.finish(r.seq.seq_id, reason)
        if code is not None:
            self._send_error(req.client, req.request_id, code, message)
            self._forget(seq_id)
        else:
            for r in req.choices:
                if not r.finished:
                    self._send_done(r)

    # ---- client plane --------------------------------------------------------------------
    def _reply(self, sock, identity: bytes, msg_type: MsgType, body: dict) -> None:
        try:
            sock.send_multipart([identity, P.encode(msg_type, body)], zmq.NOBLOCK)
        except zmq.ZMQError:  # unroutable (gone) or at the high-water mark: drop its requests
            if sock is self.client_sock:
                self._client_gone(identity)

    def _send_error(self, client: bytes, request_id: str, code: ErrorCode, message: str) -> None:
        self.metrics.on_error(code.name)
        self._reply(self.client_sock, client, MsgType.ERROR, P.error_body(code, message, request_id=request_id))

    def _client_gone(self, client: bytes) -> None:
        for (c, rid), seq_id in list(self.by_client.items()):
            if c == client:
                self.by_client.pop((c, rid), None)
                req = self.requests.get(seq_id)
                for sid in [r.seq.seq_id for r in req.choices] if req is not None else [seq_id]:
                    self.requests.pop(sid, None)
                    if self.scheduler is not None:
                        self.scheduler.finish(sid, "abort")

    def _on_client_frame(self, client: bytes, frame: bytes) -> None:
        request_id = ""
        try:
            msg_type, body = P.decode(frame, P.MAX_CLIENT_FRAME_BYTES)
            rid = body.get("request_id", "")
            request_id = rid if isinstance(rid, str) and len(rid) <= 128 else ""  # echoed in replies
            if msg_type not in P.CLIENT_REQUESTS:
                raise ProtocolError(f"{msg_type.name} (type {int(msg_type)}) is not a client request",
                                    ErrorCode.UNKNOWN_TYPE)
            P.validate(msg_type, body)
            if msg_type is MsgType.GENERATE:
                self._on_generate(client, body)
            elif msg_type is MsgType.CANCEL:
                seq_id = self.by_client.get((client, request_id))
                if seq_id is not None:
                    self._finish(seq_id, "abort")
            elif msg_type is MsgType.DRAIN_WORKER:
                self._on_drain_worker(client, request_id, body)
            elif msg_type in (MsgType.HEALTH, MsgType.STATS, MsgType.MODELS):
                echo = {"request_id": request_id} if request_id else {}  # lets a client match the reply
                if msg_type is MsgType.HEALTH:
                    self._reply(self.client_sock, client, MsgType.HEALTH_REPLY, {**self.health(), **echo})
                elif msg_type is MsgType.STATS:
                    self._reply(self.client_sock, client, MsgType.STATS_REPLY, {**self.stats_snapshot(), **echo})
                else:
                    self._reply(self.client_sock, client, MsgType.MODELS_REPLY, {"models": [
                        {"id": self.model_id, "name": self.spec.name, "context_length": self.max_model_len,
                         "architecture": self.spec.architecture}], **echo})
            else:
                raise ProtocolError(f"{msg_type.name} is not a client request", ErrorCode.UNKNOWN_TYPE)
        except ProtocolError as exc:
            self._send_error(client, request_id, exc.code, str(exc))
        except (ValueError, TypeError) as exc:
            self._send_error(client, request_id, ErrorCode.INVALID_REQUEST, str(exc))
        except Exception as exc:  # a bug must not take the coordinator down
            log.exception("error handling a client message")
            self._send_error(client, request_id, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")

    def _on_generate(self, client: bytes, body: dict) -> None:
        request_id = P.require(body, "request_id", str, "GENERATE")
        if not 0 < len(request_id) <= 128:
            raise ProtocolError("GENERATE: request_id must be 1..128 characters", ErrorCode.INVALID_REQUEST)
        # during a worker drain requests queue (the new plan runs them); otherwise only a serving plan admits
        if (self.state != "serving" and self.worker_drain is None) or self._shutting_down:
            why = "draining (shutting down): not accepting requests" if self._shutting_down else self.state
            self._send_error(client, request_id, ErrorCode.UNAVAILABLE, f"cluster not serving: {why}")
            return
        if (client, request_id) in self.by_client:
            raise ProtocolError(f"request_id {request_id!r} is already in use", ErrorCode.INVALID_REQUEST)
        params = SamplingParams.from_dict(body.get("params") or {})
        num_logprobs = check_num_logprobs("logprobs", body.get("logprobs"))
        num_prompt_logprobs = check_num_logprobs("prompt_logprobs", body.get("prompt_logprobs"))
        if "prompt_token_ids" in body:
            ids = P.unpack_ids(body["prompt_token_ids"])
            if any(not 0 <= i < self.spec.vocab_size for i in ids):
                raise ValueError(f"prompt_token_ids: ids must be in [0, {self.spec.vocab_size})")
        elif "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise ValueError("messages must be a list of {role: str, content: str}")
            ids = self.tokenizer.encode(self._checked_text(
                self.tokenizer.apply_chat_template(messages, add_generation_prompt=True), "messages"))
        else:
            prompt = P.require(body, "prompt", str, "GENERATE")
            ids = self.tokenizer.encode(self._checked_text(prompt, "prompt"))
        # n choices = n sequences of one prompt; choice i samples with params.for_choice(i)
        seqs = [Sequence(self._next_seq_id + i, ids, params.for_choice(i), request_id=request_id)
                for i in range(params.n)]
        if num_prompt_logprobs:  # every prompt position must be computed to be scored
            seqs[0].use_prefix_cache = False
        try:
            for seq in seqs:
                self.scheduler.add(seq)
        except RequestTooLarge as exc:
            for seq in seqs:
                self.scheduler.finish(seq.seq_id, "abort")
            self._send_error(client, request_id, ErrorCode.INVALID_REQUEST, str(exc))
            return
        self._next_seq_id += params.n
        stream = bool(body.get("stream", False))
        group: list[Request] = []
        for i, seq in enumerate(seqs):
            req = Request(client, request_id, seq, stream,
                          IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=True),
                          StopStringMatcher(list(params.stop), params.include_stop_str_in_output), num_logprobs,
                          index=i, choices=group)
            if i == 0 and num_prompt_logprobs:
                req.num_prompt_logprobs = num_prompt_logprobs
                req.prompt_logprobs = [None] * len(ids)
            group.append(req)
            self.requests[seq.seq_id] = req
        self.by_client[(client, request_id)] = seqs[0].seq_id
        self.stats["requests_total"] += 1
        self.stats["prompt_tokens_total"] += len(ids)
        self.metrics.on_request_accepted(len(ids))
        self._reply(self.client_sock, client, MsgType.ACCEPTED, {"request_id": request_id, "prompt_tokens": len(ids)})

    def _checked_text(self, text: str, field: str) -> str:
        """`text` if it can fit the context; else ValueError without tokenizing it. Tokenizing
        runs on the event loop (~2 us a character, up to ~16 s for a 9 MB prompt of one
        repeated digit), during which no heartbeat is read: a huge prompt must be refused by
        its length alone (`Tokenizer.max_chars_for`)."""
        limit = self.tokenizer.max_chars_for(self.max_model_len)
        if len(text) > limit:
            raise ValueError(f"{field}: {len(text)} characters cannot fit the maximum sequence length of "
                             f"{self.max_model_len} tokens (no token covers more than "
                             f"{self.tokenizer.max_token_chars} characters)")
        return text

    # ---- introspection -------------------------------------------------------------------
    def health(self) -> dict:
        up = sum(1 for w in self.workers.values() if w.alive)
        status = "draining" if self._shutting_down else "ok" if self.state == "serving" else self.state
        # a worker an operator drained is not missing: expect one fewer per drained worker
        drained = sum(1 for w in self.workers.values() if w.drained and not w.alive)
        return {"status": status, "workers_up": up,
                "workers_expected": max(0, self.config.workers.count - drained), "model": self.model_id}

    def stats_snapshot(self) -> dict:
        s = dict(self.stats)
        s["state"] = self.state
        s["coordinator"] = _process_stats()
        if self.scheduler is not None:
            bm = self.scheduler.block_manager
            s.update(num_requests_running=len(self.scheduler.running), num_requests_waiting=len(self.scheduler.waiting),
                     num_steps_in_flight=len(self.in_flight),
                     num_kv_blocks=bm.num_blocks, num_free_blocks=bm.num_free_blocks, kv_cache_usage=bm.usage,
                     num_preemptions_total=self.scheduler.stats.num_preemptions,
                     prefix_cache_hit_blocks=bm.num_prefix_hits, async_scheduling=self.scheduler.lookahead,
                     num_continuations_total=self.scheduler.stats.num_continuations)
        d = self.worker_drain
        s["worker_drain"] = None if d is None else {"worker_id": d.worker_id, "phase": d.phase,
                                                    "elapsed_s": time.monotonic() - d.started}
        s["workers"] = [{"worker_id": w.worker_id, "host": w.host, "pid": w.pid, "alive": w.alive, "ready": w.ready,
                         "drained": w.drained,
                         "heartbeat_age_s": time.monotonic() - w.last_heartbeat, "step_time_s": w.step_time_s,
                         "weight_bytes": w.weight_bytes, "rss_bytes": w.rss_bytes, "speed": w.speed,
                         "comm": w.comm} for w in self.workers.values()]
        self._add_utilization(s)
        if self.plan is not None:
            s["plan"] = self.plan.to_dict()
        return s

    def _add_utilization(self, s: dict) -> None:
        """Add to a stats snapshot: each worker's place in the plan, busy fraction (forward-pass
        seconds / wall seconds over `metrics.window_s`) and hourly price; the recent generation
        throughput (tokens/s over the same window) and the cluster's cost, both since the workers
        registered (`cost_per_million_tokens`) and at the recent throughput."""
        now = time.monotonic()
        placement = {a.worker_id: a for a in self.plan.assignments} if self.plan is not None else {}
        cost, priced = 0.0, False
        for d in s["workers"]:
            w = self.workers[d["worker_id"]]
            a = placement.get(w.worker_id)
            busy = w.busy_window.rate() if w.busy_window is not None else None
            d.update(stage=a.stage if a else None, layer_start=a.layer_start if a else None,
                     layer_end=a.layer_end if a else None, tp_rank=a.tp_rank if a else None, kv_bytes=w.kv_bytes,
                     num_steps=w.num_steps, busy_s=w.busy_s,
                     # clipped: heartbeats arrive with jitter, so a window may see slightly more than 1
                     busy_fraction=None if busy is None else min(1.0, max(0.0, busy)),
                     price_per_hour=w.price_per_hour)
            if w.price_per_hour is not None:
                priced = True
                cost += w.price_per_hour * ((w.lost_at or now) - w.registered_at) / 3600.0
        rate = self.throughput.rate()
        price = sum(w.price_per_hour or 0.0 for w in self.workers.values() if w.alive)
        s["throughput_window_s"] = self.config.metrics.window_s
        s["generation_tokens_per_s"] = rate
        s["price_per_hour"] = price if priced else None
        s["cost_total"] = cost if priced else None
        s["cost_per_million_tokens"] = _cost_per_million(cost, s["generation_tokens_total"]) if priced else None
        s["recent_cost_per_million_tokens"] = (price / (rate * 3600.0) * 1e6) if priced and rate else None


def host_rendezvous_store(host: str, port: int):
    """The torch.distributed rendezvous `TCPStore` server, listening on `host`:`port` only.

    Left to itself, TCPStore's server listens on every interface (`*:port`, IPv6 dual-stack):
    its host argument only tells clients where to connect. So the listening socket is made here,
    bound to `host` (`*` or an empty host: every interface, as ZeroMQ's `tcp://*`), and handed to
    the store (`master_listen_fd`, libuv backend), which owns and closes it. Raises OSError when
    the address cannot be bound (in use, not local).
    """
    import torch.distributed as dist

    bind_host = None if host in ("*", "") else host.strip("[]")
    family, kind, proto, _, addr = socket.getaddrinfo(bind_host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    fd = sock.detach()  # the store's server owns the descriptor from here on
    connect_host = "127.0.0.1" if bind_host is None else bind_host  # the server's own client
    return dist.TCPStore(connect_host, port, is_master=True, wait_for_workers=False, master_listen_fd=fd,
                         use_libuv=True)


def _cost_per_million(cost: float, tokens: int) -> float | None:
    return cost / tokens * 1e6 if tokens > 0 else None


def _process_stats() -> dict:
    """This process: `pid`, resident memory `rss_bytes` and open file descriptors `num_fds`
    (Linux /proc; zeros elsewhere), for leak checks under load and fuzzing."""
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        rss = fds = 0
    return {"pid": os.getpid(), "rss_bytes": rss, "num_fds": fds}


def _dt(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def main(config: ClusterConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        coordinator = Coordinator(config)
    except PlanError as exc:  # impossible layout: refuse before any worker loads anything
        log.error("no plan fits: %s", exc)
        return 2
    except ModelError as exc:  # unknown model, unreadable file: one line, not a traceback
        log.error("cannot serve the model: %s", exc)
        return 2
    try:
        return coordinator.serve_forever()
    except SecurityError as exc:  # the bind rule, or a bad key file: refuse before binding anything
        log.error("refusing to start: %s", exc)
        return 2
