"""Heart-rate variability over a rolling window, updated on every beat (numba, no I/O).

The window holds the (artifact-corrected) RR intervals whose beats fall in the last
`window_s` seconds of the series' own time (the sum of the intervals since the last reset:
sensor notification times jitter, the intervals do not). On each update:

Time domain (Task Force of the ESC and NASPE, Circulation 93:1043-1065, 1996; NeuroKit2's
`hrv_time` definitions): mean NN, HR = 60000 / mean NN, SDNN (sample standard deviation),
RMSSD, pNN50 = count of |successive differences| > 50 ms / count of intervals * 100, and the
HR trend: least-squares slope of the instantaneous HR (60000 / RR) over time, in bpm/min.

Frequency domain, NeuroKit2 `hrv_frequency(psd_method="welch", interpolation_rate=4,
normalize=False)`'s recipe: the intervals (ms) resampled at 4 Hz (Kubios' rate) on a grid
from the first beat time, one sample past the last held at the last value, by a natural cubic
spline (NeuroKit2 uses a quadratic spline: tests state the tolerance this costs); the mean
removed; Welch's method with a periodic Hann window of half the series (nperseg = N/2,
nfft = 2 * nperseg, 50 % overlap, no detrend, density scaling, one-sided); bins below
NeuroKit2's min_frequency (4 * fs / N: two cycles per segment) dropped; band powers (ms^2) by
the trapezoid rule over the bins with lo <= f < hi: LF 0.04-0.15 Hz, HF 0.15-0.4 Hz. The
spectrum is evaluated only up to 0.5 Hz, bin by bin with Goertzel's recurrence (no FFT, no
allocation).

Coherence: the coherence ratio of McCraty, Atkinson, Tomasino and Bradley, "The coherent heart:
heart-brain interactions, psychophysiological coherence, and the emergence of system-wide
order", Integral Review 5(2):10-115, 2009: on the same power spectrum, the highest peak in
0.04-0.26 Hz; peak power = the power in a 0.030 Hz band centred on it; total power = the
power in 0.0033-0.4 Hz; coherence ratio = peak power / (total power - peak power). The band
powers here integrate the spectrum as a step function (each bin spanning +-half a bin), so the
0.030 Hz band is exact whatever the resolution. `coherence_norm` = peak / total (0..1), the
same figure on a bounded scale (ratio / (1 + ratio)).

Spectral figures are NaN until the window spans `min_span_s`; all figures are NaN on an
empty window. A gap (beats lost) or an invalid interval calls `reset`: windows restart, they
never bridge a gap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

# result slots
(R_N, R_SPAN_S, R_HR, R_MEAN_NN, R_SDNN, R_RMSSD, R_PNN50, R_HR_TREND, R_LF, R_HF, R_LFHF,
 R_COHERENCE, R_COHERENCE_NORM, R_PEAK_HZ) = range(14)
N_RESULTS = 14
RESULT_NAMES = ("beats", "span_s", "hr_bpm", "mean_nn_ms", "sdnn_ms", "rmssd_ms", "pnn50",
                "hr_trend", "lf_ms2", "hf_ms2", "lf_hf", "coherence", "coherence_norm",
                "coherence_peak_hz")
# parameter slots
(P_WINDOW, P_FS, P_MIN_SPAN, P_LF_LO, P_LF_HI, P_HF_LO, P_HF_HI, P_COH_LO, P_COH_HI,
 P_COH_WIDTH, P_TOT_LO, P_TOT_HI, P_F_MAX) = range(13)
# int state slots
I_HEAD, I_COUNT = 0, 1
# float state slots: time of the newest beat (s since reset)
F_T = 0
MAX_HR_BPM = 240.0  # sizes the ring: beats a window can hold


@dataclass(frozen=True)
class HrvConfig:
    """Window and bands (Hz); see the module docstring."""

    window_s: float = 60.0
    resample_hz: float = 4.0
    min_span_s: float = 30.0
    lf: tuple[float, float] = (0.04, 0.15)
    hf: tuple[float, float] = (0.15, 0.4)
    coherence_peak: tuple[float, float] = (0.04, 0.26)
    coherence_width_hz: float = 0.030
    total: tuple[float, float] = (0.0033, 0.4)
    max_freq_hz: float = 0.5  # highest bin computed (NeuroKit2's VHF top)

    def check(self) -> None:
        """Raise ValueError naming the setting that is out of its allowed range."""
        if not 10.0 <= self.window_s <= 600.0:
            raise ValueError(f"HRV window_s = {self.window_s}: allowed 10 to 600 s")
        if not 1.0 <= self.resample_hz <= 20.0:
            raise ValueError(f"HRV resample_hz = {self.resample_hz}: allowed 1 to 20 Hz")
        if not 0.0 < self.min_span_s <= self.window_s:
            raise ValueError(f"HRV min_span_s = {self.min_span_s}: allowed above 0, up to "
                             f"window_s ({self.window_s})")
        top = min(self.max_freq_hz, self.resample_hz / 2.0)
        for name, (lo, hi) in (("lf", self.lf), ("hf", self.hf),
                               ("coherence_peak", self.coherence_peak),
                               ("total", self.total)):
            if not 0.0 <= lo < hi <= top:
                raise ValueError(f"HRV band {name} = ({lo}, {hi}) Hz: allowed 0 <= lo < hi "
                                 f"<= {top:g} Hz")

    def params(self) -> np.ndarray:
        """The parameter array the kernels read."""
        return np.array([self.window_s, self.resample_hz, self.min_span_s, *self.lf, *self.hf,
                         *self.coherence_peak, self.coherence_width_hz, *self.total,
                         self.max_freq_hz], np.float64)


@numba.njit(nogil=True, cache=True)
def push_kernel(rr, ring_rr, ring_t, ist, fst, window_s):
    """Append one interval (ms) and drop the beats that left the window."""
    cap = ring_rr.shape[0]
    t = fst[F_T] + rr / 1000.0
    fst[F_T] = t
    head, count = ist[I_HEAD], ist[I_COUNT]
    pos = (head + count) % cap
    ring_rr[pos] = rr
    ring_t[pos] = t
    if count < cap:
        count += 1
    else:
        head = (head + 1) % cap
    while count > 1 and ring_t[head] <= t - window_s:
        head = (head + 1) % cap
        count -= 1
    ist[I_HEAD], ist[I_COUNT] = head, count


@numba.njit(nogil=True, cache=True)
def _spline_fill(xs, ys, n, t0, dt, m, grid, c2, cp):
    """Natural cubic spline through (xs, ys)[:n], sampled at t0 + i*dt for i < m into grid;
    points past the last knot hold the last value. c2, cp: float64 work arrays (>= n)."""
    if n < 3:
        for i in range(m):
            grid[i] = ys[n - 1] if n == 1 else ys[0] + (ys[1] - ys[0]) * min(
                max((t0 + i * dt - xs[0]) / (xs[1] - xs[0]), 0.0), 1.0)
        return
    # second derivatives: Thomas algorithm, c2[0] = c2[n-1] = 0
    c2[0] = 0.0
    cp[0] = 0.0
    for i in range(1, n - 1):
        h0 = xs[i] - xs[i - 1]
        h1 = xs[i + 1] - xs[i]
        r = 6.0 * ((ys[i + 1] - ys[i]) / h1 - (ys[i] - ys[i - 1]) / h0)
        den = 2.0 * (h0 + h1) - h0 * cp[i - 1]
        cp[i] = h1 / den
        c2[i] = (r - h0 * c2[i - 1]) / den
    c2[n - 1] = 0.0
    for i in range(n - 2, 0, -1):
        c2[i] = c2[i] - cp[i] * c2[i + 1]
    k = 0
    for i in range(m):
        x = t0 + i * dt
        if x >= xs[n - 1]:
            grid[i] = ys[n - 1]
            continue
        while k < n - 2 and x > xs[k + 1]:
            k += 1
        h = xs[k + 1] - xs[k]
        a = (xs[k + 1] - x) / h
        b = 1.0 - a
        grid[i] = (a * ys[k] + b * ys[k + 1]
                   + ((a * a * a - a) * c2[k] + (b * b * b - b) * c2[k + 1]) * h * h / 6.0)


@numba.njit(nogil=True, cache=True, fastmath=True)
def _welch_low(grid, m, fs, f_max, win, gw, psd):
    """NeuroKit2/scipy Welch PSD of grid[:m] (mean removed), bins 0 .. f_max only.

    win: float64[>= m] work; gw: float64[3, >= psd size] Goertzel state. Returns (bins
    written, bin spacing in Hz, NeuroKit2's min_frequency). Goertzel runs over all bins at
    once per sample (independent recurrences: the loop vectorises)."""
    mean = 0.0
    for i in range(m):
        mean += grid[i]
    mean /= m
    min_f = (2.0 * fs) / (m / 2.0)
    nperseg = int((2.0 / min_f) * fs)
    if nperseg > m / 2.0:
        nperseg = int(m / 2.0)
    noverlap = nperseg // 2
    step = nperseg - noverlap
    nseg = (m - noverlap) // step
    nfft = 2 * nperseg
    df = fs / nfft
    nb = min(int(f_max / df) + 1, psd.shape[0], nfft // 2 + 1)
    wsum = 0.0
    for n in range(nperseg):
        w = 0.5 - 0.5 * math.cos(2.0 * math.pi * n / nperseg)
        win[n] = w
        wsum += w * w
    coef = gw[0]
    s1 = gw[1]
    s2 = gw[2]
    for k in range(nb):
        coef[k] = 2.0 * math.cos(2.0 * math.pi * k / nfft)
        psd[k] = 0.0
    for s in range(nseg):
        base = s * step
        for k in range(nb):
            s1[k] = 0.0
            s2[k] = 0.0
        for n in range(nperseg):
            x = (grid[base + n] - mean) * win[n]
            for k in range(nb):
                s0 = x + coef[k] * s1[k] - s2[k]
                s2[k] = s1[k]
                s1[k] = s0
        for k in range(nb):
            psd[k] += s1[k] * s1[k] + s2[k] * s2[k] - coef[k] * s1[k] * s2[k]
    scale = 1.0 / (fs * wsum * nseg)
    for k in range(nb):
        psd[k] *= scale if (k == 0 or k == nfft // 2) else 2.0 * scale
    return nb, df, min_f


@numba.njit(nogil=True, cache=True)
def _band_trapz(psd, nb, df, min_f, lo, hi):
    """NeuroKit2's band power: trapezoid over bins with min_f <= f, lo <= f < hi."""
    total = 0.0
    prev_f = -1.0
    prev_p = 0.0
    for k in range(nb):
        f = k * df
        if f < min_f or f < lo or f >= hi:
            continue
        if prev_f >= 0.0:
            total += 0.5 * (psd[k] + prev_p) * (f - prev_f)
        prev_f = f
        prev_p = psd[k]
    return total if total != 0.0 else math.nan


@numba.njit(nogil=True, cache=True)
def _band_step(psd, nb, df, lo, hi):
    """Power in [lo, hi] with the PSD taken as constant over each bin (+- df/2)."""
    total = 0.0
    for k in range(nb):
        a = max(k * df - 0.5 * df, lo)
        b = min(k * df + 0.5 * df, hi)
        if b > a:
            total += psd[k] * (b - a)
    return total


@numba.njit(nogil=True, cache=True)
def compute_kernel(ring_rr, ring_t, ist, par, xs, ys, grid, c2, cp, win, gw, psd, res):
    """All figures of the current window into res (float64[N_RESULTS]); no allocation."""
    cap = ring_rr.shape[0]
    head, n = ist[I_HEAD], ist[I_COUNT]
    for i in range(res.shape[0]):
        res[i] = math.nan
    res[R_N] = n
    if n == 0:
        return
    s = 0.0
    for i in range(n):
        j = (head + i) % cap
        xs[i] = ring_t[j]
        ys[i] = ring_rr[j]
        s += ys[i]
    mean = s / n
    res[R_SPAN_S] = xs[n - 1] - xs[0] + ys[0] / 1000.0
    res[R_MEAN_NN] = mean
    res[R_HR] = 60000.0 / mean
    if n >= 2:
        v = 0.0
        for i in range(n):
            v += (ys[i] - mean) ** 2
        res[R_SDNN] = math.sqrt(v / (n - 1))
        sq = 0.0
        nn50 = 0
        for i in range(1, n):
            d = ys[i] - ys[i - 1]
            sq += d * d
            if abs(d) > 50.0:
                nn50 += 1
        res[R_RMSSD] = math.sqrt(sq / (n - 1))
        res[R_PNN50] = 100.0 * nn50 / n
        # HR trend: least squares slope of 60000/RR against time, bpm per minute
        tm = 0.0
        hm = 0.0
        for i in range(n):
            tm += xs[i]
            hm += 60000.0 / ys[i]
        tm /= n
        hm /= n
        num = 0.0
        den = 0.0
        for i in range(n):
            num += (xs[i] - tm) * (60000.0 / ys[i] - hm)
            den += (xs[i] - tm) ** 2
        if den > 0.0:
            res[R_HR_TREND] = 60.0 * num / den
    span = xs[n - 1] - xs[0]
    if n < 4 or span < par[P_MIN_SPAN]:
        return
    fs = par[P_FS]
    dt = 1.0 / fs
    m = math.ceil((xs[n - 1] + dt - xs[0]) / dt)  # numpy.arange's length
    m = min(m, grid.shape[0])
    _spline_fill(xs, ys, n, xs[0], dt, m, grid, c2, cp)
    nb, df, min_f = _welch_low(grid, m, fs, par[P_F_MAX], win, gw, psd)
    lf = _band_trapz(psd, nb, df, min_f, par[P_LF_LO], par[P_LF_HI])
    hf = _band_trapz(psd, nb, df, min_f, par[P_HF_LO], par[P_HF_HI])
    res[R_LF] = lf
    res[R_HF] = hf
    res[R_LFHF] = lf / hf
    # coherence (McCraty et al. 2009)
    kp = -1
    for k in range(nb):
        f = k * df
        if par[P_COH_LO] <= f <= par[P_COH_HI] and (kp < 0 or psd[k] > psd[kp]):
            kp = k
    if kp < 0:
        return
    fp = kp * df
    half = 0.5 * par[P_COH_WIDTH]
    peak = _band_step(psd, nb, df, fp - half, fp + half)
    total = _band_step(psd, nb, df, par[P_TOT_LO], par[P_TOT_HI])
    res[R_PEAK_HZ] = fp
    if total > 0.0:
        res[R_COHERENCE_NORM] = peak / total
        if total > peak:
            res[R_COHERENCE] = peak / (total - peak)


class HrvWindow:
    """Rolling-window HRV of one RR series; see the module docstring."""

    def __init__(self, config: HrvConfig | None = None) -> None:
        self.config = config or HrvConfig()
        self.config.check()
        c = self.config
        cap = math.ceil(c.window_s * MAX_HR_BPM / 60.0) + 8
        m = math.ceil(c.window_s * c.resample_hz) + 4
        self.par = c.params()
        self.ring_rr = np.zeros(cap, np.float64)
        self.ring_t = np.zeros(cap, np.float64)
        self.ist = np.zeros(2, np.int64)
        self.fst = np.zeros(1, np.float64)
        self.xs = np.zeros(cap, np.float64)
        self.ys = np.zeros(cap, np.float64)
        self.c2 = np.zeros(cap, np.float64)
        self.cp = np.zeros(cap, np.float64)
        self.grid = np.zeros(m, np.float64)
        self.win = np.zeros(m, np.float64)
        self.psd = np.zeros(int(c.max_freq_hz * m / c.resample_hz) + 4, np.float64)
        self.gw = np.zeros((3, self.psd.shape[0]), np.float64)
        self.res = np.full(N_RESULTS, np.nan)
        self.res[R_N] = 0.0
        self.bad = 0  # intervals refused (not finite, or not positive)

    def push(self, rr_ms: float) -> None:
        """Add one (corrected) interval in ms; call `update` for the figures.

        An interval that is not a finite positive number is counted in `bad` and restarts the
        window (a gap), so it never poisons the figures."""
        if not (math.isfinite(rr_ms) and rr_ms > 0.0):
            self.bad += 1
            self.reset()
            return
        push_kernel(rr_ms, self.ring_rr, self.ring_t, self.ist, self.fst, self.par[P_WINDOW])

    def update(self) -> np.ndarray:
        """Compute every figure of the window into `res` (indexed by the R_* slots)."""
        compute_kernel(self.ring_rr, self.ring_t, self.ist, self.par, self.xs, self.ys,
                       self.grid, self.c2, self.cp, self.win, self.gw, self.psd, self.res)
        return self.res

    def reset(self) -> None:
        """Empty the window (a gap: the next beat starts a new series)."""
        self.ist[:] = 0
        self.fst[:] = 0.0
        self.res[:] = np.nan
        self.res[R_N] = 0.0

    def window(self) -> tuple[np.ndarray, np.ndarray]:
        """(beat times s, intervals ms) now in the window (copies; for checks and plots)."""
        cap = self.ring_rr.shape[0]
        idx = (self.ist[I_HEAD] + np.arange(self.ist[I_COUNT])) % cap
        return self.ring_t[idx].copy(), self.ring_rr[idx].copy()

    def figures(self) -> dict[str, float | None]:
        """The last computed figures by name (None where not computable)."""
        return {k: (None if not math.isfinite(v) else float(v))
                for k, v in zip(RESULT_NAMES, self.res, strict=True)}
