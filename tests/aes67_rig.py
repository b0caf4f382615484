"""Helpers of the AES67 tests and benchmark: 24-bit codes of WAV files and tones, alignment.

`match` finds where a received recording starts in what was sent and counts the frames that
differ after that point: a lost, repeated or reordered packet shifts or breaks the rest.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from echoel.daemon.aes67_sources import tone_block


def codes(x: np.ndarray) -> np.ndarray:
    """24-bit integer codes of float samples (as our encoder rounds them)."""
    return np.floor(np.asarray(x, np.float64) * 8388608.0 + 0.5).astype(np.int64)


def wav_codes(path: str | Path) -> tuple[int, np.ndarray]:
    """(rate, int64[frames, ch] 24-bit codes) of a 16/24/32-bit WAV (extensible ones too)."""
    import scipy.io.wavfile as wf
    rate, x = wf.read(str(path))
    if x.ndim == 1:
        x = x[:, None]
    if x.dtype == np.int32:  # scipy left-justifies 24-bit samples in int32
        return rate, x.astype(np.int64) >> 8
    if x.dtype == np.int16:
        return rate, x.astype(np.int64) << 8
    return rate, codes(x)


def tone_codes(frames: int, channels: int, rate: int = 48000,
               freqs: tuple[float, ...] = (1000.0, 440.0), level: float = 0.5) -> np.ndarray:
    """Codes of our test tone (starting at sample 0, one second's cycle plus frames)."""
    return codes(tone_block(0, frames, channels, rate, freqs, level))


def match(rx: np.ndarray, ref: np.ndarray, probe: int = 1200) -> tuple[int, int, int]:
    """(offset in ref where rx's first non-silent frame is, frames compared, frames differing).

    Raises AssertionError when rx has no audio or its start is nowhere in ref."""
    nz = np.flatnonzero(np.any(rx != 0, axis=1))
    assert len(nz), "the recording is silent"
    a = int(nz[0])
    head = rx[a:a + probe]
    cand = np.flatnonzero(np.all(ref == head[0], axis=1))
    for k in cand:
        k = int(k)
        if k + len(head) <= len(ref) and np.array_equal(ref[k:k + len(head)], head):
            n = min(len(rx) - a, len(ref) - k)
            bad = int(np.count_nonzero(np.any(rx[a:a + n] != ref[k:k + n], axis=1)))
            return k, n, bad
    raise AssertionError(f"the recording's first {len(head)} frames (from frame {a}) appear "
                         "nowhere in what was sent")


def trim_silent_tail(x: np.ndarray) -> np.ndarray:
    """x without the silence after its last non-silent frame."""
    nz = np.flatnonzero(np.any(x != 0, axis=1))
    return x[:nz[-1] + 1] if len(nz) else x[:0]


def have(*programs: str) -> str | None:
    """Why a test cannot run (a program is missing), or None."""
    for p in programs:
        if not shutil.which(p):
            pkg = {"gst-launch-1.0": "gstreamer1.0-tools"}.get(p, p)
            return f"{p} is not installed (apt-get install {pkg})"
    if "gst-launch-1.0" in programs:
        r = subprocess.run(["gst-inspect-1.0", "rtpL24pay"], capture_output=True, timeout=30)
        if r.returncode != 0:
            return "GStreamer's rtpL24pay is missing (apt-get install gstreamer1.0-plugins-good)"
    return None
