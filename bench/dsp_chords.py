"""Benchmark: chroma cost, chord recognition and key accuracy, beside references in the same run.

Rows (see run()):
- chroma per-block cost at 48 kHz stereo, 128-frame blocks (p50/p99 us; the frame-producing
  blocks are the p99), for the chroma alone and for chroma + chords + key;
- offline real-time factor over 10 minutes of stereo (quick: 30 s), ours beside librosa
  chroma_cqt and chroma_stft on the same audio (same 21.3 ms frame rate);
- chord WCSR (mir_eval: root, majmin, sevenths), ours beside the baseline (librosa chroma_cqt +
  binary maj/min/7/maj7/min7 templates + N by level + librosa Viterbi with a self-loop
  prior), on the rendered set (bench.evalset.chord_set) per kind and together;
- streaming (1.5 s lag) vs offline agreement;
- key: mean MIREX weighted score (mir_eval.key) on the songs (drawn key) and chorales
  (music21's analysed key), ours beside librosa chroma_cqt with the same profiles.

`python bench/dsp_chords.py [--quick]` prints the rows as a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import librosa
import mir_eval
from echoel.dsp.chord_recognition import (
    ChordParams,
    ChordRecognizer,
    Segment,
    decode_offline,
    recognize_stream,
    states_to_segments,
)
from echoel.dsp.chord_vocabulary import SEVENTHS, vocabulary
from echoel.dsp.chroma import ChromaConfig, ChromaState, chroma_offline
from echoel.dsp.key_estimate import KeyTracker, estimate_key

from bench.evalset.chord_set import ChordPiece, bench_set

RATE = 48000
BLOCK = 128
METRICS = ("root", "majmin", "sevenths")
GOALS = {"majmin": 0.90, "sevenths": 0.80}


# ----------------------------------------------------------------------------- scoring

def segment_arrays(segments: Sequence[Segment]) -> tuple[np.ndarray, list[str]]:
    """mir_eval intervals and labels of (start, end, label) segments."""
    iv = np.array([[s, e] for s, e, _ in segments], dtype=np.float64).reshape(-1, 2)
    return iv, [lab for _, _, lab in segments]


def chord_weights(piece: ChordPiece, segments: Sequence[Segment]
                  ) -> dict[str, tuple[float, float]]:
    """Per metric: (seconds scored correct, seconds scored) of one piece (mir_eval rules:
    reference X and out-of-rule qualities are not scored)."""
    est_iv, est_lab = segment_arrays(segments)
    ref_iv = piece.intervals
    est_iv, est_lab = mir_eval.util.adjust_intervals(est_iv, est_lab, ref_iv.min(), ref_iv.max(),
                                                     mir_eval.chord.NO_CHORD,
                                                     mir_eval.chord.NO_CHORD)
    iv, ref, est = mir_eval.util.merge_labeled_intervals(ref_iv, piece.labels, est_iv, est_lab)
    dur = mir_eval.util.intervals_to_durations(iv)
    out = {}
    for m in METRICS:
        c = np.asarray(getattr(mir_eval.chord, m)(ref, est), dtype=np.float64)
        w = dur * (c >= 0)
        out[m] = (float((w * np.clip(c, 0, 1)).sum()), float(w.sum()))
    return out


def wcsr(pieces: Sequence[ChordPiece], segments: Sequence[Sequence[Segment]]
         ) -> dict[str, float]:
    """Weighted chord symbol recall per metric over pieces (weighted by scored duration)."""
    tot = {m: [0.0, 0.0] for m in METRICS}
    for p, segs in zip(pieces, segments, strict=True):
        for m, (a, b) in chord_weights(p, segs).items():
            tot[m][0] += a
            tot[m][1] += b
    return {m: (a / b if b > 0 else float("nan")) for m, (a, b) in tot.items()}


def frame_agreement(a: Sequence[Segment], b: Sequence[Segment], step: float = 0.01) -> float:
    """Share of time (sampled every `step` s) where two segmentations give the same label."""
    end = min(a[-1][1], b[-1][1])
    t = np.arange(0.0, end, step)

    def sample(segs: Sequence[Segment]) -> np.ndarray:
        starts = np.array([s for s, _, _ in segs])
        labels = np.array([lab for _, _, lab in segs])
        return labels[np.clip(np.searchsorted(starts, t, side="right") - 1, 0, None)]

    return float(np.mean(sample(a) == sample(b)))


# ----------------------------------------------------------------------------- baseline

def baseline_chroma(audio: np.ndarray, rate: int, sr: int = 22050, hop: int = 2048
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """librosa chroma_cqt (tuning estimated by librosa) and RMS of the mono mix resampled to
    `sr`: (chroma [12, frames], rms [frames], hop seconds)."""
    y = librosa.resample(np.asarray(audio, dtype=np.float32).mean(axis=1), orig_sr=rate,
                         target_sr=sr)
    chroma = librosa.feature.chroma_cqt(y=y, sr=sr, hop_length=hop)
    rms = librosa.feature.rms(y=y, frame_length=2 * hop, hop_length=hop)[0]
    n = min(chroma.shape[1], rms.shape[0])
    return chroma[:, :n], rms[:n], hop / sr


def baseline_chords(audio: np.ndarray, rate: int, stay: float = 0.9, beta: float = 8.0,
                    features: tuple[np.ndarray, np.ndarray, float] | None = None
                    ) -> list[Segment]:
    """Plain reference: librosa chroma_cqt, cosine similarity to binary maj/min/7/maj7/min7
    templates, N when the RMS is below -60 dBFS, softmax(beta x similarity) as state
    probabilities, librosa.sequence.viterbi_discriminative with transition_loop(stay)."""
    chroma, rms, hop_s = features or baseline_chroma(audio, rate)
    voc = vocabulary(SEVENTHS, seventh_weight=1.0, inversions=False)
    tmpl = voc.templates[:-1]
    norm = np.maximum(np.linalg.norm(chroma, axis=0, keepdims=True), 1e-9)
    sim = tmpl @ (chroma / norm)
    n = sim.shape[1]
    scores = np.vstack([sim, np.where(rms < 1e-3, 1.0, 0.0)[None, :]])
    prob = np.exp(beta * (scores - scores.max(axis=0, keepdims=True)))
    prob /= prob.sum(axis=0, keepdims=True)
    path = librosa.sequence.viterbi_discriminative(
        prob, librosa.sequence.transition_loop(scores.shape[0], stay))
    labels = [*voc.labels[:-1], "N"]
    end = audio.shape[0] / rate
    out: list[Segment] = []
    for f, s in enumerate(path):
        a = 0.0 if f == 0 else f * hop_s - hop_s / 2
        b = end if f == n - 1 else min(end, f * hop_s + hop_s / 2)
        if b <= a:
            continue
        lab = labels[s]
        if out and out[-1][2] == lab:
            out[-1] = (out[-1][0], b, lab)
        else:
            out.append((out[-1][1] if out else a, b, lab))
    return out


# ----------------------------------------------------------------------------- timing

def _row(group: str, kernel: str, case: str, metric: str, ours: float, reference: str = "",
         ref: float | None = None, unit: str = "", goal: str = "", met: bool | None = None
         ) -> dict:
    return {"group": group, "kernel": kernel, "case": case, "metric": metric,
            "ours": float(ours), "reference": reference,
            "ref": None if ref is None else float(ref), "unit": unit, "goal": goal, "met": met}


def test_audio(pieces: Sequence[ChordPiece], seconds: float) -> np.ndarray:
    """`seconds` of stereo float32 audio: the set's pieces one after the other, repeated."""
    cat = np.concatenate([p.audio for p in pieces])
    reps = int(np.ceil(seconds * RATE / cat.shape[0]))
    return np.ascontiguousarray(np.tile(cat, (reps, 1))[: int(seconds * RATE)])


