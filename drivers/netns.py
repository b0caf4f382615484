"""Two network namespaces joined by a veth pair: a real network on one machine, for tests
and for `make run`'s studio network (a PTP grandmaster and AES67 on the wire).

    from echoel.drivers.netns import NetnsPair, skip_reason

    if (why := skip_reason()):
        pytest.skip(why)
    with NetnsPair() as net:
        p = net.popen(net.a, ["ptp4l", "-i", net.if_a, ...])
        net.run(net.b, ["ping", "-c1", net.addr_a])

Each pair gets unique namespace names (pid + counter, so parallel test processes never
collide), addresses 10.99.N.1/24 (a) and 10.99.N.2/24 (b), loopback up and a 224.0.0.0/4
route on the veth in each (multicast works without IP_MULTICAST_IF). Leaving the block kills
every process started with `popen` and deletes both namespaces (the veth goes with them),
also on errors. Pairs left by a test process that died are removed when the next pair is made.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from contextlib import suppress
from types import TracebackType

PREFIX = "ebx"
_counter = itertools.count()
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)n(\d+)[ab]$")


def skip_reason() -> str | None:
    """Why namespace tests cannot run here (not root, no `ip netns`), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (tests create veth pairs)"
    if not shutil.which("ip"):
        return "`ip` (iproute2) is not installed"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        return f"`ip netns` is unavailable: {r.stderr.strip() or r.returncode}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete namespaces of this helper whose creating process is gone; returns their names."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    gone = []
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
            gone.append(name)
    return gone


class NetnsPair:
    """Namespaces `a` and `b` joined by veth `if_a` (addr_a) <-> `if_b` (addr_b)."""

    def __init__(self, subnet: int | None = None) -> None:
        n = next(_counter)
        pid = os.getpid()
        if subnet is None:
            subnet = (pid * 7 + n) % 250 + 1
        if not 0 <= subnet <= 255:
            raise ValueError(f"netns subnet {subnet}: allowed 0..255 (10.99.N.0/24)")
        self.a = f"{PREFIX}{pid}n{n}a"
        self.b = f"{PREFIX}{pid}n{n}b"
        # The veth ends are created directly inside the namespaces: no name clash in the
        # root namespace with other test processes.
        self.if_a = "veth-a"
        self.if_b = "veth-b"
        self.subnet = subnet
        self.addr_a = f"10.99.{subnet}.1"
        self.addr_b = f"10.99.{subnet}.2"
        self._procs: list[subprocess.Popen] = []
        self._made: list[str] = []

    # -- set-up and tear-down -------------------------------------------------------------

    def __enter__(self) -> NetnsPair:
        with suppress(Exception):
            remove_stale()
        try:
            for ns in (self.a, self.b):
                _ip("netns", "add", ns)
                self._made.append(ns)
            _ip("link", "add", self.if_a, "netns", self.a,
                "type", "veth", "peer", "name", self.if_b, "netns", self.b)
            for ns, dev, addr in ((self.a, self.if_a, self.addr_a),
                                  (self.b, self.if_b, self.addr_b)):
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", dev)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Kill the processes started with `popen`, delete both namespaces (idempotent)."""
        for p in self._procs:
            stop_process(p)
        self._procs.clear()
        for ns in self._made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self._made.clear()

    # -- running things inside ------------------------------------------------------------

    def run(self, ns: str, argv: Sequence[str], timeout: float = 30.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run argv inside namespace ns to completion; text output captured."""
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                              text=True, timeout=timeout, check=check)

    def popen(self, ns: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start argv inside namespace ns; it is killed when the pair closes.

        `ip netns exec` execs the program, so the Popen's pid is the program's own."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)
        self._procs.append(p)
        return p

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until both veth ends report carrier (operstate UP); raises TimeoutError."""
        end = time.monotonic() + timeout
        while True:
            states = [
                subprocess.run(["ip", "-n", ns, "-o", "link", "show", "dev", dev],
                               capture_output=True, text=True, timeout=10).stdout
                for ns, dev in ((self.a, self.if_a), (self.b, self.if_b))]
            if all("state UP" in s for s in states):
                return
            if time.monotonic() > end:
                raise TimeoutError(f"veth {self.if_a}/{self.if_b} not up after {timeout} s")
            time.sleep(0.05)

def members(ns: str, group: str) -> int:
    """How many sockets in namespace ns have joined multicast group (0: none)."""
    r = subprocess.run(["ip", "-n", ns, "maddr", "show"], capture_output=True, text=True,
                       timeout=10)
    n = 0
    for line in r.stdout.splitlines():
        parts = line.split()
        if parts[:2] == ["inet", group]:
            n += int(parts[3]) if len(parts) >= 4 and parts[2] == "users" else 1
    return n


def wait_joined(ns: str, group: str, count: int = 1, timeout: float = 60.0) -> None:
    """Wait until `count` sockets in ns have joined group (a receiver that is ready: its
    process may take seconds to start on a loaded machine); TimeoutError otherwise."""
    end = time.monotonic() + timeout
    while members(ns, group) < count:
        if time.monotonic() > end:
            raise TimeoutError(f"namespace {ns}: {count} member(s) of {group} expected within "
                               f"{timeout:g} s, {members(ns, group)} joined")
        time.sleep(0.1)


def stop_process(p: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; reaps the process."""
    if p.poll() is None:
        with suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                p.kill()
            p.wait(grace)
    for f in (p.stdout, p.stderr):
        if f is not None:
            with suppress(Exception):
                f.close()


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")
