"""basic-pitch's note creation (note_creation.py of basic-pitch 0.4.0), ported to numba.

From stitched model frames (note, onset, contour) to note events, offline over a whole clip:
1. onsets inferred from frame differences (max of the model's onsets and the rescaled
   positive 1- and 2-frame differences of the note activations);
2. onset peaks (strict local maxima in time) at or above `onset_thresh`, taken from the last
   to the first (and high to low pitch within a frame); each note runs until its activation
   stays below `frame_thresh` for `energy_tol` frames, is kept when longer than
   `min_note_len` frames, and claims its pitch and both neighbours in a "remaining energy"
   matrix;
3. optionally the "melodia trick": from the strongest remaining activation above
   `frame_thresh`, notes grown both ways, until none is left;
4. optionally pitch bends per note from the contour output (1/3 semitone units).
The result is what basic-pitch's predict() returns as note_events (amplitude = mean note
activation). Quirk kept: when no frame difference is positive, basic-pitch divides 0 by 0
and finds no onsets at all; so does this port.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from echoel.dsp.basic_pitch_frames import (
    FFT_HOP,
    MIDI_OFFSET,
    N_CONTOUR_BINS,
    N_PITCHES,
    SAMPLE_RATE,
    ModelFrames,
    frame_times,
)

MAX_FREQ_IDX = N_PITCHES - 1
CONTOURS_BINS_PER_SEMITONE = 3
BASE_FREQUENCY = 27.5


def min_note_frames(minimum_note_length_ms: float = 127.70) -> int:
    """predict()'s conversion of the minimum note length from ms to frames (11 by default)."""
    return int(np.round(minimum_note_length_ms / 1000 * (SAMPLE_RATE / FFT_HOP)))


