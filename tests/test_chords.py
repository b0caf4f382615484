"""Chord recognition (dsp/chord_recognition.py), its HMM (dsp/chord_hmm.py) and vocabulary
(dsp/chord_vocabulary.py).

References in the same run: librosa's Viterbi on the same scores and transition matrix, the
baseline (librosa chroma_cqt + templates + Viterbi, bench/dsp_chords.py) on the same rendered
set, numpy-synthesised chord sequences of known labels, and the offline decoder for the
streaming one.
"""

from __future__ import annotations

import librosa
import mir_eval
import numpy as np
import pytest
from echoel.dsp.chord_hmm import FixedLagViterbi, fixed_lag_flush, fixed_lag_step, viterbi
from echoel.dsp.chord_recognition import (
    ChordParams,
    ChordRecognizer,
    recognize_chords,
    recognize_stream,
)
from echoel.dsp.chord_vocabulary import SEVENTHS, TRIADS, vocabulary
from echoel.dsp.chroma import ChromaConfig

from bench.dsp_chords import baseline_chords, frame_agreement, wcsr
from bench.evalset.chord_set import small_set

RATE = 48000
BLOCK = 128


def tones(midi: list[int], seconds: float, amp: float = 0.08) -> np.ndarray:
    """Stereo float32 harmonic tones (partial h at 0.6^(h-1)) with a short fade in and out."""
    t = np.arange(int(seconds * RATE)) / RATE
    y = np.zeros_like(t)
    for m in midi:
        f0 = 440.0 * 2.0 ** ((m - 69) / 12.0)
        for h in range(1, 11):
            if h * f0 < RATE / 2.5:
                y += amp * 0.6 ** (h - 1) * np.sin(2 * np.pi * h * f0 * t + m + h)
    ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)
    return np.repeat((y * ramp)[:, None], 2, axis=1).astype(np.float32)


# (label, MIDI notes): root position, inversions (lowest note not the root), sevenths
SEQUENCE = [
    ("C:maj", [48, 64, 67, 72]),
    ("A:min7", [45, 60, 64, 67, 69]),
    ("F:maj7", [41, 57, 60, 64, 65]),
    ("G:7", [43, 59, 62, 65, 67]),
    ("C:maj", [40, 60, 67, 72]),  # C/E
    ("D:min", [45, 62, 65, 69]),  # Dm/A
    ("E:maj", [40, 56, 59, 64]),
]


def labels_at(segments, times):
    starts = np.array([s for s, _, _ in segments])
    return [segments[max(0, int(np.searchsorted(starts, t, side="right")) - 1)][2]
            for t in times]


# ----------------------------------------------------------------------------- vocabulary, HMM

def test_vocabulary_labels_and_states():
    voc = vocabulary(SEVENTHS)
    assert len(voc.labels) == 61 and voc.labels[-1] == "N"
    for lab in voc.labels:
        mir_eval.chord.encode(lab)  # valid Harte syntax
    assert voc.n_states == 12 * (3 + 3 + 4 + 4 + 4) + 1
    np.testing.assert_allclose(np.linalg.norm(voc.templates[:-1], axis=1), 1.0)
    c = voc.labels.index("C:maj7")
    basses = sorted(voc.state_bass[voc.state_chord == c].tolist())
    assert basses == [0, 4, 7, 11]
    tri = vocabulary(TRIADS, inversions=False)
    assert len(tri.labels) == 25 and tri.n_states == 25
    with pytest.raises(ValueError, match="qualities"):
        vocabulary(("maj", "sus4"))


def test_viterbi_matches_librosa():
    rng = np.random.default_rng(3)
    for k, stay in ((5, 0.9), (25, 0.97), (61, 0.6)):
        logp = rng.normal(0, 2.0, (300, k))
        trans = np.full((k, k), (1 - stay) / (k - 1))
        np.fill_diagonal(trans, stay)
        prob = np.exp(logp - logp.max(axis=1, keepdims=True))
        ref = librosa.sequence.viterbi(prob.T, trans, p_init=np.full(k, 1.0 / k))
        np.testing.assert_array_equal(viterbi(logp, stay), ref)


def test_fixed_lag_equals_offline_when_the_lag_covers_it():
    rng = np.random.default_rng(4)
    k, stay = 20, 0.95
    # a piecewise-constant truth with noisy scores
    truth = np.repeat(rng.integers(0, k, 30), 20)
    logp = rng.normal(0, 1.0, (truth.size, k))
    logp[np.arange(truth.size), truth] += 1.5
    offline = viterbi(logp, stay)
    for lag, floor in ((truth.size, 1.0), (40, 0.97)):
        dec = FixedLagViterbi(k, lag, stay)
        out = []
        for f in range(truth.size):
            s = fixed_lag_step(logp[f], dec.delta, dec.bp, dec.ints, dec.l_stay, dec.l_switch)
            if s >= 0:
                out.append(s)
        n = fixed_lag_flush(dec.delta, dec.bp, dec.ints, dec.flushed)
        out.extend(dec.flushed[:n].tolist())
        assert len(out) == truth.size
        assert np.mean(np.asarray(out) == offline) >= floor, lag
    assert np.mean(offline == truth) > 0.9


