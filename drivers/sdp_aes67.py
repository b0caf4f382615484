"""SDP (RFC 4566) of an AES67 stream: written for our senders, read for subscriptions.

What is written (AES67-2018 section 8, RFC 7273):

    v=0
    o=- <session id> <version> IN IP4 <origin address>
    s=<name>
    c=IN IP4 <multicast address>/<ttl>
    t=0 0
    a=clock-domain:PTPv2 <domain>
    m=audio <port> RTP/AVP <payload type>
    a=rtpmap:<pt> L24/48000/<channels>
    a=ptime:1
    a=framecount:48
    a=ts-refclk:ptp=IEEE1588-2008:<GM identity>:<domain>
    a=mediaclk:direct=<offset>
    a=sync-time:0
    a=recvonly

The parser accepts what field devices and GStreamer/ffmpeg write (session- or media-level c=,
ptime in fractional ms, ts-refclk at either level, traceable clocks, extra attributes) and refuses
anything it cannot receive with SdpError naming the line number, the field and the value.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

ENCODINGS = ("L24", "L16")
RATES = (44100, 48000, 96000)
GM_RE = re.compile(r"^[0-9A-Fa-f]{2}(-[0-9A-Fa-f]{2}){7}$")


class SdpError(ValueError):
    """An SDP that cannot be used; the message names the line, the field and the value."""


@dataclass(frozen=True)
class StreamSdp:
    """One audio stream as an SDP describes it."""

    name: str
    address: str  # destination (multicast group or unicast address)
    port: int
    channels: int = 2
    encoding: str = "L24"
    rate: int = 48000
    ptime_us: int = 1000
    payload_type: int = 96
    ttl: int = 32
    origin: str = "127.0.0.1"
    session_id: int = 1
    session_version: int = 1
    gm_identity: str | None = None  # PTP grandmaster, "5A-8A-71-FF-FE-26-FD-8A"
    domain: int = 0
    mediaclk_offset: int | None = 0  # a=mediaclk:direct=N; None: no media clock given
    traceable: bool = False  # a=ts-refclk:ptp=IEEE1588-2008:traceable
    info: str = ""

    @property
    def frames(self) -> int:
        """Samples per channel per packet."""
        return self.rate * self.ptime_us // 1_000_000

    @property
    def is_multicast(self) -> bool:
        """True when the destination is a multicast group."""
        return ipaddress.IPv4Address(self.address).is_multicast


def _ptime_text(us: int) -> str:
    return f"{us // 1000}" if us % 1000 == 0 else f"{us / 1000:g}"


def build_sdp(s: StreamSdp) -> str:
    """The SDP text of a stream (CRLF line ends, as RFC 4566 asks)."""
    check_stream(s)
    c = f"c=IN IP4 {s.address}/{s.ttl}" if s.is_multicast else f"c=IN IP4 {s.address}"
    lines = [
        "v=0",
        f"o=- {s.session_id} {s.session_version} IN IP4 {s.origin}",
        f"s={s.name}",
    ]
    if s.info:
        lines.append(f"i={s.info}")
    lines += [c, "t=0 0", f"a=clock-domain:PTPv2 {s.domain}",
              f"m=audio {s.port} RTP/AVP {s.payload_type}",
              f"a=rtpmap:{s.payload_type} {s.encoding}/{s.rate}/{s.channels}",
              f"a=ptime:{_ptime_text(s.ptime_us)}",
              f"a=framecount:{s.frames}"]
    if s.traceable:
        lines.append("a=ts-refclk:ptp=IEEE1588-2008:traceable")
    elif s.gm_identity:
        lines.append(f"a=ts-refclk:ptp=IEEE1588-2008:{s.gm_identity.upper()}:{s.domain}")
    if s.mediaclk_offset is not None:
        lines.append(f"a=mediaclk:direct={s.mediaclk_offset}")
    lines += ["a=sync-time:0", "a=recvonly"]
    return "\r\n".join(lines) + "\r\n"


def check_stream(s: StreamSdp) -> None:
    """SdpError naming the field when a stream cannot be described or received."""
    def bad(field: str, value: object, allowed: str) -> SdpError:
        return SdpError(f"stream {s.name!r}: {field} = {value!r}: allowed: {allowed}")

    try:
        ipaddress.IPv4Address(s.address)
    except ValueError:
        raise bad("address", s.address, "an IPv4 address (e.g. 239.69.1.1)") from None
    if not 1 <= s.port <= 65535:
        raise bad("port", s.port, "1 to 65535")
    if not 1 <= s.channels <= 64:
        raise bad("channels", s.channels, "1 to 64")
    if s.encoding not in ENCODINGS:
        raise bad("encoding", s.encoding, ", ".join(ENCODINGS))
    if s.rate not in RATES:
        raise bad("rate", s.rate, ", ".join(map(str, RATES)))
    if s.ptime_us <= 0 or s.rate * s.ptime_us % 1_000_000:
        raise bad("ptime_us", s.ptime_us, "a packet time holding a whole number of samples "
                  "(125, 250, 1000, 4000 us at 48 kHz)")
    if not 96 <= s.payload_type <= 127:
        raise bad("payload_type", s.payload_type, "96 to 127 (dynamic)")
    if not 1 <= s.ttl <= 255:
        raise bad("ttl", s.ttl, "1 to 255")
    if not 0 <= s.domain <= 127:
        raise bad("domain", s.domain, "0 to 127")
    if s.gm_identity is not None and not GM_RE.match(s.gm_identity):
        raise bad("gm_identity", s.gm_identity, "8 hex bytes with dashes, "
                  "e.g. 5A-8A-71-FF-FE-26-FD-8A")
    if not s.name or any(ch in s.name for ch in "\r\n"):
        raise bad("name", s.name, "a non-empty single line")


def _int(lineno: int, field: str, text: str, lo: int, hi: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise SdpError(f"SDP line {lineno}: {field} = {text!r}: not an integer") from None
    if not lo <= v <= hi:
        raise SdpError(f"SDP line {lineno}: {field} = {v}: allowed {lo} to {hi}")
    return v


def _connection(lineno: int, value: str) -> tuple[str, int]:
    parts = value.split()
    if len(parts) != 3 or parts[0] != "IN":
        raise SdpError(f"SDP line {lineno}: c={value!r}: expected 'IN IP4 address[/ttl]'")
    if parts[1] != "IP4":
        raise SdpError(f"SDP line {lineno}: c= address type {parts[1]!r}: only IP4 is "
                       "supported")
    addr, _, rest = parts[2].partition("/")
    try:
        ip = ipaddress.IPv4Address(addr)
    except ValueError:
        raise SdpError(f"SDP line {lineno}: c= address {addr!r}: not an IPv4 address") from None
    ttl = 32
    if rest:
        ttl = _int(lineno, "c= TTL", rest.split("/")[0], 0, 255)
    elif ip.is_multicast:
        raise SdpError(f"SDP line {lineno}: c= multicast address {addr} without /ttl "
                       "(RFC 4566 requires it)")
    return addr, ttl


def parse_sdp(text: str) -> StreamSdp:
    """The first L24/L16 audio stream of an SDP; SdpError naming the line and value otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise SdpError("SDP is empty")
    name = info = ""
    origin, sid, sver = "0.0.0.0", 0, 0
    sess_c: tuple[str, int] | None = None
    media_c: tuple[str, int] | None = None
    domain: int | None = None
    gm: str | None = None
    traceable = False
    mediaclk: int | None = None
    ptime_us: int | None = None
    framecount: int | None = None
    media: dict | None = None
    rtpmap: dict[int, tuple[int, str, int, int]] = {}
    seen_v = False
    in_media = False
    done = False  # past our audio section: ignore further m= sections
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if len(line) < 2 or line[1] != "=" or not line[0].isalpha():
            raise SdpError(f"SDP line {lineno}: {line[:60]!r}: expected '<letter>=<value>'")
        k, v = line[0], line[2:]
        if lineno == 1 and k != "v":
            raise SdpError(f"SDP line 1: {line[:60]!r}: an SDP starts with v=0")
        if k == "v":
            if v != "0":
                raise SdpError(f"SDP line {lineno}: v={v!r}: only version 0 exists")
            seen_v = True
        elif k == "m":
            if media is not None:
                done = True
                continue
            parts = v.split()
            if len(parts) < 4:
                raise SdpError(f"SDP line {lineno}: m={v!r}: expected 'audio port RTP/AVP pt'")
            if parts[0] != "audio":
                in_media = False
                continue
            if parts[2] != "RTP/AVP":
                raise SdpError(f"SDP line {lineno}: m= transport {parts[2]!r}: only RTP/AVP")
            port = _int(lineno, "m= port", parts[1].split("/")[0], 1, 65535)
            pt = _int(lineno, "m= payload type", parts[3], 0, 127)
            media = {"port": port, "pt": pt, "line": lineno}
            in_media = True
        elif done:
            continue
        elif k == "o":
            parts = v.split()
            if len(parts) != 6:
                raise SdpError(f"SDP line {lineno}: o={v!r}: expected 6 fields "
                               "(user id version IN IP4 address)")
            sid = _int(lineno, "o= session id", parts[1], 0, 2**64 - 1)
            sver = _int(lineno, "o= session version", parts[2], 0, 2**64 - 1)
            origin = parts[5]
        elif k == "s":
            name = v.strip()
        elif k == "i" and not in_media:
            info = v
        elif k == "c":
            if in_media:
                media_c = _connection(lineno, v)
            elif media is None:
                sess_c = _connection(lineno, v)
        elif k == "a":
            attr, _, val = v.partition(":")
            if attr == "rtpmap" and in_media:
                m = re.fullmatch(r"(\d+)\s+([A-Za-z0-9]+)/(\d+)(?:/(\d+))?", val.strip())
                if not m:
                    raise SdpError(f"SDP line {lineno}: a=rtpmap:{val!r}: expected "
                                   "'pt L24/48000/2'")
                pt = _int(lineno, "rtpmap payload type", m.group(1), 0, 127)
                enc = m.group(2).upper()
                rate = _int(lineno, "rtpmap clock rate", m.group(3), 1, 10**6)
                ch = _int(lineno, "rtpmap channels", m.group(4) or "1", 1, 64)
                rtpmap[pt] = (lineno, enc, rate, ch)
            elif attr == "ptime" and (in_media or media is None):
                try:
                    ms = float(val)
                except ValueError:
                    raise SdpError(f"SDP line {lineno}: a=ptime:{val!r}: not a number of "
                                   "milliseconds") from None
                if not 0.0 < ms <= 1000.0:
                    raise SdpError(f"SDP line {lineno}: a=ptime:{val}: allowed above 0 up to "
                                   "1000 ms")
                ptime_us = round(ms * 1000)
            elif attr == "framecount":
                framecount = _int(lineno, "a=framecount", val.strip(), 1, 1 << 16)
            elif attr == "clock-domain":
                parts = val.split()
                if len(parts) != 2 or parts[0] != "PTPv2":
                    raise SdpError(f"SDP line {lineno}: a=clock-domain:{val!r}: expected "
                                   "'PTPv2 <domain>'")
                domain = _int(lineno, "a=clock-domain", parts[1], 0, 255)
            elif attr == "ts-refclk":
                if val.startswith("ptp="):
                    fields = val[4:].split(":")
                    if len(fields) >= 2 and fields[1] == "traceable":
                        traceable = True
                    elif len(fields) >= 2:
                        if not GM_RE.match(fields[1]):
                            raise SdpError(f"SDP line {lineno}: a=ts-refclk grandmaster "
                                           f"{fields[1]!r}: expected 8 hex bytes with dashes")
                        gm = fields[1].upper()
                        if len(fields) >= 3 and fields[2]:
                            domain = _int(lineno, "a=ts-refclk domain", fields[2], 0, 255)
                    else:
                        raise SdpError(f"SDP line {lineno}: a=ts-refclk:{val!r}: expected "
                                       "'ptp=IEEE1588-2008:<GM>:<domain>'")
            elif attr == "mediaclk":
                if val.startswith("direct="):
                    off = val[7:].split()[0] if val[7:].split() else ""
                    mediaclk = _int(lineno, "a=mediaclk:direct", off, 0, 2**32 - 1)
                elif val.startswith("sender"):
                    mediaclk = None
                else:
                    raise SdpError(f"SDP line {lineno}: a=mediaclk:{val!r}: only 'direct=N' "
                                   "(RFC 7273) is supported")
        # other lines (t=, b=, k=, r=, z=, e=, p=, u=) are irrelevant to reception
    if not seen_v:
        raise SdpError("SDP has no v=0 line")
    if media is None:
        raise SdpError("SDP has no m=audio line: no audio stream to receive")
    if media["pt"] not in rtpmap:
        if media["pt"] == 10:  # static L16/44100/2 (RFC 3551)
            rtpmap[10] = (media["line"], "L16", 44100, 2)
        elif media["pt"] == 11:
            rtpmap[11] = (media["line"], "L16", 44100, 1)
        else:
            raise SdpError(f"SDP line {media['line']}: m=audio payload type {media['pt']} has "
                           "no a=rtpmap line")
    lno, enc, rate, ch = rtpmap[media["pt"]]
    if enc not in ENCODINGS:
        raise SdpError(f"SDP line {lno}: a=rtpmap encoding {enc!r}: allowed: L24, L16")
    if rate not in RATES:
        raise SdpError(f"SDP line {lno}: a=rtpmap clock rate {rate}: allowed: "
                       + ", ".join(map(str, RATES)))
    conn = media_c or sess_c
    if conn is None:
        raise SdpError("SDP has no c= line (session or media level): no address to receive on")
    if framecount is not None:
        frames = framecount
    elif ptime_us is not None:
        frames = round(rate * ptime_us / 1_000_000)
    else:
        frames = rate // 1000
    if frames * 1_000_000 % rate:
        raise SdpError(f"SDP: {frames} samples per packet at {rate} Hz is not a whole number "
                       "of microseconds; supported packet times: 125, 250, 1000, 4000 us ...")
    ptime_us = frames * 1_000_000 // rate
    return StreamSdp(
        name=name or f"{conn[0]}:{media['port']}", address=conn[0], port=media["port"],
        channels=ch, encoding=enc, rate=rate, ptime_us=ptime_us, payload_type=media["pt"],
        ttl=conn[1] or 1, origin=origin, session_id=sid, session_version=sver,
        gm_identity=gm, domain=domain if domain is not None else 0, mediaclk_offset=mediaclk,
        traceable=traceable, info=info)

