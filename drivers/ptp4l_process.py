"""ptp4l run as a child: started with a generated config, restarted with backoff when it dies,
its output lines logged, stopped with SIGTERM (SIGKILL if it lingers).

`supervise()` is called from the owner's loop (the clock service polls 4 times a second); a
reader thread per process turns ptp4l's stdout/stderr into log records.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

from echoel.daemon.child_processes import stop_all
from echoel.drivers.realtime import die_with_parent

log = logging.getLogger("echoel.ptp4l")
BACKOFF_START_S = 0.5
STABLE_S = 30.0  # a ptp4l that ran this long resets the backoff
_PREFIX = re.compile(r"^ptp4l\[[0-9.]+\]: ")


class Ptp4lError(RuntimeError):
    """ptp4l cannot be started at all (not installed, config not writable)."""


class Ptp4lProcess:
    """One supervised ptp4l; the config text is written to `config_path` at each start."""

    def __init__(self, config_text: str, run_dir: str | Path, program: str = "ptp4l",
                 restart_max_s: float = 30.0, name: str = "ptp4l") -> None:
        self.run_dir = Path(run_dir)
        self.config_path = self.run_dir / f"{name}.cfg"
        self.config_text = config_text
        self.program = program
        self.restart_max_s = restart_max_s
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.lines: deque[str] = deque(maxlen=50)  # the latest output, for status and errors
        self._backoff = BACKOFF_START_S
        self._next_start = 0.0
        self._started_at = 0.0
        self._reader: threading.Thread | None = None
        self._stopped = True

    def start(self) -> None:
        """Write the config and start ptp4l now."""
        exe = shutil.which(self.program)
        if exe is None:
            raise Ptp4lError(f"{self.program!r} is not installed or not on PATH: install "
                             "linuxptp (`apt-get install linuxptp`) or set [clock] ptp4l")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.config_path.write_text(self.config_text)
        except OSError as exc:
            raise Ptp4lError(f"cannot write {self.config_path}: {exc.strerror}") from None
        self._stopped = False
        self.proc = subprocess.Popen(
            [exe, "-f", str(self.config_path), "-m", "-q"], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            preexec_fn=die_with_parent)
        self._started_at = time.monotonic()
        self._reader = threading.Thread(target=self._read, args=(self.proc,),
                                        name="ptp4l-output", daemon=True)
        self._reader.start()
        log.info("ptp4l started (pid %d) with %s", self.proc.pid, self.config_path)

    def _read(self, proc: subprocess.Popen) -> None:
        """Log ptp4l's lines (without its own 'ptp4l[uptime]: ' prefix); a line repeating
        the one before (a slave-only ptp4l without a grandmaster says so every few seconds)
        is logged at debug level, and how often it repeated when another one comes."""
        assert proc.stdout is not None
        previous, repeats = "", 0
        for raw in proc.stdout:
            line = _PREFIX.sub("", raw.rstrip())
            if not line:
                continue
            self.lines.append(line)
            if line == previous:
                repeats += 1
                log.debug("ptp4l[%d]: %s", proc.pid, line)
                continue
            if repeats:
                log.info("ptp4l[%d]: (the line before repeated %d times)", proc.pid, repeats)
            previous, repeats = line, 0
            log.info("ptp4l[%d]: %s", proc.pid, line)

    @property
    def running(self) -> bool:
        """True while ptp4l runs."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        """ptp4l's pid while it runs."""
        return self.proc.pid if self.running and self.proc else None

    def supervise(self, now: float | None = None) -> bool:
        """Notice a dead ptp4l and restart it when its backoff has passed; True if running."""
        if self._stopped:
            return False
        now = time.monotonic() if now is None else now
        if self.proc is not None and self.proc.poll() is not None:
            self.last_exit = self.proc.returncode
            ran = now - self._started_at
            if ran >= STABLE_S:
                self._backoff = BACKOFF_START_S
            self._next_start = now + self._backoff
            last = self.lines[-1] if self.lines else "no output"
            log.warning("ptp4l exited with code %s after %.1f s (last line: %s); restart in "
                        "%.1f s", self.last_exit, ran, last, self._backoff)
            self._backoff = min(self._backoff * 2, self.restart_max_s)
            self._join_reader()
            self.proc = None
        if self.proc is None and now >= self._next_start:
            self.restarts += 1
            self.start()
        return self.running

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM ptp4l, SIGKILL after `timeout`; no restart afterwards."""
        self._stopped = True
        if self.proc is not None:
            stop_all([self.proc], timeout)
            self.last_exit = self.proc.returncode
            self._join_reader()
            self.proc = None

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(2.0)
            self._reader = None
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def status(self) -> dict:
        """Running, pid, restarts, last exit code and output line."""
        return {"running": self.running, "pid": self.pid, "restarts": self.restarts,
                "last_exit": self.last_exit,
                "last_line": self.lines[-1] if self.lines else None}
