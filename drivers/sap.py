"""SAP (RFC 2974): announcing our streams' SDPs and browsing the streams on the network.

A packet: byte 0 = version 1 (0x20), T bit 0x04 for a deletion; auth length; a 16-bit message
id hash; the origin's IPv4 address; then "application/sdp\\0" (optional when the SDP starts with
"v=0") and the SDP. AES67 devices announce on 239.255.255.255:9875 every 30 s.
"""

from __future__ import annotations

import ipaddress
import socket
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from echoel.drivers.sdp_aes67 import SdpError, StreamSdp, parse_sdp

SAP_GROUP = "239.255.255.255"
SAP_PORT = 9875
SAP_INTERVAL_S = 30.0
PAYLOAD_TYPE = b"application/sdp\0"
MAX_SAP_BYTES = 65507


class SapError(ValueError):
    """A SAP packet that cannot be used; the message names the field and value."""


@dataclass(frozen=True)
class SapMessage:
    """One SAP announcement or deletion."""

    delete: bool
    msg_id_hash: int
    origin: str
    sdp: str


def msg_id_hash(sdp: str) -> int:
    """A non-zero 16-bit hash of an SDP (it changes when the SDP changes)."""
    return (zlib.crc32(sdp.encode()) & 0xFFFF) or 1


def build_sap(sdp: str, origin: str, delete: bool = False, hash16: int | None = None) -> bytes:
    """The SAP packet announcing (or deleting) an SDP from origin (an IPv4 address)."""
    h = msg_id_hash(sdp) if hash16 is None else hash16
    head = bytes([0x24 if delete else 0x20, 0, h >> 8 & 0xFF, h & 0xFF])
    pkt = head + socket.inet_aton(origin) + PAYLOAD_TYPE + sdp.encode()
    if len(pkt) > MAX_SAP_BYTES:
        raise SapError(f"SAP packet of {len(pkt)} bytes: at most {MAX_SAP_BYTES}")
    return pkt


def parse_sap(data: bytes) -> SapMessage:
    """Read a SAP packet; SapError naming the field and value when it cannot be used."""
    if len(data) < 8:
        raise SapError(f"SAP packet of {len(data)} bytes: shorter than the 8-byte header")
    b0 = data[0]
    if b0 >> 5 != 1:
        raise SapError(f"SAP version {b0 >> 5}: only version 1 exists")
    if b0 & 0x10:
        raise SapError("SAP address type IPv6 (A bit set): only IPv4 origins are supported")
    if b0 & 0x02:
        raise SapError("SAP packet is encrypted (E bit): not supported")
    if b0 & 0x01:
        raise SapError("SAP payload is compressed (C bit): not supported")
    off = 8 + 4 * data[1]
    if off > len(data):
        raise SapError(f"SAP authentication length {data[1]} words: packet has only "
                       f"{len(data)} bytes")
    origin = socket.inet_ntoa(data[4:8])
    body = data[off:]
    if not body.startswith(b"v=0"):
        nul = body.find(b"\0")
        if nul < 0:
            raise SapError(f"SAP payload type {body[:40]!r}: no NUL-terminated MIME type and no "
                           "SDP (v=0)")
        ptype = body[:nul]
        if ptype != PAYLOAD_TYPE[:-1]:
            raise SapError(f"SAP payload type {ptype[:40]!r}: only application/sdp")
        body = body[nul + 1:]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SapError(f"SAP payload: not UTF-8 text at byte {exc.start}") from None
    return SapMessage(bool(b0 & 0x04), data[2] << 8 | data[3], origin, text)


@dataclass
class SapStream:
    """A stream seen on the network."""

    sdp_text: str
    stream: StreamSdp
    origin: str
    first_seen: float
    last_seen: float
    announcements: int = 1


