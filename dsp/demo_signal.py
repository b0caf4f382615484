"""A musical demo signal, synthesised: chords, bass and a pulse, 8 bars that loop seamlessly."""

from __future__ import annotations

import numpy as np

# Am - F - C - G, two bars each (MIDI notes)
PROGRESSION = [(57, 60, 64), (53, 57, 60), (48, 52, 55), (55, 59, 62)]


def _hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12.0)


def demo_loop(rate: int = 48000, bpm: float = 96.0, channels: int = 2) -> np.ndarray:
    """float32[frames, channels], peak about -6 dBFS, stereo-spread; loops without a click."""
    beat = 60.0 / bpm
    bar = 4 * beat
    total = round(len(PROGRESSION) * 2 * bar * rate)
    t = np.arange(total) / rate
    left = np.zeros(total)
    right = np.zeros(total)
    rng = np.random.default_rng(7)
    for i, chord in enumerate(PROGRESSION):
        start, stop = int(i * 2 * bar * rate), int((i + 1) * 2 * bar * rate)
        seg = t[start:stop] - t[start]
        for j, note in enumerate(chord):  # pads, slightly detuned, spread
            env = np.minimum(1.0, seg / 0.3) * np.minimum(1.0, (seg[-1] - seg) / 0.3)
            tone = np.sin(2 * np.pi * _hz(note) * seg)
            tone += 0.3 * np.sin(2 * np.pi * _hz(note + 12.03) * seg)
            pan = (j + 1) / (len(chord) + 1)
            left[start:stop] += 0.08 * env * tone * (1 - pan)
            right[start:stop] += 0.08 * env * tone * pan
        root = chord[0] - 12
        for k in range(8):  # plucked bass on every beat
            s = start + int(k * beat * rate)
            n = min(int(beat * rate), stop - s)
            st = np.arange(n) / rate
            pluck = np.sin(2 * np.pi * _hz(root) * st) * np.exp(-st * 6.0)
            left[s:s + n] += 0.25 * pluck
            right[s:s + n] += 0.25 * pluck
    for k in range(int(total / (beat / 2 * rate))):  # hats on eighths
        s = int(k * beat / 2 * rate)
        n = min(int(0.05 * rate), total - s)
        hat = rng.standard_normal(n) * np.exp(-np.arange(n) / rate * 80.0)
        hat = np.diff(hat, prepend=0.0)  # brighter
        left[s:s + n] += 0.04 * hat
        right[s:s + n] += 0.03 * hat
    out = np.stack([left, right], axis=1)
    out *= 0.5 / np.max(np.abs(out))
    if channels == 1:
        return out.mean(axis=1, keepdims=True).astype(np.float32)
    return np.tile(out, (1, (channels + 1) // 2))[:, :channels].astype(np.float32)
