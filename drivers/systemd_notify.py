"""sd_notify (READY, WATCHDOG, STATUS, STOPPING) through systemd-python, and the watchdog period.

Without NOTIFY_SOCKET (not started by systemd) every call is a no-op.
"""

from __future__ import annotations

import os

from systemd import daemon as sd_daemon


def enabled() -> bool:
    """True when systemd (or a test) listens on NOTIFY_SOCKET."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(*fields: str) -> None:
    """Send one notification made of KEY=VALUE fields (newlines in values are flattened)."""
    if enabled():
        sd_daemon.notify("\n".join(f.replace("\n", " ") for f in fields))


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings systemd expects (half of WatchdogSec), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
