"""Real-time guarantees for the audio thread: SCHED_FIFO, CPU pinning, locked memory.

Each is attempted; what could not be had is reported by name and reason, never fatal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

MCL_CURRENT, MCL_FUTURE = 1, 2
CAP_SYS_NICE, CAP_IPC_LOCK = 23, 14


def _has_cap(bit: int) -> bool:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def set_fifo(priority: int) -> str | None:
    """SCHED_FIFO for the calling thread; None or why not."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return None
    except PermissionError:
        soft, _ = resource.getrlimit(resource.RLIMIT_RTPRIO)
        return (f"SCHED_FIFO priority {priority} refused: RLIMIT_RTPRIO is {soft} and "
                f"CAP_SYS_NICE is {'present' if _has_cap(CAP_SYS_NICE) else 'missing'}; "
                "give the service LimitRTPRIO=95 (systemd) or rtprio in limits.conf")
    except OSError as exc:
        return f"SCHED_FIFO priority {priority} failed: {exc.strerror}"


def pin(cpu: int) -> str | None:
    """Pin the calling thread to one CPU (-1: leave it); None or why not."""
    if cpu < 0:
        return None
    allowed = os.sched_getaffinity(0)
    if cpu not in allowed:
        return (f"CPU {cpu} is not available to this process (allowed: {sorted(allowed)}); "
                "set [realtime] cpu to one of them")
    try:
        os.sched_setaffinity(0, {cpu})
        return None
    except OSError as exc:
        return f"pinning to CPU {cpu} failed: {exc.strerror}"


def lock_memory() -> str | None:
    """mlockall(MCL_CURRENT | MCL_FUTURE) for the whole process; None or why not."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0:
        return None
    err = ctypes.get_errno()
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
    return (f"mlockall refused ({os.strerror(err)}): RLIMIT_MEMLOCK is {limit} and "
            f"CAP_IPC_LOCK is {'present' if _has_cap(CAP_IPC_LOCK) else 'missing'}; "
            "give the service LimitMEMLOCK=infinity")


def die_with_parent(sig: int = 15) -> None:
    """Ask the kernel to send `sig` (SIGTERM) to this process when its parent dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, sig)  # PR_SET_PDEATHSIG
