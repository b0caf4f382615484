"""Real parts for the fleet tests: a CA, mosquitto with TLS and ACL, PostgreSQL, box processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from echoel.daemon.child_processes import stop_all
from echoel.fleet.broker_process import Broker, free_port
from echoel.provisioning.pki import FleetPki

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def wait_for(pred, timeout: float = 10.0, step: float = 0.05, what: str = "condition"):
    """Poll `pred` until it returns something truthy; AssertionError after `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class PgServer:
    """A private PostgreSQL cluster (Debian's binaries) on a Unix socket, run as `postgres`."""

    def __init__(self, root: Path | None = None) -> None:
        # its own folder under /tmp: the postgres user cannot enter pytest's 0700 folders
        root = root or Path(tempfile.mkdtemp(prefix="echpg", dir="/tmp"))
        self.root = root
        self.data = root / "pgdata"
        self.sock = root / "pgsock"
        self.port = free_port()

    def _as_pg(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        pre = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*pre, *cmd], capture_output=True, text=True, timeout=120, **kw)

    def start(self) -> str:
        """initdb, start, create the database; returns its URL."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sock, "postgres")
        r = self._as_pg(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                        "postgres", "--no-sync")
        assert r.returncode == 0, r.stderr
        r = self._as_pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l",
                        str(self.root / "pg.log"), "-w", "-o",
                        f"-k {self.sock} -p {self.port} -c listen_addresses='' -c fsync=off",
                        "start")
        assert r.returncode == 0, r.stderr + (self.root / "pg.log").read_text()
        r = self._as_pg(str(PG_BIN / "createdb"), "-h", str(self.sock), "-p", str(self.port),
                        "echoel")
        assert r.returncode == 0, r.stderr
        return self.url("echoel")

    def url(self, db: str) -> str:
        """A psycopg URL for a database of this cluster."""
        return f"postgresql://postgres@/{db}?host={self.sock}&port={self.port}"

    def createdb(self, name: str) -> str:
        """A fresh database; its URL."""
        r = self._as_pg(str(PG_BIN / "createdb"), "-h", str(self.sock), "-p", str(self.port),
                        name)
        assert r.returncode == 0, r.stderr
        return self.url(name)

    def stop(self) -> None:
        """Stop the cluster and remove its folder."""
        self._as_pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class FleetRig:
    """A fleet on loopback: CA, broker, service identity, and boxes (config files)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = FleetPki(root / "pki")
        self.pki.init()
        self.pki.issue("broker", "broker")
        self.pki.issue("service", "fleet-service")
        self.broker = Broker(self.pki, root / "broker")
        self.procs: list[subprocess.Popen] = []

    def start(self) -> FleetRig:
        """Start the broker."""
        self.broker.start()
        return self

    def fleet_config(self, db: str) -> Path:
        """A fleet.toml for the service and the operator CLI."""
        crt, key = self.pki.paths("service", "fleet-service")
        path = self.root / f"fleet-{abs(hash(db)) % 10000}.toml"
        path.write_text(f'[fleet]\ndb = "{db}"\nbroker_port = {self.broker.port}\n'
                        f'ca_file = "{self.pki.ca_cert_path}"\ncert_file = "{crt}"\n'
                        f'key_file = "{key}"\nworkers = 2\n')
        return path

    def box_config(self, device: str, telemetry_s: float = 0.5, extra: str = "") -> Path:
        """Issue a device certificate and write the box's config (no sound card: searching)."""
        crt, key = self.pki.paths("device", device)
        if not crt.exists():
            self.pki.issue("device", device)
        d = self.root / device
        (d / "run").mkdir(parents=True, exist_ok=True)
        path = d / "box.toml"
        path.write_text(f'[engine]\ndevice = "hw:99"\nrescan_ms = 60000\n'
                        f'[daemon]\ninstance = "{device}"\nrun_dir = "{d / "run"}"\n'
                        f'state_dir = "{d / "state"}"\n'
                        f'[agent]\nenabled = true\nbroker_port = {self.broker.port}\n'
                        f'ca_file = "{self.pki.ca_cert_path}"\ncert_file = "{crt}"\n'
                        f'key_file = "{key}"\ntelemetry_interval_s = {telemetry_s}\n'
                        f'keepalive_s = 5\nreconnect_max_s = 2\n{extra}')
        return path

    def spawn(self, *args: str, log: str) -> subprocess.Popen:
        """Start `echoel ARGS` with its output in a log file."""
        out = open(self.root / log, "ab")
        p = subprocess.Popen([sys.executable, "-m", "echoel.daemon.cli", *args], stdout=out,
                             stderr=subprocess.STDOUT)
        out.close()
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        """A process's log so far."""
        try:
            return (self.root / name).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop every process started, then the broker."""
        stop_all(self.procs)
        self.broker.stop()
