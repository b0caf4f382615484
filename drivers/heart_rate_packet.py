"""The Heart Rate Measurement characteristic (0x2A37), parsed; and the Beat record sensors deliver.

Layout (Bluetooth Heart Rate Service 1.0, little-endian):

    byte 0      flags: bit 0 BPM is uint16 (else uint8); bit 2 sensor contact supported,
                bit 1 contact detected (meaningful only with bit 2); bit 3 Energy Expended
                present; bit 4 RR intervals present; bits 5-7 reserved (ignored)
    then        BPM (uint8 or uint16)
    then        Energy Expended, uint16 kJ (when bit 3)
    then        zero or more RR intervals, uint16 each, in 1/1024 s (when bit 4)

Pure: no I/O. A malformed notification raises PacketError naming the byte and the flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FLAG_UINT16_BPM = 0x01
FLAG_CONTACT_DETECTED = 0x02
FLAG_CONTACT_SUPPORTED = 0x04
FLAG_ENERGY = 0x08
FLAG_RR = 0x10
RR_UNITS_PER_S = 1024
MAX_RR_MS = 65535 * 1000 / RR_UNITS_PER_S  # what a uint16 can carry (about 64 s)

# Body Sensor Location (0x2A38) values
LOCATIONS = {0: "other", 1: "chest", 2: "wrist", 3: "finger", 4: "hand", 5: "ear lobe",
             6: "foot"}


class PacketError(ValueError):
    """A Heart Rate Measurement that cannot be read; the message names the byte and the flag."""


@dataclass(frozen=True)
class HeartRateMeasurement:
    """One 0x2A37 notification, decoded."""

    bpm: int
    contact: bool | None  # None: the sensor does not report contact
    energy_kj: int | None  # None: not in this notification
    rr_1024: tuple[int, ...]  # RR intervals as sent, in 1/1024 s

    @property
    def rr_ms(self) -> list[float]:
        """RR intervals in milliseconds."""
        return [v * 1000.0 / RR_UNITS_PER_S for v in self.rr_1024]


@dataclass(frozen=True)
class Beat:
    """What a heart-rate sensor delivers: one record per accepted notification.

    `t_ns` is CLOCK_MONOTONIC (time.monotonic_ns) when the notification was received;
    `rr_ms` holds the RR intervals that arrived with it (zero or more, oldest first);
    `gap_before` is True when RR intervals may be missing between this record and the
    sensor's previous one (the link dropped, or notifications stopped for a while): an HRV
    series must not be joined across it.
    """

    sensor: str
    t_ns: int
    bpm: int
    rr_ms: list[float] = field(default_factory=list)
    contact: bool | None = None
    energy_kj: int | None = None
    gap_before: bool = False


def _u16(data: bytes, i: int) -> int:
    return data[i] | (data[i + 1] << 8)


def parse_heart_rate(data: bytes | bytearray | memoryview) -> HeartRateMeasurement:
    """Decode a Heart Rate Measurement; PacketError when it is malformed."""
    data = bytes(data)
    n = len(data)
    if n == 0:
        raise PacketError("empty notification: byte 0 (flags) is missing")
    flags = data[0]
    i = 1
    if flags & FLAG_UINT16_BPM:
        if n < 3:
            raise PacketError(f"bytes 1-2 (uint16 BPM, flag bit 0 set): notification has only "
                              f"{n} byte(s), need at least 3")
        bpm = _u16(data, 1)
        i = 3
    else:
        if n < 2:
            raise PacketError("byte 1 (uint8 BPM, flag bit 0 clear): notification has only "
                              "1 byte, need at least 2")
        bpm = data[1]
        i = 2
    contact = bool(flags & FLAG_CONTACT_DETECTED) if flags & FLAG_CONTACT_SUPPORTED else None
    energy = None
    if flags & FLAG_ENERGY:
        if n < i + 2:
            raise PacketError(f"bytes {i}-{i + 1} (Energy Expended, flag bit 3 set): "
                              f"notification ends at byte {n - 1}")
        energy = _u16(data, i)
        i += 2
    rest = n - i
    if not flags & FLAG_RR:
        if rest:
            raise PacketError(f"byte {i}: {rest} byte(s) after the last field, but flag bit 4 "
                              f"(RR intervals present) is clear (flags 0x{flags:02x})")
        return HeartRateMeasurement(bpm, contact, energy, ())
    if rest % 2:
        raise PacketError(f"byte {n - 1}: RR intervals (flag bit 4 set) need 2 bytes each, "
                          f"{rest} byte(s) follow byte {i - 1}")
    rr = tuple(_u16(data, j) for j in range(i, n, 2))
    for k, v in enumerate(rr):
        if v == 0:
            raise PacketError(f"bytes {i + 2 * k}-{i + 2 * k + 1}: RR interval {k} is 0 "
                              "(flag bit 4 set; an interval must be at least 1/1024 s)")
    return HeartRateMeasurement(bpm, contact, energy, rr)


def encode_heart_rate(bpm: int, contact: bool | None = None, energy_kj: int | None = None,
                      rr_1024: tuple[int, ...] | list[int] = (), uint16: bool | None = None,
                      rr_flag: bool | None = None) -> bytes:
    """A Heart Rate Measurement as a sensor sends it (for simulated sensors and tests).

    `uint16`: BPM as uint16 (default: only when it does not fit a byte); `rr_flag`: set bit 4
    (default: when there are RR intervals)."""
    wide = bpm > 255 if uint16 is None else uint16
    if not 0 <= bpm <= (65535 if wide else 255):
        raise ValueError(f"bpm = {bpm}: allowed 0 to {65535 if wide else 255}")
    rr = list(rr_1024)
    has_rr = bool(rr) if rr_flag is None else rr_flag
    if rr and not has_rr:
        raise ValueError("rr_1024 given with rr_flag=False")
    for v in rr:
        if not 0 <= v <= 65535:
            raise ValueError(f"RR interval {v} (1/1024 s): allowed 0 to 65535")
    if energy_kj is not None and not 0 <= energy_kj <= 65535:
        raise ValueError(f"energy_kj = {energy_kj}: allowed 0 to 65535")
    flags = (FLAG_UINT16_BPM if wide else 0) | (FLAG_ENERGY if energy_kj is not None else 0)
    flags |= FLAG_RR if has_rr else 0
    if contact is not None:
        flags |= FLAG_CONTACT_SUPPORTED | (FLAG_CONTACT_DETECTED if contact else 0)
    out = bytearray([flags])
    out += bpm.to_bytes(2 if wide else 1, "little")
    if energy_kj is not None:
        out += energy_kj.to_bytes(2, "little")
    for v in rr:
        out += v.to_bytes(2, "little")
    return bytes(out)


def ms_to_rr_1024(ms: float) -> int:
    """An interval in ms as the nearest 1/1024 s count (what a sensor would send)."""
    return max(1, min(65535, round(ms * RR_UNITS_PER_S / 1000.0)))
