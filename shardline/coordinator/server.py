"""Coordinator process: the client and worker planes (ZeroMQ ROUTER sockets, CurveZMQ), the
rendezvous store, and the serving loop, which routes each frame to the part that owns its job:

    registry.py          workers: registration checks, liveness, per-worker figures
    lifecycle.py         plan, assign, ready, loss and recovery, a worker's drain, shutdown
    dispatcher.py        scheduler output -> STEP messages, steps in flight, results back
    input_processor.py   GENERATE -> tokenized sequences in the scheduler; the request table
    output_processor.py  new tokens -> DELTA / DONE (stop strings, cancel)

None of them touches a socket: they send through an `Outbox` (`ZmqOutbox` here). The busy loop:

    1. read the inbox (client requests, worker results and heartbeats)
    2. schedule: while the plan has room for another step in flight, ask the scheduler
    3. dispatch each new step to every worker
    4. emit the text deltas / DONE messages of the tokens the results brought (after 2-3, so the
       first stage is not idle while they are detokenized and sent)
    5. liveness (heartbeats, recovery deadline), a worker drain's progress, allow-list reload
       (SIGHUP), the end of a shutdown
    6. stats: throughput window and Prometheus gauges
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import signal
import socket
import time

import zmq

from shardline.coordinator.dispatcher import Dispatcher
from shardline.coordinator.input_processor import InputProcessor, RequestTable
from shardline.coordinator.lifecycle import PlanLifecycle
from shardline.coordinator.metrics import CoordinatorMetrics, CoordinatorStats, RateWindow, process_stats
from shardline.coordinator.outbox import Outbox, ZmqOutbox
from shardline.coordinator.output_processor import OutputProcessor
from shardline.coordinator.planner import PlanError
from shardline.coordinator.registry import WorkerRegistry
from shardline.coordinator.served_model import ServedModel
from shardline.coordinator.shard_server import ShardServer
from shardline.coordinator.sequence import Sequence
from shardline import messages as M
from shardline import protocol as P
from shardline.config import ClusterConfig
from shardline.model_file import ModelError
from shardline.protocol import ErrorCode, MsgType, ProtocolError
from shardline.security import (CLIENT_DOMAIN, WORKER_DOMAIN, SecurityError, check_bind, configure_curve_server,
                                is_loopback, load_keypair, load_public_keys, start_authenticator)

log = logging.getLogger("shardline.coordinator")

METRICS_INTERVAL_S = 0.5  # how often the serving loop refreshes gauges and the throughput window


class PlaneSecurity:
    """The bind rule and, with `security.server_key`, CurveZMQ on both planes: a ZAP authenticator
    with one allow-list per plane (`security.client_keys`, `security.worker_keys`)."""

    def __init__(self, config: ClusterConfig):
        self.config = config.security
        self.host = config.coordinator.host
        self.authenticator = None
        self._allow_sources: dict[str, object] = {}
        self._refused_keys: set[str] = set()  # revoked keys whose messages were dropped (logged once)

    def start(self, ctx: zmq.Context) -> bytes | None:
        """Check the bind rule and start the authenticator. Returns the server's secret key (Z85),
        or None without keys.

        Raises:
            SecurityError: an open bind without keys or `security.insecure`, or a bad key file.
        """
        sec = self.config
        check_bind(self.host, sec.server_key, sec.insecure)
        if sec.server_key is None:
            if not is_loopback(self.host):
                log.warning("security.insecure: client and worker planes on %s are unencrypted and open", self.host)
            return None
        _, secret = load_keypair(sec.server_key)
        allowed = {CLIENT_DOMAIN: None if sec.client_keys is None else load_public_keys(sec.client_keys),
                   WORKER_DOMAIN: None if sec.worker_keys is None else load_public_keys(sec.worker_keys)}
        self.authenticator = start_authenticator(ctx, allowed)
        self._allow_sources = {CLIENT_DOMAIN: sec.client_keys, WORKER_DOMAIN: sec.worker_keys}
        log.info("CurveZMQ on: %s client keys, %s worker keys allowed",
                 *("any" if k is None else len(k) for k in allowed.values()))
        return secret

    def reload(self) -> bool:
        """Re-read the allow-list files, as on SIGHUP: a key added is admitted at its next
        handshake; a key removed is refused at its next handshake, and every message still
        arriving on a connection it opened before is dropped (a revoked worker stops counting as
        alive and is lost after the heartbeat timeout). An unreadable or empty list keeps every
        old list (a typo must not lock everyone out) and is logged. Returns whether the lists
        were replaced."""
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

    def revoked(self, domain: str, frames: list) -> bool:
        """Whether a message (zmq.Frames) comes from a CURVE peer whose key has been taken off its
        plane's allow-list since it connected; logged once per key."""
        if self.authenticator is None or not frames[-1].bytes:
            return False
        try:
            key = frames[-1].get("User-Id")
        except zmq.ZMQError:  # no metadata (not a CURVE connection): ZAP admitted it as configured
            return False
        if self.authenticator.allows(domain, key):
            return False
        if key not in self._refused_keys:
            self._refused_keys.add(key)
            log.warning("dropping messages on the %s plane from revoked public key %s", domain, key)
        return True

    def stop(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()


class Coordinator:
    """One coordinator process: its sockets and the parts the serving loop routes frames to.
    `outbox`: where the parts send (default: the sockets, once `start` binds them); `model`: the
    served model if already open (default: `ServedModel.open(config)`, which raises ModelError or
    PlanError)."""

    def __init__(self, config: ClusterConfig, outbox: Outbox | None = None, model: ServedModel | None = None):
        self.config = config
        self.model = ServedModel.open(config) if model is None else model
        self.stats = CoordinatorStats()
        self.metrics = CoordinatorMetrics(self.model.model_id, self.model.max_model_len)
        self.throughput = RateWindow(config.metrics.window_s)  # generation_tokens_total over time
        self.outbox = ZmqOutbox(None, None, self.metrics) if outbox is None else outbox
        self.outbox.on_client_gone = lambda client: self.output.client_gone(client, self.dispatcher.scheduler)
        self.requests = RequestTable()
        self.registry = WorkerRegistry(config, self.model, self.outbox, self.metrics)
        self.input = InputProcessor(self.model, self.requests, self.outbox, self.metrics, self.stats)
        self.output = OutputProcessor(self.model.tokenizer, self.requests, self.outbox, self.metrics, self.stats)
        self.dispatcher = Dispatcher(self.requests, self.outbox, self.metrics, self.stats)
        self.shard_server = ShardServer(self.model.path, self.model.spec, self.model.digest)
        self.lifecycle = PlanLifecycle(config, self.model, self.registry, self.dispatcher, self.requests, self.output,
                                       self.outbox, self.shard_server)
        self.security = PlaneSecurity(config)
        self._to_emit: list[Sequence] = []  # sequences with a new token, streamed after the next dispatch
        self._stop = False
        self._reload_keys = False  # SIGHUP: re-read the allow-lists at the next loop turn

    # ---- sockets -------------------------------------------------------------------------
    def start(self) -> None:
        """Bind both planes, the rendezvous store and the metrics endpoint.

        Raises:
            SecurityError: the bind rule or a key file (nothing is bound).
            zmq.ZMQError, OSError: an address cannot be bound.
        """
        c = self.config.coordinator
        self.ctx = zmq.Context.instance()
        curve = self.security.start(self.ctx)
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
        if isinstance(self.outbox, ZmqOutbox):
            self.outbox.worker_sock, self.outbox.client_sock = self.worker_sock, self.client_sock
        self.store = host_rendezvous_store(c.host, c.rendezvous_port)
        if self.config.metrics.enabled:
            self.metrics.start_http_server(self.config.metrics.host, self.config.metrics.port)
        log.info("coordinator up: clients %s, workers %s, rendezvous %s:%d, model %s (%s)",
                 self.config.client_address, self.config.worker_address, c.host, c.rendezvous_port,
                 self.model.model_id, self.model.path)

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        self.lifecycle.close()
        self.client_sock.close(linger=0)
        self.worker_sock.close(linger=0)
        self.security.stop()
        self.metrics.stop_http_server()
        del self.store

    def begin_shutdown(self) -> None:
        """Graceful shutdown (SIGTERM/SIGINT): see `PlanLifecycle.begin_shutdown`; a second signal
        stops at once."""
        if not self.lifecycle.begin_shutdown():
            self._stop = True

    # ---- the loop ------------------------------------------------------------------------
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
            lifecycle = self.lifecycle
            while not self._stop:
                # 1. read the inbox
                timeout_ms = 0 if self._can_dispatch() else int(hb * 1000 / 4)
                events = dict(poller.poll(timeout_ms))
                if self.worker_sock in events:
                    self._read_all(self.worker_sock)
                if self.client_sock in events:
                    self._read_all(self.client_sock)
                # 2-3. schedule and dispatch
                self.dispatch_steps()
                # 4. stream the new tokens
                self.emit_outputs()
                # 5. liveness
                now = time.monotonic()
                if now - last_hb >= hb:
                    last_hb = now
                    # Heartbeats queued while the loop was busy (a long request parse, a big step)
                    # are read before anyone is judged: a stalled coordinator must not declare its
                    # workers dead.
                    self._read_all(self.worker_sock)
                    lifecycle.tick(now)
                lifecycle.advance_worker_drain(now)
                if self._reload_keys:  # SIGHUP
                    self._reload_keys = False
                    self.security.reload()
                if lifecycle.shutting_down and (not self.requests or now > lifecycle.shutdown_deadline):
                    if self.requests:
                        log.error("shutdown timed out with %d sequences running", len(self.requests))
                        self.exit_code = 3
                    self._stop = True
                # 6. stats: throughput window and Prometheus gauges
                if now - last_metrics >= METRICS_INTERVAL_S:
                    last_metrics = now
                    self.throughput.add(now, self.stats.generation_tokens_total)
                    self.metrics.set_state(self.stats_snapshot())
        finally:
            self.close()
        return self.exit_code

    def _can_dispatch(self) -> bool:
        return self.lifecycle.dispatching and self.dispatcher.can_dispatch()

    def dispatch_steps(self) -> None:
        """Schedule and dispatch steps while the plan has room for another in flight."""
        while self._can_dispatch():
            out = self.dispatcher.scheduler.schedule()
            if out is None:
                break
            failed = self.dispatcher.dispatch(out)
            if failed is not None:
                self.lifecycle.worker_lost(failed[0], f"send failed: {failed[1]}")

    def emit_outputs(self) -> None:
        """Stream the tokens the step results brought. This runs after the dispatch, so the first
        stage is not idle while 32-64 deltas are detokenized and sent; a stop string found here
        ends its sequence one step late at most (that step's token is dropped like a cancelled
        one's)."""
        pending, self._to_emit = self._to_emit, []
        for seq in pending:
            self.output.emit(seq, self.dispatcher.scheduler)

    def _read_all(self, sock: zmq.Socket, limit: int = 1000) -> None:
        """Read and route up to `limit` queued messages of one plane, without blocking."""
        client_plane = sock is self.client_sock
        secure = self.security.authenticator is not None
        for _ in range(limit):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=not secure)
            except zmq.Again:
                return
            if secure:  # frames with metadata: check the sender's key
                if self.security.revoked(CLIENT_DOMAIN if client_plane else WORKER_DOMAIN, frames):
                    continue
                frames = [f.bytes for f in frames]
            if len(frames) != 2:
                if client_plane and frames:
                    self.outbox.error_to_client(frames[0], "", ErrorCode.BAD_FRAME,
                                                f"expected 1 frame, got {len(frames) - 1}")
                elif frames:
                    self.outbox.to_worker_plane(frames[0], P.error(ErrorCode.BAD_FRAME,
                                                                   f"expected 1 frame, got {len(frames) - 1}"))
                continue
            identity, frame = frames
            if not frame:  # ROUTER_NOTIFY: the peer disconnected
                if client_plane:
                    self.output.client_gone(identity, self.dispatcher.scheduler)
                continue
            if client_plane:
                self.on_client_frame(identity, frame)
            else:
                self.on_worker_frame(identity, frame)

    # ---- routing -------------------------------------------------------------------------
    def on_worker_frame(self, identity: bytes, frame: bytes) -> None:
        """Route one worker-plane message; a malformed or unexpected one is answered with ERROR."""
        try:
            msg_type, body = P.decode(frame, accept=P.WORKER_REQUESTS)
            w = self.registry.sender(identity, body)
            if w is None and msg_type is not MsgType.REGISTER:
                if self.registry.is_lost(identity, body):
                    # a worker declared lost (told SHUTDOWN by `sender`): dropped without an
                    # ERROR, which would make a worker that is re-registering think it was refused
                    log.debug("dropped %s from %r (not a live registered worker)", msg_type.name, identity)
                    return
                if self.registry.is_early_heartbeat(identity, body):
                    # a worker that started before this coordinator bound its socket: its queued
                    # heartbeats can be read before its REGISTER (ZeroMQ delivers per connection)
                    log.debug("heartbeat from %r before its worker registered", identity)
                    return
                raise ProtocolError(f"{msg_type.name} from {identity!r}, which is not a live registered worker")
            if msg_type is MsgType.STEP_RESULT:
                if self.lifecycle.is_sampler(w):  # not: a result of an abandoned plan, or a non-sampler's
                    self._to_emit.extend(self.dispatcher.on_step_result(body))
            elif msg_type is MsgType.ERROR:  # its data plane failed: a peer may be dead, let liveness tell
                self.lifecycle.on_data_plane_error(w, body)
            elif msg_type is MsgType.HEARTBEAT:
                a = self.lifecycle.placement().get(w.worker_id)
                self.registry.on_heartbeat(w, body, a.stage if a is not None else None)
            elif msg_type is MsgType.REGISTER:
                self.lifecycle.on_register(identity, body)
            elif msg_type is MsgType.READY:
                self.lifecycle.on_ready(identity, body)
            else:  # SHARD_REQUEST, SHARD_FETCH: shard_server.py
                self.outbox.to_worker(w, self.shard_server.answer(w.worker_id, body,
                                                                  self.lifecycle.shard_of(w.worker_id)))
        except ProtocolError as exc:
            log.warning("refused a message from worker %r: %s", identity, exc)
            self.outbox.to_worker_plane(identity, P.error(exc.code, str(exc)))
        except Exception:  # a bug or a hostile peer must not take the coordinator down
            log.exception("error handling a worker message from %r", identity)

    def on_client_frame(self, client: bytes, frame: bytes) -> None:
        """Route one client-plane message; every failure is answered with ERROR (naming the
        request id when the body has one, even a body that failed to decode)."""
        request_id = ""
        scheduler = self.dispatcher.scheduler
        try:
            try:
                msg_type, body = P.decode(frame, P.MAX_CLIENT_FRAME_BYTES, accept=P.CLIENT_REQUESTS)
            except ProtocolError as exc:  # echo the request id, so the client can match the refusal
                if exc.code in (ErrorCode.BAD_FRAME, ErrorCode.UNKNOWN_TYPE) and len(frame) <= P.MAX_CLIENT_FRAME_BYTES:
                    request_id = P.request_id_of(frame)
                raise
            request_id = body.request_id if len(body.request_id) <= 128 else ""  # echoed in replies
            if msg_type is MsgType.GENERATE:
                self.input.on_generate(client, body, scheduler, self.lifecycle.refusal())
            elif msg_type is MsgType.CANCEL:
                self.output.cancel(client, request_id, scheduler)
            elif msg_type is MsgType.DRAIN_WORKER:
                self.lifecycle.on_drain_worker(client, request_id, body)
            elif msg_type is MsgType.HEALTH:
                self.outbox.to_client(client, self.health(request_id))
            elif msg_type is MsgType.STATS:
                self.outbox.to_client(client, self.stats_snapshot(request_id))
            else:  # MODELS
                m = self.model
                self.outbox.to_client(client, M.ModelsReply(models=[M.ModelCard(
                    id=m.model_id, name=m.spec.name, context_length=m.max_model_len,
                    architecture=m.spec.architecture)], request_id=request_id))
        except ProtocolError as exc:
            self.outbox.error_to_client(client, request_id, exc.code, str(exc))
        except (ValueError, TypeError) as exc:
            self.outbox.error_to_client(client, request_id, ErrorCode.INVALID_REQUEST, str(exc))
        except Exception as exc:  # a bug must not take the coordinator down
            log.exception("error handling a client message")
            self.outbox.error_to_client(client, request_id, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")

    # ---- introspection -------------------------------------------------------------------
    def health(self, request_id: str = "") -> M.HealthReply:
        """HEALTH_REPLY: status, workers up and expected (one fewer per worker an operator drained)."""
        return M.HealthReply(status=self.lifecycle.health_status, workers_up=self.registry.num_alive,
                             workers_expected=max(0, self.config.workers.count - self.registry.num_drained),
                             model=self.model.model_id, request_id=request_id)

    def stats_snapshot(self, request_id: str = "") -> M.StatsReply:
        """STATS_REPLY (docs/protocol.md): counters, state, queues and KV cache, the worker drain in
        progress, every worker, throughput and cost, the plan."""
        scheduler = self.dispatcher.scheduler
        queues = {}
        if scheduler is not None:
            bm = scheduler.block_manager
            queues = dict(num_requests_running=len(scheduler.running), num_requests_waiting=len(scheduler.waiting),
                          num_steps_in_flight=self.dispatcher.num_in_flight,
                          num_kv_blocks=bm.num_blocks, num_free_blocks=bm.num_free_blocks, kv_cache_usage=bm.usage,
                          num_preemptions_total=scheduler.stats.num_preemptions,
                          prefix_cache_hit_blocks=bm.num_prefix_hits, async_scheduling=scheduler.lookahead,
                          num_continuations_total=scheduler.stats.num_continuations)
        d = self.lifecycle.worker_drain
        rate = self.throughput.rate()
        plan = self.lifecycle.plan
        return M.StatsReply(
            request_id=request_id, **dataclasses.asdict(self.stats), state=self.lifecycle.status,
            coordinator=M.ProcessStats(**process_stats()), **queues,
            worker_drain=None if d is None else M.WorkerDrainState(
                worker_id=d.worker_id, phase=d.phase.value, elapsed_s=time.monotonic() - d.started),
            workers=self.registry.stats(self.lifecycle.placement()),
            throughput_window_s=self.config.metrics.window_s, generation_tokens_per_s=rate,
            **self.registry.cost(self.stats.generation_tokens_total, rate),
            plan=None if plan is None else plan.to_dict())


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
