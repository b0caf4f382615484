"""Simulated boxes for the fleet benchmark: thousands of light MQTT 5 clients over mutual TLS.

Each simulated box speaks what the box's agent (daemon/fleet_agent.py) speaks: TLS with its own
certificate from the fleet CA (CN = device id), MQTT 5 CONNECT with clean start and the same
last will (retained `devices/<id>/state` {"state": "lost"} at QoS 1), SUBSCRIBE to its cmd,
config/desired, state (QoS 1) and ack (QoS 0) topics, a retained birth, then telemetry (QoS 1,
JSON of the agent's shape and size, `seq` per box) every period with jitter, or all at once
(burst). Like the agent, a box keeps each report until the fleet service confirms it
(`devices/<id>/ack`), has at most WINDOW unconfirmed, sends again what stays unconfirmed for
max(5 s, 3 periods) and, after a reconnection, at once; with confirmations off (for a
subscriber that confirms nothing) the broker's PUBACK settles a report.

The client is a minimal hand-written MQTT 5 publisher on asyncio's TLS transport (CONNECT/
CONNACK, SUBSCRIBE/SUBACK, PUBLISH QoS 1/PUBACK both ways, PINGREQ): a paho client per box
would cost a thread or a socket loop each. Boxes are spread over several processes
(`SimFleet`, fresh interpreters), each one asyncio loop, driven over a socket pair by the
benchmark. The reference subscriber (`BareSubscriber`: paho, shared subscription, counts) is
here too.

Certificates are issued once into build/fleet-sim-pki (FleetPki, its index written once at the
end) and reused by later runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import resource
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from echoel.fleet.protocol import SCHEMA_VERSION, encode
from echoel.provisioning.pki import FleetPki

ROOT = Path(__file__).resolve().parent.parent
PKI_CACHE = ROOT / "build" / "fleet-sim-pki"
SERVICE = "fleet-service"
WINDOW = 50  # unconfirmed messages per box, as the agent's spool pump
RESEND_MIN_S = 5.0  # the agent's: unconfirmed this long (or 3 periods): send again
CONNECTS_IN_FLIGHT = 24  # TLS handshakes at once per process (the broker's listen backlog)
SOFTWARE = "0.1.0"


def device_id(i: int) -> str:
    """The i-th simulated box's id (its certificate CN)."""
    return f"sim-{i:05d}"


# ---------------------------------------------------------------------- certificates
class _BulkPki(FleetPki):
    """FleetPki that keeps its index in memory while issuing many certificates."""

    _rows: list[dict] | None = None

    def _index(self) -> list[dict]:
        if self._rows is None:
            self._rows = super()._index()
        return self._rows

    def _save_index(self, rows: list[dict]) -> None:
        self._rows = rows

    def flush(self) -> None:
        """Write the index once."""
        if self._rows is not None:
            FleetPki._save_index(self, self._rows)

    def refresh_crl(self) -> None:
        """A fresh CRL (the cached one expires after 30 days; then the broker refuses all)."""
        self._write_crl(self._index())


def ensure_pki(n_boxes: int, root: Path = PKI_CACHE) -> FleetPki:
    """The cached fleet CA with the broker, service and `n_boxes` device certificates."""
    pki = _BulkPki(root)
    if not pki.exists():
        pki.init(org="Echoel fleet bench")
    for kind, name in (("broker", "broker"), ("service", SERVICE)):
        if not pki.paths(kind, name)[0].exists():
            pki.issue(kind, name)
    for i in range(n_boxes):
        crt, key = pki.paths("device", device_id(i))
        if not (crt.exists() and key.exists()):
            pki.issue("device", device_id(i))
    crl_age = time.time() - pki.crl_path.stat().st_mtime if pki.crl_path.exists() else 1e9
    if crl_age > 86400:
        pki.refresh_crl()
    pki.flush()
    return FleetPki(root)


