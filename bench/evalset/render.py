"""Render MIDI to audio with FluidSynth and a General MIDI soundfont, cached on disk.

The audio is never committed: it is made from MIDI (pretty_midi objects) when a test or a
benchmark first asks for it, and kept under build/evalset-cache keyed by the MIDI's bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pretty_midi
import soundfile as sf

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")  # Debian: fluid-soundfont-gm
CACHE = Path(os.environ.get("ECHOEL_EVALSET_CACHE",
                            Path(__file__).resolve().parents[2] / "build" / "evalset-cache"))


class RenderError(RuntimeError):
    """FluidSynth or the soundfont is missing, or rendering failed."""


def midi_bytes(pm: pretty_midi.PrettyMIDI) -> bytes:
    """The Standard MIDI File bytes of a pretty_midi object."""
    buf = io.BytesIO()
    pm.write(buf)
    return buf.getvalue()


def render(pm: pretty_midi.PrettyMIDI, rate: int = 48000, gain: float = 0.5,
           soundfont: Path = SOUNDFONT) -> np.ndarray:
    """Audio of `pm` as float32 [frames, 2] at `rate`, rendered by the fluidsynth CLI (cached)."""
    data = midi_bytes(pm)
    key = hashlib.sha256(data + f"|{rate}|{gain}|{soundfont}".encode()).hexdigest()[:24]
    out = CACHE / f"{key}.wav"
    if not out.exists():
        exe = shutil.which("fluidsynth")
        if exe is None:
            raise RenderError("fluidsynth not found: install Debian's fluidsynth (make setup)")
        if not soundfont.exists():
            raise RenderError(f"soundfont {soundfont} not found: install fluid-soundfont-gm")
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as td:
            mid = Path(td) / "in.mid"
            mid.write_bytes(data)
            tmp = Path(td) / "out.wav"
            r = subprocess.run([exe, "-ni", "-g", str(gain), "-r", str(rate), "-F", str(tmp),
                                "-T", "wav", str(soundfont), str(mid)],
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0 or not tmp.exists():
                raise RenderError(f"fluidsynth failed ({r.returncode}): {r.stderr[-400:]}")
            os.replace(tmp, out)
    audio, sr = sf.read(out, dtype="float32", always_2d=True)
    if sr != rate:
        raise RenderError(f"{out}: rendered at {sr} Hz, asked for {rate} Hz")
    return audio
