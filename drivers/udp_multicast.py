"""UDP sockets for audio over IP: a sender with TTL and DSCP, a receiver joined to a group.

DSCP names follow RFC 4594 (AES67 recommends EF for PTP events, AF41 for media); numbers 0-63
are accepted too. `iface` is an interface's IPv4 address (IP_MULTICAST_IF / the join address);
None leaves the choice to the routing table (a 224.0.0.0/4 route).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct

DSCP_NAMES = {"CS0": 0, "BE": 0, "CS1": 8, "AF11": 10, "AF21": 18, "AF31": 26, "AF41": 34,
              "CS3": 24, "CS4": 32, "CS5": 40, "EF": 46, "CS6": 48, "CS7": 56}
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def dscp_value(dscp: str | int) -> int:
    """A DSCP given by name (AF41, EF, CS6 ...) or number 0-63; ValueError naming it."""
    if isinstance(dscp, int) and not isinstance(dscp, bool):
        if 0 <= dscp <= 63:
            return dscp
        raise ValueError(f"DSCP {dscp}: allowed 0 to 63 or a name ({', '.join(DSCP_NAMES)})")
    name = str(dscp).strip().upper()
    if name.isdigit():
        return dscp_value(int(name))
    if name not in DSCP_NAMES:
        raise ValueError(f"DSCP {dscp!r}: allowed 0 to 63 or a name ({', '.join(DSCP_NAMES)})")
    return DSCP_NAMES[name]


def open_sender(ttl: int = 32, dscp: str | int = "AF41", iface: str | None = None,
                loop: bool = True) -> socket.socket:
    """A UDP socket for sending media: multicast TTL, DSCP in the TOS byte, loopback of own
    multicast on (a receiver on the same host hears it)."""
    if not 1 <= ttl <= 255:
        raise ValueError(f"multicast TTL {ttl}: allowed 1 to 255")
    tos = dscp_value(dscp) << 2
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1 if loop else 0)
        if iface:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface))
    except BaseException:
        s.close()
        raise
    return s


def open_receiver(address: str, port: int, iface: str | None = None,
                  rcvbuf: int = 1 << 20, timestamps: bool = False) -> socket.socket:
    """A UDP socket bound to port, joined to `address` when it is a multicast group.

    timestamps: ask the kernel for SO_TIMESTAMPNS arrival times (read with recvmsg)."""
    ip = ipaddress.IPv4Address(address)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < rcvbuf:
            # net.core.rmem_max is lower (per network namespace; 208 KiB by default: 0.3 s of
            # an 8-channel stream): with CAP_NET_ADMIN take the size anyway
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        if timestamps:
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        if ip.is_multicast:
            s.bind((address, port))  # only this group's datagrams
            mreq = struct.pack("4s4s", socket.inet_aton(address),
                               socket.inet_aton(iface or "0.0.0.0"))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        else:
            s.bind(("0.0.0.0", port))
    except OSError as exc:
        s.close()
        raise OSError(exc.errno, f"cannot receive {address}:{port}"
                      f"{' on ' + iface if iface else ''}: {exc.strerror} (is there a route "
                      "for 224.0.0.0/4 or a multicast interface address?)") from None
    return s


def arrival_ns(ancdata: list) -> int | None:
    """The SO_TIMESTAMPNS arrival time (CLOCK_REALTIME ns) from recvmsg's ancillary data."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack("qq", data[:16])
            return sec * 1_000_000_000 + nsec
    return None


def source_address(dest: str, port: int = 9) -> str:
    """The local IPv4 address the routing table would send to dest from (no packet is sent);
    127.0.0.1 when there is no route."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((dest, port))
        return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()
