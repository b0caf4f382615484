"""Monophonic pitch evaluation clips with ground-truth f0, made at test/bench time.

Two kinds, both with silence gaps between phrases:

- GM instruments: a seeded random melody (phrases of legato notes, rests between them) as a
  pretty_midi object, rendered with FluidSynth (bench.evalset.render). Ground truth: each note's
  equal-tempered frequency (A4 = 440 Hz) from note-on to note-off; unvoiced elsewhere.
- Synthetic voice: additive harmonics under vowel formants, a continuous f0 contour with
  vibrato (5-6 Hz, +-35 cents, slight rate/depth drift) or glides (portamento up to an
  octave), breath noise at -45 dB. Ground truth: the contour itself while the note gate is on.

Release tails (after a note-off into a rest, while the audio is within 40 dB of the note's
level, at most 1 s) still sound at the note's pitch: there the truth is NaN, "don't care", and
`score` leaves those frames out (voiced or unvoiced would both be defensible).

`score` compares an estimate with the truth at the estimate's frame times, with mir_eval.melody
(raw pitch accuracy within 50 cents counting only frames the estimate calls voiced, voicing
recall, voicing false alarm, overall accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass

import mir_eval
import numpy as np
import pretty_midi

from bench.evalset.render import render

TRUTH_STEP = 0.001  # s between ground-truth samples
# name: (GM program, lowest MIDI note, highest MIDI note)
INSTRUMENTS: dict[str, tuple[int, int, int]] = {
    "flute": (73, 62, 91),
    "violin": (40, 55, 88),
    "clarinet": (71, 50, 82),
    "trumpet": (56, 55, 79),
    "voice_oohs": (53, 48, 72),
    "bass": (33, 28, 52),
}
SYNTHETIC = ("synth_vibrato", "synth_glide")
VOWELS = {  # formant (Hz, bandwidth Hz, relative amplitude)
    "a": ((730, 90, 1.0), (1090, 110, 0.5), (2440, 170, 0.25), (3400, 250, 0.1)),
    "u": ((300, 60, 1.0), (870, 90, 0.3), (2240, 160, 0.08), (3300, 250, 0.04)),
    "i": ((270, 60, 1.0), (2290, 150, 0.35), (3010, 200, 0.3), (3600, 250, 0.1)),
}


@dataclass
class PitchClip:
    """Mono audio with its ground-truth f0 (0 = unvoiced) every TRUTH_STEP seconds."""

    name: str
    audio: np.ndarray  # float32 [frames]
    rate: int
    truth: np.ndarray  # Hz per TRUTH_STEP from t = 0; 0 unvoiced, NaN don't care (tails)

    @property
    def seconds(self) -> float:
        return self.audio.shape[0] / self.rate

    def truth_at(self, times: np.ndarray) -> np.ndarray:
        """Ground-truth f0 at the given times (nearest truth sample; 0 past the end)."""
        idx = np.round(np.asarray(times) / TRUTH_STEP).astype(np.int64)
        out = np.zeros(idx.shape[0])
        ok = (idx >= 0) & (idx < self.truth.shape[0])
        out[ok] = self.truth[idx[ok]]
        return out


def melody(program: int, low: int, high: int, seconds: float,
           seed: int) -> pretty_midi.PrettyMIDI:
    """A monophonic random-walk melody: phrases of 3-6 legato notes (0.18-0.5 s), rests of
    0.2-0.45 s between them, a 0.25 s lead-in of silence, ending `seconds` in or before."""
    rng = np.random.default_rng(seed)
    pm = pretty_midi.PrettyMIDI(initial_tempo=120)
    inst = pretty_midi.Instrument(program=program)
    t = 0.25
    pitch = int(rng.integers(low + 3, high - 3))
    end = seconds - 0.35  # room for the release
    while t < end:
        for _ in range(int(rng.integers(3, 7))):
            dur = float(rng.uniform(0.18, 0.5))
            if t + dur > end:
                break
            inst.notes.append(pretty_midi.Note(velocity=int(rng.integers(85, 115)),
                                               pitch=pitch, start=t, end=t + dur))
            t += dur
            step = int(rng.choice([-5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 7, -7, 12, -12]))
            pitch = int(np.clip(pitch + step, low, high))
        t += float(rng.uniform(0.2, 0.45))
    pm.instruments.append(inst)
    return pm


def truth_from_midi(pm: pretty_midi.PrettyMIDI, seconds: float) -> np.ndarray:
    """Equal-tempered f0 of the sounding note every TRUTH_STEP (0 between notes)."""
    truth = np.zeros(round(seconds / TRUTH_STEP) + 1)
    for note in pm.instruments[0].notes:
        a = int(np.ceil(note.start / TRUTH_STEP))
        b = int(np.ceil(note.end / TRUTH_STEP))
        truth[a:b] = pretty_midi.note_number_to_hz(note.pitch)
    return truth


def level_db(audio: np.ndarray, rate: int) -> np.ndarray:
    """RMS level (dBFS) over 10 ms around each TRUTH_STEP."""
    step = round(TRUTH_STEP * rate)
    n = audio.shape[0] // step
    ms = (audio[:n * step].astype(np.float64).reshape(n, step) ** 2).mean(axis=1)
    ms = np.convolve(ms, np.ones(10) / 10, mode="same")
    return 10.0 * np.log10(ms + 1e-20)


def mark_tails(truth: np.ndarray, level: np.ndarray, drop_db: float = 40.0,
               longest: float = 1.0) -> np.ndarray:
    """Copy of truth with NaN over release tails: from each voiced-to-unvoiced change while the
    level stays within drop_db of the ending note's peak (at most `longest` seconds)."""
    out = truth.copy()
    n = min(truth.shape[0], level.shape[0])
    voiced = truth[:n] > 0
    ends = np.flatnonzero(voiced[:-1] & ~voiced[1:]) + 1
    starts = np.flatnonzero(~voiced[:-1] & voiced[1:]) + 1
    for e in ends:
        s = starts[starts < e].max() if (starts < e).any() else 0
        peak = level[s:e].max()
        stop = min(n, e + int(longest / TRUTH_STEP))
        nxt = starts[starts > e]
        if nxt.size:
            stop = min(stop, int(nxt[0]))
        k = e
        while k < stop and level[k] > peak - drop_db:
            k += 1
        out[e:k] = np.nan
    return out


