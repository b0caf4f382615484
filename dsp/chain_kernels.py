"""The engine's per-block DSP: gain, biquad EQ, soft limiter, meters. numba, nogil, no allocation.

All state lives in arrays the caller preallocates (see ChainState). Parameters move from their
targets to the running values with a one-pole smoother evaluated every SUB samples (10 ms time
constant by default): gain is interpolated per sample, EQ coefficients are recomputed per
sub-block, so changes are free of clicks and zipper noise.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from echoel.dsp.biquad_design import design_into
from echoel.dsp.chain_layout import BAND_BASE, GAIN_DB, ChainSpec

SUB = 16  # samples between parameter updates
DENORMAL = 1e-30
# limiter state slots
L_ENV, L_ENABLED, L_ATTACK, L_KNEE_DB, L_GAIN = 0, 1, 2, 3, 4
# meter rows
M_IN_PEAK, M_IN_MS, M_OUT_PEAK, M_OUT_MS = 0, 1, 2, 3


@numba.njit(nogil=True, cache=True)
def _smooth(cur: float, tgt: float, k: float) -> float:
    d = tgt - cur
    if abs(d) <= 1e-12 * (abs(tgt) + 1.0):
        return tgt
    return cur + d * k


@numba.njit(nogil=True, cache=True)
def _smooth_log(cur: float, tgt: float, k: float) -> float:
    if abs(tgt - cur) <= 1e-9 * tgt:
        return tgt
    return math.exp(math.log(cur) + (math.log(tgt) - math.log(cur)) * k)


@numba.njit(nogil=True, cache=True)
def process_block(x, y, p_tgt, p_cur, kinds, coef, z, lim, meters, rate, k_sub):
    """Run the chain over one block.

    x: float64[frames, cin] input; y: float64[frames, cout] output (out channel c reads input
    channel c % cin); p_tgt/p_cur: parameter targets and running values; kinds: int64[bands];
    coef: float64[bands, 5]; z: float64[bands, cout, 2] filter state (transposed direct form
    II); lim: float64[5] limiter state; meters: float64[4, channels] written with this block's
    input/output peak and mean square; rate: sample rate; k_sub: smoothing step per SUB samples.
    """
    frames, cin = x.shape
    cout = y.shape[1]
    nb = kinds.shape[0]
    lb = BAND_BASE + 3 * nb  # limiter base slot
    for c in range(meters.shape[1]):
        for r in range(4):
            meters[r, c] = 0.0
    for c in range(cin):
        for n in range(frames):
            v = abs(x[n, c])
            if v > meters[M_IN_PEAK, c]:
                meters[M_IN_PEAK, c] = v
            meters[M_IN_MS, c] += x[n, c] * x[n, c]
    start = 0
    while start < frames:
        stop = min(start + SUB, frames)
        span = stop - start
        # a short last sub-block moves the smoother by its own length, not a whole step
        k = k_sub if span == SUB else 1.0 - (1.0 - k_sub) ** (span / SUB)
        # --- parameters for this sub-block
        g0 = 10.0 ** (p_cur[GAIN_DB] / 20.0)
        p_cur[GAIN_DB] = _smooth(p_cur[GAIN_DB], p_tgt[GAIN_DB], k)
        g1 = 10.0 ** (p_cur[GAIN_DB] / 20.0)
        for b in range(nb):
            s = BAND_BASE + 3 * b
            changed = False
            for j in range(3):
                old = p_cur[s + j]
                if j == 1:
                    p_cur[s + j] = _smooth(old, p_tgt[s + j], k)
                else:
                    p_cur[s + j] = _smooth_log(old, p_tgt[s + j], k)
                if p_cur[s + j] != old:
                    changed = True
            if changed:
                design_into(kinds[b], p_cur[s], p_cur[s + 1], p_cur[s + 2], rate, coef[b])
        p_cur[lb] = _smooth(p_cur[lb], p_tgt[lb], k)
        p_cur[lb + 1] = _smooth(p_cur[lb + 1], p_tgt[lb + 1], k)
        # --- gain (interpolated per sample) and routing
        for n in range(start, stop):
            if g0 == g1:
                g = g1
            else:
                g = g0 + (g1 - g0) * (n - start + 1) / span
            for c in range(cout):
                y[n, c] = x[n, c % cin] * g
        # --- EQ, transposed direct form II
        for b in range(nb):
            b0, b1, b2, a1, a2 = coef[b, 0], coef[b, 1], coef[b, 2], coef[b, 3], coef[b, 4]
            for c in range(cout):
                s1 = z[b, c, 0]
                s2 = z[b, c, 1]
                for n in range(start, stop):
                    xn = y[n, c]
                    yn = b0 * xn + s1
                    s1 = b1 * xn - a1 * yn + s2
                    s2 = b2 * xn - a2 * yn
                    y[n, c] = yn
                if not (math.isfinite(s1) and math.isfinite(s2)):
                    s1 = s2 = 0.0  # a NaN/inf got in: forget it rather than keep it forever
                z[b, c, 0] = s1
                z[b, c, 1] = s2
        # --- soft-knee peak limiter, linked across channels, with a hard ceiling at 0 dBFS
        if lim[L_ENABLED] != 0.0:
            thr = p_cur[lb]
            rel = math.exp(-1.0 / (max(p_cur[lb + 1], 1.0) * 0.001 * rate))
            att = lim[L_ATTACK]
            knee = lim[L_KNEE_DB]
            env = lim[L_ENV]
            for n in range(start, stop):
                peak = 0.0
                for c in range(cout):
                    v = abs(y[n, c])
                    if v > peak:
                        peak = v
                if peak > env:
                    env = att * env + (1.0 - att) * peak
                else:
                    env = rel * env + (1.0 - rel) * peak
                gain = 1.0
                if env > 1e-9:
                    over = 20.0 * math.log10(env) - thr
                    if over > -knee / 2.0:
                        if over < knee / 2.0:
                            gr = (over + knee / 2.0) ** 2 / (2.0 * knee)
                        else:
                            gr = over
                        gain = 10.0 ** (-gr / 20.0)
                for c in range(cout):
                    v = y[n, c] * gain
                    if v > 1.0:
                        v = 1.0
                    elif v < -1.0:
                        v = -1.0
                    y[n, c] = v
                lim[L_GAIN] = gain
            lim[L_ENV] = env if env > DENORMAL and math.isfinite(env) else 0.0
        start = stop
    for b in range(nb):
        for c in range(cout):
            for j in range(2):
                if abs(z[b, c, j]) < DENORMAL:
                    z[b, c, j] = 0.0
    for c in range(cout):
        for n in range(frames):
            v = abs(y[n, c])
            if v > meters[M_OUT_PEAK, c]:
                meters[M_OUT_PEAK, c] = v
            meters[M_OUT_MS, c] += y[n, c] * y[n, c]
    for c in range(meters.shape[1]):
        meters[M_IN_MS, c] /= frames
        meters[M_OUT_MS, c] /= frames


class ChainState:
    """Preallocated arrays for one chain instance (made before the stream starts)."""

    def __init__(self, spec: ChainSpec, rate: int, frames: int, cin: int, cout: int) -> None:
        self.spec = spec
        self.rate = float(rate)
        self.p_tgt = spec.initial_values()
        self.p_cur = self.p_tgt.copy()
        self.kinds = spec.band_kinds()
        nb = len(spec.bands)
        self.coef = np.zeros((nb, 5))
        for b in range(nb):
            s = BAND_BASE + 3 * b
            design_into(self.kinds[b], self.p_cur[s], self.p_cur[s + 1], self.p_cur[s + 2],
                        self.rate, self.coef[b])
        self.z = np.zeros((nb, cout, 2))
        self.lim = np.zeros(5)
        self.lim[L_ENABLED] = 1.0 if spec.limiter else 0.0
        self.lim[L_ATTACK] = math.exp(-1.0 / (0.0005 * rate))  # 0.5 ms attack
        self.lim[L_KNEE_DB] = 6.0
        self.lim[L_GAIN] = 1.0
        self.meters = np.zeros((4, max(cin, cout)))
        self.k_sub = 1.0 - math.exp(-SUB / (max(spec.smoothing_ms, 0.1) * 0.001 * rate))
        self.x = np.zeros((frames, cin))
        self.y = np.zeros((frames, cout))

    def run(self) -> None:
        """Process self.x into self.y."""
        process_block(self.x, self.y, self.p_tgt, self.p_cur, self.kinds, self.coef, self.z,
                      self.lim, self.meters, self.rate, self.k_sub)

    def reset(self) -> None:
        """Clear filter and limiter memory (after a stream restart)."""
        self.z[:] = 0.0
        self.lim[L_ENV] = 0.0
