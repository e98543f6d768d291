"""The coordinator's rendezvous TCPStore listens on the configured address only."""

from __future__ import annotations

import datetime
import socket

import pytest

from shardline.coordinator.server import host_rendezvous_store
from shardline.local import free_port_block


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} print them) of the sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                found.append(addr)
    return found


def test_store_listens_on_the_configured_address_only():
    import torch.distributed as dist

    port = free_port_block(1)
    store = host_rendezvous_store("127.0.0.1", port)
    try:
        # 127.0.0.1 as /proc/net/tcp writes it (little-endian hex); not 00000000 (every interface)
        assert _listeners(port) == ["0100007F"], _listeners(port)
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10))
        client.set("k", "v")
        assert store.get("k") == b"v"
        del client
    finally:
        del store
    assert _listeners(port) == []  # the store owned the socket and closed it


def test_store_refuses_an_address_that_is_not_local():
    with pytest.raises(OSError):
        host_rendezvous_store("192.0.2.1", free_port_block(1))  # TEST-NET-1: not on this host


def test_wildcard_host_listens_everywhere():
    port = free_port_block(1)
    store = host_rendezvous_store("*", port)
    try:
        assert set(_listeners(port)) <= {"00000000", "00000000000000000000000000000000"} and _listeners(port)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        del store
