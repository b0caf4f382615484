"""The box's own health for telemetry: uptime, CPU, memory, temperature, disk, load."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals), idle


def temperature_c() -> float | None:
    """The hottest thermal zone (SoC on a Pi or Jetson); None where the board has none."""
    temps = []
    for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
        try:
            temps.append(int(zone.read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    return round(max(temps), 1) if temps else None


def meminfo() -> dict[str, int]:
    """/proc/meminfo in kB."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0])
    return out


class BoxHealth:
    """Samples the box; CPU use is measured between two calls of `sample()`."""

    def __init__(self, disk_path: str | Path = "/") -> None:
        self.disk_path = str(disk_path)
        self._cpu = _cpu_times()

    def sample(self) -> dict:
        """One compact health record."""
        total, idle = _cpu_times()
        dt, di = total - self._cpu[0], idle - self._cpu[1]
        self._cpu = (total, idle)
        mem = meminfo()
        disk = shutil.disk_usage(self.disk_path)
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return {
            "uptime_s": round(uptime),
            "cpu_pct": round(100.0 * (dt - di) / dt, 1) if dt > 0 else 0.0,
            "load1": round(os.getloadavg()[0], 2),
            "mem_used_pct": round(100.0 * (1 - mem["MemAvailable"] / mem["MemTotal"]), 1),
            "mem_avail_mb": mem["MemAvailable"] // 1024,
            "temp_c": temperature_c(),
            "disk_free_mb": disk.free // (1024 * 1024),
            "disk_used_pct": round(100.0 * disk.used / disk.total, 1),
        }
