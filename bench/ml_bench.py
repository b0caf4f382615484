"""On-device transcription benchmark (group "ml"): basic-pitch's model on LiteRT, offline and
streaming, against basic-pitch's own predict() measured in the same run.

    python bench/ml_bench.py [--quick] [--json OUT]

Rows: inference time per window (p50/p99, 1 and 2 LiteRT threads); real-time factors (offline,
streaming) beside basic-pitch's predict() on the same files (its own environment, a subprocess:
bench/reference/basic_pitch_reference.py; full run only); memory (RSS growth for one
interpreter); onset-to-note-on latency (algorithmic, and measured through the service on a
real-time paced source); the service's CPU share at 48 kHz; note F1 (mir_eval, onset 50 ms,
with and without offsets) for offline, streaming and basic-pitch side by side; and a
hop/margin/confirm trade-off table (latency, CPU, F1). Audio: bench/evalset/transcription_set
rendered at 48 kHz by FluidSynth (cached under build/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import mir_eval  # noqa: E402
import soundfile as sf  # noqa: E402
from echoel.daemon.litert_runner import LiteRTRunner  # noqa: E402
from echoel.daemon.model_fetch import fetch_into_store  # noqa: E402
from echoel.daemon.transcriber_service import (  # noqa: E402
    ServiceConfig,
    TranscriberService,
    blocks_of,
    paced,
    transcribe_offline,
)
from echoel.dsp.basic_pitch_frames import WINDOW_SAMPLES  # noqa: E402
from echoel.dsp.streaming_transcriber import (  # noqa: E402
    StreamConfig,
    StreamingTranscriber,
    pair_notes,
)

from bench.evalset import transcription_set  # noqa: E402
from bench.evalset.render import render  # noqa: E402
from bench.reference import basic_pitch_reference as bp_ref  # noqa: E402

RATE = 48000
GROUP = "ml"
STORE = ROOT / "build" / "model-store"
FRAMES_PER_S = 22050 / 256


def _row(kernel: str, case: str, metric: str, ours: float | None, unit: str,
         reference: str = "", ref: float | None = None, goal: str = "",
         met: bool | None = None) -> dict:
    return {"group": GROUP, "kernel": kernel, "case": case, "metric": metric,
            "ours": None if ours is None else float(ours), "reference": reference,
            "ref": None if ref is None else float(ref), "unit": unit, "goal": goal, "met": met}


def _f1(gt, notes, offsets: bool) -> float:
    if not notes:
        return 0.0
    iv = np.array([[s, e] for s, e, _ in notes])
    hz = 440.0 * 2 ** ((np.array([p for _, _, p in notes]) - 69) / 12)
    return float(mir_eval.transcription.precision_recall_f1_overlap(
        gt[0], gt[1], iv, hz, onset_tolerance=0.05,
        offset_ratio=0.2 if offsets else None)[2])


def _stream_notes(audio, runner, cfg: StreamConfig):
    st = StreamingTranscriber(cfg)
    msgs = []
    for a in range(0, audio.shape[0], 4096):
        msgs += st.process(audio[a:a + 4096], runner.run)
    msgs += st.close(runner.run)
    return pair_notes(msgs, cfg.rate_in), st


def _clips(seconds: float) -> dict[str, tuple[np.ndarray, tuple]]:
    out = {}
    for name in transcription_set.PIECES:
        pm = transcription_set.piece(name, seconds)
        out[name] = (render(pm, rate=RATE), transcription_set.ground_truth(pm))
    return out


def bench_inference(model, rows: list[dict], n: int) -> dict[int, float]:
    """ms per window at 1 and 2 threads, on real audio windows."""
    audio = render(transcription_set.medley(30.0), rate=RATE)
    from echoel.dsp.streaming_transcriber import resample

    a22 = resample(audio, RATE)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, a22.shape[0] - WINDOW_SAMPLES, n)
    wins = [a22[s:s + WINDOW_SAMPLES].reshape(1, -1, 1).copy() for s in starts]
    p50s = {}
    for threads in (1, 2):
        r = LiteRTRunner(model.model_path, model.manifest, num_threads=threads)
        r.run(wins[0])
        t = []
        for w in wins:
            t0 = time.perf_counter()
            r.run(w)
            t.append((time.perf_counter() - t0) * 1e3)
        p50s[threads] = float(np.percentile(t, 50))
        for q in (50, 99):
            rows.append(_row("litert nmp.tflite", f"{threads} thread(s), {n} windows",
                             f"ms/window p{q}", np.percentile(t, q), "ms",
                             "1 thread p50" if threads == 2 else "",
                             p50s[1] if threads == 2 else None))
    rows.append(_row("litert nmp.tflite", "2 s window = 2 s of audio", "rtf per window (1 thr)",
                     p50s[1] / 1e3 / (WINDOW_SAMPLES / 22050), "x real time"))
    return p50s


MEMORY_PROBE = """
import sys, numpy as np
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
from echoel.daemon.litert_runner import LiteRTRunner
from echoel.daemon import model_manifest
z = rss()
import ai_edge_litert.interpreter
a = rss()
r = LiteRTRunner(sys.argv[1], model_manifest.load(sys.argv[2]), num_threads=1)
r.run(np.zeros((1, 43844, 1), np.float32))
b = rss()
print(z, a, b)
"""


def bench_memory(model, rows: list[dict]) -> None:
    """RSS of a fresh process before and after loading the model and running one window."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(model.model_path),
                        str(model.folder / "manifest.json")], capture_output=True, text=True,
                       timeout=120, check=True)
    base, lib, after = (int(v) for v in r.stdout.split())
    rows.append(_row("litert nmp.tflite", "fresh process: import ai_edge_litert", "RSS growth",
                     (lib - base) / 1024, "MiB", "RSS before (numpy, echoel)", base / 1024))
    rows.append(_row("litert nmp.tflite", "fresh process: load model + one window",
                     "RSS growth", (after - lib) / 1024, "MiB"))