def raise_nofile(need: int) -> int:
    """Raise RLIMIT_NOFILE to at least `need` if allowed (root may lift the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    want = need if hard == resource.RLIM_INFINITY else max(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(want, need)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------------- MQTT 5 packets
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _s(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def connect_packet(client_id: str, keepalive_s: int, will_topic: str, will: bytes,
                   receive_max: int = WINDOW) -> bytes:
    """CONNECT: MQTT 5, clean start, retained QoS 1 last will, our receive maximum."""
    flags = 0x02 | 0x04 | (1 << 3) | 0x20  # clean start, will, will QoS 1, will retain
    props = b"\x21" + receive_max.to_bytes(2, "big")
    body = (b"\x00\x04MQTT\x05" + bytes([flags]) + keepalive_s.to_bytes(2, "big") +
            _varint(len(props)) + props + _s(client_id.encode()) + b"\x00" +
            _s(will_topic.encode()) + _s(will))
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, pid: int, retain: bool = False) -> bytes:
    """PUBLISH at QoS 1 without properties."""
    n = 2 + len(topic) + 3 + len(payload)
    return b"".join((b"\x33" if retain else b"\x32", _varint(n), _s(topic),
                     pid.to_bytes(2, "big"), b"\x00", payload))


def subscribe_packet(pid: int, topics: list[tuple[str, int]]) -> bytes:
    """SUBSCRIBE to each (topic filter, QoS)."""
    body = pid.to_bytes(2, "big") + b"\x00" + b"".join(_s(t.encode()) + bytes([q])
                                                       for t, q in topics)
    return b"\x82" + _varint(len(body)) + body


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
# CONNACK property id -> width (0 variable byte integer, -1 string/binary, -2 string pair)
_PROP_WIDTH = {0x01: 1, 0x02: 4, 0x03: -1, 0x08: -1, 0x09: -1, 0x0B: 0, 0x11: 4, 0x12: -1,
               0x13: 2, 0x15: -1, 0x16: -1, 0x17: 1, 0x18: 4, 0x19: 1, 0x1A: -1, 0x1C: -1,
               0x1F: -1, 0x21: 2, 0x22: 2, 0x23: 2, 0x24: 1, 0x25: 1, 0x26: -2, 0x27: 4,
               0x28: 1, 0x29: 1, 0x2A: 1}


def _read_varint(b: bytes | bytearray, i: int) -> tuple[int, int]:
    n, shift = 0, 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        if not c & 0x80:
            return n, i
        shift += 7


def parse_properties(b: bytes | bytearray) -> dict[int, Any]:
    """Properties (after their length) as {id: value}; strings and binaries stay bytes."""
    out: dict[int, Any] = {}
    i = 0
    while i < len(b):
        pid, i = _read_varint(b, i)
        w = _PROP_WIDTH.get(pid)
        if w is None:
            raise ValueError(f"MQTT property 0x{pid:02x}: unknown")
        if w > 0:
            out[pid] = int.from_bytes(b[i:i + w], "big")
            i += w
        elif w == 0:
            out[pid], i = _read_varint(b, i)
        else:
            for _ in range(-w):
                n = int.from_bytes(b[i:i + 2], "big")
                out[pid] = bytes(b[i + 2:i + 2 + n])
                i += 2 + n
    return out


# ---------------------------------------------------------------------- box content
def birth(state: str, conn_seq: int, group: str, software: str = SOFTWARE) -> bytes:
    """The state message (birth, will, goodbye) as the agent writes it."""
    return encode({"schema": SCHEMA_VERSION, "state": state, "seq": conn_seq,
                   "ts": time.time(), "software": software, "group": group})


@dataclass
class BoxFigures:
    """A simulated box's slowly changing health (to fill telemetry realistically)."""

    born: float = field(default_factory=time.time)
    xruns_c: int = 0
    xruns_p: int = 0
    temp_c: float = field(default_factory=lambda: round(random.uniform(42.0, 61.0), 1))
    disk_free_mb: int = field(default_factory=lambda: random.randint(9000, 28000))


def telemetry(f: BoxFigures, seq: int, conn_seq: int, unconfirmed: int,
              ts: float = 0.0) -> tuple[bytes, float]:
    """A telemetry message shaped like the agent's `_telemetry()` (about 750 bytes) and its
    ts (now, unless `ts` is given: a message sent again keeps its time)."""
    now = ts or time.time()
    up = now - f.born + 3600.0
    if random.random() < 0.02:
        f.xruns_p += 1
    return encode({
        "schema": SCHEMA_VERSION, "seq": seq, "ts": now,
        "engine": {"state": "running", "device": "hw:CARD=USB,DEV=0", "rate": 48000,
                   "period": 128, "latency_ms": 5.33,
                   "dsp_load_pct": round(random.uniform(8.0, 35.0), 1),
                   "xruns": {"capture": f.xruns_c, "playback": f.xruns_p},
                   "interface_losses": 0, "engine_restarts": 0, "blocks": int(up * 375.0),
                   "problem": None},
        "box": {"uptime_s": round(up), "cpu_pct": round(random.uniform(12.0, 48.0), 1),
                "load1": round(random.uniform(0.3, 1.6), 2),
                "mem_used_pct": round(random.uniform(28.0, 41.0), 1),
                "mem_avail_mb": random.randint(2200, 2900), "temp_c": f.temp_c,
                "disk_free_mb": f.disk_free_mb, "disk_used_pct": 41.7},
        "versions": {"software": SOFTWARE, "config": 3},
        "agent": {"spool_depth": unconfirmed, "spool_dropped": 0, "unconfirmed": unconfirmed,
                  "reconnects": conn_seq, "rejected": 0, "bad_commands": 0},
        "services": {"supervisor": {"state": "running", "engine_pid": 812, "restarts": 0,
                                    "uptime_s": round(up)},
                     "models": {"loaded": 4, "store_mb": 212,
                                "last_check": round(now - 600.0)}},
    }), now


