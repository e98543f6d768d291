"""Data plane between the workers: torch.distributed (gloo on CPU, NCCL on CUDA), and on CPU a
TCP stream per pipeline hand-off.

Ranks are laid out stage-major: rank = stage * tp_size + tp_rank. Pipeline parallelism sends
the hidden states `[num_tokens, hidden]` from (stage s, tp_rank r) to (stage s+1, tp_rank r):
over NCCL on CUDA, over a plain TCP stream on CPU (see `StageComm`); tensor parallelism
all-reduces over the stage's TP subgroup after each row-parallel linear and after the
vocabulary-parallel embedding, and all-gathers the vocabulary-parallel logits.
The coordinator hosts the rendezvous `TCPStore`; control never rides on this plane.

Async scheduling (shardline/coordinator/scheduler.py, `lookahead`) plans a sequence's next step
before its sampled token is known. With several stages the token stream, a TCP stream from the
last stage to the first, carries each step's sampled token ids (`send_sampled_tokens` /
`recv_sampled_tokens`) to the first stage, which feeds them to those steps. It is a plain socket
on any device (tensor_parallel 1 only).
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import select
import socket
import struct
import time

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("shardline.worker")


def interface_for_address(ip: str) -> str | None:
    """Name of the local network interface that holds IPv4 address `ip`, or None."""
    SIOCGIFADDR = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24])
            except OSError:
                continue
            if addr == ip:
                return name
    return None


STREAM_MAGIC = b"shardline-pp-stream/1 "
HELLO_TIMEOUT_S = 5.0  # seconds a connection to a stage's listener has to send its HELLO
MAX_PENDING_SENDS = 4  # NCCL: sends in flight before the oldest is waited for
ALL_REDUCE_IMPLS = ("p2p", "collective")


def _recv_exact(sock: socket.socket, n: int, into=None) -> bytes | None:
    """Read exactly n bytes from a stream socket: into the writable buffer `into` (a NumPy
    uint8 array of n bytes; returns None), or as bytes. Raises ConnectionError when the peer
    closes first, TimeoutError (an OSError) after the socket's timeout."""
    if into is None:
        chunks, got = [], 0
        while got < n:
            chunk = sock.recv(n - got)
            if not chunk:
                raise ConnectionError(f"peer closed the stream after {got} of {n} bytes")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    view, got = memoryview(into).cast("B"), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError(f"peer closed the stream after {got} of {n} bytes")
        got += k
    return None


