"""Offline analysis of an audio file: loudness, pitch, key and chords, and loudness
normalisation with a true-peak limiter (what `echoel analyze` reports; daemon/analyze_cli.py).

`read_audio` reads a file with soundfile and refuses what cannot be analysed with a message that
names the value and what is allowed. `analyze_audio` is pure: float audio [frames, channels]
and its rate in, a JSON-ready dict out (-inf levels become None, never NaN). The kernels are
the streaming ones of echoel.dsp run over the whole signal (one big block each):

- loudness: BS.1770-4 / R128 with true peak (dsp/loudness.py) with the layout's channel
  weights (mono, stereo, L R C, 5.0, 5.1);
- pitch: pYIN (dsp/pitch_yin.py) on the mono mix (mean of the channels): a summary and the
  track decimated to `track_rate` points a second;
- key and chords from one chroma analysis of the mono mix (dsp/chroma.py, key_estimate.py,
  chord_recognition.py: offline Viterbi).

`normalize_audio` applies the mastering gain (dsp/mastering_gain.py) and, when the true peak
would pass the ceiling, the true-peak Limiter (dsp/dynamics.py) with its latency removed, so
the output is aligned with the input and as long. The limiter costs loudness, so the drive is
raised (secant steps on the measured loudness, at most MAX_EXTRA_DRIVE_DB over the plain gain)
until the output measures within LOUDNESS_STEP_LU of the target; when that is out of reach the
result says the limiter had to work hard.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from echoel.dsp.chord_recognition import ChordParams, decode_offline, states_to_segments
from echoel.dsp.chroma import ChromaConfig, chroma_offline
from echoel.dsp.dynamics import Limiter
from echoel.dsp.key_estimate import KEY_LABELS, estimate_key
from echoel.dsp.loudness import LAYOUT_WEIGHTS, LoudnessResult, measure
from echoel.dsp.mastering_gain import mastering_gain
from echoel.dsp.pitch_yin import PitchConfig, note_name, track

ANALYSES = ("loudness", "pitch", "key", "chords")
RATE_RANGE = (8000, 192000)  # chroma's range; the meter also needs 100 ms in whole samples
RATE_STEP = 10
LAYOUT_NAMES = {1: "mono", 2: "stereo (L R)", 3: "L R C", 5: "5.0 (L R C Ls Rs)",
                6: "5.1 (L R C LFE Ls Rs)"}
TRACK_RATE = 10.0  # pitch track points per second in the report
PITCH_FRAME_S = 0.064  # pYIN frame, as the tracker's default at 48 kHz
PITCH_HOP_S = 0.008
PITCH_INTERNAL_RATE = 16000  # the tracker's analysis rate at 48 kHz
CHUNK = 1 << 16  # frames per limiter / scan pass
LOUDNESS_STEP_LU = 0.05  # normalisation stops this close to the target
LOUDNESS_TOLERANCE_LU = 0.5  # the promise: within this of the target unless limited hard
TRUE_PEAK_TOLERANCE_DB = 0.1  # the promise: true peak at most ceiling + this
MAX_EXTRA_DRIVE_DB = 6.0  # drive into the limiter beyond the plain gain, at most
MAX_PASSES = 6
LIMITER_ATTACK_MS = 2.0
LIMITER_RELEASE_MS = 50.0
CEILING_RANGE_DBTP = (-30.0, 0.0)  # mastering_gain's range cut to what the Limiter takes
COMMON_FORMATS = "WAV, FLAC, OGG (Vorbis, Opus), MP3, AIFF, CAF, W64, RF64"
QUALITY_SYMBOLS = {"maj": "", "min": "m", "7": "7", "maj7": "maj7", "min7": "m7"}


class AudioInputError(ValueError):
    """The audio (file or array) cannot be analysed; the message says why and what is allowed."""


# ----------------------------------------------------------------------------- reading

def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a sound file (WAV, FLAC, OGG, AIFF, MP3... what libsndfile reads) as float
    [frames, channels] (float32; float64 for 32-bit integer and double files) and its rate.

    Raises AudioInputError for a missing path, a folder, an empty or unreadable file, or a
    file without frames."""
    p = Path(path)
    if not p.exists():
        raise AudioInputError("no such file")
    if p.is_dir():
        raise AudioInputError("is a folder; name a sound file")
    if p.stat().st_size == 0:
        raise AudioInputError("empty file (0 bytes); need a sound file (WAV, FLAC, OGG...)")
    try:
        info = sf.info(str(p))
        dtype = "float64" if info.subtype in ("PCM_32", "DOUBLE") else "float32"
        audio, rate = sf.read(str(p), dtype=dtype, always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:  # libsndfile's refusals
        raise AudioInputError(f"not a readable sound file ({exc}); allowed: {COMMON_FORMATS} "
                              "and the other formats libsndfile reads") from exc
    except OSError as exc:
        raise AudioInputError(f"cannot read it: {exc.strerror or exc}") from exc
    if audio.shape[0] == 0:
        raise AudioInputError(f"no audio frames ({info.format} {info.subtype}, "
                              f"{info.channels} ch, {info.samplerate} Hz); need at least one")
    return np.ascontiguousarray(audio), int(rate)


# ----------------------------------------------------------------------------- checks

def check_rate(rate: int) -> None:
    """Raise AudioInputError unless every analysis takes `rate`."""
    lo, hi = RATE_RANGE
    if not isinstance(rate, int | np.integer) or not lo <= rate <= hi or rate % RATE_STEP:
        raise AudioInputError(f"sample rate {rate} Hz: allowed {lo}..{hi} Hz in whole "
                              f"multiples of {RATE_STEP} Hz (e.g. 44100, 48000, 96000)")


def layouts_text() -> str:
    """The loudness layouts, for messages: '1 (mono), 2 (stereo (L R)), ...'."""
    return ", ".join(f"{n} ({LAYOUT_NAMES[n]})" for n in sorted(LAYOUT_WEIGHTS))


def check_layout(channels: int) -> None:
    """Raise AudioInputError unless BS.1770 has a layout for `channels`."""
    if channels not in LAYOUT_WEIGHTS:
        raise AudioInputError(f"{channels} channels: no BS.1770 loudness layout; allowed "
                              f"{layouts_text()} channels")


def first_nonfinite(audio: np.ndarray) -> tuple[int, int, int]:
    """(count, first frame, its channel) of NaN/Inf samples; (0, -1, -1) when all finite.
    Scans in chunks (no full-size temporary)."""
    count, first, chan = 0, -1, -1
    for s in range(0, audio.shape[0], CHUNK):
        bad = ~np.isfinite(audio[s:s + CHUNK])
        n = int(bad.sum())
        if n and first < 0:
            f, c = np.argwhere(bad)[0]
            first, chan = s + int(f), int(c)
        count += n
    return count, first, chan


def check_audio(audio: np.ndarray, rate: int, what: Iterable[str] = ANALYSES) -> np.ndarray:
    """The audio as a C-contiguous float [frames, channels] array after every check; raises
    AudioInputError naming the value and what is allowed."""
    a = np.asarray(audio)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise AudioInputError(f"audio of shape {a.shape}: need [frames, channels]")
    if a.dtype not in (np.float32, np.float64):
        raise AudioInputError(f"audio dtype {a.dtype}: allowed float32 or float64 "
                              "(convert integer PCM to float)")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise AudioInputError(f"audio of shape {a.shape}: no samples; need at least one frame")
    check_rate(rate)
    if "loudness" in what:
        check_layout(a.shape[1])
    count, first, chan = first_nonfinite(a)
    if count:
        raise AudioInputError(f"{count} non-finite samples (NaN/Inf), the first at "
                              f"{first / rate:.3f} s (frame {first}, channel {chan + 1}); "
                              "allowed: finite samples only")
    return np.ascontiguousarray(a)


def parse_what(what: Iterable[str]) -> tuple[str, ...]:
    """Analyses asked for, in report order; raises AudioInputError for an unknown name."""
    names = [w.strip() for w in what if w.strip()]
    unknown = [w for w in names if w not in ANALYSES]
    if unknown or not names:
        raise AudioInputError(f"analyses {names or '(none)'}: allowed any of "
                              f"{', '.join(ANALYSES)}")
    return tuple(w for w in ANALYSES if w in names)


# ----------------------------------------------------------------------------- analyses

def pitch_config(rate: int) -> PitchConfig:
    """pYIN settings for `rate`: 64 ms frames, 8 ms hop, analysed near 16 kHz (the tracker's
    defaults at 48 kHz; the decimation is a divisor of the rate that keeps 2 kHz in band)."""
    fmax = PitchConfig.fmax
    ok = [d for d in range(1, rate // 5000 + 1)
          if rate % d == 0 and rate / d * 0.35 >= fmax]
    target = rate / PITCH_INTERNAL_RATE
    dec = min(ok, key=lambda d: (abs(d - target), d))
    rate_int = rate / dec
    frame = 2 * math.ceil(PITCH_FRAME_S * rate_int / 2)
    hop = max(1, round(PITCH_HOP_S * rate_int))
    return PitchConfig(rate=rate, decimation=dec, frame_length=frame * dec,
                       hop_length=hop * dec)


def _note_of(f0: float, a4: float = 440.0) -> tuple[str, float]:
    """Nearest note name and the offset from it in cents."""
    m = 69.0 + 12.0 * math.log2(f0 / a4)
    n = round(m)
    return note_name(n), 100.0 * (m - n)


def pitch_summary(mono: np.ndarray, rate: int, track_rate: float = TRACK_RATE) -> dict:
    """Voiced share, median f0 and its note, the 5th..95th percentile range, and the track
    decimated to `track_rate` points a second (median voiced f0 of each slot when at least half
    of its frames are voiced, else None)."""
    cfg = pitch_config(rate)
    tr = track(mono, cfg)
    n = tr.f0.shape[0]
    voiced = tr.voiced & (tr.f0 > 0.0)
    out: dict = {"frames": n, "hop_s": cfg.hop_length / rate,
                 "voiced_share": float(voiced.mean()) if n else 0.0,
                 "median_f0_hz": None, "median_note": "", "median_cents": None,
                 "range_hz": None, "range_notes": None, "mean_confidence": None}
    if voiced.any():
        f = tr.f0[voiced]
        med = float(np.median(f))
        lo, hi = (float(v) for v in np.percentile(f, [5.0, 95.0]))
        name, cents = _note_of(med, cfg.a4)
        out.update(median_f0_hz=med, median_note=name, median_cents=cents,
                   range_hz=[lo, hi], range_notes=[_note_of(lo)[0], _note_of(hi)[0]],
                   mean_confidence=float(tr.confidence[voiced].mean()))
    slot = 1.0 / track_rate
    idx = np.floor(tr.times / slot + 1e-9).astype(np.int64)
    n_slots = int(idx[-1]) + 1 if n else 0
    bounds = np.searchsorted(idx, np.arange(n_slots + 1))  # frames are in time order
    f0s: list[float | None] = []
    for k in range(n_slots):
        f, v = tr.f0[bounds[k]:bounds[k + 1]], voiced[bounds[k]:bounds[k + 1]]
        f0s.append(float(np.median(f[v])) if v.size and v.mean() >= 0.5 else None)
    out["track"] = {"rate_hz": track_rate,
                    "times_s": [round(k * slot, 6) for k in range(n_slots)],
                    "f0_hz": f0s}
    return out


def chord_symbol(label: str) -> str:
    """Lead-sheet symbol of a Harte label: 'A:min7' -> 'Am7', 'C:maj' -> 'C', 'N' -> 'N.C.'."""
    if ":" not in label:
        return "N.C." if label == "N" else label
    root, quality = label.split(":", 1)
    return root + QUALITY_SYMBOLS.get(quality, ":" + quality)


def chord_summary(segments: list[tuple[float, float, str]], duration: float) -> dict:
    """Count of segments and changes, distinct chords, chords by time held, no-chord share."""
    held: dict[str, float] = {}
    for s, e, lab in segments:
        held[lab] = held.get(lab, 0.0) + (e - s)
    chords = {k: v for k, v in held.items() if k != "N"}
    ranked = sorted(chords.items(), key=lambda kv: -kv[1])
    return {"segments": len(segments), "changes": max(0, len(segments) - 1),
            "distinct": len(chords),
            "changes_per_minute": (len(segments) - 1) * 60.0 / duration
            if duration > 0 and segments else 0.0,
            "most_held": [{"label": k, "seconds": v, "share": v / duration if duration else 0.0}
                          for k, v in ranked[:5]],
            "no_chord_share": held.get("N", 0.0) / duration if duration else 0.0}


def tonal_report(mono: np.ndarray, rate: int, what: tuple[str, ...]) -> dict:
    """Key (with confidence, the next candidates and the tuning) and/or chords from one
    chroma analysis of the mono mix."""
    cfg = ChromaConfig(rate=rate, channels=1)
    frames = chroma_offline(mono[:, None], cfg)
    duration = mono.shape[0] / rate
    out: dict = {}
    if "key" in what:
        k = estimate_key(frames.chroma)
        order = np.argsort(-k.correlations)
        tuning = float(np.median(frames.tuning)) if frames.tuning.size else 0.0
        out["key"] = {"key": k.key, "confidence": k.confidence,
                      "candidates": [{"key": KEY_LABELS[i], "correlation": float(k.correlations[i])}
                                     for i in order[:3]] if k.key else [],
                      "tuning_cents": tuning}
    if "chords" in what:
        params = ChordParams()
        path = decode_offline(frames, params)
        segs = states_to_segments(path, params.vocabulary(), frames.times, frames.hop_seconds,
                                  duration)
        out["chords"] = {"segments": [[float(s), float(e), lab] for s, e, lab in segs],
                         "summary": chord_summary(segs, duration)}
    return out


def mono_mix(a: np.ndarray) -> np.ndarray:
    """Mean of the channels, contiguous, in the audio's dtype (summed in float64, by chunks)."""
    if a.shape[1] == 1:
        return np.ascontiguousarray(a[:, 0])
    out = np.empty(a.shape[0], dtype=a.dtype)
    for s in range(0, a.shape[0], CHUNK):
        out[s:s + CHUNK] = a[s:s + CHUNK].mean(axis=1, dtype=np.float64)
    return out


def analyze_audio(audio: np.ndarray, rate: int, *, what: Iterable[str] = ANALYSES,
                  track_rate: float = TRACK_RATE) -> dict:
    """The analysis report of float audio [frames, channels] at `rate` (JSON-ready dict).

    Keys: "input" (rate, channels, frames, duration_s, layout) and one per analysis asked
    for: "loudness" (LoudnessResult.to_dict()), "pitch", "key", "chords". Raises
    AudioInputError for an unsupported rate or layout, non-finite samples or an empty array.
    """
    names = parse_what(what)
    a = check_audio(audio, rate, names)
    frames, channels = a.shape
    report: dict = {"input": {"rate": int(rate), "channels": channels, "frames": frames,
                              "duration_s": frames / rate,
                              "layout": LAYOUT_NAMES.get(channels, f"{channels} channels")}}
    if "loudness" in names:
        report["loudness"] = measure(a, rate).to_dict()
    if not {"pitch", "key", "chords"} & set(names):
        return report
    mono = mono_mix(a)
    if "pitch" in names:
        report["pitch"] = pitch_summary(mono, rate, track_rate)
    if {"key", "chords"} & set(names):
        report.update(tonal_report(mono, rate, names))
    return report


# ----------------------------------------------------------------------------- normalising

@dataclass(frozen=True)
class NormalizeResult:
    """What normalisation did and what the output measures (levels in LUFS / dBTP)."""

    target_lufs: float
    ceiling_dbtp: float
    input_lufs: float | None  # None: silent (below the -70 LUFS gate)
    input_true_peak_dbtp: float | None
    planned_gain_db: float  # target - input (clamped to max_gain_db if given)
    drive_db: float  # gain applied before the limiter (>= planned gain when limiting)
    limiter: bool
    limiter_max_reduction_db: float  # deepest gain reduction of the limiter
    limiter_time_share: float  # share of the output the limiter reduced by > 0.1 dB
    limiter_latency_frames: int  # removed from the output
    passes: int
    output_lufs: float | None
    output_true_peak_dbtp: float | None
    loudness_ok: bool  # within LOUDNESS_TOLERANCE_LU of the target
    true_peak_ok: bool  # at most ceiling + TRUE_PEAK_TOLERANCE_DB
    limiter_hard: bool  # the target was out of reach without crushing the programme
    gain_clamped: bool
    note: str

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return asdict(self)


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def check_ceiling(ceiling_dbtp: float) -> None:
    """Raise AudioInputError unless the limiter and the gain plan both take the ceiling."""
    lo, hi = CEILING_RANGE_DBTP
    if not lo <= ceiling_dbtp <= hi:
        raise AudioInputError(f"true-peak ceiling {ceiling_dbtp:g} dBTP: allowed {lo:g} to "
                              f"{hi:g} dBTP")


def apply_gain(audio: np.ndarray, gain_db: float) -> np.ndarray:
    """audio x 10^(gain_db / 20) in the audio's dtype (multiplied in float64, by chunks)."""
    g = 10.0 ** (gain_db / 20.0)
    out = np.empty_like(audio)
    for s in range(0, audio.shape[0], CHUNK):
        out[s:s + CHUNK] = audio[s:s + CHUNK] * g if audio.dtype == np.float64 else \
            audio[s:s + CHUNK].astype(np.float64) * g
    return out


def limit(audio: np.ndarray, rate: int, drive_db: float, ceiling_dbtp: float
          ) -> tuple[np.ndarray, float, float, int]:
    """audio driven by drive_db through the true-peak Limiter, the limiter's latency removed
    (same length, aligned). Returns (output, deepest reduction dB, share of frames reduced by
    more than 0.1 dB, latency in frames)."""
    frames, channels = audio.shape
    lim = Limiter(rate, channels, ceiling_db=ceiling_dbtp, attack_ms=LIMITER_ATTACK_MS,
                  release_ms=LIMITER_RELEASE_MS)
    lat = lim.latency
    lin = 10.0 ** (drive_db / 20.0)
    buf = np.zeros((CHUNK, channels))
    gain = np.zeros(CHUNK)
    out = np.empty_like(audio)
    g_min = 1.0
    reduced = 0
    g_thr = 10.0 ** (-0.1 / 20.0)
    total = frames + lat
    for start in range(0, total, CHUNK):
        n = min(CHUNK, total - start)
        real = max(0, min(n, frames - start))
        buf[:real] = audio[start:start + real]
        buf[real:n] = 0.0
        buf[:n] *= lin
        lim.process(buf[:n], out=buf[:n], gain=gain[:n])
        k0 = max(0, lat - start)  # outputs before the latency belong to no input frame
        if k0 >= n:
            continue
        dst = start + k0 - lat
        cnt = min(n - k0, frames - dst)
        out[dst:dst + cnt] = buf[k0:k0 + cnt]
        g = gain[k0:k0 + cnt]
        g_min = min(g_min, float(g.min()))
        reduced += int(np.count_nonzero(g < g_thr))
    return out, -20.0 * math.log10(g_min), reduced / frames, lat


def _limit_to_target(a: np.ndarray, rate: int, target_lufs: float, ceiling_dbtp: float,
                     drive_db: float, cap_db: float
                     ) -> tuple[np.ndarray, LoudnessResult, tuple, float, int]:
    """Limit with drive_db, then raise the drive (secant steps on the measured loudness, at
    most cap_db) until the output is within LOUDNESS_STEP_LU of the target. Returns the best
    pass: (output, its measurement, limit()'s figures with True first, drive, passes run)."""
    tried: list[tuple[float, float]] = []  # (drive, output loudness)
    best: tuple | None = None
    drive = drive_db
    while True:
        out, red, share, lat = limit(a, rate, drive, ceiling_dbtp)
        r = measure(out, rate)
        dev = target_lufs - r.integrated
        if best is None or abs(dev) < best[0]:
            best = (abs(dev), out, r, (True, red, share, lat), drive)
        tried.append((drive, r.integrated))
        if abs(dev) <= LOUDNESS_STEP_LU or len(tried) == MAX_PASSES:
            break
        slope = 1.0  # loudness per dB of drive: 1 without limiting, less the harder it works
        if len(tried) >= 2:
            (d0, l0), (d1, l1) = tried[-2], tried[-1]
            if d1 != d0:
                slope = min(1.0, max(0.05, (l1 - l0) / (d1 - d0)))
        nxt = min(cap_db, drive + dev / slope)
        if abs(nxt - drive) < 1e-3:
            break
        drive = nxt
    _, out, r, figures, drive = best
    return out, r, figures, drive, len(tried)


def normalize_audio(audio: np.ndarray, rate: int, target_lufs: float = -14.0,
                    ceiling_dbtp: float = -1.0, *, max_gain_db: float | None = None,
                    measured: LoudnessResult | None = None
                    ) -> tuple[np.ndarray, NormalizeResult]:
    """Bring audio [frames, channels] to `target_lufs` with its true peak at or below
    `ceiling_dbtp`: the mastering gain and, if the peaks need it, the true-peak limiter (its
    latency compensated). `measured`: the input's LoudnessResult if already known.
    Returns the output (same shape and dtype) and a NormalizeResult measured on it."""
    a = check_audio(audio, rate, ("loudness",))
    check_ceiling(ceiling_dbtp)
    m = measured or measure(a, rate)
    try:
        plan = mastering_gain(m, target_lufs, ceiling_dbtp, max_gain_db)
    except ValueError as exc:
        raise AudioInputError(str(exc)) from exc
    silent = not math.isfinite(m.integrated)
    if not plan.limiter_needed or silent:
        out = apply_gain(a, plan.gain_db) if not silent else a.copy()
        r = measure(out, rate)
        lim = (False, 0.0, 0.0, 0)
        drive, passes = plan.gain_db, 1
    else:
        cap = plan.gain_db + MAX_EXTRA_DRIVE_DB
        if max_gain_db is not None:
            cap = min(cap, max_gain_db)
        out, r, lim, drive, passes = _limit_to_target(a, rate, target_lufs, ceiling_dbtp,
                                                      plan.gain_db, cap)
    out_lufs = _finite_or_none(r.integrated)
    out_tp = _finite_or_none(r.true_peak_max_dbtp)
    loud_ok = silent or (out_lufs is not None
                         and abs(out_lufs - target_lufs) <= LOUDNESS_TOLERANCE_LU)
    tp_ok = out_tp is None or out_tp <= ceiling_dbtp + TRUE_PEAK_TOLERANCE_DB
    hard = lim[0] and not loud_ok and not plan.gain_limited
    notes = [plan.note]
    if lim[0]:
        notes.append(f"limiter: up to {lim[1]:.1f} dB of reduction, on {100 * lim[2]:.1f}% "
                     f"of the time, drive {drive:+.2f} dB in {passes} pass(es)")
    if hard:
        notes.append(f"the limiter had to work very hard: {out_lufs:.2f} LUFS reached, "
                     f"{target_lufs - out_lufs:.2f} LU short of the target (lower the target "
                     "or raise the ceiling)")
    return out, NormalizeResult(
        target_lufs=float(target_lufs), ceiling_dbtp=float(ceiling_dbtp),
        input_lufs=_finite_or_none(m.integrated),
        input_true_peak_dbtp=_finite_or_none(m.true_peak_max_dbtp),
        planned_gain_db=float(plan.gain_db), drive_db=float(drive), limiter=lim[0],
        limiter_max_reduction_db=float(lim[1]), limiter_time_share=float(lim[2]),
        limiter_latency_frames=int(lim[3]), passes=passes, output_lufs=out_lufs,
        output_true_peak_dbtp=out_tp, loudness_ok=bool(loud_ok), true_peak_ok=bool(tp_ok),
        limiter_hard=bool(hard), gain_clamped=bool(plan.gain_limited), note="; ".join(notes))

