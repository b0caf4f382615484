"""Simulated boxes that take remote updates: bench/fleet_sim.py's boxes, plus the box's side of
the agreed update protocol.

A box answers the `update` command (devices/<id>/cmd, MQTT 5 response topic and correlation
data) at once: {"ok": true, "accepted": release}, or {"ok": false, "error": ...} when the
arguments are malformed or another update is running (the same release again, while it runs,
is answered ok: the fleet sends again when it heard no answer). Then it reports update events (kind
"update", on devices/<id>/events with the spool's seq, kept until the fleet confirms them):
downloading (progress 0, 50, 100), verifying, installing (0, 100), installed, then for a system
artifact rebooting (the connection drops; after `reboot_s` a new connection, a new birth with
the new software) and healthy. A configurable fraction of boxes fails instead (verification
fails: "failed") or rolls back (the new system fails its health checks after the reboot; the box
is back on its old software: "rolled_back", with the checks as evidence). Which boxes fail is
decided by `outcome(device, release, fail, rollback)` (a hash: the same each run). Telemetry
carries "software" and "update" (the last update event).

`UpdateFleet` is `SimFleet` with these boxes (processes run this file).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (the simulator processes): `bench.` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echoel.fleet.protocol import SCHEMA_VERSION, encode
from echoel.provisioning.pki import FleetPki

from bench import fleet_sim
from bench.fleet_sim import (
    NodeSpec,
    SimBox,
    SimFleet,
    SimNode,
    _read_varint,
    _s,
    _varint,
    parse_properties,
    raise_nofile,
    telemetry,
)

BASE_SOFTWARE = "2026.10.0"
DEFAULTS: dict[str, Any] = {
    "software": BASE_SOFTWARE,  # what every box runs at start
    "fail": 0.0,  # fraction of boxes whose update fails (verification)
    "rollback": 0.0,  # fraction that rolls back after the reboot
    "dl_s": 1.0,  # download time (s), x uniform(0.7, 1.3)
    "install_s": 0.5,
    "reboot_s": 1.0,
    "per_release": {},  # release -> {"fail": .., "rollback": ..} overriding the above
}
SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def outcome(device: str, release: str, fail: float, rollback: float) -> str:
    """What a box's update of a release does: "failed", "rolled_back" or "healthy"."""
    u = int.from_bytes(hashlib.sha256(f"{release}/{device}".encode()).digest()[:8], "big") \
        / 2.0 ** 64
    return "failed" if u < fail else "rolled_back" if u < fail + rollback else "healthy"


def publish_props_packet(topic: bytes, payload: bytes, pid: int, corr: bytes | None) -> bytes:
    """PUBLISH at QoS 1 with correlation data (a command's reply)."""
    props = (b"\x09" + _s(corr)) if corr is not None else b""
    body = _s(topic) + pid.to_bytes(2, "big") + _varint(len(props)) + props + payload
    return b"\x32" + _varint(len(body)) + body


def check_update_args(args: Any) -> str | None:
    """What is wrong with the `update` command's args (the protocol), or None."""
    if not isinstance(args, dict):
        return "update: args must be an object"
    need = {"release": str, "artifact": str, "url": str, "size": int, "sha256": str,
            "reboot": str}
    for k, t in need.items():
        v = args.get(k)
        if not isinstance(v, t) or isinstance(v, bool):
            return f"update: {k} = {v!r}: must be a {t.__name__}"
    extra = sorted(set(args) - set(need))
    if extra:
        return f"update: unexpected argument {extra[0]!r}"
    if args["artifact"] not in ("system", "models", "config"):
        return f"update: artifact = {args['artifact']!r}: allowed: system, models, config"
    if not args["url"].startswith("https://"):
        return f"update: url = {args['url']!r}: must be https://"
    if args["size"] <= 0 or not SHA_RE.match(args["sha256"]):
        return "update: size must be > 0 and sha256 64 lowercase hex digits"
    if args["reboot"] not in ("now", "window", "never"):
        return f"update: reboot = {args['reboot']!r}: allowed: now, window, never"
    return None