def block_costs(process: Callable[[np.ndarray], object], audio: np.ndarray) -> np.ndarray:
    """Microseconds per call of process(block) over `audio` in BLOCK-frame blocks."""
    n = audio.shape[0] // BLOCK
    blocks = [np.ascontiguousarray(audio[i * BLOCK:(i + 1) * BLOCK]) for i in range(n)]
    out = np.empty(n)
    clock = time.perf_counter_ns
    for i, b in enumerate(blocks):
        t0 = clock()
        process(b)
        out[i] = (clock() - t0) / 1000.0
    return out


def timing_rows(audio_block: np.ndarray, audio_offline: np.ndarray) -> list[dict]:
    """Per-block cost and offline real-time factors."""
    rows: list[dict] = []
    period_us = BLOCK / RATE * 1e6
    cfg = ChromaConfig(rate=RATE, channels=2)
    warm = np.zeros((BLOCK, 2), dtype=np.float32)
    st = ChromaState(cfg, max_frames=BLOCK)
    for _ in range(64):
        st.process(warm)
    us = block_costs(st.process, audio_block)
    rec = ChordRecognizer(cfg, max_frames=BLOCK)
    key = KeyTracker(cfg.hop_seconds)

    def full(b: np.ndarray) -> None:
        rec.process(b)
        key.push(rec.chroma.chroma, rec.new_frames)

    for _ in range(64):
        full(warm)
    us_full = block_costs(full, audio_block)
    case = f"48 kHz stereo, {BLOCK}-frame blocks, {audio_block.shape[0] / RATE:.0f} s"
    for name, v in (("chroma", us), ("chroma+chords+key", us_full)):
        p50, p99 = np.percentile(v, 50), np.percentile(v, 99)
        rows.append(_row("chords", name, case, "us/block p50", p50, unit="us"))
        rows.append(_row("chords", name, case, "us/block p99", p99, unit="us",
                         goal=f"p99 < 10% of the block period ({period_us / 10:.0f} us)",
                         met=bool(p99 < period_us / 10)))
    secs = audio_offline.shape[0] / RATE
    label = f"rtf offline {secs / 60:.1f} min stereo" if secs >= 60 else \
        f"rtf offline {secs:.0f} s stereo"
    chroma_offline(audio_offline[:RATE], cfg)  # load the compiled kernels first
    librosa.feature.chroma_cqt(y=audio_offline[:RATE].mean(axis=1), sr=RATE,
                               hop_length=cfg.hop_input)
    t0 = time.perf_counter()
    chroma_offline(audio_offline, cfg)
    ours = (time.perf_counter() - t0) / secs
    mono = audio_offline.mean(axis=1)
    hop = cfg.hop_input
    t0 = time.perf_counter()
    librosa.feature.chroma_cqt(y=mono, sr=RATE, hop_length=hop)
    cqt = (time.perf_counter() - t0) / secs
    t0 = time.perf_counter()
    librosa.feature.chroma_stft(y=mono, sr=RATE, hop_length=hop, n_fft=4 * hop)
    stft = (time.perf_counter() - t0) / secs
    rows.append(_row("chords", "chroma", "offline, same audio and frame rate", label, ours,
                     "librosa chroma_cqt", cqt, "x real time", "faster than chroma_cqt",
                     bool(ours < cqt)))
    rows.append(_row("chords", "chroma", "offline, same audio and frame rate", label, ours,
                     "librosa chroma_stft", stft, "x real time", "", None))
    return rows