def bench_accuracy(model, clips, rows: list[dict], full: bool, cfg: StreamConfig) -> dict:
    """F1 offline / streaming / basic-pitch; offline and streaming time; bp predict time."""
    r = LiteRTRunner(model.model_path, model.manifest, num_threads=1)
    f = {k: [] for k in ("off", "str", "bp", "off_o", "str_o", "bp_o")}
    t_off = t_str = 0.0
    dur = 0.0
    bp_notes = {}
    bp_time = None
    if full:
        with tempfile.TemporaryDirectory() as td:
            paths = {}
            for name, (audio, _) in clips.items():
                p = Path(td) / f"{name}.wav"
                sf.write(p, audio.mean(axis=1), RATE, subtype="FLOAT")
                paths[name] = str(p)
            res = bp_ref.run_reference(list(paths.values()))
        bp_notes = {n: [(s, e, p) for s, e, p, *_ in res["files"][paths[n]]["notes"]]
                    for n in clips}
        bp_time = sum(res["files"][p]["predict_s"] for p in paths.values())
    else:  # the committed fixtures: basic-pitch's predict() on these 6 s clips at 48 kHz
        for name in clips:
            fx = json.loads((bp_ref.FIXTURES / f"{name}.json").read_text())
            bp_notes[name] = [(s, e, p) for s, e, p, *_ in fx["notes_48k"]]
    for name, (audio, gt) in clips.items():
        dur += audio.shape[0] / RATE
        t0 = time.perf_counter()
        off = transcribe_offline(audio, RATE, r)
        t_off += time.perf_counter() - t0
        t0 = time.perf_counter()
        sn, _ = _stream_notes(audio, r, cfg)
        t_str += time.perf_counter() - t0
        on = [(n.start_s, n.end_s, n.pitch) for n in off]
        for key, notes in (("off", on), ("str", sn), ("bp", bp_notes[name])):
            f[key].append(_f1(gt, notes, False))
            f[key + "_o"].append(_f1(gt, notes, True))
    m = {k: float(np.mean(v)) for k, v in f.items()}
    n_clips = len(clips)
    case = f"{n_clips} clips, {dur:.0f} s, 48 kHz"
    src = "predict() in its own env" if full else "fixture (predict() on the same audio)"
    for suffix, label in (("", "note F1 onset 50 ms"), ("_o", "note F1 onset+offset")):
        rows.append(_row("offline (ours)", case, label, m["off" + suffix], "F1",
                         f"basic-pitch {src}", m["bp" + suffix]))
        ok = m["str" + suffix] >= m["off" + suffix] - 0.02
        rows.append(_row("streaming (ours)", case, label, m["str" + suffix], "F1",
                         "offline (ours)", m["off" + suffix],
                         "within 0.02 of offline" if not suffix else "", ok if not suffix
                         else None))
    rows.append(_row("offline (ours)", case, "rtf offline (1 thread)", t_off / dur, "x real time",
                     "basic-pitch predict()" if bp_time else "",
                     bp_time / dur if bp_time else None))
    rows.append(_row("streaming (ours)", case, "rtf streaming, unpaced (1 thread)", t_str / dur,
                     "x real time", "offline (ours)", t_off / dur))
    if bp_time:
        rows.append(_row("offline (ours)", case, "time per file", t_off / n_clips, "s",
                         "basic-pitch predict()", bp_time / n_clips))
    return m