# ---------------------------------------------------------------------- one box
class SimBox(asyncio.Protocol):
    """One simulated box: its MQTT session, its telemetry sequence, what is in flight.

    Confirmed mode (the agent's): a message stays "unconfirmed" until the fleet service's ack
    (`devices/<id>/ack`, its seqs) arrives; at most WINDOW unconfirmed; sent again when
    unconfirmed for RESEND_MIN_S or 3 periods, and at once after a reconnection. Otherwise
    (for a subscriber that confirms nothing) the broker's PUBACK settles a message.
    """

    def __init__(self, node: SimNode, device: str, ctx: ssl.SSLContext) -> None:
        self.node = node
        self.device = device
        self.ctx = ctx
        self.t_tele = f"devices/{device}/telemetry".encode()
        self.t_state = f"devices/{device}/state"
        self.figures = BoxFigures()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.up = False
        self.ready: asyncio.Future | None = None
        self.conn_seq = 0
        self.seq = 0  # telemetry seq (the agent's spool seq)
        self.pid = 0
        self.receive_max = WINDOW
        self.inflight: dict[int, tuple[int, float, float]] = {}  # pid -> (seq or 0, sent, ts)
        self.unconfirmed: dict[int, tuple[float, float]] = {}  # seq -> (sent, ts)
        self.todo: collections.deque[tuple[int, float]] = collections.deque()  # (seq, ts|0)
        self.keepalive_s = node.spec.keepalive_s
        self.last_tx = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.win_lo = 0  # first and last seq made in the current window
        self.win_hi = 0

    # -- connection
    async def connect(self) -> None:
        """Open TLS, CONNECT, wait for CONNACK (raises on refusal)."""
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()
        self.conn_seq += 1
        await loop.create_connection(lambda: self, self.node.spec.host, self.node.spec.port,
                                     ssl=self.ctx, server_hostname="localhost")
        await self.ready

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf.clear()
        self._write(connect_packet(self.device, self.keepalive_s, self.t_state,
                                   self.state_message("lost")))

    def connection_lost(self, exc: Exception | None) -> None:
        was_up, self.up, self.transport = self.up, False, None
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.device}: connection closed "
                                                     f"before CONNACK ({exc})"))
        # what was in flight goes again, first, same seq and ts (the spool keeps it)
        if self.node.confirm:
            again = sorted((s, ts) for s, (_, ts) in self.unconfirmed.items())
            self.unconfirmed.clear()
        else:
            again = sorted((s, ts) for s, _, ts in self.inflight.values() if s)
        self.inflight.clear()
        self.todo.extendleft(reversed(again))
        if was_up and not self.node.stopping:
            self.node.lost(self)

    def state_message(self, state: str) -> bytes:
        """This box's birth, will or goodbye."""
        return birth(state, self.conn_seq, self.node.spec.group)

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            self.last_tx = time.monotonic()

    def _next_pid(self) -> int:
        while True:
            self.pid = self.pid % 65535 + 1
            if self.pid not in self.inflight:
                return self.pid

    # -- incoming packets
    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        i, n = 0, len(buf)
        while n - i >= 2:
            kind = buf[i]
            try:
                length, j = _read_varint(buf, i + 1)
            except IndexError:
                break
            if j + length > n:
                break
            self._packet(kind, bytes(buf[j:j + length]))
            i = j + length
        if i:
            del buf[:i]

    def _packet(self, kind: int, body: bytes) -> None:
        t = kind >> 4
        if t == 4:  # PUBACK
            self._puback(int.from_bytes(body[:2], "big"), body[2] if len(body) > 2 else 0)
        elif t == 3:  # PUBLISH to us: the fleet's ack, our retained state, commands
            qos = (kind >> 1) & 3
            tl = int.from_bytes(body[:2], "big")
            i = 2 + tl
            if qos:
                self._write(b"\x40\x02" + body[i:i + 2])
                i += 2
            plen, i = _read_varint(body, i)
            if body[2 + tl - 4:2 + tl] == b"/ack":
                self._fleet_ack(body[i + plen:])
            else:
                self.node.received += 1
        elif t == 2:  # CONNACK
            self._connack(body)
        elif t == 14:  # DISCONNECT from the broker
            self.node.broker_disconnects += 1

    def _connack(self, body: bytes) -> None:
        rc = body[1]
        if rc >= 0x80:
            if self.ready and not self.ready.done():
                self.ready.set_exception(ConnectionRefusedError(
                    f"{self.device}: CONNACK reason 0x{rc:02x}"))
            return
        plen, i = _read_varint(body, 2)
        props = parse_properties(body[i:i + plen])
        self.receive_max = min(WINDOW, props.get(0x21, 65535))
        self.keepalive_s = props.get(0x13, self.keepalive_s)
        self.up = True
        me = f"devices/{self.device}"
        self._write(subscribe_packet(self._next_pid(), [(f"{me}/cmd", 1),
                                                        (f"{me}/config/desired", 1),
                                                        (self.t_state, 1), (f"{me}/ack", 0)]))
        pid = self._next_pid()
        self.inflight[pid] = (0, time.monotonic(), 0.0)
        self._write(publish_packet(self.t_state.encode(), self.state_message("online"),
                                   pid, retain=True))
        if self.ready and not self.ready.done():
            self.ready.set_result(True)
        self._pump()

    def _puback(self, pid: int, rc: int) -> None:
        sent = self.inflight.pop(pid, None)
        if sent is None:
            return
        seq, t0, _ = sent
        node = self.node
        if seq:
            if rc >= 0x80:  # refused (ACL): the agent drops it
                node.rejected += 1
                if self.unconfirmed.pop(seq, None) is not None or not node.confirm:
                    node.settle(1)
            else:
                node.ack_lat.append(time.monotonic() - t0)
                node.acked += 1
                node.last_ack_wall = time.time()
                if not node.confirm:
                    node.settle(1)
        self._pump()

    def _fleet_ack(self, payload: bytes) -> None:
        try:
            seqs = json.loads(payload).get("seqs") or []
        except (ValueError, AttributeError):
            return
        now = time.time()
        node = self.node
        done = 0
        for seq in seqs:
            sent = self.unconfirmed.pop(seq, None)
            if sent is not None:
                node.confirm_lat.append(now - sent[1])
                done += 1
        if done:
            node.confirmed += done
            node.last_confirm_wall = now
            if node.confirm:
                node.settle(done)
            self._pump()

    # -- publishing
    def report(self, count: int = 1) -> None:
        """Queue `count` new telemetry messages (sent as the window allows)."""
        if self.win_lo == 0:
            self.win_lo = self.seq + 1
        for _ in range(count):
            self.seq += 1
            self.todo.append((self.seq, 0.0))
        self.win_hi = self.seq
        self.node.outstanding += count
        self._pump()

    def resend_stale(self, now: float, wait_s: float) -> None:
        """Send again what the fleet has not confirmed for `wait_s` (the agent's rule)."""
        stale = sorted((s, ts) for s, (t, ts) in self.unconfirmed.items() if now - t > wait_s)
        for s, _ in stale:
            del self.unconfirmed[s]
        if stale:
            self.node.resent += len(stale)
            self.todo.extendleft(reversed(stale))
            self._pump()

    def _pump(self) -> None:
        if not self.up:
            return
        node = self.node
        confirm = node.confirm
        while self.todo and len(self.inflight) < self.receive_max and \
                (not confirm or len(self.unconfirmed) < WINDOW):
            seq, ts = self.todo.popleft()
            pid = self._next_pid()
            where, payload, ts = self.message(seq, ts)
            now = time.monotonic()
            self.inflight[pid] = (seq, now, ts)
            if confirm:
                self.unconfirmed[seq] = (now, ts)
            self._write(publish_packet(where, payload, pid))
            node.published += 1
            node.bytes_out += len(payload)
            if not node.first_pub_wall:
                node.first_pub_wall = time.time()

    def message(self, seq: int, ts: float) -> tuple[bytes, bytes, float]:
        """(topic, payload, ts) of the report numbered seq: telemetry."""
        payload, ts = telemetry(self.figures, seq, self.conn_seq, len(self.unconfirmed), ts)
        return self.t_tele, payload, ts

    def tick(self) -> None:
        """Steady mode: report, then schedule the next report (period with jitter)."""
        self.report(1)
        j = random.uniform(1.0 - self.node.jitter, 1.0 + self.node.jitter)
        self.timer = asyncio.get_running_loop().call_later(self.node.period * j, self.tick)

    def goodbye(self) -> None:
        """Publish 'offline' (retained) and DISCONNECT normally, as the agent's shutdown."""
        if self.up:
            pid = self._next_pid()
            self._write(publish_packet(self.t_state.encode(), self.state_message("offline"),
                                       pid, retain=True))
            self._write(DISCONNECT)
        if self.transport is not None:
            self.transport.close()


