"""basic-pitch's own predict(), run in its OWN environment, as the reference for our port.

The reference environment (no tensorflow: basic-pitch 0.4.0 requires it on Python 3.11, but its
TFLite path only needs an Interpreter; LiteRT is aliased as `tflite_runtime`):

    python3 -m venv build/bp-ref-venv
    build/bp-ref-venv/bin/pip install --no-deps basic-pitch==0.4.0
    build/bp-ref-venv/bin/pip install ai-edge-litert librosa 'mir_eval>=0.6' pretty_midi \
        'resampy<0.4.3,>=0.2.2' scikit-learn scipy typing-extensions soundfile

(`python bench/reference/basic_pitch_reference.py setup` runs exactly these, reusing
build/wheels/basic_pitch-0.4.0-py2.py3-none-any.whl when present.)

Modes:
    predict WAV... [--json OUT]   (inside the reference env) basic-pitch's predict() with its
                                   defaults on each file; prints/writes notes and timings.
    fixtures                      (in the project's venv) renders the evaluation clips of
                                   bench/evalset/transcription_set.py at 22050 Hz and at
                                   48 kHz (mono), runs `predict` in the reference env on them
                                   and writes tests/fixtures/basic_pitch/<clip>.json ("notes":
                                   22050 Hz clip, no resampling; "notes_48k": the 48 kHz clip,
                                   resampled by librosa inside predict()).
    setup                         creates the reference env (commands above).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REF_VENV = Path(os.environ.get("ECHOEL_BP_REF_VENV", ROOT / "build" / "bp-ref-venv"))
REF_PY = REF_VENV / "bin" / "python"
FIXTURES = ROOT / "tests" / "fixtures" / "basic_pitch"
CLIP_RATE = 22050
CLIP_SECONDS = 6.0
ENGINE_RATE = 48000  # a second rendering: what the box records (basic-pitch resamples it)
WAV_DIR = ROOT / "build" / "bp-fixture-wavs"
DEPS = ["ai-edge-litert", "librosa", "mir_eval>=0.6", "pretty_midi", "resampy<0.4.3,>=0.2.2",
        "scikit-learn", "scipy", "typing-extensions", "soundfile"]


def setup() -> Path:
    """Create the reference env when missing; returns its python."""
    if REF_PY.exists():
        r = subprocess.run([str(REF_PY), "-c", "import basic_pitch, ai_edge_litert, librosa"],
                           capture_output=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if r.returncode == 0:
            return REF_PY
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(REF_VENV)], check=True)
    pip = [str(REF_PY), "-m", "pip", "install", "-q"]
    wheel = ROOT / "build" / "wheels" / "basic_pitch-0.4.0-py2.py3-none-any.whl"
    subprocess.run([*pip, "--no-deps", str(wheel) if wheel.exists() else "basic-pitch==0.4.0"],
                   check=True)
    subprocess.run([*pip, *DEPS], check=True)
    return REF_PY


def _import_basic_pitch():
    """basic_pitch with LiteRT standing in for tflite_runtime (no tensorflow)."""
    import logging

    import ai_edge_litert.interpreter as litert

    pkg = types.ModuleType("tflite_runtime")
    pkg.interpreter = litert
    sys.modules["tflite_runtime"] = pkg
    sys.modules["tflite_runtime.interpreter"] = litert
    logging.disable(logging.WARNING)  # basic-pitch warns about each missing backend
    import basic_pitch
    from basic_pitch import inference

    logging.disable(logging.NOTSET)
    return basic_pitch, inference


def predict_files(paths: list[str]) -> dict:
    """basic-pitch's predict() with its defaults on each file (model loaded once)."""
    import contextlib
    import io

    import numpy as np

    basic_pitch, inference = _import_basic_pitch()
    from importlib.metadata import version

    model_path = basic_pitch.build_icassp_2022_model_path(basic_pitch.FilenameSuffix.tflite)
    t0 = time.perf_counter()
    model = inference.Model(model_path)
    load_s = time.perf_counter() - t0
    out = {"basic_pitch": version("basic-pitch"), "litert": version("ai-edge-litert"),
           "librosa": version("librosa"), "numpy": np.__version__,
           "model_sha256": hashlib.sha256(Path(model_path).read_bytes()).hexdigest(),
           "model_load_s": load_s, "files": {}}
    for p in paths:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            _, _, events = inference.predict(p, model)
        dt = time.perf_counter() - t0
        notes = [[float(s), float(e), int(pitch), float(a),
                  [int(b) for b in bends] if bends is not None else None]
                 for s, e, pitch, a, bends in events]
        notes.sort(key=lambda n: (n[0], n[2]))
        out["files"][p] = {"predict_s": dt, "notes": notes}
    return out