def midi_clip(name: str, seconds: float = 4.0, seed: int = 1, rate: int = 48000) -> PitchClip:
    """A GM instrument's random melody rendered with FluidSynth, mono."""
    program, low, high = INSTRUMENTS[name]
    pm = melody(program, low, high, seconds, seed)
    audio = render(pm, rate=rate).mean(axis=1)
    n = round(seconds * rate)
    audio = np.pad(audio, (0, max(0, n - audio.shape[0])))[:n].astype(np.float32)
    truth = mark_tails(truth_from_midi(pm, seconds), level_db(audio, rate))
    return PitchClip(name, audio, rate, truth)


def _contour(kind: str, seconds: float, rng: np.random.Generator,
             rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample f0 (Hz) and note gate (bool) for a synthetic phrase structure."""
    n = round(seconds * rate)
    t = np.arange(n) / rate
    f0 = np.zeros(n)
    gate = np.zeros(n, dtype=bool)
    pos = 0.2
    base = float(rng.uniform(48, 62))  # MIDI pitch of the first note
    while pos < seconds - 0.3:
        length = float(rng.uniform(0.8, 1.6))
        a, b = int(pos * rate), int(min(pos + length, seconds - 0.2) * rate)
        if b - a < rate // 10:
            break
        gate[a:b] = True
        seg = t[a:b] - pos
        if kind == "synth_vibrato":
            notes = [base, base + float(rng.choice([-5, -3, 2, 4, 7]))]
            split = len(seg) // 2
            pitch = np.where(np.arange(len(seg)) < split, notes[0], notes[1])
            rate_hz = 5.5 + 0.4 * np.sin(2 * np.pi * 0.3 * seg)
            depth = 0.35 * (1 - np.exp(-seg / 0.25))  # vibrato grows in, +-35 cents
            phase = 2 * np.pi * np.cumsum(rate_hz) / rate
            pitch = pitch + depth * np.sin(phase)
        else:
            jump = float(rng.choice([-12, -7, -5, 5, 7, 12]))
            g0, g1 = float(rng.uniform(0.15, 0.35)), float(rng.uniform(0.25, 0.6))
            ramp = np.clip((seg - g0) / g1, 0.0, 1.0)
            ramp = ramp * ramp * (3 - 2 * ramp)  # smooth portamento
            pitch = base + jump * ramp + 0.1 * np.sin(2 * np.pi * 5.0 * seg)
        f0[a:b] = 440.0 * 2.0 ** ((pitch - 69.0) / 12.0)
        f0[b:] = f0[b - 1]
        base = float(np.clip(pitch[-1] + rng.uniform(-4, 4), 43, 72))
        pos += length + float(rng.uniform(0.2, 0.4))
    first = np.argmax(gate) if gate.any() else 0
    f0[:first] = f0[first] if gate.any() else 220.0
    return f0, gate


def voice_clip(kind: str = "synth_vibrato", seconds: float = 4.0, seed: int = 1,
               rate: int = 48000) -> PitchClip:
    """A synthetic sung phrase set (vowels a/u/i) with vibrato or glides, and its truth."""
    if kind not in SYNTHETIC:
        raise ValueError(f"voice_clip: kind {kind!r}; allowed {SYNTHETIC}")
    rng = np.random.default_rng(seed)
    f0, gate = _contour(kind, seconds, rng, rate)
    # amplitude: 30 ms attack, 60 ms release on the gate
    env = gate.astype(np.float64)
    att = np.exp(-1.0 / (0.030 * rate))
    rel = np.exp(-1.0 / (0.060 * rate))
    e = 0.0
    for i in range(env.shape[0]):  # one-pole attack/release (a few hundred thousand steps)
        target = env[i]
        e = target + (e - target) * (att if target > e else rel)
        env[i] = e
    phase = 2 * np.pi * np.cumsum(f0) / rate
    vowel = VOWELS[str(rng.choice(list(VOWELS)))]
    audio = np.zeros_like(f0)
    for k in range(1, 60):
        fk = k * f0
        amp = np.zeros_like(f0)
        for fc, bw, ga in vowel:
            amp += ga / (1.0 + ((fk - fc) / (bw / 2.0)) ** 2)
        amp = (amp + 0.01) / k  # source tilt -6 dB/octave after radiation
        amp[fk > 0.45 * rate] = 0.0
        if not amp.any():
            break
        audio += amp * np.sin(k * phase + 0.3 * k * k)
    audio *= env / (np.max(np.abs(audio * env)) + 1e-12) * 0.4
    audio += 10 ** (-45 / 20) * 0.4 * rng.standard_normal(audio.shape[0]) * (0.2 + env)
    step = round(TRUTH_STEP * rate)
    truth = mark_tails(np.where(gate[::step], f0[::step], 0.0), level_db(audio, rate))
    return PitchClip(kind, audio.astype(np.float32), rate, truth)


def evaluation_set(seconds: float = 4.0, seed: int = 1, rate: int = 48000,
                   names: tuple[str, ...] | None = None) -> list[PitchClip]:
    """The clips by name (default: every GM instrument, then the synthetic voices)."""
    names = names or (*INSTRUMENTS, *SYNTHETIC)
    clips = []
    for i, name in enumerate(names):
        if name in INSTRUMENTS:
            clips.append(midi_clip(name, seconds, seed + i, rate))
        else:
            clips.append(voice_clip(name, seconds, seed + i, rate))
    return clips


def score(truth_f0: np.ndarray, est_f0: np.ndarray) -> dict[str, float]:
    """mir_eval.melody measures of an estimate (0 = unvoiced) against truth on the same
    frames (NaN truth frames left out): raw pitch accuracy (50 cents), raw chroma, voicing
    recall, voicing false alarm, overall accuracy."""
    truth_f0 = np.asarray(truth_f0, dtype=np.float64)
    keep = ~np.isnan(truth_f0)
    ref_f, ref_v = mir_eval.melody.freq_to_voicing(truth_f0[keep])
    est_f, est_v = mir_eval.melody.freq_to_voicing(np.asarray(est_f0, dtype=np.float64)[keep])
    ref_c = mir_eval.melody.hz2cents(ref_f)
    est_c = mir_eval.melody.hz2cents(est_f)
    recall, false_alarm = mir_eval.melody.voicing_measures(ref_v, est_v)
    return {
        "raw_pitch": float(mir_eval.melody.raw_pitch_accuracy(ref_v, ref_c, est_v, est_c)),
        "raw_chroma": float(mir_eval.melody.raw_chroma_accuracy(ref_v, ref_c, est_v, est_c)),
        "voicing_recall": float(recall),
        "voicing_false_alarm": float(false_alarm),
        "overall": float(mir_eval.melody.overall_accuracy(ref_v, ref_c, est_v, est_c)),
    }
