"""ptp4l's management protocol over its Unix domain socket (what `pmc -u` speaks).

A GET of TIME_STATUS_NP, CURRENT_DATA_SET, PARENT_DATA_SET or PORT_DATA_SET is one datagram
(IEEE 1588 management message, big-endian) sent to ptp4l's `uds_address`; ptp4l answers to
the sender's address, so the client binds a filesystem path of its own (an abstract address
would not be reachable from another network namespace). Replies are parsed into frozen
dataclasses; a timeout or a malformed reply raises ManagementError naming the data set and
what was wrong.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

MESSAGE_TYPE_MANAGEMENT = 0x0D
PTP_VERSION = 2
HEADER_LEN = 34
MGMT_LEN = 48  # header + targetPortIdentity + hops + actionField + reserved
TLV_MANAGEMENT = 0x0001
TLV_MANAGEMENT_ERROR_STATUS = 0x0002
ACTION_GET, ACTION_RESPONSE = 0, 2
ALL_PORTS = 0xFFFF
MAX_UDS_PATH = 107  # sun_path holds 108 bytes with the terminating NUL

DATASET_IDS = {
    "TIME_STATUS_NP": 0xC000,
    "CURRENT_DATA_SET": 0x2001,
    "PARENT_DATA_SET": 0x2002,
    "PORT_DATA_SET": 0x2004,
}
DATASET_NAMES = {v: k for k, v in DATASET_IDS.items()}

PORT_STATES = {
    1: "INITIALIZING", 2: "FAULTY", 3: "DISABLED", 4: "LISTENING", 5: "PRE_MASTER",
    6: "MASTER", 7: "PASSIVE", 8: "UNCALIBRATED", 9: "SLAVE", 10: "GRAND_MASTER",
}
DELAY_MECHANISMS = {1: "E2E", 2: "P2P", 0xFE: "DISABLED"}
MANAGEMENT_ERRORS = {
    0x0001: "RESPONSE_TOO_BIG", 0x0002: "NO_SUCH_ID", 0x0003: "WRONG_LENGTH",
    0x0004: "WRONG_VALUE", 0x0005: "NOT_SETABLE", 0x0006: "NOT_SUPPORTED",
    0xFFFE: "GENERAL_ERROR",
}
TIME_INTERVAL_SCALE = 65536.0  # TimeInterval: nanoseconds x 2^16


class ManagementError(RuntimeError):
    """ptp4l did not answer, or answered something that is not the data set asked for."""


def identity_sdp(raw: bytes) -> str:
    """A clockIdentity as SDP writes it: uppercase hex octets joined by dashes."""
    return "-".join(f"{b:02X}" for b in raw)


def identity_linuxptp(raw: bytes) -> str:
    """A clockIdentity as linuxptp writes it: 'xxxxxx.xxxx.xxxxxx'."""
    h = raw.hex()
    return f"{h[:6]}.{h[6:10]}.{h[10:]}"


@dataclass(frozen=True)
class PortIdentity:
    """clockIdentity (SDP form) and port number."""

    clock_identity: str
    port_number: int

    def __str__(self) -> str:
        return f"{self.clock_identity}:{self.port_number}"


@dataclass(frozen=True)
class TimeStatus:
    """TIME_STATUS_NP: the last measured offset from the grandmaster (linuxptp specific)."""

    master_offset_ns: int
    ingress_time_ns: int  # local receive time of the sync it was measured on; 0: none yet
    cumulative_scaled_rate_offset: int
    scaled_last_gm_phase_change: int
    gm_time_base_indicator: int
    last_gm_phase_change_ns: float
    gm_present: bool
    gm_identity: str


@dataclass(frozen=True)
class CurrentDataSet:
    """CURRENT_DATA_SET: steps to the grandmaster, offset and mean path delay."""

    steps_removed: int
    offset_from_master_ns: float
    mean_path_delay_ns: float


@dataclass(frozen=True)
class ParentDataSet:
    """PARENT_DATA_SET: the parent port and the grandmaster's identity and quality."""

    parent_port_identity: PortIdentity
    parent_stats: bool
    observed_parent_offset_scaled_log_variance: int
    observed_parent_clock_phase_change_rate: int
    gm_priority1: int
    gm_clock_class: int
    gm_clock_accuracy: int
    gm_offset_scaled_log_variance: int
    gm_priority2: int
    gm_identity: str


@dataclass(frozen=True)
class PortDataSet:
    """PORT_DATA_SET: one port's state and message intervals."""

    port_identity: PortIdentity
    port_state: str
    log_min_delay_req_interval: int
    peer_mean_path_delay_ns: float
    log_announce_interval: int
    announce_receipt_timeout: int
    log_sync_interval: int
    delay_mechanism: str
    log_min_pdelay_req_interval: int
    version_number: int