# ---------------------------------------------------------------------- one process
@dataclass(frozen=True)
class NodeSpec:
    """What one simulator process runs: which boxes, where the broker is."""

    host: str
    port: int
    ca_file: str
    pki_root: str
    first: int
    count: int
    keepalive_s: int = 30
    group: str = "sim"


class SimNode:
    """One process's boxes on one asyncio loop, driven by commands on a pipe."""

    def __init__(self, conn: Any, spec: NodeSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.boxes: list[SimBox] = []
        self.stopping = False
        self.confirm = True
        self.period = 10.0
        self.jitter = 0.1
        self.outstanding = 0
        self.drained: asyncio.Event | None = None
        self.reconnects = 0
        self.broker_disconnects = 0
        self.connect_failures = 0
        self.received = 0
        self.pings = 0
        self._mark()

    def _mark(self) -> None:
        self.published = 0
        self.acked = 0
        self.confirmed = 0
        self.resent = 0
        self.rejected = 0
        self.bytes_out = 0
        self.ack_lat: list[float] = []
        self.confirm_lat: list[float] = []
        self.first_pub_wall = 0.0
        self.last_ack_wall = 0.0
        self.last_confirm_wall = 0.0
        for b in self.boxes:
            b.win_lo = b.win_hi = 0

    def settle(self, n: int) -> None:
        """`n` messages are done (confirmed, or acknowledged by the broker)."""
        self.outstanding -= n
        if self.outstanding <= 0 and self.drained is not None:
            self.drained.set()

    def _context(self, device: str) -> ssl.SSLContext:
        """The box's TLS: verify the broker against the fleet CA, present its certificate
        (as drivers/mqtt_tls.tls_context, with the CA read once per process)."""
        crt, key = FleetPki(self.spec.pki_root).paths("device", device)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=self.ca_pem)
        ctx.load_cert_chain(str(crt), str(key))
        return ctx

    async def _connect_all(self) -> dict:
        t0 = time.monotonic()
        sem = asyncio.Semaphore(CONNECTS_IN_FLIGHT)

        async def one(box: SimBox) -> None:
            async with sem:
                for attempt in range(5):
                    try:
                        await asyncio.wait_for(box.connect(), 30.0)
                        return
                    except (TimeoutError, OSError, ssl.SSLError) as exc:
                        if box.transport is not None:
                            box.transport.abort()
                        if attempt == 4:
                            self.connect_failures += 1
                            self.last_error = f"{box.device}: {exc!r}"
                        await asyncio.sleep(0.5 * (attempt + 1))

        self.last_error = ""
        await asyncio.gather(*(one(b) for b in self.boxes))
        up = sum(b.up for b in self.boxes)
        return {"up": up, "failed": len(self.boxes) - up, "seconds": time.monotonic() - t0,
                "error": self.last_error}

    def lost(self, box: SimBox) -> None:
        """A box lost the broker: connect again after a short, jittered wait (agent backoff)."""
        self.reconnects += 1

        async def again() -> None:
            await asyncio.sleep(random.uniform(0.5, 1.0))
            with contextlib.suppress(OSError, asyncio.TimeoutError, ssl.SSLError,
                                     ConnectionError):
                await asyncio.wait_for(box.connect(), 30.0)
                return
            if not self.stopping:
                self.lost(box)

        asyncio.get_running_loop().create_task(again())

    def _sweep(self) -> None:
        """Every second: PINGREQ where the link was quiet; unconfirmed messages again."""
        now = time.monotonic()
        wait = max(RESEND_MIN_S, 3 * self.period)
        for b in self.boxes:
            if b.up and now - b.last_tx > 0.75 * b.keepalive_s:
                b._write(PINGREQ)
                self.pings += 1
            if self.confirm and b.up and b.unconfirmed:
                b.resend_stale(now, wait)
        asyncio.get_running_loop().call_later(1.0, self._sweep)

    def figures(self, per_box: bool = False) -> dict:
        """Counters of the current window (and the per-box acknowledged seq ranges)."""
        ru = resource.getrusage(resource.RUSAGE_SELF)
        out = {"published": self.published, "acked": self.acked, "rejected": self.rejected,
               "confirmed": self.confirmed, "resent": self.resent,
               "outstanding": self.outstanding, "bytes_out": self.bytes_out,
               "ack_lat": self.ack_lat, "confirm_lat": self.confirm_lat,
               "first_pub_wall": self.first_pub_wall, "last_ack_wall": self.last_ack_wall,
               "last_confirm_wall": self.last_confirm_wall, "reconnects": self.reconnects,
               "broker_disconnects": self.broker_disconnects, "received": self.received,
               "pings": self.pings,
               "up": sum(b.up for b in self.boxes), "cpu_s": ru.ru_utime + ru.ru_stime,
               "rss_kb": ru.ru_maxrss}
        if per_box:
            out["boxes"] = {b.device: (b.win_lo, b.win_hi) for b in self.boxes if b.win_lo}
        return out

    async def _drain(self, timeout: float) -> bool:
        if self.outstanding == 0:
            return True
        self.drained = asyncio.Event()
        try:
            await asyncio.wait_for(self.drained.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self.drained = None

    async def _flushed(self, timeout: float) -> bool:
        """Wait until every box has sent all it has and the broker acknowledged it."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(not b.todo and not any(s for s, _, _ in b.inflight.values())
                   for b in self.boxes):
                return True
            await asyncio.sleep(0.05)
        return False

    async def _command(self, cmd: str, args: dict) -> Any:
        if cmd == "connect":
            return await self._connect_all()
        if cmd == "mark":
            self._mark()
            return True
        if cmd == "confirm":
            self.confirm = bool(args["on"])
            self.period = float(args.get("period", self.period))
            return True
        if cmd == "steady":
            self.period, self.jitter = args["period"], args.get("jitter", 0.1)
            loop = asyncio.get_running_loop()
            for b in self.boxes:
                b.timer = loop.call_later(random.uniform(0.0, self.period), b.tick)
            return True
        if cmd == "pause":
            for b in self.boxes:
                if b.timer is not None:
                    b.timer.cancel()
                    b.timer = None
            return await self._drain(args.get("timeout", 60.0))
        if cmd == "burst":
            for b in self.boxes:
                b.report(args["per_box"])
            return True
        if cmd == "drain":
            return await self._drain(args.get("timeout", 60.0))
        if cmd == "flushed":
            return await self._flushed(args.get("timeout", 60.0))
        if cmd == "figures":
            return self.figures(args.get("per_box", False))
        raise ValueError(f"simulator command {cmd!r}: unknown")

    async def main(self) -> None:
        """Make the boxes, then serve commands until 'stop'."""
        loop = asyncio.get_running_loop()
        self.ca_pem = Path(self.spec.ca_file).read_text()
        self.boxes = [SimBox(self, device_id(i), self._context(device_id(i)))
                      for i in range(self.spec.first, self.spec.first + self.spec.count)]
        loop.call_later(1.0, self._sweep)
        stop = loop.create_future()
        busy: set[asyncio.Task] = set()

        async def serve(cmd: str, args: dict) -> None:
            try:
                self.conn.send(("ok", await self._command(cmd, args)))
            except Exception as exc:
                self.conn.send(("error", f"{type(exc).__name__}: {exc}"))

        def on_cmd() -> None:
            try:
                cmd, args = self.conn.recv()
            except EOFError:
                cmd, args = "stop", {}
            if cmd == "stop":
                loop.remove_reader(self.conn.fileno())
                if not stop.done():
                    stop.set_result(True)
                return
            t = loop.create_task(serve(cmd, args))
            busy.add(t)
            t.add_done_callback(busy.discard)

        loop.add_reader(self.conn.fileno(), on_cmd)
        await stop
        self.stopping = True
        for b in self.boxes:
            if b.timer is not None:
                b.timer.cancel()
            b.goodbye()
        await asyncio.sleep(0.5)
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(("ok", self.figures()))


def _node_main(fd: int, spec: NodeSpec) -> None:
    """A simulator process: its boxes on one loop, commands on the pipe `fd`."""
    raise_nofile(spec.count + 256)
    asyncio.run(SimNode(Connection(fd), spec).main())


# ---------------------------------------------------------------------- the fleet
@dataclass
class Window:
    """What the boxes did in one measuring window (all processes together)."""

    published: int  # PUBLISH packets, resent ones included
    acked: int  # PUBACKs (success)
    confirmed: int  # seqs the fleet service confirmed (its ack message)
    made: int  # new telemetry messages (distinct seqs)
    resent: int
    rejected: int
    drained: bool
    first_pub_wall: float
    last_ack_wall: float
    ack_lat_s: list[float]  # PUBLISH -> PUBACK
    confirm_lat_s: list[float]  # box ts -> the fleet's confirmation arrived
    boxes: dict[str, tuple[int, int]]  # seqs made in the window: first, last
    cpu_s: float
    bytes_out: int
    reconnects: int
    broker_disconnects: int


class SimFleet:
    """`n` simulated boxes spread over `procs` processes, against the broker at host:port."""

    def __init__(self, pki: FleetPki, port: int, n: int, procs: int = 2,
                 host: str = "127.0.0.1", keepalive_s: int = 30) -> None:
        if n < 1 or procs < 1:
            raise ValueError(f"simulated fleet: n = {n}, procs = {procs}: both must be >= 1")
        self.n = n
        procs = min(procs, n)
        self.nodes: list[tuple[subprocess.Popen, Connection]] = []
        first = 0
        for k in range(procs):
            count = n // procs + (1 if k < n % procs else 0)
            spec = NodeSpec(host, port, str(pki.ca_cert_path), str(pki.root), first, count,
                            keepalive_s)
            first += count
            parent, child = socket.socketpair()
            fd = child.fileno()
            # a fresh interpreter (not multiprocessing): the caller's main module stays out
            p = subprocess.Popen([sys.executable, __file__, "--node", str(fd),
                                  json.dumps(asdict(spec))], pass_fds=(fd,))
            child.close()
            self.nodes.append((p, Connection(parent.detach())))
        self.cpu0 = 0.0

    @property
    def pids(self) -> list[int]:
        """The simulator processes."""
        return [p.pid for p, _ in self.nodes]

    def _all(self, cmd: str, wait_s: float = 120.0, **args: Any) -> list[Any]:
        for _, c in self.nodes:
            c.send((cmd, args))
        out = []
        end = time.monotonic() + wait_s
        for p, c in self.nodes:
            if not c.poll(max(0.0, end - time.monotonic())):
                raise TimeoutError(f"simulator pid {p.pid}: no answer to {cmd!r} in {wait_s} s")
            status, value = c.recv()
            if status != "ok":
                raise RuntimeError(f"simulator pid {p.pid}: {cmd!r} failed: {value}")
            out.append(value)
        return out

    def connect(self, timeout: float = 600.0) -> dict:
        """Connect every box (TLS, CONNECT, subscribe, birth); how many are up, how long."""
        t0 = time.monotonic()
        res = self._all("connect", timeout)
        secs = time.monotonic() - t0
        rss = sum(f["rss_kb"] for f in self._all("figures")) / 1024.0
        return {"up": sum(r["up"] for r in res), "failed": sum(r["failed"] for r in res),
                "seconds": secs, "errors": [r["error"] for r in res if r["error"]],
                "simulators_rss_mb": rss}

    def mark(self) -> None:
        """Start a measuring window: counters to zero."""
        self._all("mark")
        self.cpu0 = sum(f["cpu_s"] for f in self._all("figures"))

    def steady(self, period: float, jitter: float = 0.1) -> None:
        """Every box reports every `period` s (x uniform(1 - jitter, 1 + jitter)), phases
        spread at random over the first period."""
        self._all("steady", period=period, jitter=jitter)

    def pause(self, timeout: float = 120.0) -> bool:
        """Stop the steady reports; True when everything sent is settled (see drain)."""
        return all(self._all("pause", timeout + 5.0, timeout=timeout))

    def confirmations(self, on: bool, period: float | None = None) -> None:
        """On: the boxes wait for the fleet's confirmation (the agent's protocol); off: the
        broker's PUBACK settles a message (for a subscriber that confirms nothing). `period`:
        the telemetry interval the boxes assume (they send again what is unconfirmed after
        max(5 s, 3 periods)); `steady()` sets it too."""
        self._all("confirm", on=on, **({} if period is None else {"period": period}))

    def burst(self, per_box: int = 1) -> None:
        """Every box queues `per_box` reports at once (sent `WINDOW` at a time)."""
        self._all("burst", per_box=per_box)

    def drain(self, timeout: float = 120.0) -> bool:
        """Wait until everything queued is settled (confirmed by the fleet, or acknowledged by
        the broker when confirmations are off)."""
        return all(self._all("drain", timeout + 5.0, timeout=timeout))

    def flushed(self, timeout: float = 120.0) -> bool:
        """Wait until everything queued is sent and acknowledged by the broker."""
        return all(self._all("flushed", timeout + 5.0, timeout=timeout))

    def window(self, drained: bool) -> Window:
        """The current window's figures (call after pause or drain)."""
        res = self._all("figures", per_box=True)
        boxes: dict[str, tuple[int, int]] = {}
        for r in res:
            boxes.update(r["boxes"])
        firsts = [r["first_pub_wall"] for r in res if r["first_pub_wall"]]
        return Window(published=sum(r["published"] for r in res),
                      acked=sum(r["acked"] for r in res),
                      confirmed=sum(r["confirmed"] for r in res),
                      made=sum(hi - lo + 1 for lo, hi in boxes.values()),
                      resent=sum(r["resent"] for r in res),
                      rejected=sum(r["rejected"] for r in res), drained=drained,
                      first_pub_wall=min(firsts) if firsts else 0.0,
                      last_ack_wall=max(r["last_ack_wall"] for r in res),
                      ack_lat_s=[x for r in res for x in r["ack_lat"]],
                      confirm_lat_s=[x for r in res for x in r["confirm_lat"]], boxes=boxes,
                      cpu_s=sum(r["cpu_s"] for r in res) - self.cpu0,
                      bytes_out=sum(r["bytes_out"] for r in res),
                      reconnects=sum(r["reconnects"] for r in res),
                      broker_disconnects=sum(r["broker_disconnects"] for r in res))

    def up(self) -> int:
        """Boxes connected now."""
        return sum(r["up"] for r in self._all("figures"))

    def stop(self, timeout: float = 30.0) -> None:
        """Goodbye from every box, then end the processes."""
        for _, c in self.nodes:
            with contextlib.suppress(BrokenPipeError, OSError):
                c.send(("stop", {}))
        end = time.monotonic() + timeout
        for p, c in self.nodes:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait(5.0)
            c.close()


