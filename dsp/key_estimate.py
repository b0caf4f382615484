"""Key estimation (24 keys) with confidence over a sliding window of chroma frames.

Krumhansl-Schmuckler: the Pearson correlation of the window's summed chroma with the
Krumhansl-Kessler major and minor profiles rotated to each tonic; the key is the best of the
24 and the confidence is the margin between the best and the second best correlation (0: a
toss-up; the correlations lie in [-1, 1]).

Streaming: chroma frames are summed into segments of `segment_seconds`; the window is the last
`window_seconds` worth of segments (a ring), so the sum is exact with no drift and the cost per
frame is constant. numba kernels, no allocation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from echoel.dsp.chord_vocabulary import PITCH_NAMES

# Krumhansl & Kessler (1982) probe-tone ratings, tonic first
KK_MAJOR = (6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88)
KK_MINOR = (6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17)
KEY_LABELS = tuple([f"{p} major" for p in PITCH_NAMES] + [f"{p} minor" for p in PITCH_NAMES])
# ints slots
K_SEG_POS, K_SEG_FILL, K_IN_SEG, K_SEGS_USED = 0, 1, 2, 3


def key_profiles() -> np.ndarray:
    """Zero-mean, unit-norm profiles of the 24 keys (C major .. B major, C minor .. B minor)
    as float64[24, 12]."""
    out = np.zeros((24, 12))
    for m, prof in enumerate((KK_MAJOR, KK_MINOR)):
        p = np.asarray(prof) - np.mean(prof)
        p /= np.linalg.norm(p)
        for r in range(12):
            out[12 * m + r] = np.roll(p, r)
    return out


@numba.njit(nogil=True, cache=True)
def key_correlations(chroma, profiles, out):
    """Pearson correlation of chroma[12] with each profile row into out[24]; returns False
    (out all zeros) when the chroma is flat or empty."""
    mean = 0.0
    for p in range(12):
        mean += chroma[p]
    mean /= 12.0
    norm = 0.0
    for p in range(12):
        norm += (chroma[p] - mean) ** 2
    if not norm > 1e-24 or not math.isfinite(norm):
        for k in range(out.shape[0]):
            out[k] = 0.0
        return False
    norm = math.sqrt(norm)
    for k in range(out.shape[0]):
        s = 0.0
        for p in range(12):
            s += (chroma[p] - mean) * profiles[k, p]
        out[k] = s / norm
    return True


@numba.njit(nogil=True, cache=True)
def best_two(scores):
    """(index of the best score, best - second best)."""
    b = 0
    for k in range(1, scores.shape[0]):
        if scores[k] > scores[b]:
            b = k
    second = -math.inf
    for k in range(scores.shape[0]):
        if k != b and scores[k] > second:
            second = scores[k]
    return b, scores[b] - second


@numba.njit(nogil=True, cache=True)
def key_push(chroma, n, segs, total, ints, frames_per_seg, profiles, corr, result):
    """Add chroma frames 0..n-1 to the sliding window (segs: float64[n_segs, 12] ring,
    total: float64[12] work) and write result = [key index or -1, confidence]."""
    n_segs = segs.shape[0]
    for f in range(n):
        ok = True
        for p in range(12):
            if not math.isfinite(chroma[f, p]):
                ok = False
        pos = ints[K_SEG_POS]
        if ok:
            for p in range(12):
                segs[pos, p] += chroma[f, p]
        ints[K_IN_SEG] += 1
        if ints[K_IN_SEG] >= frames_per_seg:
            ints[K_IN_SEG] = 0
            pos = (pos + 1) % n_segs
            ints[K_SEG_POS] = pos
            for p in range(12):
                segs[pos, p] = 0.0  # the oldest segment leaves the window
            if ints[K_SEGS_USED] < n_segs:
                ints[K_SEGS_USED] += 1
    for p in range(12):
        total[p] = 0.0
    for s in range(n_segs):
        for p in range(12):
            total[p] += segs[s, p]
    if key_correlations(total, profiles, corr):
        k, margin = best_two(corr)
        result[0] = k
        result[1] = margin
    else:
        result[0] = -1.0
        result[1] = 0.0


@dataclass(frozen=True)
class KeyResult:
    """A key estimate."""

    key: str  # "C major" .. "B minor", or "" when the chroma holds nothing
    confidence: float  # best minus second best correlation
    correlations: np.ndarray  # float64[24], in KEY_LABELS order


def estimate_key(chroma: np.ndarray) -> KeyResult:
    """Key of chroma frames float[frames, 12] (or one summed chroma [12]) taken together."""
    c = np.asarray(chroma, dtype=np.float64)
    if c.ndim == 2:
        if c.shape[1] != 12:
            raise ValueError(f"key: chroma has {c.shape[1]} columns; need 12")
        c = c[np.all(np.isfinite(c), axis=1)].sum(axis=0)
    if c.shape != (12,):
        raise ValueError(f"key: chroma shape {c.shape}; need [frames, 12] or [12]")
    corr = np.zeros(24)
    if not key_correlations(c, key_profiles(), corr):
        return KeyResult("", 0.0, corr)
    k, margin = best_two(corr)
    return KeyResult(KEY_LABELS[k], float(margin), corr)


class KeyTracker:
    """Streaming key over the last `window_seconds` of chroma frames (preallocated)."""

    def __init__(self, hop_seconds: float, window_seconds: float = 30.0,
                 segment_seconds: float = 1.0) -> None:
        if not 0.0 < hop_seconds <= 10.0:
            raise ValueError(f"key: hop_seconds {hop_seconds}; allowed (0, 10]")
        if not segment_seconds <= window_seconds <= 3600.0:
            raise ValueError(f"key: window_seconds {window_seconds}; allowed "
                             f"segment_seconds ({segment_seconds})..3600")
        self.frames_per_seg = max(1, round(segment_seconds / hop_seconds))
        n_segs = max(2, round(window_seconds / (self.frames_per_seg * hop_seconds)) + 1)
        self.segs = np.zeros((n_segs, 12))
        self.total = np.zeros(12)
        self.ints = np.zeros(4, dtype=np.int64)
        self.profiles = key_profiles()
        self.corr = np.zeros(24)
        self.result = np.array([-1.0, 0.0])

    def push(self, chroma: np.ndarray, n: int) -> None:
        """Add frames chroma[:n] (float64[>= n, 12]) and update the estimate."""
        key_push(chroma, n, self.segs, self.total, self.ints, self.frames_per_seg,
                 self.profiles, self.corr, self.result)

    @property
    def key(self) -> str:
        """Current key label, "" before any tonal frame."""
        k = int(self.result[0])
        return KEY_LABELS[k] if k >= 0 else ""

    @property
    def confidence(self) -> float:
        """Margin of the current key over the second best (correlation units)."""
        return float(self.result[1])
