"""RTP (RFC 3550) packets carrying linear PCM: L24 and L16 (RFC 3190 / RFC 3551), as AES67 uses.

A packet is a 12-byte header (no CSRC, no extension on send; both accepted on receive) and
`frames x channels` big-endian two's-complement samples, interleaved. The kernels write into a
caller's preallocated buffer and read from a received one; they never allocate. Float samples
are clipped to [-1, 1) and rounded to the nearest integer code; decoding is exact (code / 2^23
or / 2^15), so encode(decode(x)) == x for every code.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numba
import numpy as np

HEADER_BYTES = 12
RTP_VERSION = 2
ENCODINGS = {"L24": 3, "L16": 2}  # bytes per sample
_HDR = struct.Struct("!BBHII")


class RtpError(ValueError):
    """A packet that is not a usable RTP packet; the message names the field and value."""


@dataclass(frozen=True)
class RtpHeader:
    """The fields of a received header, and where its payload starts and ends."""

    payload_type: int
    marker: bool
    sequence: int
    timestamp: int
    ssrc: int
    payload_offset: int
    payload_end: int


def bytes_per_sample(encoding: str) -> int:
    """3 for L24, 2 for L16; ValueError naming the encoding otherwise."""
    try:
        return ENCODINGS[encoding]
    except KeyError:
        raise ValueError(f"RTP encoding {encoding!r}: allowed: L24, L16") from None


def write_header(buf: bytearray | memoryview, payload_type: int, sequence: int, timestamp: int,
                 ssrc: int, marker: bool = False) -> None:
    """Write a 12-byte RTP header at the start of buf."""
    _HDR.pack_into(buf, 0, 0x80, (0x80 if marker else 0) | (payload_type & 0x7F),
                   sequence & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc & 0xFFFFFFFF)


def parse_header(data: bytes | bytearray | memoryview, length: int | None = None) -> RtpHeader:
    """Read the header of a received packet (CSRCs, extension and padding honoured).

    Raises RtpError naming the field when the packet is too short or not RTP version 2."""
    n = len(data) if length is None else length
    if n < HEADER_BYTES:
        raise RtpError(f"RTP packet of {n} bytes: shorter than the 12-byte header")
    b0, b1, seq, ts, ssrc = _HDR.unpack_from(data, 0)
    if b0 >> 6 != RTP_VERSION:
        raise RtpError(f"RTP version {b0 >> 6}: only version 2 is allowed")
    off = HEADER_BYTES + 4 * (b0 & 0x0F)
    if b0 & 0x10:  # header extension: 16-bit profile, 16-bit length in words
        if n < off + 4:
            raise RtpError(f"RTP extension header at byte {off}: packet ends at {n}")
        off += 4 + 4 * struct.unpack_from("!H", data, off + 2)[0]
    end = n
    if b0 & 0x20:  # padding: the last byte counts the padding bytes
        end -= data[n - 1]
    if off > end:
        raise RtpError(f"RTP header length {off} bytes (CSRC/extension/padding): packet has "
                       f"only {n}")
    return RtpHeader(b1 & 0x7F, bool(b1 & 0x80), seq, ts, ssrc, off, end)


@numba.njit(nogil=True, cache=True)
def encode_l24(x, out, offset):
    """float32[frames, ch] -> big-endian 24-bit codes at out[offset:]; returns bytes written."""
    frames, ch = x.shape
    k = offset
    for n in range(frames):
        for c in range(ch):
            v = x[n, c]
            if not (v == v):  # NaN -> silence
                v = 0.0
            q = int(np.floor(v * 8388608.0 + 0.5)) if abs(v) < 2.0 else (
                8388607 if v > 0 else -8388608)
            if q > 8388607:
                q = 8388607
            elif q < -8388608:
                q = -8388608
            q &= 0xFFFFFF
            out[k] = (q >> 16) & 0xFF
            out[k + 1] = (q >> 8) & 0xFF
            out[k + 2] = q & 0xFF
            k += 3
    return k - offset


@numba.njit(nogil=True, cache=True)
def encode_l16(x, out, offset):
    """float32[frames, ch] -> big-endian 16-bit codes at out[offset:]; returns bytes written."""
    frames, ch = x.shape
    k = offset
    for n in range(frames):
        for c in range(ch):
            v = x[n, c]
            if not (v == v):
                v = 0.0
            q = int(np.floor(v * 32768.0 + 0.5)) if abs(v) < 2.0 else (
                32767 if v > 0 else -32768)
            if q > 32767:
                q = 32767
            elif q < -32768:
                q = -32768
            q &= 0xFFFF
            out[k] = (q >> 8) & 0xFF
            out[k + 1] = q & 0xFF
            k += 2
    return k - offset


@numba.njit(nogil=True, cache=True)
def decode_l24(data, offset, y, row):
    """Big-endian 24-bit codes at data[offset:] -> float32 rows y[row:row+frames] (all of y's
    channels; frames = what fits the rows left). Returns the frames written."""
    ch = y.shape[1]
    frames = y.shape[0] - row
    avail = (data.shape[0] - offset) // (3 * ch)
    if avail < frames:
        frames = avail
    k = offset
    for n in range(frames):
        for c in range(ch):
            q = (np.int32(data[k]) << 16) | (np.int32(data[k + 1]) << 8) | np.int32(data[k + 2])
            if q >= 8388608:
                q -= 16777216
            y[row + n, c] = np.float32(q) * np.float32(1.0 / 8388608.0)
            k += 3
    return frames


@numba.njit(nogil=True, cache=True)
def decode_l16(data, offset, y, row):
    """Big-endian 16-bit codes at data[offset:] -> float32 rows y[row:...]; frames written."""
    ch = y.shape[1]
    frames = y.shape[0] - row
    avail = (data.shape[0] - offset) // (2 * ch)
    if avail < frames:
        frames = avail
    k = offset
    for n in range(frames):
        for c in range(ch):
            q = (np.int32(data[k]) << 8) | np.int32(data[k + 1])
            if q >= 32768:
                q -= 65536
            y[row + n, c] = np.float32(q) * np.float32(1.0 / 32768.0)
            k += 2
    return frames


class PacketWriter:
    """Builds the packets of one stream into one preallocated buffer (no allocation per packet).

    frames: samples per channel per packet; channels; encoding 'L24' or 'L16'."""

    def __init__(self, frames: int, channels: int, encoding: str, payload_type: int,
                 ssrc: int) -> None:
        if not 1 <= channels <= 64:
            raise ValueError(f"RTP channels {channels}: allowed 1 to 64")
        if not 1 <= frames <= 4096:
            raise ValueError(f"RTP frames per packet {frames}: allowed 1 to 4096")
        if not 0 <= payload_type <= 127:
            raise ValueError(f"RTP payload type {payload_type}: allowed 0 to 127 (96-127 "
                             "dynamic)")
        self.frames, self.channels, self.encoding = frames, channels, encoding
        self.bps = bytes_per_sample(encoding)
        self.payload_type, self.ssrc = payload_type, ssrc & 0xFFFFFFFF
        self.size = HEADER_BYTES + frames * channels * self.bps
        self.buf = bytearray(self.size)
        self.view = np.frombuffer(self.buf, np.uint8)
        self._encode = encode_l24 if encoding == "L24" else encode_l16

    def build(self, x: np.ndarray, sequence: int, timestamp: int,
              marker: bool = False) -> memoryview:
        """The packet for x (float32[frames, channels]); a view of the internal buffer."""
        write_header(self.buf, self.payload_type, sequence, timestamp, self.ssrc, marker)
        self._encode(x, self.view, HEADER_BYTES)
        return memoryview(self.buf)


def warm_kernels() -> None:
    """Compile (or load from cache) the four kernels now, not on the first packet."""
    x = np.zeros((2, 2), np.float32)
    b = np.zeros(HEADER_BYTES + 12, np.uint8)
    encode_l24(x, b, HEADER_BYTES)
    encode_l16(x, b, HEADER_BYTES)
    decode_l24(b, HEADER_BYTES, x, 0)
    decode_l16(b, HEADER_BYTES, x, 0)