def run_reference(paths: list[str], timeout: float = 900) -> dict:
    """`predict` in the reference env (subprocess); the parsed result."""
    py = setup()
    r = subprocess.run([str(py), str(Path(__file__).resolve()), "predict", *paths],
                       capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3"))
    if r.returncode != 0:
        raise RuntimeError(f"basic-pitch reference failed ({r.returncode}): {r.stderr[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def clip_audio(name: str, rate: int = CLIP_RATE):
    """The fixture clip `name` as mono float32 (rendered at `rate`, cached)."""
    sys.path.insert(0, str(ROOT))
    from bench.evalset import transcription_set
    from bench.evalset.render import render

    stereo = render(transcription_set.piece(name, CLIP_SECONDS), rate=rate)
    return stereo.mean(axis=1).astype("float32")


def audio_sha256(mono) -> str:
    """sha256 of the float32 samples (what the fixture was made from)."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(mono, dtype=np.float32).tobytes()).hexdigest()


def make_fixtures() -> list[Path]:
    """Render the clips, run basic-pitch's predict() on them, write the fixture JSON files."""
    import soundfile as sf

    sys.path.insert(0, str(ROOT))
    from bench.evalset import transcription_set

    WAV_DIR.mkdir(parents=True, exist_ok=True)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    wavs = {}
    for name in transcription_set.PIECES:
        for rate in (CLIP_RATE, ENGINE_RATE):
            mono = clip_audio(name, rate)
            p = WAV_DIR / f"{name}-{rate}.wav"
            sf.write(p, mono, rate, subtype="FLOAT")
            wavs[name, rate] = (str(p), audio_sha256(mono), len(mono))
    ref = run_reference([w[0] for w in wavs.values()])
    written = []
    for name in transcription_set.PIECES:
        path, sha, n = wavs[name, CLIP_RATE]
        path48, sha48, _ = wavs[name, ENGINE_RATE]
        doc = {
            "clip": name,
            "generator": f"bench.evalset.transcription_set.piece({name!r}, {CLIP_SECONDS})",
            "audio": f"bench.evalset.render.render(pm, rate={CLIP_RATE}) averaged to mono, "
                     f"float32, written as a FLOAT WAV",
            "audio_sha256": sha, "audio_samples": n, "sample_rate": CLIP_RATE,
            "command": "python bench/reference/basic_pitch_reference.py fixtures",
            "reference": {k: v for k, v in ref.items() if k not in ("files", "model_load_s")},
            "predict_defaults": {"onset_threshold": 0.5, "frame_threshold": 0.3,
                                 "minimum_note_length_ms": 127.70, "melodia_trick": True,
                                 "multiple_pitch_bends": False},
            "note_fields": ["start_s", "end_s", "pitch_midi", "amplitude", "pitch_bends"],
            "audio_48k_sha256": sha48,
            "notes_48k": ref["files"][path48]["notes"],
            "notes": ref["files"][path]["notes"],
        }
        out = FIXTURES / f"{name}.json"
        lists = {k: doc.pop(k) for k in ("notes_48k", "notes")}
        text = json.dumps(doc, indent=1)[:-2]  # one note per line keeps the file readable
        for key, notes in lists.items():
            body = ",\n".join("  " + json.dumps(n) for n in notes)
            text += f',\n "{key}": [\n{body}\n ]'
        out.write_text(text + "\n}\n")
        json.loads(out.read_text())
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("predict")
    p.add_argument("wav", nargs="+")
    p.add_argument("--json", help="write here instead of stdout")
    sub.add_parser("fixtures")
    sub.add_parser("setup")
    args = ap.parse_args(argv)
    if args.mode == "predict":
        res = predict_files(args.wav)
        if args.json:
            Path(args.json).write_text(json.dumps(res))
        else:
            print(json.dumps(res))
    elif args.mode == "setup":
        print(setup())
    else:
        for f in make_fixtures():
            print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
