"""Where the coordinator's parts send messages: the `Outbox` interface and its two implementations.

The registry, the plan lifecycle, the dispatcher and the input and output processors never touch
a socket: they hand (peer, message body) to an `Outbox`; the body's struct
(`shardline.messages`) names its type. `ZmqOutbox` frames them onto the two ROUTER sockets the
server owns; `RecordingOutbox` keeps them in lists, so those parts are tested in one process
without sockets (it encodes and decodes every body, so what a test reads is what the wire would
carry).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import zmq

from shardline import messages as M
from shardline import protocol as P
from shardline.protocol import ErrorCode, MsgType

if TYPE_CHECKING:
    from shardline.coordinator.metrics import CoordinatorMetrics
    from shardline.coordinator.registry import WorkerInfo

log = logging.getLogger("shardline.coordinator")


class Outbox:
    """Sends to workers (worker plane) and clients (client plane); never blocks.

    `on_client_gone(client)` is called when a send finds a client gone (set by whoever owns the
    request table, which drops that client's requests)."""

    def __init__(self) -> None:
        self.on_client_gone: Callable[[bytes], None] = lambda client: None

    def to_worker(self, worker: WorkerInfo, body: M.Message) -> bool:
        """Send one message to `worker`. Returns False when it cannot be reached (its connection is
        gone, or its queue is full); the caller decides whether that makes it lost."""
        return self.to_workers([worker], body) is None

    def to_workers(self, workers: list[WorkerInfo], body: M.Message) -> tuple[WorkerInfo, str] | None:
        """Send one message to each of `workers` in order (encoded once). Stops at the first worker
        that cannot be reached and returns it with why; None when every one was sent."""
        raise NotImplementedError

    def to_worker_plane(self, identity: bytes, body: M.Message) -> None:
        """Send one message to routing id `identity` on the worker plane, which need not be a
        registered worker (a refused REGISTER, a malformed frame); dropped if it cannot be reached."""
        raise NotImplementedError

    def to_client(self, client: bytes, body: M.Message) -> None:
        """Send one message to the client with routing id `client`. A client that cannot be
        reached is gone: `on_client_gone(client)` is called."""
        raise NotImplementedError

    def error_to_client(self, client: bytes, request_id: str, code: ErrorCode, message: str) -> None:
        """An ERROR for the client's request `request_id` ("" when the message named none)."""
        self.to_client(client, P.error(code, message, request_id=request_id))


class ZmqOutbox(Outbox):
    """The sockets' outbox: non-blocking sends on the server's ROUTER sockets (ROUTER_MANDATORY,
    so an unroutable peer raises instead of being dropped silently). Every ERROR to a client is
    counted in `metrics` by code."""

    def __init__(self, worker_sock: zmq.Socket | None, client_sock: zmq.Socket | None, metrics: CoordinatorMetrics):
        super().__init__()
        self.worker_sock = worker_sock
        self.client_sock = client_sock
        self.metrics = metrics

    def to_workers(self, workers: list[WorkerInfo], body: M.Message) -> tuple[WorkerInfo, str] | None:
        frame = P.encode(body)
        for w in workers:
            try:
                self.worker_sock.send_multipart([w.identity, frame], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("cannot reach worker %s: %s", w.worker_id, exc)
                return w, str(exc)
        return None

    def to_worker_plane(self, identity: bytes, body: M.Message) -> None:
        try:
            self.worker_sock.send_multipart([identity, P.encode(body)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def to_client(self, client: bytes, body: M.Message) -> None:
        if isinstance(body, M.Error):
            self.metrics.on_error(body.code_name)
        try:
            self.client_sock.send_multipart([client, P.encode(body)], zmq.NOBLOCK)
        except zmq.ZMQError:  # unroutable (gone) or at the high-water mark: drop its requests
            self.on_client_gone(client)


class RecordingOutbox(Outbox):
    """An outbox in memory, for tests: `worker_messages` holds (worker id, or routing id as text
    for `to_worker_plane`, type, body) and
    `client_messages` (client routing id, type, body), in the order sent, each body as the peer
    would decode it. Sends to the worker ids in `unreachable` fail; a send to a client in
    `gone_clients` is dropped and reported to `on_client_gone`."""

    def __init__(self) -> None:
        super().__init__()
        self.worker_messages: list[tuple[str, MsgType, M.Message]] = []
        self.client_messages: list[tuple[bytes, MsgType, M.Message]] = []
        self.unreachable: set[str] = set()
        self.gone_clients: set[bytes] = set()

    def to_workers(self, workers: list[WorkerInfo], body: M.Message) -> tuple[WorkerInfo, str] | None:
        frame = P.encode(body)
        for w in workers:
            if w.worker_id in self.unreachable:
                return w, "Host unreachable"
            self.worker_messages.append((w.worker_id, *P.decode(frame)))
        return None

    def to_worker_plane(self, identity: bytes, body: M.Message) -> None:
        self.worker_messages.append((identity.decode(errors="replace"), *P.decode(P.encode(body))))

    def to_client(self, client: bytes, body: M.Message) -> None:
        if client in self.gone_clients:
            self.on_client_gone(client)
            return
        self.client_messages.append((client, *P.decode(P.encode(body), P.MAX_CLIENT_FRAME_BYTES)))

    def to(self, peer: str | bytes, msg_type: MsgType | None = None) -> list[M.Message]:
        """The bodies sent to worker id or client `peer` (of `msg_type` only, if given)."""
        sent = self.worker_messages if isinstance(peer, str) else self.client_messages
        return [body for p, t, body in sent if p == peer and (msg_type is None or t is msg_type)]

    def types(self, peer: str | bytes) -> list[MsgType]:
        """The types of the messages sent to `peer`, in order."""
        sent = self.worker_messages if isinstance(peer, str) else self.client_messages
        return [t for p, t, _ in sent if p == peer]

    def clear(self) -> None:
        self.worker_messages.clear()
        self.client_messages.clear()
