"""Benchmark of `echoel analyze` (daemon/file_analysis.py): the whole report's speed and memory,
and loudness normalisation's accuracy, beside references measured in the same run.

run(quick) rows (group "analyze"):
- speed: read_audio + analyze_audio on a music piece (bench.dsp_loudness.music) as a 48 kHz
  stereo 24-bit WAV, 10 min (quick: 30 s), decode included: real-time factor of the full
  report and of each analysis alone; beside a plain librosa/pyloudnorm pipeline on the same
  file (soundfile decode, pyloudnorm integrated loudness, librosa pyin on the mono mix,
  chroma_cqt chords by bench.dsp_chords.baseline_chords and a Krumhansl key on its chroma),
  run on the first 60 s at most (quick: 10 s; it is slow) and compared in real-time factor.
- memory: peak traced allocation (tracemalloc) of read_audio + analyze_audio over the size
  of the decoded audio, on the quick material.
- normalisation: programmes (loud music with overs, quiet music with clicks that need the
  limiter, a click train the limiter must crush, noise with bursts) to -14 and -23 LUFS
  under a -1 dBTP ceiling: deviation of the output's integrated loudness from the target and
  the output's true peak over the ceiling (both by dsp.loudness on the output), ours beside
  ffmpeg's loudnorm (two passes, linear where it can) on the same file; and the wall time of
  both.

`python bench/analyze_bench.py [--quick]` prints the rows as a table.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import soundfile as sf  # noqa: E402
from echoel.daemon.file_analysis import (  # noqa: E402
    LOUDNESS_TOLERANCE_LU,
    TRUE_PEAK_TOLERANCE_DB,
    analyze_audio,
    normalize_audio,
    read_audio,
)
from echoel.dsp.key_estimate import estimate_key  # noqa: E402
from echoel.dsp.loudness import measure  # noqa: E402

from bench.dsp_loudness import music, noise_program  # noqa: E402

RATE = 48000
CEILING = -1.0
TARGETS = (-14.0, -23.0)
REF_MAX_SECONDS = (10.0, 60.0)  # the librosa pipeline runs on this much at most (quick, full)
SPEED_GOAL_RTF = 20.0  # the full report at least this much faster than real time
SPEED_GOAL_RATIO = 5.0  # and this much faster than the librosa pipeline
MEMORY_GOAL_RATIO = 2.5  # peak allocation over the decoded audio


def _row(kernel: str, case: str, metric: str, ours: float, reference: str = "",
         ref: float | None = None, unit: str = "", goal: str = "",
         met: bool | None = None) -> dict:
    return {"group": "analyze", "kernel": kernel, "case": case, "metric": metric,
            "ours": float(ours), "reference": reference,
            "ref": None if ref is None else float(ref), "unit": unit, "goal": goal, "met": met}


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ----------------------------------------------------------------------------- references

def librosa_report(path: Path, seconds: float) -> dict:
    """The plain pipeline on the first `seconds` of a file: pyloudnorm, pyin, chroma_cqt
    chords and a key from the same chroma."""
    import librosa
    import pyloudnorm

    from bench.dsp_chords import baseline_chords, baseline_chroma

    x, rate = sf.read(str(path), dtype="float32", always_2d=True, frames=round(seconds * RATE))
    lufs = pyloudnorm.Meter(rate).integrated_loudness(x.astype(np.float64))
    y = librosa.resample(x.mean(axis=1), orig_sr=rate, target_sr=22050)
    _f0, voiced, _ = librosa.pyin(y, fmin=40.0, fmax=2000.0, sr=22050, frame_length=2048,
                                 hop_length=256)
    feats = baseline_chroma(x, rate)
    chords = baseline_chords(x, rate, features=feats)
    key = estimate_key(feats[0].T)
    return {"lufs": lufs, "voiced": float(np.mean(voiced)), "chords": len(chords),
            "key": key.key}


def ffmpeg_loudnorm(src: Path, dst: Path, target: float, ceiling: float, rate: int) -> str:
    """ffmpeg loudnorm in two passes (the first measures, the second normalises, linear=true:
    a plain gain where the true peak allows, else ffmpeg's dynamic mode); returns the
    normalisation type ffmpeg reports."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError("ffmpeg not found: install Debian's ffmpeg")
    base = f"loudnorm=I={target:g}:TP={ceiling:g}:LRA=20"
    r = subprocess.run([exe, "-hide_banner", "-nostats", "-i", str(src), "-af",
                        base + ":print_format=json", "-f", "null", "-"],
                       capture_output=True, text=True, timeout=600)
    m = json.loads(r.stderr[r.stderr.rfind("{"):r.stderr.rfind("}") + 1])
    second = (f"{base}:measured_I={m['input_i']}:measured_TP={m['input_tp']}"
              f":measured_LRA={m['input_lra']}:measured_thresh={m['input_thresh']}"
              f":offset={m['target_offset']}:linear=true:print_format=json")
    r = subprocess.run([exe, "-hide_banner", "-nostats", "-y", "-i", str(src), "-af", second,
                        "-ar", str(rate), "-c:a", "pcm_f32le", str(dst)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"ffmpeg loudnorm failed: {r.stderr[-400:]}")
    found = re.search(r'"normalization_type"\s*:\s*"(\w+)"', r.stderr)
    return found.group(1) if found else "?"


# ----------------------------------------------------------------------------- material

def clicks(x: np.ndarray, rate: int, every_s: float, over_db: float, seed: int = 3
           ) -> np.ndarray:
    """x with short 3 kHz clicks `over_db` above its peak, about every `every_s` seconds."""
    rng = np.random.default_rng(seed)
    y = x.copy()
    n = round(0.0015 * rate)
    click = np.hanning(n) * np.sin(2 * np.pi * 3000.0 * np.arange(n) / rate)
    amp = np.abs(x).max() * 10.0 ** (over_db / 20.0)
    t = rng.uniform(0.2, every_s)
    while t < x.shape[0] / rate - 0.1:
        i = round(t * rate)
        y[i:i + n] += amp * click[:, None]
        t += every_s * rng.uniform(0.5, 1.5)
    return y


def click_train(seconds: float, rate: int) -> np.ndarray:
    """A -40 dBFS 220 Hz tone with a 2 kHz click 34 dB over it every 50 ms: -14 LUFS under
    -1 dBTP only by crushing every click (the case the report must call hard)."""
    n = round(seconds * rate)
    x = 0.01 * np.sin(2 * np.pi * 220.0 * np.arange(n) / rate)
    k = round(0.001 * rate)
    click = 0.5 * np.hanning(k) * np.sin(2 * np.pi * 2000.0 * np.arange(k) / rate)
    for i in range(0, n - k, rate // 20):
        x[i:i + k] += click
    return np.stack([x, x], axis=1)


def programmes(seconds: float, quick: bool) -> dict[str, np.ndarray]:
    """Named float32 stereo programmes at RATE for the normalisation rows."""
    m = music(seconds, RATE)
    out = {"loud music with overs (float)": m * 4.0,
           "quiet music with clicks": clicks(m * 0.05, RATE, 5.0, 6.0)}
    if not quick:
        out["click train over a quiet tone (hard)"] = click_train(seconds, RATE)
        out["noise with bursts"] = noise_program(seconds, RATE)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


# ----------------------------------------------------------------------------- rows

def speed_rows(quick: bool) -> list[dict]:
    seconds = 30.0 if quick else 600.0
    label = "30 s" if quick else "10 min"
    repeats = 2 if quick else 1
    x = music(seconds, RATE)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / "music.wav"
        sf.write(str(path), x, RATE, subtype="PCM_24")
        analyze_audio(x[:RATE], RATE)  # load the numba caches outside the timing

        def ours(what=("loudness", "pitch", "key", "chords")) -> dict:
            a, r = read_audio(path)
            return analyze_audio(a, r, what=what)

        t_all = _best_of(ours, repeats)
        ref_s = min(seconds, REF_MAX_SECONDS[0 if quick else 1])
        t_ref = _best_of(lambda: librosa_report(path, ref_s), 1)
        rtf, rtf_ref = seconds / t_all, ref_s / t_ref
        case = f"music {label} 48k stereo 24-bit WAV, decode included"
        ref = f"soundfile+pyloudnorm+librosa pyin/chroma_cqt ({ref_s:g} s)"
        rows += [
            _row("analyze_audio (all)", case, f"rtf offline {label} stereo", rtf, ref, rtf_ref,
                 "x real time", f">= {SPEED_GOAL_RTF:g}x real time", rtf >= SPEED_GOAL_RTF),
            _row("analyze_audio (all)", case, "speed ratio vs reference (rtf)", rtf / rtf_ref,
                 ref, 1.0, "x", f">= {SPEED_GOAL_RATIO:g}x", rtf / rtf_ref >= SPEED_GOAL_RATIO),
            _row("analyze_audio (all)", case, "wall time", t_all, "", None, "s"),
        ]
        for what in ("loudness", "pitch", "key,chords"):
            t = _best_of(lambda w=what: ours(tuple(w.split(","))), repeats)
            rows.append(_row(f"analyze_audio ({what})", case, f"rtf offline {label} stereo",
                             seconds / t, "", None, "x real time"))
    return rows


def memory_rows() -> list[dict]:
    seconds = 30.0
    x = music(seconds, RATE)
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / "music.wav"
        sf.write(str(path), x, RATE, subtype="PCM_24")
        analyze_audio(x[:RATE], RATE)
        tracemalloc.start()
        try:
            a, r = read_audio(path)
            analyze_audio(a, r)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    decoded = x.shape[0] * x.shape[1] * 4
    ratio = peak / decoded
    return [_row("read_audio + analyze_audio", "music 30 s 48k stereo 24-bit WAV",
                 "peak allocation / decoded float32 audio", ratio, "", None, "x",
                 f"<= {MEMORY_GOAL_RATIO:g}x", ratio <= MEMORY_GOAL_RATIO)]


def normalize_rows(quick: bool) -> list[dict]:
    seconds = 30.0 if quick else 60.0
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as td:
        for name, x in programmes(seconds, quick).items():
            src = Path(td) / "in.wav"
            sf.write(str(src), x, RATE, subtype="FLOAT")
            for target in TARGETS:
                t0 = time.perf_counter()
                a, r = read_audio(src)
                y, res = normalize_audio(a, r, target, CEILING)
                t_ours = time.perf_counter() - t0
                dst = Path(td) / "ff.wav"
                t0 = time.perf_counter()
                mode = ffmpeg_loudnorm(src, dst, target, CEILING, RATE)
                t_ff = time.perf_counter() - t0
                ff, _ = sf.read(str(dst), dtype="float32", always_2d=True)
                ours_m, ff_m = measure(y, RATE), measure(ff, RATE)
                case = f"{name}, {seconds:g} s, to {target:g} LUFS / {CEILING:g} dBTP"
                ref = f"ffmpeg loudnorm 2-pass ({mode})"
                dev, dev_ff = ours_m.integrated - target, ff_m.integrated - target
                over = ours_m.true_peak_max_dbtp - CEILING
                over_ff = ff_m.true_peak_max_dbtp - CEILING
                kernel = "normalize_audio" + (" + limiter" if res.limiter else "")
                goal = f"|dev| <= {LOUDNESS_TOLERANCE_LU:g} LU unless flagged hard"
                rows += [
                    _row(kernel, case, "loudness deviation LU", dev, ref, dev_ff, "LU", goal,
                         abs(dev) <= LOUDNESS_TOLERANCE_LU or res.limiter_hard),
                    _row(kernel, case, "true peak over ceiling dB", over, ref, over_ff, "dB",
                         f"<= {TRUE_PEAK_TOLERANCE_DB:g} dB", over <= TRUE_PEAK_TOLERANCE_DB),
                    _row(kernel, case, "wall time (read + normalise)", t_ours, ref, t_ff, "s",
                         "less than ffmpeg", t_ours < t_ff),
                ]
                if res.limiter:
                    rows.append(_row(kernel, case, "limiter max reduction dB",
                                     res.limiter_max_reduction_db, "", None, "dB",
                                     "flagged hard" if res.limiter_hard else ""))
    return rows


def run(quick: bool = False) -> list[dict]:
    """Benchmark rows (see the module docstring); quick: 30 s material, two programmes."""
    rows = speed_rows(quick)
    rows += memory_rows()
    rows += normalize_rows(quick)
    return rows


def main() -> None:
    from bench.bench_all import table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30 s material, two programmes")
    args = ap.parse_args()
    t0 = time.time()
    print(table(run(args.quick)))
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