@dataclass(frozen=True)
class Snapshot:
    """The four data sets, read one after the other, and when (both clocks, ns)."""

    time_status: TimeStatus
    current: CurrentDataSet
    parent: ParentDataSet
    port: PortDataSet
    mono_ns: int
    realtime_ns: int


def _port_identity(b: bytes) -> PortIdentity:
    return PortIdentity(identity_sdp(b[:8]), struct.unpack(">H", b[8:10])[0])


def _parse_time_status(d: bytes) -> TimeStatus:
    (offset, ingress, csro, slgpc, gtbi, msb, lsb, frac, present,
     gm) = struct.unpack_from(">qqiiHHQHi8s", d)
    phase = ((msb << 64) | lsb) + frac / 65536.0
    return TimeStatus(offset, ingress, csro, slgpc, gtbi, float(phase), bool(present),
                      identity_sdp(gm))


def _parse_current(d: bytes) -> CurrentDataSet:
    steps, offset, delay = struct.unpack_from(">Hqq", d)
    return CurrentDataSet(steps, offset / TIME_INTERVAL_SCALE, delay / TIME_INTERVAL_SCALE)


def _parse_parent(d: bytes) -> ParentDataSet:
    (stats, _res, variance, rate, p1, cls, acc, gm_var, p2,
     gm) = struct.unpack_from(">BBHiBBBHB8s", d, 10)
    return ParentDataSet(_port_identity(d[:10]), bool(stats), variance, rate, p1, cls, acc,
                         gm_var, p2, identity_sdp(gm))


def _parse_port(d: bytes) -> PortDataSet:
    (state, min_delay, peer_delay, ann, ann_timeout, sync, mech, min_pdelay,
     version) = struct.unpack_from(">BbqbBbBbB", d, 10)
    return PortDataSet(_port_identity(d[:10]), PORT_STATES.get(state, f"UNKNOWN({state})"),
                       min_delay, peer_delay / TIME_INTERVAL_SCALE, ann, ann_timeout, sync,
                       DELAY_MECHANISMS.get(mech, f"UNKNOWN({mech})"), min_pdelay,
                       version & 0x0F)


# data set -> (bytes its body needs, parser)
PARSERS = {
    "TIME_STATUS_NP": (50, _parse_time_status),
    "CURRENT_DATA_SET": (18, _parse_current),
    "PARENT_DATA_SET": (32, _parse_parent),
    "PORT_DATA_SET": (26, _parse_port),
}


def build_get(dataset: str, sequence_id: int, domain: int = 0,
              source: bytes = b"\x00" * 10, target_port: int = ALL_PORTS) -> bytes:
    """The GET request datagram for one data set (empty data; boundaryHops 0: local only)."""
    tlv = struct.pack(">HHH", TLV_MANAGEMENT, 2, DATASET_IDS[dataset])
    length = MGMT_LEN + len(tlv)
    header = struct.pack(">BBHBBH8s4s10sHBb", MESSAGE_TYPE_MANAGEMENT, PTP_VERSION, length,
                         domain, 0, 0, b"\x00" * 8, b"\x00" * 4, source,
                         sequence_id & 0xFFFF, 0x04, 0x7F)
    body = b"\xff" * 8 + struct.pack(">HBBBB", target_port, 0, 0, ACTION_GET, 0)
    return header + body + tlv


def parse_reply(dataset: str, msg: bytes, sequence_id: int | None = None):
    """Parse one reply datagram into the data set's dataclass.

    Returns None for a well-formed reply to another request (a different sequenceId: a late
    answer to an earlier, timed-out GET); raises ManagementError for anything malformed."""
    def bad(why: str) -> ManagementError:
        return ManagementError(f"ptp4l management reply to GET {dataset}: {why}")

    if len(msg) < MGMT_LEN + 6:
        raise bad(f"{len(msg)} bytes, shorter than the {MGMT_LEN + 6} bytes of an empty "
                  "management message")
    mtype, version, length = msg[0] & 0x0F, msg[1] & 0x0F, struct.unpack_from(">H", msg, 2)[0]
    if mtype != MESSAGE_TYPE_MANAGEMENT:
        raise bad(f"messageType {mtype:#x}, expected {MESSAGE_TYPE_MANAGEMENT:#x} (management)")
    if version != PTP_VERSION:
        raise bad(f"PTP version {version}, expected {PTP_VERSION}")
    if length > len(msg) or length < MGMT_LEN + 6:
        raise bad(f"messageLength {length} does not fit the {len(msg)} bytes received")
    seq = struct.unpack_from(">H", msg, 30)[0]
    if sequence_id is not None and seq != sequence_id & 0xFFFF:
        return None
    action = msg[46] & 0x0F
    tlv_type, tlv_len, mgmt_id = struct.unpack_from(">HHH", msg, MGMT_LEN)
    if tlv_type == TLV_MANAGEMENT_ERROR_STATUS:
        # managementErrorId comes first, then the managementId it is about
        err = mgmt_id
        raise bad(f"ptp4l answered with error {MANAGEMENT_ERRORS.get(err, hex(err))}")
    if action != ACTION_RESPONSE:
        raise bad(f"actionField {action}, expected {ACTION_RESPONSE} (RESPONSE)")
    if tlv_type != TLV_MANAGEMENT:
        raise bad(f"TLV type {tlv_type:#06x}, expected {TLV_MANAGEMENT:#06x} (MANAGEMENT)")
    if mgmt_id != DATASET_IDS[dataset]:
        got = DATASET_NAMES.get(mgmt_id, f"{mgmt_id:#06x}")
        raise bad(f"managementId {got}, expected {DATASET_IDS[dataset]:#06x} ({dataset})")
    need, parser = PARSERS[dataset]
    data = msg[MGMT_LEN + 6:length]
    if tlv_len - 2 < need or len(data) < need:
        raise bad(f"data of {min(tlv_len - 2, len(data))} bytes, {dataset} needs {need}")
    return parser(data)


