"""Cascades of RBJ biquads: N sections, per-channel state, transposed direct form II, float64.

Parameters (freq, gain_db, q) of every section glide to their targets with a one-pole smoother
(freq and q in the log domain, gain in dB), stepped every SUB samples of the stream, when the
section's coefficients are redesigned. The step grid is counted across blocks, so the output
does not depend on how the stream is cut into blocks. Setting a target is a cheap write into a
preallocated array; the kernel picks it up at the next step.

Non-finite input samples are read as 0 (the block is counted in `bad_blocks`); a section whose
state is no longer finite (overflow) is reset to zero and the block counted too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
from echoel.dsp.biquad_design import FILTER_TYPES, design_into

SUB = 16  # samples between parameter steps / coefficient updates (as in chain_kernels)
DENORMAL = 1e-30
# per-section parameter columns
P_FREQ, P_GAIN, P_Q = 0, 1, 2
# int state slots
I_PHASE, I_BAD_BLOCKS = 0, 1
# control slots (float64)
C_RATE, C_K_SUB = 0, 1
# parameter limits, checked where targets are set
FREQ_MIN_HZ = 1.0
Q_MIN, Q_MAX = 0.01, 100.0
GAIN_MAX_DB = 60.0


@dataclass(frozen=True)
class Section:
    """One biquad: RBJ type (a name in FILTER_TYPES), frequency (Hz), gain (dB), Q."""

    kind: str
    freq: float
    gain_db: float = 0.0
    q: float = 0.7071067811865476


@numba.njit(nogil=True, cache=True)
def _glide(cur: float, tgt: float, k: float) -> float:
    d = tgt - cur
    if k >= 1.0 or abs(d) <= 1e-12 * (abs(tgt) + 1.0):
        return tgt
    return cur + d * k


@numba.njit(nogil=True, cache=True)
def _glide_log(cur: float, tgt: float, k: float) -> float:
    if k >= 1.0 or abs(tgt - cur) <= 1e-9 * tgt:
        return tgt
    return math.exp(math.log(cur) + (math.log(tgt) - math.log(cur)) * k)


@numba.njit(nogil=True, cache=True)
def cascade_block(x, y, kinds, p_tgt, p_cur, coef, z, ctl, istate):
    """Filter one block through every section, in order.

    x, y: float64[frames, channels] (y may be x: in place); kinds: int64[sections];
    p_tgt, p_cur: float64[sections, 3] (freq, gain_db, q) targets and running values;
    coef: float64[sections, 5] (b0, b1, b2, a1, a2); z: float64[sections, channels, 2];
    ctl: float64[2] (sample rate, smoother step per SUB samples); istate: int64[2] (step
    phase, bad-block count).
    """
    frames, chans = x.shape
    rate = ctl[C_RATE]
    k_sub = ctl[C_K_SUB]
    ns = kinds.shape[0]
    bad = False
    moving = False  # targets only change between calls: a settled cascade stays settled
    for s in range(ns):
        for j in range(3):
            if p_cur[s, j] != p_tgt[s, j]:
                moving = True
    start = 0
    while start < frames:
        phase = istate[I_PHASE]
        stop = min(start + SUB - phase, frames) if moving else frames
        if phase == 0 and moving:
            for s in range(ns):
                changed = False
                for j in range(3):
                    old = p_cur[s, j]
                    if j == P_GAIN:
                        p_cur[s, j] = _glide(old, p_tgt[s, j], k_sub)
                    else:
                        p_cur[s, j] = _glide_log(old, p_tgt[s, j], k_sub)
                    if p_cur[s, j] != old:
                        changed = True
                if changed:
                    design_into(kinds[s], p_cur[s, P_FREQ], p_cur[s, P_GAIN], p_cur[s, P_Q],
                                rate, coef[s])
        # sample by sample through every section: consecutive sections overlap in the CPU
        for n in range(start, stop):
            for c in range(chans):
                v = x[n, c]
                if not math.isfinite(v):
                    v = 0.0
                    bad = True
                for s in range(ns):
                    yn = coef[s, 0] * v + z[s, c, 0]
                    z[s, c, 0] = coef[s, 1] * v - coef[s, 3] * yn + z[s, c, 1]
                    z[s, c, 1] = coef[s, 2] * v - coef[s, 4] * yn
                    v = yn
                y[n, c] = v
        istate[I_PHASE] = (phase + stop - start) % SUB
        start = stop
    for s in range(ns):
        for c in range(chans):
            if not (math.isfinite(z[s, c, 0]) and math.isfinite(z[s, c, 1])):
                z[s, c, 0] = z[s, c, 1] = 0.0  # overflowed: forget it rather than keep it
                bad = True
            for j in range(2):
                if abs(z[s, c, j]) < DENORMAL:
                    z[s, c, j] = 0.0
    if bad:
        istate[I_BAD_BLOCKS] += 1


class BiquadCascade:
    """Preallocated state of one cascade: sections in series, the same on every channel."""

    def __init__(self, sections: Sequence[Section], rate: float, channels: int,
                 smoothing_ms: float = 10.0) -> None:
        if rate <= 0 or not math.isfinite(rate):
            raise ValueError(f"sample rate {rate!r} Hz: must be a positive number")
        if channels < 1:
            raise ValueError(f"channels {channels!r}: need at least 1")
        self.rate = float(rate)
        self.channels = int(channels)
        ns = len(sections)
        self.kinds = np.zeros(ns, dtype=np.int64)
        self.p_tgt = np.zeros((ns, 3))
        for i, sec in enumerate(sections):
            if sec.kind not in FILTER_TYPES:
                raise ValueError(f"section {i}: filter type {sec.kind!r} unknown; "
                                 f"allowed: {sorted(FILTER_TYPES)}")
            self.kinds[i] = FILTER_TYPES[sec.kind]
            self.set_section(i, sec.freq, sec.gain_db, sec.q)
        self.p_cur = self.p_tgt.copy()
        self.coef = np.zeros((ns, 5))
        self.z = np.zeros((ns, self.channels, 2))
        self.istate = np.zeros(2, dtype=np.int64)
        self.ctl = np.array([self.rate, 0.0])
        self.set_smoothing(smoothing_ms)
        self._design_current()

    @property
    def latency(self) -> int:
        """Delay added to the signal path, in samples (a biquad cascade adds none)."""
        return 0

    @property
    def bad_blocks(self) -> int:
        """Blocks that carried non-finite input or overflowed a section's state."""
        return int(self.istate[I_BAD_BLOCKS])

    def set_section(self, index: int, freq: float | None = None, gain_db: float | None = None,
                    q: float | None = None) -> None:
        """Set new targets for section `index` (None keeps a value); the section glides there."""
        nyq = 0.5 * self.rate
        if freq is not None:
            if not FREQ_MIN_HZ <= freq < nyq:
                raise ValueError(f"section {index}: freq {freq!r} Hz out of range "
                                 f"[{FREQ_MIN_HZ:g}, {nyq:g}) at {self.rate:g} Hz")
            self.p_tgt[index, P_FREQ] = freq
        if gain_db is not None:
            if not -GAIN_MAX_DB <= gain_db <= GAIN_MAX_DB:
                raise ValueError(f"section {index}: gain {gain_db!r} dB out of range "
                                 f"[{-GAIN_MAX_DB:g}, {GAIN_MAX_DB:g}]")
            self.p_tgt[index, P_GAIN] = gain_db
        if q is not None:
            if not Q_MIN <= q <= Q_MAX:
                raise ValueError(f"section {index}: Q {q!r} out of range [{Q_MIN:g}, {Q_MAX:g}]")
            self.p_tgt[index, P_Q] = q

    def set_smoothing(self, smoothing_ms: float) -> None:
        """Time constant of the parameter glide (ms); 0 jumps at the next SUB-sample step."""
        if not 0.0 <= smoothing_ms <= 10000.0:
            raise ValueError(f"smoothing {smoothing_ms!r} ms out of range [0, 10000]")
        if smoothing_ms == 0.0:
            self.ctl[C_K_SUB] = 1.0
        else:
            self.ctl[C_K_SUB] = 1.0 - math.exp(-SUB / (smoothing_ms * 1e-3 * self.rate))

    def jump_to_targets(self) -> None:
        """Take the targets at once (before the stream starts; not click-free)."""
        self.p_cur[:] = self.p_tgt
        self._design_current()

    def reset(self) -> None:
        """Clear the filter memory (after a stream restart); parameters are kept."""
        self.z[:] = 0.0

    def sos(self) -> np.ndarray:
        """The current coefficients as scipy second-order sections [sections, 6]."""
        out = np.ones((self.coef.shape[0], 6))
        out[:, :3] = self.coef[:, :3]
        out[:, 4:] = self.coef[:, 3:]
        return out

    def kernel_args(self, x: np.ndarray, y: np.ndarray) -> tuple:
        """Arguments of cascade_block for the caller's own preallocated x and y."""
        return (x, y, self.kinds, self.p_tgt, self.p_cur, self.coef, self.z, self.ctl,
                self.istate)

    def process(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Filter x (float64[frames, channels]) into out (allocated if None; may be x)."""
        check_block(x, self.channels, "input")
        if out is None:
            out = np.empty_like(x)
        else:
            check_block(out, self.channels, "output")
            if out.shape[0] != x.shape[0]:
                raise ValueError(f"output has {out.shape[0]} frames, input {x.shape[0]}")
        cascade_block(*self.kernel_args(x, out))
        return out

    def _design_current(self) -> None:
        for i in range(self.kinds.shape[0]):
            design_into(self.kinds[i], self.p_cur[i, P_FREQ], self.p_cur[i, P_GAIN],
                        self.p_cur[i, P_Q], self.rate, self.coef[i])


def check_block(a: np.ndarray, channels: int, what: str) -> None:
    """Refuse (ValueError) anything but a float64 [frames, channels] array."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float64 or a.ndim != 2:
        raise ValueError(f"{what} must be a float64 array [frames, channels], got "
                         f"{getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}")
    if a.shape[1] != channels:
        raise ValueError(f"{what} has {a.shape[1]} channels, the state was built for {channels}")
