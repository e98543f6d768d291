"""Start a whole cluster on this host from Python (tests, benchmarks, notebooks).

    from shardline.local import LocalCluster
    with LocalCluster({"parallel": {"pipeline_parallel": 2}}) as cluster:
        print(cluster.client.generate("Hello", max_tokens=8).text)

Runs `shardline launch` in a child process (its own process group) on free ports, waits until
the cluster serves, and on exit stops it and checks that no process of it is left.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import yaml

from shardline.client import Client
from shardline.config import ClusterConfig, _merge


def _ephemeral_low() -> int:
    """Lowest port the kernel hands out for outgoing connections (Linux: ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(n: int = 3) -> int:
    """A port p such that p..p+n-1 were all free a moment ago, chosen below the ephemeral range:
    a port the kernel gave out for bind(0) can be taken by any process's next outgoing
    connection (ZeroMQ, gloo, the TCPStore) before the cluster binds it."""
    high = max(2048, _ephemeral_low()) - n
    for _ in range(200):
        base = random.randrange(1024 if high <= 20000 else 20000, high)
        ok = True
        for p in range(base, base + n):
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no block of free ports found")


class LocalCluster:
    """A coordinator and its local workers in child processes.

    `overrides` is a nested dict merged over the defaults (cluster.yaml schema); the ports are
    chosen free unless given. Raises RuntimeError when the cluster does not become ready within
    `ready_timeout_s` (the launcher's output is in the message).
    """

    def __init__(self, overrides: dict | None = None, ready_timeout_s: float = 300.0, log_path: str | None = None):
        port = free_port_block(4)
        base = {"coordinator": {"client_port": port, "worker_port": port + 1, "rendezvous_port": port + 2},
                "metrics": {"port": port + 3}}
        self.config = ClusterConfig.model_validate(_merge(base, overrides or {}))
        self.ready_timeout_s = ready_timeout_s
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.client: Client | None = None

    @property
    def address(self) -> str:
        return self.config.client_address

    def start(self, wait_ready: bool = True) -> "LocalCluster":
        """Run `shardline launch` in a new session; with `wait_ready`, return once the cluster's
        health is "ok" (RuntimeError after `ready_timeout_s`, or when the launcher exits first)."""
        fd, self._cfg_path = tempfile.mkstemp(suffix=".yaml", prefix="shardline-local-")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(self.config.model_dump(mode="json"), f)
        if self.log_path:
            self._log = open(self.log_path, "wb")
        else:
            self._log = tempfile.TemporaryFile()
        from shardline.cli import _die_with_parent  # SIGTERM on our death: no cluster outlives its owner

        self.proc = subprocess.Popen([sys.executable, "-m", "shardline.cli", "launch", self._cfg_path],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self.client = Client(self.address, timeout_s=120.0, **self.client_keys())
        if not wait_ready:
            return self
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cluster exited during start-up (rc={self.proc.returncode}):\n{self.output()}")
            try:
                if self.client.health(timeout_s=1.0).get("status") == "ok":
                    return self
            except Exception:
                pass
            if time.monotonic() > deadline:
                out = self.output()
                self.stop()
                raise RuntimeError(f"cluster not ready after {self.ready_timeout_s} s:\n{out}")
            time.sleep(0.2)  # poll interval

    def client_keys(self) -> dict:
        """Client keyword arguments for this cluster's CurveZMQ keys (`security.server_key` and
        `security.client_key`), or {} without keys."""
        sec = self.config.security
        if sec.server_key is None or sec.client_key is None:
            return {}
        from shardline.security import client_credentials, server_public_file

        return client_credentials(server_public_file(sec.server_key), sec.client_key)

    def output(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-20000:]

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM the launcher (it stops its children); SIGKILL the group after `timeout_s`.
        Returns the launcher's exit code."""
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        rc = self.proc.returncode
        try:  # any straggler in the group (there should be none)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.unlink(self._cfg_path)
        return rc

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
