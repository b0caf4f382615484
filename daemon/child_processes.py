"""Stopping child processes the stack started (demo services, test rigs)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable


def stop_all(procs: Iterable[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM each running process (in the given order), then wait; SIGKILL stragglers."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