# ---------------------------------------------------------------------- reference subscriber
BARE_SHARE = "$share/bare/devices/#"


def _bare_main(fd: int, spec: dict) -> None:
    """The broker's ceiling: paho clients in a shared subscription that count and store
    nothing (telemetry: its box ts and the arrival time, for the lag)."""
    import threading

    import paho.mqtt.client as mqtt
    from echoel.drivers.mqtt_tls import BrokerLink, make_client
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    conn = Connection(fd)
    link = BrokerLink(spec["host"], spec["port"], spec["ca_file"], spec["cert_file"],
                      spec["key_file"])
    lock = threading.Lock()
    ts: list[float] = []
    recv: list[float] = []
    seen: set[tuple[str, int]] = set()
    other = [0]
    subscribed = threading.Semaphore(0)

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        if not msg.topic.endswith("/telemetry"):
            other[0] += 1
            return
        doc = json.loads(msg.payload)
        with lock:
            ts.append(doc["ts"])
            recv.append(now)
            seen.add((msg.topic, doc["seq"]))

    clients = []
    for k in range(spec["workers"]):
        c = make_client(link, f"bare-w{k}")
        c.on_message = on_message
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(BARE_SHARE, qos=1)
        c.on_subscribe = lambda cl, u, mid, rcs, p: subscribed.release()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if spec["persistent"] else 0
        c.connect(link.host, link.port, link.keepalive_s, clean_start=not spec["persistent"],
                  properties=props)
        c.loop_start()
        clients.append(c)
    for _ in clients:
        subscribed.acquire(timeout=30.0)
    conn.send(("ok", "subscribed"))
    while True:
        try:
            cmd, args = conn.recv()
        except EOFError:
            break
        if cmd == "stop":
            break
        with lock:
            if cmd == "mark":
                ts.clear()
                recv.clear()
                seen.clear()
                conn.send(("ok", True))
            elif cmd == "count":
                t0 = args.get("t0", 0.0)
                conn.send(("ok", sum(1 for x in ts if x >= t0)))
            else:
                conn.send(("ok", {"ts": list(ts), "recv": list(recv), "unique": len(seen),
                                  "other": other[0]}))
    for c in clients:
        c.disconnect()
        c.loop_stop()


