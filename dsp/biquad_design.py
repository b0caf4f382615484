"""Biquad coefficient design (RBJ Audio EQ Cookbook), usable from numba kernels.

Coefficients are returned normalised by a0 as (b0, b1, b2, a1, a2).
Reference: R. Bristow-Johnson, "Cookbook formulae for audio EQ biquad filter coefficients".
"""

from __future__ import annotations

import math

import numba
import numpy as np

# Band types, as stored in the engine's int arrays.
PEAKING, LOWSHELF, HIGHSHELF, LOWPASS, HIGHPASS = 0, 1, 2, 3, 4
BAND_TYPES: dict[str, int] = {
    "peaking": PEAKING,
    "lowshelf": LOWSHELF,
    "highshelf": HIGHSHELF,
    "lowpass": LOWPASS,
    "highpass": HIGHPASS,
}


@numba.njit(nogil=True, cache=True)
def design_into(kind: int, freq: float, gain_db: float, q: float, rate: float,
                out: np.ndarray) -> None:
    """Write normalised coefficients of one band into out[0:5] (no allocation)."""
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
    else:  # HIGHPASS
        b1 = -(1.0 + cw)
        b0 = (1.0 + cw) / 2.0
        b2 = b0
        a0, a1, a2 = 1.0 + alpha, -2.0 * cw, 1.0 - alpha
    out[0] = b0 / a0
    out[1] = b1 / a0
    out[2] = b2 / a0
    out[3] = a1 / a0
    out[4] = a2 / a0


def design(kind: str, freq: float, gain_db: float, q: float, rate: float) -> np.ndarray:
    """Coefficients (b0, b1, b2, a1, a2) of one band, for tests and tools."""
    out = np.empty(5)
    design_into(BAND_TYPES[kind], float(freq), float(gain_db), float(q), float(rate), out)
    return out
