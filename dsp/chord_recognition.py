"""Chord recognition: chroma and bass chroma -> chord states -> HMM -> Harte-labelled segments.

Frame score of state s (chord c with bass note b), from the treble chroma t and bass chroma u
of one frame (dsp/chroma.py):

    score(s) = cos(t, template_c) + w_bass * u[b] / sum(u)
               - inversion_penalty * [b is not the root] - seventh_penalty * [c is a seventh]

N scores `silence_score` when the frame's mean square is below `silence_db` (or the chroma is
empty) and 0 otherwise. The HMM takes beta * score as log-likelihood, with a self-transition
prior `stay` per 21.3 ms frame. Decoding: offline (full Viterbi) or streaming with a fixed lag
(default 1.5 s: 70 frames). The constants were chosen on a development set of rendered
chorales and generated songs (seeds apart from the test and benchmark sets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from echoel.dsp.chord_hmm import (
    FixedLagViterbi,
    fixed_lag_flush,
    fixed_lag_step,
    transition_logs,
    viterbi_offline,
)
from echoel.dsp.chord_vocabulary import SEVENTHS, TRIADS, Vocabulary, vocabulary
from echoel.dsp.chroma import ChromaConfig, ChromaFrames, ChromaState, chroma_offline

Segment = tuple[float, float, str]
# scalar parameter slots of the scoring kernel
P_BETA, P_WBASS, P_INV, P_SEV, P_SILENCE_MS, P_SILENCE_SCORE = range(6)


@dataclass(frozen=True)
class ChordParams:
    """Chord model constants."""

    sevenths: bool = True  # vocabulary maj, min, 7, maj7, min7 (else maj, min)
    inversions: bool = True  # a state per possible bass note
    beta: float = 3.8  # log-likelihood per unit of score
    stay: float = 0.94  # self-transition probability per frame
    bass_weight: float = 0.5
    inversion_penalty: float = 0.02
    seventh_penalty: float = 0.045
    seventh_weight: float = 1.1  # the seventh's weight in the treble template
    silence_db: float = -70.0  # frames below this mean square (dBFS) are N
    silence_score: float = 10.0
    lag_seconds: float = 1.5  # streaming decision delay

    def validate(self) -> None:
        """Raise ValueError naming the parameter when a value is outside what works."""
        if not self.beta > 0.0:
            raise ValueError(f"chords: beta {self.beta}; must be > 0")
        if not 0.0 < self.stay < 1.0:
            raise ValueError(f"chords: stay {self.stay}; allowed (0, 1)")
        if not 0.0 <= self.bass_weight <= 10.0:
            raise ValueError(f"chords: bass_weight {self.bass_weight}; allowed 0..10")
        if not -120.0 <= self.silence_db <= 0.0:
            raise ValueError(f"chords: silence_db {self.silence_db}; allowed -120..0")
        if not 0.0 < self.lag_seconds <= 30.0:
            raise ValueError(f"chords: lag_seconds {self.lag_seconds}; allowed (0, 30]")

    def vocabulary(self) -> Vocabulary:
        """The HMM states these parameters use."""
        return vocabulary(SEVENTHS if self.sevenths else TRIADS, self.seventh_weight,
                          self.inversions)

    def scalars(self) -> np.ndarray:
        """The scoring kernel's parameter array."""
        p = np.zeros(6)
        p[P_BETA] = self.beta
        p[P_WBASS] = self.bass_weight
        p[P_INV] = self.inversion_penalty
        p[P_SEV] = self.seventh_penalty
        p[P_SILENCE_MS] = 10.0 ** (self.silence_db / 10.0)
        p[P_SILENCE_SCORE] = self.silence_score
        return p


