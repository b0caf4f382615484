"""Jitter buffer of a received RTP audio stream, addressed by sample index (the media clock).

Packets are decoded straight into a circular buffer of frames at the place their timestamp
says; every slot remembers the absolute sample index written there, so reading knows without
any bookkeeping which samples arrived. Playout reads consecutive blocks; samples that never
came are played as silence and counted. Packets are classified on arrival:

- late: all their samples are before the read position (played out already as silence),
- duplicate: their first and last samples are already there,
- early: beyond what the buffer holds ahead of the read position (a jump of the sender's
  clock, or a wrong latency); the caller decides whether to re-anchor.

The kernels do not allocate; all arrays are built by JitterBuffer.
"""

from __future__ import annotations

import numba
import numpy as np

OK, LATE, DUPLICATE, EARLY = 0, 1, 2, 3
STATUS_NAMES = ("ok", "late", "duplicate", "early")
RTP_MOD = 1 << 32


@numba.njit(nogil=True, cache=True)
def jb_insert(data, stamp, payload, offset, frames, bps, index, read_pos):
    """Decode one packet's samples (bps 3: L24, 2: L16) for sample `index` on; a status code."""
    cap, ch = data.shape
    if index + frames <= read_pos:
        return LATE
    if index + frames > read_pos + cap:
        return EARLY
    first = index % cap
    last = (index + frames - 1) % cap
    if stamp[first] == index and stamp[last] == index + frames - 1:
        return DUPLICATE
    k = offset
    scale = np.float32(1.0 / 8388608.0) if bps == 3 else np.float32(1.0 / 32768.0)
    for n in range(frames):
        idx = index + n
        slot = idx % cap
        store = idx >= read_pos
        for c in range(ch):
            if bps == 3:
                q = (np.int32(payload[k]) << 16) | (np.int32(payload[k + 1]) << 8) | \
                    np.int32(payload[k + 2])
                if q >= 8388608:
                    q -= 16777216
            else:
                q = (np.int32(payload[k]) << 8) | np.int32(payload[k + 1])
                if q >= 32768:
                    q -= 65536
            if store:
                data[slot, c] = np.float32(q) * scale
            k += bps
        if store:
            stamp[slot] = idx
    return OK


@numba.njit(nogil=True, cache=True)
def jb_read(data, stamp, out, start):
    """Samples start .. start+len(out) into out (silence where none came); frames missing."""
    cap, ch = data.shape
    missing = 0
    for n in range(out.shape[0]):
        idx = start + n
        slot = idx % cap
        if stamp[slot] == idx:
            for c in range(ch):
                out[n, c] = data[slot, c]
        else:
            for c in range(ch):
                out[n, c] = 0.0
            missing += 1
    return missing


class JitterBuffer:
    """A stream's jitter buffer: `capacity_frames` samples per channel (at least 4x latency)."""

    def __init__(self, channels: int, capacity_frames: int, encoding: str = "L24") -> None:
        if not 1 <= channels <= 64:
            raise ValueError(f"jitter buffer channels {channels}: allowed 1 to 64")
        if capacity_frames < 64:
            raise ValueError(f"jitter buffer capacity {capacity_frames} frames: at least 64")
        if encoding not in ("L24", "L16"):
            raise ValueError(f"jitter buffer encoding {encoding!r}: allowed L24, L16")
        self.channels = channels
        self.bps = 3 if encoding == "L24" else 2
        self.data = np.zeros((capacity_frames, channels), np.float32)
        self.stamp = np.full(capacity_frames, -1, np.int64)
        self.read_pos = 0
        self.counts = {"ok": 0, "late": 0, "duplicate": 0, "early": 0}
        self.missing_frames = 0
        self.played_frames = 0

    @property
    def capacity(self) -> int:
        """Frames the buffer holds."""
        return self.data.shape[0]

    def reset(self, read_pos: int) -> None:
        """Forget everything; playout continues from read_pos."""
        self.stamp[:] = -1
        self.read_pos = read_pos

    def unwrap(self, timestamp: int, ts_offset: int = 0) -> int:
        """The 64-bit sample index of a 32-bit RTP timestamp (nearest to the read position);
        ts_offset is the sender's RTP timestamp minus our sample index (mediaclk offset)."""
        d = (timestamp - ts_offset - self.read_pos) % RTP_MOD
        if d >= RTP_MOD // 2:
            d -= RTP_MOD
        return self.read_pos + d

    def insert(self, payload: np.ndarray, offset: int, frames: int, index: int) -> int:
        """Store a packet's samples (payload: uint8 array, samples from offset); status code."""
        st = jb_insert(self.data, self.stamp, payload, offset, frames, self.bps, index,
                       self.read_pos)
        self.counts[STATUS_NAMES[st]] += 1
        return int(st)

    def read(self, out: np.ndarray) -> int:
        """The next len(out) frames into out (float32[frames, channels]); frames missing."""
        missing = int(jb_read(self.data, self.stamp, out, self.read_pos))
        self.read_pos += out.shape[0]
        self.missing_frames += missing
        self.played_frames += out.shape[0]
        return missing

    def buffered_frames(self) -> int:
        """Frames stored at or after the read position (an estimate of the fill)."""
        return int(np.count_nonzero(self.stamp >= self.read_pos))


def warm_kernels() -> None:
    """Compile (or load from cache) the kernels now."""
    jb = JitterBuffer(1, 64)
    jb.insert(np.zeros(12 + 3, np.uint8), 12, 1, 0)
    jb.read(np.zeros((1, 1), np.float32))
