"""CurveZMQ encryption and key-based authentication of the client and worker planes.

CurveZMQ (ZeroMQ RFC 26, http://rfc.zeromq.org/spec:26/CURVEZMQ) is the CURVE security mechanism
of ZMTP 3 (RFC 23): a Curve25519 key exchange authenticates the server to every peer that knows
its public key, encrypts every frame, and hands each peer's long-term public key to the ZeroMQ
Authentication Protocol (ZAP, RFC 27), where an allow-list decides whether the peer may connect.

Keys are 32-byte Curve25519 keys written as 40-character Z85 text (RFC 32). They live in
ZeroMQ's certificate files, as `zmq.auth.create_certificates` writes them:

    <name>.key          public key only            (hand it to the peers)
    <name>.key_secret   public and secret key      (mode 0600; keep it on its host)

Planes and ZAP domains: the coordinator's two ROUTER sockets are CURVE servers sharing one
secret key; each has its own ZAP domain (`client`, `worker`) with its own allow-list, so a
client's key cannot join the worker plane. An allow-list of None admits any key (the traffic is
still encrypted and the server still authenticated).

A peer whose key is refused sees no reply at all (the handshake fails inside libzmq), so a
client notices it only as a timeout.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("shardline.security")

CLIENT_DOMAIN = "client"  # ZAP domain of the coordinator's client-plane ROUTER
WORKER_DOMAIN = "worker"  # ZAP domain of the coordinator's worker-plane ROUTER
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"


class SecurityError(ValueError):
    """A key file that is missing, unreadable or malformed, or a bind that needs keys; the
    message names the file or the config field."""


# ---- key files ------------------------------------------------------------------------------------
def generate_keypair(directory: str | os.PathLike, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Curve25519 keypair as `<directory>/<name>.key` (public, mode 0644) and
    `<directory>/<name>.key_secret` (public + secret, mode 0600), in ZeroMQ's certificate format
    (`zmq.auth.create_certificates`; Z85 keys, RFC 32).

    The files are first written into a private temporary directory (mode 0700) inside
    `directory`, made 0600/0644, then renamed into place, so the secret key is never readable by
    another user, whatever the umask.

    Returns (public_file, secret_file). Raises SecurityError when `name` is not a plain file name
    or a file exists already (unless `overwrite`).
    """
    if not name or os.sep in name or name in (".", "..") or name.startswith("."):
        raise SecurityError(f"key name {name!r}: must be a plain file name")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    if not overwrite:
        for f in (public_file, secret_file):
            if f.exists():
                raise SecurityError(f"{f} exists already (refusing to overwrite a key)")
    tmp = Path(tempfile.mkdtemp(prefix=".keygen-", dir=directory))  # mode 0700
    try:
        pub, sec = zmq.auth.create_certificates(tmp, name)
        os.chmod(sec, 0o600)
        os.chmod(pub, 0o644)
        os.replace(sec, secret_file)
        os.replace(pub, public_file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return public_file, secret_file


def load_keypair(secret_file: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys (40 bytes each) from a `.key_secret` certificate file.

    Raises SecurityError naming the file when it is missing, unreadable, or holds no secret key.
    Warns when the file is readable by group or others.
    """
    path = Path(secret_file)
    public, secret = _load(path)
    if secret is None:
        raise SecurityError(f"{path}: holds no secret key (give the .key_secret file, not the public .key)")
    mode = path.stat().st_mode & 0o077
    if mode:
        log.warning("%s: secret key readable by group/others (mode %o); chmod 600 it", path, path.stat().st_mode & 0o777)
    return public, secret


def load_public_key(path: str | os.PathLike) -> bytes:
    """The Z85 public key (40 bytes) of a certificate file (`.key` or `.key_secret`).

    Raises SecurityError naming the file when it is missing, unreadable or malformed."""
    return _load(Path(path))[0]


def load_public_keys(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[bytes]:
    """Z85 public keys of an allow-list: a directory (every `*.key` file in it) or a list of
    certificate files.

    Raises SecurityError when a file is unreadable or malformed, or the list comes out empty
    (an empty allow-list would refuse everyone, which is never what was meant)."""
    if isinstance(source, (str, os.PathLike)):
        d = Path(source)
        if d.is_dir():
            files = sorted(d.glob(f"*{PUBLIC_SUFFIX}"))
            where = f"directory {d}"
        else:
            files, where = [d], str(d)
    else:
        files = [Path(p) for p in source]
        where = "the list " + ", ".join(str(p) for p in files)
    keys = [load_public_key(f) for f in files]
    if not keys:
        raise SecurityError(f"no public keys (*{PUBLIC_SUFFIX}) in {where}")
    return keys


def _load(path: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise SecurityError(f"{path}: no such key file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"{path}: not a ZeroMQ certificate file: {exc}") from None
    if public is None or len(public) != 40:
        raise SecurityError(f"{path}: no valid public-key line (40 Z85 characters)")
    return public, secret


# ---- sockets --------------------------------------------------------------------------------------
def configure_curve_server(sock: zmq.Socket, secret_key: bytes | str, domain: str) -> None:
    """Make `sock` a CURVE server (RFC 26) with `secret_key` (Z85) whose peers are checked
    against the allow-list of ZAP `domain` (see `start_authenticator`). Call before bind()."""
    sock.curve_secretkey = _b(secret_key)
    sock.curve_server = True
    sock.zap_domain = domain.encode()


def configure_curve_client(sock: zmq.Socket, server_public_key: bytes | str, public_key: bytes | str,
                           secret_key: bytes | str) -> None:
    """Make `sock` a CURVE client (RFC 26): it only talks to the server holding the secret key
    of `server_public_key`, and presents (`public_key`, `secret_key`) to it. Z85 keys (str or
    bytes, 40 characters). Call before connect()."""
    sock.curve_serverkey = _b(server_public_key)
    sock.curve_publickey = _b(public_key)
    sock.curve_secretkey = _b(secret_key)


def _b(key: bytes | str) -> bytes:
    key = key.encode("ascii") if isinstance(key, str) else key
    if len(key) != 40:
        raise SecurityError(f"a CURVE key is 40 Z85 characters, got {len(key)}")
    return key


class _AllowList:
    """ZAP credentials provider of one domain: `callback(domain, z85_key)` -> allowed. `keys` may
    be replaced while the authenticator runs (one reference assignment: atomic for its thread)."""

    def __init__(self, domain: str, keys: Iterable[bytes] | None):
        self.domain = domain
        self.keys = None if keys is None else frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        ok = self.keys is None or key in self.keys
        if not ok:
            log.warning("refused a peer on the %s plane: public key %s is not on the allow-list",
                        self.domain, key.decode("ascii", "replace"))
        return ok


class Authenticator:
    """The coordinator's ZAP handler (RFC 27; `zmq.auth.thread.ThreadAuthenticator`): on each ZAP
    domain, admits the CURVE peers whose Z85 public key is on that domain's allow-list (None: any
    key; a domain not configured admits no one). The lists can be replaced while it runs
    (`update`); ZAP is asked only at a connection's handshake, so `allows` lets the owner also
    check every message of connections made before a key was revoked (a message's `User-Id`
    property is its peer's Z85 key)."""

    def __init__(self, ctx: zmq.Context, allowed: Mapping[str, Iterable[bytes] | None]):
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("shardline.zap"))
        self._auth.start()
        self.lists = {domain: _AllowList(domain, keys) for domain, keys in allowed.items()}
        for domain, provider in self.lists.items():
            self._auth.configure_curve_callback(domain, provider)

    def update(self, allowed: Mapping[str, Iterable[bytes] | None]) -> dict[str, tuple[int, int]]:
        """Replace the allow-lists of the domains in `allowed` (None: any key). Returns, per
        domain, (keys added, keys removed); a change to or from None counts as (0, 0)."""
        changes = {}
        for domain, keys in allowed.items():
            new = None if keys is None else frozenset(keys)
            old = self.lists[domain].keys
            changes[domain] = (len(new - old), len(old - new)) if new is not None and old is not None else (0, 0)
            self.lists[domain].keys = new
        return changes

    def allows(self, domain: str, key: bytes | str | None) -> bool:
        """Whether the Z85 public `key` is on `domain`'s allow-list now (any key when it is None)."""
        keys = self.lists[domain].keys
        if keys is None:
            return True
        if isinstance(key, str):
            key = key.encode("ascii", "replace")
        return key in keys

    def stop(self) -> None:
        """Stop the ZAP handler thread (after the sockets it serves are closed)."""
        self._auth.stop()


def start_authenticator(ctx: zmq.Context, allowed: Mapping[str, Iterable[bytes] | None]) -> Authenticator:
    """Start an `Authenticator` in `ctx` with the allow-list of each ZAP domain of `allowed`
    (Z85 public keys; None: any key). Stop it with `.stop()` after the sockets are closed."""
    return Authenticator(ctx, allowed)


# ---- the bind rule --------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True when `host` (an IP address or a name) can only be reached from this machine: every
    address it resolves to is a loopback address (127.0.0.0/8, ::1). Wildcards (`0.0.0.0`, `*`,
    `::`) and names that do not resolve count as not loopback."""
    host = host.strip("[]")
    if host in ("", "*"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_bind(host: str, server_key: str | None, insecure: bool) -> None:
    """The coordinator's bind rule: a non-loopback `coordinator.host` needs CurveZMQ keys
    (`security.server_key`) unless `security.insecure` is true.

    Raises SecurityError naming the fields."""
    if server_key is None and not insecure and not is_loopback(host):
        raise SecurityError(
            f"coordinator.host={host} is not a loopback address and security.server_key is not set: the client "
            f"and worker planes would be open, unencrypted, to the network. Create keys (`shardline keygen DIR "
            f"--name coordinator`, and one per client/worker) and set security.server_key, security.client_keys "
            f"and security.worker_keys; or set security.insecure: true to bind without them")


# ---- config -> keys -------------------------------------------------------------------------------
def client_credentials(server_public_file: str | os.PathLike | None,
                       secret_file: str | os.PathLike | None) -> dict:
    """Keyword arguments for `Client`/`AsyncClient` (`server_public_key`, `public_key`,
    `secret_key`) from the server's public key file and this client's `.key_secret` file; {}
    when neither is given. Raises SecurityError when only one is given or a file is bad."""
    if server_public_file is None and secret_file is None:
        return {}
    if server_public_file is None or secret_file is None:
        raise SecurityError("CurveZMQ needs both the coordinator's public key file (--server-key) and this "
                            "peer's secret key file (--key)")
    public, secret = load_keypair(secret_file)
    return {"server_public_key": load_public_key(server_public_file), "public_key": public, "secret_key": secret}


def server_public_file(server_key: str | os.PathLike) -> str:
    """The public key file next to a `NAME.key_secret` (`NAME.key`) when it exists, else the
    secret file itself (which also holds the public key: readable only where the secret is)."""
    p = str(server_key)
    if p.endswith(SECRET_SUFFIX) and os.path.isfile(p[: -len("_secret")]):
        return p[: -len("_secret")]
    return p