class StageComm:
    """Sends and receives one stage's activations and all-reduces inside its TP group.

    CPU (gloo): the pipeline hand-off rides a TCP stream per stage pair, opened at rendezvous
    (the receiver listens on the worker's address and publishes it in the store). A send is
    a length header and the tensor's bytes; it returns once the kernel has them, and the next
    stage finds them in its socket when it asks. gloo's send/recv is a rendezvous instead: the
    receiver posts its recv, then the sender's and the receiver's gloo I/O threads must each get
    a core to move the bytes, which on a CPU host busy with the next micro-batch keeps a stage
    waiting for hidden states finished long before. A frozen peer fails a receive after
    `timeout_s` (TimeoutError), a dead one at once (ConnectionError). The process group stays:
    it is the rendezvous, and it carries the TP collectives.

    CUDA (NCCL): sends are asynchronous (`isend`): a stage moves on to its next micro-batch
    while the previous one's hidden states are in transit. Each sent tensor is kept alive until
    its send completes (at most MAX_PENDING_SENDS in flight); `close` waits for them.
    """

    def __init__(self, rank: int, world_size: int, stage: int, pp_size: int, tp_rank: int, tp_size: int,
                 store_host: str, store_port: int, prefix: str, backend: str, local_ip: str | None,
                 timeout_s: float = 60.0, token_stream: bool = False, all_reduce_impl: str | None = None):
        """Join the group `prefix` names in the store at store_host:store_port (every rank of
        `world_size` must), create the TP subgroups and open the streams. `local_ip`: this
        worker's address, where its stream listeners bind (needed on CPU with pp_size > 1).
        `timeout_s`: seconds any operation of the group may wait on a peer.

        token_stream: open the last stage -> first stage stream of sampled tokens (pp_size > 1,
        tp_size 1 and a local address needed; `has_token_stream` says whether it was opened).

        all_reduce_impl: how `all_reduce` and `all_gather` run under TP: "p2p" (one round of
        isend/irecv inside the group, `_all_reduce_p2p`), "collective" (torch.distributed's), or
        None: "p2p" on gloo, whose own collectives run several rounds and for a step's few rows
        on a CPU host cost more than one round of messages; "collective" on NCCL.

        Raises:
            ValueError: an unknown `all_reduce_impl`, or a CPU pipeline (gloo, pp_size > 1)
                without `local_ip`.
            torch.distributed.DistError (a RuntimeError): the store or a peer did not answer
                within `timeout_s`.
            OSError: a stream could not be opened within `timeout_s`.
        """
        if all_reduce_impl is None:
            all_reduce_impl = "p2p" if backend == "gloo" else "collective"
        if all_reduce_impl not in ALL_REDUCE_IMPLS:
            raise ValueError(f"all_reduce_impl={all_reduce_impl!r}: expected one of {', '.join(ALL_REDUCE_IMPLS)}")
        hidden_stream = backend == "gloo" and pp_size > 1
        if hidden_stream and not local_ip:
            raise ValueError("a CPU pipeline (gloo, pp_size > 1) needs local_ip: the address its hidden-state "
                             "streams listen on")
        self.all_reduce_impl = all_reduce_impl
        self.rank, self.world_size = rank, world_size
        self.stage, self.pp_size = stage, pp_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.backend = backend
        # the data plane uses the interface holding the address the worker registered with
        ifname_var = "GLOO_SOCKET_IFNAME" if backend == "gloo" else "NCCL_SOCKET_IFNAME"
        if local_ip and ifname_var not in os.environ:
            ifname = interface_for_address(local_ip)
            if ifname:
                os.environ[ifname_var] = ifname
        # cumulative seconds and calls, reported in heartbeats (`stats`)
        self.all_reduce_s = self.all_gather_s = self.send_s = self.recv_s = 0.0
        self.num_all_reduce = self.num_all_gather = self.num_send = self.num_recv = 0
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(store_host, store_port, is_master=False, timeout=timeout)
        self.store = dist.PrefixStore(prefix, store)
        dist.init_process_group(backend, store=self.store, rank=rank, world_size=world_size, timeout=timeout)
        self.tp_group = None
        self.tp_ranks = list(range(stage * tp_size, (stage + 1) * tp_size))  # global ranks of this stage's group
        if tp_size > 1:
            for s in range(pp_size):  # every rank must create every group, in the same order
                ranks = list(range(s * tp_size, (s + 1) * tp_size))
                g = dist.new_group(ranks, backend=backend, timeout=timeout)
                if s == stage:
                    self.tp_group = g
        self._pending = []  # NCCL: (work, tensor) of sends in flight, oldest first
        self.timeout_s = timeout_s
        self._send_sock: socket.socket | None = None  # CPU: hidden states to the next stage
        self._recv_sock: socket.socket | None = None  # CPU: hidden states from the previous stage
        self._token_send_sock: socket.socket | None = None  # the token stream: last stage -> first stage
        self._token_recv_sock: socket.socket | None = None
        token_stream = token_stream and pp_size > 1 and tp_size == 1 and bool(local_ip)
        if hidden_stream or token_stream:
            self._connect_streams(local_ip, prefix, hidden_stream, token_stream)

    @property
    def prev_rank(self) -> int:
        return (self.stage - 1) * self.tp_size + self.tp_rank

    @property
    def next_rank(self) -> int:
        return (self.stage + 1) * self.tp_size + self.tp_rank

    @property
    def has_token_stream(self) -> bool:
        """Whether this rank sends (last stage) or receives (first stage) the token stream."""
        return self._token_send_sock is not None or self._token_recv_sock is not None

    def _connect_streams(self, local_ip: str, prefix: str, hidden: bool, token_stream: bool) -> None:
        """Open the streams: with `hidden`, to the next stage and from the previous one; with
        `token_stream`, from the last stage to the first. Every receiving rank first listens on
        `local_ip` and publishes host:port in the store; then each sender connects (the listen
        backlog takes the connection before the accept), then each receiver accepts. A rank
        receives one stream at most (the first stage: the token stream; the others: the hidden
        states'). A connection that does not open with this group's HELLO and the expected
        sender's rank is refused."""
        hello = STREAM_MAGIC + prefix.encode()
        last = self.stage == self.pp_size - 1
        expect = None  # the rank this one accepts a stream from
        if hidden and self.stage > 0:
            expect = self.prev_rank
        elif token_stream and self.stage == 0:
            expect = (self.pp_size - 1) * self.tp_size + self.tp_rank
        listener = None
        if expect is not None:
            listener = socket.create_server((local_ip, 0))
            listener.settimeout(self.timeout_s)
            self.store.set(f"pp_stream/{self.rank}", f"{local_ip}:{listener.getsockname()[1]}")

        def connect(rank: int) -> socket.socket:
            host, port = self.store.get(f"pp_stream/{rank}").decode().rsplit(":", 1)
            sock = socket.create_connection((host, int(port)), timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(struct.pack("<I", len(hello)) + hello + struct.pack("<q", self.rank))
            return sock

        try:
            if hidden and not last:
                self._send_sock = connect(self.next_rank)
            if token_stream and last:
                self._token_send_sock = connect(self.tp_rank)  # the first stage's rank
            if listener is not None:
                deadline = time.monotonic() + self.timeout_s
                while self._recv_sock is None and self._token_recv_sock is None:
                    listener.settimeout(max(0.001, deadline - time.monotonic()))
                    sock, _ = listener.accept()  # socket.timeout (an OSError) after timeout_s
                    sock.settimeout(min(self.timeout_s, HELLO_TIMEOUT_S))  # a silent stranger is dropped
                    try:
                        n = struct.unpack("<I", _recv_exact(sock, 4))[0]
                        ok = n == len(hello) and _recv_exact(sock, n) == hello
                        ok = ok and struct.unpack("<q", _recv_exact(sock, 8))[0] == expect
                    except (OSError, ConnectionError, struct.error):
                        ok = False
                    if ok:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        sock.settimeout(self.timeout_s)
                        if self.stage == 0:
                            self._token_recv_sock = sock
                        else:
                            self._recv_sock = sock
                    else:
                        sock.close()
        finally:
            if listener is not None:
                listener.close()

    def send_hidden(self, x: torch.Tensor) -> None:
        """Send the hidden states x [num_tokens, hidden] to the next stage: on CPU over the
        stream (returns once the kernel has the bytes), on CUDA an `isend` kept in flight."""
        t0 = time.perf_counter()
        x = x.contiguous()
        if self._send_sock is not None:
            data = x.view(torch.uint8).numpy() if x.numel() else b""
            self._send_sock.sendall(struct.pack("<Q", x.numel() * x.element_size()))
            self._send_sock.sendall(data)
        else:
            self._pending.append((dist.isend(x, self.next_rank), x))  # keep x alive until sent
            if len(self._pending) > MAX_PENDING_SENDS:
                self._pending.pop(0)[0].wait()
        self.send_s += time.perf_counter() - t0
        self.num_send += 1

    def recv_hidden(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The previous stage's hidden states, a new tensor of `shape` ([num_tokens, hidden])
        and `dtype`. Raises ConnectionError when the stream carries another size (out of step)
        or the peer is gone, TimeoutError after `timeout_s`."""
        t0 = time.perf_counter()
        buf = torch.empty(shape, dtype=dtype)
        if self._recv_sock is not None:
            nbytes = struct.unpack("<Q", _recv_exact(self._recv_sock, 8))[0]
            if nbytes != buf.numel() * buf.element_size():
                raise ConnectionError(f"pipeline stream out of step: {nbytes} bytes sent, "
                                      f"{buf.numel() * buf.element_size()} expected for {list(shape)} {dtype}")
            if nbytes:
                _recv_exact(self._recv_sock, nbytes, buf.view(torch.uint8).numpy())
        else:  # NCCL
            dist.recv(buf, self.prev_rank)
        self.recv_s += time.perf_counter() - t0
        self.num_recv += 1
        return buf

    def send_sampled_tokens(self, step_id: int, seq_ids: list[int], token_ids: list[int]) -> None:
        """Last stage: hand a step's sampled tokens (one per sampling sequence) to the first
        stage over the token stream. Message: uint64 length, then int64 step_id, uint32 count,
        count int32 seq ids, count int32 token ids (little-endian). Returns once the kernel has
        the bytes."""
        n = len(seq_ids)
        payload = (struct.pack("<qI", step_id, n) + np.asarray(seq_ids, dtype="<i4").tobytes()
                   + np.asarray(token_ids, dtype="<i4").tobytes())
        self._token_send_sock.sendall(struct.pack("<Q", len(payload)) + payload)

    def recv_sampled_tokens(self, block: bool) -> list[tuple[int, list[int], list[int]]]:
        """First stage: the token stream's messages that have arrived, as (step_id, seq_ids,
        token_ids); with `block`, waits for one at least (TimeoutError after the data-plane
        timeout, ConnectionError if the last stage is gone or the stream is out of step)."""
        sock, out = self._token_recv_sock, []
        while block or select.select([sock], [], [], 0)[0]:
            t0 = time.perf_counter()
            size = struct.unpack("<Q", _recv_exact(sock, 8))[0]
            if size < 12:
                raise ConnectionError(f"token stream out of step: a {size}-byte message")
            payload = _recv_exact(sock, size)
            step_id, n = struct.unpack_from("<qI", payload)
            if size != 12 + 8 * n:
                raise ConnectionError(f"token stream out of step: {size} bytes for {n} tokens")
            ids = np.frombuffer(payload, dtype="<i4", count=2 * n, offset=12)
            out.append((step_id, ids[:n].tolist(), ids[n:].tolist()))
            if block:
                self.recv_s += time.perf_counter() - t0
            block = False
        return out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x [T, n] float32 over the stage's TP group (`all_reduce_impl`); tp_size 1: x
        itself. The collective sums in place; "p2p" returns a new tensor."""
        if self.tp_size > 1:
            t0 = time.perf_counter()
            if self.all_reduce_impl == "p2p":
                x = self._all_reduce_p2p(x)
            else:
                dist.all_reduce(x, group=self.tp_group)
            self.all_reduce_s += time.perf_counter() - t0
            self.num_all_reduce += 1
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """The TP ranks' tensors side by side along the last dimension, in rank order, on every
        rank (the vocabulary-parallel logits). x: [T, n] float32, the same shape on every rank ->
        [T, tp_size * n]. With `all_reduce_impl` "p2p" one round of isend/irecv inside the group
        (as `_all_reduce_p2p`), else the collective; tp_size 1: x itself."""
        if self.tp_size == 1:
            return x
        t0 = time.perf_counter()
        x = x.contiguous()
        parts = [x if r == self.rank else torch.empty_like(x) for r in self.tp_ranks]
        if self.all_reduce_impl == "p2p":
            self._exchange(x, parts)
        else:
            dist.all_gather(parts, x, group=self.tp_group)
        out = torch.cat(parts, dim=-1)
        self.all_gather_s += time.perf_counter() - t0
        self.num_all_gather += 1
        return out

    def _exchange(self, x: torch.Tensor, parts: list[torch.Tensor]) -> None:
        """Send x to every other rank of the TP group and receive each one's tensor into
        parts[i] (parts[i] for global rank tp_ranks[i]; this rank's entry is left as it is)."""
        reqs = []
        for r, buf in zip(self.tp_ranks, parts):
            if r != self.rank:
                reqs.append(dist.isend(x, r, group=self.tp_group))
                reqs.append(dist.irecv(buf, r, group=self.tp_group))
        for q in reqs:
            q.wait()

    def _all_reduce_p2p(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the stage's TP ranks, in one round: every rank sends its tensor to every
        other rank and receives theirs (isend/irecv inside the TP group), then adds all of them in
        rank order, so every rank gets bit-identical sums. Moves (tp - 1) x the tensor per rank,
        which for the few ranks of a CPU host and a step's activations costs less than gloo's
        multi-round ring. x: [T, hidden] float32 -> a new tensor of the same shape."""
        x = x.contiguous()
        parts = [x if r == self.rank else torch.empty_like(x) for r in self.tp_ranks]
        self._exchange(x, parts)
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def stats(self) -> dict:
        """Cumulative data-plane time since the stage was built: `all_reduce_s` (inside
        all-reduce, including waiting for the slowest TP rank), `all_gather_s` (the logits'
        all-gather on a last stage under TP), `send_s` (issuing sends and
        waiting for old ones to complete), `recv_s` (blocked in recv: the transfer plus any wait
        for the previous stage), seconds; and the number of calls of each."""
        return {"all_reduce_s": self.all_reduce_s, "num_all_reduce": self.num_all_reduce,
                "all_gather_s": self.all_gather_s, "num_all_gather": self.num_all_gather, "send_s": self.send_s,
                "num_send": self.num_send, "recv_s": self.recv_s, "num_recv": self.num_recv}

    def wait_sends(self) -> None:
        """Wait until every send in flight (NCCL) has completed; the error of a failed one is raised."""
        while self._pending:
            self._pending.pop(0)[0].wait()

    def abort(self) -> None:
        """Leave a broken group (a peer died or the plan changed) without waiting for pending
        sends; the next plan joins a new group under a new store prefix. Every operation of the
        old group has `timeout_s`, so nothing waits on a dead peer for longer than that. Never
        raises: a half-broken group that fails to tear down is logged and dropped all the same."""
        self._pending.clear()
        self._close_streams()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as exc:
                log.warning("leaving the torch.distributed group: %s", exc)

    def _close_streams(self) -> None:
        for sock in (self._send_sock, self._recv_sock, self._token_send_sock, self._token_recv_sock):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        self._send_sock = self._recv_sock = self._token_send_sock = self._token_recv_sock = None

    def close(self) -> None:
        """Wait for the sends in flight, then leave the group (as `abort`). Raises what a failed
        send raises (a peer that is gone); the group is left all the same."""
        try:
            self.wait_sends()
        finally:
            self.abort()