@dataclass
class SapBrowser:
    """Listens to SAP and keeps the announced streams, forgetting those not heard for expiry_s.

    Refused packets and SDPs are counted, the last reason kept in `last_error`."""

    iface: str | None = None
    expiry_s: float = 300.0
    address: str = SAP_GROUP
    port: int = SAP_PORT
    clock: Callable[[], float] = time.monotonic
    streams: dict[tuple[str, str], SapStream] = field(default_factory=dict)
    refused: int = 0
    deletions: int = 0
    last_error: str = ""
    sock: socket.socket | None = None

    def open(self) -> SapBrowser:
        """Join the SAP group."""
        from echoel.drivers.udp_multicast import open_receiver
        self.sock = open_receiver(self.address, self.port, self.iface)
        self.sock.setblocking(False)
        return self

    def close(self) -> None:
        """Leave the group."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    @staticmethod
    def _key(msg: SapMessage, s: StreamSdp | None) -> tuple[str, str]:
        if s is not None:
            return msg.origin, f"{s.session_id}"
        for line in msg.sdp.splitlines():  # a deletion carrying only the o= line
            if line.startswith("o="):
                parts = line[2:].split()
                if len(parts) >= 2:
                    return msg.origin, parts[1]
        return msg.origin, f"hash{msg.msg_id_hash}"

    def feed(self, data: bytes) -> str | None:
        """Take one received packet; returns the stream name it concerned (None if refused)."""
        try:
            msg = parse_sap(data)
        except SapError as exc:
            self.refused += 1
            self.last_error = str(exc)
            return None
        if msg.delete:
            s = None
            try:
                s = parse_sdp(msg.sdp)
            except SdpError:
                pass
            gone = self.streams.pop(self._key(msg, s), None)
            self.deletions += 1
            return gone.stream.name if gone else None
        try:
            s = parse_sdp(msg.sdp)
        except SdpError as exc:
            self.refused += 1
            self.last_error = f"SAP from {msg.origin}: {exc}"
            return None
        now = self.clock()
        key = self._key(msg, s)
        old = self.streams.get(key)
        if old is None:
            self.streams[key] = SapStream(msg.sdp, s, msg.origin, now, now)
        else:
            old.sdp_text, old.stream, old.last_seen = msg.sdp, s, now
            old.announcements += 1
        return s.name

    def poll(self) -> int:
        """Read every waiting packet (non-blocking) and expire old streams; packets read."""
        n = 0
        while self.sock is not None:
            try:
                data = self.sock.recv(MAX_SAP_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            self.feed(data)
            n += 1
        self.expire()
        return n

    def expire(self) -> None:
        """Forget streams not announced for expiry_s."""
        now = self.clock()
        for k in [k for k, v in self.streams.items() if now - v.last_seen > self.expiry_s]:
            del self.streams[k]

    def find(self, name: str) -> SapStream | None:
        """The stream announced under this session name (s= line), or None."""
        for v in self.streams.values():
            if v.stream.name == name:
                return v
        return None

    def listen(self, seconds: float) -> dict[tuple[str, str], SapStream]:
        """Collect announcements for a while (the CLI's `streams list`)."""
        import select
        end = time.monotonic() + seconds
        while self.sock is not None and (left := end - time.monotonic()) > 0:
            select.select([self.sock], [], [], min(left, 0.2))
            self.poll()
        return self.streams


class SapAnnouncer:
    """Announces SDPs every interval_s on the SAP group; deletes them on remove/close."""

    def __init__(self, origin: str, ttl: int = 32, iface: str | None = None,
                 interval_s: float = SAP_INTERVAL_S, address: str = SAP_GROUP,
                 port: int = SAP_PORT, clock: Callable[[], float] = time.monotonic) -> None:
        from echoel.drivers.udp_multicast import open_sender
        ipaddress.IPv4Address(origin)
        self.origin, self.interval_s, self.clock = origin, interval_s, clock
        self.dest = (address, port)
        self.sock = open_sender(ttl, "CS0", iface)
        self.sdps: dict[str, str] = {}
        self.next_at: dict[str, float] = {}
        self.sent = 0
        self.errors = 0
        self.last_error = ""

    def _send(self, sdp: str, delete: bool = False) -> None:
        try:
            self.sock.sendto(build_sap(sdp, self.origin, delete), self.dest)
            self.sent += 1
        except OSError as exc:
            self.errors += 1
            self.last_error = f"SAP send to {self.dest[0]}:{self.dest[1]}: {exc.strerror}"

    def announce(self, key: str, sdp: str) -> None:
        """Start (or update) announcing an SDP; the first announcement goes out at once.

        An SDP that changed is deleted under its old hash first (RFC 2974)."""
        old = self.sdps.get(key)
        if old == sdp:
            return
        if old is not None:
            self._send(old, delete=True)
        self.sdps[key] = sdp
        self._send(sdp)
        self.next_at[key] = self.clock() + self.interval_s

    def tick(self) -> None:
        """Re-announce what is due."""
        now = self.clock()
        for key, sdp in self.sdps.items():
            if now >= self.next_at[key]:
                self._send(sdp)
                self.next_at[key] = now + self.interval_s

    def remove(self, key: str) -> None:
        """Stop announcing, with a deletion packet."""
        sdp = self.sdps.pop(key, None)
        self.next_at.pop(key, None)
        if sdp is not None:
            self._send(sdp, delete=True)

    def close(self) -> None:
        """Delete every announced SDP and close the socket."""
        for key in list(self.sdps):
            self.remove(key)
        self.sock.close()
