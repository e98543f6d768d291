"""Data plane: torch.distributed between the workers (gloo on CPU, NCCL on CUDA).

Ranks are laid out stage-major: rank = stage * tp_size + tp_rank. Pipeline parallelism sends
the hidden states `[num_tokens, hidden]` from (stage s, tp_rank r) to (stage s+1, tp_rank r);
tensor parallelism all-reduces over the stage's TP subgroup after each row-parallel linear.
The coordinator hosts the rendezvous `TCPStore`; control never rides on this plane.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
import struct

import torch
import torch.distributed as dist


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


class StageComm:
    """Sends and receives one stage's activations and all-reduces inside its TP group.

    Sends are asynchronous (`isend`): a stage moves on to its next micro-batch while the
    previous one's hidden states are in transit; `wait_sends` is called before a buffer is reused
    and at shutdown.
    """

    def __init__(self, rank: int, world_size: int, stage: int, pp_size: int, tp_rank: int, tp_size: int,
                 store_host: str, store_port: int, prefix: str, backend: str, local_ip: str | None,
                 timeout_s: float = 60.0):
        self.rank, self.world_size = rank, world_size
        self.stage, self.pp_size = stage, pp_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.backend = backend
        if backend == "gloo" and local_ip and "GLOO_SOCKET_IFNAME" not in os.environ:
            ifname = interface_for_address(local_ip)
            if ifname:
                os.environ["GLOO_SOCKET_IFNAME"] = ifname
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(store_host, store_port, is_master=False, timeout=timeout)
        self.store = dist.PrefixStore(prefix, store)
        dist.init_process_group(backend, store=self.store, rank=rank, world_size=world_size, timeout=timeout)
        self.tp_group = None
        if tp_size > 1:
            for s in range(pp_size):  # every rank must create every group, in the same order
                ranks = list(range(s * tp_size, (s + 1) * tp_size))
                g = dist.new_group(ranks, backend=backend, timeout=timeout)
                if s == stage:
                    self.tp_group = g
        self._pending = []

    @property
    def prev_rank(self) -> int:
        return (self.stage - 1) * self.tp_size + self.tp_rank

    @property
    def next_rank(self) -> int:
        return (self.stage + 1) * self.tp_size + self.tp_rank

    def send_hidden(self, x: torch.Tensor) -> None:
        x = x.contiguous()
        self._pending.append((dist.isend(x, self.next_rank), x))  # keep x alive until sent
        if len(self._pending) > 4:
            self._pending.pop(0)[0].wait()

    def recv_hidden(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype)
        dist.recv(buf, self.prev_rank)
        return buf

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def wait_sends(self) -> None:
        while self._pending:
            self._pending.pop(0)[0].wait()

    def abort(self) -> None:
        """Leave a broken group (a peer died or the plan changed) without waiting for pending
        sends; the next plan joins a new group under a new store prefix. Every operation of the
        old group has `timeout_s`, so nothing waits on a dead peer for longer than that."""
        self._pending.clear()
        if dist.is_initialized():
            dist.destroy_process_group()

    def close(self) -> None:
        try:
            self.wait_sends()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
