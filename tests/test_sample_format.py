"""Sample format conversion (dsp/sample_format.py): interleaved S16_LE / S32_LE / FLOAT_LE
buffers <-> float64 [frames, channels] work buffers."""

from __future__ import annotations

import numpy as np
import pytest
from echoel.dsp.sample_format import FORMATS, decode, encode_float, encode_int, encoder_for

INT_FORMATS = ["S16_LE", "S32_LE"]


def decoded(raw: np.ndarray, fmt: str, ch: int) -> np.ndarray:
    out = np.full((raw.shape[0] // ch, ch), np.nan)
    decode(raw, FORMATS[fmt][1], out)
    return out


def encoded(src: np.ndarray, fmt: str) -> np.ndarray:
    dtype, scale = FORMATS[fmt]
    out = np.zeros(src.size, dtype)
    encoder_for(fmt)(src, scale, out)
    return out


def test_formats_table():
    assert FORMATS["S16_LE"] == (np.int16, 32768.0)
    assert FORMATS["S32_LE"] == (np.int32, 2147483648.0)
    assert FORMATS["FLOAT_LE"] == (np.float32, 1.0)
    assert encoder_for("FLOAT_LE") is encode_float
    assert encoder_for("S16_LE") is encode_int and encoder_for("S32_LE") is encode_int


def test_s16_every_value_round_trips_exactly():
    raw = np.arange(-32768, 32768, dtype=np.int16)
    x = decoded(raw, "S16_LE", 2)
    assert x.shape == (32768, 2)
    np.testing.assert_array_equal(x.reshape(-1), raw / 32768.0)
    assert x.min() == -1.0 and x.max() == 32767 / 32768
    np.testing.assert_array_equal(encoded(x, "S16_LE"), raw)


def test_s32_round_trips_exactly():
    rng = np.random.default_rng(5)
    info = np.iinfo(np.int32)
    raw = np.concatenate([
        np.array([info.min, info.min + 1, -1, 0, 1, info.max - 1, info.max]),
        rng.integers(info.min, info.max, 4093, endpoint=True),
    ]).astype(np.int32)
    x = decoded(raw, "S32_LE", 4)
    np.testing.assert_array_equal(x.reshape(-1), raw.astype(np.float64) / 2.0 ** 31)
    np.testing.assert_array_equal(encoded(x, "S32_LE"), raw)


@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_interleaving(fmt):
    dtype, _ = FORMATS[fmt]
    ch, frames = 3, 5
    raw = np.arange(frames * ch, dtype=dtype) * 100 - 700  # raw[n * ch + c]
    x = decoded(raw, fmt, ch)
    for n in range(frames):
        for c in range(ch):
            assert x[n, c] * FORMATS[fmt][1] == raw[n * ch + c]
    np.testing.assert_array_equal(encoded(x, fmt), raw)


@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_saturation_at_full_scale(fmt):
    dtype, scale = FORMATS[fmt]
    info = np.iinfo(dtype)
    src = np.array([[1.0, -1.0], [1.0 + 1e-9, -1.0 - 1e-9], [1.5, -1.5], [1e12, -1e12],
                    [np.inf, -np.inf], [(scale - 0.5) / scale, -(scale - 0.4) / scale]])
    out = encoded(src, fmt).reshape(-1, 2)
    assert (out[:, 0] == info.max).all(), out[:, 0]
    assert (out[:, 1] == info.min).all(), out[:, 1]


@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_rounding_to_nearest(fmt):
    dtype, scale = FORMATS[fmt]
    rng = np.random.default_rng(9)
    k = rng.integers(-1000, 1000, 2000)
    frac = rng.choice([-0.49, -0.3, -0.01, 0.0, 0.01, 0.3, 0.49, 0.51, 0.7, 0.99], k.size)
    lsb = k + frac
    out = encoded((lsb / scale).reshape(-1, 2), fmt).astype(np.int64)
    np.testing.assert_array_equal(out, np.floor(lsb + 0.5).astype(np.int64))
    # ties go to one of the two neighbours, never further
    ties = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    out = encoded((ties / scale).reshape(-1, 2), fmt)
    assert (np.abs(out - ties) == 0.5).all(), out
    # near full scale too
    top = encoded(np.array([[(scale - 1.3) / scale, -(scale - 0.7) / scale]]), fmt)
    assert top.tolist() == [scale - 1, -scale + 1]
    assert out.dtype == dtype


def test_float32_passthrough_is_exact():
    rng = np.random.default_rng(3)
    raw = rng.uniform(-1.0, 1.0, 4096).astype(np.float32)
    raw[:8] = [0.0, -0.0, 1.0, -1.0, np.finfo(np.float32).tiny, -np.finfo(np.float32).eps,
               np.float32(1e-30), np.nextafter(np.float32(1.0), np.float32(0.0))]
    x = decoded(raw, "FLOAT_LE", 2)
    np.testing.assert_array_equal(x.reshape(-1), raw.astype(np.float64))
    back = encoded(x, "FLOAT_LE")
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back.view(np.uint32), raw.view(np.uint32))  # bit for bit


def test_float_encode_rounds_float64_to_nearest_float32():
    src = np.array([[0.1, -1.0 / 3.0], [0.7, 1e-8]])
    out = encoded(src, "FLOAT_LE")
    np.testing.assert_array_equal(out, src.reshape(-1).astype(np.float32))


def test_decode_of_a_buffer_from_bytes():
    # the real-time loop decodes np.frombuffer(bytes) views: little-endian, read-only
    samples = np.array([-32768, -1, 0, 1, 16384, 32767], np.int16)
    buf = samples.astype("<i2").tobytes()
    raw = np.frombuffer(buf, np.int16)
    assert not raw.flags.writeable
    x = decoded(raw, "S16_LE", 2)
    np.testing.assert_array_equal(x.reshape(-1), samples / 32768.0)