class UpdateBox(SimBox):
    """A simulated box that also takes `update` commands (see the module's text)."""

    def __init__(self, node: UpdateNode, device: str, ctx: Any) -> None:
        super().__init__(node, device, ctx)
        self.unode = node
        self.software = str(node.behaviour["software"])
        self.t_events = f"devices/{device}/events".encode()
        self.events: dict[int, bytes] = {}  # spool seq -> event payload (telemetry otherwise)
        self.last_update: dict | None = None
        self.job: dict | None = None  # the update running, until a final state
        self.booting = False  # the connection dropped for a reboot
        self.parked = False  # taken off the broker by the test: no reconnection
        self.commands = 0
        self.jobs = 0  # updates started (a repeated command for the same release is not one)
        self.sent_events = 0
        self.t_job = 0.0  # wall time the last update started and ended (a final state)
        self.t_final = 0.0

    # -- connection: SimBox's, with the box's software in its state messages
    def state_message(self, state: str) -> bytes:
        """Birth, will or goodbye with the software this box runs."""
        return fleet_sim.birth(state, self.conn_seq, self.node.spec.group, self.software)

    def _connack(self, body: bytes) -> None:
        super()._connack(body)
        if self.up and self.booting:
            self.booting = False
            asyncio.get_running_loop().create_task(self._after_boot())

    # -- commands
    def _packet(self, kind: int, body: bytes) -> None:
        if kind >> 4 != 3:
            super()._packet(kind, body)
            return
        tl = int.from_bytes(body[:2], "big")
        if not body[2:2 + tl].endswith(b"/cmd"):
            super()._packet(kind, body)
            return
        qos = (kind >> 1) & 3
        i = 2 + tl
        if qos:
            self._write(b"\x40\x02" + body[i:i + 2])
            i += 2
        plen, i = _read_varint(body, i)
        props = parse_properties(body[i:i + plen])
        self._command(props.get(0x08), props.get(0x09), body[i + plen:])

    def _reply(self, resp: bytes | None, corr: bytes | None, doc: dict) -> None:
        if not resp or not self.up:
            return
        pid = self._next_pid()
        self.inflight[pid] = (0, time.monotonic(), 0.0)
        self._write(publish_props_packet(resp, encode({**doc, "device": self.device}), pid,
                                         corr))

    def _command(self, resp: bytes | None, corr: bytes | None, payload: bytes) -> None:
        self.commands += 1
        try:
            doc = json.loads(payload)
            name, args = doc.get("name"), doc.get("args", {})
        except (ValueError, AttributeError):
            self._reply(resp, corr, {"ok": False, "error": "command: not a JSON object"})
            return
        if name == "ping":
            self._reply(resp, corr, {"ok": True, "result": {"pong": True}})
            return
        if name != "update":
            self._reply(resp, corr, {"ok": False, "error": f"command: unknown command "
                                     f"{name!r}; the simulated box takes ping, update"})
            return
        err = check_update_args(args)
        if err is None and self.job is not None:
            if self.job["release"] == args["release"]:  # the fleet heard no answer: same job
                self._reply(resp, corr, {"ok": True, "accepted": args["release"]})
                return
            err = f"busy: update {self.job['release']} is {self.job['state']}"
        if err is not None:
            self._reply(resp, corr, {"ok": False, "error": err})
            return
        self._reply(resp, corr, {"ok": True, "accepted": args["release"]})
        self.job = {**args, "state": "accepted", "old": self.software}
        self.jobs += 1
        self.t_job, self.t_final = time.time(), 0.0
        asyncio.get_running_loop().create_task(self._run_job())

    # -- the update
    def emit(self, state: str, progress: int | None = None, error: str | None = None,
             evidence: dict | None = None) -> None:
        """Queue an update event (sent in spool order, kept until the fleet confirms it)."""
        job = self.job or {}
        doc = {"schema": SCHEMA_VERSION, "kind": "update", "ts": time.time(),
               "release": job.get("release"), "artifact": job.get("artifact"), "state": state,
               "progress": progress, "error": error, "evidence": evidence}
        self.seq += 1
        self.events[self.seq] = encode({**doc, "seq": self.seq})
        self.last_update = doc
        if self.job is not None:
            self.job["state"] = state
        self.todo.append((self.seq, doc["ts"]))
        self.node.outstanding += 1
        self.sent_events += 1
        if state in ("healthy", "failed", "rolled_back", "refused"):
            self.t_final = doc["ts"]
            self.unode.finished[state] = self.unode.finished.get(state, 0) + 1
            self.job = None
        self._pump()

    def _plan(self) -> str:
        b = self.unode.behaviour
        over = b["per_release"].get(self.job["release"], {}) if self.job else {}
        return outcome(self.device, self.job["release"] if self.job else "",
                       over.get("fail", b["fail"]), over.get("rollback", b["rollback"]))

    async def _run_job(self) -> None:
        b = self.unode.behaviour
        job = self.job
        assert job is not None
        if job["release"] == self.software:
            self.emit("healthy")  # already running it
            return
        fate = self._plan()
        for pct in (0, 50, 100):
            self.emit("downloading", pct)
            await asyncio.sleep(b["dl_s"] / 3.0 * random.uniform(0.7, 1.3))
        self.emit("verifying")
        await asyncio.sleep(0.05)
        if fate == "failed":
            self.emit("failed", error=f"{job['artifact']} bundle: signature check failed",
                      evidence={"checks": [{"name": "signature", "ok": False,
                                            "detail": "sha256 of the download does not "
                                                      "match the manifest"}]})
            return
        for pct in (0, 100):
            self.emit("installing", pct)
            await asyncio.sleep(b["install_s"] / 2.0 * random.uniform(0.7, 1.3))
        self.emit("installed")
        if job["artifact"] != "system" or job["reboot"] == "never":
            if job["artifact"] != "system":
                self.emit("healthy")
            else:
                self.job = None  # installed, waits for a reboot nobody asked for
            return
        self.emit("rebooting")
        await asyncio.sleep(0.05)
        if fate == "healthy":
            self.software = job["release"]
        self.booting = True
        if self.transport is not None:
            self.transport.abort()  # the reboot: the broker publishes the will

    async def _after_boot(self) -> None:
        await asyncio.sleep(0.2)
        job = self.job
        if job is None:
            return
        if self.software == job["release"]:
            self.emit("healthy")
        else:
            self.emit("rolled_back", error=f"health checks failed on {job['release']}; back "
                      f"on {self.software}",
                      evidence={"checks": [{"name": "engine_running", "ok": False,
                                            "value": "restarted 3 times in 60 s",
                                            "limit": "no restart"},
                                           {"name": "xruns_per_min", "ok": False,
                                            "value": 41, "limit": 5}]})

    # -- sending: telemetry, or the event queued under that seq
    def message(self, seq: int, ts: float) -> tuple[bytes, bytes, float]:
        """(topic, payload, ts): an update event queued under seq, else telemetry."""
        ev = self.events.get(seq)
        if ev is not None:
            return self.t_events, ev, ts
        payload, ts = self._telemetry(seq, ts)
        return self.t_tele, payload, ts

    def _telemetry(self, seq: int, ts: float) -> tuple[bytes, float]:
        payload, ts = telemetry(self.figures, seq, self.conn_seq, len(self.unconfirmed), ts)
        doc = json.loads(payload)
        doc["versions"]["software"] = self.software
        doc["software"] = self.software
        doc["update"] = self.last_update
        return encode(doc), ts


