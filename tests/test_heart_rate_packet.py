"""The 0x2A37 parser against packets laid out by hand with `struct` from the specification's
field table, for every combination of the flag bits; malformed packets name byte and flag."""

import itertools
import struct

import pytest
from echoel.drivers.heart_rate_packet import (
    PacketError,
    encode_heart_rate,
    ms_to_rr_1024,
    parse_heart_rate,
)


def spec_packet(flags: int, bpm: int, energy: int, rr: list[int]) -> bytes:
    """The reference: fields appended in the order and width the specification gives."""
    out = struct.pack("<B", flags)
    out += struct.pack("<H" if flags & 0x01 else "<B", bpm)
    if flags & 0x08:
        out += struct.pack("<H", energy)
    if flags & 0x10:
        out += struct.pack(f"<{len(rr)}H", *rr)
    return out


@pytest.mark.parametrize("flags", range(32))
@pytest.mark.parametrize("n_rr", [0, 1, 3])
def test_every_flag_combination(flags: int, n_rr: int) -> None:
    bpm = 300 if flags & 0x01 else 187  # a uint16 value above 255 only fits the wide field
    rr = [1023, 65535, 1][:n_rr] if flags & 0x10 else []
    m = parse_heart_rate(spec_packet(flags, bpm, 51234, rr))
    assert m.bpm == bpm
    if flags & 0x04:
        assert m.contact is bool(flags & 0x02)
    else:
        assert m.contact is None  # bit 1 alone means nothing
    assert m.energy_kj == (51234 if flags & 0x08 else None)
    assert list(m.rr_1024) == rr
    assert m.rr_ms == pytest.approx([v * 1000 / 1024 for v in rr])


def test_reserved_bits_are_ignored() -> None:
    m = parse_heart_rate(spec_packet(0xE0 | 0x10, 60, 0, [1024]))
    assert (m.bpm, m.rr_ms) == (60, [1000.0])


def test_encoder_matches_the_reference_layout() -> None:
    for wide, contact, energy, rr in itertools.product(
            (False, True), (None, False, True), (None, 7), ([], [512, 900])):
        flags = (0x01 if wide else 0) | (0x08 if energy is not None else 0) \
            | (0x10 if rr else 0) | (0 if contact is None else 0x04 | (0x02 if contact else 0))
        ref = spec_packet(flags, 120, energy or 0, rr)
        assert encode_heart_rate(120, contact, energy, rr, uint16=wide) == ref
    assert ms_to_rr_1024(1000.0) == 1024 and ms_to_rr_1024(0.1) == 1


def test_bytes_and_bytearray_and_memoryview() -> None:
    raw = spec_packet(0x10, 72, 0, [800])
    for form in (raw, bytearray(raw), memoryview(raw)):
        assert parse_heart_rate(form).rr_1024 == (800,)


@pytest.mark.parametrize("raw, words", [
    (b"", ["byte 0", "flags"]),
    (b"\x00", ["byte 1", "bit 0 clear"]),
    (b"\x01\x48", ["bytes 1-2", "bit 0 set"]),
    (b"\x08\x48\x01", ["bytes 2-3", "bit 3"]),
    (b"\x09\x48\x00\x01", ["bytes 3-4", "bit 3"]),
    (b"\x10\x48\x00\x04\x01", ["byte 4", "bit 4"]),
    (b"\x00\x48\x00\x04", ["byte 2", "bit 4", "clear"]),
    (b"\x10\x48\x00\x04\x00\x00", ["bytes 4-5", "RR interval 1 is 0"]),
])
def test_malformed_names_byte_and_flag(raw: bytes, words: list[str]) -> None:
    with pytest.raises(PacketError) as err:
        parse_heart_rate(raw)
    for w in words:
        assert w in str(err.value)


def test_every_truncation_is_rejected_or_keeps_a_prefix_of_the_rr_list() -> None:
    full = spec_packet(0x1F, 300, 10, [700, 800])  # 1 + 2 + 2 + 4 bytes
    for n in range(len(full) + 1):
        try:
            m = parse_heart_rate(full[:n])
        except PacketError:
            assert n < 5 or (n - 5) % 2 == 1, f"{full[:n].hex()} rejected"
            continue
        assert n >= 5 and (n - 5) % 2 == 0, f"{full[:n].hex()} accepted as {m}"
        assert (m.bpm, m.energy_kj, list(m.rr_1024)) == (300, 10, [700, 800][:(n - 5) // 2])
