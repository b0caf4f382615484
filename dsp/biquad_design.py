"""Biquad coefficient design (RBJ Audio EQ Cookbook), usable from numba kernels.

Coefficients are returned normalised by a0 as (b0, b1, b2, a1, a2).
Reference: R. Bristow-Johnson, "Cookbook formulae for audio EQ biquad filter coefficients".
Every type takes the same (freq, gain_db, q); gain_db only matters for peaking and the shelves,
for which q is the cookbook's Q (q = 1/sqrt(2) is the shelf slope S = 1). BANDPASS has a
constant 0 dB peak gain, BANDPASS_SKIRT a constant skirt gain (peak gain = q).
"""

from __future__ import annotations

import math

import numba
import numpy as np

# Band types, as stored in the engine's int arrays.
PEAKING, LOWSHELF, HIGHSHELF, LOWPASS, HIGHPASS = 0, 1, 2, 3, 4
BANDPASS, NOTCH, ALLPASS, BANDPASS_SKIRT = 5, 6, 7, 8
# The types the engine's chain (config, chain_kernels) offers.
BAND_TYPES: dict[str, int] = {
    "peaking": PEAKING,
    "lowshelf": LOWSHELF,
    "highshelf": HIGHSHELF,
    "lowpass": LOWPASS,
    "highpass": HIGHPASS,
}
# Every RBJ type design_into knows (the cascades in biquad_cascade.py take all of them).
FILTER_TYPES: dict[str, int] = {
    **BAND_TYPES,
    "bandpass": BANDPASS,
    "notch": NOTCH,
    "allpass": ALLPASS,
    "bandpass_skirt": BANDPASS_SKIRT,
}


@numba.njit(nogil=True, cache=True)
def design_into(kind: int, freq: float, gain_db: float, q: float, rate: float,
                out: np.ndarray) -> None:
    """Write normalised coefficients of one band into out[0:5] (no allocation).

    An unknown kind gives a unity pass-through (kinds are checked where the state is built).
    """
    A = 10.0 ** (gain_db / 40.0)
    w0 = 2.0 * math.pi * freq / rate
    cw = math.cos(w0)
    alpha = math.sin(w0) / (2.0 * q)
    if kind == PEAKING:
        b0, b1, b2 = 1.0 + alpha * A, -2.0 * cw, 1.0 - alpha * A
        a0, a1, a2 = 1.0 + alpha / A, -2.0 * cw, 1.0 - alpha / A
    elif kind == LOWSHELF:
        sq = 2.0 * math.sqrt(A) * alpha
        b0 = A * ((A + 1.0) - (A - 1.0) * cw + sq)
        b1 = 2.0 * A * ((A - 1.0) - (A + 1.0) * cw)
        b2 = A * ((A + 1.0) - (A - 1.0) * cw - sq)
        a0 = (A + 1.0) + (A - 1.0) * cw + sq
        a1 = -2.0 * ((A - 1.0) + (A + 1.0) * cw)
        a2 = (A + 1.0) + (A - 1.0) * cw - sq
    elif kind == HIGHSHELF:
        sq = 2.0 * math.sqrt(A) * alpha
        b0 = A * ((A + 1.0) + (A - 1.0) * cw + sq)
        b1 = -2.0 * A * ((A - 1.0) + (A + 1.0) * cw)
        b2 = A * ((A + 1.0) + (A - 1.0) * cw - sq)
        a0 = (A + 1.0) - (A - 1.0) * cw + sq
        a1 = 2.0 * ((A - 1.0) - (A + 1.0) * cw)
        a2 = (A + 1.0) - (A - 1.0) * cw - sq
    elif kind == LOWPASS:
        b1 = 1.0 - cw
        b0 = b1 / 2.0
        b2 = b0
        a0, a1, a2 = 1.0 + alpha, -2.0 * cw, 1.0 - alpha
    elif kind == HIGHPASS:
        b1 = -(1.0 + cw)
        b0 = (1.0 + cw) / 2.0
        b2 = b0
        a0, a1, a2 = 1.0 + alpha, -2.0 * cw, 1.0 - alpha
    elif kind == BANDPASS:
        b0, b1, b2 = alpha, 0.0, -alpha
        a0, a1, a2 = 1.0 + alpha, -2.0 * cw, 1.0 - alpha
    elif kind == NOTCH:
        b0, b1, b2 = 1.0, -2.0 * cw, 1.0
        a0, a1, a2 = 1.0 + alpha, -2.0 * cw, 1.0 - alpha
    elif kind == ALLPASS:
        b0, b1, b2 = 1.0 - alpha, -2.0 * cw, 1.0 + alpha
        a0, a1, a2 = 1.0 + alpha, -2.0 * cw, 1.0 - alpha
    elif kind == BANDPASS_SKIRT:
        b0, b1, b2 = q * alpha, 0.0, -q * alpha
        a0, a1, a2 = 1.0 + alpha, -2.0 * cw, 1.0 - alpha
    else:
        b0, b1, b2, a0, a1, a2 = 1.0, 0.0, 0.0, 1.0, 0.0, 0.0
    out[0] = b0 / a0
    out[1] = b1 / a0
    out[2] = b2 / a0
    out[3] = a1 / a0
    out[4] = a2 / a0


def design(kind: str, freq: float, gain_db: float, q: float, rate: float) -> np.ndarray:
    """Coefficients (b0, b1, b2, a1, a2) of one band, for tests and tools."""
    if kind not in FILTER_TYPES:
        raise ValueError(f"filter type {kind!r} unknown: use one of {sorted(FILTER_TYPES)}")
    out = np.empty(5)
    design_into(FILTER_TYPES[kind], float(freq), float(gain_db), float(q), float(rate), out)
    return out
