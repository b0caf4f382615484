"""Streaming audio-to-MIDI with basic-pitch's model: resample, window, decode notes as they come.

Audio at the engine's rate -> a streaming polyphase resampler to 22050 Hz (the filter of
scipy.signal.resample_poly: Kaiser beta 5, 10 zero crossings per side, output aligned to the
input, no delay to correct) -> 2 s windows every `hop_frames` frames -> the model (a callback,
run by the caller, e.g. in a thread pool) -> incremental note decoding. Each window contributes
`hop_frames` frames that end `margin_frames` before its right edge (basic-pitch drops 15 at
each edge offline; a smaller margin is lower latency).

Incremental decoding follows basic-pitch's rules (dsp.note_decoding) forward in time:
a note starts at an onset peak >= onset_thresh (the peak is certain one frame later), and its
note-on is emitted once it has lasted `confirm_frames` frames (8 by default, 93 ms; with
confirm_frames = min_note_len = 11 a note is emitted only if offline keeps it too); it ends
after energy_tol frames below frame_thresh (note-off at the last frame above). A later
confirmed note cuts an earlier one at the same or a neighbouring pitch, as offline. The
melodia trick runs confirm_frames + 4 frames behind (onset notes covering a frame are settled
by then), on energy no onset note claims, and confirms its notes after confirm_frames too. The
inferred-onset scale (offline: over the whole clip) is a running maximum started from typical
values. Time stamps are in the input's sample clock.

Latency from an onset to its note-on (algorithmic): up to hop_frames - 1 frames waiting for the
window, margin_frames + 1 frames of look-ahead, confirm_frames frames, ~1 ms of resampler
look-ahead, plus the inference time. See `algorithmic_latency_s`.

All state lives in arrays allocated when the transcriber is built; the kernels allocate nothing.
Non-finite input samples are counted and replaced by silence; samples beyond +-1 are counted
and clipped; a non-finite model output or a dropped window ends the notes that were sounding
and restarts decoding (counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np
from echoel.dsp.basic_pitch_frames import (
    FFT_HOP,
    MIDI_OFFSET,
    N_PITCHES,
    SAMPLE_RATE,
    WINDOW_FRAMES,
    WINDOW_SAMPLES,
    Infer,
)
from echoel.dsp.note_decoding import DecodeParams

RING = 64  # frames of history the decoder keeps (power of two)
MELODIA_EXTRA_LAG = 4  # frames beyond confirm_frames before a frame is looked at by melodia
EV_ON, EV_OFF = 1, 0
PRIOR_MAX_ONSET = 0.9  # typical max onset activation over a clip (0.89..0.97 on the eval set)
PRIOR_MAX_DIFF = 0.45  # typical max positive note-activation difference (0.44..0.67)

# ------------------------------------------------------------------------ resampler


def resampler_taps(up: int, down: int, beta: float = 5.0) -> np.ndarray:
    """scipy.signal.resample_poly's default filter (firwin, Kaiser window), times `up`."""
    max_rate = max(up, down)
    half_len = 10 * max_rate
    n = np.arange(2 * half_len + 1) - half_len
    h = np.sinc(n / max_rate) / max_rate * np.kaiser(2 * half_len + 1, beta)
    return h / h.sum() * up


@numba.njit(nogil=True, cache=True)
def resample_block(x, hist, st, h, up, down, out):
    """Resample one block x (float32[n]) into out; returns the number of samples written.

    hist: float64[H] input history ring (H a power of two >= taps/up + 2); st: int64[4] =
    (input samples seen, next output index, non-finite blocks, clipped blocks). Output m is
    sum_k x[k] h[m*down + half - k*up]: aligned with the input, as resample_poly.
    """
    L = h.shape[0]
    half = (L - 1) // 2
    mask = hist.shape[0] - 1
    n_in = st[0]
    bad = False
    clipped = False
    for i in range(x.shape[0]):
        v = np.float64(x[i])
        if not math.isfinite(v):
            v = 0.0
            bad = True
        elif v > 1.0:
            v = 1.0
            clipped = True
        elif v < -1.0:
            v = -1.0
            clipped = True
        hist[(n_in + i) & mask] = v
    n_in += x.shape[0]
    st[0] = n_in
    if bad:
        st[2] += 1
    if clipped:
        st[3] += 1
    m = st[1]
    w = 0
    cap = out.shape[0]
    while w < cap:
        c = m * down + half
        k_top = c // up
        if k_top >= n_in:
            break
        phase = c - k_top * up
        acc = 0.0
        k = k_top
        j = phase
        while j < L and k >= 0:
            acc += h[j] * hist[k & mask]
            j += up
            k -= 1
        out[w] = acc
        w += 1
        m += 1
    st[1] = m
    return w