def bench_service(model, rows: list[dict], seconds: float, cfg: StreamConfig,
                  infer_ms: float) -> None:
    """The service on a real-time paced source: measured latency and CPU share."""
    audio = render(transcription_set.medley(max(seconds, 10.0)), rate=RATE)[: int(seconds * RATE)]
    svc = TranscriberService(model.model_path, model.manifest,
                             ServiceConfig(stream=cfg, workers=1, threads=1))
    svc.keep_emitted = False
    stats = svc.run(paced(blocks_of(audio, 128), RATE))
    st = StreamingTranscriber(cfg)
    best, worst = st.algorithmic_latency_s()
    mean = (best + worst) / 2
    case = f"hop {cfg.hop_frames} margin {cfg.margin_frames} confirm {cfg.confirm_frames}"
    rows.append(_row("streaming latency", case, "algorithmic best/mean/worst (mean shown)",
                     mean * 1e3, "ms", "best", best * 1e3))
    rows.append(_row("streaming latency", case, "algorithmic worst", worst * 1e3, "ms"))
    rows.append(_row("streaming latency", case, "algorithmic mean + inference p50",
                     mean * 1e3 + infer_ms, "ms", "", None, "< 400 ms",
                     mean * 1e3 + infer_ms < 400))
    p50, p99 = stats["latency_ms_p50"], stats["latency_ms_p99"]
    rows.append(_row("service (paced 48 kHz, 128-frame blocks)", f"{case}, {seconds:.0f} s",
                     "onset -> note-on p50", p50, "ms", "algorithmic mean + inference p50",
                     mean * 1e3 + infer_ms, "< 400 ms", p50 is not None and p50 < 400))
    rows.append(_row("service (paced 48 kHz, 128-frame blocks)", f"{case}, {seconds:.0f} s",
                     "onset -> note-on p99", p99, "ms"))
    rows.append(_row("service (paced 48 kHz, 128-frame blocks)", f"{case}, {seconds:.0f} s",
                     "CPU share of one core", stats["cpu_share"] * 100, "%",
                     "estimate: windows/s x inference p50",
                     FRAMES_PER_S / cfg.hop_frames * infer_ms / 10, "< 25 %",
                     stats["cpu_share"] < 0.25))
    rows.append(_row("service (paced 48 kHz, 128-frame blocks)", f"{case}, {seconds:.0f} s",
                     "windows dropped", stats["dropped_windows"], "windows", "windows",
                     stats["windows"]))


def bench_tradeoff(model, clips, rows: list[dict], infer_ms: float,
                   configs: list[tuple[int, int, int | None]]) -> None:
    """Latency / CPU / F1 for several hop, margin, confirm settings (streaming, unpaced)."""
    r = LiteRTRunner(model.model_path, model.manifest, num_threads=1)
    for hop, margin, confirm in configs:
        cfg = StreamConfig(rate_in=RATE, hop_frames=hop, margin_frames=margin,
                           confirm_frames=confirm)
        f = []
        for audio, gt in clips.values():
            sn, _ = _stream_notes(audio, r, cfg)
            f.append(_f1(gt, sn, False))
        best, worst = StreamingTranscriber(cfg).algorithmic_latency_s()
        case = f"hop {hop} margin {margin} confirm {confirm or 11}"
        cpu = FRAMES_PER_S / hop * infer_ms / 10
        rows.append(_row("trade-off", case, "note F1 onset 50 ms", float(np.mean(f)), "F1"))
        rows.append(_row("trade-off", case, "latency mean + inference", (best + worst) / 2 * 1e3
                         + infer_ms, "ms"))
        rows.append(_row("trade-off", case, "CPU estimate (inference)", cpu, "% of a core"))


def run(quick: bool = False) -> list[dict]:
    """All rows; quick: 6 s clips, fixtures for basic-pitch, 8 s paced, no trade-off table."""
    rows: list[dict] = []
    model = fetch_into_store(STORE)
    cfg = StreamConfig(rate_in=RATE)
    p50 = bench_inference(model, rows, 8 if quick else 60)
    bench_memory(model, rows)
    clips = _clips(6.0 if quick else 12.0)
    bench_accuracy(model, clips, rows, not quick, cfg)
    bench_service(model, rows, 8.0 if quick else 30.0, cfg, p50[1])
    if not quick:
        bench_tradeoff(model, clips, rows, p50[1],
                       [(16, 4, 8), (24, 4, 8), (24, 8, None), (32, 4, 8), (24, 4, 4)])
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description="on-device transcription benchmark")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rows = run(args.quick)
    from bench.bench_all import table

    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