# ----------------------------------------------------------------------------- accuracy

def accuracy_rows(pieces: Sequence[ChordPiece], n_stream: int = 4) -> list[dict]:
    """Chord WCSR ours vs baseline per kind and together, streaming agreement, key scores."""
    rows: list[dict] = []
    ours: list[list[Segment]] = []
    ours_key: list[str] = []
    base: list[list[Segment]] = []
    base_key: list[str] = []
    for p in pieces:
        frames = chroma_offline(p.audio)
        ours.append(states_to_segments(decode_offline(frames), ChordParams().vocabulary(),
                                       frames.times, frames.hop_seconds, p.seconds))
        ours_key.append(estimate_key(frames.chroma).key)
        feats = baseline_chroma(p.audio, p.rate)
        base.append(baseline_chords(p.audio, p.rate, features=feats))
        base_key.append(estimate_key(feats[0].T).key)
    kinds = {"chorales": [i for i, p in enumerate(pieces) if p.kind == "chorale"],
             "songs": [i for i, p in enumerate(pieces) if p.kind == "pop"],
             "all": list(range(len(pieces)))}
    for kind, idx in kinds.items():
        if not idx:
            continue
        ps = [pieces[i] for i in idx]
        secs = sum(p.seconds for p in ps)
        w_ours = wcsr(ps, [ours[i] for i in idx])
        w_base = wcsr(ps, [base[i] for i in idx])
        for m in METRICS:
            met = bool(w_ours[m] > w_base[m])
            goal = "above the baseline"
            if kind == "songs" and m in GOALS:
                goal = f">= {GOALS[m]:.2f} and above the baseline"
                met = bool(w_ours[m] >= GOALS[m] and met)
            rows.append(_row("chords", "chord_recognition",
                             f"{kind}: {len(ps)} pieces, {secs / 60:.1f} min",
                             f"WCSR {m}", w_ours[m], "librosa chroma_cqt + templates + viterbi",
                             w_base[m], "", goal, met))
    idx = kinds["songs"][:n_stream]
    agree = [frame_agreement(recognize_stream(pieces[i].audio, RATE, BLOCK), ours[i])
             for i in idx]
    if agree:
        rows.append(_row("chords", "chord_recognition", f"{len(idx)} songs, 128-frame blocks, "
                         "1.5 s lag", "streaming = offline (time share)", float(np.mean(agree)),
                         goal=">= 0.95", met=bool(np.mean(agree) >= 0.95)))
    for kind, kname in (("pop", "songs (drawn key)"), ("chorale", "chorales (music21 key)")):
        idx = [i for i, p in enumerate(pieces) if p.kind == kind]
        if not idx:
            continue
        o = float(np.mean([mir_eval.key.weighted_score(pieces[i].key, ours_key[i])
                           for i in idx]))
        b = float(np.mean([mir_eval.key.weighted_score(pieces[i].key, base_key[i])
                           for i in idx]))
        rows.append(_row("key", "key_estimate", f"{kname}: {len(idx)} pieces",
                         "MIREX weighted key score", o, "librosa chroma_cqt + same profiles", b,
                         "", "not below the baseline", bool(o >= b)))
    return rows


def run(quick: bool = False) -> list[dict]:
    """All rows; quick: the small set (4 + 4 pieces) and 30 s timing audio."""
    pieces = bench_set(quick=quick)
    rows = accuracy_rows(pieces, n_stream=2 if quick else 4)
    audio_block = test_audio(pieces, 10.0 if quick else 60.0)
    audio_offline = test_audio(pieces, 30.0 if quick else 600.0)
    rows += timing_rows(audio_block, audio_offline)
    return rows


def main() -> None:
    """Command line: print the benchmark's rows."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small set, short timing audio")
    args = ap.parse_args()
    t0 = time.time()
    rows = run(quick=args.quick)
    from bench.bench_all import table

    print(table(rows))
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