# ----------------------------------------------------------------------------- known chords

def test_synthesised_sequence_with_inversions_and_sevenths():
    audio = np.concatenate([tones(m, 1.5) for _, m in SEQUENCE])
    segs = recognize_chords(audio, RATE)
    mids = [1.5 * i + 0.75 for i in range(len(SEQUENCE))]
    assert labels_at(segs, mids) == [lab for lab, _ in SEQUENCE]
    # boundaries within 0.15 s of the truth
    bounds = [e for _, e, _ in segs[:-1]]
    for i in range(1, len(SEQUENCE)):
        assert min(abs(b - 1.5 * i) for b in bounds) < 0.15


def test_silence_is_no_chord():
    segs = recognize_chords(np.zeros((3 * RATE, 2), np.float32), RATE)
    assert segs == [(0.0, 3.0, "N")]
    quiet = tones([60, 64, 67], 2.0, amp=1e-5)  # -100 dBFS: below the N threshold
    assert {lab for *_, lab in recognize_chords(quiet, RATE)} == {"N"}


def test_triad_vocabulary():
    audio = np.concatenate([tones(m, 1.5) for _, m in SEQUENCE[:4]])
    segs = recognize_chords(audio, RATE, ChordParams(sevenths=False))
    got = labels_at(segs, [0.75, 2.25, 3.75, 5.25])
    assert got == ["C:maj", "A:min", "F:maj", "G:maj"]


# ----------------------------------------------------------------------------- streaming

def test_streaming_agrees_with_offline_and_handles_nan():
    audio = np.concatenate([tones(m, 1.5) for _, m in SEQUENCE])
    offline = recognize_chords(audio, RATE)
    streamed = recognize_stream(audio, RATE, BLOCK)
    assert frame_agreement(offline, streamed) >= 0.98
    # a NaN block mid-chord: counted, the stream goes on, later chords unchanged
    dirty = audio.copy()
    dirty[int(2.2 * RATE):int(2.2 * RATE) + BLOCK, :] = np.nan
    rec = ChordRecognizer(ChromaConfig(), max_frames=BLOCK)
    states = []
    for s in range(0, dirty.shape[0] - BLOCK + 1, BLOCK):
        n = rec.process(dirty[s:s + BLOCK])
        states.extend(rec.states[:n].tolist())
    states.extend(rec.states[:rec.finish()].tolist())
    assert rec.chroma.bad_blocks == 1
    times = np.asarray(rec.chroma.frame_time(np.arange(len(states))))
    labels = np.array([rec.label(s) for s in states])
    for i, (lab, _) in enumerate(SEQUENCE[2:], start=2):
        mid = np.abs(times - (1.5 * i + 0.75)) < 0.4
        assert np.all(labels[mid] == lab), (i, set(labels[mid]))
    assert rec.lag_seconds == pytest.approx(1.5, abs=0.03)


def test_wrong_parameters_raise_at_construction():
    with pytest.raises(ValueError, match="stay"):
        ChordRecognizer(params=ChordParams(stay=1.0))
    with pytest.raises(ValueError, match="lag_seconds"):
        ChordRecognizer(params=ChordParams(lag_seconds=0.0))
    with pytest.raises(ValueError, match="beta"):
        ChordRecognizer(params=ChordParams(beta=-1.0))
    with pytest.raises(ValueError, match="rate"):
        recognize_chords(np.zeros((100, 2), np.float32), 44100, config=ChromaConfig())


# ----------------------------------------------------------------------------- rendered set

@pytest.fixture(scope="module")
def rendered():
    """The small set (2 chorales, 3 songs) with our and the baseline's segments."""
    pieces = small_set()
    ours = [recognize_chords(p.audio, p.rate) for p in pieces]
    base = [baseline_chords(p.audio, p.rate) for p in pieces]
    return pieces, ours, base


@pytest.mark.parametrize(("kind", "floors"), [
    ("pop", {"root": 0.85, "majmin": 0.85, "sevenths": 0.75}),
    ("chorale", {"root": 0.70, "majmin": 0.78, "sevenths": 0.68}),
])
def test_wcsr_above_baseline_and_floors(rendered, kind, floors):
    """Songs (inversions, drums, melody) and chorales: mir_eval WCSR of ours above the
    baseline's on the same audio, and above floors set under the measured figures."""
    pieces, ours, base = rendered
    idx = [i for i, p in enumerate(pieces) if p.kind == kind]
    ps = [pieces[i] for i in idx]
    w_ours = wcsr(ps, [ours[i] for i in idx])
    w_base = wcsr(ps, [base[i] for i in idx])
    for m, floor in floors.items():
        assert w_ours[m] >= floor, (m, w_ours, w_base)
    assert w_ours["majmin"] > w_base["majmin"], (w_ours, w_base)
    assert w_ours["sevenths"] > w_base["sevenths"], (w_ours, w_base)


def test_streaming_agrees_with_offline_on_a_song(rendered):
    pieces, ours, _ = rendered
    i = next(i for i, p in enumerate(pieces) if p.kind == "pop")
    streamed = recognize_stream(pieces[i].audio, RATE, BLOCK)
    assert frame_agreement(streamed, ours[i]) >= 0.95
