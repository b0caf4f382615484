"""Tuning estimation: how far the music's reference pitch is from A4 = 440 Hz, in cents.

Each analysis frame's spectral peaks (frequency from log-parabolic interpolation, 150-2500 Hz)
vote, weighted by amplitude, into a circular histogram of their deviation from the nearest
equal-tempered semitone (1-cent bins over [-50, 50)). The histogram decays with a time constant
(streaming: the estimate follows a slow drift). The estimate is the histogram's mode (smoothed
over +-3 cents) refined by the weighted circular mean of the bins within +-10 cents of it:
a mode rather than a plain mean, because harmonics 5 and 7 of in-tune tones sit 14 and 31
cents flat and would pull a mean. numba kernels, no allocation.
"""

from __future__ import annotations

import math

import numba
import numpy as np

BINS = 100  # 1 cent each, bin b covers [b - 50, b - 49) cents
TUNE_FMIN = 150.0
TUNE_FMAX = 2500.0
SMOOTH = 3  # half width of the mode's triangular smoothing, bins
REFINE = 10  # half width of the refinement window, bins
MIN_MASS = 1e-9  # below this the histogram holds no evidence: 0 cents


@numba.njit(nogil=True, cache=True)
def tuning_vote(hist, cents: float, weight: float) -> None:
    """Add one peak's deviation (cents, any value; wrapped to [-50, 50)) to the histogram."""
    c = cents - 100.0 * math.floor((cents + 50.0) / 100.0)  # [-50, 50)
    pos = c + 50.0 - 0.5  # bin centres at b + 0.5 - 50 cents
    b0 = math.floor(pos)
    f = pos - b0
    i0 = int(b0) % BINS
    hist[i0] += weight * (1.0 - f)
    hist[(i0 + 1) % BINS] += weight * f


@numba.njit(nogil=True, cache=True)
def tuning_estimate(hist) -> float:
    """Deviation of the reference from 440 Hz in cents, in [-50, 50), from the histogram."""
    total = 0.0
    for b in range(BINS):
        total += hist[b]
    if not total > MIN_MASS:
        return 0.0
    best = -1.0
    arg = 0
    for b in range(BINS):
        s = 0.0
        for j in range(-SMOOTH, SMOOTH + 1):
            s += hist[(b + j) % BINS] * (SMOOTH + 1 - abs(j))
        if s > best:
            best = s
            arg = b
    cs = 0.0
    sn = 0.0
    for j in range(-REFINE, REFINE + 1):
        b = (arg + j) % BINS
        ang = 2.0 * math.pi * (b + 0.5 - 50.0) / 100.0
        cs += hist[b] * math.cos(ang)
        sn += hist[b] * math.sin(ang)
    c = 100.0 * math.atan2(sn, cs) / (2.0 * math.pi)
    return c - 100.0 * math.floor((c + 50.0) / 100.0)


def new_histogram() -> np.ndarray:
    """An empty tuning histogram (float64[BINS])."""
    return np.zeros(BINS)
