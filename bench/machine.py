"""What the benchmark ran on, and who else used the CPUs in real time meanwhile.

A shared machine makes a wake-up benchmark meaningless when some other process spins at a
real-time priority; `RtSnapshot` measures the CPU time such foreign threads took during a run
so that the report can say so.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
SCHED_NAMES = {1: "FIFO", 2: "RR", 6: "DEADLINE"}


def read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def info(seconds: float) -> dict:
    """Machine facts for the results file."""
    cpu_model = None
    for line in (read_text("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    try:
        ct = subprocess.run(["cyclictest", "--help"], capture_output=True, text=True, timeout=10)
        ct_version = next((ln.strip() for ln in (ct.stdout + ct.stderr).splitlines()
                           if ln.startswith("cyclictest V")), None)
    except (OSError, subprocess.TimeoutExpired):
        ct_version = None
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "cpu_model": cpu_model,
        "cpuidle_driver": read_text("/sys/devices/system/cpu/cpuidle/current_driver"),
        "rt_runtime_us": read_text("/proc/sys/kernel/sched_rt_runtime_us"),
        "python": platform.python_version(),
        "cyclictest": ct_version,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": seconds,
        "loadavg_start": read_text("/proc/loadavg"),
    }


@dataclass(frozen=True)
class RtThread:
    """One user-space real-time thread: identity and CPU time so far (seconds)."""

    pid: int
    tid: int
    comm: str
    policy: str
    rtprio: int
    cpu_s: float


def process_threads(pid: int, rt_only: bool = True) -> dict[tuple[int, int], RtThread]:
    """The threads of one process (only SCHED_FIFO/RR/DEADLINE ones if rt_only) with their CPU
    time so far; empty if it is gone."""
    found: dict[tuple[int, int], RtThread] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        stat = read_text(str(task / "stat"))
        if not stat or ")" not in stat:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2:].split()
        # fields after comm start at field 3 (state): utime=14, stime=15, rt_priority=40,
        # policy=41 -> indexes 11, 12, 37, 38
        try:
            policy = int(rest[38])
            if rt_only and policy not in SCHED_NAMES:
                continue
            cpu_s = (int(rest[11]) + int(rest[12])) / CLK_TCK
            found[(pid, int(task.name))] = RtThread(
                pid, int(task.name), comm, SCHED_NAMES.get(policy, "OTHER"), int(rest[37]),
                cpu_s)
        except (IndexError, ValueError):
            continue
    return found


def rt_threads(exclude_pids: set[int] | None = None) -> dict[tuple[int, int], RtThread]:
    """Every user-space SCHED_FIFO/RR/DEADLINE thread (kernel threads are the machine's own)."""
    found: dict[tuple[int, int], RtThread] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or (exclude_pids and int(proc.name) in exclude_pids):
            continue
        try:
            if not (proc / "cmdline").read_bytes():
                continue  # kernel thread
        except OSError:
            continue
        found.update(process_threads(int(proc.name)))
    return found


class RtSnapshot:
    """Foreign real-time CPU use between start() and stop() (our own processes excluded: take
    both snapshots while none of them runs, or pass their pids)."""

    def __init__(self) -> None:
        self.before: dict[tuple[int, int], RtThread] = {}
        self.t0 = 0.0

    def start(self) -> None:
        """First snapshot."""
        self.before = rt_threads({os.getpid()})
        self.t0 = time.monotonic()

    def stop(self) -> dict:
        """CPU seconds foreign RT threads used since start(), as a share of the wall time, and
        the busiest of them."""
        after = rt_threads({os.getpid()})
        wall = max(time.monotonic() - self.t0, 1e-9)
        busy = []
        for key, th in after.items():
            used = th.cpu_s - self.before[key].cpu_s if key in self.before else min(th.cpu_s,
                                                                                     wall)
            if used > 0.01 * wall:
                busy.append({"pid": th.pid, "tid": th.tid, "comm": th.comm,
                             "policy": f"{th.policy} {th.rtprio}",
                             "cpu_share": round(used / wall, 3)})
        busy.sort(key=lambda b: -b["cpu_share"])
        return {"foreign_rt_cpu_share": round(sum(b["cpu_share"] for b in busy), 3),
                "foreign_rt_threads": busy[:5], "loadavg": read_text("/proc/loadavg")}


def code_version(root: Path) -> dict:
    """Which engine code ran: the git commit, and a hash of the engine's sources as they are
    on disk (the work tree may hold uncommitted changes, and they may change between rows)."""
    h = hashlib.sha256()
    for folder in ("daemon", "drivers", "dsp"):
        for f in sorted((root / folder).glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                     "daemon", "drivers", "dsp"], capture_output=True,
                                    text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        commit, dirty = None, None
    return {"commit": commit, "uncommitted_changes": dirty, "sources_sha256": h.hexdigest()[:16]}
