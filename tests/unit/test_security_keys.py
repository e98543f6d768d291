"""CurveZMQ keys, the ZAP allow-lists per plane, and the coordinator's bind rule (no processes)."""

from __future__ import annotations

import os
import stat

import pytest
import zmq
import zmq.auth
from click.testing import CliRunner

from shardline.cli import main as cli
from shardline.config import ConfigError, load_config
from shardline.security import (CLIENT_DOMAIN, WORKER_DOMAIN, SecurityError, check_bind, client_credentials,
                                configure_curve_client, configure_curve_server, generate_keypair, is_loopback,
                                load_keypair, load_public_key, load_public_keys, start_authenticator)


def test_keygen_writes_0600_secret_and_loadable_public(tmp_path):
    old = os.umask(0o000)  # the secret must be 0600 whatever the umask
    try:
        public, secret = generate_keypair(tmp_path / "keys", "coordinator")
    finally:
        os.umask(old)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["coordinator.key", "coordinator.key_secret"]
    pub, sec = load_keypair(secret)
    # independent reference: pyzmq's own certificate reader, and libzmq's public-from-secret derivation
    ref_pub, ref_sec = zmq.auth.load_certificate(public)
    assert ref_sec is None and ref_pub == pub == load_public_key(public)
    assert zmq.curve_public(sec) == pub
    with pytest.raises(SecurityError, match="exists already"):
        generate_keypair(tmp_path / "keys", "coordinator")
    with pytest.raises(SecurityError, match="holds no secret key"):
        load_keypair(public)
    with pytest.raises(SecurityError, match="no such key file"):
        load_public_key(tmp_path / "missing.key")


def test_keygen_cli(tmp_path):
    r = CliRunner().invoke(cli, ["keygen", str(tmp_path), "--name", "w0"])
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE((tmp_path / "w0.key_secret").stat().st_mode) == 0o600
    r = CliRunner().invoke(cli, ["keygen", str(tmp_path), "--name", "w0"])
    assert r.exit_code != 0 and "exists already" in r.output


def test_load_public_keys_directory_and_list(tmp_path):
    a, _ = generate_keypair(tmp_path, "a")
    b, _ = generate_keypair(tmp_path, "b")
    keys = load_public_keys(tmp_path)
    assert sorted(keys) == sorted([load_public_key(a), load_public_key(b)])
    assert load_public_keys([str(a)]) == [load_public_key(a)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SecurityError, match="no public keys"):
        load_public_keys(tmp_path / "empty")


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True),
                                       ("localhost", True), ("0.0.0.0", False), ("*", False),
                                       ("198.18.0.1", False), ("::", False)])
def test_is_loopback(host, loop):
    assert is_loopback(host) is loop


def test_bind_rule():
    check_bind("127.0.0.1", None, False)  # loopback: no keys needed
    with pytest.raises(SecurityError) as exc:
        check_bind("0.0.0.0", None, False)
    for field in ("coordinator.host=0.0.0.0", "security.server_key", "security.insecure"):
        assert field in str(exc.value)
    check_bind("0.0.0.0", None, True)  # explicit insecure flag
    check_bind("0.0.0.0", "/keys/coordinator.key_secret", False)  # keys


def test_security_config_fields(tmp_path):
    cfg = load_config(None, {"security": {"server_key": "k.key_secret", "client_keys": ["a.key", "b.key"],
                                          "worker_keys": "workers/"}})
    assert cfg.security.client_keys == ["a.key", "b.key"] and cfg.security.insecure is False
    with pytest.raises(ConfigError, match="security.client_keys needs security.server_key"):
        load_config(None, {"security": {"client_keys": "clients/"}})
    with pytest.raises(ConfigError, match="security.insecur"):
        load_config(None, {"security": {"insecur": True}})


def test_coordinator_refuses_open_bind_without_keys(tmp_path):
    """The rule is enforced by the coordinator's plane security before anything is bound."""
    from shardline.coordinator.server import PlaneSecurity

    ctx = zmq.Context.instance()
    with pytest.raises(SecurityError, match="security.server_key"):
        PlaneSecurity(load_config(None, {"coordinator": {"host": "0.0.0.0"}})).start(ctx)
    open_plane = PlaneSecurity(load_config(None, {"coordinator": {"host": "0.0.0.0"}, "security": {"insecure": True}}))
    assert open_plane.start(ctx) is None and open_plane.authenticator is None


def test_client_credentials_needs_both(tmp_path):
    pub, sec = generate_keypair(tmp_path, "c")
    assert client_credentials(None, None) == {}
    with pytest.raises(SecurityError, match="both"):
        client_credentials(pub, None)
    kw = client_credentials(pub, sec)
    assert kw["public_key"] == load_public_key(pub) and len(kw["secret_key"]) == 40


# ---- the allow-lists over real sockets (one process) ----------------------------------------------
def _reply_or_none(ctx, port, curve, timeout_ms=1500):
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    if curve is not None:
        configure_curve_client(s, *curve)
    s.connect(f"tcp://127.0.0.1:{port}")
    s.send(b"ping")
    got = s.recv() if s.poll(timeout_ms) else None
    s.close()
    return got


def test_allow_lists_per_plane(tmp_path):
    ctx = zmq.Context()
    keys = {n: generate_keypair(tmp_path, n) for n in ("server", "client", "worker", "stranger")}
    kp = {n: load_keypair(sec) for n, (_, sec) in keys.items()}
    auth = start_authenticator(ctx, {CLIENT_DOMAIN: [kp["client"][0]], WORKER_DOMAIN: [kp["worker"][0]]})
    servers = {}
    try:
        for domain in (CLIENT_DOMAIN, WORKER_DOMAIN):
            r = ctx.socket(zmq.ROUTER)
            r.linger = 0
            configure_curve_server(r, kp["server"][1], domain)
            servers[domain] = (r, r.bind_to_random_port("tcp://127.0.0.1"))
        import threading

        stop = threading.Event()

        def echo():
            poller = zmq.Poller()
            for r, _ in servers.values():
                poller.register(r, zmq.POLLIN)
            while not stop.is_set():
                for r, _ in poller.poll(100):
                    ident, msg = r.recv_multipart()
                    r.send_multipart([ident, b"pong:" + msg])

        t = threading.Thread(target=echo, daemon=True)
        t.start()
        server_pub = kp["server"][0]
        cport, wport = servers[CLIENT_DOMAIN][1], servers[WORKER_DOMAIN][1]
        assert _reply_or_none(ctx, cport, (server_pub, *kp["client"])) == b"pong:ping"
        assert _reply_or_none(ctx, wport, (server_pub, *kp["worker"])) == b"pong:ping"
        assert _reply_or_none(ctx, cport, (server_pub, *kp["stranger"])) is None  # not on the list
        assert _reply_or_none(ctx, wport, (server_pub, *kp["client"])) is None  # a client key on the worker plane
        assert _reply_or_none(ctx, cport, None) is None  # no CURVE at all
        wrong_server = kp["stranger"][0]  # the client checks the server too (RFC 26)
        assert _reply_or_none(ctx, cport, (wrong_server, *kp["client"])) is None
        stop.set()
        t.join()
    finally:
        for r, _ in servers.values():
            r.close()
        auth.stop()
        ctx.term()
