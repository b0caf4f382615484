"""A JACK server on the dummy backend (real-time paced, no hardware), its ALSA PCMs, patching.

Used by `make run` (the embedded default on a machine without a sound card) and by the tests.
Each server has its own name (JACK_DEFAULT_SERVER), so several can run side by side.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

SYSTEM_ALSA_CONF = "/usr/share/alsa/alsa.conf"


class JackError(RuntimeError):
    """The JACK server could not be started or used."""


def jack_pcm_conf(pcms: dict[str, tuple[str, int]]) -> str:
    """asound.conf text for JACK-backed PCMs: {pcm name: ("capture"|"playback", channels)}.

    Each PCM is its own JACK client of the same name; ports are not connected automatically.
    """
    out = []
    for name, (direction, channels) in pcms.items():
        ports = " ".join(f"{i} {{ }}" for i in range(channels))
        out.append(f'pcm.{name} {{ type jack name "{name}" {direction}_ports {{ {ports} }} }}')
    return "\n".join(out) + "\n"


def alsa_env(conf_path: Path, server: str) -> dict[str, str]:
    """Environment for a process that opens these PCMs on this server."""
    return {
        "ALSA_CONFIG_PATH": f"{SYSTEM_ALSA_CONF}:{conf_path}",
        "JACK_DEFAULT_SERVER": server,
        "JACK_NO_START_SERVER": "1",
        "JACK_NO_AUDIO_RESERVATION": "1",
        # The JACK plugin calls alsa-lib (avail_update) from JACK's thread while the
        # application may hold the same PCM's lock in snd_pcm_start -> jack_activate. Without
        # alsa-lib's per-PCM locks (each of our PCMs has one user thread) the plugin's client
        # hung at start in 3 of 22 starts here, against 3 of 8 with them.
        "LIBASOUND_THREAD_SAFE": "0",
    }


def clear_stale_shm() -> int:
    """Remove JACK's shared memory when no jackd runs on this machine; returns files removed.

    JACK's registry has 8 server slots and a jackd that was killed keeps its slot for good:
    after a few crashes no server starts ("jackd exited at start"). With no jackd alive, the
    files are stale by definition. Call it only before any JACK client exists in this process:
    libjack keeps the registry it first mapped, and would not find servers in a new one.
    """
    if subprocess.run(["pgrep", "-x", "jackd"], capture_output=True).returncode == 0:
        return 0
    n = 0
    for p in Path("/dev/shm").glob("jack*"):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


class JackServer:
    """jackd -d dummy, started and stopped by us."""

    def __init__(self, name: str, rate: int = 48000, period: int = 128,
                 log_path: Path | None = None, realtime_priority: int = 80) -> None:
        self.name, self.rate, self.period = name, rate, period
        self.log_path = log_path
        self.priority = realtime_priority
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """Environment for JACK tools talking to this server."""
        return {**os.environ, "JACK_DEFAULT_SERVER": self.name, "JACK_NO_START_SERVER": "1",
                "JACK_NO_AUDIO_RESERVATION": "1"}

    def start(self, timeout: float = 10.0) -> None:
        """Start jackd and wait until it answers."""
        if not shutil.which("jackd"):
            raise JackError("jackd is not installed: `apt-get install jackd2` (make setup does)")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            ["jackd", "-n", self.name, "-R", "-P", str(self.priority), "-d", "dummy",
             "-r", str(self.rate), "-p", str(self.period)],
            stdout=out, stderr=subprocess.STDOUT, env=self.env())
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise JackError(f"jackd exited with code {self.proc.returncode} at start; see "
                                f"{self.log_path or 'its output'}")
            r = subprocess.run(["jack_wait", "-c"], env=self.env(), capture_output=True,
                               text=True)
            if "running" in r.stdout and "not" not in r.stdout:
                return
            time.sleep(0.1)
        self.stop()
        raise JackError(f"jackd did not come up within {timeout:g} s")

    def stop(self) -> None:
        """Stop jackd (by its PID) and remove what it leaves in /dev/shm."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)  # a killed jackd keeps its slot in JACK's 8-slot registry
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        for leftover in Path("/dev/shm").glob(f"jack_sem.*_{self.name}_*"):
            leftover.unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        """True while jackd runs."""
        return self.proc is not None and self.proc.poll() is None

    def ports(self) -> dict[str, list[str]]:
        """Every port and what it is connected to."""
        r = subprocess.run(["jack_lsp", "-c"], env=self.env(), capture_output=True, text=True)
        ports: dict[str, list[str]] = {}
        current = None
        for line in r.stdout.splitlines():
            if line.startswith((" ", "\t")):
                if current:
                    ports[current].append(line.strip())
            elif line.strip():
                current = line.strip()
                ports[current] = []
        return ports

    def connect(self, src: str, dst: str) -> bool:
        """Connect two ports; False if either is missing."""
        r = subprocess.run(["jack_connect", src, dst], env=self.env(), capture_output=True)
        return r.returncode == 0

    def disconnect(self, src: str, dst: str) -> bool:
        """Disconnect two ports."""
        r = subprocess.run(["jack_disconnect", src, dst], env=self.env(), capture_output=True)
        return r.returncode == 0


class Patchbay(threading.Thread):
    """Keeps a set of connections made, as clients come and go (like a studio patch)."""

    def __init__(self, server: JackServer, pairs: list[tuple[str, str]],
                 interval: float = 0.2) -> None:
        super().__init__(name="patchbay", daemon=True)
        self.server, self.pairs, self.interval = server, list(pairs), interval
        self._stop_event = threading.Event()

    def ensure(self) -> int:
        """Make missing connections whose ports exist; returns how many were made."""
        if not self.server.running:
            return 0
        ports = self.server.ports()
        made = 0
        for src, dst in self.pairs:
            if src in ports and dst in ports and dst not in ports[src]:
                made += self.server.connect(src, dst)
        return made

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.ensure()

    def stop(self) -> None:
        """Stop patching."""
        self._stop_event.set()
