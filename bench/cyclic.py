"""cyclictest as the machine's baseline: run it, read its per-loop latencies, and derive the
same figures the engine reports (1-us histogram percentiles) plus the engine's jitter metric.

With an absolute timer (cyclictest's default), loop k wakes at t0 + k*interval + L_k, so the
time between two wake-ups differs from the interval by L_k - L_(k-1): the engine's wake-up
jitter |(t_k - t_(k-1)) - period| is |L_k - L_(k-1)| for cyclictest.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from echoel.daemon.hist_stats import percentile_us

LINE = re.compile(rb"^\s*(\d+):\s*(\d+):\s*(-?\d+)\s*$", re.MULTILINE)
SUMMARY = re.compile(rb"T:\s*\d+\s*\(\s*\d+\)\s*P:\s*(\d+)\s*I:\s*(\d+)\s*C:\s*(\d+)")


def stats_us(ns: np.ndarray) -> dict:
    """p50/p99/max in microseconds the way the engine computes them (1-us bins, floor), with
    the exact maximum; None figures when there is nothing."""
    ns = np.asarray(ns, dtype=np.int64)
    if ns.size == 0:
        return {"p50_us": None, "p99_us": None, "max_us": None, "count": 0}
    hist = np.bincount(np.clip(ns // 1000, 0, None))
    return {"p50_us": percentile_us(hist, 50), "p99_us": percentile_us(hist, 99),
            "max_us": round(int(ns.max()) / 1000.0, 1), "count": int(ns.size)}


def stall_events(lat_ns: np.ndarray, threshold_ns: float) -> int:
    """Runs of consecutive loops whose latency exceeds threshold_ns (one stall, one event)."""
    over = np.asarray(lat_ns) > threshold_ns
    if not over.any():
        return 0
    return int(over[0]) + int(np.count_nonzero(over[1:] & ~over[:-1]))


@dataclass
class CyclicResult:
    """Per-loop latencies (ns) of one cyclictest thread, in loop order."""

    loops: np.ndarray  # loop counter c
    latency_ns: np.ndarray
    reported_cycles: int | None
    interval_us: int
    command: list[str]

    def jitter_ns(self) -> np.ndarray:
        """|L_k - L_(k-1)| for consecutive loops (pairs across a gap in the output skipped)."""
        if self.latency_ns.size < 2:
            return np.zeros(0, np.int64)
        consecutive = np.diff(self.loops) == 1
        return np.abs(np.diff(self.latency_ns))[consecutive]

    def figures(self, slack_play_ns: float, slack_cap_ns: float) -> dict:
        """Latency and jitter figures, and the stalls that would make a loop like the engine's
        xrun: longer than the playback slack ((prefill-1) periods) or the capture slack
        ((periods-1) periods)."""
        return {
            "interval_us": self.interval_us,
            "latency": stats_us(self.latency_ns),
            "jitter": stats_us(self.jitter_ns()),
            "loops_parsed": int(self.latency_ns.size),
            "loops_reported": self.reported_cycles,
            "stalls_over_playback_slack": stall_events(self.latency_ns, slack_play_ns),
            "stalls_over_capture_slack": stall_events(self.latency_ns, slack_cap_ns),
            "command": " ".join(self.command),
        }


def command(interval_us: int, priority: int, cpu: int, seconds: int, tune: bool) -> list[str]:
    """The cyclictest command line: one thread, SCHED_FIFO, mlocked, pinned, verbose (one line
    per loop: thread:loop:latency), latencies in ns."""
    exe = shutil.which("cyclictest")
    if exe is None:
        raise RuntimeError("cyclictest is not installed: `apt-get install rt-tests` "
                           "(make setup does)")
    cmd = [exe, "-t", "1", "-p", str(priority), "-i", str(interval_us), "-d", "0", "-m", "-N",
           "-v",
           "-D", str(seconds)]
    if cpu >= 0:
        cmd += ["-a", str(cpu)]
    if not tune:
        cmd.append("--default-system")  # leave /dev/cpu_dma_latency alone, as the engine does
    return cmd


def parse(raw: bytes) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(loop counters, latencies in ns, cycles in the final summary line) of thread 0."""
    rows = [(int(c), int(v)) for t, c, v in LINE.findall(raw) if t == b"0"]
    arr = np.array(rows, dtype=np.int64).reshape(-1, 2)
    # a buffered stdout can be flushed twice (a line repeated): one value per loop, in order
    loops, first = np.unique(arr[:, 0], return_index=True)
    m = SUMMARY.search(raw)
    return loops, arr[first, 1], int(m.group(3)) if m else None


def run(interval_us: int, priority: int, cpu: int, seconds: int, out_dir: Path,
        tune: bool = False) -> CyclicResult:
    """Run cyclictest for `seconds` with its output in a file under out_dir; parse it."""
    cmd = command(interval_us, priority, cpu, seconds, tune)
    out = out_dir / f"cyclictest-{interval_us}us.txt"
    with open(out, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(seconds + 60)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    raw = out.read_bytes()
    if code != 0:
        raise RuntimeError(f"cyclictest exited with {code}: {raw[-1000:].decode(errors='replace')}")
    loops, lat, cycles = parse(raw)
    return CyclicResult(loops, lat, cycles, interval_us, cmd)