class UpdateNode(SimNode):
    """SimNode with UpdateBoxes and two more commands: 'behave' and 'updates'."""

    def __init__(self, conn: Any, spec: NodeSpec, behaviour: dict) -> None:
        super().__init__(conn, spec)
        self.behaviour = {**DEFAULTS, **behaviour}
        self.finished: dict[str, int] = {}

    def lost(self, box: SimBox) -> None:
        """A rebooting box comes back after reboot_s; others as SimNode's."""
        if getattr(box, "parked", False):
            return
        if getattr(box, "booting", False):
            self.reconnects += 1
            asyncio.get_running_loop().call_later(self.behaviour["reboot_s"],
                                                  lambda: SimNode.lost(self, box))
            return
        super().lost(box)

    async def _command(self, cmd: str, args: dict) -> Any:
        if cmd == "behave":
            self.behaviour.update(args)
            return True
        if cmd == "updates":
            return {b.device: {"software": b.software, "commands": b.commands, "jobs": b.jobs,
                               "busy": b.job is not None,
                               "events": b.sent_events, "t_job": b.t_job,
                               "t_final": b.t_final,
                               "last": (b.last_update or {}).get("state"),
                               "release": (b.last_update or {}).get("release")}
                    for b in self.boxes if isinstance(b, UpdateBox)}
        if cmd == "offline":  # these boxes go away (goodbye) or come back (connect)
            wanted = set(args["devices"])
            for b in self.boxes:
                if b.device in wanted and isinstance(b, UpdateBox):
                    b.parked = not args["on"]
                    if args["on"] and not b.up:
                        await asyncio.wait_for(b.connect(), 30.0)
                    elif not args["on"] and b.up:
                        b.booting = False
                        b.goodbye()
            return True
        return await super()._command(cmd, args)


