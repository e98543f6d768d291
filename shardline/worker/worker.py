"""Worker process: registers with the coordinator, loads its shard, executes the steps it is sent.

The worker decides nothing: it replays exactly the steps the coordinator sends (STEP), in the
order sent. Loop:

    1. poll the coordinator socket (up to one heartbeat interval)
    2. ASSIGN -> leave the old plan, load the shard (step_runner.py), reply READY
       STEP   -> execute it (step_runner.py), reply STEP_RESULT from the last stage
       SHUTDOWN -> leave the loop, or with reason "lost" leave the plan and register again
    3. exit if the coordinator has been silent too long

Heartbeats go out from a thread of their own (`_heartbeat_loop`). Whatever ends this worker's
part in a plan (a new ASSIGN, a data-plane failure, being declared lost, a silent coordinator)
goes through `_leave_plan`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid

import torch
import zmq

from shardline import __version__
from shardline import messages as M
from shardline import protocol as P
from shardline.protocol import MsgType
from shardline.worker.process import default_memory_bytes, keep_freed_memory, local_ip_towards, rss_bytes
from shardline.worker.step_runner import StepRunner, StepTimes
from shardline.worker.weight_source import WeightSource

log = logging.getLogger("shardline.worker")


class Worker:
    def __init__(self, coordinator: str, device: str = "cpu", threads: int = 1, memory_bytes: int | None = None,
                 worker_id: str | None = None, host: str | None = None, price_per_hour: float | None = None,
                 *, speed: float = 1.0, model_path: str | None = None, use_local_model: bool = True):
        """`coordinator`: its worker-plane address, tcp://HOST:PORT. `memory_bytes`: offered for
        weights and KV cache (default: 80% of RAM). `host`: the address this worker is reached at
        (default: the one routing to the coordinator). `speed`: relative speed declared to the
        planner (> 0). `model_path`: this host's copy of the model (its digest goes into
        REGISTER; a mismatch is refused by the coordinator). `use_local_model` False: never read
        a model file here, always receive the shard from the coordinator.

        Raises ValueError: speed <= 0 or price_per_hour < 0."""
        if not speed > 0:
            raise ValueError(f"speed={speed}: must be > 0")
        self.speed = speed
        self.weights = WeightSource(model_path, use_local_model)
        if price_per_hour is not None and not price_per_hour >= 0:
            raise ValueError(f"price_per_hour={price_per_hour}: must be >= 0")
        self.price_per_hour = price_per_hour
        self.coordinator = coordinator
        self.device = device
        self.threads = threads
        self.memory_bytes = memory_bytes or default_memory_bytes()
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.incarnation = uuid.uuid4().hex[:12]
        self.host = host or local_ip_towards(coordinator)
        self.heartbeat_interval_s = 1.0
        self.heartbeat_misses = 10
        self.curve_keys: tuple[str, str, str] | None = None  # (server public, own public, own secret), Z85
        # the plan of the last ASSIGN (named in READY and data-plane ERRORs), None before one since
        # registering: the coordinator's silence ends the worker only within a plan
        self.plan_id: int | None = None
        self.runner: StepRunner | None = None  # None: no shard, or the data plane broke (until the next ASSIGN)
        self.times = StepTimes()
        self._stop = False

    # ---- lifecycle -----------------------------------------------------------------------
    def run(self) -> int:
        """Register, serve until SHUTDOWN, a signal, a refusal or a silent coordinator; return
        the exit code (0, or 1 after a refusal or a silent coordinator)."""
        keep_freed_memory()
        torch.set_num_threads(self.threads)
        os.environ.setdefault("NUMBA_NUM_THREADS", str(self.threads))
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        ctx = zmq.Context.instance()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, self.worker_id.encode())
        self._configure_socket(self.sock)
        self.sock.connect(self.coordinator)
        self._register()
        self._hb_stop = threading.Event()
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._hb_thread.start()
        last_heard = time.monotonic()
        rc = 0
        try:
            while not self._stop:
                if self.sock.poll(int(self.heartbeat_interval_s * 1000)):
                    try:
                        msg_type, body = P.decode(self.sock.recv())
                    except P.ProtocolError as exc:
                        log.error("bad frame from the coordinator: %s", exc)
                        continue
                    last_heard = time.monotonic()
                    if msg_type is MsgType.STEP:
                        if self.runner is not None:  # else: the group broke; wait for the next ASSIGN
                            self._step(body)
                    elif msg_type is MsgType.ASSIGN:
                        self._assign(body)
                    elif msg_type is MsgType.SHUTDOWN and body.reason == "lost":
                        self._rejoin()
                    elif msg_type is MsgType.SHUTDOWN:
                        log.info("worker %s: shutdown requested", self.worker_id)
                        break
                    elif msg_type is MsgType.ERROR:
                        log.error("coordinator refused this worker: %s", body.message)
                        rc = 1
                        break
                    last_heard = time.monotonic()  # handling (a load) may take long
                now = time.monotonic()
                if self.plan_id is not None and now - last_heard > self.heartbeat_interval_s * self.heartbeat_misses:
                    log.error("coordinator silent for %.1f s; exiting", now - last_heard)
                    self._leave_plan()  # cut off: pending sends would only wait out their timeout
                    rc = 1
                    break
        finally:
            self.close()
        return rc

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        """Stop the heartbeat thread, leave the plan after the sends in flight, close the socket."""
        if getattr(self, "_hb_stop", None) is not None:
            self._hb_stop.set()
            self._hb_thread.join(timeout=5)
        self._leave_plan(wait_sends=True)
        self.sock.close(linger=0)

    def _register(self) -> None:
        model_digest, model_path = self.weights.local_model_file()
        self._send(M.Register(
            worker_id=self.worker_id, incarnation=self.incarnation, host=self.host, device=self.device,
            memory_bytes=self.memory_bytes, version=__version__, pid=os.getpid(), threads=self.threads,
            price_per_hour=self.price_per_hour, speed=self.speed, model_digest=model_digest, model_path=model_path,
            protocol=f"{P.PROTOCOL_MAJOR}.{P.PROTOCOL_MINOR}"))
        log.info("worker %s registered with %s from %s", self.worker_id, self.coordinator, self.host)

    def _assign(self, a: M.Assign) -> None:
        """ASSIGN: leave the old plan, load the new shard and reply READY; a failure (e.g. a peer
        died during the rendezvous) is reported as a data-plane failure."""
        self._leave_plan()
        self.plan_id = a.plan_id
        self.heartbeat_interval_s = a.heartbeat_interval_s
        self.heartbeat_misses = max(self.heartbeat_misses, a.heartbeat_misses * 2)
        try:
            self.runner = StepRunner.load(a, self.device, self.host, self.weights, self.sock, self.worker_id,
                                          self.times)
            self._send(self.runner.ready(self.worker_id, self.plan_id))
        except Exception as exc:
            log.exception("ASSIGN failed")
            self._drop_data_plane(f"ASSIGN of plan {self.plan_id}: {exc}")

    def _step(self, step: M.Step) -> None:
        """STEP: execute it and send the STEP_RESULT (last stage); a failure (a dead peer's
        gloo/NCCL/stream error or timeout, or a bug) is reported as a data-plane failure."""
        try:
            result = self.runner.execute_step(step)
            if result is not None:
                self._send(result)
        except Exception as exc:
            log.exception("step %s failed", step.step_id)
            self._drop_data_plane(f"step {step.step_id}: {exc}")

    def _leave_plan(self, wait_sends: bool = False) -> None:
        """Leave the torch.distributed group (a broken one too) and drop what belonged to the
        plan: the stage model, the KV cache, the block tables and the sequences' sampling state.
        `wait_sends`: let the sends in flight complete first (an orderly shutdown)."""
        runner, self.runner = self.runner, None
        if runner is None:
            return
        try:
            runner.close(wait_sends=wait_sends)
        except Exception as exc:  # a send to a peer that is gone; the group is left all the same
            log.warning("leaving the old group: %s", exc)

    def _drop_data_plane(self, why: str) -> None:
        """The torch.distributed group is broken (a peer died or timed out) or could not be
        joined: leave the plan, tell the coordinator (it re-plans), and wait for the next ASSIGN;
        STEPs until then are ignored. The ERROR names the plan that failed: a survivor blocked on
        a cut-off peer until `data_plane_timeout_s` reports it after the coordinator may already
        have re-planned, and that report must not break the new plan."""
        log.error("worker %s: data plane failed: %s", self.worker_id, why)
        self._leave_plan()
        self._send(P.error(P.ErrorCode.UNAVAILABLE, f"data plane failed: {why}", plan_id=self.plan_id))

    def _rejoin(self) -> None:
        """SHUTDOWN {reason: lost}: the coordinator declared this worker lost (it was frozen, cut
        off or too slow to heartbeat) and re-planned without it. Leave the plan and register
        again as a new incarnation: the coordinator may put it back into a plan (e.g. when the
        survivors alone cannot serve)."""
        log.warning("worker %s: declared lost by the coordinator; dropping the shard and registering again",
                    self.worker_id)
        self._leave_plan()
        self.plan_id = None
        self.incarnation = uuid.uuid4().hex[:12]
        self._register()

    def _heartbeat_loop(self) -> None:
        """Thread: a HEARTBEAT every `heartbeat_interval_s` from a socket of its own (routing id
        `<worker id>#hb`; ZeroMQ sockets are not shared between threads), so a long load or a
        data-plane receive blocked on a dead peer does not make this worker look dead. Only a
        dead, frozen (SIGSTOP) or cut-off process stops heartbeating."""
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, self.worker_id.encode() + b"#hb")
        sock.setsockopt(zmq.SNDHWM, 4)  # never queue more than a few stale heartbeats
        self._configure_socket(sock)
        sock.connect(self.coordinator)
        try:
            while not self._hb_stop.wait(self.heartbeat_interval_s):
                times, runner = self.times, self.runner
                body = M.Heartbeat(worker_id=self.worker_id, incarnation=self.incarnation, num_steps=times.num_steps,
                                   step_time_s=times.step_time_s, rss_bytes=rss_bytes(), busy_s=times.busy_s,
                                   step_times_s=times.take_recent(),
                                   comm=None if runner is None else M.CommStats(**runner.comm.stats()))
                try:
                    sock.send(P.encode(body), zmq.NOBLOCK)
                except zmq.Again:  # the coordinator is unreachable; it will time this worker out
                    pass
        finally:
            sock.close(linger=0)

    def _configure_socket(self, sock) -> None:
        """CurveZMQ client keys on a worker-plane socket when `curve_keys` were given."""
        if self.curve_keys is not None:
            from shardline.security import configure_curve_client

            configure_curve_client(sock, *self.curve_keys)

    def _send(self, body: M.Message) -> None:
        self.sock.send(P.encode(body))


def main(coordinator: str, device: str = "cpu", threads: int = 1, memory_bytes: int | None = None,
         worker_id: str | None = None, host: str | None = None, price_per_hour: float | None = None,
         speed: float = 1.0, model_path: str | None = None, use_local_model: bool = True,
         curve_keys: tuple | None = None) -> int:
    """`curve_keys`: (coordinator public, own public, own secret) Z85 CurveZMQ keys, or None."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    w = Worker(coordinator, device, threads, memory_bytes, worker_id, host, price_per_hour, speed=speed,
               model_path=model_path, use_local_model=use_local_model)
    w.curve_keys = curve_keys
    return w.run()