class BareSubscriber:
    """A process with `workers` paho clients in a shared subscription: count, store nothing.
    `persistent`: sessions that outlive a stop (the broker queues for them), as the service's.
    """

    def __init__(self, pki: FleetPki, port: int, workers: int = 2, host: str = "127.0.0.1",
                 persistent: bool = False) -> None:
        crt, key = pki.paths("service", SERVICE)
        spec = {"host": host, "port": port, "ca_file": str(pki.ca_cert_path),
                "cert_file": str(crt), "key_file": str(key), "workers": workers,
                "persistent": persistent}
        parent, child = socket.socketpair()
        fd = child.fileno()
        self.proc = subprocess.Popen([sys.executable, __file__, "--bare", str(fd),
                                      json.dumps(spec)], pass_fds=(fd,))
        child.close()
        self.conn = Connection(parent.detach())
        self._ask(None, 60.0)

    @property
    def pid(self) -> int:
        """The subscriber's process id."""
        return self.proc.pid

    def _ask(self, cmd: str | None, wait_s: float = 60.0, **args: Any) -> Any:
        if cmd is not None:
            self.conn.send((cmd, args))
        if not self.conn.poll(wait_s):
            raise TimeoutError(f"bare subscriber pid {self.proc.pid}: no answer to {cmd!r} in "
                               f"{wait_s} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"bare subscriber: {cmd!r} failed: {value}")
        return value

    def mark(self) -> None:
        """Forget what was received so far."""
        self._ask("mark")

    def figures(self) -> dict:
        """Telemetry received since the mark: box ts and arrival time lists, unique count."""
        return self._ask("figures")

    def count(self, t0: float = 0.0) -> int:
        """Telemetry messages received since the mark, published at or after t0."""
        return self._ask("count", t0=t0)

    def stop(self) -> None:
        """Disconnect and end the process."""
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(("stop", {}))
        try:
            self.proc.wait(10.0)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(5.0)
        self.conn.close()


if __name__ == "__main__" and len(sys.argv) == 4:
    if sys.argv[1] == "--node":
        _node_main(int(sys.argv[2]), NodeSpec(**json.loads(sys.argv[3])))
    elif sys.argv[1] == "--bare":
        _bare_main(int(sys.argv[2]), json.loads(sys.argv[3]))