class UpdateFleet(SimFleet):
    """`n` update-taking simulated boxes over `procs` processes (group `group`)."""

    def __init__(self, pki: FleetPki, port: int, n: int, procs: int = 2,
                 host: str = "127.0.0.1", keepalive_s: int = 30, group: str = "sim",
                 **behaviour: Any) -> None:
        if n < 1 or procs < 1:
            raise ValueError(f"simulated fleet: n = {n}, procs = {procs}: both must be >= 1")
        unknown = sorted(set(behaviour) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"simulated boxes: unknown behaviour {unknown[0]!r}; allowed: "
                             f"{', '.join(DEFAULTS)}")
        self.n = n
        procs = min(procs, n)
        self.nodes = []
        first = 0
        for k in range(procs):
            count = n // procs + (1 if k < n % procs else 0)
            spec = NodeSpec(host, port, str(pki.ca_cert_path), str(pki.root), first, count,
                            keepalive_s, group)
            first += count
            parent, child = socket.socketpair()
            fd = child.fileno()
            p = subprocess.Popen([sys.executable, __file__, "--node", str(fd),
                                  json.dumps(asdict(spec)), json.dumps(behaviour)],
                                 pass_fds=(fd,))
            child.close()
            self.nodes.append((p, Connection(parent.detach())))
        self.cpu0 = 0.0

    def behave(self, **behaviour: Any) -> None:
        """Change how the boxes take updates (see DEFAULTS)."""
        self._all("behave", **behaviour)

    def updates(self) -> dict[str, dict]:
        """Each box's own account: software run, commands taken, last update state."""
        out: dict[str, dict] = {}
        for r in self._all("updates"):
            out.update(r)
        return out

    def set_online(self, devices: list[str], on: bool) -> None:
        """Take boxes off the broker (a clean goodbye) or bring them back."""
        self._all("offline", devices=devices, on=on)


def _node_main(fd: int, spec: NodeSpec, behaviour: dict) -> None:
    # SimNode.main makes its boxes from fleet_sim's SimBox: in this simulator process only,
    # that name means UpdateBox
    fleet_sim.SimBox = UpdateBox  # type: ignore[misc]
    raise_nofile(spec.count + 256)
    asyncio.run(UpdateNode(Connection(fd), spec, behaviour).main())


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--node":
    _node_main(int(sys.argv[2]), NodeSpec(**json.loads(sys.argv[3])), json.loads(sys.argv[4]))
