"""basic-pitch's windowing and stitching (as its predict() does it), pure numpy, no I/O.

basic-pitch (Spotify, Apache-2.0) runs its model on 2 s windows of 22050 Hz mono audio:
43844 samples in, 172 frames out (hop 256 samples, ~86 frames/s). predict() prepends 3840
zeros (half of a 30-frame overlap), steps the windows by 43844 - 7680 = 36164 samples, pads the
last window with zeros, drops 15 frames at each end of every window's output, concatenates,
and trims to floor(n_samples * 86 / 22050) frames. Its frame times (`frame_times`) carry a
per-172-frame correction; both are reproduced exactly here so notes match its own output.

The model call is a callable (`infer`), so this module stays pure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 22050
FFT_HOP = 256
WINDOW_SAMPLES = SAMPLE_RATE * 2 - FFT_HOP  # 43844
WINDOW_FRAMES = 172
ANNOTATIONS_FPS = SAMPLE_RATE // FFT_HOP  # 86 (basic-pitch's integer frame rate)
OVERLAP_FRAMES = 30
EDGE_FRAMES = OVERLAP_FRAMES // 2  # 15 frames dropped at each end of a window
OVERLAP_SAMPLES = OVERLAP_FRAMES * FFT_HOP  # 7680
HOP_SAMPLES = WINDOW_SAMPLES - OVERLAP_SAMPLES  # 36164
KEPT_FRAMES = WINDOW_FRAMES - 2 * EDGE_FRAMES  # 142
N_PITCHES = 88
N_CONTOUR_BINS = 264
MIDI_OFFSET = 21
OUTPUTS = {"note": N_PITCHES, "onset": N_PITCHES, "contour": N_CONTOUR_BINS}

Infer = Callable[[np.ndarray], Mapping[str, np.ndarray]]


@dataclass
class ModelFrames:
    """Stitched model output over a whole clip: float32 [frames, bins] each."""

    note: np.ndarray
    onset: np.ndarray
    contour: np.ndarray

    @property
    def n_frames(self) -> int:
        """Number of frames."""
        return int(self.note.shape[0])


def n_output_frames(n_samples: int) -> int:
    """Frames basic-pitch keeps for a clip of n_samples at 22050 Hz."""
    return int(np.floor(n_samples * (ANNOTATIONS_FPS / SAMPLE_RATE)))


def n_windows(n_samples: int) -> int:
    """Windows predict() runs over a clip of n_samples at 22050 Hz."""
    padded = n_samples + OVERLAP_SAMPLES // 2
    return len(range(0, padded, HOP_SAMPLES))


def fill_window(audio: np.ndarray, k: int, out: np.ndarray) -> None:
    """Write window k of `audio` (1-D float32 at 22050 Hz) into out[1, 43844, 1] (zeros where
    the window runs past either end), as predict() builds it."""
    if out.shape != (1, WINDOW_SAMPLES, 1):
        raise ValueError(f"window buffer is {out.shape}; must be (1, {WINDOW_SAMPLES}, 1)")
    start = k * HOP_SAMPLES - OVERLAP_SAMPLES // 2  # in the clip's samples
    dst = out[0, :, 0]
    dst[:] = 0.0
    a = max(start, 0)
    b = min(start + WINDOW_SAMPLES, audio.shape[0])
    if b > a:
        dst[a - start:b - start] = audio[a:b]


def frame_times(n_frames: int) -> np.ndarray:
    """Seconds of each output frame, basic-pitch's model_frames_to_time (with its correction
    of 0.0018 s plus the window-length rounding every 172 frames)."""
    frames = np.arange(n_frames)
    original = (frames * FFT_HOP).astype(int) / float(SAMPLE_RATE)
    window_numbers = np.floor(frames / WINDOW_FRAMES)
    window_offset = (FFT_HOP / SAMPLE_RATE) * (
        WINDOW_FRAMES - (WINDOW_SAMPLES / FFT_HOP)) + 0.0018
    return original - (window_offset * window_numbers)


def check_audio(audio: np.ndarray, rate: int) -> np.ndarray:
    """Audio as 1-D float32 at 22050 Hz, or ValueError naming what is wrong."""
    if rate != SAMPLE_RATE:
        raise ValueError(f"audio is at {rate} Hz; the model takes {SAMPLE_RATE} Hz "
                         f"(resample first: streaming_transcriber.resample)")
    a = np.asarray(audio)
    if a.ndim == 2 and a.shape[1] in (1, 2):
        a = a.mean(axis=1)
    if a.ndim != 1:
        raise ValueError(f"audio has shape {a.shape}; expected [samples] or [samples, 1|2]")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"audio dtype is {a.dtype}; expected float samples in [-1, 1]")
    return np.ascontiguousarray(a, dtype=np.float32)


def predict_frames(audio: np.ndarray, infer: Infer, rate: int = SAMPLE_RATE) -> ModelFrames:
    """Run the model over a whole clip and stitch its outputs exactly as basic-pitch does.

    audio: mono (or [n, 1|2], averaged) float samples at 22050 Hz; infer: maps a float32
    [1, 43844, 1] window to {"note", "onset", "contour"} arrays of [1, 172, bins].
    Non-finite samples are replaced by 0 (they would poison every frame of the window).
    """
    a = check_audio(audio, rate)
    if not np.all(np.isfinite(a)):
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    n = a.shape[0]
    total = n_output_frames(n)
    nw = n_windows(n)
    out = {k: np.zeros((nw * KEPT_FRAMES, b), np.float32)
           for k, b in OUTPUTS.items()}
    win = np.zeros((1, WINDOW_SAMPLES, 1), np.float32)
    for k in range(nw):
        fill_window(a, k, win)
        res = infer(win)
        for name, bins in OUTPUTS.items():
            y = np.asarray(res[name])
            if y.shape != (1, WINDOW_FRAMES, bins):
                raise ValueError(f"model output '{name}' is {list(y.shape)}; expected "
                                 f"[1, {WINDOW_FRAMES}, {bins}]")
            out[name][k * KEPT_FRAMES:(k + 1) * KEPT_FRAMES] = \
                y[0, EDGE_FRAMES:WINDOW_FRAMES - EDGE_FRAMES]
    return ModelFrames(**{k: v[:total] for k, v in out.items()})
