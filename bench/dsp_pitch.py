"""Benchmark of the streaming pYIN pitch tracker (dsp/pitch_yin.py, dsp/pitch_hmm.py).

`run(quick)` returns rows (see the lead's bench format); `python bench/dsp_pitch.py [--quick]`
prints them. Every timing row has a reference measured in the same run, interleaved where it
can be (the machine is shared and noisy):

- per block (48 kHz, 128-frame blocks, mono): our p50/p99 beside a floor kernel (a numba call
  that reads the same block once) and against 10 % of the block period;
- difference function at the chosen size: direct forms beside the FFT form;
- HMM: one fixed-lag Viterbi step beside librosa.sequence.viterbi per frame (same model);
- offline real-time factor over 10 minutes (quick: 30 s) of the evaluation clips tiled,
  beside librosa.pyin timed on the evaluation clips themselves (a shorter stretch: rtf is per
  second of audio, the case says how long);
- accuracy (mir_eval.melody against the generators' truth) for us and librosa.pyin, same
  fmin/fmax/frame/hop, on GM instruments and synthetic voice clips; cents error on steady
  tones; voiced share of noise; a few configuration variants.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numba
import numpy as np
from echoel.dsp.pitch_hmm import build_hmm, hmm_step, transition_matrix
from echoel.dsp.pitch_yin import (
    PitchConfig,
    PitchTracker,
    difference_direct,
    difference_fft,
    track,
)

from bench.evalset.pitch_clips import PitchClip, evaluation_set, score

GROUP = "pitch"
RATE = 48000
BLOCK = 128
CFG = PitchConfig()
KERNEL = "pitch_yin pYIN (centred YIN, fixed-lag HMM)"


def row(kernel: str, case: str, metric: str, ours: float, reference: str = "",
        ref: float | None = None, unit: str = "", goal: str = "",
        met: bool | None = None) -> dict:
    """One result row in the lead's format."""
    return {"group": GROUP, "kernel": kernel, "case": case, "metric": metric,
            "ours": float(ours), "reference": reference,
            "ref": None if ref is None else float(ref), "unit": unit, "goal": goal, "met": met}


@numba.njit(nogil=True, cache=True)
def floor_kernel(x: np.ndarray, acc: np.ndarray) -> None:
    """The least a per-block kernel does: one numba call reading the block."""
    s = 0.0
    for i in range(x.shape[0]):
        s += x[i] * x[i]
    acc[0] += s


