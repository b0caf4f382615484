"""Loudness meter (ITU-R BS.1770-4, EBU R128 / Tech 3341 / Tech 3342), block-streaming, numba.

One kernel per block: K-weighting (two biquads designed for the actual rate from the analog
prototypes, as libebur128 does), squared and summed with the channel weights into 10 ms
sub-block energies; a ring of 3 s of sub-blocks gives the momentary (400 ms) and short-term
(3 s) loudness every sub-block (10 ms; a 100 ms grid would miss Tech 3341 case 13 by 0.6 LU);
every 100 ms the full 400 ms block goes to the integrated-loudness histogram and the full 3 s
block to the loudness-range histogram. Sample peak and true peak (dsp/true_peak.py) per channel.

Hours of audio in constant memory: gating blocks are kept as histograms of HIST_BIN_LU-wide
loudness bins holding both a count and the sum of the blocks' energies, so the absolute-gated
mean (and so the relative gate) is exact and the gated means are exact apart from the one bin
the relative gate falls in; LRA percentiles are exact to the bin width.

Conventions: the readings (momentary, short-term) are those of the last completed 10 ms
sub-block; before the first 400 ms / 3 s they cover the audio so far with silence before it.
Gating blocks are full windows only, starting when the first 400 ms have been seen (as
libebur128). The short-term blocks for LRA are taken every 100 ms. A block holding NaN or Inf is
counted in bad_blocks, not measured (nor its duration), and the filter and true-peak memories
are reset. Silence gives -inf (to_dict() gives None), never NaN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numba
import numpy as np
from echoel.dsp.true_peak import FAST, TruePeakState, check_block, true_peak_block

LUFS_OFFSET = -0.691  # BS.1770: L = -0.691 + 10 log10(sum G_i z_i)
ABSOLUTE_GATE_LUFS = -70.0
RELATIVE_GATE_LU = -10.0  # integrated loudness
LRA_RELATIVE_GATE_LU = -20.0  # Tech 3342
LRA_LOW_PERCENTILE = 0.10
LRA_HIGH_PERCENTILE = 0.95
HIST_BIN_LU = 0.005
HIST_MIN_LUFS = ABSOLUTE_GATE_LUFS
HIST_BINS = 22000  # -70 .. +40 LUFS; louder blocks go to the top bin (their energy stays exact)
SUBS_PER_100MS_MAX = 10  # 10 ms sub-blocks where 100 ms allows it
DENORMAL = 1e-30

# BS.1770 channel weights by layout (channel order L R C LFE Ls Rs)
LAYOUT_WEIGHTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),  # mono
    2: (1.0, 1.0),  # L R
    3: (1.0, 1.0, 1.0),  # L R C
    5: (1.0, 1.0, 1.0, 1.41, 1.41),  # L R C Ls Rs (5.0)
    6: (1.0, 1.0, 1.0, 0.0, 1.41, 1.41),  # L R C LFE Ls Rs (5.1, LFE excluded)
}

# dims (int64): fixed sizes
D_SUB, D_K, D_TP = 0, 1, 2
# ctr (int64): running counters
C_POS, C_RING, C_SUBS, C_BAD, C_FRAMES = 0, 1, 2, 3, 4
# val (float64): running values (energies are weighted mean squares)
V_ACC, V_MOM, V_ST, V_MAX_MOM, V_MAX_ST = 0, 1, 2, 3, 4
# hist[which, field, bin]
H_INT, H_LRA = 0, 1
H_COUNT, H_ENERGY = 0, 1


def k_weighting(rate: int) -> np.ndarray:
    """K-weighting biquads for `rate`: float64[2, 5] rows (b0, b1, b2, a1, a2).

    Row 0 the high-shelf ("pre-filter"), row 1 the RLB high-pass, both from the analog
    prototypes of BS.1770 by the bilinear transform (libebur128's parametrisation); at 48 kHz
    they are the coefficients printed in BS.1770-4.
    """
    if rate < 8000:
        raise ValueError(f"loudness sample rate {rate} Hz: must be at least 8000 Hz")
    out = np.zeros((2, 5))
    f0, gain_db, q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
    k = math.tan(math.pi * f0 / rate)
    vh = 10.0 ** (gain_db / 20.0)
    vb = vh**0.4996667741545416
    a0 = 1.0 + k / q + k * k
    out[0] = ((vh + vb * k / q + k * k) / a0, 2.0 * (k * k - vh) / a0,
              (vh - vb * k / q + k * k) / a0, 2.0 * (k * k - 1.0) / a0,
              (1.0 - k / q + k * k) / a0)
    f0, q = 38.13547087602444, 0.5003270373238773
    k = math.tan(math.pi * f0 / rate)
    a0 = 1.0 + k / q + k * k
    out[1] = (1.0, -2.0, 1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0)
    return out


def channel_weights(channels: int) -> np.ndarray:
    """BS.1770 weights for 1 (mono), 2 (L R), 3 (L R C), 5 (L R C Ls Rs), 6 (+LFE) channels."""
    if channels not in LAYOUT_WEIGHTS:
        raise ValueError(f"loudness channels {channels}: no standard layout; allowed "
                         f"{sorted(LAYOUT_WEIGHTS)} or pass weights= explicitly")
    return np.array(LAYOUT_WEIGHTS[channels])


def subblocks_per_100ms(rate: int) -> int:
    """Sub-blocks per 100 ms: the largest k <= 10 with a whole number of samples each."""
    if rate % 10:
        raise ValueError(f"loudness sample rate {rate} Hz: 100 ms must be a whole number of "
                         "samples (rate divisible by 10, e.g. 44100, 48000, 96000)")
    per100 = rate // 10
    for k in range(SUBS_PER_100MS_MAX, 0, -1):
        if per100 % k == 0:
            return k
    return 1


@numba.njit(nogil=True, cache=True, fastmath=FAST, inline="always")
def _lufs(energy):
    return LUFS_OFFSET + 10.0 * math.log10(energy) if energy > 0.0 else -math.inf


@numba.njit(nogil=True, cache=True, fastmath=FAST, inline="always")
def _add_to_hist(hist, which, energy):
    """Count one gating block of `energy` in histogram `which` if above the absolute gate."""
    level = _lufs(energy)
    if level > ABSOLUTE_GATE_LUFS:
        b = int((level - HIST_MIN_LUFS) / HIST_BIN_LU)
        nb = hist.shape[2]
        if b >= nb:
            b = nb - 1
        hist[which, H_COUNT, b] += 1.0
        hist[which, H_ENERGY, b] += energy


@numba.njit(nogil=True, cache=True, fastmath=FAST, inline="always")
def _window(ring, end, count):
    """Sum of the `count` ring entries before index `end` (wrapping)."""
    n = ring.shape[0]
    s = 0.0
    i = end - count
    if i >= 0:
        for j in range(i, end):
            s += ring[j]
    else:
        for j in range(i + n, n):
            s += ring[j]
        for j in range(end):
            s += ring[j]
    return s


@numba.njit(nogil=True, cache=True, fastmath=FAST, inline="always")
def _end_subblock(dims, ctr, val, ring, hist):
    """A 10 ms sub-block is complete: update readings, maxima and, every 100 ms, the gates."""
    sub = dims[D_SUB]
    k = dims[D_K]
    ri = ctr[C_RING]
    ring[ri] = val[V_ACC]
    ri += 1
    if ri == ring.shape[0]:
        ri = 0
    ctr[C_RING] = ri
    subs = ctr[C_SUBS] + 1
    ctr[C_SUBS] = subs
    nm = 4 * k
    ns = 30 * k
    em = _window(ring, ri, nm) / (nm * sub)
    es = _window(ring, ri, ns) / (ns * sub)
    val[V_MOM] = em
    val[V_ST] = es
    if em > val[V_MAX_MOM]:
        val[V_MAX_MOM] = em
    if es > val[V_MAX_ST]:
        val[V_MAX_ST] = es
    if subs % k == 0:
        if subs >= nm:
            _add_to_hist(hist, H_INT, em)
        if subs >= ns:
            _add_to_hist(hist, H_LRA, es)
    val[V_ACC] = 0.0


@numba.njit(nogil=True, cache=True, fastmath=FAST, inline="always")
def _flush(v):
    return v if abs(v) > DENORMAL else 0.0


@numba.njit(nogil=True, cache=True, fastmath=FAST, inline="always")
def _kweight_pair(x, start, stop, c, kcoef, zf, weights, peaks):
    """K-weight channels c and c + 1 over x[start:stop]: their weighted energy; updates the
    biquad states zf and the sample peaks peaks[0]."""
    b0, b1, b2, a1, a2 = kcoef[0, 0], kcoef[0, 1], kcoef[0, 2], kcoef[0, 3], kcoef[0, 4]
    c0, c1, c2, d1, d2 = kcoef[1, 0], kcoef[1, 1], kcoef[1, 2], kcoef[1, 3], kcoef[1, 4]
    pa, pb = peaks[0, c], peaks[0, c + 1]
    s1, s2, t1, t2 = zf[c, 0], zf[c, 1], zf[c, 2], zf[c, 3]
    r1, r2, u1, u2 = zf[c + 1, 0], zf[c + 1, 1], zf[c + 1, 2], zf[c + 1, 3]
    ea = 0.0
    eb = 0.0
    for n in range(start, stop):
        xa = float(x[n, c])
        xb = float(x[n, c + 1])
        pa = max(pa, abs(xa))
        pb = max(pb, abs(xb))
        y = b0 * xa + s1  # high shelf, transposed direct form II
        s1 = b1 * xa - a1 * y + s2
        s2 = b2 * xa - a2 * y
        z = c0 * y + t1  # RLB high-pass
        t1 = c1 * y - d1 * z + t2
        t2 = c2 * y - d2 * z
        ea += z * z
        v = b0 * xb + r1
        r1 = b1 * xb - a1 * v + r2
        r2 = b2 * xb - a2 * v
        q = c0 * v + u1
        u1 = c1 * v - d1 * q + u2
        u2 = c2 * v - d2 * q
        eb += q * q
    peaks[0, c], peaks[0, c + 1] = pa, pb
    zf[c, 0], zf[c, 1], zf[c, 2], zf[c, 3] = _flush(s1), _flush(s2), _flush(t1), _flush(t2)
    zf[c + 1, 0], zf[c + 1, 1] = _flush(r1), _flush(r2)
    zf[c + 1, 2], zf[c + 1, 3] = _flush(u1), _flush(u2)
    return weights[c] * ea + weights[c + 1] * eb


@numba.njit(nogil=True, cache=True, fastmath=FAST, inline="always")
def _kweight_one(x, start, stop, c, kcoef, zf, weights, peaks):
    """_kweight_pair for a single (last, odd) channel."""
    b0, b1, b2, a1, a2 = kcoef[0, 0], kcoef[0, 1], kcoef[0, 2], kcoef[0, 3], kcoef[0, 4]
    c0, c1, c2, d1, d2 = kcoef[1, 0], kcoef[1, 1], kcoef[1, 2], kcoef[1, 3], kcoef[1, 4]
    pa = peaks[0, c]
    s1, s2, t1, t2 = zf[c, 0], zf[c, 1], zf[c, 2], zf[c, 3]
    ea = 0.0
    for n in range(start, stop):
        xa = float(x[n, c])
        pa = max(pa, abs(xa))
        y = b0 * xa + s1
        s1 = b1 * xa - a1 * y + s2
        s2 = b2 * xa - a2 * y
        z = c0 * y + t1
        t1 = c1 * y - d1 * z + t2
        t2 = c2 * y - d2 * z
        ea += z * z
    peaks[0, c] = pa
    zf[c, 0], zf[c, 1], zf[c, 2], zf[c, 3] = _flush(s1), _flush(s2), _flush(t1), _flush(t2)
    return weights[c] * ea


@numba.njit(nogil=True, cache=True, fastmath=FAST)
def meter_block(x, kcoef, weights, zf, dims, ctr, val, ring, hist, tp_phases, tp_hist, peaks):
    """Measure one block x float32/float64[frames, channels] (C-contiguous); no allocation.

    kcoef: float64[2, 5] (k_weighting); weights: float64[channels]; zf: float64[channels, 4]
    biquad states; dims/ctr: int64 (D_*, C_*); val: float64 (V_*); ring: float64[30 * k]
    sub-block energies; hist: float64[2, 2, HIST_BINS]; tp_phases/tp_hist: TruePeakState
    fields (used when dims[D_TP]); peaks: float64[2, channels], row 0 sample peak, row 1 true
    peak (linear). A block with NaN/Inf is counted in ctr[C_BAD] and resets zf and tp_hist.
    """
    frames, nch = x.shape
    if frames == 0:
        return
    flat = x.reshape(frames * nch)  # a view (x is C-contiguous): one long vectorised loop
    probe = 0.0
    for i in range(frames * nch):
        probe += flat[i] * 0.0  # NaN as soon as one sample is NaN or +-Inf
    if not math.isfinite(probe):
        ctr[C_BAD] += 1
        zf[:, :] = 0.0
        tp_hist[:, :] = 0.0
        return
    sub = dims[D_SUB]
    start = 0
    while start < frames:
        seg = min(sub - ctr[C_POS], frames - start)
        stop = start + seg
        acc = 0.0
        c = 0
        while c < nch:  # channels two at a time: two independent recursions keep the CPU busy
            if c + 1 < nch:
                acc += _kweight_pair(x, start, stop, c, kcoef, zf, weights, peaks)
                c += 2
            else:
                acc += _kweight_one(x, start, stop, c, kcoef, zf, weights, peaks)
                c += 1
        if dims[D_TP] != 0:  # while the segment is in cache
            true_peak_block(x[start:stop], tp_phases, tp_hist, peaks[1])
        val[V_ACC] += acc
        ctr[C_POS] += seg
        if ctr[C_POS] == sub:
            ctr[C_POS] = 0
            _end_subblock(dims, ctr, val, ring, hist)
        start = stop
    ctr[C_FRAMES] += frames


@numba.njit(nogil=True, cache=True, fastmath=FAST)
def _gated_sums(hist, which, threshold):
    """(count, energy) of the blocks louder than `threshold` LUFS in histogram `which`.

    Bins wholly above count fully; the bin the threshold falls in counts when its mean block
    energy is above the threshold's energy (the only approximation).
    """
    nb = hist.shape[2]
    cut = (threshold - HIST_MIN_LUFS) / HIST_BIN_LU
    first = math.floor(cut) if cut > -1.0 else -1
    e_thr = 10.0 ** ((threshold - LUFS_OFFSET) / 10.0)
    n = 0.0
    e = 0.0
    for b in range(max(first, 0), nb):
        cnt = hist[which, H_COUNT, b]
        if cnt == 0.0:
            continue
        if b == first and hist[which, H_ENERGY, b] / cnt <= e_thr:
            continue
        n += cnt
        e += hist[which, H_ENERGY, b]
    return n, e


@numba.njit(nogil=True, cache=True, fastmath=FAST)
def _gated_mean(hist, which, relative_lu):
    """(relative threshold LUFS, gated mean energy, gated count) of histogram `which`."""
    n_abs, e_abs = _gated_sums(hist, which, -math.inf)
    if n_abs == 0.0:
        return -math.inf, 0.0, 0.0
    threshold = _lufs(e_abs / n_abs) + relative_lu
    n, e = _gated_sums(hist, which, threshold)
    return threshold, (e / n if n > 0.0 else 0.0), n


@numba.njit(nogil=True, cache=True, fastmath=FAST)
def _rank_level(hist, which, threshold, rank):
    """Loudness of the gated block of 0-based `rank` in ascending order (its bin's mean)."""
    nb = hist.shape[2]
    cut = (threshold - HIST_MIN_LUFS) / HIST_BIN_LU
    first = math.floor(cut) if cut > -1.0 else -1
    e_thr = 10.0 ** ((threshold - LUFS_OFFSET) / 10.0)
    seen = 0.0
    for b in range(max(first, 0), nb):
        cnt = hist[which, H_COUNT, b]
        if cnt == 0.0:
            continue
        if b == first and hist[which, H_ENERGY, b] / cnt <= e_thr:
            continue
        seen += cnt
        if seen > rank:
            return _lufs(hist[which, H_ENERGY, b] / cnt)
    return -math.inf


def integrated_from_hist(hist: np.ndarray) -> tuple[float, float]:
    """(integrated loudness LUFS, relative gate LUFS); -inf when nothing passes the gates."""
    threshold, energy, _ = _gated_mean(hist, H_INT, RELATIVE_GATE_LU)
    return float(_lufs(energy)), float(threshold)


def lra_from_hist(hist: np.ndarray) -> tuple[float, float, float]:
    """(LRA LU, low LUFS, high LUFS) per Tech 3342: nearest-rank 10th and 95th percentiles of
    the gated short-term blocks; (0, -inf, -inf) when none pass the gates."""
    threshold, _, n = _gated_mean(hist, H_LRA, LRA_RELATIVE_GATE_LU)
    if n == 0.0:
        return 0.0, -math.inf, -math.inf
    low = _rank_level(hist, H_LRA, threshold, math.floor((n - 1) * LRA_LOW_PERCENTILE + 0.5))
    high = _rank_level(hist, H_LRA, threshold, math.floor((n - 1) * LRA_HIGH_PERCENTILE + 0.5))
    return float(high - low), float(low), float(high)


@dataclass(frozen=True)
class LoudnessResult:
    """A meter's readings. Levels in LUFS / dBFS / dBTP; -inf for silence (never NaN)."""

    momentary: float
    short_term: float
    integrated: float
    lra: float
    lra_low: float
    lra_high: float
    relative_gate: float
    max_momentary: float
    max_short_term: float
    true_peak_dbtp: tuple[float, ...] | None  # None when the meter runs without true peak
    true_peak_max_dbtp: float | None
    sample_peak_dbfs: tuple[float, ...]
    sample_peak_max_dbfs: float
    duration_s: float
    bad_blocks: int

    def to_dict(self) -> dict:
        """Plain JSON-ready dict; -inf (silence, nothing measured) becomes None."""
        def clean(v):
            if isinstance(v, tuple):
                return [clean(i) for i in v]
            if isinstance(v, float) and math.isinf(v) and v < 0:
                return None
            return v

        return {k: clean(v) for k, v in asdict(self).items()}


def _db(linear: np.ndarray) -> tuple[float, ...]:
    with np.errstate(divide="ignore"):
        return tuple(float(v) for v in 20.0 * np.log10(linear))


class LoudnessMeter:
    """EBU R128 meter for `channels` at `rate`, with preallocated state; feed it with process().

    weights: BS.1770 channel weights (default from the channel count: mono, stereo, L R C,
    5.0, 5.1 in the order L R C LFE Ls Rs). true_peak: also measure the true peak (4x/2x).
    """

    def __init__(self, channels: int, rate: int, weights: np.ndarray | None = None,
                 true_peak: bool = True) -> None:
        if not isinstance(channels, int | np.integer) or channels < 1:
            raise ValueError(f"loudness channels {channels!r}: must be an integer >= 1")
        if not isinstance(rate, int | np.integer):
            raise ValueError(f"loudness sample rate {rate!r}: must be an integer number of Hz")
        self.channels = int(channels)
        self.rate = int(rate)
        if weights is None:
            self.weights = channel_weights(self.channels)
        else:
            self.weights = np.array(weights, dtype=np.float64).reshape(-1)
            if self.weights.shape != (self.channels,) or not np.all(self.weights >= 0.0):
                raise ValueError(f"loudness weights {weights!r}: need {self.channels} "
                                 "non-negative numbers, one a channel")
        self.kcoef = k_weighting(self.rate)
        k = subblocks_per_100ms(self.rate)
        self.dims = np.array([self.rate // 10 // k, k, 1 if true_peak else 0], dtype=np.int64)
        self.zf = np.zeros((self.channels, 4))
        self.ctr = np.zeros(5, dtype=np.int64)
        self.val = np.zeros(5)
        self.ring = np.zeros(30 * k)
        self.hist = np.zeros((2, 2, HIST_BINS))
        self.tp = TruePeakState(self.channels, self.rate)
        self.peaks = np.zeros((2, self.channels))

    def reset(self) -> None:
        """Start a new measurement (all readings, gates, peaks and filter memories)."""
        for a in (self.zf, self.ctr, self.val, self.ring, self.hist, self.peaks):
            a[...] = 0
        self.tp.reset()

    def process(self, block: np.ndarray) -> None:
        """Measure block float32/float64[frames, channels] (any number of frames)."""
        check_block(block, self.channels, "loudness input")
        if not block.flags.c_contiguous:  # e.g. a channel-reversed view: the kernel reads rows
            block = np.ascontiguousarray(block)
        meter_block(block, self.kcoef, self.weights, self.zf, self.dims, self.ctr, self.val,
                    self.ring, self.hist, self.tp.phases, self.tp.hist, self.peaks)

    @property
    def momentary(self) -> float:
        """Momentary loudness (LUFS) of the 400 ms up to the last completed 10 ms sub-block."""
        return float(_lufs(self.val[V_MOM]))

    @property
    def short_term(self) -> float:
        """Short-term loudness (LUFS) of the 3 s up to the last completed 10 ms sub-block."""
        return float(_lufs(self.val[V_ST]))

    @property
    def bad_blocks(self) -> int:
        """Blocks rejected for NaN/Inf."""
        return int(self.ctr[C_BAD])

    def result(self) -> LoudnessResult:
        """The readings now; the true peak includes the filter's tail as if the input ended."""
        integrated, gate = integrated_from_hist(self.hist)
        lra, low, high = lra_from_hist(self.hist)
        tp = _db(self.tp_tail()) if self.dims[D_TP] else None
        sp = _db(self.peaks[0])
        return LoudnessResult(
            momentary=float(_lufs(self.val[V_MOM])),
            short_term=float(_lufs(self.val[V_ST])),
            integrated=integrated,
            lra=lra,
            lra_low=low,
            lra_high=high,
            relative_gate=gate,
            max_momentary=float(_lufs(self.val[V_MAX_MOM])),
            max_short_term=float(_lufs(self.val[V_MAX_ST])),
            true_peak_dbtp=tp,
            true_peak_max_dbtp=max(tp) if tp is not None else None,
            sample_peak_dbfs=sp,
            sample_peak_max_dbfs=max(sp),
            duration_s=int(self.ctr[C_FRAMES]) / self.rate,
            bad_blocks=self.bad_blocks,
        )

    def tp_tail(self) -> np.ndarray:
        """Linear true peak per channel including the last group-delay samples (state kept)."""
        hist = self.tp.hist.copy()
        peak = self.peaks[1].copy()
        true_peak_block(np.zeros((self.tp.delay + 1, self.channels)), self.tp.phases, hist, peak)
        return peak


def measure(x: np.ndarray, rate: int, weights: np.ndarray | None = None,
            true_peak: bool = True) -> LoudnessResult:
    """Measure a whole signal (1-D mono or [frames, channels]) in one call."""
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"loudness input: {a.ndim}-D array of shape {a.shape}; expected 1-D "
                         "mono or 2-D [frames, channels]")
    meter = LoudnessMeter(a.shape[1], rate, weights, true_peak)
    meter.process(a)
    return meter.result()
