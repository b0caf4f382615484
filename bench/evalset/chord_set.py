"""Chord and key evaluation set: Bach chorales and generated pop progressions, rendered.

Two kinds of piece, both deterministic by seed, both rendered from MIDI with FluidSynth and
FluidR3_GM (bench.evalset.render, cached under build/; the audio is never committed):

- "chorale": a Bach chorale from music21's corpus (Riemenschneider numbering), played by organ,
  strings, piano or choir at a tempo drawn per piece. Ground truth: the chordified slices'
  pitch-class sets. A slice whose pitch classes are exactly a chord of the vocabulary
  (maj, min, 7, maj7, min7), or such a chord with its fifth omitted (root and third present),
  gets that label; a diminished, half-diminished, diminished-seventh or augmented chord gets
  its quality with the root music21 finds (scored by `root` only: mir_eval's majmin/sevenths
  skip those qualities); anything else (passing tones, suspensions, open fifths, unisons) is
  "X", which mir_eval leaves out of every score. The key is music21's analysed key.
- "pop": a generated song in a drawn key (major or minor), tempo and style: progressions of
  diatonic triads and sevenths (maj, min, 7, maj7, min7), harmonic rhythm of half a bar to two
  bars, comping with varied voicings and patterns (piano, electric piano, guitar, strings,
  organ, pads), a bass line whose note under a chord may be its third, fifth or seventh
  (inversions, labelled Harte-style, e.g. "C:maj/3") with passing notes, a melody over the
  chords (chord tones on strong beats, scale steps between), and drums on GM channel 10.
  Ground truth is what the generator wrote; the key is the drawn key.

Labels are Harte syntax for mir_eval.chord; keys are "C major" / "A minor" for mir_eval.key.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pretty_midi
from echoel.dsp.chord_vocabulary import PITCH_NAMES, QUALITIES

from bench.evalset.render import render

RATE = 48000
# QUALITIES: quality -> intervals above the root (root, third, fifth, seventh); the same music
# theory as the recognizer's vocabulary
# Harte bass-interval names of each chord tone, by quality
BASS_DEGREES: dict[str, tuple[str, ...]] = {
    "maj": ("1", "3", "5"),
    "min": ("1", "b3", "5"),
    "7": ("1", "3", "5", "b7"),
    "maj7": ("1", "3", "5", "7"),
    "min7": ("1", "b3", "5", "b7"),
}
OTHER_QUALITIES: dict[str, tuple[int, ...]] = {  # scored by root only
    "dim": (0, 3, 6),
    "aug": (0, 4, 8),
    "dim7": (0, 3, 6, 9),
    "hdim7": (0, 3, 6, 10),
}


@dataclass(frozen=True)
class ChordPiece:
    """One rendered piece with its ground truth."""

    name: str
    kind: str  # "chorale" or "pop"
    audio: np.ndarray  # float32 [frames, 2]
    rate: int
    intervals: np.ndarray  # float64 [n, 2], seconds
    labels: list[str]  # Harte syntax, "N" and "X" included
    key: str  # "C major" / "A minor"

    @property
    def seconds(self) -> float:
        """Length of the audio in seconds."""
        return self.audio.shape[0] / self.rate


def harte(root: int, quality: str, bass_degree: str = "1") -> str:
    """Harte label of a chord, e.g. harte(0, 'maj', '3') -> 'C:maj/3'."""
    label = f"{PITCH_NAMES[root % 12]}:{quality}"
    return label if bass_degree == "1" else f"{label}/{bass_degree}"


def label_pitch_classes(pcs: frozenset[int], m21_root: int | None = None) -> str:
    """Harte label of a set of sounding pitch classes (the chorale labelling rule above)."""
    for quality, iv in QUALITIES.items():
        for r in range(12):
            full = frozenset((r + i) % 12 for i in iv)
            if pcs == full:
                return harte(r, quality)
    for quality, iv in QUALITIES.items():  # fifth omitted, root and third present
        for r in range(12):
            part = frozenset((r + i) % 12 for i in iv if i != 7)
            if pcs == part and len(part) >= 2:
                return harte(r, quality)
    for quality, iv in OTHER_QUALITIES.items():
        for r in range(12):
            if pcs == frozenset((r + i) % 12 for i in iv):
                root = r if m21_root is None or quality != "dim7" else m21_root
                return harte(root, quality)
    return "X"


def merge_segments(starts: list[float], ends: list[float], labels: list[str]
                   ) -> tuple[np.ndarray, list[str]]:
    """Join neighbouring segments with the same label; fill gaps with N."""
    out_iv: list[list[float]] = []
    out_lab: list[str] = []
    t = 0.0
    for s, e, lab in zip(starts, ends, labels, strict=True):
        if s > t + 1e-6:
            out_iv.append([t, s])
            out_lab.append("N")
        if out_lab and out_lab[-1] == lab and abs(out_iv[-1][1] - s) < 1e-6:
            out_iv[-1][1] = e
        else:
            out_iv.append([s, e])
            out_lab.append(lab)
        t = e
    return np.asarray(out_iv, dtype=np.float64).reshape(-1, 2), out_lab


def _finish(name: str, kind: str, pm: pretty_midi.PrettyMIDI, intervals: np.ndarray,
            labels: list[str], key: str, rate: int) -> ChordPiece:
    audio = render(pm, rate=rate)
    end = audio.shape[0] / rate
    if intervals[-1, 1] < end:  # the release tail: no chord
        intervals = np.vstack([intervals, [intervals[-1, 1], end]])
        labels = [*labels, "N"]
    return ChordPiece(name, kind, audio, rate, intervals, labels, key)


# ----------------------------------------------------------------------------- chorales

CHORALE_INSTRUMENTS: dict[str, tuple[int, int, int, int]] = {  # GM programs S, A, T, B
    "organ": (19, 19, 19, 19),
    "strings": (40, 40, 41, 42),
    "piano": (0, 0, 0, 0),
    "choir": (52, 52, 52, 52),
}


@functools.cache
def chorale_names() -> tuple[str, ...]:
    """Corpus names of the Bach chorales music21 ships (Riemenschneider order)."""
    from music21 import corpus

    it = corpus.chorales.Iterator(numberingSystem="riemenschneider", returnType="filename")
    return tuple(it)


def chorale_midi(name: str, bpm: float, instrument: str, max_seconds: float | None = None,
                 ) -> tuple[pretty_midi.PrettyMIDI, np.ndarray, list[str], str]:
    """MIDI, chord intervals, labels and key of one chorale at `bpm` (quarter notes)."""
    from music21 import chord, corpus, note

    score = corpus.parse(name)
    spq = 60.0 / bpm
    limit = np.inf if max_seconds is None else max_seconds / spq  # in quarter lengths
    pm = pretty_midi.PrettyMIDI(initial_tempo=bpm)
    programs = CHORALE_INSTRUMENTS[instrument]
    for i, part in enumerate(score.parts):
        inst = pretty_midi.Instrument(program=programs[min(i, 3)], name=str(part.partName))
        vel = 80 if i == 0 else 70
        for n in part.stripTies().flatten().notes:
            start = float(n.getOffsetInHierarchy(part))
            if start >= limit:
                continue
            stop = min(start + float(n.quarterLength), limit)
            pitches = [n.pitch] if isinstance(n, note.Note) else list(n.pitches)
            for p in pitches:
                inst.notes.append(pretty_midi.Note(vel, int(p.midi), start * spq, stop * spq))
        if inst.notes:
            pm.instruments.append(inst)
    starts: list[float] = []
    ends: list[float] = []
    labels: list[str] = []
    chords = score.chordify().flatten().getElementsByClass(chord.Chord)
    for c in chords:
        start = float(c.offset)
        if start >= limit:
            continue
        stop = min(start + float(c.quarterLength), limit)
        if stop <= start:
            continue
        pcs = frozenset(int(p.pitchClass) for p in c.pitches)
        try:
            m21_root = int(c.root().pitchClass)
        except Exception:  # music21 finds no root for some sets
            m21_root = None
        starts.append(start * spq)
        ends.append(stop * spq)
        labels.append(label_pitch_classes(pcs, m21_root))
    k = score.analyze("key")
    key = f"{PITCH_NAMES[k.tonic.pitchClass]} {k.mode}"
    iv, lab = merge_segments(starts, ends, labels)
    return pm, iv, lab, key


def chorale_pieces(n: int, seed: int = 0, rate: int = RATE,
                   max_seconds: float | None = None) -> list[ChordPiece]:
    """`n` rendered chorales drawn by `seed` (tempo 60-96 bpm, instrument drawn per piece)."""
    rng = np.random.default_rng([seed, 1])
    names = chorale_names()
    order = rng.permutation(len(names))
    out: list[ChordPiece] = []
    for idx in order:
        if len(out) == n:
            break
        bpm = float(rng.integers(60, 97))
        instrument = str(rng.choice(list(CHORALE_INSTRUMENTS)))
        try:
            pm, iv, lab, key = chorale_midi(names[idx], bpm, instrument, max_seconds)
        except Exception:  # a few corpus files are not plain four-part chorales
            continue
        if len(lab) < 4:
            continue
        nm = f"chorale {names[idx].split('/')[-1]} {instrument} {bpm:.0f}bpm"
        out.append(_finish(nm, "chorale", pm, iv, lab, key, rate))
    return out


# ----------------------------------------------------------------------------- pop

MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10)
# degree name -> (semitones above the tonic, triad quality, seventh quality)
MAJOR_DEGREES: dict[str, tuple[int, str, str]] = {
    "I": (0, "maj", "maj7"), "ii": (2, "min", "min7"), "iii": (4, "min", "min7"),
    "IV": (5, "maj", "maj7"), "V": (7, "maj", "7"), "vi": (9, "min", "min7"),
    "bVII": (10, "maj", "7"), "iv": (5, "min", "min7"),
}
MINOR_DEGREES: dict[str, tuple[int, str, str]] = {
    "i": (0, "min", "min7"), "III": (3, "maj", "maj7"), "iv": (5, "min", "min7"),
    "v": (7, "min", "min7"), "V": (7, "maj", "7"), "VI": (8, "maj", "maj7"),
    "VII": (10, "maj", "7"), "IV": (5, "maj", "7"),
}
MAJOR_PROGRESSIONS = (
    ("I", "V", "vi", "IV"), ("vi", "IV", "I", "V"), ("I", "IV", "V", "IV"),
    ("I", "vi", "IV", "V"), ("ii", "V", "I", "I"), ("I", "iii", "IV", "V"),
    ("I", "IV", "vi", "V"), ("IV", "I", "V", "vi"), ("I", "vi", "ii", "V"),
    ("I", "bVII", "IV", "I"), ("I", "V", "IV", "iv"), ("ii", "V", "iii", "vi"),
)
MINOR_PROGRESSIONS = (
    ("i", "VI", "III", "VII"), ("i", "iv", "VII", "III"), ("i", "VII", "VI", "V"),
    ("i", "iv", "V", "i"), ("i", "VI", "iv", "V"), ("VI", "VII", "i", "i"),
    ("i", "v", "iv", "i"), ("i", "III", "VII", "IV"),
)
COMP_PROGRAMS = {"piano": 0, "epiano": 4, "guitar": 25, "clean guitar": 27, "strings": 48,
                 "organ": 16, "warm pad": 89, "choir pad": 91, "brass": 61}
COMP_STYLE = {"piano": ("block", "arpeggio", "syncopated", "halves"),
              "epiano": ("block", "syncopated", "halves"),
              "guitar": ("strum", "arpeggio"), "clean guitar": ("strum", "arpeggio", "syncopated"),
              "strings": ("sustain",), "organ": ("sustain", "halves"),
              "warm pad": ("sustain",), "choir pad": ("sustain",),
              "brass": ("syncopated", "halves")}
MELODY_PROGRAMS = (73, 65, 40, 56, 71, 68, 11, 80, 53, 66)
BASS_PROGRAMS = (32, 33, 34, 38)
KICK, SNARE, HAT, OPEN_HAT, CRASH, RIDE = 36, 38, 42, 46, 49, 51


@dataclass(frozen=True)
class PopChord:
    """One chord of a generated song: root pitch class, quality, bass chord-tone index."""

    start_beat: float
    beats: float
    root: int
    quality: str
    inversion: int  # 0 root in the bass, 1 third, 2 fifth, 3 seventh

    @property
    def tones(self) -> list[int]:
        """Pitch classes of the chord, root first."""
        return [(self.root + i) % 12 for i in QUALITIES[self.quality]]

    @property
    def label(self) -> str:
        """Harte label with the bass interval (e.g. 'E:min7/b7')."""
        return harte(self.root, self.quality, BASS_DEGREES[self.quality][self.inversion])


def _progression(rng: np.random.Generator, tonic: int, minor: bool, beats_total: float,
                 p7: float, p_inv: float) -> list[PopChord]:
    """Sections of two drawn progressions (form A A B A ...) filling `beats_total`."""
    degrees = MINOR_DEGREES if minor else MAJOR_DEGREES
    progs = MINOR_PROGRESSIONS if minor else MAJOR_PROGRESSIONS
    sections = [progs[int(i)] for i in rng.choice(len(progs), size=2, replace=False)]
    rhythms = [float(rng.choice([2.0, 4.0, 4.0, 8.0])) for _ in sections]
    form = (0, 0, 1, 0, 1, 1, 0, 1)
    # a chord keeps its type and inversion wherever its section repeats
    types: dict[tuple[int, int], tuple[str, int]] = {}
    out: list[PopChord] = []
    beat = 0.0
    f = 0
    while beat < beats_total:
        s = form[f % len(form)]
        f += 1
        for j, deg in enumerate(sections[s]):
            if beat >= beats_total:
                break
            semis, triad, seventh = degrees[deg]
            if (s, j) not in types:
                seventh_p = p7 * (1.6 if seventh == "7" else 1.0)
                quality = seventh if rng.random() < seventh_p else triad
                n_tones = len(QUALITIES[quality])
                inv = 0
                if rng.random() < p_inv:
                    inv = int(rng.integers(1, n_tones))
                types[(s, j)] = (quality, inv)
            quality, inv = types[(s, j)]
            dur = min(rhythms[s], beats_total - beat)
            out.append(PopChord(beat, dur, (tonic + semis) % 12, quality, inv))
            beat += dur
    return out


def _voicing(rng: np.random.Generator, chord: PopChord, low: int, prev: list[int] | None
             ) -> list[int]:
    """MIDI notes of a comping voicing: all chord tones, drawn inversion and spread."""
    tones = chord.tones
    if chord.quality in ("maj", "min") and rng.random() < 0.5:
        tones = [*tones, tones[0]]  # doubled root
    rot = int(rng.integers(0, len(chord.tones)))
    order = tones[rot:] + tones[:rot]
    notes: list[int] = []
    cur = low + (order[0] - low) % 12
    for pc in order:
        while cur % 12 != pc:
            cur += 1
        notes.append(cur)
        cur += 1
    if rng.random() < 0.35 and len(notes) >= 3:  # open voicing: second note up an octave
        notes[1] += 12
    if prev and rng.random() < 0.5:  # voice-lead: stay near the previous voicing
        shift = round((np.mean(prev) - np.mean(notes)) / 12.0) * 12
        notes = [n + int(shift) for n in notes]
    notes = [n if n <= 84 else n - 12 for n in notes]
    return sorted(set(notes))


def _comp(rng: np.random.Generator, inst: pretty_midi.Instrument, chords: list[PopChord],
          style: str, spb: float) -> None:
    low = int(rng.integers(50, 58))
    vel = int(rng.integers(62, 88))
    prev: list[int] | None = None
    for c in chords:
        notes = _voicing(rng, c, low, prev)
        prev = notes
        t0 = c.start_beat * spb
        t1 = (c.start_beat + c.beats) * spb

        def add(pitches: list[int], a: float, b: float, v: int = vel, end: float = t1) -> None:
            for p in pitches:
                v1 = int(np.clip(v + rng.integers(-6, 7), 30, 120))
                inst.notes.append(pretty_midi.Note(v1, int(p), a, min(b, end)))

        if style == "sustain":
            add(notes, t0, t1 - 0.02)
        elif style == "halves":
            b = c.start_beat
            while b < c.start_beat + c.beats - 1e-6:
                add(notes, b * spb, (b + 2.0) * spb - 0.05)
                b += 2.0
        elif style == "block":
            b = c.start_beat
            while b < c.start_beat + c.beats - 1e-6:
                add(notes, b * spb, (b + 0.9) * spb)
                b += 1.0
        elif style == "syncopated":
            for off, length in ((0.0, 1.4), (1.5, 1.0), (3.0, 0.9)):
                if off < c.beats:
                    add(notes, (c.start_beat + off) * spb, (c.start_beat + off + length) * spb)
            if c.beats > 4:
                for off, length in ((4.0, 1.4), (5.5, 1.0), (7.0, 0.9)):
                    add(notes, (c.start_beat + off) * spb, (c.start_beat + off + length) * spb)
        elif style == "strum":
            b = c.start_beat
            pattern = (0.0, 1.0, 1.5, 2.5, 3.0)
            while b < c.start_beat + c.beats - 1e-6:
                for off in pattern:
                    if b + off >= c.start_beat + c.beats:
                        break
                    for k, p in enumerate(notes):  # a strum: strings a few ms apart
                        d = 0.012 * k
                        add([p], (b + off) * spb + d, (b + off + 0.9) * spb)
                b += 4.0
        else:  # arpeggio in eighths
            seq = notes + notes[-2:0:-1] if len(notes) > 2 else notes
            k = 0
            b = c.start_beat
            while b < c.start_beat + c.beats - 1e-6:
                add([seq[k % len(seq)]], b * spb, (b + 1.0) * spb)
                k += 1
                b += 0.5


def _bass(rng: np.random.Generator, inst: pretty_midi.Instrument, chords: list[PopChord],
          spb: float, scale: list[int]) -> None:
    pattern = int(rng.integers(0, 3))
    vel = int(rng.integers(88, 108))
    for i, c in enumerate(chords):
        bass_pc = c.tones[c.inversion]
        base = 28 + (bass_pc - 28) % 12  # E1..D#2
        if base < 33 and rng.random() < 0.5:
            base += 12
        t0 = c.start_beat * spb
        notes: list[tuple[float, float, int]] = []  # beat offset, beats, pitch
        if pattern == 0:  # whole chord
            notes.append((0.0, c.beats, base))
        elif pattern == 1:  # quarters with an octave and the fifth
            for b in range(int(c.beats)):
                p = base
                if b % 4 == 2 and c.inversion == 0:
                    p = base + 7
                elif b % 4 == 3 and rng.random() < 0.4:
                    p = base + 12
                notes.append((float(b), 1.0, p))
        else:  # eighths on the chord's bass note
            for b in range(int(c.beats * 2)):
                notes.append((b * 0.5, 0.5, base))
        # a passing note into the next chord on the last beat, sometimes
        if i + 1 < len(chords) and c.beats >= 4 and rng.random() < 0.3:
            nxt = chords[i + 1]
            target = 28 + (nxt.tones[nxt.inversion] - 28) % 12
            step = [s for s in (target - 1, target + 1, target - 2, target + 2)
                    if s % 12 in scale]
            if step:
                notes = [n for n in notes if n[0] < c.beats - 1.0]
                notes.append((c.beats - 1.0, 1.0, step[0]))
        for off, length, p in notes:
            inst.notes.append(pretty_midi.Note(vel, int(p), t0 + off * spb,
                                               t0 + (off + length) * spb - 0.03))


def _melody(rng: np.random.Generator, inst: pretty_midi.Instrument, chords: list[PopChord],
            spb: float, tonic: int, scale_iv: tuple[int, ...]) -> None:
    scale = sorted({(tonic + s) % 12 for s in scale_iv})
    pool = [p for p in range(64, 89) if p % 12 in scale]
    vel = int(rng.integers(82, 106))
    cur = pool[len(pool) // 2]
    rhythms = ((1.0, 1.0, 1.0, 1.0), (1.5, 0.5, 1.0, 1.0), (0.5, 0.5, 1.0, 2.0),
               (2.0, 1.0, 1.0), (1.0, 0.5, 0.5, 2.0), (3.0, 1.0), (0.5,) * 8)
    for c in chords:
        b = 0.0
        while b < c.beats - 1e-6:
            rhythm = rhythms[int(rng.integers(0, len(rhythms)))]
            if rng.random() < 0.2:  # a rest for the rest of this bar
                b += 4.0
                continue
            for length in rhythm:
                if b >= c.beats - 1e-6:
                    break
                strong = float(b) % 1.0 == 0.0 and length >= 1.0
                if strong:
                    cand = [p for p in pool if p % 12 in c.tones and abs(p - cur) <= 7]
                else:
                    cand = [p for p in pool if 0 < abs(p - cur) <= 2]
                if not cand:
                    cand = [p for p in pool if p % 12 in c.tones]
                cur = int(cand[int(rng.integers(0, len(cand)))])
                t = (c.start_beat + b) * spb
                v1 = int(np.clip(vel + rng.integers(-8, 9), 40, 127))
                inst.notes.append(pretty_midi.Note(v1, cur, t,
                                                   t + min(length, c.beats - b) * spb * 0.92))
                b += length


def _drums(rng: np.random.Generator, inst: pretty_midi.Instrument, beats_total: float,
           spb: float) -> None:
    style = int(rng.integers(0, 3))
    vel = int(rng.integers(70, 100))

    def hit(pitch: int, beat: float, v: int) -> None:
        t = beat * spb
        inst.notes.append(pretty_midi.Note(int(np.clip(v, 1, 127)), pitch, t, t + 0.1))

    bar = 0.0
    while bar < beats_total - 1e-6:
        if bar % 32 == 0:
            hit(CRASH, bar, vel)
        for e in range(8):
            b = bar + e * 0.5
            if b >= beats_total:
                break
            hat = OPEN_HAT if (e == 7 and rng.random() < 0.2) else (RIDE if style == 2 else HAT)
            hit(hat, b, vel - 20 + int(rng.integers(-8, 9)))
            if style == 0 and e in (0, 4, 5):  # rock
                hit(KICK, b, vel + 10)
            if style == 1 and e % 2 == 0:  # four on the floor
                hit(KICK, b, vel + 10)
            if style == 2 and e == 0:  # half time
                hit(KICK, b, vel + 10)
            if (style in (0, 1) and e in (2, 6)) or (style == 2 and e == 4):
                hit(SNARE, b, vel + int(rng.integers(-5, 6)))
        bar += 4.0


def pop_midi(seed: int, seconds: float = 40.0) -> tuple[pretty_midi.PrettyMIDI, np.ndarray,
                                                        list[str], str, str]:
    """One generated song: MIDI, chord intervals, labels, key and a short description."""
    rng = np.random.default_rng([seed, 2])
    tonic = int(rng.integers(0, 12))
    minor = bool(rng.random() < 0.35)
    bpm = float(rng.integers(76, 141))
    spb = 60.0 / bpm
    beats_total = 4.0 * max(4, round(seconds / spb / 4.0))
    chords = _progression(rng, tonic, minor, beats_total, p7=float(rng.uniform(0.15, 0.6)),
                          p_inv=float(rng.uniform(0.1, 0.35)))
    comp_name = str(rng.choice(list(COMP_PROGRAMS)))
    style = str(rng.choice(COMP_STYLE[comp_name]))
    pm = pretty_midi.PrettyMIDI(initial_tempo=bpm)
    comp = pretty_midi.Instrument(program=COMP_PROGRAMS[comp_name], name="comp")
    _comp(rng, comp, chords, style, spb)
    scale_iv = MINOR_SCALE if minor else MAJOR_SCALE
    bass = pretty_midi.Instrument(program=int(rng.choice(BASS_PROGRAMS)), name="bass")
    _bass(rng, bass, chords, spb, [(tonic + s) % 12 for s in scale_iv])
    melody = pretty_midi.Instrument(program=int(rng.choice(MELODY_PROGRAMS)), name="melody")
    _melody(rng, melody, chords, spb, tonic, scale_iv)
    drums = pretty_midi.Instrument(program=0, is_drum=True, name="drums")
    _drums(rng, drums, beats_total, spb)
    pm.instruments.extend([comp, bass, melody, drums])
    starts = [c.start_beat * spb for c in chords]
    ends = [(c.start_beat + c.beats) * spb for c in chords]
    iv, lab = merge_segments(starts, ends, [c.label for c in chords])
    key = f"{PITCH_NAMES[tonic]} {'minor' if minor else 'major'}"
    desc = f"{key} {bpm:.0f}bpm {comp_name}/{style}"
    return pm, iv, lab, key, desc


def pop_pieces(n: int, seed: int = 0, rate: int = RATE, seconds: float = 40.0
               ) -> list[ChordPiece]:
    """`n` rendered generated songs, each about `seconds` long, drawn by `seed`."""
    out = []
    for i in range(n):
        pm, iv, lab, key, desc = pop_midi(seed * 1000 + i, seconds)
        out.append(_finish(f"pop {seed}.{i} {desc}", "pop", pm, iv, lab, key, rate))
    return out


def chord_set(n_chorales: int, n_pop: int, seed: int = 0, rate: int = RATE,
              chorale_seconds: float | None = None, pop_seconds: float = 40.0
              ) -> list[ChordPiece]:
    """`n_chorales` chorales then `n_pop` pop songs, rendered, all drawn by `seed`."""
    return (chorale_pieces(n_chorales, seed, rate, chorale_seconds)
            + pop_pieces(n_pop, seed, rate, pop_seconds))


def small_set(rate: int = RATE) -> list[ChordPiece]:
    """The tests' set: 2 chorales (first 30 s) and 3 songs of 25 s."""
    return chord_set(2, 3, seed=7, rate=rate, chorale_seconds=30.0, pop_seconds=25.0)


def bench_set(quick: bool = False, rate: int = RATE) -> list[ChordPiece]:
    """The benchmark's set: 16 whole chorales and 16 songs of 45 s (quick: 4 and 4)."""
    if quick:
        return chord_set(4, 4, seed=11, rate=rate, chorale_seconds=40.0, pop_seconds=30.0)
    return chord_set(16, 16, seed=11, rate=rate, pop_seconds=45.0)
