"""Clips for audio-to-MIDI evaluation: deterministic pretty_midi pieces on several GM instruments.

Each piece comes from a seeded generator (numpy default_rng), so the MIDI ground truth is the
same on every machine; the audio is rendered by bench.evalset.render (FluidSynth + FluidR3_GM,
cached under build/, never committed).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pretty_midi

# name: (GM program, lowest MIDI note, highest, style)
PIECES: dict[str, tuple[int, int, int, str]] = {
    "piano_chords": (0, 48, 84, "chords"),
    "guitar_arpeggio": (24, 40, 76, "arpeggio"),
    "flute_melody": (73, 60, 93, "melody"),
    "bass_line": (33, 28, 55, "melody"),
    "violin_legato": (40, 55, 88, "legato"),
}
SCALE = (0, 2, 4, 5, 7, 9, 11)  # major


def _scale_notes(lo: int, hi: int, root: int) -> list[int]:
    return [n for n in range(lo, hi + 1) if (n - root) % 12 in SCALE]


def piece(name: str, duration_s: float = 6.0, seed: int | None = None) -> pretty_midi.PrettyMIDI:
    """One generated piece, `duration_s` long (notes end by then plus a short release)."""
    program, lo, hi, style = PIECES[name]
    digest = hashlib.sha256(name.encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:4], "little") if seed is None else seed)
    root = int(rng.integers(0, 12))
    notes = _scale_notes(lo, hi, root)
    pm = pretty_midi.PrettyMIDI(initial_tempo=120)
    inst = pretty_midi.Instrument(program=program, name=name)
    t = 0.25
    end = duration_s - 0.3
    idx = len(notes) // 2
    while t < end:
        if style == "chords":
            dur = float(rng.choice([0.5, 0.75, 1.0]))
            base = int(rng.integers(0, max(1, len(notes) - 5)))
            chord = [notes[base], notes[min(base + 2, len(notes) - 1)],
                     notes[min(base + 4, len(notes) - 1)]]
            vel = int(rng.integers(70, 110))
            for n in sorted(set(chord)):
                inst.notes.append(pretty_midi.Note(vel, n, t, min(t + dur * 0.9, end)))
            t += dur
        elif style == "arpeggio":
            base = int(rng.integers(0, max(1, len(notes) - 7)))
            for step in (0, 2, 4, 7, 4, 2):
                if t >= end:
                    break
                n = notes[min(base + step, len(notes) - 1)]
                inst.notes.append(pretty_midi.Note(int(rng.integers(70, 105)), n, t,
                                                   min(t + 0.45, end)))
                t += 0.25
        else:
            idx = int(np.clip(idx + rng.integers(-2, 3), 0, len(notes) - 1))
            dur = float(rng.choice([0.25, 0.5, 0.5, 0.75, 1.0]))
            gap = 0.02 if style == "legato" else 0.08
            inst.notes.append(pretty_midi.Note(int(rng.integers(75, 110)), notes[idx], t,
                                               min(t + dur - gap, end)))
            t += dur
    pm.instruments.append(inst)
    return pm


def clips(duration_s: float = 6.0) -> dict[str, pretty_midi.PrettyMIDI]:
    """Every piece, each `duration_s` long."""
    return {name: piece(name, duration_s) for name in PIECES}


def medley(duration_s: float = 30.0) -> pretty_midi.PrettyMIDI:
    """The pieces one after another, up to `duration_s` (for longer benchmark runs)."""
    out = pretty_midi.PrettyMIDI(initial_tempo=120)
    each = duration_s / len(PIECES)
    for k, name in enumerate(PIECES):
        src = piece(name, each)
        inst = src.instruments[0]
        for n in inst.notes:
            n.start += k * each
            n.end += k * each
        out.instruments.append(inst)
    return out


def ground_truth(pm: pretty_midi.PrettyMIDI) -> tuple[np.ndarray, np.ndarray]:
    """(intervals [n, 2] seconds, pitches [n] Hz) for mir_eval.transcription."""
    notes = sorted((n.start, n.end, n.pitch) for i in pm.instruments for n in i.notes)
    iv = np.array([[s, e] for s, e, _ in notes], float).reshape(-1, 2)
    hz = np.array([440.0 * 2 ** ((p - 69) / 12) for _, _, p in notes], float)
    return iv, hz
