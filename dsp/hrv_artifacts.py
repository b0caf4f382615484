"""Artifact detection and correction on an RR-interval series, beat by beat (numba, no I/O).

Method: J. A. Lipponen and M. P. Tarvainen, "A robust algorithm for heart rate variability
time series artefact correction using novel beat classification", Journal of Medical
Engineering & Technology 43(3):173-181, 2019 (doi:10.1080/03091902.2019.1640306); the
method of Kubios HRV and of NeuroKit2's `signal_fixpeaks(method="Kubios")`, whose constants
and decision flow (its `_find_artifacts`) this follows: dRR (successive differences) and mRR
(deviation from an 11-beat median, negative side doubled) are normalised by thresholds of
alpha = 5.2 times the quartile deviation of their magnitudes over 91 beats; a beat is
"ectopic" in the (dRR, S12) subspace (c1 = 0.13, c2 = 0.17), "long" or "short" in the
(dRR, S22) subspace or by |mRR| > 3, and a long/short beat is a "missed" beat when half its
interval fits the median, an "extra" beat when it plus the next fits the median.

Streaming: beat j is classified when beat j + lag arrives (lag >= 3: the flow reads dRR up to
j + 3 with its look-ahead); the 91-beat and 11-beat windows are centred on j and clipped to
the beats received, which is NeuroKit2's rule at the end of a series (pandas rolling,
center=True, min_periods=1): the classification of beat j equals the offline method run on
the series up to beat j + lag. With lag = 5 (default) the median window is complete.

The flow classifies beat j from dRR at j - 1 .. j + 2 and then looks one beat ahead, to
correct the right beat: a long/short call on beat j yields to a missed or extra call on beat
j + 1 (whose interval made beat j's large dRR); when beat j or j + 1 is called ectopic or
long/short, the misplaced beat is the one whose two intervals deviate in opposite directions
and add up best to their neighbours (a beat out of place shortens one interval and lengthens
the next by as much): the beat ending interval j, or else the one ending j + 1 (then beat j is
normal and beat j + 1 is corrected at its turn). NeuroKit2 classifies the whole series first
and then moves every flagged peak (around one premature beat it often flags two).

Correction, on the RR series (each keeps the total time, so beat times stay true):
- missed (a beat lost inside interval j): interval j is split in two halves;
- extra (a false beat ends interval j): intervals j and j + 1 are merged;
- ectopic, long/short (the beat ending interval j misplaced): intervals j and j + 1 both
  become their mean (the beat moved half-way between its neighbours).

Intervals in ms. An interval that is not finite or outside [min_rr_ms, max_rr_ms] is not
classified: the caller treats it as a gap (restart), see `ArtifactCorrector.push`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

NORMAL, ECTOPIC, MISSED, EXTRA, LONGSHORT = 0, 1, 2, 3, 4
KIND_NAMES = ("normal", "ectopic", "missed", "extra", "longshort")
HIST = 192  # raw intervals kept (>= 45 + 5 back, lag ahead, and slack for the shift)
KEEP = 96  # intervals kept when the history is full and shifted

# int state slots
I_N, I_PREV_TRIGGER, I_OVERRIDE, I_TOTAL = 0, 1, 2, 3
I_COUNT = 4  # I_COUNT + kind: beats classified as each kind
N_ISTATE = I_COUNT + 5
# float state slots
F_OVERRIDE = 0
# parameter slots
P_ALPHA, P_C1, P_C2, P_WIDTH, P_MEDFILT, P_LAG = range(6)
# override modes
OV_NONE, OV_VALUE, OV_SKIP = 0, 1, 2


@dataclass(frozen=True)
class ArtifactConfig:
    """Constants of Lipponen & Tarvainen (2019), and the streaming delay in beats."""

    alpha: float = 5.2
    c1: float = 0.13
    c2: float = 0.17
    window_width: int = 91
    medfilt_order: int = 11
    lag: int = 5
    min_rr_ms: float = 120.0  # shorter: not a beat at all (an extra beat can be short)
    max_rr_ms: float = 3000.0  # 20 bpm

    def check(self) -> None:
        """Raise ValueError naming a constant out of its allowed range."""
        if not 3 <= self.lag <= 20:
            raise ValueError(f"artifact lag = {self.lag}: allowed 3 to 20 beats")
        if not 5 <= self.window_width <= 2 * (KEEP - 20) + 1 or self.window_width % 2 == 0:
            raise ValueError(f"artifact window_width = {self.window_width}: allowed an odd "
                             f"number of beats from 5 to {2 * (KEEP - 20) + 1}")
        if not 3 <= self.medfilt_order <= 21 or self.medfilt_order % 2 == 0:
            raise ValueError(f"artifact medfilt_order = {self.medfilt_order}: allowed an odd "
                             "number of beats from 3 to 21")
        if not (self.alpha > 0 and self.c1 >= 0 and self.c2 >= 0):
            raise ValueError(f"artifact alpha/c1/c2 = {self.alpha}/{self.c1}/{self.c2}: "
                             "allowed positive numbers")
        if not 0 < self.min_rr_ms < self.max_rr_ms:
            raise ValueError(f"artifact RR range {self.min_rr_ms}..{self.max_rr_ms} ms: "
                             "allowed 0 < min < max")


@numba.njit(nogil=True, cache=True)
def _quartile_dev(v, m):
    """(q3 - q1) / 2 of v[:m] with linear interpolation (sorts v[:m] in place)."""
    w = v[:m]
    w.sort()
    if m == 1:
        return 0.0
    p1 = 0.25 * (m - 1)
    p3 = 0.75 * (m - 1)
    i1 = int(p1)
    i3 = int(p3)
    q1 = w[i1] + (w[min(i1 + 1, m - 1)] - w[i1]) * (p1 - i1)
    q3 = w[i3] + (w[min(i3 + 1, m - 1)] - w[i3]) * (p3 - i3)
    return 0.5 * (q3 - q1)


@numba.njit(nogil=True, cache=True)
def _median_at(x, n, k, half, scratch):
    lo = max(0, k - half)
    hi = min(n, k + half + 1)
    m = hi - lo
    for i in range(m):
        scratch[i] = x[lo + i]
    w = scratch[:m]
    w.sort()
    if m % 2 == 1:
        return w[m // 2]
    return 0.5 * (w[m // 2 - 1] + w[m // 2])


@numba.njit(nogil=True, cache=True)
def _drr(x, k):
    return x[k] - x[k - 1] if k >= 1 else 0.0


@numba.njit(nogil=True, cache=True)
def _th1(x, n, k, half, alpha, scratch):
    lo = max(1, k - half)  # interval 0 has no predecessor
    hi = min(n, k + half + 1)
    m = 0
    for i in range(lo, hi):
        scratch[m] = abs(x[i] - x[i - 1])
        m += 1
    if m == 0:
        return 0.0
    return alpha * _quartile_dev(scratch, m)


@numba.njit(nogil=True, cache=True)
def _mrr(x, n, k, mhalf, scratch):
    d = x[k] - _median_at(x, n, k, mhalf, scratch)
    return 2.0 * d if d < 0.0 else d


@numba.njit(nogil=True, cache=True)
def _th2(x, n, k, half, mhalf, alpha, scratch, scratch2):
    lo = max(0, k - half)
    hi = min(n, k + half + 1)
    m = 0
    for i in range(lo, hi):
        scratch[m] = abs(_mrr(x, n, i, mhalf, scratch2))
        m += 1
    return alpha * _quartile_dev(scratch, m)


@numba.njit(nogil=True, cache=True)
def _norm(v, th):
    return v / th if th != 0.0 else math.nan


@numba.njit(nogil=True, cache=True)
def classify(x, n, j, prev_trigger, par, scratch, scratch2, d):
    """Kind of beat j in x[:n] (j + 2 < n), and whether it triggers the next beat's check.

    prev_trigger: beat j - 1 was long/short-checked on its own dRR (NeuroKit2's candidate
    rule: then beat j is checked too when |dRR_j| < |dRR_j+1|). scratch, scratch2: float64
    work arrays of at least window_width and medfilt_order; d: float64[4].
    """
    half = int(par[P_WIDTH]) // 2
    mhalf = int(par[P_MEDFILT]) // 2
    alpha, c1, c2 = par[P_ALPHA], par[P_C1], par[P_C2]
    # normalised dRR at j-1, j, j+1, j+2 (reflected at the start, as NeuroKit2 pads)
    for o in range(4):
        k = j - 1 + o
        if k < 0:
            k = j + 1
        d[o] = _norm(_drr(x, k), _th1(x, n, k, half, alpha, scratch))
    dj = d[1]
    if not math.isfinite(dj):
        return NORMAL, False
    if dj > 0.0:
        s12 = max(d[0], d[2])
    elif dj < 0.0:
        s12 = min(d[0], d[2])
    else:
        s12 = 0.0
    if dj >= 0.0:
        s22 = min(d[2], d[3])
    else:
        s22 = max(d[2], d[3])
    trigger = abs(dj) > 1.0
    if trigger:
        if (dj > 1.0 and s12 < -c1 * dj - c2) or (dj < -1.0 and s12 > -c1 * dj + c2):
            return ECTOPIC, False
    elif not (prev_trigger and abs(dj) < abs(d[2])):
        return NORMAL, False
    th2 = _th2(x, n, j, half, mhalf, alpha, scratch, scratch2)
    mj = _norm(_mrr(x, n, j, mhalf, scratch2), th2)
    eq3 = dj > 1.0 and s22 < -1.0
    eq4 = abs(mj) > 3.0
    eq5 = dj < -1.0 and s22 > 1.0
    if not (eq3 or eq4 or eq5):
        return NORMAL, trigger
    med = _median_at(x, n, j, mhalf, scratch2)
    eq6 = abs(x[j] / 2.0 - med) < th2
    eq7 = abs(x[j] + x[j + 1] - med) < th2
    if eq5 and eq7:
        return EXTRA, trigger
    if eq3 and eq6:
        return MISSED, trigger
    return LONGSHORT, trigger


@numba.njit(nogil=True, cache=True)
def _pair_error(x, j):
    """How well moving the beat ending interval j explains intervals j, j + 1: their sum
    against the sum of the intervals either side (inf unless they deviate in opposite
    directions from the neighbours' mean, and the sum misses by less than half the shift)."""
    before = x[j - 1] if j >= 1 else x[j + 2]
    outside = before + x[j + 2]
    m = 0.5 * outside
    err = abs(x[j] + x[j + 1] - outside)
    if (x[j] - m) * (x[j + 1] - m) >= 0.0 or err >= 0.5 * abs(x[j] - x[j + 1]):
        return math.inf
    return err


@numba.njit(nogil=True, cache=True)
def _misplaced(x, j, kind, nxt):
    """Which beat of a flagged pair is out of place: the one ending interval j (its kind,
    or the next beat's if j was normal), or the one ending j + 1 (NORMAL: wait for it).

    A misplaced beat shortens one interval and lengthens its neighbour by as much: their sum
    is what two normal intervals would be. The pair (j, j + 1) is chosen over (j + 1, j + 2)
    when its sum fits its neighbours better (x[:j + 4] is read)."""
    ea = _pair_error(x, j)
    eb = _pair_error(x, j + 1)
    if ea < math.inf and ea <= eb:
        return kind if kind != NORMAL else nxt
    if eb < math.inf:
        return NORMAL
    return kind


@numba.njit(nogil=True, cache=True)
def _release(x, n, j, ist, fst, par, scratch, scratch2, d, out):
    """Classify and correct beat j; writes 0 to 2 corrected intervals to out, returns how many."""
    mode = ist[I_OVERRIDE]
    ist[I_OVERRIDE] = OV_NONE
    if mode == OV_SKIP:
        ist[I_PREV_TRIGGER] = 0
        return 0
    if mode == OV_VALUE:
        ist[I_PREV_TRIGGER] = 0
        out[0] = fst[F_OVERRIDE]
        return 1
    if j + 2 < n:
        kind, trig = classify(x, n, j, ist[I_PREV_TRIGGER] != 0, par, scratch, scratch2, d)
        if j + 3 < n and kind != MISSED and kind != EXTRA:
            nxt, _ = classify(x, n, j + 1, trig, par, scratch, scratch2, d)
            if nxt == MISSED or nxt == EXTRA:
                if kind == LONGSHORT:
                    kind = NORMAL  # the next beat's artifact made this beat's large dRR
            elif kind != NORMAL or nxt != NORMAL:
                kind = _misplaced(x, j, kind, nxt)
    else:
        kind, trig = NORMAL, False
    ist[I_PREV_TRIGGER] = 1 if trig else 0
    ist[I_COUNT + kind] += 1
    ist[I_TOTAL] += 1
    if kind == MISSED:
        out[0] = 0.5 * x[j]
        out[1] = 0.5 * x[j]
        return 2
    if kind == EXTRA and j + 1 < n:
        out[0] = x[j] + x[j + 1]
        ist[I_OVERRIDE] = OV_SKIP
        return 1
    if (kind == ECTOPIC or kind == LONGSHORT) and j + 1 < n:
        m = 0.5 * (x[j] + x[j + 1])
        out[0] = m
        fst[F_OVERRIDE] = m
        ist[I_OVERRIDE] = OV_VALUE
        return 1
    out[0] = x[j]
    return 1


@numba.njit(nogil=True, cache=True)
def push_kernel(rr, x, ist, fst, par, scratch, scratch2, d, out):
    """Append one raw interval (ms) and release the corrected intervals of beat n-1-lag.

    x: float64[HIST] raw history; returns the count written to out (float64[2]).
    """
    n = ist[I_N]
    if n == x.shape[0]:
        drop = n - KEEP
        for i in range(KEEP):
            x[i] = x[i + drop]
        n = KEEP
    x[n] = rr
    n += 1
    ist[I_N] = n
    j = n - 1 - int(par[P_LAG])
    if j < 0:
        return 0
    return _release(x, n, j, ist, fst, par, scratch, scratch2, d, out)


@numba.njit(nogil=True, cache=True)
def flush_kernel(k, x, ist, fst, par, scratch, scratch2, d, out):
    """Release the k-th of the beats still held (k = 0 .. lag-1) at the end of a series."""
    n = ist[I_N]
    j = n - int(par[P_LAG]) + k
    if j < 0:
        return 0
    return _release(x, n, j, ist, fst, par, scratch, scratch2, d, out)


class ArtifactCorrector:
    """Streaming Lipponen & Tarvainen (2019) classification and correction of RR intervals."""

    def __init__(self, config: ArtifactConfig | None = None) -> None:
        self.config = config or ArtifactConfig()
        self.config.check()
        c = self.config
        self.par = np.array([c.alpha, c.c1, c.c2, c.window_width, c.medfilt_order, c.lag],
                            np.float64)
        self.x = np.zeros(HIST, np.float64)
        self.ist = np.zeros(N_ISTATE, np.int64)
        self.fst = np.zeros(1, np.float64)
        self.scratch = np.zeros(c.window_width, np.float64)
        self.scratch2 = np.zeros(c.medfilt_order, np.float64)
        self.d = np.zeros(4, np.float64)
        self.out = np.zeros(2, np.float64)
        self.invalid = 0  # intervals refused (not finite or outside the RR range)

    def valid(self, rr_ms: float) -> bool:
        """True if an interval can enter the series (finite, inside the RR range)."""
        c = self.config
        return math.isfinite(rr_ms) and c.min_rr_ms <= rr_ms <= c.max_rr_ms

    def push(self, rr_ms: float) -> int:
        """Add one raw interval; returns how many corrected intervals are now in `out`.

        An invalid interval is counted in `invalid`, resets the detector (the caller restarts
        its windows: a gap) and returns -1.
        """
        if not self.valid(rr_ms):
            self.invalid += 1
            self.reset()
            return -1
        return push_kernel(rr_ms, self.x, self.ist, self.fst, self.par, self.scratch,
                           self.scratch2, self.d, self.out)

    def flush(self) -> list[float]:
        """Release the beats still held back (end of a recording); then reset."""
        got: list[float] = []
        for k in range(int(self.par[P_LAG])):
            m = flush_kernel(k, self.x, self.ist, self.fst, self.par, self.scratch,
                             self.scratch2, self.d, self.out)
            got.extend(float(v) for v in self.out[:m])
        self.reset(keep_counts=True)
        return got

    def reset(self, keep_counts: bool = True) -> None:
        """Forget the history (after a gap); the per-kind counts are kept unless told."""
        counts = self.ist[I_TOTAL:].copy()
        self.ist[:] = 0
        if keep_counts:
            self.ist[I_TOTAL:] = counts

    @property
    def counts(self) -> dict[str, int]:
        """Beats classified so far, per kind (normal included)."""
        return {name: int(self.ist[I_COUNT + k]) for k, name in enumerate(KIND_NAMES)}

    @property
    def corrected(self) -> int:
        """Beats classified as artifacts (and corrected) so far."""
        return int(self.ist[I_COUNT + 1:I_COUNT + 5].sum())


def correct_rr(rr_ms: np.ndarray, config: ArtifactConfig | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Offline: (corrected intervals, kind per input interval) of a whole series.

    The kinds use the streaming classification (windows clipped at lag beats ahead).
    """
    rr = np.asarray(rr_ms, dtype=np.float64)
    if rr.ndim != 1:
        raise ValueError(f"RR series: shape {rr.shape}: allowed one dimension (ms per beat)")
    ac = ArtifactCorrector(config)
    out: list[float] = []
    kinds = np.zeros(rr.shape[0], np.int8)
    before = np.zeros(5, np.int64)
    lag = ac.config.lag
    for i, v in enumerate(rr):
        m = ac.push(float(v))
        if m < 0:
            raise ValueError(f"RR series: interval {i} = {v} ms: allowed finite values from "
                             f"{ac.config.min_rr_ms:g} to {ac.config.max_rr_ms:g} ms")
        out.extend(float(a) for a in ac.out[:m])
        now = ac.ist[I_COUNT:I_COUNT + 5]
        changed = np.nonzero(now != before)[0]
        if changed.size and i - lag >= 0:
            kinds[i - lag] = changed[0]
        before = now.copy()
    n = rr.shape[0]
    for k in range(lag):
        m = flush_kernel(k, ac.x, ac.ist, ac.fst, ac.par, ac.scratch, ac.scratch2, ac.d,
                         ac.out)
        out.extend(float(a) for a in ac.out[:m])
        now = ac.ist[I_COUNT:I_COUNT + 5]
        changed = np.nonzero(now != before)[0]
        j = n - lag + k
        if changed.size and j >= 0:
            kinds[j] = changed[0]
        before = now.copy()
    return np.array(out), kinds
