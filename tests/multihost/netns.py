"""Hosts for the multi-host tier: Linux network namespaces on one bridge, each with its own
address on a veth pair, so ZeroMQ and torch.distributed cross a real interface.

    root namespace:   bridge slb<id> (optionally with an address, so the test itself is a host)
                        |  slv0-<id>        |  slv1-<id>       ...   (host-side veth ends)
    namespaces:      eth0 198.18.N.1      eth0 198.18.N.2    ...

`cut(host)` sets the host-side veth end down: the host keeps its address and its processes, but
no packet reaches or leaves it (a pulled cable; no RST, no FIN). Needs root and iproute2;
`skip_reason()` says why not. `down()` removes every process, namespace and the bridge.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a short command (iproute2), 30 s at most; raises on failure when `check`."""
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def skip_reason() -> str | None:
    """Why namespace tests cannot run here (not root, no iproute2/unshare, no netns), or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs iproute2 (`ip`) and util-linux (`unshare`)"
    probe = f"slprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Hosts:
    """Network namespaces on a bridge; `popen(host, argv)` runs a process "on" a host."""

    def __init__(self, names: list[str], tag: int | None = None):
        tag = os.getpid() % 100000 if tag is None else tag
        self.tag = tag
        self.subnet = f"198.18.{tag % 250 + 1}"
        self.bridge = f"slb{tag}"
        self.ns = {name: f"sl{tag}-{name}" for name in names}
        self.addr = {name: f"{self.subnet}.{i + 1}" for i, name in enumerate(names)}
        self.veth = {name: f"slv{i}-{self.bridge[3:]}"[:15] for i, name in enumerate(names)}
        self.root_addr: str | None = None
        self.procs: list[subprocess.Popen] = []

    def up(self, root_address: bool = False) -> None:
        """Create the bridge, the namespaces and their veth pairs. `root_address`: the bridge
        also gets 198.18.N.254, so processes of the root namespace (the test) reach every host."""
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "link", "set", self.bridge, "up")
        if root_address:
            self.root_addr = f"{self.subnet}.254"
            run("ip", "addr", "add", f"{self.root_addr}/24", "dev", self.bridge)
        for name, ns in self.ns.items():
            veth = self.veth[name]
            run("ip", "netns", "add", ns)
            run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "link", "set", veth, "master", self.bridge, "up")
            run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.addr[name]}/24", "dev", "eth0")
            run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def cut(self, name: str) -> None:
        """Cut host `name` off the network: its veth end on the bridge goes down."""
        run("ip", "link", "set", self.veth[name], "down")

    def popen(self, name: str, argv: list[str], log: Path, cwd: Path, hide: Path | None = None) -> subprocess.Popen:
        """Start argv in host `name`'s namespace; with `hide`, that directory is an empty tmpfs for it."""
        cmd = ["ip", "netns", "exec", self.ns[name]]
        if hide is not None:
            cmd += ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount -t tmpfs tmpfs "$0" && exec "$@"', str(hide)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(cwd), "OMP_NUM_THREADS": "1",
               "NUMBA_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("SHARDLINE_ADDRESS", None)
        p = subprocess.Popen(cmd + argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=cwd, env=env,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def down(self) -> list[int]:
        """SIGTERM every process group started here, SIGKILL what is left after 15 s, then remove
        the namespaces (their veth pairs go with them) and the bridge. Returns the pids that had
        to be killed.

        A namespace lives on after `ip netns del` while a socket holds it, and a TCP connection
        to a cut host outlives its process as an orphan retransmitting into the void for
        minutes; so cut links are restored and each namespace's remaining sockets destroyed
        (`ss -K`) before the namespaces are deleted."""
        for name in self.ns:
            subprocess.run(["ip", "link", "set", self.veth[name], "up"], capture_output=True)
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        killed = []
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(p.pid)
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "exec", ns, "ss", "-K", "-ta"], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        deadline = time.monotonic() + 10  # the kernel tears namespaces down asynchronously
        while self.left_over() and time.monotonic() < deadline:
            time.sleep(0.2)  # poll interval
        return killed

    def left_over(self) -> list[str]:
        """Namespaces and links of this instance that still exist (empty after `down`)."""
        names = run("ip", "netns", "list").stdout.split()
        links = run("ip", "-o", "link", "show").stdout
        return ([n for n in names if n in self.ns.values()]
                + [x for x in [self.bridge, *self.veth.values()] if f" {x}:" in links or f" {x}@" in links])