class ManagementClient:
    """GETs ptp4l's data sets over its UDS; one request at a time (not thread-safe)."""

    _ids = itertools.count()

    def __init__(self, uds_address: str | Path, own_path: str | Path | None = None,
                 domain: int = 0, timeout_s: float = 1.0) -> None:
        self.uds_address = str(uds_address)
        if own_path is None:
            own_path = Path(self.uds_address).with_name(
                f"pmc-{os.getpid()}-{next(self._ids)}.sock")
        self.own_path = str(own_path)
        if len(self.own_path.encode()) > MAX_UDS_PATH:
            raise ManagementError(f"management socket path {self.own_path!r} is "
                                  f"{len(self.own_path.encode())} bytes; at most "
                                  f"{MAX_UDS_PATH} fit a Unix socket address")
        if not 0 <= domain <= 255:
            raise ManagementError(f"PTP domain {domain}: allowed 0..255")
        self.domain = domain
        self.timeout_s = timeout_s
        self._seq = 0
        self._source = struct.pack(">QH", os.getpid(), 0)  # sourcePortIdentity: ours, not
        # a clock's (ptp4l only echoes it)
        Path(self.own_path).unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind(self.own_path)
        except OSError as exc:
            self.sock.close()
            raise ManagementError(f"cannot bind the management socket {self.own_path}: "
                                  f"{exc.strerror}") from None

    def get(self, dataset: str):
        """One data set (TimeStatus, CurrentDataSet, ParentDataSet or PortDataSet)."""
        if dataset not in DATASET_IDS:
            raise ManagementError(f"unknown data set {dataset!r}; allowed: "
                                  + ", ".join(DATASET_IDS))
        self._seq = (self._seq + 1) & 0xFFFF
        req = build_get(dataset, self._seq, self.domain, self._source)
        self._drain()
        try:
            self.sock.sendto(req, self.uds_address)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ManagementError(f"GET {dataset}: ptp4l is not listening at "
                                  f"{self.uds_address} ({exc.strerror})") from None
        except OSError as exc:
            raise ManagementError(f"GET {dataset}: cannot send to {self.uds_address}: "
                                  f"{exc.strerror}") from None
        end = time.monotonic() + self.timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise ManagementError(f"GET {dataset}: no reply from ptp4l at "
                                      f"{self.uds_address} within {self.timeout_s:g} s")
            self.sock.settimeout(left)
            try:
                msg = self.sock.recv(4096)
            except TimeoutError:
                continue
            reply = parse_reply(dataset, msg, self._seq)
            if reply is not None:
                return reply

    def _drain(self) -> None:
        """Drop late replies to earlier requests."""
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.recv(4096)
        except (BlockingIOError, OSError):
            pass
        finally:
            self.sock.setblocking(True)

    def time_status(self) -> TimeStatus:
        """GET TIME_STATUS_NP."""
        return self.get("TIME_STATUS_NP")

    def current(self) -> CurrentDataSet:
        """GET CURRENT_DATA_SET."""
        return self.get("CURRENT_DATA_SET")

    def parent(self) -> ParentDataSet:
        """GET PARENT_DATA_SET."""
        return self.get("PARENT_DATA_SET")

    def port(self) -> PortDataSet:
        """GET PORT_DATA_SET (the first port's answer)."""
        return self.get("PORT_DATA_SET")

    def snapshot(self) -> Snapshot:
        """All four data sets; the read time is taken right after TIME_STATUS_NP."""
        ts = self.time_status()
        mono, real = time.monotonic_ns(), time.time_ns()
        return Snapshot(ts, self.current(), self.parent(), self.port(), mono, real)

    def close(self) -> None:
        """Close the socket and remove its path."""
        self.sock.close()
        Path(self.own_path).unlink(missing_ok=True)

    def __enter__(self) -> ManagementClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
