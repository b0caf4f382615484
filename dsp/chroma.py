"""Tuned semitone spectrum, note activations, chroma and bass chroma, block-streaming.

Pipeline (one numba kernel, `chroma_block`, no allocation; all state in ChromaState):

1. Mix to mono; decimate by D = round(rate / 12000) (48 kHz -> 12 kHz, 44.1 kHz ->
   11.025 kHz) with a Kaiser-windowed sinc FIR (111 taps at 48 kHz): >= 80 dB stop band from
   0.6 x the internal rate, so nothing aliases below 0.4 x (4.8 kHz at 12 kHz); the analysis
   uses < 4 kHz.
2. Every `hop` internal samples (default 256: 21.3 ms, 1024 input frames at 48 kHz) a Hann
   frame of `fft_size` (default 2048: 171 ms, 5.9 Hz bins) goes through a radix-2 real FFT.
3. Spectral peaks (local maxima within 60 dB of the frame's largest and above a -90 dBFS sine)
   get frequency and amplitude by log-parabolic interpolation. They vote into the tuning
   histogram (dsp/tuning.py) and, with the current tuning applied, fill a semitone spectrum
   (MIDI 24..107): each peak adds its amplitude to its nearest tuned semitone, weighted by
   cos^2(pi x deviation), so partials between semitones (noise, drums) count little.
4. The semitone spectrum is log-compressed (40 dB range below the frame's largest) and
   explained by a dictionary of harmonic notes (12 partials, amplitude 0.7^(h-1)) by
   non-negative least squares (coordinate descent, a fixed number of sweeps): note
   activations with most harmonics removed (after Mauch and Dixon's NNLS chroma, 2010).
5. Chroma = activations folded to 12 pitch classes under a sin^2 weight over MIDI 39..94
   (treble), bass chroma over MIDI 27..55.

Frame t ends at internal sample (t + 1) x hop; `ChromaState.frame_time(t)` is its centre in
seconds of input (the decimator's delay included). A block holding NaN or Inf is counted
(`bad_blocks`) and analysed as silence, and the filter and frame memories are cleared, so the
frames after it are clean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from echoel.dsp.fft_radix2 import butterflies
from echoel.dsp.tuning import (
    BINS,
    TUNE_FMAX,
    TUNE_FMIN,
    new_histogram,
    tuning_estimate,
    tuning_vote,
)

MIDI_LOW = 24  # lowest semitone of the spectrum (C1, 32.7 Hz)
N_SEMI = 84  # semitones: MIDI 24..107
INTERNAL_RATE = 12000
PEAK_RANGE_DB = 60.0
ABS_FLOOR = 10.0 ** (-90.0 / 20.0)  # amplitude of a sine that still makes a peak
TREBLE_RANGE = (39, 94)  # MIDI notes folded into the chroma
BASS_RANGE = (27, 55)  # MIDI notes folded into the bass chroma

# ints state slots
(I_FIR_POS, I_PHASE, I_RING_POS, I_HOP_COUNT, I_FRAMES, I_BAD, I_HOP, I_DEC, I_SWEEPS,
 I_OVERFLOW) = range(10)
# floats state slots
F_TUNING, F_DECAY, F_RATE_INT, F_FLOOR, F_COMPRESS = range(5)


@dataclass(frozen=True)
class ChromaConfig:
    """Analysis parameters: input rate and channels; sizes are at the internal rate."""

    rate: int = 48000
    channels: int = 2
    fft_size: int = 2048
    hop: int = 256
    tuning_seconds: float = 20.0  # time constant of the tuning histogram
    range_db: float = 40.0  # log compression: amplitudes this far below the frame's top -> ~0
    nnls_sweeps: int = 10
    harmonics: int = 12
    harmonic_slope: float = 0.7

    @property
    def decimation(self) -> int:
        """Input samples per internal sample."""
        return max(1, round(self.rate / INTERNAL_RATE))

    @property
    def internal_rate(self) -> float:
        """Rate of the analysed signal after decimation, Hz."""
        return self.rate / self.decimation

    @property
    def hop_input(self) -> int:
        """Input frames between two chroma frames."""
        return self.hop * self.decimation

    @property
    def hop_seconds(self) -> float:
        """Time between two chroma frames, seconds."""
        return self.hop / self.internal_rate

    def validate(self) -> None:
        """Raise ValueError naming the parameter when a value is outside what works."""
        if not 8000 <= self.rate <= 192000:
            raise ValueError(f"chroma: rate {self.rate} Hz; allowed 8000..192000")
        if not 1 <= self.channels <= 64:
            raise ValueError(f"chroma: channels {self.channels}; allowed 1..64")
        n = self.fft_size
        if n < 256 or n > 65536 or n & (n - 1):
            raise ValueError(f"chroma: fft_size {n}; allowed a power of two in 256..65536")
        if not 1 <= self.hop <= n:
            raise ValueError(f"chroma: hop {self.hop}; allowed 1..fft_size ({n})")
        if not self.tuning_seconds > 0.0:
            raise ValueError(f"chroma: tuning_seconds {self.tuning_seconds}; must be > 0")
        if not 10.0 <= self.range_db <= 120.0:
            raise ValueError(f"chroma: range_db {self.range_db}; allowed 10..120")
        if not 1 <= self.nnls_sweeps <= 200:
            raise ValueError(f"chroma: nnls_sweeps {self.nnls_sweeps}; allowed 1..200")


def decimator_taps(factor: int, atten_db: float = 86.0) -> np.ndarray:
    """Low-pass FIR for decimation by `factor`: pass band to 0.4, stop band from 0.6 of the
    output rate (Kaiser window); unit gain at DC. Factor 1: a single unit tap."""
    if factor == 1:
        return np.ones(1)
    width = 0.2 / factor  # transition width, as a fraction of the input rate
    n = math.ceil((atten_db - 7.95) / (14.36 * width)) + 1
    n += 1 - n % 2  # odd: integer group delay
    beta = 0.1102 * (atten_db - 8.7)
    m = np.arange(n) - (n - 1) / 2.0
    h = np.sinc(m / factor) * np.kaiser(n, beta)
    return h / h.sum()


def fft_tables(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tables for a real FFT of size n (a power of two) done as a complex FFT of n/2:
    bit-reversal permutation, twiddles of the n/2 transform (cos, sin), twiddles of the
    final split (cos, sin)."""
    h = n // 2
    bits = h.bit_length() - 1
    idx = np.arange(h)
    rev = np.zeros(h, dtype=np.int64)
    for b in range(bits):
        rev |= ((idx >> b) & 1) << (bits - 1 - b)
    k = np.arange(h // 2)
    ks = np.arange(h + 1)
    return (rev, np.cos(2 * np.pi * k / h), np.sin(2 * np.pi * k / h),
            np.cos(2 * np.pi * ks / n), np.sin(2 * np.pi * ks / n))


def note_dictionary(n_semi: int = N_SEMI, harmonics: int = 12, slope: float = 0.7
                    ) -> np.ndarray:
    """Semitone spectra of harmonic notes, float64[n_semi, n_semi]: column k is the note
    MIDI_LOW + k, its partial h at semitone k + round(12 log2 h) with amplitude slope^(h-1)."""
    e = np.zeros((n_semi, n_semi))
    for k in range(n_semi):
        for h in range(1, harmonics + 1):
            m = k + round(12.0 * math.log2(h))
            if m < n_semi:
                e[m, k] += slope ** (h - 1)
    return e


def fold_weights(lo: int, hi: int) -> np.ndarray:
    """sin^2 weight over MIDI lo..hi (zero outside), per semitone of the spectrum."""
    midi = np.arange(N_SEMI) + MIDI_LOW
    w = np.zeros(N_SEMI)
    m = (midi >= lo) & (midi <= hi)
    w[m] = np.sin(np.pi * (midi[m] - lo + 1) / (hi - lo + 2)) ** 2
    return w


@numba.njit(nogil=True, cache=True)
def rfft_magnitude(x, re, im, rev, c1, s1, c2, s2, mag):
    """|X[k]|, k = 0..n/2, of the real FFT of x (float64[n]) into mag; re/im: float64[n/2]
    work arrays; tables from fft_tables(n)."""
    h = re.shape[0]
    for i in range(h):
        j = rev[i]
        re[j] = x[2 * i]
        im[j] = x[2 * i + 1]
    butterflies(re[:h], im[:h], c1, s1, -1.0)
    # split: X[k] = E[k] + W^k O[k]; E = (Z[k] + conj Z[h-k]) / 2, O = (Z[k] - conj Z[h-k]) / 2i
    for k in range(h + 1):
        ka = k % h
        kb = (h - k) % h
        zr = re[ka]
        zi = im[ka]
        cr_ = re[kb]
        ci_ = -im[kb]
        er = 0.5 * (zr + cr_)
        ei = 0.5 * (zi + ci_)
        o_r = 0.5 * (zi - ci_)
        o_i = -0.5 * (zr - cr_)
        wr = c2[k]
        wi = -s2[k]
        xr = er + wr * o_r - wi * o_i
        xi = ei + wr * o_i + wi * o_r
        mag[k] = math.sqrt(xr * xr + xi * xi)


@numba.njit(nogil=True, cache=True)
def semitone_frame(mag, rate_int, n_fft, tuning_cents, floor, hist, spec):
    """Peaks of one magnitude spectrum -> tuning votes into `hist` and the tuned semitone
    spectrum `spec` (amplitudes from MIDI_LOW up). Returns the number of peaks."""
    nb = mag.shape[0]
    top = 0.0
    for k in range(2, nb - 2):
        if mag[k] > top:
            top = mag[k]
    thr = max(top * 10.0 ** (-PEAK_RANGE_DB / 20.0), floor)
    for m in range(spec.shape[0]):
        spec[m] = 0.0
    binhz = rate_int / n_fft
    fmax = 440.0 * 2.0 ** ((MIDI_LOW + spec.shape[0] - 0.5 - 69.0) / 12.0)
    kmax = min(nb - 2, int(fmax / binhz) + 1)
    npk = 0
    for k in range(2, kmax):
        v = mag[k]
        if v <= thr or v <= mag[k - 1] or v < mag[k + 1]:
            continue
        a = math.log(mag[k - 1] + 1e-300)
        b = math.log(v)
        g = math.log(mag[k + 1] + 1e-300)
        den = a - 2.0 * b + g
        p = 0.5 * (a - g) / den if den < 0.0 else 0.0
        amp = math.exp(b - 0.25 * (a - g) * p)
        f = (k + p) * binhz
        pitch = 69.0 + 12.0 * math.log2(f / 440.0)
        npk += 1
        if TUNE_FMIN <= f <= TUNE_FMAX:
            tuning_vote(hist, 100.0 * (pitch - math.floor(pitch + 0.5)), amp)
        tp = pitch - tuning_cents / 100.0
        near = math.floor(tp + 0.5)
        m = int(near) - MIDI_LOW
        if 0 <= m < spec.shape[0]:
            w = math.cos(math.pi * (tp - near))
            spec[m] += amp * w * w
    return npk


@numba.njit(nogil=True, cache=True)
def nnls_frame(gram, diag_inv, et, y, x, g, sweeps):
    """Non-negative least squares min |E x - y|^2, x >= 0, by cyclic coordinate descent.
    gram = E^T E, diag_inv = 1 / diag(gram), et = E^T (float64[k, m]); x (the result) and
    g (gradient E^T E x - E^T y) are work arrays of k. A fixed number of sweeps: bounded time."""
    k = x.shape[0]
    m = y.shape[0]
    for i in range(k):
        s = 0.0
        for j in range(m):
            s += et[i, j] * y[j]
        g[i] = -s
        x[i] = 0.0
    for _ in range(sweeps):
        for i in range(k):
            nx = x[i] - g[i] * diag_inv[i]
            if nx < 0.0:
                nx = 0.0
            d = nx - x[i]
            if d != 0.0:
                x[i] = nx
                for j in range(k):
                    g[j] += d * gram[j, i]


@numba.njit(nogil=True, cache=True)
def chroma_block(x, fir, hist_in, ring, window, frame, re, im, rev, c1, s1, c2, s2, mag,
                 thist, spec, gram, diag_inv, et, notes, grad, w_treble, w_bass, ints, floats,
                 out_chroma, out_bass, out_energy, out_tuning):
    """Feed one block x (float[frames, channels]); each finished frame's chroma, bass chroma,
    mean square (of the decimated signal) and tuning (cents) go to the next row of the out_*
    arrays (row 0 first). Returns the number of frames written; frames that do not fit the
    out_* arrays are counted in ints[I_OVERFLOW] and dropped."""
    frames, ch = x.shape
    taps = fir.shape[0]
    n = ring.shape[0]
    hop = ints[I_HOP]
    dec = ints[I_DEC]
    bad = False
    for i in range(frames):
        for c in range(ch):
            if not math.isfinite(x[i, c]):
                bad = True
    if bad:
        ints[I_BAD] += 1
        for i in range(hist_in.shape[0]):
            hist_in[i] = 0.0
        for i in range(n):
            ring[i] = 0.0
    inv = 1.0 / ch
    produced = 0
    for i in range(frames):
        v = 0.0
        if not bad:
            for c in range(ch):
                v += x[i, c]
            v *= inv
        pos = ints[I_FIR_POS]
        hist_in[pos] = v
        hist_in[pos + taps] = v
        pos += 1
        if pos == taps:
            pos = 0
        ints[I_FIR_POS] = pos
        ints[I_PHASE] += 1
        if ints[I_PHASE] < dec:
            continue
        ints[I_PHASE] = 0
        acc = 0.0
        for t in range(taps):  # oldest sample at hist_in[pos]
            acc += fir[t] * hist_in[pos + t]
        if abs(acc) < 1e-30:
            acc = 0.0
        rp = ints[I_RING_POS]
        ring[rp] = acc
        rp += 1
        if rp == n:
            rp = 0
        ints[I_RING_POS] = rp
        ints[I_HOP_COUNT] += 1
        if ints[I_HOP_COUNT] < hop:
            continue
        ints[I_HOP_COUNT] = 0
        # ---- one analysis frame: the last n internal samples, oldest at ring[rp]
        e = 0.0
        for t in range(n):
            s = ring[(rp + t) % n]
            frame[t] = s * window[t]
            e += s * s
        rfft_magnitude(frame, re, im, rev, c1, s1, c2, s2, mag)
        for b in range(BINS):
            thist[b] *= floats[F_DECAY]
        semitone_frame(mag, floats[F_RATE_INT], n, floats[F_TUNING], floats[F_FLOOR], thist,
                       spec)
        floats[F_TUNING] = tuning_estimate(thist)
        top = 0.0
        for m in range(spec.shape[0]):
            if spec[m] > top:
                top = spec[m]
        if top > 0.0:
            scale = 1.0 / (top * floats[F_COMPRESS])
            for m in range(spec.shape[0]):
                spec[m] = math.log1p(spec[m] * scale)
        nnls_frame(gram, diag_inv, et, spec, notes, grad, ints[I_SWEEPS])
        ints[I_FRAMES] += 1
        if produced == out_chroma.shape[0]:  # a block longer than the state was made for
            ints[I_OVERFLOW] += 1
            continue
        for p in range(12):
            out_chroma[produced, p] = 0.0
            out_bass[produced, p] = 0.0
        for k in range(notes.shape[0]):
            p = (MIDI_LOW + k) % 12
            out_chroma[produced, p] += notes[k] * w_treble[k]
            out_bass[produced, p] += notes[k] * w_bass[k]
        out_energy[produced] = e / n
        out_tuning[produced] = floats[F_TUNING]
        produced += 1
    return produced


class ChromaState:
    """Preallocated state of one chroma analysis; feed blocks of up to `max_frames` frames."""

    def __init__(self, config: ChromaConfig | None = None, max_frames: int = 1024) -> None:
        cfg = config or ChromaConfig()
        cfg.validate()
        if max_frames < 1:
            raise ValueError(f"chroma: max_frames {max_frames}; must be >= 1")
        self.config = cfg
        self.max_frames = int(max_frames)
        self.fir = decimator_taps(cfg.decimation)
        self.hist_in = np.zeros(2 * self.fir.shape[0])
        n = cfg.fft_size
        self.ring = np.zeros(n)
        self.window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)  # periodic Hann
        self.frame = np.zeros(n)
        self.re = np.zeros(n // 2)
        self.im = np.zeros(n // 2)
        self.tables = fft_tables(n)
        self.mag = np.zeros(n // 2 + 1)
        self.tuning_hist = new_histogram()
        self.spec = np.zeros(N_SEMI)
        e = note_dictionary(N_SEMI, cfg.harmonics, cfg.harmonic_slope)
        self.gram = e.T @ e
        self.diag_inv = 1.0 / np.diag(self.gram)
        self.et = np.ascontiguousarray(e.T)
        self.notes = np.zeros(N_SEMI)
        self.grad = np.zeros(N_SEMI)
        self.w_treble = fold_weights(*TREBLE_RANGE)
        self.w_bass = fold_weights(*BASS_RANGE)
        self.ints = np.zeros(10, dtype=np.int64)
        self.ints[I_HOP] = cfg.hop
        self.ints[I_DEC] = cfg.decimation
        self.ints[I_SWEEPS] = cfg.nnls_sweeps
        self.floats = np.zeros(5)
        self.floats[F_DECAY] = math.exp(-cfg.hop_seconds / cfg.tuning_seconds)
        self.floats[F_RATE_INT] = cfg.internal_rate
        self.floats[F_FLOOR] = ABS_FLOOR * self.window.sum() / 2.0
        self.floats[F_COMPRESS] = 10.0 ** (-cfg.range_db / 20.0)
        cap = self.max_frames // cfg.hop_input + 1
        self.chroma = np.zeros((cap, 12))
        self.bass = np.zeros((cap, 12))
        self.energy = np.zeros(cap)
        self.tuning = np.zeros(cap)
        self.delay = (self.fir.shape[0] - 1) / 2.0 / cfg.rate  # decimator delay, seconds

    def process(self, block: np.ndarray) -> int:
        """Analyse one block (float32/float64 [frames, channels], frames <= max_frames).
        Returns n: the new frames are self.chroma[:n], self.bass[:n], self.energy[:n],
        self.tuning[:n]; the first of them has index self.frames - n."""
        return chroma_block(block, self.fir, self.hist_in, self.ring, self.window, self.frame,
                            self.re, self.im, *self.tables, self.mag, self.tuning_hist,
                            self.spec, self.gram, self.diag_inv, self.et, self.notes, self.grad,
                            self.w_treble, self.w_bass, self.ints, self.floats, self.chroma,
                            self.bass, self.energy, self.tuning)

    def check_block(self, block: np.ndarray) -> None:
        """Raise ValueError if a block does not fit this state (for callers outside the
        audio thread; the audio thread's blocks are fixed when the stream starts)."""
        check_block_shape(block, self.config.channels, self.max_frames)

    @property
    def frames(self) -> int:
        """Frames produced so far."""
        return int(self.ints[I_FRAMES])

    @property
    def bad_blocks(self) -> int:
        """Blocks that held NaN or Inf (analysed as silence)."""
        return int(self.ints[I_BAD])

    @property
    def dropped_frames(self) -> int:
        """Frames lost because a block was longer than max_frames (0 when used as built)."""
        return int(self.ints[I_OVERFLOW])

    @property
    def tuning_cents(self) -> float:
        """Current tuning estimate: deviation of the reference from 440 Hz, cents."""
        return float(self.floats[F_TUNING])

    def frame_time(self, index: int | np.ndarray) -> float | np.ndarray:
        """Centre of frame `index` in seconds of input."""
        cfg = self.config
        return ((np.asarray(index) + 1) * cfg.hop - cfg.fft_size / 2) / cfg.internal_rate \
            - self.delay

    def reset(self) -> None:
        """Forget the signal (stream restart); the tuning estimate is kept."""
        self.hist_in[:] = 0.0
        self.ring[:] = 0.0
        self.ints[[I_FIR_POS, I_PHASE, I_RING_POS, I_HOP_COUNT, I_FRAMES]] = 0


def check_block_shape(block: np.ndarray, channels: int, max_frames: int) -> None:
    """Raise ValueError naming the problem if `block` is not float[frames <= max_frames,
    channels]."""
    if not isinstance(block, np.ndarray) or block.ndim != 2:
        raise ValueError(f"block: need a 2-D array [frames, {channels}], got "
                         f"{getattr(block, 'shape', type(block).__name__)}")
    if block.shape[1] != channels:
        raise ValueError(f"block: {block.shape[1]} channels; this analysis takes {channels}")
    if block.shape[0] > max_frames:
        raise ValueError(f"block: {block.shape[0]} frames; at most {max_frames} per block")
    if block.dtype not in (np.float32, np.float64):
        raise ValueError(f"block: dtype {block.dtype}; allowed float32 or float64")


@dataclass(frozen=True)
class ChromaFrames:
    """Chroma of a whole signal (offline analysis)."""

    chroma: np.ndarray  # float64[frames, 12], pitch class 0 = C
    bass: np.ndarray  # float64[frames, 12]
    energy: np.ndarray  # float64[frames], mean square of the analysed frame
    tuning: np.ndarray  # float64[frames], cents
    times: np.ndarray  # float64[frames], frame centres, seconds
    hop_seconds: float


def chroma_offline(audio: np.ndarray, config: ChromaConfig | None = None,
                   chunk: int = 1 << 20) -> ChromaFrames:
    """Chroma of a whole signal (float [frames, channels]) with the streaming kernel run over
    big blocks; the signal is followed by one frame of silence so its end is analysed."""
    cfg = config or ChromaConfig(channels=audio.shape[1] if audio.ndim == 2 else 1)
    st = ChromaState(cfg, max_frames=chunk)
    if audio.ndim == 1:
        audio = audio[:, None]
    st.check_block(audio[:0])
    tail = np.zeros((cfg.fft_size * cfg.decimation // 2, cfg.channels), dtype=audio.dtype)
    parts: list[tuple[np.ndarray, ...]] = []
    for src in (audio, tail):
        for s in range(0, src.shape[0], chunk):
            n = st.process(np.ascontiguousarray(src[s:s + chunk]))
            parts.append((st.chroma[:n].copy(), st.bass[:n].copy(), st.energy[:n].copy(),
                          st.tuning[:n].copy()))
    c, b, e, t = (np.concatenate([p[i] for p in parts]) for i in range(4))
    times = np.asarray(st.frame_time(np.arange(c.shape[0])), dtype=np.float64)
    return ChromaFrames(c, b, e, t, times, cfg.hop_seconds)
