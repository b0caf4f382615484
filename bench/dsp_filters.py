"""Benchmark of the filter and dynamics kernels: biquad cascade, compressor, true-peak limiter.

Timing (48 kHz, stereo, 128-frame blocks): microseconds per block (p50, p99) of each kernel
called as the engine calls it (preallocated arrays, no checks), and the offline real-time
factor (processing time / audio time; lower is faster) over 10 minutes of stereo (quick: 30 s)
in 1-second blocks. The cascade runs beside scipy.signal.sosfilt on the same blocks, block for
block in turn (per block with zi, and offline), so both see the same machine noise; the
dynamics have no external reference and are set beside the cascade's cost.

Accuracy: the cascade's max abs error against sosfilt over the whole offline run (the input
spans full scale), and the limiter's true-peak overshoot over its ceiling on hard material at
44.1, 48 and 96 kHz, measured by dsp/true_peak.true_peak_dbtp (the goal) and, as a second
opinion, by 16x scipy.signal.resample_poly.

`python bench/dsp_filters.py [--quick]` prints the rows as a table.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pretty_midi

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echoel.dsp.biquad_cascade import BiquadCascade, Section, cascade_block
from echoel.dsp.dynamics import Compressor, Limiter, compressor_block, limiter_block
from echoel.dsp.true_peak import true_peak_dbtp
from scipy import signal

from bench.bench_all import table
from bench.evalset.render import render

RATE = 48000
FRAMES = 128
CHANNELS = 2
BANDS = [  # a typical 5-band channel EQ
    Section("highpass", 40.0, 0.0, 0.7071),
    Section("lowshelf", 120.0, 3.0, 0.7071),
    Section("peaking", 900.0, -4.0, 1.4),
    Section("peaking", 3500.0, 2.5, 2.0),
    Section("highshelf", 9000.0, 4.0, 0.7071),
]
CEILING_DB = -1.0


# --------------------------------------------------------------------------- material

def _music_midi(seconds: float = 6.0, seed: int = 3) -> pretty_midi.PrettyMIDI:
    """A short loud arrangement: piano chords, picked bass, drums (deterministic)."""
    rng = np.random.default_rng(seed)
    pm = pretty_midi.PrettyMIDI(initial_tempo=120.0)
    piano = pretty_midi.Instrument(program=0)
    bass = pretty_midi.Instrument(program=34)
    drums = pretty_midi.Instrument(program=0, is_drum=True)
    chords = [(60, 64, 67), (57, 60, 64), (53, 57, 60), (55, 59, 62)]
    beat = 0.5
    t = 0.0
    k = 0
    while t < seconds:
        chord = chords[k % len(chords)]
        for note in chord:
            piano.notes.append(pretty_midi.Note(int(rng.integers(90, 127)), note, t, t + 4 * beat))
        for b in range(4):
            s = t + b * beat
            bass.notes.append(pretty_midi.Note(120, chord[0] - 24, s, s + 0.9 * beat))
            drums.notes.append(pretty_midi.Note(127, 36 if b % 2 == 0 else 38, s, s + 0.1))
            drums.notes.append(pretty_midi.Note(100, 42, s + beat / 2, s + beat / 2 + 0.05))
        t += 4 * beat
        k += 1
    pm.instruments += [piano, bass, drums]
    return pm


@functools.lru_cache(maxsize=8)
def _rendered(rate: int) -> np.ndarray:
    audio = render(_music_midi(), rate=rate, gain=0.8).astype(np.float64)
    return audio / np.abs(audio).max()


def music(rate: int, seconds: float) -> np.ndarray:
    """Rendered music, peak-normalised to 0 dBFS, float64 [frames, 2] (looped to length)."""
    audio = _rendered(rate)
    n = round(seconds * rate)
    reps = -(-n // audio.shape[0])
    return np.ascontiguousarray(np.tile(audio, (reps, 1))[:n])


def clipped_music(rate: int, seconds: float) -> np.ndarray:
    """Music driven 12 dB into a hard clip at +-1: square-edged, full scale, float64 [n, 2]."""
    return np.clip(4.0 * music(rate, seconds), -1.0, 1.0)


def isp_sine(n: int) -> np.ndarray:
    """A sine at fs/4 with 45 degrees phase: samples at +-1.0, true peak +3 dBTP."""
    s = np.sin(np.pi / 2 * np.arange(n) + np.pi / 4) / math.sin(math.pi / 4)
    return np.repeat(s[:, None], 2, axis=1)


def square(n: int, freq: float, rate: int) -> np.ndarray:
    s = np.where(np.sin(2 * np.pi * freq * np.arange(n) / rate + 0.1) >= 0, 1.0, -1.0)
    return np.repeat(s[:, None], 2, axis=1)


def impulses(n: int, rate: int) -> np.ndarray:
    x = np.zeros((n, 2))
    x[1000::rate // 10] = 1.0
    x[5003::rate // 5] = [1.0, -1.0]
    return x


# --------------------------------------------------------------------------- helpers

def _row(group: str, kernel: str, case: str, metric: str, ours: float, unit: str,
         reference: str = "", ref: float | None = None, goal: str = "",
         met: bool | None = None) -> dict:
    return {"group": group, "kernel": kernel, "case": case, "metric": metric,
            "ours": float(ours), "reference": reference,
            "ref": None if ref is None else float(ref), "unit": unit, "goal": goal, "met": met}


def _pct(samples_ns: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(samples_ns) / 1e3, q))


def _noise_blocks(n_blocks: int, seed: int = 1) -> np.ndarray:
    """Full-scale noise with a slow swell (so dynamics do work), [n_blocks, FRAMES, ch]."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (n_blocks, FRAMES, CHANNELS))
    swell = 0.5 + 0.5 * np.sin(np.arange(n_blocks) * 2 * np.pi / 400.0)
    return x * (0.05 + 1.95 * swell)[:, None, None]