@numba.njit(nogil=True, cache=True)
def frame_scores(treble, bass, energy, templates, state_bass, state_inv, state_sev, par, out):
    """HMM log-likelihoods of one frame (treble/bass chroma float[12]) into out[S]; the last
    state is N. Non-finite input scores as silence."""
    s_n = out.shape[0]
    tn = 0.0
    bs = 0.0
    finite = math.isfinite(energy)
    for p in range(12):
        tn += treble[p] * treble[p]
        bs += bass[p]
        if not (math.isfinite(treble[p]) and math.isfinite(bass[p])):
            finite = False
    tn = math.sqrt(tn) if finite else 0.0
    silent = (not finite) or energy < par[P_SILENCE_MS] or tn <= 1e-12
    beta = par[P_BETA]
    top = -math.inf
    for s in range(s_n - 1):
        if silent:
            v = 0.0
        else:
            dot = 0.0
            for p in range(12):
                dot += treble[p] * templates[s, p]
            v = dot / tn
            if bs > 1e-12:
                v += par[P_WBASS] * bass[state_bass[s]] / bs
        v -= par[P_INV] * state_inv[s] + par[P_SEV] * state_sev[s]
        v *= beta
        out[s] = v
        if v > top:
            top = v
    out[s_n - 1] = beta * (par[P_SILENCE_SCORE] if silent else 0.0)
    if out[s_n - 1] > top:
        top = out[s_n - 1]
    for s in range(s_n):
        out[s] -= top


@numba.njit(nogil=True, cache=True)
def chord_frames(treble, bass, energy, n, templates, state_bass, state_inv, state_sev, par,
                 scores, delta, bp, ints, l_stay, l_switch, out_states):
    """Score and decode frames 0..n-1 of treble/bass/energy with the fixed-lag decoder;
    decided states (oldest first) into out_states. Returns how many were decided."""
    k = 0
    for f in range(n):
        frame_scores(treble[f], bass[f], energy[f], templates, state_bass, state_inv,
                     state_sev, par, scores)
        s = fixed_lag_step(scores, delta, bp, ints, l_stay, l_switch)
        if s >= 0:
            out_states[k] = s
            k += 1
    return k


def states_to_segments(states: np.ndarray, vocab: Vocabulary, times: np.ndarray,
                       hop_seconds: float, end: float) -> list[Segment]:
    """(start, end, label) segments of a state path whose frame f is centred at times[f];
    the first starts at 0, the last ends at `end`; neighbouring equal chords are joined."""
    out: list[Segment] = []
    labels = vocab.labels
    chords = vocab.state_chord[np.asarray(states, dtype=np.int64)]
    for f, c in enumerate(chords):
        s = 0.0 if f == 0 else max(0.0, float(times[f]) - hop_seconds / 2)
        e = end if f == len(chords) - 1 else min(end, float(times[f]) + hop_seconds / 2)
        if e <= s:
            continue
        lab = labels[c]
        if out and out[-1][2] == lab:
            out[-1] = (out[-1][0], e, lab)
        else:
            if out:
                s = out[-1][1]
            out.append((s, e, lab))
    return out


def _scores_offline(frames: ChromaFrames, params: ChordParams, vocab: Vocabulary) -> np.ndarray:
    par = params.scalars()
    logp = np.zeros((frames.chroma.shape[0], vocab.n_states))
    for f in range(logp.shape[0]):
        frame_scores(frames.chroma[f], frames.bass[f], frames.energy[f], vocab.templates,
                     vocab.state_bass, vocab.state_inverted, vocab.state_seventh, par, logp[f])
    return logp


def decode_offline(frames: ChromaFrames, params: ChordParams | None = None) -> np.ndarray:
    """State path (full Viterbi) of a whole signal's chroma frames."""
    params = params or ChordParams()
    params.validate()
    vocab = params.vocabulary()
    logp = _scores_offline(frames, params, vocab)
    l_stay, l_switch = transition_logs(params.stay, vocab.n_states)
    path = np.zeros(logp.shape[0], dtype=np.int64)
    viterbi_offline(logp, l_stay, l_switch, np.zeros(vocab.n_states),
                    np.zeros(logp.shape, dtype=np.int32), path)
    return path


