"""CurveZMQ allow-lists reloaded on SIGHUP, without restarting the coordinator.

One coordinator and one worker (pipeline 1) whose client allow-list is a directory of `*.key`
files. A key copied into it is admitted after SIGHUP; a key removed from it is refused after
SIGHUP, both on a new connection (ZAP at the handshake) and on a connection it opened before the
reload (the coordinator drops its messages)."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from shardline.client import Client, RequestTimeoutError
from shardline.local import LocalCluster
from shardline.security import client_credentials, generate_keypair, load_public_key

REFUSED_TIMEOUT_S = 3.0  # a refused client's calls end in RequestTimeoutError after this long


def _wait_for(cond, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout_s} s")
        time.sleep(0.1)  # poll interval


def test_sighup_reloads_the_client_allow_list(tmp_path):
    keys = {n: generate_keypair(tmp_path / n, n) for n in ("coordinator", "client", "worker", "newcomer")}
    allowed = tmp_path / "allowed-clients"
    allowed.mkdir()
    shutil.copy(keys["client"][0], allowed)
    sec = {"server_key": str(keys["coordinator"][1]), "client_keys": str(allowed),
           "worker_keys": [str(keys["worker"][0])],
           "client_key": str(keys["client"][1]), "worker_key": str(keys["worker"][1])}
    cluster = LocalCluster({"workers": {"count": 1, "threads": 1},
                            "parallel": {"pipeline_parallel": 1, "tensor_parallel": 1},
                            "metrics": {"enabled": False}, "security": sec}).start()
    try:
        pid = cluster.client.stats()["coordinator"]["pid"]
        newcomer = client_credentials(keys["coordinator"][0], keys["newcomer"][1])
        newcomer_key = load_public_key(keys["newcomer"][0]).decode()

        def reload(n: int) -> None:
            os.kill(pid, signal.SIGHUP)
            _wait_for(lambda: cluster.output().count("allow-lists reloaded") >= n, f"reload {n} in the log")

        with Client(cluster.address, timeout_s=REFUSED_TIMEOUT_S, **newcomer) as c:
            with pytest.raises(RequestTimeoutError):  # not on the list yet
                c.health()

        shutil.copy(keys["newcomer"][0], allowed)  # the operator allows the newcomer ...
        reload(1)  # ... and sends SIGHUP
        assert "client plane 2 keys (+1 -0)" in cluster.output()
        with Client(cluster.address, timeout_s=60, **newcomer) as c:
            r = c.generate("The capital of France is", max_tokens=4, ignore_eos=True)
            assert r.finish_reason == "length" and len(r.token_ids) == 4

            os.remove(allowed / keys["newcomer"][0].name)  # revoked while connected
            reload(2)
            assert "client plane 1 keys (+0 -1)" in cluster.output()
            c.timeout_s = REFUSED_TIMEOUT_S
            with pytest.raises(RequestTimeoutError):  # its open connection is ignored now
                c.health()
        _wait_for(lambda: f"revoked public key {newcomer_key}" in cluster.output(), "the revocation in the log")
        with Client(cluster.address, timeout_s=REFUSED_TIMEOUT_S, **newcomer) as c:
            with pytest.raises(RequestTimeoutError):  # and a new connection is refused at the handshake
                c.health()

        # a broken list is not applied: the old one stays and the cluster keeps serving
        (allowed / "broken.key").write_text("not a certificate\n")
        reload_errors = cluster.output().count("allow-lists not reloaded")
        os.kill(pid, signal.SIGHUP)
        _wait_for(lambda: cluster.output().count("allow-lists not reloaded") > reload_errors, "the refused reload")
        assert cluster.client.health()["status"] == "ok"
    finally:
        rc = cluster.stop()
    assert rc == 0
