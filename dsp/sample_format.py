"""Conversion between the sound card's interleaved sample formats and float64 work buffers."""

from __future__ import annotations

import math

import numba
import numpy as np

# name -> (numpy dtype of the raw buffer, full-scale divisor)
FORMATS: dict[str, tuple[type, float]] = {
    "S16_LE": (np.int16, 32768.0),
    "S32_LE": (np.int32, 2147483648.0),
    "FLOAT_LE": (np.float32, 1.0),
}


@numba.njit(nogil=True, cache=True)
def decode(raw, scale, out):
    """Interleaved raw samples (1-D, any numeric dtype) -> out float64[frames, ch] / scale."""
    frames, ch = out.shape
    inv = 1.0 / scale
    for n in range(frames):
        for c in range(ch):
            v = raw[n * ch + c] * inv
            out[n, c] = v if math.isfinite(v) else 0.0  # NaN/inf from a float source: silence


@numba.njit(nogil=True, cache=True)
def encode_int(src, scale, out):
    """float64[frames, ch] -> interleaved integers in out (1-D), rounded and saturated."""
    frames, ch = src.shape
    hi = scale - 1.0
    for n in range(frames):
        for c in range(ch):
            v = np.rint(src[n, c] * scale)
            if v > hi:
                v = hi
            elif v < -scale:
                v = -scale
            out[n * ch + c] = v


@numba.njit(nogil=True, cache=True)
def encode_float(src, scale, out):
    """float64[frames, ch] -> interleaved float32 in out (1-D)."""
    frames, ch = src.shape
    for n in range(frames):
        for c in range(ch):
            out[n * ch + c] = src[n, c]


def encoder_for(fmt: str):
    """The encode kernel for a format name."""
    return encode_float if FORMATS[fmt][0] is np.float32 else encode_int