@dataclass(frozen=True)
class DecodeParams:
    """basic-pitch's decoding settings (predict()'s defaults)."""

    onset_thresh: float = 0.5
    frame_thresh: float = 0.3
    min_note_len: int = 11  # frames (predict() converts 127.70 ms)
    energy_tol: int = 11
    infer_onsets: bool = True
    melodia_trick: bool = True
    min_freq: float | None = None
    max_freq: float | None = None
    pitch_bends: bool = True

    def __post_init__(self) -> None:
        for name in ("onset_thresh", "frame_thresh"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise ValueError(f"{name} is {v}; allowed: 0 < value < 1")
        for name in ("min_note_len", "energy_tol"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} is {v!r}; allowed: an integer >= 1 (frames)")


@dataclass(frozen=True)
class NoteEvent:
    """One note: frames [start, end] as basic-pitch indexes them, seconds, MIDI pitch,
    amplitude 0..1 (velocity = round(127 * amplitude)), pitch bends or None."""

    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    pitch: int
    amplitude: float
    bends: tuple[int, ...] | None = None

    @property
    def velocity(self) -> int:
        """MIDI velocity as basic-pitch writes it."""
        return int(np.round(127 * self.amplitude))


@numba.njit(nogil=True, cache=True)
def infer_onsets_into(onsets, frames, out):
    """basic-pitch's get_infered_onsets (n_diff = 2) into out float64[T, P]; returns False when
    no difference is positive (basic-pitch then gets NaN everywhere: no onsets)."""
    T, P = frames.shape
    max_d = 0.0
    max_on = -np.inf
    for t in range(T):
        for p in range(P):
            if onsets[t, p] > max_on:
                max_on = onsets[t, p]
            if t < 2:
                d = 0.0
            else:
                d1 = np.float64(frames[t, p]) - np.float64(frames[t - 1, p])
                d2 = np.float64(frames[t, p]) - np.float64(frames[t - 2, p])
                d = min(d1, d2)
                if d < 0.0:
                    d = 0.0
            out[t, p] = d
            if d > max_d:
                max_d = d
    if max_d == 0.0 or T == 0:
        for t in range(T):
            for p in range(P):
                out[t, p] = np.nan
        return False
    for t in range(T):
        for p in range(P):
            v = (np.float64(max_on) * out[t, p]) / max_d
            o = np.float64(onsets[t, p])
            out[t, p] = o if o >= v else v
    return True


@numba.njit(nogil=True, cache=True)
def _scan_forward(energy, t0, p, frame_thresh, energy_tol, n_frames):
    """Index one past the last frame >= frame_thresh, scanning from t0 + 1 with energy_tol."""
    i = t0 + 1
    k = 0
    while i < n_frames - 1 and k < energy_tol:
        if energy[i, p] < frame_thresh:
            k += 1
        else:
            k = 0
        i += 1
    return i - k


@numba.njit(nogil=True, cache=True)
def _clear(energy, a, b, p):
    P = energy.shape[1]
    for t in range(a, b):
        energy[t, p] = 0.0
        if p < P - 1:
            energy[t, p + 1] = 0.0
        if p > 0:
            energy[t, p - 1] = 0.0


@numba.njit(nogil=True, cache=True)
def decode_notes(frames, onsets, onset_thresh, frame_thresh, min_note_len, energy_tol,
                 melodia, remaining, out_idx, out_amp):
    """Notes from frames float32[T, P] and (inferred) onsets float64[T, P].

    remaining: float64[T, P] work array; out_idx: int64[N, 3] (start, end, pitch index);
    out_amp: float64[N]. Returns the number of notes (at most N; more are dropped, -1 marks
    that in the return value as -(count) - 1).
    """
    T, P = frames.shape
    cap = out_idx.shape[0]
    count = 0
    overflow = False
    for t in range(T):
        for p in range(P):
            remaining[t, p] = frames[t, p]
    # onset peaks, last frame first, high pitch first within a frame
    for t in range(T - 1, -1, -1):
        for p in range(P - 1, -1, -1):
            v = onsets[t, p]
            is_peak = 0 < t < T - 1 and v > onsets[t - 1, p] and v > onsets[t + 1, p]
            pv = v if is_peak else 0.0
            if not pv >= onset_thresh:
                continue
            if t >= T - 1:
                continue
            i = _scan_forward(remaining, t, p, frame_thresh, energy_tol, T)
            if i - t <= min_note_len:
                continue
            _clear(remaining, t, i, p)
            s = 0.0
            for j in range(t, i):
                s += frames[j, p]
            if count < cap:
                out_idx[count, 0] = t
                out_idx[count, 1] = i
                out_idx[count, 2] = p
                out_amp[count] = s / (i - t)
                count += 1
            else:
                overflow = True
    if melodia:
        while True:
            best = -1.0
            bt = 0
            bp = 0
            for t in range(T):
                for p in range(P):
                    if remaining[t, p] > best:
                        best = remaining[t, p]
                        bt = t
                        bp = p
            if not best > frame_thresh:
                break
            remaining[bt, bp] = 0.0
            # forward pass
            i = bt + 1
            k = 0
            while i < T - 1 and k < energy_tol:
                if remaining[i, bp] < frame_thresh:
                    k += 1
                else:
                    k = 0
                _clear(remaining, i, i + 1, bp)
                i += 1
            i_end = i - 1 - k
            # backward pass
            i = bt - 1
            k = 0
            while i > 0 and k < energy_tol:
                if remaining[i, bp] < frame_thresh:
                    k += 1
                else:
                    k = 0
                _clear(remaining, i, i + 1, bp)
                i -= 1
            i_start = i + 1 + k
            if i_end - i_start <= min_note_len:
                continue
            s = 0.0
            for j in range(i_start, i_end):
                s += frames[j, bp]
            if count < cap:
                out_idx[count, 0] = i_start
                out_idx[count, 1] = i_end
                out_idx[count, 2] = bp
                out_amp[count] = s / (i_end - i_start)
                count += 1
            else:
                overflow = True
    return -count - 1 if overflow else count


def _hz_to_midi(hz: float) -> float:
    return 12.0 * (math.log2(hz) - math.log2(440.0)) + 69.0


def constrain_frequency(onsets: np.ndarray, frames: np.ndarray, max_freq: float | None,
                        min_freq: float | None) -> None:
    """Zero activations above max_freq and below min_freq (in place), as basic-pitch does."""
    if max_freq is not None:
        i = int(np.round(_hz_to_midi(max_freq) - MIDI_OFFSET))
        onsets[:, i:] = 0
        frames[:, i:] = 0
    if min_freq is not None:
        i = int(np.round(_hz_to_midi(min_freq) - MIDI_OFFSET))
        onsets[:, :i] = 0
        frames[:, :i] = 0


def _gaussian(m: int, std: float) -> np.ndarray:
    n = np.arange(0, m) - (m - 1.0) / 2.0
    return np.exp(-(n ** 2) / (2 * std * std))


def pitch_bends(contour: np.ndarray, start: int, end: int, pitch: int,
                n_bins_tolerance: int = 25) -> tuple[int, ...]:
    """Per-frame pitch bend (1/3 semitone units) from the contour, basic-pitch's
    get_pitch_bends for one note."""
    window_length = n_bins_tolerance * 2 + 1
    gauss = _gaussian(window_length, 5.0)
    hz = 440.0 * 2.0 ** ((pitch - 69) / 12.0)
    freq_idx = int(np.round(12.0 * CONTOURS_BINS_PER_SEMITONE * np.log2(hz / BASE_FREQUENCY)))
    f0 = max(freq_idx - n_bins_tolerance, 0)
    f1 = min(N_CONTOUR_BINS, freq_idx + n_bins_tolerance + 1)
    g = gauss[max(0, n_bins_tolerance - freq_idx):window_length
              - max(0, freq_idx - (N_CONTOUR_BINS - n_bins_tolerance - 1))]
    sub = contour[start:end, f0:f1] * g
    shift = n_bins_tolerance - max(0, n_bins_tolerance - freq_idx)
    return tuple(int(b) for b in np.argmax(sub, axis=1) - shift)


def notes_from_frames(mf: ModelFrames, params: DecodeParams | None = None) -> list[NoteEvent]:
    """basic-pitch's model_output_to_notes: note events from stitched frames (offline)."""
    p = params or DecodeParams()
    frames = np.ascontiguousarray(mf.note, dtype=np.float32).copy()
    onsets = np.ascontiguousarray(mf.onset, dtype=np.float32).copy()
    if frames.ndim != 2 or frames.shape[1] != N_PITCHES or onsets.shape != frames.shape:
        raise ValueError(f"note/onset frames are {frames.shape}/{onsets.shape}; expected "
                         f"[frames, {N_PITCHES}] each")
    if not (np.all(np.isfinite(frames)) and np.all(np.isfinite(onsets))):
        raise ValueError("model frames contain NaN or Inf: the model output is unusable")
    constrain_frequency(onsets, frames, p.max_freq, p.min_freq)
    T = frames.shape[0]
    inferred = np.empty((T, N_PITCHES), np.float64)
    if p.infer_onsets:
        infer_onsets_into(onsets, frames, inferred)
    else:
        inferred[:] = onsets
    remaining = np.empty((T, N_PITCHES), np.float64)
    cap = max(16, T * 4)
    idx = np.zeros((cap, 3), np.int64)
    amp = np.zeros(cap, np.float64)
    n = decode_notes(frames, inferred, p.onset_thresh, p.frame_thresh, p.min_note_len,
                     p.energy_tol, p.melodia_trick, remaining, idx, amp)
    if n < 0:
        n = -n - 1
    times = frame_times(mf.contour.shape[0] if mf.contour is not None else T)
    out = []
    for j in range(n):
        s, e, q = (int(v) for v in idx[j])
        bends = (pitch_bends(mf.contour, s, e, q + MIDI_OFFSET)
                 if p.pitch_bends and mf.contour is not None else None)
        out.append(NoteEvent(s, e, float(times[s]), float(times[e]), q + MIDI_OFFSET,
                             float(amp[j]), bends))
    return out
