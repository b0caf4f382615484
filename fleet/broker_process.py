"""Run mosquitto on loopback with the fleet's TLS and ACL files (tests and `make run`)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from echoel.provisioning.broker_files import write_broker_files
from echoel.provisioning.pki import FleetPki


class BrokerError(RuntimeError):
    """The broker could not be started."""


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A mosquitto process with a config generated from the PKI; start(), stop()."""

    def __init__(self, pki: FleetPki, folder: str | Path, port: int | None = None,
                 services: tuple[str, ...] = ("fleet-service",), persistence: bool = True) -> None:
        self.persistence = persistence  # sessions (the fleet's queue) survive a restart
        self.pki = pki
        self.folder = Path(folder)
        self.port = port or free_port()
        self.services = list(services)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.folder / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> None:
        """Write the config, start mosquitto and wait until it listens."""
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise BrokerError("mosquitto not found: install Debian's mosquitto (make setup)")
        conf = write_broker_files(self.pki, self.folder, self.port, self.services,
                                  persistence=self.persistence)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["stdbuf", "-oL", exe, "-c", str(conf)], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise BrokerError(f"mosquitto exited ({self.proc.returncode}); see "
                                  f"{self.log_path}: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} in {timeout} s")

    def log_tail(self, n: int = 2000) -> str:
        """The end of the broker's log."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop mosquitto (SIGTERM, then SIGKILL)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
