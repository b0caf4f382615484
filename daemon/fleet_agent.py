"""The box's fleet agent (`echoel agent`): birth and death, telemetry, events, commands and
the fleet's desired config, over MQTT 5 with mutual TLS.

One thread, one loop: keep the broker connection (exponential backoff with jitter), move the
local bus's status and events into the spool, send the spool in order, answer commands. It runs
in its own process, beside the supervisor, so nothing the network does reaches the audio.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shlex
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from echoel.daemon import bus, fleet_overlay
from echoel.daemon import config as config_mod
from echoel.daemon.agent_commands import Command, parse
from echoel.daemon.agent_spool import Spool
from echoel.daemon.box_health import BoxHealth
from echoel.daemon.bus_listener import BusListener
from echoel.daemon.update_agent import UpdateAgent, UpdateSettings
from echoel.drivers.mqtt_tls import BrokerLink, common_name, make_client
from echoel.fleet.protocol import SCHEMA_VERSION, MessageError, decode, encode, topic
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("echoel.agent")
WINDOW = 50  # spool messages sent and not yet confirmed by the fleet, at most
RESEND_MIN_S = 5.0  # unconfirmed this long (or 3 telemetry intervals) after sending: send again


def software_version() -> str:
    """The installed echoel-box version."""
    try:
        return metadata.version("echoel-box")
    except metadata.PackageNotFoundError:
        return "unknown"


class SeqFile:
    """A counter kept on disk that only goes up (the box's connection sequence)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.value = int(path.read_text().strip())
        except (OSError, ValueError):
            self.value = 0

    def next(self) -> int:
        """Increment, store durably, return the new value."""
        self.value += 1
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(str(self.value))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return self.value


def incarnation(path: Path) -> str:
    """This box's incarnation: made once per state folder (a reflashed box gets a new one,
    so the fleet knows its counters started again)."""
    try:
        return path.read_text().strip()
    except OSError:
        value = uuid.uuid4().hex
        path.write_text(value)
        return value


def link_from(cfg: config_mod.Config) -> BrokerLink:
    """The broker link described by the [agent] section."""
    a = cfg["agent"]
    return BrokerLink(a["broker_host"], a["broker_port"], a["ca_file"], a["cert_file"],
                      a["key_file"], a["keepalive_s"])


class FleetAgent:
    """The device side of the fleet link."""

    def __init__(self, base: config_mod.Config, argv: list[str] | None = None) -> None:
        self.base = base
        self.cfg, self.config_version = fleet_overlay.effective(base)
        self.argv = argv
        self.link = link_from(self.cfg)
        self.link.check()
        self.device_id = common_name(self.link.cert_file)
        self.sdir = fleet_overlay.state_dir(base)
        self.rdir = bus.run_dir(base["daemon"]["run_dir"])
        self.spool = Spool(self.sdir / "spool.sqlite", self.cfg["agent"]["spool_max_messages"])
        self.conn_seq = SeqFile(self.sdir / "agent-seq")
        self.incarnation = incarnation(self.sdir / "agent-incarnation")
        self.client = make_client(self.link, self.device_id)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect_async(self.link.host, self.link.port, self.link.keepalive_s,
                                  clean_start=True)
        self.health = BoxHealth(self.sdir)
        self.updates = UpdateAgent(UpdateSettings.from_config(self.cfg), self._update_event)
        self.updates.resume()  # an update interrupted by a restart or a reboot goes on
        self.listener = BusListener(self.rdir)
        self.connected = False
        self.inflight: dict[int, int] = {}  # mid -> spool seq, until the broker's PUBACK
        self.unconfirmed: dict[int, float] = {}  # spool seq -> when sent, until the fleet's ack
        self.sent_up_to = 0
        self.reconnects = 0
        self.rejected = 0  # messages the broker refused (reason code >= 0x80)
        self.bad_commands = 0
        self.delay = 1.0
        self.next_attempt = 0.0
        self.next_telemetry = time.monotonic() + 1.0  # the bus's first status is in by then
        self.last_status: dict | None = None
        self.last_status_at = 0.0
        self.services: dict[str, dict] = {}
        self.ev_cursor_path = self.sdir / "agent-events.json"
        try:
            self.ev_cursor = json.loads(self.ev_cursor_path.read_text())
        except (OSError, ValueError):
            self.ev_cursor = {}
        self.pending_desired: dict | None = None
        self.stopping = False
        self._restart_self = False

    # ------------------------------------------------------------------ connection
    def _birth(self, state: str) -> bytes:
        return encode({"schema": SCHEMA_VERSION, "state": state, "seq": self.conn_seq.value,
                       "incarnation": self.incarnation, "ts": time.time(),
                       "software": self.software(), "group": self.cfg["agent"]["group"]})

    def software(self) -> str:
        """The running release (the image's), else the installed package's version."""
        rel = self.updates.release()
        return rel if rel != "unknown" else software_version()

    def _update_event(self, ev: dict) -> None:
        """An update's progress, as a fleet event (kind "update", the protocol's fields)."""
        self.enqueue("events", {"schema": SCHEMA_VERSION, "ts": time.time(), **ev})

    def _connect(self) -> None:
        seq = self.conn_seq.next()
        self.client.will_set(topic(self.device_id, "state"), self._birth("lost"), qos=1,
                             retain=True)
        try:
            self.client.reconnect()
        except (OSError, ValueError) as exc:
            self._backoff(f"cannot reach the broker at {self.link.host}:{self.link.port} "
                          f"({exc})")
            return
        finally:
            self.reconnects += 1
        log.debug("connecting as %s (connection %d)", self.device_id, seq)

    def _backoff(self, why: str) -> None:
        wait = self.delay * random.uniform(0.5, 1.0)
        self.next_attempt = time.monotonic() + wait
        log.warning("%s; next attempt in %.1f s (telemetry and events wait in the spool: "
                    "%d messages)", why, wait, self.spool.depth)
        self.delay = min(self.delay * 2, self.cfg["agent"]["reconnect_max_s"])

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.connected = False
            self._backoff(f"the broker refused the connection: {reason_code}")
            return
        self.connected = True
        self.delay = 1.0
        me = f"devices/{self.device_id}"
        client.subscribe([(f"{me}/cmd", 1), (f"{me}/config/desired", 1), (f"{me}/state", 1),
                          (f"{me}/ack", 0)])
        for seq in self.unconfirmed:  # unconfirmed messages may have died with the broker
            self.unconfirmed[seq] = 0.0
        client.publish(f"{me}/state", self._birth("online"), qos=1, retain=True)
        log.info("connected to the fleet at %s:%d as %s (connection %d, %d spooled)",
                 self.link.host, self.link.port, self.device_id, self.conn_seq.value,
                 self.spool.depth)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self.connected
        self.connected = False
        # paho re-sends what was in flight after reconnecting; the rest waits in the spool
        if was and not self.stopping:
            self._backoff(f"lost the broker ({reason_code})")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        seq = self.inflight.pop(mid, None)
        if seq is None:
            return
        if reason_code.is_failure:
            self.rejected += 1
            log.error("the broker refused message %d: %s (dropped; check the ACL for %s)",
                      seq, reason_code, self.device_id)
            self.unconfirmed.pop(seq, None)
            self.spool.remove(seq)

    # ------------------------------------------------------------------ messages in
    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        leaf = msg.topic.split("/", 2)[2] if msg.topic.count("/") >= 2 else ""
        if leaf == "cmd":
            self._command(msg)
        elif leaf == "config/desired":
            try:
                self.pending_desired = decode(msg.payload, "desired config", 256 * 1024)
            except MessageError as exc:
                self._report_config(self.config_version, "rejected", str(exc))
        elif leaf == "state":
            self._check_state(msg.payload)
        elif leaf == "ack":
            self._fleet_ack(msg.payload)

    def _fleet_ack(self, payload: bytes) -> None:
        """The fleet stored these messages: forget them."""
        try:
            seqs = decode(payload, "ack").get("seqs")
        except MessageError:
            return
        if not isinstance(seqs, list):
            return
        for seq in seqs:
            if isinstance(seq, int) and self.unconfirmed.pop(seq, None) is not None:
                self.spool.remove(seq)

    def _check_state(self, payload: bytes) -> None:
        """A will that arrived after our birth replaced it on the broker: put the birth back."""
        try:
            doc = decode(payload, "state")
        except MessageError:
            doc = {}
        if self.connected and not self.stopping and (doc.get("state") != "online" or
                               doc.get("seq") != self.conn_seq.value):
            log.info("state on the broker is %s (seq %s), this connection is %d: "
                     "publishing the birth again", doc.get("state"), doc.get("seq"),
                     self.conn_seq.value)
            self.client.publish(topic(self.device_id, "state"), self._birth("online"), qos=1,
                                retain=True)

    def _command(self, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        resp = getattr(props, "ResponseTopic", None) if props else None
        corr = getattr(props, "CorrelationData", None) if props else None
        prefix = topic(self.device_id, "reply/")
        try:
            cmd = parse(msg.payload)
            reply = self._run(cmd)
        except MessageError as exc:
            self.bad_commands += 1
            log.warning("refused a command from the fleet: %s", exc)
            cmd, reply = None, {"ok": False, "error": str(exc)}
        except Exception as exc:  # a failing command must not take the agent down
            log.exception("command failed")
            cmd, reply = None, {"ok": False, "error": f"the command failed on the box: {exc}"}
        if not resp:
            log.warning("a command without a response topic: nobody can hear the answer")
            return
        if not resp.startswith(prefix):
            log.warning("a command asked for its reply on %r; replies go under %s", resp,
                        prefix)
            resp = prefix + "misdirected"
            reply = {"ok": False, "error": f"response topic must start with {prefix}"}
        p = Properties(PacketTypes.PUBLISH)
        if corr is not None:
            p.CorrelationData = corr
        reply["device"] = self.device_id
        self.client.publish(resp, encode(reply), qos=1, properties=p)
        if cmd and cmd.name == "restart" and cmd.args["service"] == "agent" and reply["ok"]:
            self._restart_self = True
        if cmd and cmd.name == "reboot" and reply["ok"]:
            subprocess.Popen(shlex.split(self.cfg["agent"]["reboot_command"]))

    def _run(self, cmd: Command) -> dict:
        if cmd.name == "ping":
            return {"ok": True, "result": {"pong": True, "ts": time.time()}}
        if cmd.name == "status":
            return {"ok": True, "result": self._telemetry()}
        if cmd.name == "config.get":
            values = fleet_overlay.read(self.sdir / fleet_overlay.OVERLAY_NAME)[1]
            return {"ok": True, "result": {"version": self.config_version, "values": values,
                                           "effective": self.cfg.data}}
        if cmd.name == "restart":
            if cmd.args["service"] == "agent":
                return {"ok": True, "result": {"restarting": "agent"}}
            return self._supervisor({"cmd": "restart", "service": "engine"})
        if cmd.name == "reboot":
            if not self.cfg["agent"]["allow_reboot"]:
                return {"ok": False, "error": "reboot is disabled on this box "
                        "(agent.allow_reboot = false)"}
            if cmd.args["confirm"] != self.device_id:
                return {"ok": False, "error": f"reboot: confirm = {cmd.args['confirm']!r} is "
                        f"not this box ({self.device_id}); nothing done"}
            log.warning("rebooting on the fleet's command")
            return {"ok": True, "result": {"rebooting": True}}
        if cmd.name == "update":
            return self.updates.handle_command(cmd.args)
        return {"ok": False, "error": f"{cmd.name}: not handled"}

    def _supervisor(self, req: dict, timeout: float = 5.0) -> dict:
        try:
            return bus.request(self.rdir, req, timeout)
        except TimeoutError as exc:
            return {"ok": False, "error": str(exc)}

    # ------------------------------------------------------------------ desired config
    def _apply_desired(self) -> None:
        doc, self.pending_desired = self.pending_desired, None
        version, values = doc.get("version"), doc.get("values")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            self._report_config(self.config_version, "rejected",
                                f"desired config: version = {version!r}: must be a positive "
                                "integer")
            return
        if version < self.config_version:
            self._report_config(self.config_version, "rejected", f"desired config v{version} "
                                f"is older than the applied v{self.config_version}")
            return
        res = self._supervisor({"cmd": "apply", "values": values, "version": version})
        if res.get("ok"):
            self.config_version = version
            self.cfg = self.base.with_values(values, f"fleet config v{version}")
            self.spool.max_messages = self.cfg["agent"]["spool_max_messages"]
            self._report_config(version, "applied", None, res.get("applied"))
        elif "no answer from the daemon" in str(res.get("error")):
            self.pending_desired = doc  # the stack is not up yet: try again next tick
        else:
            self._report_config(self.config_version, "rejected", res.get("error"),
                                desired=version)

    def _report_config(self, version: int, status: str, error: str | None,
                       how: str | None = None, desired: int | None = None) -> None:
        doc: dict[str, Any] = {"schema": SCHEMA_VERSION, "version": version, "status": status,
                               "error": error, "ts": time.time()}
        if how:
            doc["applied"] = how
        if desired is not None:
            doc["desired_version"] = desired
        if status == "rejected":
            log.warning("desired config rejected, staying on v%d: %s", version, error)
        self.client.publish(topic(self.device_id, "config/reported"), encode(doc), qos=1,
                            retain=True)

    # ------------------------------------------------------------------ messages out
    def _telemetry(self) -> dict:
        s = self.last_status
        fresh = s is not None and time.monotonic() - self.last_status_at < 5.0
        engine: dict[str, Any] = {"state": "unreachable"}
        if fresh and s is not None:
            engine = {k: s.get(k) for k in ("state", "device", "rate", "period", "latency_ms",
                                            "dsp_load_pct", "xruns", "interface_losses",
                                            "engine_restarts", "blocks", "problem")}
        return {"schema": SCHEMA_VERSION, "ts": time.time(), "engine": engine,
                "box": self.health.sample(),
                "versions": {"software": self.software(), "config": self.config_version},
                "software": self.software(), "update": self.updates.last_event(),
                "agent": {"spool_depth": self.spool.depth, "spool_dropped": self.spool.dropped,
                          "unconfirmed": len(self.unconfirmed),
                          "reconnects": self.reconnects, "rejected": self.rejected,
                          "bad_commands": self.bad_commands},
                "services": self.services}

    def enqueue(self, leaf: str, doc: dict) -> int:
        """Put a message in the spool (it leaves when connected, in order)."""
        return self.spool.append(topic(self.device_id, leaf),
                                 lambda seq: encode({**doc, "seq": seq}))

    def _send(self, rows: list[tuple[int, str, bytes]]) -> None:
        now = time.monotonic()
        for seq, t, payload in rows:
            info = self.client.publish(t, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break
            self.inflight[info.mid] = seq
            self.unconfirmed[seq] = now
            self.sent_up_to = max(self.sent_up_to, seq)

    def _pump(self) -> None:
        """Send the spool in order; send again what the fleet has not confirmed in time."""
        if not self.connected:
            return
        now = time.monotonic()
        wait = max(RESEND_MIN_S, 3 * self.cfg["agent"]["telemetry_interval_s"])
        stale = [s for s, t in self.unconfirmed.items() if now - t > wait]
        if stale:
            self._send(self.spool.get(stale))
        room = WINDOW - len(self.unconfirmed)
        if room > 0:
            self._send(self.spool.after(self.sent_up_to, room))

    def _drain_bus(self) -> None:
        pull = False
        for t, doc in self.listener.poll():
            if t == "status":
                self.last_status, self.last_status_at = doc, time.monotonic()
                ev = doc.get("events") or {}
                pull |= ev.get("boot") != self.ev_cursor.get("boot") or \
                    ev.get("seq", 0) > self.ev_cursor.get("seq", 0)
            elif t == "event" and "seq" in doc:
                pull = True  # the supervisor's (numbered); other services' events, such as
                # the transcriber's notes, are not the supervisor's to fetch
            elif t.startswith("status."):
                self.services[t[len("status."):]] = doc
        if pull:
            self._pull_events()

    def _pull_events(self) -> None:
        """Fetch the supervisor's events this agent has not forwarded (none lost while the
        agent was away, none sent twice: the cursor is kept on disk)."""
        since = self.ev_cursor.get("seq", 0)
        res = self._supervisor({"cmd": "events", "since": since}, 2.0)
        if not res.get("ok"):
            return
        if res["boot"] != self.ev_cursor.get("boot"):
            res = self._supervisor({"cmd": "events", "since": 0}, 2.0)  # a new supervisor
            if not res.get("ok"):
                return
        for ev in res["events"]:
            data = {k: v for k, v in ev.items() if k not in ("event", "time", "seq")}
            self.enqueue("events", {"schema": SCHEMA_VERSION, "kind": ev["event"],
                                    "ts": ev["time"], "data": data})
        self.ev_cursor = {"boot": res["boot"], "seq": res["seq"]}
        tmp = self.ev_cursor_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.ev_cursor))
        os.replace(tmp, self.ev_cursor_path)

    # ------------------------------------------------------------------ loop
    def step(self) -> None:
        """One turn of the loop (about 50 ms)."""
        now = time.monotonic()
        if not self.connected and now >= self.next_attempt and not self.stopping:
            self.next_attempt = now + 5.0  # until on_connect or a failure says otherwise
            self._connect()
        self.client.loop(0.05)
        self._drain_bus()
        self.updates.link_heartbeat(self.connected)
        self.updates.tick()
        if now >= self.next_telemetry:
            self.next_telemetry = now + self.cfg["agent"]["telemetry_interval_s"]
            self.enqueue("telemetry", self._telemetry())
        if self.pending_desired is not None and self.connected:
            self._apply_desired()
        self._pump()

    def run(self, duration: float | None = None) -> int:
        """Run until SIGTERM/SIGINT (or `duration` seconds)."""
        import signal

        def stop(signum, frame):
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        end = None if duration is None else time.monotonic() + duration
        while not self.stopping and not self._restart_self and \
                (end is None or time.monotonic() < end):
            self.step()
        self.shutdown()
        if self._restart_self:
            log.warning("restarting the agent on the fleet's command")
            os.execv(sys.executable, [sys.executable, "-m", "echoel.daemon.cli",
                                      *(self.argv or ["agent"])])
        return 0

    def shutdown(self) -> None:
        """Say goodbye (a retained 'offline' state, not a will), flush, disconnect."""
        self.stopping = True
        if self.connected and not self._restart_self:
            info = self.client.publish(topic(self.device_id, "state"), self._birth("offline"),
                                       qos=1, retain=True)
            end = time.monotonic() + 2.0
            while not info.is_published() and time.monotonic() < end:
                self.client.loop(0.05)
        end = time.monotonic() + 2.0
        while self.unconfirmed and self.connected and time.monotonic() < end:
            self.client.loop(0.05)
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.listener.close()
        self.spool.close()