def recognize_chords(audio: np.ndarray, rate: int, params: ChordParams | None = None,
                     config: ChromaConfig | None = None) -> list[Segment]:
    """Offline chord segments (start s, end s, Harte label) of float audio [frames, channels]."""
    params = params or ChordParams()
    if audio.ndim == 1:
        audio = audio[:, None]
    cfg = config or ChromaConfig(rate=rate, channels=audio.shape[1])
    if cfg.rate != rate:
        raise ValueError(f"chords: config rate {cfg.rate} Hz but audio at {rate} Hz")
    frames = chroma_offline(audio, cfg)
    path = decode_offline(frames, params)
    return states_to_segments(path, params.vocabulary(), frames.times, frames.hop_seconds,
                              audio.shape[0] / rate)


class ChordRecognizer:
    """Streaming chord recognition: blocks in, decided frame states out after a fixed lag.

    process(block) returns n; self.states[:n] are the states of frames
    self.decided - n .. self.decided - 1 (labels: self.vocab.labels[self.vocab.state_chord[s]]).
    Nothing is allocated per block."""

    def __init__(self, config: ChromaConfig | None = None, params: ChordParams | None = None,
                 max_frames: int = 1024) -> None:
        self.params = params or ChordParams()
        self.params.validate()
        self.chroma = ChromaState(config, max_frames)
        self.vocab = self.params.vocabulary()
        cfg = self.chroma.config
        lag = max(1, round(self.params.lag_seconds / cfg.hop_seconds))
        self.decoder = FixedLagViterbi(self.vocab.n_states, lag, self.params.stay)
        self.par = self.params.scalars()
        self.scores = np.zeros(self.vocab.n_states)
        self.states = np.zeros(max(self.chroma.chroma.shape[0], lag + 1), dtype=np.int64)
        self.new_frames = 0  # chroma frames made by the last process() (in self.chroma)

    @property
    def lag_seconds(self) -> float:
        """Decision delay of the streaming output, seconds."""
        return self.decoder.lag * self.chroma.config.hop_seconds

    @property
    def decided(self) -> int:
        """Frames decided so far."""
        return int(self.decoder.ints[1])

    def process(self, block: np.ndarray) -> int:
        """Analyse one block; returns the number of newly decided frames (in self.states)."""
        n = self.chroma.process(block)
        self.new_frames = n
        if n == 0:
            return 0
        d = self.decoder
        return chord_frames(self.chroma.chroma, self.chroma.bass, self.chroma.energy, n,
                            self.vocab.templates, self.vocab.state_bass,
                            self.vocab.state_inverted, self.vocab.state_seventh, self.par,
                            self.scores, d.delta, d.bp, d.ints, d.l_stay, d.l_switch,
                            self.states)

    def finish(self) -> int:
        """End of stream: decide the frames still inside the lag (into self.states)."""
        d = self.decoder
        return fixed_lag_flush(d.delta, d.bp, d.ints, self.states)

    def reset(self) -> None:
        """Start a new stream (the tuning estimate is kept)."""
        self.chroma.reset()
        self.decoder.reset()

    def label(self, state: int) -> str:
        """Harte label of a state."""
        return self.vocab.labels[int(self.vocab.state_chord[state])]


def recognize_stream(audio: np.ndarray, rate: int, block: int = 128,
                     params: ChordParams | None = None) -> list[Segment]:
    """Chord segments of `audio` computed block by block with the streaming recognizer
    (fixed lag), as a live input would be; the signal is followed by the analysis tail."""
    if audio.ndim == 1:
        audio = audio[:, None]
    cfg = ChromaConfig(rate=rate, channels=audio.shape[1])
    rec = ChordRecognizer(cfg, params, max_frames=block)
    rec.chroma.check_block(audio[:block])
    tail = np.zeros((cfg.fft_size * cfg.decimation // 2, audio.shape[1]), dtype=audio.dtype)
    states: list[np.ndarray] = []
    for src in (audio, tail):
        for s in range(0, src.shape[0], block):
            n = rec.process(np.ascontiguousarray(src[s:s + block]))
            if n:
                states.append(rec.states[:n].copy())
    n = rec.finish()
    states.append(rec.states[:n].copy())
    path = np.concatenate(states)
    times = np.asarray(rec.chroma.frame_time(np.arange(path.shape[0])), dtype=np.float64)
    return states_to_segments(path, rec.vocab, times, cfg.hop_seconds, audio.shape[0] / rate)