def _time_blocks(calls: dict[str, Callable[[int], None]], n_blocks: int
                 ) -> dict[str, list[int]]:
    """Per-block ns of each callable, taking turns block by block (same machine noise)."""
    times: dict[str, list[int]] = {k: [] for k in calls}
    pc = time.perf_counter_ns
    for k in range(n_blocks):
        for name, fn in calls.items():
            t0 = pc()
            fn(k)
            times[name].append(pc() - t0)
    return times


# --------------------------------------------------------------------------- per block

def _per_block_rows(quick: bool) -> list[dict]:
    n_blocks = 2000 if quick else 20000
    xb = _noise_blocks(n_blocks)
    y = np.empty((FRAMES, CHANNELS))
    gain = np.empty(FRAMES)

    casc = BiquadCascade(BANDS, RATE, CHANNELS)
    glide = BiquadCascade(BANDS, RATE, CHANNELS, smoothing_ms=50.0)
    sos = casc.sos()
    zi = np.zeros((sos.shape[0], 2, CHANNELS))
    comp = Compressor(RATE, CHANNELS, threshold_db=-18.0, ratio=4.0, knee_db=6.0,
                      attack_ms=5.0, release_ms=80.0, lookahead_ms=5.0)
    comp_rms = Compressor(RATE, CHANNELS, threshold_db=-18.0, detector="rms")
    lim = Limiter(RATE, CHANNELS, ceiling_db=CEILING_DB, attack_ms=1.0, release_ms=80.0)

    def block(k: int) -> np.ndarray:
        return xb[k]

    casc_args = casc.kernel_args(y, y)[1:]
    glide_args = glide.kernel_args(y, y)[1:]

    def run_casc(k: int) -> None:
        cascade_block(block(k), *casc_args)

    def run_glide(k: int) -> None:
        if k % 50 == 0:  # a new target every 133 ms: all five bands always gliding
            for i, s in enumerate(BANDS):
                glide.set_section(i, freq=s.freq * (1.5 if (k // 50) % 2 else 1.0),
                                  gain_db=s.gain_db + (3.0 if (k // 50) % 2 else 0.0))
        cascade_block(block(k), *glide_args)

    def run_sosfilt(k: int) -> None:
        nonlocal zi
        _, zi = signal.sosfilt(sos, block(k), axis=0, zi=zi)

    comp_args = comp.kernel_args(y, y, gain)
    rms_args = comp_rms.kernel_args(y, y, gain)
    lim_args = lim.kernel_args(y, y, gain)

    def run_comp(k: int) -> None:
        compressor_block(block(k), *comp_args[1:])

    def run_comp_rms(k: int) -> None:
        compressor_block(block(k), *rms_args[1:])

    def run_lim(k: int) -> None:
        limiter_block(block(k), *lim_args[1:])

    calls = {"cascade": run_casc, "sosfilt": run_sosfilt, "glide": run_glide,
             "compressor": run_comp, "compressor rms": run_comp_rms, "limiter": run_lim}
    _time_blocks(calls, 200)  # warm up (compiled, caches hot)
    t = _time_blocks(calls, n_blocks)
    period_us = FRAMES / RATE * 1e6
    budget = 0.05 * period_us  # 5 % of a 128-frame period
    case = f"{RATE // 1000} kHz stereo, {FRAMES}-frame blocks"
    rows = []
    ref_name = "scipy.signal.sosfilt (zi, per block)"
    for q in (50, 99):
        ours, ref = _pct(t["cascade"], q), _pct(t["sosfilt"], q)
        rows.append(_row("filters", "biquad cascade 5-band", case, f"us/block p{q}", ours, "us",
                         ref_name, ref, "<= sosfilt", ours <= ref))
    for q in (50, 99):
        ours = _pct(t["glide"], q)
        rows.append(_row("filters", "biquad cascade 5-band, all bands gliding", case,
                         f"us/block p{q}", ours, "us", "biquad cascade 5-band (static)",
                         _pct(t["cascade"], q), f"<= {budget:.0f} us (5 % of the period)",
                         ours <= budget))
    rows.append(_row("filters", "biquad cascade 5-band", case, "rtf per block (p50)",
                     _pct(t["cascade"], 50) / period_us, "s/s", ref_name,
                     _pct(t["sosfilt"], 50) / period_us, "<= sosfilt",
                     _pct(t["cascade"], 50) <= _pct(t["sosfilt"], 50)))
    for name, kernel in (("compressor", "compressor (peak, 5 ms lookahead)"),
                         ("compressor rms", "compressor (rms)"),
                         ("limiter", "true-peak limiter (4x, 1 ms attack)")):
        for q in (50, 99):
            ours = _pct(t[name], q)
            rows.append(_row("dynamics", kernel, case, f"us/block p{q}", ours, "us",
                             "biquad cascade 5-band (same run)", _pct(t["cascade"], q),
                             f"<= {budget:.0f} us (5 % of the period)", ours <= budget))
    return rows


# --------------------------------------------------------------------------- offline

def _offline_rows(quick: bool) -> list[dict]:
    seconds = 30 if quick else 600
    chunk = RATE  # 1-second blocks
    rng = np.random.default_rng(2)
    casc = BiquadCascade(BANDS, RATE, CHANNELS)
    sos = casc.sos()
    zi = np.zeros((sos.shape[0], 2, CHANNELS))
    comp = Compressor(RATE, CHANNELS, threshold_db=-18.0, lookahead_ms=5.0)
    lim = Limiter(RATE, CHANNELS, ceiling_db=CEILING_DB)
    y = np.empty((chunk, CHANNELS))
    yc = np.empty((chunk, CHANNELS))
    yl = np.empty((chunk, CHANNELS))
    spent = {"cascade": 0, "sosfilt": 0, "compressor": 0, "limiter": 0}
    max_err = 0.0
    pc = time.perf_counter_ns
    # compile/warm outside the timing
    cascade_block(*BiquadCascade(BANDS, RATE, CHANNELS).kernel_args(y, yc))
    for k in range(seconds):
        x = rng.uniform(-1.0, 1.0, (chunk, CHANNELS)) * (0.1 + 0.9 * (k % 3 == 0))
        t0 = pc()
        cascade_block(*casc.kernel_args(x, y))
        t1 = pc()
        ref, zi = signal.sosfilt(sos, x, axis=0, zi=zi)
        t2 = pc()
        compressor_block(*comp.kernel_args(x, yc))
        t3 = pc()
        limiter_block(*lim.kernel_args(x, yl))
        t4 = pc()
        spent["cascade"] += t1 - t0
        spent["sosfilt"] += t2 - t1
        spent["compressor"] += t3 - t2
        spent["limiter"] += t4 - t3
        max_err = max(max_err, float(np.abs(y - ref).max()))
    audio_ns = seconds * 1e9
    case = f"{RATE // 1000} kHz stereo, {seconds} s offline in 1 s blocks"
    metric = f"rtf offline {seconds // 60} min stereo" if seconds >= 60 else \
        f"rtf offline {seconds} s stereo"
    rtf = {k: v / audio_ns for k, v in spent.items()}
    rows = [
        _row("filters", "biquad cascade 5-band", case, metric, rtf["cascade"], "s/s",
             "scipy.signal.sosfilt (zi, same blocks)", rtf["sosfilt"], "<= 1.5 x sosfilt",
             rtf["cascade"] <= 1.5 * rtf["sosfilt"]),
        _row("filters", "biquad cascade 5-band", case, "max abs error vs sosfilt", max_err, "FS",
             "scipy.signal.sosfilt", 0.0, "<= 1e-9", max_err <= 1e-9),
    ]
    for name, kernel in (("compressor", "compressor (peak, 5 ms lookahead)"),
                         ("limiter", "true-peak limiter (4x, 1 ms attack)")):
        rows.append(_row("dynamics", kernel, case, metric, rtf[name], "s/s",
                         "biquad cascade 5-band (same run)", rtf["cascade"], "<= 0.05",
                         rtf[name] <= 0.05))
    return rows


# --------------------------------------------------------------------------- limiter accuracy

def _overshoot_rows(quick: bool) -> list[dict]:
    rows = []
    rates = (48000,) if quick else (44100, 48000, 96000)
    for rate in rates:
        n = rate // 2 if quick else 2 * rate
        material = {
            "square 997 Hz full scale": square(n, 997.0, rate),
            "square 5 kHz full scale": square(n, 5000.0, rate),
            "sine fs/4 at 45 deg (+3 dBTP)": isp_sine(n),
            "impulses 0 dBFS": impulses(n, rate),
            "clipped music (+12 dB into 0 dBFS)": clipped_music(rate, n / rate),
        }
        for label, x in material.items():
            lim = Limiter(rate, 2, ceiling_db=CEILING_DB, attack_ms=1.0, release_ms=80.0,
                          makeup_db=6.0)
            xp = np.vstack([x, np.zeros((lim.latency + FRAMES, 2))])
            y = np.empty_like(xp)
            for s in range(0, xp.shape[0], FRAMES):
                lim.process(xp[s:s + FRAMES], y[s:s + FRAMES])
            over = float(true_peak_dbtp(y, rate).max()) - CEILING_DB
            up = signal.resample_poly(y, 16, 1, axis=0)
            over16 = 20 * math.log10(float(np.abs(up).max())) - CEILING_DB
            case = f"{rate / 1000:g} kHz, {label}, +6 dB drive, ceiling {CEILING_DB:g} dBTP"
            rows.append(_row("dynamics", "true-peak limiter (4x, 1 ms attack)", case,
                             "true-peak overshoot dB (true_peak_dbtp)", over, "dB",
                             "", None, "<= 0.1 dB", over <= 0.1))
            rows.append(_row("dynamics", "true-peak limiter (4x, 1 ms attack)", case,
                             "peak overshoot dB (16x resample_poly)", over16, "dB",
                             "", None, "", None))
    return rows


def run(quick: bool = False) -> list[dict]:
    """All rows: per-block timing, offline real-time factors, accuracy."""
    return _per_block_rows(quick) + _offline_rows(quick) + _overshoot_rows(quick)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (well under a minute)")
    args = ap.parse_args()
    print(table(run(quick=args.quick)))


if __name__ == "__main__":
    main()
