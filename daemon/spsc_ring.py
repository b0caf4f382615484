"""Lock-free single-producer/single-consumer ring of fixed-size records in shared memory.

Layout: a 512-byte header (uint64: magic, version, slots, width, dtype code; the write index,
the read index and the overflow count each on a cache line of their own), then per-slot meta
(int64 sequence, int64 timestamp ns), then the records. Indices only grow; slot = index % slots.
The producer never waits: when the ring is full the record is dropped and counted.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numba
import numpy as np
from echoel.daemon import shm_segment
from echoel.daemon.atomics import fence

MAGIC = 0x45434852494E4731  # "ECHRING1"
H_MAGIC, H_VERSION, H_SLOTS, H_WIDTH, H_DTYPE = 0, 1, 2, 3, 4
H_WRITE, H_READ, H_OVERFLOW, H_PUSHED = 8, 16, 24, 32
HEADER_WORDS = 64
DTYPES = {0: np.float32, 1: np.float64, 2: np.int64}
DTYPE_CODES = {np.dtype(v): k for k, v in DTYPES.items()}


@numba.njit(nogil=True, cache=True)
def push(h, meta, data, src, t_ns):
    """Append one record (src, any shape, flattened) with timestamp; False if full (counted)."""
    w = h[H_WRITE]
    r = h[H_READ]
    fence()
    slots = data.shape[0]
    if w - r >= slots:
        h[H_OVERFLOW] += 1
        return False
    i = w % slots
    flat = src.reshape(-1)
    row = data[i]
    n = min(flat.shape[0], row.shape[0])
    for k in range(n):
        row[k] = flat[k]
    meta[i, 0] = w
    meta[i, 1] = t_ns
    fence()
    h[H_WRITE] = w + 1
    h[H_PUSHED] += 1
    return True


@numba.njit(nogil=True, cache=True)
def pop(h, meta, data, dst, out_meta):
    """Take the oldest record into dst (flattened) and its meta into out_meta; False if empty."""
    r = h[H_READ]
    w = h[H_WRITE]
    fence()
    if r == w:
        return False
    slots = data.shape[0]
    i = r % slots
    flat = dst.reshape(-1)
    row = data[i]
    n = min(flat.shape[0], row.shape[0])
    for k in range(n):
        flat[k] = row[k]
    out_meta[0] = meta[i, 0]
    out_meta[1] = meta[i, 1]
    fence()
    h[H_READ] = r + 1
    return True


class Ring:
    """One end of a ring; which end is up to the caller (one producer, one consumer)."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.path = path
        self._buf = buf
        self.h = np.frombuffer(buf, np.uint64, HEADER_WORDS)
        if int(self.h[H_MAGIC]) != MAGIC:
            raise ValueError(f"{path} is not an echoel ring (bad magic)")
        slots, width = int(self.h[H_SLOTS]), int(self.h[H_WIDTH])
        self.dtype = np.dtype(DTYPES[int(self.h[H_DTYPE])])
        off = HEADER_WORDS * 8
        self.meta = np.frombuffer(buf, np.int64, slots * 2, off).reshape(slots, 2)
        off += slots * 16
        self.data = np.frombuffer(buf, self.dtype, slots * width, off).reshape(slots, width)
        self._meta_out = np.zeros(2, np.int64)

    @staticmethod
    def _size(slots: int, width: int, dtype) -> int:
        return HEADER_WORDS * 8 + slots * 16 + slots * width * np.dtype(dtype).itemsize

    @staticmethod
    def _write_header(buf: mmap.mmap, slots: int, width: int, dtype) -> None:
        h = np.frombuffer(buf, np.uint64, HEADER_WORDS)
        h[H_VERSION], h[H_SLOTS] = 1, slots
        h[H_WIDTH], h[H_DTYPE] = width, DTYPE_CODES[np.dtype(dtype)]
        h[H_MAGIC] = MAGIC  # last: a reader that sees the magic sees the rest

    @classmethod
    def create(cls, path: Path, slots: int, width: int, dtype=np.float32) -> Ring:
        """Make a new, empty ring file (it appears under its name fully initialised)."""
        buf = shm_segment.create(path, cls._size(slots, width, dtype),
                                 lambda m: cls._write_header(m, slots, width, dtype))
        return cls(buf, path)

    @classmethod
    def private(cls, slots: int, width: int, dtype=np.float32) -> Ring:
        """A ring in anonymous memory (same types as a shared one: for warm-up and tests)."""
        buf = mmap.mmap(-1, cls._size(slots, width, dtype))
        cls._write_header(buf, slots, width, dtype)
        return cls(buf, Path("<private>"))

    def like(self) -> Ring:
        """A private ring of the same shape and dtype."""
        return Ring.private(self.slots, self.width, self.dtype)

    @classmethod
    def attach(cls, path: Path) -> Ring:
        """Map an existing ring."""
        return cls(shm_segment.attach(path), path)

    @property
    def slots(self) -> int:
        """Capacity in records."""
        return self.data.shape[0]

    @property
    def width(self) -> int:
        """Values per record."""
        return self.data.shape[1]

    def push(self, src: np.ndarray, t_ns: int = 0) -> bool:
        """Producer: append a record; False (and counted) when full."""
        return bool(push(self.h, self.meta, self.data, src, t_ns))

    def pop(self, dst: np.ndarray) -> tuple[int, int] | None:
        """Consumer: oldest record into dst; (sequence, timestamp ns) or None when empty."""
        if pop(self.h, self.meta, self.data, dst, self._meta_out):
            return int(self._meta_out[0]), int(self._meta_out[1])
        return None

    def skip_to_latest(self) -> int:
        """Consumer: drop everything pending (on (re)attach); returns how many were dropped."""
        w, r = int(self.h[H_WRITE]), int(self.h[H_READ])
        self.h[H_READ] = w
        return w - r

    @property
    def fill(self) -> int:
        """Records waiting."""
        return int(self.h[H_WRITE]) - int(self.h[H_READ])

    @property
    def overflows(self) -> int:
        """Records the producer dropped because the ring was full."""
        return int(self.h[H_OVERFLOW])

    @property
    def pushed(self) -> int:
        """Records the producer has written in all."""
        return int(self.h[H_PUSHED])

    def close(self) -> None:
        """Release the mapping (views must be dropped first)."""
        del self.h, self.meta, self.data
        try:
            self._buf.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process
