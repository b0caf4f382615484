"""Monophonic pitch (f0) with voicing for a tuner: pYIN, block-streaming. numba, nogil.

Signal path, per input sample (any block size; the engine gives 128 frames):

1. Anti-alias FIR (Kaiser windowed sinc, linear phase, 75 taps at 48 kHz, -60 dB from the
   internal Nyquist up) at the input rate, kept in a ring for step 5, and every
   `decimation`-th output (48 kHz / 3 = 16 kHz) for the analysis. Internal sample j is aligned
   with input sample j * decimation (decimation samples the FIR output G samples later).
2. Every `hop_length` input samples, one frame of `frame_length` input samples (as internal
   samples) centred on input sample k * hop_length (zeros before the stream, like librosa's
   center=True): YIN's difference function d(tau) over an integration window
   W = frame - tau_max - 1, for each lag over the window pair centred on the frame centre
   (method "centred", default; "direct" and "fft" put the window at the frame start, which
   delays the estimate by a lag-dependent ~(frame - W - tau) / 2), then d'(tau), YIN's
   cumulative mean normalised difference, and its troughs (parabolic interpolation).
3. pYIN's candidates: for each of `n_thresholds` thresholds weighted by a beta prior, the first
   trough below it takes the threshold's probability (none below: the global minimum takes
   `no_trough_prob` of it). Their sum is the frame's voiced probability. Frames quieter than
   `silence_db` (mean square over the frame) have no candidates.
4. The HMM over pitch bins x voicing (echoel.dsp.pitch_hmm), fixed-lag Viterbi with `lookahead`
   frames; the decoded bin (20 cents by default) picks the strongest candidate within half a
   semitone.
5. That candidate's period is refined at the input rate on the FIR output (step 1): d at 7
   lags around it, parabolic minimum. The output f0 is this (sub-cent: a tuner needs cents,
   not bins), or the bin centre when no candidate is near the decoded bin.

Per frame out: f0 in Hz (0 when unvoiced), voiced flag, voiced probability, confidence (1 - d'
at the chosen trough: periodicity; 0 when unvoiced), nearest MIDI note (-1 when unvoiced) and
the offset from it in cents (re `a4`).

Latency: a frame centred on input sample c is output once sample c + latency_samples is in,
latency_samples = decimation * (frame/2 - 1) + FIR delay + lookahead * hop (defaults: 1533 + 37
+ 1536 = 3106 samples, 64.7 ms at 48 kHz), plus the block the sample arrives in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numba
import numpy as np
from echoel.dsp.fft_radix2 import butterflies
from echoel.dsp.pitch_hmm import (
    H_BINS,
    H_BPS,
    H_LAG,
    H_RESETS,
    H_RING,
    HmmArrays,
    backtrack,
    bin_freq,
    build_hmm,
    hmm_reset,
    hmm_step,
    transition_width,
)

FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float64))
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
DIFF_CENTRED, DIFF_DIRECT, DIFF_FFT = 0, 1, 2
DIFF_METHODS = {"centred": DIFF_CENTRED, "direct": DIFF_DIRECT, "fft": DIFF_FFT}
# int parameter slots (FrontArrays.ip)
P_TAPS, P_DECIM, P_FRAME, P_WIN, P_TAU_MIN, P_TAU_MAX, P_HOP, P_NTHR, P_METHOD, P_NFFT = range(10)
# float parameter slots (FrontArrays.fp)
F_SR, F_FLOOR_MS, F_NO_TROUGH, F_A4 = range(4)
# counters (FrontArrays.cnt)
(C_HPOS, C_NIN, C_NEXT_DEC, C_NINT, C_RPOS, C_NEXT_FRAME, C_FRAMES, C_EMITTED, C_NAN_BLOCKS,
 C_DROPPED, C_FIRST_DEC, C_FIRST_FRAME, C_FPOS) = range(13)
REFINE_LAGS = 7  # fine lags evaluated around a chosen candidate's period
# output rows: out_f (float64) and out_i (int64)
O_F0, O_VPROB, O_CONF, O_CENTS = range(4)
O_INDEX, O_VOICED, O_MIDI = range(3)


@dataclass(frozen=True)
class PitchConfig:
    """What the tracker is asked to do. Lengths are in input samples at `rate`."""

    rate: int = 48000
    fmin: float = 40.0
    fmax: float = 2000.0
    frame_length: int = 3072  # 64 ms: 2.5 periods of 40 Hz
    hop_length: int = 384  # 8 ms
    decimation: int = 3  # internal rate 16 kHz
    lookahead: int = 4  # frames of Viterbi lookahead (32 ms)
    bins_per_semitone: int = 5  # 20-cent pitch states (as the pYIN Vamp plugin)
    n_thresholds: int = 100
    beta: tuple[float, float] = (2.0, 18.0)  # threshold prior, mean 0.1 (pYIN, librosa)
    no_trough_prob: float = 0.001  # librosa: 0.01, which lets pink/brown noise be "voiced"
    switch_prob: float = 0.01
    max_transition_rate: float = 35.92  # octaves per second (the HMM's band)
    leap_prob: float = 0.0  # per frame, to any pitch outside the band (see pitch_hmm)
    silence_db: float = -60.0  # frames below this mean square (dBFS) are unvoiced
    a4: float = 440.0
    # difference function: "centred" (direct form, each lag's window pair centred on the frame
    # centre), or with the window at the frame start: "direct" (direct form) or "fft"
    method: str = "centred"


@dataclass(frozen=True, eq=False)
class PitchLayout:
    """Sizes derived from a PitchConfig (internal rate samples unless said otherwise)."""

    config: PitchConfig
    rate_int: float
    frame: int
    hop: int
    window: int
    tau_min: int
    tau_max: int
    nfft: int
    n_bins: int
    width: int
    taps: np.ndarray = field(repr=False)  # anti-alias FIR
    prior: np.ndarray = field(repr=False)  # threshold probabilities (beta prior)

    @property
    def fir_delay(self) -> int:
        """Group delay of the anti-alias FIR, input samples."""
        return (self.taps.shape[0] - 1) // 2

    @property
    def latency_samples(self) -> int:
        """Input samples between a frame's centre sample and the frame's output."""
        c = self.config
        return c.decimation * (self.frame // 2 - 1) + self.fir_delay + c.lookahead * c.hop_length

    @property
    def max_candidates(self) -> int:
        return self.config.n_thresholds + 1


class FrontArrays(NamedTuple):
    """Preallocated state of the signal path up to the candidates (see `build_front`)."""

    fir: np.ndarray  # float64[taps], reversed (oldest sample first)
    hist: np.ndarray  # float64[2 * taps]: input history, written twice (contiguous reads)
    fine: np.ndarray  # float64[fine_len]: the FIR's output at the input rate (ring)
    fine_frame: np.ndarray  # float64[decimation * (frame - 1) + 1]: a frame of it, for refining
    fine_d: np.ndarray  # float64[REFINE_LAGS]: difference at the fine lags
    ring: np.ndarray  # float64[frame]: last `frame` internal samples
    frame: np.ndarray  # float64[frame]: the frame being analysed, oldest first
    csum: np.ndarray  # float64[frame + 1]: prefix sums of squares
    diff: np.ndarray  # float64[tau_max + 2]: difference function
    cmnd: np.ndarray  # float64[tau_max + 2]: cumulative mean normalised difference
    fre: np.ndarray  # float64[nfft]: FFT work, real
    fim: np.ndarray  # float64[nfft]: FFT work, imaginary
    pre: np.ndarray  # float64[nfft]: cross-spectrum, real
    pim: np.ndarray  # float64[nfft]: cross-spectrum, imaginary
    twr: np.ndarray  # float64[nfft // 2]: cos(2 pi k / nfft)
    twi: np.ndarray  # float64[nfft // 2]: -sin(2 pi k / nfft)
    rev: np.ndarray  # int64[nfft]: bit reversal
    beta_cum: np.ndarray  # float64[n_thresholds + 1]: prior mass of thresholds 1..k
    ip: np.ndarray  # int64: P_* parameters
    fp: np.ndarray  # float64: F_* parameters
    cnt: np.ndarray  # int64: C_* counters


# ----------------------------------------------------------------------------- design (numpy)

def decimator_taps(decimation: int, atten_db: float = 60.0, pass_frac: float = 0.35) -> np.ndarray:
    """Linear-phase anti-alias lowpass for decimation by `decimation` (odd length).

    Kaiser windowed sinc: pass band to pass_frac x the internal rate, `atten_db` of stop band
    from the internal Nyquist (0.5 x internal rate) up; DC gain 1 (as scipy's firwin)."""
    if decimation < 1:
        raise ValueError(f"pitch decimator: factor {decimation}; must be >= 1")
    if decimation == 1:
        return np.ones(1)
    if not 0.0 < pass_frac < 0.5:
        raise ValueError(f"pitch decimator: pass band {pass_frac} x rate; allowed 0 < f < 0.5")
    df = (0.5 - pass_frac) / decimation  # transition width, cycles per input sample
    n = math.ceil((atten_db - 7.95) / (2.285 * 2.0 * math.pi * df)) + 1
    n += 1 - n % 2
    beta = 0.1102 * (atten_db - 8.7) if atten_db > 50 else 0.5842 * (atten_db - 21) ** 0.4 + \
        0.07886 * (atten_db - 21)
    fc = (pass_frac + 0.5) / 2.0 / decimation  # cutoff, cycles per input sample
    m = np.arange(n) - (n - 1) / 2.0
    h = 2.0 * fc * np.sinc(2.0 * fc * m) * np.kaiser(n, beta)
    return h / h.sum()


def threshold_prior(n_thresholds: int, a: float, b: float) -> np.ndarray:
    """Probabilities of the thresholds 1/n..1 under a beta(a, b) prior (the mass of each
    interval ((i-1)/n, i/n]), integrated numerically (Simpson, 64 steps per interval)."""
    if n_thresholds < 2 or n_thresholds > 10000:
        raise ValueError(f"pitch: {n_thresholds} thresholds; allowed 2..10000")
    if a < 1.0 or b < 1.0:
        raise ValueError(f"pitch: beta prior ({a}, {b}); both parameters must be >= 1")
    steps = 64
    x = np.linspace(0.0, 1.0, n_thresholds * steps + 1)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    with np.errstate(divide="ignore", invalid="ignore"):
        pdf = np.exp((a - 1) * np.log(x) + (b - 1) * np.log1p(-x) - log_beta)
    pdf = np.nan_to_num(pdf, nan=0.0, posinf=0.0)
    if a == 1.0:
        pdf[0] = math.exp(-log_beta)
    if b == 1.0:
        pdf[-1] = x[-1] ** (a - 1) * math.exp(-log_beta)
    h = 1.0 / (n_thresholds * steps)
    w = np.ones(steps + 1)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    seg = pdf[:-1].reshape(n_thresholds, steps)
    ends = np.append(seg[1:, 0], pdf[-1])
    vals = np.concatenate([seg, ends[:, None]], axis=1)
    probs = vals @ w * h / 3.0
    return probs / probs.sum()


def layout(config: PitchConfig) -> PitchLayout:
    """Check a config and derive its sizes; errors say which value and what is allowed."""
    c = config
    if c.rate < 8000 or c.rate > 384000:
        raise ValueError(f"pitch: rate {c.rate} Hz; allowed 8000..384000")
    if c.decimation < 1 or c.rate % c.decimation:
        raise ValueError(f"pitch: decimation {c.decimation} must be >= 1 and divide the rate "
                         f"{c.rate} Hz")
    rate_int = c.rate / c.decimation
    if not 0.0 < c.fmin < c.fmax:
        raise ValueError(f"pitch: fmin {c.fmin} Hz, fmax {c.fmax} Hz; need 0 < fmin < fmax")
    if c.fmax > 0.35 * rate_int:
        raise ValueError(f"pitch: fmax {c.fmax} Hz is above the pass band of the internal rate "
                         f"{rate_int:g} Hz; allowed <= {0.35 * rate_int:g} Hz (lower decimation)")
    for name, val in (("frame_length", c.frame_length), ("hop_length", c.hop_length)):
        if val <= 0 or val % c.decimation:
            raise ValueError(f"pitch: {name} {val}; must be a positive multiple of the "
                             f"decimation {c.decimation}")
    frame = c.frame_length // c.decimation
    hop = c.hop_length // c.decimation
    if frame % 2:
        raise ValueError(f"pitch: frame_length {c.frame_length} gives an odd internal frame "
                         f"{frame}; use an even multiple of the decimation")
    if hop > frame:
        raise ValueError(f"pitch: hop_length {c.hop_length} exceeds frame_length "
                         f"{c.frame_length}")
    tau_min = max(2, math.floor(rate_int / c.fmax))
    tau_max = math.ceil(rate_int / c.fmin)
    window = frame - tau_max - 1
    if window < tau_max:
        raise ValueError(f"pitch: frame_length {c.frame_length} is too short for fmin "
                         f"{c.fmin} Hz; need >= {(2 * tau_max + 2) * c.decimation} "
                         f"(two periods of fmin)")
    if c.method not in DIFF_METHODS:
        raise ValueError(f"pitch: method {c.method!r}; allowed {', '.join(DIFF_METHODS)}")
    if not 0.0 <= c.no_trough_prob <= 1.0:
        raise ValueError(f"pitch: no_trough_prob {c.no_trough_prob}; allowed 0..1")
    if c.bins_per_semitone < 1 or c.bins_per_semitone > 100:
        raise ValueError(f"pitch: bins_per_semitone {c.bins_per_semitone}; allowed 1..100")
    if not 400.0 <= c.a4 <= 480.0:
        raise ValueError(f"pitch: a4 {c.a4} Hz; allowed 400..480")
    if not -200.0 <= c.silence_db <= 0.0:
        raise ValueError(f"pitch: silence_db {c.silence_db}; allowed -200..0 dBFS")
    if not 0.0 < c.max_transition_rate <= 1000.0:
        raise ValueError(f"pitch: max_transition_rate {c.max_transition_rate} octaves/s; "
                         f"allowed 0 < r <= 1000")
    if not 0 <= c.lookahead <= 1000:
        raise ValueError(f"pitch: lookahead {c.lookahead} frames; allowed 0..1000")
    if not 0.0 < c.switch_prob < 1.0:
        raise ValueError(f"pitch: switch_prob {c.switch_prob}; allowed 0 < p < 1")
    if not 0.0 <= c.leap_prob < 1.0:
        raise ValueError(f"pitch: leap_prob {c.leap_prob}; allowed 0 <= p < 1")
    n_bins = math.floor(12 * c.bins_per_semitone * math.log2(c.fmax / c.fmin)) + 1
    width = transition_width(c.max_transition_rate, c.hop_length / c.rate, c.bins_per_semitone)
    nfft = 1 << (frame - 1).bit_length()
    return PitchLayout(c, rate_int, frame, hop, window, tau_min, tau_max, nfft, n_bins, width,
                       decimator_taps(c.decimation), threshold_prior(c.n_thresholds, *c.beta))


def build_front(lay: PitchLayout) -> FrontArrays:
    """Allocate the signal path's state for a layout."""
    c = lay.config
    taps = lay.taps.shape[0]
    nfft = lay.nfft
    bits = nfft.bit_length() - 1
    rev = np.array([int(f"{i:0{bits}b}"[::-1], 2) if bits else 0 for i in range(nfft)],
                   dtype=np.int64)
    k = np.arange(nfft // 2)
    ip = np.zeros(10, dtype=np.int64)
    ip[[P_TAPS, P_DECIM, P_FRAME, P_WIN, P_TAU_MIN, P_TAU_MAX, P_HOP, P_NTHR, P_METHOD,
        P_NFFT]] = (taps, c.decimation, lay.frame, lay.window, lay.tau_min, lay.tau_max,
                    lay.hop, c.n_thresholds, DIFF_METHODS[c.method], nfft)
    fp = np.zeros(4)
    fp[[F_SR, F_FLOOR_MS, F_NO_TROUGH, F_A4]] = (lay.rate_int, 10.0 ** (c.silence_db / 10.0),
                                                 c.no_trough_prob, c.a4)
    cnt = np.zeros(13, dtype=np.int64)
    cnt[C_FIRST_DEC] = lay.fir_delay
    cnt[C_FIRST_FRAME] = lay.frame // 2
    fe = FrontArrays(
        fir=lay.taps[::-1].astype(np.float64), hist=np.zeros(2 * taps),
        fine=np.zeros(c.decimation * (lay.frame + c.lookahead * lay.hop) + 8),
        fine_frame=np.zeros(c.decimation * (lay.frame - 1) + 1), fine_d=np.zeros(REFINE_LAGS),
        ring=np.zeros(lay.frame),
        frame=np.zeros(lay.frame), csum=np.zeros(lay.frame + 1),
        diff=np.zeros(lay.tau_max + 2), cmnd=np.zeros(lay.tau_max + 2),
        fre=np.zeros(nfft), fim=np.zeros(nfft), pre=np.zeros(nfft), pim=np.zeros(nfft),
        twr=np.cos(2.0 * np.pi * k / nfft), twi=-np.sin(2.0 * np.pi * k / nfft), rev=rev,
        beta_cum=np.concatenate([[0.0], np.cumsum(lay.prior)]),
        ip=ip, fp=fp, cnt=cnt)
    front_reset(fe)
    return fe


# ----------------------------------------------------------------------------- kernels

@numba.njit(nogil=True, cache=True)
def front_reset(fe: FrontArrays) -> None:
    """Back to the start of a stream: empty history, frame 0 next."""
    fe.hist[:] = 0.0
    fe.ring[:] = 0.0
    fe.fine[:] = 0.0
    for i in range(fe.cnt.shape[0]):
        if i != C_FIRST_DEC and i != C_FIRST_FRAME and i != C_NAN_BLOCKS and i != C_DROPPED:
            fe.cnt[i] = 0
    fe.cnt[C_NEXT_DEC] = fe.cnt[C_FIRST_DEC]
    fe.cnt[C_NEXT_FRAME] = fe.cnt[C_FIRST_FRAME]


@numba.njit(nogil=True, cache=True)
def fft_inplace(re: np.ndarray, im: np.ndarray, twr: np.ndarray, twi: np.ndarray,
                rev: np.ndarray) -> None:
    """Forward complex FFT (e^{-i...}), radix 2, in place; length = rev.shape[0]."""
    n = rev.shape[0]
    for i in range(n):
        j = rev[i]
        if j > i:
            re[i], re[j] = re[j], re[i]
            im[i], im[j] = im[j], im[i]
    butterflies(re[:n], im[:n], twr, twi, 1.0)


@numba.njit(nogil=True, cache=True, fastmath=True)
def difference_direct(fe: FrontArrays, centred: bool) -> None:
    """YIN difference d(tau), tau = 0..tau_max+1, by direct correlation over a window of W.

    centred: the window pair for lag tau starts at (frame - W - tau) // 2, so that every lag
    looks at a span centred on the frame's centre (otherwise the window starts the frame).
    Lags sharing a start are done in pairs (one load, two products); fastmath vectorises."""
    frame_len = fe.ip[P_FRAME]
    w = fe.ip[P_WIN]
    top = fe.ip[P_TAU_MAX] + 1
    x = fe.frame
    cs = fe.csum
    fe.diff[0] = 0.0
    tau = 1
    while tau <= top:
        a = (frame_len - w - tau) // 2 if centred else 0
        pair = tau < top and (not centred or (frame_len - w - tau - 1) // 2 == a)
        y = x[a:]
        if pair:
            s0 = 0.0
            s1 = 0.0
            for j in range(w):
                v = y[j]
                s0 += v * y[j + tau]
                s1 += v * y[j + tau + 1]
        else:
            s0 = 0.0
            s1 = 0.0
            for j in range(w):
                s0 += y[j] * y[j + tau]
        e1 = cs[a + w] - cs[a]
        d = e1 + (cs[a + tau + w] - cs[a + tau]) - 2.0 * s0
        fe.diff[tau] = d if d > 0.0 else 0.0
        if pair:
            d = e1 + (cs[a + tau + 1 + w] - cs[a + tau + 1]) - 2.0 * s1
            fe.diff[tau + 1] = d if d > 0.0 else 0.0
            tau += 2
        else:
            tau += 1


@numba.njit(nogil=True, cache=True)
def difference_fft(fe: FrontArrays) -> None:
    """YIN difference d(tau), tau = 0..tau_max+1: the window's cross-correlation with the frame
    from one complex FFT of (frame + i window) and one inverse FFT (no wrap: window + tau_max
    + 1 <= frame <= nfft)."""
    n = fe.ip[P_NFFT]
    frame_len = fe.ip[P_FRAME]
    w = fe.ip[P_WIN]
    for j in range(n):
        fe.fre[j] = fe.frame[j] if j < frame_len else 0.0
        fe.fim[j] = fe.frame[j] if j < w else 0.0
    fft_inplace(fe.fre, fe.fim, fe.twr, fe.twi, fe.rev)
    for k in range(n):
        k2 = (n - k) % n
        zr, zi, cr, ci = fe.fre[k], fe.fim[k], fe.fre[k2], fe.fim[k2]
        xr, xi = 0.5 * (zr + cr), 0.5 * (zi - ci)  # spectrum of the frame
        yr, yi = 0.5 * (zi + ci), -0.5 * (zr - cr)  # spectrum of the window
        fe.pre[k] = xr * yr + xi * yi  # X conj(Y)
        fe.pim[k] = xi * yr - xr * yi
    for k in range(n):
        fe.fre[k] = fe.pre[k]
        fe.fim[k] = -fe.pim[k]
    fft_inplace(fe.fre, fe.fim, fe.twr, fe.twi, fe.rev)
    e0 = fe.csum[w]
    fe.diff[0] = 0.0
    for tau in range(1, fe.ip[P_TAU_MAX] + 2):
        d = e0 + (fe.csum[tau + w] - fe.csum[tau]) - 2.0 * fe.fre[tau] / n
        fe.diff[tau] = d if d > 0.0 else 0.0


@numba.njit(nogil=True, cache=True)
def cumulative_mean_normalised(fe: FrontArrays) -> None:
    """d'(tau) = d(tau) / mean(d(1..tau)), d'(0) = 1 (YIN's step 3)."""
    fe.cmnd[0] = 1.0
    run = 0.0
    for tau in range(1, fe.ip[P_TAU_MAX] + 2):
        run += fe.diff[tau]
        fe.cmnd[tau] = fe.diff[tau] * tau / run if run > 0.0 else 1.0


@numba.njit(nogil=True, cache=True)
def _thresholds_at_or_below(v: float, n_thr: int) -> int:
    """How many of the thresholds 1/n..1 are <= v."""
    if v >= 1.0:
        return n_thr
    k = math.floor(v * n_thr)
    return k if k > 0 else 0


@numba.njit(nogil=True, cache=True)
def candidates(fe: FrontArrays, hm: HmmArrays, slot: int) -> None:
    """pYIN's f0 candidates of the current d' into hm's candidate slot (f0, probability,
    interpolated d'), and the slot's voiced probability."""
    cm = fe.cmnd
    n_thr = fe.ip[P_NTHR]
    cum = fe.beta_cum
    sr = fe.fp[F_SR]
    maxc = hm.cand_f.shape[1]
    nc = 0
    total = 0.0
    run_min_count = n_thr  # thresholds at or below the lowest trough so far (none yet: all)
    g_val = math.inf
    g_tau = -1.0
    g_d = 0.0
    last_tau = -1.0
    for tau in range(fe.ip[P_TAU_MIN], fe.ip[P_TAU_MAX] + 1):
        a = cm[tau - 1]
        b = cm[tau]
        c = cm[tau + 1]
        if not (b < a and b <= c):
            continue
        shift = 0.5 * (a - c) / (a - 2.0 * b + c)
        t = tau + shift
        dmin = b - 0.25 * (a - c) * shift
        if b < g_val:
            g_val, g_tau, g_d = b, t, dmin
        lo = _thresholds_at_or_below(b, n_thr)
        if lo < run_min_count:
            mass = cum[run_min_count] - cum[lo]  # thresholds in (b, previous lowest trough]
            run_min_count = lo
            if mass > 0.0 and nc < maxc:
                hm.cand_f[slot, nc] = sr / t
                hm.cand_p[slot, nc] = mass
                hm.cand_d[slot, nc] = dmin
                last_tau = t
                nc += 1
                total += mass
    if g_tau > 0.0:
        extra = fe.fp[F_NO_TROUGH] * cum[_thresholds_at_or_below(g_val, n_thr)]
        if extra > 0.0:
            if nc > 0 and last_tau == g_tau:
                hm.cand_p[slot, nc - 1] += extra
                total += extra
            elif nc < maxc:
                hm.cand_f[slot, nc] = sr / g_tau
                hm.cand_p[slot, nc] = extra
                hm.cand_d[slot, nc] = g_d
                nc += 1
                total += extra
    hm.cand_n[slot] = nc
    hm.voiced_p[slot] = min(total, 1.0)


@numba.njit(nogil=True, cache=True, fastmath=True)
def refine_period(fe: FrontArrays, u: int, tau: float) -> float:
    """Period (input samples) of frame u near internal lag `tau`, refined at the input rate:
    the difference function of the anti-aliased full-rate signal (lag-centred windows) at
    REFINE_LAGS lags around decimation x tau, its minimum by parabolic interpolation. Coarse
    lags are 3x longer in samples and d' is biased: this takes the error at 2 kHz from ~10
    cents to < 0.5. Returns -1 when the minimum is not inside the searched lags."""
    decim = fe.ip[P_DECIM]
    frame_len = fe.ip[P_FRAME]
    nf = fe.fine.shape[0]
    lf = fe.fine_frame.shape[0]
    wf = decim * (fe.ip[P_WIN] - 2) - 4
    t0 = round(decim * tau)
    half = REFINE_LAGS // 2
    if t0 - half < 1 or t0 + half > lf - wf:
        return -1.0
    # FIR output index of the frame's first sample; output index n sits at (base + n) % nf
    s0 = decim * (u * fe.ip[P_HOP] - frame_len // 2) + fe.cnt[C_FIRST_DEC]
    base = fe.cnt[C_FPOS] - fe.cnt[C_NIN]
    for k in range(lf):
        n = s0 + k
        fe.fine_frame[k] = fe.fine[(base + n) % nf] if n >= 0 else 0.0
    for i in range(REFINE_LAGS):
        t = t0 - half + i
        a = (lf - wf - t) // 2
        y = fe.fine_frame[a:]
        acc = 0.0
        for j in range(wf):
            e = y[j] - y[j + t]
            acc += e * e
        fe.fine_d[i] = acc
    best = -1
    for i in range(1, REFINE_LAGS - 1):
        if fe.fine_d[i] < fe.fine_d[i - 1] and fe.fine_d[i] <= fe.fine_d[i + 1]:
            if best < 0 or fe.fine_d[i] < fe.fine_d[best]:
                best = i
    if best < 0:
        return -1.0
    a, b, c = fe.fine_d[best - 1], fe.fine_d[best], fe.fine_d[best + 1]
    return t0 - half + best + 0.5 * (a - c) / (a - 2.0 * b + c)


@numba.njit(nogil=True, cache=True)
def _emit(fe: FrontArrays, hm: HmmArrays, u: int, state: int, out_f: np.ndarray,
          out_i: np.ndarray, n_out: int) -> int:
    """Write frame u's decoded result at out[:, n_out]; returns the new count."""
    fe.cnt[C_EMITTED] += 1
    if n_out >= out_f.shape[1] or n_out >= out_i.shape[1]:
        fe.cnt[C_DROPPED] += 1
        return n_out
    nb = hm.ip[H_BINS]
    bps = hm.ip[H_BPS]
    slot = u % hm.ip[H_RING]
    f0 = 0.0
    conf = 0.0
    midi = -1
    cents = 0.0
    if state < nb:
        best = -1
        best_p = -1.0
        for c in range(hm.cand_n[slot]):
            pos = 12.0 * bps * math.log2(hm.cand_f[slot, c] / hm.fp[0])
            if abs(pos - state) <= 0.5 * bps and hm.cand_p[slot, c] > best_p:
                best = c
                best_p = hm.cand_p[slot, c]
        if best >= 0:
            f0 = hm.cand_f[slot, best]
            conf = min(max(1.0 - hm.cand_d[slot, best], 0.0), 1.0)
            period = refine_period(fe, u, fe.fp[F_SR] / f0)
            if period > 0.0:
                f0 = fe.fp[F_SR] * fe.ip[P_DECIM] / period
        else:
            f0 = bin_freq(hm, state)
        note = 69.0 + 12.0 * math.log2(f0 / fe.fp[F_A4])
        midi = round(note)
        cents = 100.0 * (note - midi)
    out_f[O_F0, n_out] = f0
    out_f[O_VPROB, n_out] = hm.voiced_p[slot]
    out_f[O_CONF, n_out] = conf
    out_f[O_CENTS, n_out] = cents
    out_i[O_INDEX, n_out] = u
    out_i[O_VOICED, n_out] = 1 if state < nb else 0
    out_i[O_MIDI, n_out] = midi
    return n_out + 1


@numba.njit(nogil=True, cache=True)
def _analyse(fe: FrontArrays, hm: HmmArrays, out_f: np.ndarray, out_i: np.ndarray,
             n_out: int) -> int:
    """Analyse the newest frame, step the HMM, emit the frame `lookahead` back."""
    frame_len = fe.ip[P_FRAME]
    start = fe.cnt[C_RPOS]  # oldest sample of the ring
    for j in range(frame_len - start):
        fe.frame[j] = fe.ring[start + j]
    for j in range(start):
        fe.frame[frame_len - start + j] = fe.ring[j]
    fe.csum[0] = 0.0
    for j in range(frame_len):
        fe.csum[j + 1] = fe.csum[j] + fe.frame[j] * fe.frame[j]
    u = fe.cnt[C_FRAMES]
    slot = u % hm.ip[H_RING]
    if fe.csum[frame_len] > fe.fp[F_FLOOR_MS] * frame_len:
        if fe.ip[P_METHOD] == DIFF_FFT:
            difference_fft(fe)
        else:
            difference_direct(fe, fe.ip[P_METHOD] == DIFF_CENTRED)
        cumulative_mean_normalised(fe)
        candidates(fe, hm, slot)
    else:
        hm.cand_n[slot] = 0
        hm.voiced_p[slot] = 0.0
    hmm_step(hm, slot)
    fe.cnt[C_FRAMES] = u + 1
    lag = hm.ip[H_LAG]
    if u >= lag:
        backtrack(hm, u, lag)
        n_out = _emit(fe, hm, u - lag, hm.path[0], out_f, out_i, n_out)
    return n_out


@numba.njit(nogil=True, cache=True, fastmath=True)
def _fir(fir: np.ndarray, hist: np.ndarray, start: int, taps: int) -> float:
    """One FIR output: sum fir[k] * hist[start + k] (fir reversed, hist oldest first)."""
    h = hist[start:]
    acc = 0.0
    for k in range(taps):
        acc += fir[k] * h[k]
    return acc


@numba.njit(nogil=True, cache=True)
def track_block(x: np.ndarray, fe: FrontArrays, hm: HmmArrays, out_f: np.ndarray,
                out_i: np.ndarray) -> int:
    """Feed one block of mono input (float32/64, any length); returns the number of frames
    written to out_f[:, :n] / out_i[:, :n]. A block with NaN/Inf is counted, the signal history
    is cleared and its non-finite samples are taken as 0."""
    n = x.shape[0]
    bad = False
    for i in range(n):
        if not math.isfinite(x[i]):
            bad = True
            break
    if bad:
        fe.cnt[C_NAN_BLOCKS] += 1
        fe.hist[:] = 0.0
        fe.ring[:] = 0.0
        fe.fine[:] = 0.0
    taps = fe.ip[P_TAPS]
    decim = fe.ip[P_DECIM]
    frame_len = fe.ip[P_FRAME]
    nf = fe.fine.shape[0]
    n_out = 0
    hp = fe.cnt[C_HPOS]
    for i in range(n):
        v = float(x[i])
        if bad and not math.isfinite(v):
            v = 0.0
        fe.hist[hp] = v
        fe.hist[hp + taps] = v
        acc = _fir(fe.fir, fe.hist, hp + 1, taps)
        fp = fe.cnt[C_FPOS]
        fe.fine[fp] = acc
        fe.cnt[C_FPOS] = fp + 1 if fp + 1 < nf else 0
        nin = fe.cnt[C_NIN]
        fe.cnt[C_NIN] = nin + 1  # samples in, this one included
        if nin == fe.cnt[C_NEXT_DEC]:
            rp = fe.cnt[C_RPOS]
            fe.ring[rp] = acc
            fe.cnt[C_RPOS] = rp + 1 if rp + 1 < frame_len else 0
            fe.cnt[C_NINT] += 1
            fe.cnt[C_NEXT_DEC] += decim
            if fe.cnt[C_NINT] == fe.cnt[C_NEXT_FRAME]:
                fe.cnt[C_NEXT_FRAME] += fe.ip[P_HOP]
                n_out = _analyse(fe, hm, out_f, out_i, n_out)
        hp = hp + 1 if hp + 1 < taps else 0
    fe.cnt[C_HPOS] = hp
    return n_out


@numba.njit(nogil=True, cache=True)
def track_flush(fe: FrontArrays, hm: HmmArrays, out_f: np.ndarray, out_i: np.ndarray) -> int:
    """Emit the frames still held for lookahead (end of stream), decoded from the best final
    state; returns the number written to out[:, :n]."""
    frames = fe.cnt[C_FRAMES]
    first = fe.cnt[C_EMITTED]
    if frames == 0 or first >= frames:
        return 0
    steps = frames - 1 - first
    backtrack(hm, frames - 1, steps)
    n_out = 0
    for k in range(steps + 1):
        n_out = _emit(fe, hm, first + k, hm.path[k], out_f, out_i, n_out)
    return n_out


# ----------------------------------------------------------------------------- Python side

def note_name(midi: int) -> str:
    """Scientific pitch name of a MIDI note (69 -> 'A4', 61 -> 'C#4'); '' for -1 (unvoiced)."""
    if midi < 0:
        return ""
    return f"{NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


@dataclass
class PitchTrack:
    """Per-frame results of a whole signal (offline)."""

    times: np.ndarray  # s, frame centres
    f0: np.ndarray  # Hz, 0 when unvoiced
    voiced: np.ndarray  # bool
    voiced_prob: np.ndarray
    confidence: np.ndarray
    midi: np.ndarray  # nearest note, -1 when unvoiced
    cents: np.ndarray  # offset from it


class PitchTracker:
    """Streaming pYIN for one mono signal: all state preallocated, one numba call per block.

    After `n = process(block)`, the results of n frames are in `f0[:n]`, `voiced[:n]`,
    `voiced_prob[:n]`, `confidence[:n]`, `midi[:n]`, `cents[:n]` and `index[:n]` (frame number;
    its centre is input sample index * hop_length). They are overwritten by the next call.
    """

    def __init__(self, config: PitchConfig | None = None, max_block: int = 8192) -> None:
        self.config = config or PitchConfig()
        self.layout = layout(self.config)
        if max_block < 1:
            raise ValueError(f"pitch: max_block {max_block}; must be >= 1")
        self.max_block = int(max_block)
        lay = self.layout
        self.front = build_front(lay)
        self.hmm = build_hmm(lay.n_bins, lay.width, self.config.switch_prob,
                             self.config.lookahead, lay.max_candidates,
                             self.config.bins_per_semitone, self.config.fmin,
                             self.config.leap_prob)
        # a call emits at most max_block / hop frames; flush() also the padding's and lookahead's
        cap = ((self.max_block + lay.latency_samples) // self.config.hop_length
               + self.config.lookahead + 4)
        self.out_f = np.zeros((4, cap))
        self.out_i = np.zeros((3, cap), dtype=np.int64)
        self.f0, self.voiced_prob = self.out_f[O_F0], self.out_f[O_VPROB]
        self.confidence, self.cents = self.out_f[O_CONF], self.out_f[O_CENTS]
        self.index, self.voiced, self.midi = (self.out_i[O_INDEX], self.out_i[O_VOICED],
                                              self.out_i[O_MIDI])
        self._pad = np.zeros(lay.latency_samples + self.config.hop_length)

    def process(self, block: np.ndarray) -> int:
        """Feed a contiguous 1-D float32/float64 block (<= max_block samples), the kinds warm()
        compiles (another layout would compile in the caller's thread); returns frames out."""
        if (block.ndim != 1 or block.shape[0] > self.max_block
                or not block.flags.c_contiguous or block.dtype not in FLOAT_TYPES):
            raise ValueError(f"pitch: block {block.dtype} {block.shape} (contiguous: "
                             f"{block.flags.c_contiguous}); need a contiguous 1-D float32 or "
                             f"float64 array of at most max_block={self.max_block} samples")
        return track_block(block, self.front, self.hmm, self.out_f, self.out_i)

    def flush(self) -> int:
        """End of stream: feed zeros until every frame centred in the input is analysed, then
        emit all held frames. Results as after process(); reset() before reusing."""
        lay = self.layout
        c = self.config
        nin = int(self.front.cnt[C_NIN])
        last_frame = (nin - 1) // c.hop_length if nin > 0 else -1
        need = c.decimation * (last_frame * lay.hop + lay.frame // 2 - 1) + lay.fir_delay + 1
        pad = max(0, need - nin)
        n = 0
        got: list[tuple[np.ndarray, np.ndarray]] = []
        while pad > 0:
            step = min(pad, self.max_block, self._pad.shape[0])
            k = track_block(self._pad[:step], self.front, self.hmm, self.out_f, self.out_i)
            got.append((self.out_f[:, :k].copy(), self.out_i[:, :k].copy()))
            pad -= step
        k = track_flush(self.front, self.hmm, self.out_f, self.out_i)
        got.append((self.out_f[:, :k].copy(), self.out_i[:, :k].copy()))
        for gf, gi in got:
            m = gf.shape[1]
            self.out_f[:, n:n + m] = gf
            self.out_i[:, n:n + m] = gi
            n += m
        keep = self.out_i[O_INDEX, :n] <= last_frame
        n = int(keep.sum())
        return n

    def reset(self) -> None:
        """Start a new stream (counters of NaN blocks and dropped frames are kept)."""
        front_reset(self.front)
        hmm_reset(self.hmm)

    def warm(self) -> None:
        """Compile and run the kernels once for float32 and float64 blocks, then reset."""
        for dt in (np.float32, np.float64):
            self.process(np.zeros(min(self.max_block, 128), dtype=dt))
        self.reset()

    @property
    def nan_blocks(self) -> int:
        """Blocks that contained NaN or Inf."""
        return int(self.front.cnt[C_NAN_BLOCKS])

    @property
    def dropped(self) -> int:
        """Frames lost because a call produced more than the output capacity."""
        return int(self.front.cnt[C_DROPPED])

    @property
    def hmm_resets(self) -> int:
        """Times the decoder restarted after a non-finite score."""
        return int(self.hmm.cnt[H_RESETS])

    @property
    def latency_seconds(self) -> float:
        """Algorithmic latency: frame centre to output (window half + FIR + lookahead)."""
        return self.layout.latency_samples / self.config.rate


def track(x: np.ndarray, config: PitchConfig | None = None) -> PitchTrack:
    """Pitch of a whole mono signal (offline): the streaming kernel fed in one call, then
    flushed; frames are centred on 0, hop, 2 hop, ... < len(x)."""
    x = np.ascontiguousarray(x)
    if x.dtype not in FLOAT_TYPES:
        x = x.astype(np.float64)
    if x.ndim != 1:
        raise ValueError(f"pitch: signal of shape {x.shape}; need 1-D (mono)")
    tr = PitchTracker(config, max_block=max(1, x.shape[0]))
    parts_f, parts_i = [], []
    if x.shape[0]:
        n = tr.process(x)
        parts_f.append(tr.out_f[:, :n].copy())
        parts_i.append(tr.out_i[:, :n].copy())
    n = tr.flush()
    parts_f.append(tr.out_f[:, :n].copy())
    parts_i.append(tr.out_i[:, :n].copy())
    of = np.concatenate(parts_f, axis=1)
    oi = np.concatenate(parts_i, axis=1)
    c = tr.config
    return PitchTrack(times=oi[O_INDEX] * c.hop_length / c.rate, f0=of[O_F0],
                      voiced=oi[O_VOICED].astype(bool), voiced_prob=of[O_VPROB],
                      confidence=of[O_CONF], midi=oi[O_MIDI], cents=of[O_CENTS])
