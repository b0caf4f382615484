"""The fleet part of `echoel demo` (`make run`): a CA, mosquitto with TLS and ACL on
loopback, the fleet service on SQLite and this box's agent, so the box shows up in
`echoel fleet devices` like any box in a studio."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from echoel.daemon import config as config_mod
from echoel.daemon.child_processes import stop_all
from echoel.fleet.broker_process import Broker
from echoel.fleet.store import FleetStore
from echoel.provisioning.pki import FleetPki

log = logging.getLogger("echoel.demo")


def device_id() -> str:
    """This machine's box id: box-<hostname>, in the characters a certificate CN allows."""
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-") or "local"
    return f"box-{host}"[:63]


class DemoFleet:
    """Broker, fleet service and agent as child processes; `lines()` for the live view."""

    def __init__(self, folder: Path, cfg: config_mod.Config) -> None:
        self.folder = folder
        self.cfg = cfg
        self.device = device_id()
        self.pki = FleetPki(folder / "pki")
        self.broker = Broker(self.pki, folder / "broker")
        self.procs: list[subprocess.Popen] = []
        self.db = folder / "fleet.db"
        self.store: FleetStore | None = None
        self._lines: list[str] = []
        self._next = 0.0

    def start(self) -> None:
        """Provision (once), start the broker, the fleet service and the agent."""
        if not self.pki.exists():
            self.pki.init("Echoel demo fleet")
            self.pki.issue("broker", "broker")
            self.pki.issue("service", "fleet-service")
        crt, key = self.pki.paths("device", self.device)
        if not crt.exists():
            self.pki.issue("device", self.device)
        self.broker.start()
        scrt, skey = self.pki.paths("service", "fleet-service")
        self.fleet_toml = self.folder / "fleet.toml"
        self.fleet_toml.write_text(
            f'[fleet]\ndb = "{self.db}"\nbroker_port = {self.broker.port}\n'
            f'ca_file = "{self.pki.ca_cert_path}"\ncert_file = "{scrt}"\nkey_file = "{skey}"\n')
        d = self.cfg["daemon"]
        agent_toml = self.folder / "agent.toml"
        agent_toml.write_text(
            f'[daemon]\ninstance = "{d["instance"]}"\nrun_dir = "{d["run_dir"]}"\n'
            f'state_dir = "{self.folder / "box-state"}"\n'
            f'[agent]\nenabled = true\nbroker_port = {self.broker.port}\n'
            f'ca_file = "{self.pki.ca_cert_path}"\ncert_file = "{crt}"\nkey_file = "{key}"\n'
            f'telemetry_interval_s = 2.0\n')
        logf = open(self.folder / "fleet.log", "ab")
        for args in (["fleet", "--fleet-config", str(self.fleet_toml), "serve"],
                     ["agent", "--config", str(agent_toml)]):
            self.procs.append(subprocess.Popen([sys.executable, "-m", "echoel.daemon.cli",
                                                *args], stdout=logf, stderr=subprocess.STDOUT))
        logf.close()
        log.info("fleet: broker on 127.0.0.1:%d, box %s; see it with `echoel fleet "
                 "--fleet-config %s devices`", self.broker.port, self.device, self.fleet_toml)

    def lines(self) -> list[str]:
        """One or two lines about the box as the fleet sees it (refreshed every second)."""
        now = time.monotonic()
        if now < self._next:
            return self._lines
        self._next = now + 1.0
        try:
            if self.store is None and self.db.exists():
                self.store = FleetStore(str(self.db))
            d = self.store.device(self.device) if self.store else None
        except Exception as exc:  # the view must never take the demo down
            return [f"  fleet    store not readable yet ({exc})"]
        if d is None:
            self._lines = [f"  fleet    {self.device}: not seen by the fleet yet"]
        else:
            n = self.store.count("telemetry", self.device)
            seen = time.time() - (d["last_seen"] or 0)
            self._lines = [f"  fleet    {self.device}: {d['state']} (seen {seen:.0f} s ago), "
                           f"{n} reports stored, config v{d['config_version']}   "
                           f"`echoel fleet --fleet-config {self.fleet_toml} devices`"]
        return self._lines

    def stop(self) -> None:
        """Stop the agent, the service and the broker."""
        stop_all(reversed(self.procs))
        if self.store:
            self.store.close()
        self.broker.stop()