def pyin(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """librosa.pyin with our fmin/fmax/frame/hop at 48 kHz: (frame times, f0 with 0 unvoiced)."""
    import librosa

    f0, voiced, _ = librosa.pyin(audio, sr=RATE, fmin=CFG.fmin, fmax=CFG.fmax,
                                 frame_length=CFG.frame_length, hop_length=CFG.hop_length)
    times = librosa.times_like(f0, sr=RATE, hop_length=CFG.hop_length)
    return times, np.where(voiced, f0, 0.0)


def percentile_us(ns: np.ndarray, q: float) -> float:
    return float(np.percentile(ns, q)) / 1000.0


def bench_blocks(audio: np.ndarray) -> list[dict]:
    """Per-block time, ours and the floor kernel interleaved on the same blocks."""
    tr = PitchTracker(CFG, max_block=BLOCK)
    tr.warm()
    acc = np.zeros(1)
    floor_kernel(audio[:BLOCK], acc)
    n = audio.shape[0] // BLOCK
    ours = np.empty(n, dtype=np.int64)
    base = np.empty(n, dtype=np.int64)
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for k in range(n):
            b = audio[k * BLOCK:(k + 1) * BLOCK]
            t0 = clock()
            floor_kernel(b, acc)
            t1 = clock()
            tr.process(b)
            t2 = clock()
            base[k] = t1 - t0
            ours[k] = t2 - t1
    finally:
        gc.enable()
    period_us = BLOCK / RATE * 1e6
    case = f"48 kHz mono, {BLOCK}-frame blocks, {n * BLOCK / RATE:.0f} s of the evaluation clips"
    hop_blocks = CFG.hop_length / BLOCK
    return [
        row(KERNEL, case, "us/block p50", percentile_us(ours, 50), "floor: numba call reading "
            "the block", percentile_us(base, 50), "us"),
        row(KERNEL, case, "us/block p99", percentile_us(ours, 99), "floor: numba call reading "
            "the block", percentile_us(base, 99), "us",
            f"p99 < 10 % of the {period_us:.0f} us block period",
            percentile_us(ours, 99) < 0.1 * period_us),
        row(KERNEL, case + f" (one analysis per {hop_blocks:g} blocks)", "us/block max",
            float(ours.max()) / 1000.0, "floor: numba call reading the block",
            float(base.max()) / 1000.0, "us"),
    ]


def time_call(fn, reps: int) -> float:
    """Median us of fn() over reps calls (after one warm call)."""
    fn()
    ts = np.empty(reps)
    for i in range(reps):
        t0 = time.perf_counter_ns()
        fn()
        ts[i] = time.perf_counter_ns() - t0
    return float(np.median(ts)) / 1000.0


def bench_difference(reps: int) -> list[dict]:
    """The difference function at the chosen size, direct forms beside the FFT."""
    tr = PitchTracker(CFG)
    lay = tr.layout
    fe = tr.front
    rng = np.random.default_rng(2)
    t = np.arange(lay.frame) / lay.rate_int
    x = np.sin(2 * np.pi * 196 * t) + 0.3 * rng.standard_normal(lay.frame)
    fe.frame[:] = x
    fe.csum[0] = 0.0
    fe.csum[1:] = np.cumsum(x * x)
    case = (f"frame {lay.frame} at {lay.rate_int / 1000:g} kHz, window {lay.window}, "
            f"lags 0..{lay.tau_max + 1}, FFT {lay.nfft}")
    rows = []
    # interleave the three so that machine noise hits them alike
    t_fft, t_direct, t_centred = [], [], []
    for _ in range(5):
        t_fft.append(time_call(lambda: difference_fft(fe), reps))
        t_direct.append(time_call(lambda: difference_direct(fe, False), reps))
        t_centred.append(time_call(lambda: difference_direct(fe, True), reps))
    fft_us = float(np.median(t_fft))
    for name, ts, note in (("difference_direct (window at frame start)", t_direct,
                            "same result as the FFT form"),
                           ("difference_direct centred (default)", t_centred,
                            "lag-centred windows, not computable as one FFT")):
        us = float(np.median(ts))
        rows.append(row(name, f"{case}; {note}", "us/frame p50", us, "difference_fft (same run)",
                        fft_us, "us", "direct <= FFT: use the direct form", us <= fft_us))
    return rows


def bench_hmm(frames: int) -> list[dict]:
    """One fixed-lag Viterbi step beside librosa.sequence.viterbi per frame, same model."""
    import librosa

    lay = PitchTracker(CFG).layout
    nb, width = lay.n_bins, lay.width
    hm = build_hmm(nb, width, CFG.switch_prob, CFG.lookahead, lay.max_candidates,
                   CFG.bins_per_semitone, CFG.fmin)
    rng = np.random.default_rng(4)
    obs = np.zeros((2 * nb, frames))
    ring = CFG.lookahead + 1
    steps = []
    for t in range(frames):
        slot = t % ring
        bins = rng.integers(0, nb, size=3)
        p = rng.dirichlet(np.ones(3)) * 0.8
        hm.cand_n[slot] = 3
        for c in range(3):
            hm.cand_f[slot, c] = CFG.fmin * 2 ** (bins[c] / (12 * CFG.bins_per_semitone))
            hm.cand_p[slot, c] = p[c]
            obs[bins[c], t] += p[c]
        hm.voiced_p[slot] = p.sum()
        obs[nb:, t] = (1 - p.sum()) / nb
        t0 = time.perf_counter_ns()
        hmm_step(hm, slot)
        steps.append(time.perf_counter_ns() - t0)
    trans = transition_matrix(nb, width, CFG.switch_prob)
    p_init = np.full(2 * nb, 1 / (2 * nb))
    librosa.sequence.viterbi(obs[:, :4], trans, p_init=p_init)  # compile
    t0 = time.perf_counter_ns()
    librosa.sequence.viterbi(obs, trans, p_init=p_init)
    ref_us = (time.perf_counter_ns() - t0) / 1000.0 / frames
    ours = float(np.median(steps[1:])) / 1000.0
    case = f"{2 * nb} states (2 x {nb} bins of {100 // CFG.bins_per_semitone} cents), " \
           f"band {width} bins, {frames} frames"
    return [row("pitch_hmm hmm_step", case, "us/frame p50", ours,
                "librosa.sequence.viterbi per frame (dense transition)", ref_us, "us",
                "faster than librosa's decoder", ours < ref_us)]


def bench_offline(audio: np.ndarray, pyin_rtf: float, pyin_seconds: float) -> list[dict]:
    """Our offline real-time factor; librosa.pyin's from the accuracy run."""
    track(audio[:RATE], CFG)  # compile/warm
    t0 = time.perf_counter()
    track(audio, CFG)
    rtf = (time.perf_counter() - t0) / (audio.shape[0] / RATE)
    minutes = audio.shape[0] / RATE / 60
    case = (f"{minutes:g} min mono 48 kHz (evaluation clips tiled); librosa.pyin timed on "
            f"{pyin_seconds:.0f} s of the clips (rtf per second of audio)")
    return [
        row(KERNEL, case, "rtf offline", rtf, "librosa.pyin rtf (same fmin/fmax/frame/hop)",
            pyin_rtf, "s/s", "faster than librosa.pyin", rtf < pyin_rtf),
        row(KERNEL, case, "speed-up vs librosa.pyin", pyin_rtf / rtf, "librosa.pyin", 1.0, "x"),
    ]


def evaluate(clips: list[PitchClip]) -> tuple[list[dict], float, float, dict[str, float]]:
    """Accuracy rows for ours and librosa.pyin; returns rows, pyin's rtf and seconds timed, and
    our mean scores (for the variant rows)."""
    ours_s, ref_s = [], []
    pyin_time = 0.0
    rows = []
    for clip in clips:
        tr = track(clip.audio, CFG)
        o = score(clip.truth_at(tr.times), tr.f0)
        t0 = time.perf_counter()
        times, f0 = pyin(clip.audio)
        pyin_time += time.perf_counter() - t0
        r = score(clip.truth_at(times), f0)
        ours_s.append(o)
        ref_s.append(r)
        rows.append(row(KERNEL, f"{clip.name} {clip.seconds:g} s", "raw pitch accuracy",
                        o["raw_pitch"], "librosa.pyin", r["raw_pitch"], "share",
                        "ours >= pyin - 0.02", o["raw_pitch"] >= r["raw_pitch"] - 0.02))
    seconds = sum(c.seconds for c in clips)
    mean_o = {k: float(np.mean([s[k] for s in ours_s])) for k in ours_s[0]}
    mean_r = {k: float(np.mean([s[k] for s in ref_s])) for k in ref_s[0]}
    case = (f"mean over {len(clips)} clips ({seconds:g} s: "
            f"{', '.join(c.name for c in clips)})")
    for key, metric, higher in (("raw_pitch", "raw pitch accuracy (50 cents)", True),
                                ("raw_chroma", "raw chroma accuracy", True),
                                ("voicing_recall", "voicing recall", True),
                                ("voicing_false_alarm", "voicing false alarm", False),
                                ("overall", "overall accuracy", True)):
        o, r = mean_o[key], mean_r[key]
        goal = "ours >= pyin - 0.02" if higher else "ours <= pyin"
        met = o >= r - 0.02 if higher else o <= r
        rows.append(row(KERNEL, case, metric, o, "librosa.pyin", r, "share", goal, met))
    return rows, pyin_time / seconds, seconds, mean_o


def harmonic_tone(f: float, seconds: float) -> np.ndarray:
    n = int(seconds * RATE)
    ph = 2 * np.pi * f * np.arange(n) / RATE
    x = sum(np.sin(k * ph + 0.7 * k) / k for k in range(1, 7) if k * f < 0.45 * RATE)
    return (0.3 * x / np.max(np.abs(x))).astype(np.float32)


def bench_cents(notes: tuple[tuple[int, float], ...]) -> list[dict]:
    """Median |cents error| on steady 6-harmonic tones, ours and librosa.pyin."""
    ours, ref = [], []
    for note, detune in notes:
        f = 440.0 * 2 ** ((note - 69 + detune / 100) / 12)
        x = harmonic_tone(f, 0.6)
        tr = track(x, CFG)
        mid = (tr.times > 0.1) & (tr.times < 0.5)
        ours.append(np.median(np.abs(1200 * np.log2(tr.f0[mid] / f))))
        times, f0 = pyin(x)
        lm = (times > 0.1) & (times < 0.5) & (f0 > 0)
        ref.append(np.median(np.abs(1200 * np.log2(f0[lm] / f))) if lm.any() else math.nan)
    case = "steady tones " + ", ".join(f"{n}{d:+g}c" for n, d in notes)
    return [row(KERNEL, case, "median |cents error|", float(np.mean(ours)), "librosa.pyin",
                float(np.nanmean(ref)), "cents", "< 1 cent", float(np.mean(ours)) < 1.0),
            row(KERNEL, case, "worst note median |cents error|", float(np.max(ours)),
                "librosa.pyin", float(np.nanmax(ref)), "cents", "< 1 cent",
                float(np.max(ours)) < 1.0)]


def bench_noise(seconds: float) -> list[dict]:
    """Share of frames called voiced on noise, ours and librosa.pyin."""
    import scipy.signal

    rng = np.random.default_rng(8)
    w = rng.standard_normal(int(seconds * RATE))
    pink = scipy.signal.lfilter([0.049922035, -0.095993537, 0.050612699, -0.004408786],
                                [1, -2.494956002, 2.017265875, -0.522189400], w)
    brown = scipy.signal.lfilter([1.0], [1.0, -0.995], w)
    rows = []
    for name, x in (("white -20 dBFS", 0.1 * w), ("pink -10 dBFS", 0.3 * pink / pink.std()),
                    ("brown -14 dBFS", 0.2 * brown / brown.std())):
        x = x.astype(np.float32)
        tr = track(x, CFG)
        _, f0 = pyin(x)
        rows.append(row(KERNEL, f"{name} noise, {seconds:g} s", "voiced share",
                        float(tr.voiced.mean()), "librosa.pyin", float(np.mean(f0 > 0)),
                        "share", "<= 0.01", float(tr.voiced.mean()) <= 0.01))
    return rows


def bench_variants(clips: list[PitchClip], default: dict[str, float]) -> list[dict]:
    """Accuracy and latency of configuration variants beside the default, same clips."""
    variants = (("lookahead=0 (online Viterbi)", {"lookahead": 0}),
                ("lookahead=8", {"lookahead": 8}),
                ("bins_per_semitone=10 (librosa's 10-cent states)", {"bins_per_semitone": 10}),
                ("no_trough_prob=0.01 (librosa's)", {"no_trough_prob": 0.01}),
                ("method=fft (window at frame start)", {"method": "fft"}),
                ("leap_prob=1e-3 (leaps beyond the band)", {"leap_prob": 1e-3}),
                ("silence_db=-50", {"silence_db": -50.0}))
    rows = []
    case_clips = f"{len(clips)} clips, {sum(c.seconds for c in clips):g} s"
    for name, kw in variants:
        cfg = PitchConfig(**kw)
        scores = []
        for clip in clips:
            tr = track(clip.audio, cfg)
            scores.append(score(clip.truth_at(tr.times), tr.f0))
        lat_ms = PitchTracker(cfg, max_block=BLOCK).latency_seconds * 1000
        for key, metric in (("raw_pitch", "raw pitch accuracy"),
                            ("voicing_false_alarm", "voicing false alarm"),
                            ("overall", "overall accuracy")):
            rows.append(row(f"pitch_yin {name}", f"{case_clips}; latency {lat_ms:.1f} ms",
                            metric, float(np.mean([s[key] for s in scores])),
                            "pitch_yin defaults", default[key], "share"))
    return rows


def run(quick: bool = False) -> list[dict]:
    """All rows; quick: short clips and 30 s of audio for timing (well under a minute)."""
    clip_s = 1.25 if quick else 8.0
    clips = evaluation_set(seconds=clip_s, seed=1)
    rows, pyin_rtf, pyin_s, mean_o = evaluate(clips)
    tiled = np.concatenate([c.audio for c in clips])
    long_s = 30.0 if quick else 600.0
    audio = np.resize(tiled, int(long_s * RATE)).astype(np.float32)
    lay = PitchTracker(CFG).layout
    rows.append(row(KERNEL, f"frame {CFG.frame_length}, hop {CFG.hop_length}, decimation "
                    f"{CFG.decimation}, lookahead {CFG.lookahead} frames, FIR "
                    f"{lay.taps.shape[0]} taps", "algorithmic latency", lay.latency_samples /
                    RATE * 1000, "", None, "ms", "frame/2 + FIR delay + lookahead"))
    rows += bench_blocks(audio[: int((30.0 if quick else 120.0) * RATE)])
    rows += bench_offline(audio, pyin_rtf, pyin_s)
    rows += bench_difference(200 if quick else 1000)
    rows += bench_hmm(200 if quick else 1000)
    cents_notes = ((28, 13.0), (45, -27.0), (69, 4.0), (88, 22.0)) if quick else \
        ((28, 13.0), (40, -41.0), (45, -27.0), (57, 33.0), (69, 4.0), (81, -41.0),
         (88, 22.0), (95, -8.0))
    rows += bench_cents(cents_notes)
    rows += bench_noise(1.0 if quick else 4.0)
    rows += bench_variants(clips, mean_o)
    return rows


if __name__ == "__main__":
    t_start = time.perf_counter()
    from bench.bench_all import table

    print(table(run(quick="--quick" in sys.argv[1:])))
    print(f"({time.perf_counter() - t_start:.1f} s)")
