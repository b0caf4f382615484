"""RTP L24/L16 packets, AES67 SDP and SAP: against independent references (struct, the
field-seen SDP of the recipe) and refusals that name the line, the field and the value."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from echoel.drivers.rtp_packet import (
    HEADER_BYTES,
    PacketWriter,
    RtpError,
    decode_l16,
    decode_l24,
    parse_header,
)
from echoel.drivers.sap import SapBrowser, SapError, build_sap, parse_sap
from echoel.drivers.sdp_aes67 import SdpError, StreamSdp, build_sdp, parse_sdp

FIELD_SDP = """v=0
o=- 1311738121 1311738121 IN IP4 192.168.1.100
s=Stage box 1
c=IN IP4 239.69.1.1/32
t=0 0
m=audio 5004 RTP/AVP 96
c=IN IP4 239.69.1.1/32
a=rtpmap:96 L24/48000/2
a=ptime:1
a=ts-refclk:ptp=IEEE1588-2008:5A-8A-71-FF-FE-26-FD-8A:0
a=mediaclk:direct=0
"""


def _reference_l24(codes: np.ndarray) -> bytes:
    return b"".join(struct.pack(">i", int(v))[1:] for v in codes.reshape(-1))


@pytest.mark.parametrize("encoding,bits", [("L24", 24), ("L16", 16)])
def test_packet_round_trip_against_struct(encoding, bits):
    rng = np.random.default_rng(1)
    full = 1 << (bits - 1)
    codes = rng.integers(-full, full, size=(48, 3))
    codes[0] = [-full, full - 1, 0]
    x = (codes / full).astype(np.float32)
    w = PacketWriter(48, 3, encoding, 97, 0xDEADBEEF)
    pkt = bytes(w.build(x, 65535, 0xFFFFFFF0, marker=True))
    # independent reference: struct, big-endian two's complement
    if bits == 24:
        payload = _reference_l24(codes)
    else:
        payload = b"".join(struct.pack(">h", int(v)) for v in codes.reshape(-1))
    assert pkt[HEADER_BYTES:] == payload
    assert pkt[:HEADER_BYTES] == struct.pack("!BBHII", 0x80, 0x80 | 97, 65535, 0xFFFFFFF0,
                                             0xDEADBEEF)
    h = parse_header(pkt)
    assert (h.payload_type, h.marker, h.sequence, h.timestamp, h.ssrc) == \
        (97, True, 65535, 0xFFFFFFF0, 0xDEADBEEF)
    y = np.zeros((48, 3), np.float32)
    dec = decode_l24 if bits == 24 else decode_l16
    assert dec(np.frombuffer(pkt, np.uint8), h.payload_offset, y, 0) == 48
    np.testing.assert_array_equal(y, x)


def test_encoder_clips_and_survives_nan_and_inf():
    x = np.array([[1.5, -2.0], [np.nan, np.inf], [-np.inf, 0.25]], np.float32)
    w = PacketWriter(3, 2, "L24", 96, 1)
    pkt = bytes(w.build(x, 0, 0))
    assert pkt[HEADER_BYTES:] == _reference_l24(
        np.array([[8388607, -8388608], [0, 8388607], [-8388608, 2097152]]))


def test_header_with_csrc_extension_and_padding():
    body = bytes(range(6))
    pkt = (struct.pack("!BBHII", 0x80 | 0x20 | 0x10 | 1, 96, 1, 2, 3) + b"\0\0\0\1"
           + struct.pack("!HH", 0xBEDE, 1) + b"\0\0\0\0" + body + b"\0\0\3")
    h = parse_header(pkt)
    assert pkt[h.payload_offset:h.payload_end] == body


@pytest.mark.parametrize("pkt,words", [
    (b"\x80\x60\0", "shorter than the 12-byte header"),
    (b"\x40" + bytes(15), "version 1"),
    (b"\x8f" + bytes(15), "CSRC/extension/padding"),
])
def test_malformed_headers_are_refused_by_name(pkt, words):
    with pytest.raises(RtpError, match=words):
        parse_header(pkt)


def test_field_sdp_is_read():
    s = parse_sdp(FIELD_SDP)
    assert (s.name, s.address, s.port, s.encoding, s.rate, s.channels, s.ptime_us, s.frames,
            s.payload_type, s.ttl, s.gm_identity, s.domain, s.mediaclk_offset) == \
        ("Stage box 1", "239.69.1.1", 5004, "L24", 48000, 2, 1000, 48, 96, 32,
         "5A-8A-71-FF-FE-26-FD-8A", 0, 0)


@pytest.mark.parametrize("ptime_us,rate", [(1000, 48000), (125, 48000), (1000, 96000),
                                           (125, 96000)])
def test_our_sdp_round_trips_with_aes67_attributes(ptime_us, rate):
    s = StreamSdp(name="Echoel out 1-8", address="239.69.3.7", port=5006, channels=8,
                  encoding="L16", rate=rate, ptime_us=ptime_us, payload_type=98, ttl=16,
                  origin="10.1.2.3", session_id=77, gm_identity="00-1D-C1-FF-FE-12-34-56",
                  domain=3, mediaclk_offset=12345)
    text = build_sdp(s)
    for line in ("a=clock-domain:PTPv2 3",
                 "a=ts-refclk:ptp=IEEE1588-2008:00-1D-C1-FF-FE-12-34-56:3",
                 "a=mediaclk:direct=12345", "a=sync-time:0",
                 f"a=framecount:{rate * ptime_us // 1_000_000}",
                 f"a=rtpmap:98 L16/{rate}/8", "c=IN IP4 239.69.3.7/16"):
        assert line + "\r\n" in text
    assert parse_sdp(text) == s


@pytest.mark.parametrize("text,words", [
    ("", "empty"),
    ("o=- 1 1 IN IP4 1.2.3.4\n", "line 1"),
    ("v=1\n", "v='1'"),
    ("v=0\ns=x\nc=IN IP4 239.1.1.1/32\n", "no m=audio"),
    ("v=0\nc=IN IP4 239.1.1.1/32\nm=audio 99999 RTP/AVP 96\na=rtpmap:96 L24/48000/2\n",
     "line 3: m= port = 99999"),
    ("v=0\nc=IN IP4 239.1.1.1/32\nm=audio 5004 RTP/AVP 96\na=rtpmap:96 opus/48000/2\n",
     "line 4: a=rtpmap encoding 'OPUS'"),
    ("v=0\nc=IN IP4 239.1.1.1/32\nm=audio 5004 RTP/AVP 96\na=rtpmap:96 L24/22050/2\n",
     "clock rate 22050"),
    ("v=0\nc=IN IP4 239.1.1/32\nm=audio 5004 RTP/AVP 96\na=rtpmap:96 L24/48000/2\n",
     "line 2: c= address '239.1.1'"),
    ("v=0\nc=IN IP4 239.1.1.1\nm=audio 5004 RTP/AVP 96\na=rtpmap:96 L24/48000/2\n",
     "without /ttl"),
    ("v=0\nc=IN IP4 239.1.1.1/32\nm=audio 5004 RTP/AVP 97\na=rtpmap:96 L24/48000/2\n",
     "payload type 97 has no a=rtpmap"),
    ("v=0\nc=IN IP4 239.1.1.1/32\nm=audio 5004 RTP/AVP 96\na=rtpmap:96 L24/48000/2\n"
     "a=ptime:abc\n", "line 5: a=ptime:'abc'"),
    ("v=0\nc=IN IP4 239.1.1.1/32\nm=audio 5004 RTP/AVP 96\na=rtpmap:96 L24/48000/2\n"
     "a=ts-refclk:ptp=IEEE1588-2008:5A-8A:0\n", "grandmaster '5A-8A'"),
    ("v=0\nc=IN IP4 239.1.1.1/32\nm=audio 5004 RTP/AVP 96\na=rtpmap:96 L24/48000/2\n"
     "a=mediaclk:direct=x\n", "a=mediaclk:direct = 'x'"),
    ("v=0\nm=audio 5004 RTP/AVP 96\na=rtpmap:96 L24/48000/2\n", "no c= line"),
    ("v=0\ngarbage\n", "line 2: 'garbage'"),
])
def test_malformed_sdp_is_refused_naming_line_and_value(text, words):
    with pytest.raises(SdpError) as e:
        parse_sdp(text)
    assert words in str(e.value)


def test_sap_round_trip_and_deletion():
    sdp = build_sdp(StreamSdp(name="a", address="239.69.1.2", port=5004, session_id=9))
    pkt = build_sap(sdp, "10.0.0.5")
    assert pkt[0] == 0x20 and pkt[4:8] == bytes([10, 0, 0, 5])
    m = parse_sap(pkt)
    assert (m.delete, m.origin, m.sdp) == (False, "10.0.0.5", sdp)
    d = parse_sap(build_sap(sdp, "10.0.0.5", delete=True))
    assert d.delete and d.msg_id_hash == m.msg_id_hash
    # the MIME type may be left out when the payload starts with v=0 (RFC 2974)
    assert parse_sap(pkt[:8] + sdp.encode()).sdp == sdp


@pytest.mark.parametrize("pkt,words", [
    (b"\x20\0\0", "shorter than the 8-byte header"),
    (b"\x40" + bytes(7) + b"v=0", "version 2"),
    (b"\x30" + bytes(7) + b"v=0", "IPv6"),
    (b"\x22" + bytes(7) + b"v=0", "encrypted"),
    (b"\x21" + bytes(7) + b"v=0", "compressed"),
    (b"\x20\x09" + bytes(6) + b"v=0", "authentication length 9"),
    (b"\x20" + bytes(7) + b"text/plain\0hello", "payload type b'text/plain'"),
    (b"\x20" + bytes(7) + b"application/sdp", "no NUL-terminated"),
    (b"\x20" + bytes(7) + b"v=0\xff\xfe", "not UTF-8"),
])
def test_malformed_sap_is_refused_naming_the_field(pkt, words):
    with pytest.raises(SapError) as e:
        parse_sap(pkt)
    assert words in str(e.value)


def test_sap_browser_keeps_updates_expires_and_deletes():
    now = [100.0]
    b = SapBrowser(expiry_s=60.0, clock=lambda: now[0])
    s1 = StreamSdp(name="one", address="239.69.1.1", port=5004, session_id=1)
    s2 = StreamSdp(name="two", address="239.69.1.2", port=5004, session_id=2)
    assert b.feed(build_sap(build_sdp(s1), "10.0.0.1")) == "one"
    assert b.feed(build_sap(build_sdp(s2), "10.0.0.2")) == "two"
    assert b.feed(b"\x20\0\0\0\1\2\3\4v=0\r\ns=broken\r\n") is None  # no m=audio
    assert b.refused == 1 and "no m=audio" in b.last_error and "10.0.0.1" not in b.last_error
    now[0] += 50
    b.feed(build_sap(build_sdp(s1), "10.0.0.1"))  # re-announced: kept alive
    assert b.find("one").announcements == 2
    now[0] += 20  # "two" not heard for 70 s
    b.expire()
    assert b.find("two") is None and b.find("one") is not None
    b.feed(build_sap(build_sdp(s1), "10.0.0.1", delete=True))
    assert b.find("one") is None and b.deletions == 1
