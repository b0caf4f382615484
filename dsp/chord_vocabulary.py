"""Chord vocabulary: Harte labels, HMM states (chord x bass note) and their templates.

A chord is a root (12) and a quality: maj, min, 7, maj7, min7 (or maj and min only). Each
chord has one HMM state per chord tone that may be in the bass (root position and
inversions); the last state is N (no chord). State templates:

- treble: the chord's pitch classes, the seventh weighted by `seventh_weight`, unit norm;
- bass: the pitch class expected lowest (root, third, fifth or seventh).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PITCH_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
QUALITIES: dict[str, tuple[int, ...]] = {
    "maj": (0, 4, 7),
    "min": (0, 3, 7),
    "7": (0, 4, 7, 10),
    "maj7": (0, 4, 7, 11),
    "min7": (0, 3, 7, 10),
}
TRIADS = ("maj", "min")
SEVENTHS = ("maj", "min", "7", "maj7", "min7")
NO_CHORD = "N"


@dataclass(frozen=True)
class Vocabulary:
    """Chords and HMM states. Chord c has label labels[c]; the last chord is N."""

    labels: tuple[str, ...]  # per chord, Harte syntax; labels[-1] == "N"
    state_chord: np.ndarray  # int64[S]: chord of each state; the last state is N
    state_bass: np.ndarray  # int64[S]: bass pitch class, -1 for N
    state_inverted: np.ndarray  # float64[S]: 1.0 when the bass is not the root
    state_seventh: np.ndarray  # float64[S]: 1.0 for seventh chords
    templates: np.ndarray  # float64[S, 12]: unit-norm treble templates (zeros for N)

    @property
    def n_states(self) -> int:
        """Number of HMM states, N included."""
        return int(self.state_chord.shape[0])

    @property
    def n_state(self) -> int:
        """Index of the N state (the last)."""
        return self.n_states - 1


def vocabulary(qualities: tuple[str, ...] = SEVENTHS, seventh_weight: float = 1.1,
               inversions: bool = True) -> Vocabulary:
    """The chords of `qualities` on all 12 roots, plus N; one state per possible bass note
    (root only when `inversions` is False)."""
    unknown = [q for q in qualities if q not in QUALITIES]
    if unknown or not qualities:
        raise ValueError(f"vocabulary: qualities {qualities!r}; allowed {tuple(QUALITIES)}")
    if not 0.0 < seventh_weight <= 3.0:
        raise ValueError(f"vocabulary: seventh_weight {seventh_weight}; allowed (0, 3]")
    labels: list[str] = []
    chord: list[int] = []
    bass: list[int] = []
    inverted: list[float] = []
    seventh: list[float] = []
    templates: list[np.ndarray] = []
    for q in qualities:
        iv = QUALITIES[q]
        for root in range(12):
            c = len(labels)
            labels.append(f"{PITCH_NAMES[root]}:{q}")
            t = np.zeros(12)
            for j, i in enumerate(iv):
                t[(root + i) % 12] = 1.0 if j < 3 else seventh_weight
            t /= np.linalg.norm(t)
            for j, i in enumerate(iv if inversions else iv[:1]):
                chord.append(c)
                bass.append((root + i) % 12)
                inverted.append(1.0 if j > 0 else 0.0)
                seventh.append(1.0 if len(iv) == 4 else 0.0)
                templates.append(t)
    labels.append(NO_CHORD)
    chord.append(len(labels) - 1)
    bass.append(-1)
    inverted.append(0.0)
    seventh.append(0.0)
    templates.append(np.zeros(12))
    return Vocabulary(tuple(labels), np.asarray(chord, dtype=np.int64),
                      np.asarray(bass, dtype=np.int64), np.asarray(inverted),
                      np.asarray(seventh), np.asarray(templates))
