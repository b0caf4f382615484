"""The [clock] config section and the ptp4l.cfg generated from it; timestamping detection.

Profiles: "default" (IEEE 1588 default profile; the message intervals come from the keys
log_sync_interval, log_announce_interval, announce_receipt_timeout) and "media" (the AES67
media profile: logSyncInterval -3, logAnnounceInterval 1, announceReceiptTimeout 3, E2E; the
interval keys are then ignored). Timestamping "auto" takes hardware timestamps when the
interface has them (a PTP hardware clock and hardware TX/RX), else software ones; it is read
from the kernel with the SIOCETHTOOL ioctl (ETHTOOL_GET_TS_INFO, what `ethtool -T` prints).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echoel.daemon.config import ConfigError, Key, check_table

SECTION = "clock"
MEDIA_PROFILE = {"logSyncInterval": -3, "logAnnounceInterval": 1, "announceReceiptTimeout": 3}

KEYS: dict[str, Key] = {
    "enabled": Key(bool, False, "run ptp4l and the clock service (`echoel clock run`)"),
    "interface": Key(str, "eth0", "network interface PTP runs on"),
    "domain": Key(int, 0, "PTP domain number (AES67 default 0)", 0, 127),
    "profile": Key(str, "media", "'media': AES67 media profile (sync 8/s, announce every "
                   "2 s, timeout 3, E2E); 'default': IEEE 1588 default profile with the "
                   "interval keys below", choices=("default", "media")),
    "transport": Key(str, "UDPv4", "PTP transport: UDP over IPv4 multicast, or Ethernet (L2)",
                     choices=("UDPv4", "L2")),
    "time_stamping": Key(str, "auto", "'auto': hardware when the interface has a PTP "
                         "hardware clock, else software", choices=("auto", "hardware",
                                                                   "software")),
    "priority1": Key(int, 128, "BMCA priority1 (lower wins the grandmaster election)", 0, 255),
    "priority2": Key(int, 128, "BMCA priority2 (tie breaker)", 0, 255),
    "slave_only": Key(bool, True, "never become the grandmaster (follow the studio's clock); "
                      "false lets the box lead when it is the best clock present"),
    "free_running": Key(bool, False, "TESTS ONLY: measure offsets but never adjust the clock "
                        "(the port then stays UNCALIBRATED for good; test namespaces share "
                        "one system clock)"),
    "clock_identity": Key(str, "", "clockIdentity as xxxxxx.xxxx.xxxxxx or 8 dashed octets; "
                          "empty: derived from the interface's MAC address"),
    "log_sync_interval": Key(int, 0, "profile 'default': log2 seconds between syncs", -7, 4),
    "log_announce_interval": Key(int, 1, "profile 'default': log2 seconds between announces",
                                 -3, 4),
    "announce_receipt_timeout": Key(int, 3, "profile 'default': announce intervals without "
                                    "an announce before the grandmaster counts as lost", 2,
                                    10),
    "lock_threshold_ns": Key(int, 1000, "|offset| at or below this for lock_samples "
                             "measurements in a row: locked", 1, 1_000_000_000),
    "unlock_threshold_ns": Key(int, 10000, "|offset| above this for unlock_samples "
                               "measurements in a row: unlocked (at least lock_threshold_ns)",
                               1, 1_000_000_000),
    "lock_samples": Key(int, 8, "measurements in a row within lock_threshold_ns to lock", 1,
                        1000),
    "unlock_samples": Key(int, 3, "measurements in a row beyond unlock_threshold_ns to "
                          "unlock", 1, 1000),
    "poll_interval_ms": Key(int, 250, "how often ptp4l's data sets are read and the status "
                            "published", 50, 10000),
    "ptp4l": Key(str, "ptp4l", "the ptp4l program (linuxptp)"),
    "restart_max_s": Key(float, 30.0, "longest wait before restarting a ptp4l that died "
                         "(doubles from 0.5 s)", 0.5, 3600.0),
}

_IDENT_DOTTED = re.compile(r"^[0-9a-fA-F]{6}\.[0-9a-fA-F]{4}\.[0-9a-fA-F]{6}$")
_IDENT_DASHED = re.compile(r"^[0-9a-fA-F]{2}(-[0-9a-fA-F]{2}){7}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


def check(raw: dict, where: str = "<config>") -> dict[str, Any]:
    """The [clock] table validated, with defaults filled in; ConfigError otherwise."""
    t = check_table(where, SECTION, raw, {SECTION: KEYS})
    w = f"{where} [{SECTION}]"
    if not _IFNAME.match(t["interface"]) or t["interface"] in (".", ".."):
        raise ConfigError(f"{w}: interface = {t['interface']!r}: not a network interface "
                          "name; allowed: 1 to 15 letters, digits, '_', '-', '.', ':' or '@'")
    if t["clock_identity"]:
        t["clock_identity"] = linuxptp_identity(t["clock_identity"], w)
    if t["unlock_threshold_ns"] < t["lock_threshold_ns"]:
        raise ConfigError(f"{w}: unlock_threshold_ns = {t['unlock_threshold_ns']}: must be at "
                          f"least lock_threshold_ns ({t['lock_threshold_ns']}), or the lock "
                          "would flap")
    if not t["ptp4l"].strip():
        raise ConfigError(f"{w}: ptp4l = '': name the ptp4l program, e.g. 'ptp4l'")
    return t


def linuxptp_identity(text: str, where: str = "clock_identity") -> str:
    """'5A-8A-71-FF-FE-26-FD-8A' or '5a8a71.fffe.26fd8a' -> '5a8a71.fffe.26fd8a'."""
    if _IDENT_DOTTED.match(text):
        return text.lower()
    if _IDENT_DASHED.match(text):
        h = text.replace("-", "").lower()
        return f"{h[:6]}.{h[6:10]}.{h[10:]}"
    raise ConfigError(f"{where}: clock_identity = {text!r}: not a clock identity; allowed: "
                      "'' (from the MAC), xxxxxx.xxxx.xxxxxx or 8 dashed hex octets")


def message_intervals(clock: dict[str, Any]) -> dict[str, int]:
    """logSyncInterval, logAnnounceInterval, announceReceiptTimeout for the profile."""
    if clock["profile"] == "media":
        return dict(MEDIA_PROFILE)
    return {"logSyncInterval": clock["log_sync_interval"],
            "logAnnounceInterval": clock["log_announce_interval"],
            "announceReceiptTimeout": clock["announce_receipt_timeout"]}


def generate(clock: dict[str, Any], uds_address: str | Path, time_stamping: str,
             source: str = "<config>") -> str:
    """ptp4l.cfg text for a validated [clock] table.

    time_stamping is the resolved mode ('hardware' or 'software'; see resolve_time_stamping).
    """
    if time_stamping not in ("hardware", "software"):
        raise ConfigError(f"time_stamping {time_stamping!r} for ptp4l.cfg: resolve 'auto' "
                          "first; allowed: 'hardware', 'software'")
    g: dict[str, Any] = {
        "domainNumber": clock["domain"],
        "priority1": clock["priority1"],
        "priority2": clock["priority2"],
        "slaveOnly": int(clock["slave_only"]),
        "free_running": int(clock["free_running"]),
        "network_transport": clock["transport"],
        "time_stamping": time_stamping,
        "delay_mechanism": "E2E",
        **message_intervals(clock),
        "uds_address": str(uds_address),
        "verbose": 1,  # log lines on stdout (the service logs them)
        "use_syslog": 0,
        "logging_level": 6,
        "summary_interval": 6,  # offset statistics every 64 s, not one line per sync
    }
    if clock["clock_identity"]:
        g["clockIdentity"] = clock["clock_identity"]
    lines = [f"# ptp4l.cfg generated by echoel from the [clock] section of {source}",
             f"# profile {clock['profile']}; do not edit (regenerated at each start)",
             "[global]"]
    lines += [f"{k:<24} {v}" for k, v in g.items()]
    lines += [f"[{clock['interface']}]", ""]
    return "\n".join(lines)


def read_global(path: str | Path) -> dict[str, str]:
    """The [global] options of a ptp4l.cfg (what a running ptp4l was started with)."""
    out: dict[str, str] = {}
    section = ""
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            section = line.strip("[]").strip()
        elif line and section == "global":
            k, _, v = line.partition(" ")
            out[k] = v.strip()
    return out


# --------------------------------------------------------------------- timestamping detection

SIOCETHTOOL = 0x8946
ETHTOOL_GET_TS_INFO = 0x00000041
SOF_TIMESTAMPING = {
    "hardware-transmit": 1 << 0, "software-transmit": 1 << 1,
    "hardware-receive": 1 << 2, "software-receive": 1 << 3,
    "software-system-clock": 1 << 4, "hardware-legacy-clock": 1 << 5,
    "hardware-raw-clock": 1 << 6,
}
_TS_INFO = struct.Struct("=IIiI3II3I")  # struct ethtool_ts_info


@dataclass(frozen=True)
class TimestampingInfo:
    """What an interface can timestamp (the Capabilities of `ethtool -T`) and its PHC."""

    interface: str
    capabilities: tuple[str, ...]
    phc_index: int  # -1: no PTP hardware clock

    @property
    def hardware(self) -> bool:
        """Hardware TX and RX timestamps on a PTP hardware clock."""
        caps = set(self.capabilities)
        return (self.phc_index >= 0 and
                {"hardware-transmit", "hardware-receive", "hardware-raw-clock"} <= caps)

    @property
    def software(self) -> bool:
        """Software TX and RX timestamps."""
        caps = set(self.capabilities)
        return {"software-transmit", "software-receive", "software-system-clock"} <= caps


def timestamping_info(interface: str) -> TimestampingInfo:
    """Ask the kernel (SIOCETHTOOL ETHTOOL_GET_TS_INFO) in the current network namespace."""
    if not _IFNAME.match(interface):
        raise ConfigError(f"interface {interface!r}: not a network interface name")
    buf = ctypes.create_string_buffer(_TS_INFO.pack(ETHTOOL_GET_TS_INFO, 0, -1, 0, 0, 0, 0,
                                                    0, 0, 0, 0), _TS_INFO.size)
    ifreq = struct.pack("16sP", interface.encode(), ctypes.addressof(buf)).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)
        except OSError as exc:
            what = ("no such network interface" if exc.errno == 19
                    else f"ETHTOOL_GET_TS_INFO failed: {os.strerror(exc.errno or 0)}")
            raise ConfigError(f"interface {interface!r}: {what}") from None
    _cmd, so_ts, phc, *_ = _TS_INFO.unpack(buf.raw)
    caps = tuple(name for name, bit in SOF_TIMESTAMPING.items() if so_ts & bit)
    return TimestampingInfo(interface, caps, phc)


def resolve_time_stamping(clock: dict[str, Any],
                          info: TimestampingInfo | None = None) -> str:
    """'hardware' or 'software' for the interface; ConfigError when it cannot do what is asked.

    info is read from the kernel when not given."""
    info = info or timestamping_info(clock["interface"])
    want = clock["time_stamping"]
    caps = ", ".join(info.capabilities) or "none"
    if want == "hardware" and not info.hardware:
        raise ConfigError(f"[clock] time_stamping = 'hardware': interface {info.interface!r} "
                          f"has no hardware timestamping (capabilities: {caps}; PHC "
                          f"{info.phc_index}); use 'software' or 'auto'")
    if want == "hardware" or (want == "auto" and info.hardware):
        return "hardware"
    if not info.software:
        raise ConfigError(f"[clock] time_stamping = {want!r}: interface {info.interface!r} "
                          f"has no software timestamping either (capabilities: {caps})")
    return "software"