class PolyphaseResampler:
    """Streaming rational resampler (rate_in -> rate_out), state preallocated."""

    def __init__(self, rate_in: int, rate_out: int = SAMPLE_RATE, max_block: int = 8192) -> None:
        if not isinstance(rate_in, int) or not 8000 <= rate_in <= 384000:
            raise ValueError(f"input rate is {rate_in!r}; allowed: an integer 8000..384000 Hz")
        if not isinstance(max_block, int) or not 1 <= max_block <= 1 << 20:
            raise ValueError(f"max_block is {max_block!r}; allowed: 1..{1 << 20} samples")
        g = math.gcd(rate_in, rate_out)
        self.rate_in, self.rate_out = rate_in, rate_out
        self.up, self.down = rate_out // g, rate_in // g
        self.max_block = max_block
        self.h = resampler_taps(self.up, self.down)
        size = 1 << math.ceil(math.log2(self.h.shape[0] // self.up + max_block + 4))
        self.hist = np.zeros(size)
        self.state = np.zeros(4, np.int64)
        self.out = np.zeros(max_block * self.up // self.down + 2)

    @property
    def lookahead_in(self) -> float:
        """Input samples an output waits for beyond its own position."""
        return ((self.h.shape[0] - 1) // 2) / self.up

    def process(self, x: np.ndarray) -> np.ndarray:
        """Resample x (float[n], n <= max_block); returns a view of the output buffer (valid
        until the next call)."""
        if x.ndim != 1 or x.shape[0] > self.max_block:
            raise ValueError(f"block is {x.shape}; expected 1-D with at most {self.max_block} "
                             f"samples")
        n = resample_block(x, self.hist, self.state, self.h, self.up, self.down, self.out)
        return self.out[:n]


def resample(audio: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    """Whole-signal resampling with the streaming kernel (mono float32 out, same length as
    resample_poly's: ceil(n * up / down)); the tail is flushed with zeros."""
    x = np.asarray(audio, np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1).astype(np.float32)
    if rate_in == rate_out:
        return x.copy()
    r = PolyphaseResampler(rate_in, rate_out, max_block=65536)
    n_out = -(-x.shape[0] * r.up // r.down)
    parts = []
    for a in range(0, x.shape[0], r.max_block):
        parts.append(r.process(x[a:a + r.max_block]).astype(np.float32))
    tail = np.zeros(int(r.lookahead_in) + 2, np.float32)
    parts.append(r.process(tail).astype(np.float32))
    return np.concatenate(parts)[:n_out]


# ------------------------------------------------------------------------ decoder

# per-pitch slot fields (int64 arrays [88, F])
S_STATE, S_START, S_LAST, S_GAP, S_CNT = 0, 1, 2, 3, 4
# float fields (float64 [88, 2]): running sum, sum up to the last frame above threshold
F_SUM, F_SUM_LAST = 0, 1
# decoder scalars int64[8]
D_NEXT, D_SINCE_RESET, D_MEL_NEXT, D_RESETS, D_OVERFLOW = 0, 1, 2, 3, 4
# float scalars float64[2]
X_MAX_ON, X_MAX_D = 0, 1


@numba.njit(nogil=True, cache=True)
def _emit(ev, ev_amp, n, kind, frame, pitch, amp):
    if n < ev.shape[0]:
        ev[n, 0] = kind
        ev[n, 1] = frame
        ev[n, 2] = pitch
        ev_amp[n] = amp
        return n + 1
    return n


@numba.njit(nogil=True, cache=True)
def _claim(claim, a, b, p, flag):
    for t in range(a, b + 1):
        r = t & (RING - 1)
        claim[r, p] = flag
        if p > 0:
            claim[r, p - 1] = flag
        if p < N_PITCHES - 1:
            claim[r, p + 1] = flag


@numba.njit(nogil=True, cache=True)
def _last_above_before(ring_note, start, u0, p, thr, g):
    """Last frame in [start, u0) with activation >= thr (ring permitting), or -1."""
    lo = max(start, g - RING + 1)
    t = u0 - 1
    while t >= lo:
        if ring_note[t & (RING - 1), p] >= thr:
            return t
        t -= 1
    return -1


@numba.njit(nogil=True, cache=True)
def _end_all(act, actf, mel, melf, pend, ev, ev_amp, n):
    """Note-offs for every sounding note (after a gap or at the end); slots cleared."""
    for p in range(N_PITCHES):
        if act[p, S_STATE] == 1:
            c = act[p, S_LAST] - act[p, S_START] + 1
            n = _emit(ev, ev_amp, n, EV_OFF, act[p, S_LAST] + 1, p, actf[p, F_SUM_LAST] / c)
        if mel[p, S_STATE] == 2:
            c = max(mel[p, S_LAST] - mel[p, S_START], 1)
            n = _emit(ev, ev_amp, n, EV_OFF, mel[p, S_LAST], p, melf[p, F_SUM_LAST] / c)
        act[p, S_STATE] = 0
        mel[p, S_STATE] = 0
        pend[p, S_STATE] = 0
    return n


@numba.njit(nogil=True, cache=True)
def decode_frames(note, onset, g0, prm, ring_note, ring_inf, claim, mclaim, act, actf, pend,
                  pendf, mel, melf, dsc, xsc, ev, ev_amp):
    """Decode frames g0 .. g0 + len(note) - 1 (float32 [n, 88] note/onset activations).

    prm: float64[9] = (onset_thresh, frame_thresh, min_note_len, energy_tol, confirm_frames,
    melodia 0/1, infer_onsets 0/1, melodia lag, melodia: confirmed when longer than this).
    Events go to ev int64[cap, 3] (kind, frame, pitch index) and ev_amp float64[cap]; returns
    how many were written.
    """
    on_thr = prm[0]
    thr = prm[1]
    tol = np.int64(prm[3])
    confirm = np.int64(prm[4])
    lag = np.int64(prm[7])
    mlen = np.int64(prm[8])
    melodia = prm[5] != 0.0
    infer_on = prm[6] != 0.0
    n_ev = 0
    M = RING - 1
    for i in range(note.shape[0]):
        g = g0 + i
        r = g & M
        # ---- store the frame, inferred onsets for it
        for p in range(N_PITCHES):
            ring_note[r, p] = note[i, p]
            claim[r, p] = 0
            mclaim[r, p] = 0
        since = dsc[D_SINCE_RESET]
        for p in range(N_PITCHES):
            o = np.float64(onset[i, p])
            if o > xsc[X_MAX_ON]:
                xsc[X_MAX_ON] = o
            d = 0.0
            if since >= 2:
                f = np.float64(note[i, p])
                d1 = f - np.float64(ring_note[(g - 1) & M, p])
                d2 = f - np.float64(ring_note[(g - 2) & M, p])
                d = min(d1, d2)
                if d < 0.0:
                    d = 0.0
            if d > xsc[X_MAX_D]:
                xsc[X_MAX_D] = d
            ring_inf[r, p] = d
        for p in range(N_PITCHES):
            o = np.float64(onset[i, p])
            v = o
            if infer_on:
                if xsc[X_MAX_D] > 0.0:
                    s = xsc[X_MAX_ON] * ring_inf[r, p] / xsc[X_MAX_D]
                    if s > v:
                        v = s
            ring_inf[r, p] = v
        dsc[D_SINCE_RESET] = since + 1
        # ---- onset peaks at u = g - 1: new pending notes (high pitch first, as offline)
        u = g - 1
        if since >= 2:
            ru = u & M
            for p in range(N_PITCHES - 1, -1, -1):
                v = ring_inf[ru, p]
                if v >= on_thr and v > ring_inf[(u - 1) & M, p] and v > ring_inf[r, p]:
                    pend[p, S_STATE] = 1
                    pend[p, S_START] = u
                    pend[p, S_LAST] = u
                    pend[p, S_GAP] = 0
                    pendf[p, F_SUM] = np.float64(ring_note[ru, p])
                    pendf[p, F_SUM_LAST] = pendf[p, F_SUM]
        # ---- scan frame g for sounding and pending onset notes
        for p in range(N_PITCHES):
            e = np.float64(note[i, p])
            if act[p, S_STATE] == 1:
                actf[p, F_SUM] += e
                if e >= thr:
                    _claim(claim, act[p, S_LAST] + 1, g, p, 1)
                    act[p, S_LAST] = g
                    act[p, S_GAP] = 0
                    actf[p, F_SUM_LAST] = actf[p, F_SUM]
                else:
                    act[p, S_GAP] += 1
                    if act[p, S_GAP] >= tol:
                        c = act[p, S_LAST] - act[p, S_START] + 1
                        n_ev = _emit(ev, ev_amp, n_ev, EV_OFF, act[p, S_LAST] + 1, p,
                                     actf[p, F_SUM_LAST] / c)
                        act[p, S_STATE] = 0
            if pend[p, S_STATE] == 1 and pend[p, S_START] < g:
                pendf[p, F_SUM] += e
                if e >= thr:
                    pend[p, S_LAST] = g
                    pend[p, S_GAP] = 0
                    pendf[p, F_SUM_LAST] = pendf[p, F_SUM]
                else:
                    pend[p, S_GAP] += 1
                    if pend[p, S_GAP] >= tol:
                        pend[p, S_STATE] = 0
        # ---- confirmations: later onsets first, then high pitch first (offline order)
        while True:
            best = -1
            for p in range(N_PITCHES - 1, -1, -1):
                if pend[p, S_STATE] == 1 and pend[p, S_LAST] - pend[p, S_START] >= confirm:
                    if best < 0 or pend[p, S_START] > pend[best, S_START]:
                        best = p
            if best < 0:
                break
            p = best
            u0 = pend[p, S_START]
            pend[p, S_STATE] = 0
            blocked = False
            for q in range(max(p - 1, 0), min(p + 2, N_PITCHES)):
                if act[q, S_STATE] == 1 and act[q, S_START] > u0:
                    blocked = True  # a later note already holds this pitch region
            if blocked:
                continue
            for q in range(max(p - 1, 0), min(p + 2, N_PITCHES)):
                if act[q, S_STATE] == 1:
                    last = _last_above_before(ring_note, act[q, S_START], u0, q, thr, g)
                    end = last + 1 if last >= 0 else u0
                    c = max(end - act[q, S_START], 1)
                    n_ev = _emit(ev, ev_amp, n_ev, EV_OFF, end, q, actf[q, F_SUM_LAST] / c)
                    act[q, S_STATE] = 0
                if q != p and pend[q, S_STATE] == 1 and pend[q, S_START] <= u0:
                    pend[q, S_STATE] = 0
            act[p, S_STATE] = 1
            act[p, S_START] = u0
            act[p, S_LAST] = pend[p, S_LAST]
            act[p, S_GAP] = pend[p, S_GAP]
            actf[p, F_SUM] = pendf[p, F_SUM]
            actf[p, F_SUM_LAST] = pendf[p, F_SUM_LAST]
            _claim(claim, max(u0, g - RING + 1), act[p, S_LAST], p, 1)
            c = act[p, S_LAST] - u0 + 1
            n_ev = _emit(ev, ev_amp, n_ev, EV_ON, u0, p, actf[p, F_SUM_LAST] / c)
        # ---- melodia trick, `lag` frames behind
        um = g - lag
        if melodia and um >= dsc[D_MEL_NEXT]:
            n_ev = _melodia_frame(um, thr, mlen, tol, ring_note, claim, mclaim, mel, melf,
                                  ev, ev_amp, n_ev)
            dsc[D_MEL_NEXT] = um + 1
        dsc[D_NEXT] = g + 1
    if n_ev >= ev.shape[0]:
        dsc[D_OVERFLOW] += 1
    return n_ev


@numba.njit(nogil=True, cache=True)
def _melodia_frame(um, thr, min_len, tol, ring_note, claim, mclaim, mel, melf, ev, ev_amp,
                   n_ev):
    ru = um & (RING - 1)
    for p in range(N_PITCHES):
        free = claim[ru, p] == 0 and mclaim[ru, p] == 0
        e = np.float64(ring_note[ru, p]) if free else 0.0
        st = mel[p, S_STATE]
        if st == 0:
            if e > thr:
                mel[p, S_STATE] = 1
                mel[p, S_START] = um
                mel[p, S_LAST] = um
                mel[p, S_GAP] = 0
                melf[p, F_SUM] = e
                melf[p, F_SUM_LAST] = 0.0
            continue
        if st == 2:
            if p > 0:
                mclaim[ru, p - 1] = 1
            if p < N_PITCHES - 1:
                mclaim[ru, p + 1] = 1
        if e >= thr:
            melf[p, F_SUM_LAST] = melf[p, F_SUM]  # sum over [start, this frame)
            melf[p, F_SUM] += e
            mel[p, S_LAST] = um
            mel[p, S_GAP] = 0
        else:
            melf[p, F_SUM] += np.float64(ring_note[ru, p])
            mel[p, S_GAP] += 1
        length = mel[p, S_LAST] - mel[p, S_START]
        if st == 1 and length > min_len:
            mel[p, S_STATE] = 2
            n_ev = _emit(ev, ev_amp, n_ev, EV_ON, mel[p, S_START], p,
                         melf[p, F_SUM_LAST] / length)
            for q in (p - 1, p + 1):
                if 0 <= q < N_PITCHES and mel[q, S_STATE] == 1:
                    mel[q, S_STATE] = 0
            for t in range(max(mel[p, S_START], um - RING + 1), um + 1):
                if p > 0:
                    mclaim[t & (RING - 1), p - 1] = 1
                if p < N_PITCHES - 1:
                    mclaim[t & (RING - 1), p + 1] = 1
        if mel[p, S_GAP] >= tol:
            if mel[p, S_STATE] == 2:
                n_ev = _emit(ev, ev_amp, n_ev, EV_OFF, mel[p, S_LAST], p,
                             melf[p, F_SUM_LAST] / max(length, 1))
            mel[p, S_STATE] = 0
    return n_ev


@numba.njit(nogil=True, cache=True)
def finish_decoding(g_end, prm, ring_note, claim, mclaim, act, actf, pend, mel, melf, dsc,
                    ev, ev_amp):
    """End of stream at frame g_end: the melodia frames still behind, then note-offs."""
    n = 0
    if prm[5] != 0.0:
        thr = prm[1]
        mlen = np.int64(prm[8])
        tol = np.int64(prm[3])
        for um in range(max(dsc[D_MEL_NEXT], g_end - RING + 1), g_end):
            n = _melodia_frame(um, thr, mlen, tol, ring_note, claim, mclaim, mel, melf,
                               ev, ev_amp, n)
        dsc[D_MEL_NEXT] = g_end
    return _end_all(act, actf, mel, melf, pend, ev, ev_amp, n)


@numba.njit(nogil=True, cache=True)
def reset_decoding(g_resume, act, actf, pend, mel, melf, dsc, xsc, ev, ev_amp):
    """A gap (dropped window or bad model output): end sounding notes, restart at g_resume."""
    n = _end_all(act, actf, mel, melf, pend, ev, ev_amp, 0)
    dsc[D_NEXT] = g_resume
    dsc[D_SINCE_RESET] = 0
    dsc[D_MEL_NEXT] = g_resume
    dsc[D_RESETS] += 1
    return n


# ------------------------------------------------------------------------ the transcriber


@dataclass(frozen=True)
class StreamConfig:
    """Streaming settings. hop_frames: frames each window contributes (inference rate =
    86.13 / hop_frames per second); margin_frames: frames left out at a window's right edge;
    confirm_frames: frames a note must last before its note-on (None: min_note_len, as
    offline; fewer is earlier, and a note that then dies before min_note_len frames still
    sounds briefly). Defaults chosen from bench/ml_bench.py's trade-off table."""

    rate_in: int = 48000
    hop_frames: int = 24
    margin_frames: int = 4
    confirm_frames: int | None = 8
    decode: DecodeParams = field(default_factory=lambda: DecodeParams(pitch_bends=False))
    max_block: int = 8192
    max_events: int = 4096

    def __post_init__(self) -> None:
        if not isinstance(self.hop_frames, int) or not 1 <= self.hop_frames <= 142:
            raise ValueError(f"hop_frames is {self.hop_frames!r}; allowed: 1..142")
        if not isinstance(self.margin_frames, int) or not 0 <= self.margin_frames <= 60:
            raise ValueError(f"margin_frames is {self.margin_frames!r}; allowed: 0..60")
        if self.hop_frames + self.margin_frames > WINDOW_FRAMES - 15:
            raise ValueError(f"hop_frames + margin_frames is "
                             f"{self.hop_frames + self.margin_frames}; allowed: at most "
                             f"{WINDOW_FRAMES - 15} (the window's left edge needs context)")
        c = self.confirm_frames
        if c is not None and (not isinstance(c, int) or not 1 <= c <= self.decode.min_note_len):
            raise ValueError(f"confirm_frames is {c!r}; allowed: None or 1.."
                             f"{self.decode.min_note_len} (min_note_len)")

    @property
    def first_row(self) -> int:
        """Row of a window's output where its contribution starts."""
        return WINDOW_FRAMES - self.margin_frames - self.hop_frames


@dataclass(frozen=True)
class Window:
    """One model input, ready: window index, float32 [1, 43844, 1] audio, and the input
    sample (clock of the source) at which its last sample arrived."""

    index: int
    audio: np.ndarray
    ready_sample: int


@dataclass(frozen=True)
class NoteMsg:
    """A note-on or note-off; `sample` is the note's time in the input's sample clock."""

    kind: str  # "on" or "off"
    pitch: int
    velocity: int
    sample: int
    frame: int
    amplitude: float


class StreamingTranscriber:
    """Audio blocks in, windows out (for the model), model outputs in, note messages out.

    `push(block)` returns the windows that became ready; run the model on each and pass the
    result to `decode(window.index, outputs)` in index order (`drop(index)` for a window that
    was skipped). `process(block, infer)` does all of it synchronously.
    """

    def __init__(self, cfg: StreamConfig, t0_sample: int = 0) -> None:
        self.cfg = cfg
        self.t0 = int(t0_sample)
        self.resampler = PolyphaseResampler(cfg.rate_in, SAMPLE_RATE, cfg.max_block)
        self.hop = cfg.hop_frames
        cap = WINDOW_SAMPLES + self.resampler.out.shape[0] + 16
        self.buf = np.zeros(cap, np.float32)  # 22050 Hz samples [buf_start, buf_start+fill)
        self.buf_start = 0
        self.fill = 0
        self.next_window = 0
        self.n_in = 0
        d = cfg.decode
        confirm = cfg.confirm_frames or d.min_note_len
        self.melodia_lag = confirm + MELODIA_EXTRA_LAG
        mlen = d.min_note_len if confirm >= d.min_note_len else confirm - 1
        self.prm = np.array([d.onset_thresh, d.frame_thresh, d.min_note_len, d.energy_tol,
                             confirm, 1.0 if d.melodia_trick else 0.0,
                             1.0 if d.infer_onsets else 0.0, self.melodia_lag, mlen])
        self.ring_note = np.zeros((RING, N_PITCHES), np.float32)
        self.ring_inf = np.zeros((RING, N_PITCHES))
        self.claim = np.zeros((RING, N_PITCHES), np.uint8)
        self.mclaim = np.zeros((RING, N_PITCHES), np.uint8)
        self.act = np.zeros((N_PITCHES, 5), np.int64)
        self.actf = np.zeros((N_PITCHES, 2))
        self.pend = np.zeros((N_PITCHES, 5), np.int64)
        self.pendf = np.zeros((N_PITCHES, 2))
        self.mel = np.zeros((N_PITCHES, 5), np.int64)
        self.melf = np.zeros((N_PITCHES, 2))
        self.dsc = np.zeros(8, np.int64)
        # running maxima behind the inferred-onset scale start from typical whole-clip values
        # (offline the scale is global; early in a stream a tiny running maximum would blow
        # small frame differences up into false onsets)
        self.xsc = np.array([PRIOR_MAX_ONSET, PRIOR_MAX_DIFF])
        self.ev = np.zeros((cfg.max_events, 3), np.int64)
        self.ev_amp = np.zeros(cfg.max_events)
        self.bad_outputs = 0
        self.dropped_windows = 0

    # ---- clocks
    def window_start(self, k: int) -> int:
        """First 22050 Hz sample of window k (negative: zeros before the stream)."""
        return (k * self.hop - self.cfg.first_row) * FFT_HOP

    def frame_to_sample(self, frame: int) -> int:
        """Input-clock sample of a model frame."""
        r = self.resampler
        return self.t0 + round(frame * FFT_HOP * r.down / r.up)

    def algorithmic_latency_s(self) -> tuple[float, float]:
        """(best, worst) seconds from an onset to the moment its note-on can be decided,
        without inference time: window wait + margin + peak + confirmation + resampler."""
        conf = int(self.prm[4])
        best = (self.cfg.margin_frames + 1 + conf) * FFT_HOP - 188 + 1
        worst = best + (self.hop - 1) * FFT_HOP
        la = self.resampler.lookahead_in / self.cfg.rate_in
        return best / SAMPLE_RATE + la, worst / SAMPLE_RATE + la

    # ---- audio side
    def push(self, block: np.ndarray) -> list[Window]:
        """Feed input audio ([n] or [n, channels] float, at rate_in); returns ready windows."""
        x = np.asarray(block)
        if x.ndim == 2:
            x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
        if x.ndim != 1:
            raise ValueError(f"block has shape {np.shape(block)}; expected [frames] or "
                             f"[frames, channels]")
        out = []
        for a in range(0, x.shape[0], self.cfg.max_block):
            part = np.ascontiguousarray(x[a:a + self.cfg.max_block], dtype=np.float32)
            self.n_in += part.shape[0]
            y = self.resampler.process(part)
            self._append(y)
            out.extend(self._ready())
        return out

    def _append(self, y: np.ndarray) -> None:
        if self.fill + y.shape[0] > self.buf.shape[0]:
            keep = WINDOW_SAMPLES
            drop = self.fill - keep
            self.buf[:keep] = self.buf[drop:self.fill]
            self.buf_start += drop
            self.fill = keep
        self.buf[self.fill:self.fill + y.shape[0]] = y
        self.fill += y.shape[0]

    def _ready(self) -> list[Window]:
        out = []
        end = self.buf_start + self.fill
        while self.window_start(self.next_window) + WINDOW_SAMPLES <= end:
            k = self.next_window
            s = self.window_start(k)
            w = np.zeros((1, WINDOW_SAMPLES, 1), np.float32)
            a = max(s, self.buf_start)
            if a < self.buf_start + self.fill:
                w[0, a - s:, 0] = self.buf[a - self.buf_start:s + WINDOW_SAMPLES
                                           - self.buf_start]
            out.append(Window(k, w, self.t0 + self.n_in))
            self.next_window += 1
        return out

    def flush(self) -> list[Window]:
        """End of input: zeros until every frame of the input is in a window."""
        n22 = self.resampler.state[1] + int(self.resampler.lookahead_in) + 1
        frames_needed = n22 // FFT_HOP + 1
        out = []
        while self.next_window * self.hop < frames_needed:
            out.extend(self.push(np.zeros(self.cfg.max_block, np.float32)))
        return out

    # ---- model side
    def _events(self, n: int) -> list[NoteMsg]:
        out = []
        for j in range(n):
            kind, frame, p = (int(v) for v in self.ev[j])
            amp = float(self.ev_amp[j])
            out.append(NoteMsg("on" if kind == EV_ON else "off", p + MIDI_OFFSET,
                               int(np.round(127 * min(max(amp, 0.0), 1.0))),
                               self.frame_to_sample(frame), frame, amp))
        return out

    def decode(self, k: int, outputs: dict[str, np.ndarray]) -> list[NoteMsg]:
        """Decode window k's model outputs ({"note", "onset"} of [1, 172, 88])."""
        g0 = k * self.hop
        msgs = []
        if g0 != self.dsc[D_NEXT]:
            if g0 < self.dsc[D_NEXT]:
                raise ValueError(f"window {k} decoded out of order (next frame "
                                 f"{int(self.dsc[D_NEXT])}, window starts at frame {g0})")
            msgs += self._reset(g0)
        for key in ("note", "onset"):
            shape = np.shape(outputs.get(key))
            if shape != (1, WINDOW_FRAMES, N_PITCHES):
                raise ValueError(f"model output '{key}' is {list(shape)}; expected "
                                 f"[1, {WINDOW_FRAMES}, {N_PITCHES}]")
        a, b = self.cfg.first_row, self.cfg.first_row + self.hop
        note = np.asarray(outputs["note"])[0, a:b]
        onset = np.asarray(outputs["onset"])[0, a:b]
        if not (np.all(np.isfinite(note)) and np.all(np.isfinite(onset))):
            self.bad_outputs += 1
            return msgs + self._reset(g0 + self.hop)
        n = decode_frames(np.ascontiguousarray(note, np.float32),
                          np.ascontiguousarray(onset, np.float32), g0, self.prm,
                          self.ring_note, self.ring_inf, self.claim, self.mclaim, self.act,
                          self.actf, self.pend, self.pendf, self.mel, self.melf, self.dsc,
                          self.xsc, self.ev, self.ev_amp)
        return msgs + self._events(n)

    def drop(self, k: int) -> list[NoteMsg]:
        """Window k was skipped (inference fell behind): sounding notes end, decoding
        restarts after it."""
        self.dropped_windows += 1
        return self._reset((k + 1) * self.hop)

    def _reset(self, g: int) -> list[NoteMsg]:
        n = reset_decoding(g, self.act, self.actf, self.pend, self.mel, self.melf, self.dsc,
                           self.xsc, self.ev, self.ev_amp)
        return self._events(n)

    def finish(self) -> list[NoteMsg]:
        """End of stream: remaining melodia frames, note-offs for sounding notes."""
        n = finish_decoding(int(self.dsc[D_NEXT]), self.prm, self.ring_note, self.claim,
                            self.mclaim, self.act, self.actf, self.pend, self.mel, self.melf,
                            self.dsc, self.ev, self.ev_amp)
        return self._events(n)

    def process(self, block: np.ndarray, infer: Infer) -> list[NoteMsg]:
        """push + infer + decode, synchronously (tests, offline streaming simulation)."""
        msgs = []
        for w in self.push(block):
            msgs += self.decode(w.index, dict(infer(w.audio)))
        return msgs

    def close(self, infer: Infer) -> list[NoteMsg]:
        """flush + decode the last windows + finish."""
        msgs = []
        for w in self.flush():
            msgs += self.decode(w.index, dict(infer(w.audio)))
        return msgs + self.finish()

    @property
    def counters(self) -> dict[str, int]:
        """Blocks with non-finite or clipped samples, bad model outputs, dropped windows,
        decoder restarts, event overflows."""
        st = self.resampler.state
        return {"nonfinite_blocks": int(st[2]), "clipped_blocks": int(st[3]),
                "bad_outputs": self.bad_outputs, "dropped_windows": self.dropped_windows,
                "decoder_resets": int(self.dsc[D_RESETS]),
                "event_overflows": int(self.dsc[D_OVERFLOW])}


def pair_notes(msgs: list[NoteMsg], rate: int) -> list[tuple[float, float, int]]:
    """(start s, end s, pitch) of each note from on/off messages (input clock from 0)."""
    open_: dict[int, NoteMsg] = {}
    out = []
    for m in msgs:
        if m.kind == "on":
            if m.pitch in open_:  # a re-attack without note-off: close the old one here
                o = open_.pop(m.pitch)
                out.append((o.sample / rate, max(m.sample, o.sample + 1) / rate, o.pitch))
            open_[m.pitch] = m
        elif m.pitch in open_:
            o = open_.pop(m.pitch)
            out.append((o.sample / rate, max(m.sample, o.sample + 1) / rate, o.pitch))
    return sorted(out)
