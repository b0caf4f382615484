"""Where a sender's audio comes from: an engine tap ring (with drift correction) or a test tone.

A source fills `out` (float32[frames, channels]) with the next frames, in the sending thread,
without allocating. RingSource reads the engine's tap (daemon/spsc_ring.py blocks of
period x channels float32) through a small FIFO. The card's sample clock and the PTP media
clock disagree by some ppm: DriftTracker measures it from the blocks' sequence numbers and
capture timestamps over time (a least-squares line through up to 60 s of points), and the source
corrects it by slipping single frames (dropping one when the card is fast, repeating one when
it is slow) at the measured rate plus a slow pull back to the fill it had settled at after the
start (outside a dead band of one period), bounded by max_ppm.
Between slips the audio passes bit-exact.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numba
import numpy as np
from echoel.daemon.spsc_ring import Ring

NS = 1_000_000_000


@numba.njit(nogil=True, cache=True)
def _tone(out, start, rate, freqs, level):
    frames, ch = out.shape
    for n in range(frames):
        t = (start + n) / rate
        for c in range(ch):
            f = freqs[c % freqs.shape[0]]
            out[n, c] = np.float32(level * math.sin(2.0 * math.pi * f * (t - math.floor(t))))


def tone_block(start: int, frames: int, channels: int, rate: int,
               freqs: tuple[float, ...] = (1000.0, 440.0), level: float = 0.5) -> np.ndarray:
    """Frames start .. start+frames of the test tone (channel c plays freqs[c % len]).

    The phase restarts every second, so tones whose frequency is a whole number of Hz are
    continuous and the value of a sample depends only on its index (tests rebuild it)."""
    out = np.zeros((frames, channels), np.float32)
    _tone(out, start, float(rate), np.asarray(freqs, np.float64), level)
    return out


class ToneSource:
    """A generated test tone: channel c plays freqs[c % len(freqs)] at `level` (peak)."""

    def __init__(self, channels: int, rate: int, freqs: tuple[float, ...] = (1000.0, 440.0),
                 level: float = 0.5) -> None:
        if not freqs or any(not 0 < f < rate / 2 for f in freqs):
            raise ValueError(f"tone frequencies {freqs}: each above 0 and below {rate / 2:g} Hz")
        self.channels, self.rate, self.level = channels, rate, level
        self.freqs = np.asarray(freqs, np.float64)
        self.position = 0  # index of the next frame

    def read(self, out: np.ndarray) -> None:
        """The next frames."""
        _tone(out, self.position, float(self.rate), self.freqs, self.level)
        self.position += out.shape[0]

    def skip(self, frames: int) -> None:
        """Drop frames (the sender fell behind)."""
        self.position += frames

    def status(self) -> dict:
        """Nothing to report but the kind."""
        return {"kind": "tone", "freqs": [float(f) for f in self.freqs]}


class DriftTracker:
    """Card sample rate against the media clock: a least-squares line of sample count over PTP
    time, from points at least `every_s` apart, over the last `window_s`."""

    def __init__(self, rate: int, window_s: float = 60.0, every_s: float = 0.05,
                 min_span_s: float = 10.0) -> None:
        self.rate = rate
        n = int(window_s / every_s) + 2
        self.t = np.zeros(n, np.float64)
        self.s = np.zeros(n, np.float64)
        self.n = 0
        self.head = 0
        self.every_ns = int(every_s * NS)
        self.min_span_ns = int(min_span_s * NS)
        self._last_ns = -(1 << 62)
        self._t0: int | None = None
        self._s0 = 0
        self.ppm: float | None = None

    def reset(self) -> None:
        """Forget the points (a new ring, a clock step)."""
        self.n = self.head = 0
        self._t0 = None
        self._last_ns = -(1 << 62)
        self.ppm = None

    def add(self, t_ns: int, samples: int) -> None:
        """One point: `samples` counted by the card at PTP time t_ns."""
        if t_ns - self._last_ns < self.every_ns:
            return
        self._last_ns = t_ns
        if self._t0 is None:
            self._t0, self._s0 = t_ns, samples
        cap = self.t.shape[0]
        self.t[self.head] = (t_ns - self._t0) * 1e-9
        self.s[self.head] = samples - self._s0
        self.head = (self.head + 1) % cap
        self.n = min(self.n + 1, cap)
        if self.n >= 8:
            t, s = self.t[:self.n], self.s[:self.n]
            span = t.max() - t.min()
            if span * NS >= self.min_span_ns:
                tm = t.mean()
                dt = t - tm
                slope = float(np.dot(dt, s - s.mean()) / np.dot(dt, dt))
                self.ppm = (slope / self.rate - 1.0) * 1e6


@numba.njit(nogil=True, cache=True)
def _fifo_put(fifo, w, block, frames):
    cap = fifo.shape[0]
    ch = fifo.shape[1]
    for n in range(frames):
        i = (w + n) % cap
        for c in range(ch):
            fifo[i, c] = block[n * ch + c]


@numba.njit(nogil=True, cache=True)
def _fifo_get(fifo, r, out, count, fill):
    """count frames (<= len(out)) from the FIFO into out[0:count] (the first out.shape[1]
    channels); short reads pad silence."""
    cap = fifo.shape[0]
    ch = min(fifo.shape[1], out.shape[1])
    m = count if count <= fill else fill
    for n in range(m):
        i = (r + n) % cap
        for c in range(ch):
            out[n, c] = fifo[i, c]
    for n in range(m, count):
        for c in range(out.shape[1]):
            out[n, c] = 0.0
    return m


class RingSource:
    """An engine tap ring read through a FIFO, with drift measured and corrected (see above).

    channels: the tap's; a sender reading fewer takes the first ones. The ring file is
    (re)attached when it appears or is replaced (engine restart)."""

    def __init__(self, path: str | Path | None, channels: int, period: int, rate: int,
                 mono_to_ptp=None, target_frames: int | None = None, max_ppm: float = 500.0,
                 ring: Ring | None = None, time_constant_s: float = 30.0,
                 drift: DriftTracker | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.channels, self.period, self.rate = channels, period, rate
        self.ring: Ring | None = ring
        self._inode: int | None = None
        self.block = np.zeros(period * channels, np.float32)
        cap = 1
        while cap < 16 * period + 4096:
            cap *= 2
        self.fifo = np.zeros((cap, channels), np.float32)
        self.w = self.r = 0
        self.target = target_frames if target_frames is not None else 2 * period + 48
        self.max_ppm = max_ppm
        self.tau = time_constant_s
        self.mono_to_ptp = mono_to_ptp or (lambda m: m)
        self.drift = drift or DriftTracker(rate)
        self.acc = 0.0
        self.correction_ppm = 0.0
        self.fill_avg = float(self.target)
        self.setpoint: float | None = None  # fill the correction holds (set after start)
        self._primed_at = 0
        self.slips = {"dropped": 0, "repeated": 0}
        self.underrun_frames = 0
        self.overflow_frames = 0
        self.blocks = 0
        self.primed = False
        self._next_attach = 0.0
        if ring is not None:
            self._check(ring)
            ring.skip_to_latest()

    def _check(self, ring: Ring) -> None:
        if ring.width != self.period * self.channels:
            raise ValueError(f"tap ring {ring.path}: records of {ring.width} values; expected "
                             f"period {self.period} x {self.channels} channels = "
                             f"{self.period * self.channels}")

    def _attach(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if now < self._next_attach:
            return
        self._next_attach = now + 1.0
        try:
            ino = self.path.stat().st_ino
        except OSError:
            self.ring = None
            return
        if self.ring is None or ino != self._inode:
            ring = Ring.attach(self.path)
            self._check(ring)
            ring.skip_to_latest()
            self.ring, self._inode = ring, ino
            self.drift.reset()
            self.w = self.r = 0
            self.primed = False

    def _pull(self) -> None:
        ring = self.ring
        if ring is None:
            return
        cap = self.fifo.shape[0]
        while True:
            if self.w - self.r + self.period > cap:
                self.overflow_frames += self.period
                self.r += self.period  # drop the oldest: the FIFO must never block
            meta = ring.pop(self.block)
            if meta is None:
                break
            seq, t_ns = meta
            _fifo_put(self.fifo, self.w, self.block, self.period)
            self.w += self.period
            self.blocks += 1
            t = t_ns if t_ns > 0 else time.monotonic_ns()
            self.drift.add(self.mono_to_ptp(t), (seq + 1) * self.period)

    def read(self, out: np.ndarray) -> None:
        """The next len(out) frames, slipped by one when the correction asks for it."""
        self._attach()
        self._pull()
        frames = out.shape[0]
        fill = self.w - self.r
        self.fill_avg += (fill - self.fill_avg) * min(1.0, frames / (0.5 * self.rate))
        ppm = self.drift.ppm or 0.0
        if self.setpoint is None and self.primed and \
                self.r - self._primed_at >= 2 * self.rate:
            self.setpoint = self.fill_avg  # the average fill 2 s after the start
        err = 0.0 if self.setpoint is None else self.fill_avg - self.setpoint
        if abs(err) < self.period:  # block arrival makes the fill swing by a period
            err = 0.0
        corr = ppm + err / (self.rate * self.tau) * 1e6
        corr = max(-self.max_ppm, min(self.max_ppm, corr))
        self.correction_ppm = corr
        self.acc += corr * 1e-6 * frames
        if not self.primed:  # (re)start: wait for the target fill, play silence meanwhile
            if fill < self.target:
                out[:] = 0.0
                return
            self.primed = True
            self.fill_avg = float(fill)
            self.setpoint = None
            self._primed_at = self.r
        if fill < frames:
            got = _fifo_get(self.fifo, self.r, out, frames, fill)
            self.r += got
            self.underrun_frames += frames - got
            self.primed = False
            return
        if self.acc >= 1.0 and fill > frames:  # card fast: drop one frame
            self.r += 1
            self.acc -= 1.0
            self.slips["dropped"] += 1
        elif self.acc <= -1.0:  # card slow: repeat one frame
            _fifo_get(self.fifo, self.r, out[1:], frames - 1, fill)
            out[0] = out[1]
            self.r += frames - 1
            self.acc += 1.0
            self.slips["repeated"] += 1
            return
        _fifo_get(self.fifo, self.r, out, frames, fill)
        self.r += frames

    def skip(self, frames: int) -> None:
        """Drop frames (the sender fell behind)."""
        self._pull()
        self.r += min(frames, self.w - self.r)

    def status(self) -> dict:
        """Drift, correction, slips, underruns, fill."""
        return {"kind": "tap", "path": str(self.path) if self.path else None,
                "attached": self.ring is not None,
                "drift_ppm": None if self.drift.ppm is None else round(self.drift.ppm, 2),
                "correction_ppm": round(self.correction_ppm, 2),
                "fill_frames": self.w - self.r, "target_frames": self.target,
                "setpoint_frames": None if self.setpoint is None else round(self.setpoint),
                "slips": dict(self.slips), "underrun_frames": self.underrun_frames,
                "overflow_frames": self.overflow_frames, "blocks": self.blocks}


def warm_kernels() -> None:
    """Compile (or load from cache) this module's kernels now, not in the sending thread."""
    out = np.zeros((2, 2), np.float32)
    _tone(out, 0, 48000.0, np.ones(1, np.float64), 0.5)
    fifo = np.zeros((4, 2), np.float32)
    _fifo_put(fifo, 0, np.zeros(4, np.float32), 2)
    _fifo_get(fifo, 0, out, 2, 2)
