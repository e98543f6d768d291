"""CurveZMQ on a real cluster: only allow-listed clients and workers get in.

One coordinator and one worker (pipeline 1) with keys from `shardline keygen`; clients and
workers with unknown keys, or without CURVE, are refused by the coordinator's ZAP handler, which
a peer sees only as silence (no reply, never registered)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from shardline.client import Client, RequestTimeoutError
from shardline.local import LocalCluster
from shardline.security import client_credentials, generate_keypair, load_public_key

REFUSED_TIMEOUT_S = 3.0  # a refused client's calls end in RequestTimeoutError after this long


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    keys = {n: generate_keypair(d / n, n) for n in ("coordinator", "client", "worker", "stranger")}
    sec = {"server_key": str(keys["coordinator"][1]),
           "client_keys": str(d / "client"),  # a directory of *.key files
           "worker_keys": [str(keys["worker"][0])],  # a list of files
           "client_key": str(keys["client"][1]), "worker_key": str(keys["worker"][1])}
    cluster = LocalCluster({"workers": {"count": 1, "threads": 1},
                            "parallel": {"pipeline_parallel": 1, "tensor_parallel": 1},
                            "metrics": {"enabled": False}, "security": sec}).start()
    yield cluster, keys
    cluster.stop()


def test_allowed_client_generates(secure):
    cluster, keys = secure
    kw = client_credentials(keys["coordinator"][0], keys["client"][1])
    with Client(cluster.address, timeout_s=60, **kw) as c:
        r = c.generate("The capital of France is", max_tokens=6, ignore_eos=True)
        assert r.finish_reason == "length" and len(r.token_ids) == 6 and r.text
        assert [w["worker_id"] for w in c.stats()["workers"]] == ["local-0"]


def test_unknown_client_key_gets_nothing(secure):
    cluster, keys = secure
    kw = client_credentials(keys["coordinator"][0], keys["stranger"][1])
    t0 = time.monotonic()
    with Client(cluster.address, timeout_s=REFUSED_TIMEOUT_S, **kw) as c:
        with pytest.raises(RequestTimeoutError):
            c.generate("Hello", max_tokens=4)
    assert time.monotonic() - t0 < REFUSED_TIMEOUT_S + 5
    stranger = load_public_key(keys["stranger"][0]).decode()
    _wait_for(lambda: f"client plane: public key {stranger}" in cluster.output(), "the ZAP refusal in the log")


def test_plain_client_gets_nothing(secure):
    cluster, _ = secure
    with Client(cluster.address, timeout_s=REFUSED_TIMEOUT_S) as c:
        with pytest.raises(RequestTimeoutError):
            c.health()


def test_unknown_and_plain_workers_never_register(secure):
    cluster, keys = secure
    base = [sys.executable, "-m", "shardline.cli", "worker", "--coordinator", cluster.config.worker_address,
            "--memory-gb", "1"]
    intruders = {
        "intruder-key": base + ["--worker-id", "intruder-key", "--server-key", str(keys["coordinator"][0]),
                                "--key", str(keys["stranger"][1])],
        "intruder-client-key": base + ["--worker-id", "intruder-client-key", "--server-key",
                                       str(keys["coordinator"][0]), "--key", str(keys["client"][1])],
        "intruder-plain": base + ["--worker-id", "intruder-plain"],
    }
    procs = {n: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n, cmd in intruders.items()}
    try:
        stranger = load_public_key(keys["stranger"][0]).decode()
        client = load_public_key(keys["client"][0]).decode()
        # both CURVE intruders reached the coordinator's ZAP handler and were refused by name
        _wait_for(lambda: f"worker plane: public key {stranger}" in cluster.output()
                  and f"worker plane: public key {client}" in cluster.output(), "worker-plane refusals", 60)
        time.sleep(2.0)  # a few heartbeat intervals: nothing of theirs may arrive
        with Client(cluster.address, timeout_s=30, **cluster.client_keys()) as c:
            ids = [w["worker_id"] for w in c.stats()["workers"]]
        assert ids == ["local-0"]
        assert all(p.poll() is None for p in procs.values())  # still trying, not registered
        assert re.findall(r"worker (\S+) registered from", cluster.output()) == ["local-0"]
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_coordinator_refuses_open_bind_without_keys(tmp_path):
    cfg = tmp_path / "open.yaml"
    cfg.write_text("coordinator:\n  host: 0.0.0.0\nmetrics:\n  enabled: false\n")
    r = subprocess.run([sys.executable, "-m", "shardline.cli", "coordinator", str(cfg)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "coordinator.host=0.0.0.0" in r.stderr and "security.insecure" in r.stderr


def _wait_for(cond, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout_s} s")
        time.sleep(0.2)  # poll interval
