"""The local ZeroMQ bus: status and events published (PUB), commands answered (REP).

Sockets are ipc:// files in the run folder: bus.sock (PUB; topics `status`, `event`) and
control.sock (REP; JSON requests {"cmd": ...}, JSON replies {"ok": bool, ...}).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import zmq

MAX_REQUEST_BYTES = 64 * 1024


def service_dir(configured: str, systemd_env: str, as_root: str, as_user: str | Path) -> Path:
    """A folder: configured, else systemd's (e.g. RUNTIME_DIRECTORY), else a default (created)."""
    if configured:
        d = Path(configured)
    elif os.environ.get(systemd_env):
        d = Path(os.environ[systemd_env].split(":")[0])
    elif os.geteuid() == 0:
        d = Path(as_root)
    else:
        d = Path(as_user)
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_dir(configured: str) -> Path:
    """The runtime folder: configured, systemd's RUNTIME_DIRECTORY, /run/echoel, or /tmp."""
    return service_dir(configured, "RUNTIME_DIRECTORY", "/run/echoel",
                       f"/tmp/echoel-{os.getuid()}")


def endpoints(rdir: Path) -> tuple[str, str]:
    """(publish endpoint, control endpoint)."""
    return f"ipc://{rdir}/bus.sock", f"ipc://{rdir}/control.sock"


def request(rdir: Path, msg: dict, timeout_s: float = 5.0) -> dict:
    """Send one command to a running daemon and return its reply."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoints(rdir)[1])
    try:
        sock.send(json.dumps(msg).encode())
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no answer from the daemon at {endpoints(rdir)[1]} within "
                               f"{timeout_s:g} s: is `echoel run` running?")
        return json.loads(sock.recv())
    finally:
        sock.close()
