"""The AES67 media clock (RFC 7273 mediaclk:direct): RTP time = PTP time x rate, mod 2^32.

PTP time is TAI. It is read from CLOCK_REALTIME plus the TAI-UTC offset (the kernel's when it
has one set, as phc2sys does, else UTC_OFFSET_S), and:
- when the system clock is disciplined by PTP (the clock service says locked and not free
  running, or this box is the grandmaster): as is;
- otherwise corrected by the offset the clock service measures (offset_ns = local clock -
  grandmaster, ptp4l's sign), extrapolated between readings from their slope;
- without a reading (no clock service, or its status older than stale_s): the local clock as
  is, and the clock says it is unsynchronised.

The offset source is injected: any callable returning a ClockReading or None. ClockBusSource
reads the clock service's `status.clock` from its bus socket. `refresh()` (the service's main
loop calls it) is the only place the source is asked; the sending and playout threads only read
the cached correction, so they never touch a socket.

Also here: absolute clock_nanosleep and PR_SET_TIMERSLACK, which the paced threads use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

CLOCK_TAI = getattr(time, "CLOCK_TAI", 11)
CLOCK = time.CLOCK_REALTIME  # the clock the paced threads sleep on
UTC_OFFSET_S = 37  # TAI - UTC since 2017-01-01, used when the kernel has none set
TIMER_ABSTIME = 1
PR_SET_TIMERSLACK = 29
NS = 1_000_000_000
RTP_MOD = 1 << 32
MAX_SLOPE = 500e-6  # extrapolated offset drift is bounded to 500 ppm


@dataclass(frozen=True)
class ClockReading:
    """What the clock service measured."""

    gm_identity: str | None
    offset_ns: int  # local clock minus grandmaster
    locked: bool
    free_running: bool
    domain: int = 0
    read_at_ns: int = 0  # CLOCK_MONOTONIC ns of the measurement (0: now)

    @staticmethod
    def from_status(st: dict) -> ClockReading | None:
        """From a status.clock JSON object (daemon/clock_service.py); None when it carries no
        usable time: no grandmaster, or no offset measured yet."""
        mono = int(st.get("read_mono_ns") or 0)
        if st.get("state") == "grandmaster":  # this box leads: its clock is PTP time
            gm = st.get("gm_identity") or st.get("clock_identity")
            return ClockReading(gm, 0, True, False, int(st.get("domain") or 0), mono)
        off = st.get("offset_ns")
        if off is None or not st.get("gm_identity"):
            return None
        disciplined = bool(st.get("locked")) and not st.get("free_running")
        if not disciplined and st.get("offset_of", "CLOCK_REALTIME") != "CLOCK_REALTIME":
            return None  # an offset of a NIC's clock (hardware timestamps), not of ours
        return ClockReading(st.get("gm_identity"), int(off), bool(st.get("locked")),
                            bool(st.get("free_running")), int(st.get("domain") or 0), mono)


OffsetSource = Callable[[], ClockReading | None]


class MediaClock:
    """PTP time and RTP timestamps for one sample rate; see the module docstring."""

    def __init__(self, rate: int, offset_source: OffsetSource | None = None,
                 stale_s: float = 5.0) -> None:
        if rate <= 0:
            raise ValueError(f"media clock rate {rate}: must be positive")
        self.rate = rate
        self.source = offset_source
        self.stale_ns = int(stale_s * NS)
        self.reading: ClockReading | None = None
        # cached correction: ptp = tai - (off0 + slope * (mono - t0))
        self._off0 = 0
        self._t0 = 0
        self._slope = 0.0
        self._disciplined = False
        self._prev: ClockReading | None = None
        tai_utc = round((time.clock_gettime_ns(CLOCK_TAI) - time.clock_gettime_ns(CLOCK)) / NS)
        self.utc_offset_ns = (tai_utc or UTC_OFFSET_S) * NS
        self.kernel_tai_offset_s = tai_utc
        self.refresh()

    # ------------------------------------------------------------------ state
    def refresh(self) -> None:
        """Ask the offset source for a new reading (main loop only)."""
        r = self.source() if self.source is not None else None
        now = time.monotonic_ns()
        if r is not None and r.read_at_ns == 0:
            r = ClockReading(r.gm_identity, r.offset_ns, r.locked, r.free_running, r.domain,
                             now)
        if r is not None and now - r.read_at_ns > self.stale_ns:
            r = None
        if r is None:
            self.reading = None
            self._off0, self._slope, self._t0, self._disciplined = 0, 0.0, now, False
            return
        if r.locked and not r.free_running:
            self._off0, self._slope, self._disciplined = 0, 0.0, True
        else:
            slope = 0.0
            p = self._prev
            if p is not None and r.read_at_ns - p.read_at_ns > 100_000_000 and \
                    p.gm_identity == r.gm_identity:
                slope = (r.offset_ns - p.offset_ns) / (r.read_at_ns - p.read_at_ns)
                slope = max(-MAX_SLOPE, min(MAX_SLOPE, slope))
            self._off0, self._t0, self._slope = r.offset_ns, r.read_at_ns, slope
            self._disciplined = False
        if self._prev is None or r.read_at_ns != self._prev.read_at_ns:
            self._prev = r
        self.reading = r

    @property
    def synchronised(self) -> bool:
        """True when PTP time comes from a grandmaster (disciplined clock or measured offset)."""
        return self.reading is not None and self.reading.gm_identity is not None

    @property
    def mode(self) -> str:
        """'disciplined', 'offset' or 'unsynchronised'."""
        if self.reading is None:
            return "unsynchronised"
        return "disciplined" if self._disciplined else "offset"

    @property
    def gm_identity(self) -> str | None:
        """The grandmaster of the last reading."""
        return self.reading.gm_identity if self.reading else None

    @property
    def domain(self) -> int:
        """The PTP domain of the last reading (0 without one)."""
        return self.reading.domain if self.reading else 0

    def offset_ns(self, mono_ns: int | None = None) -> int:
        """Local clock minus grandmaster, now (or at a CLOCK_MONOTONIC instant)."""
        if self._disciplined or self.reading is None:
            return 0
        m = time.monotonic_ns() if mono_ns is None else mono_ns
        return self._off0 + int(self._slope * (m - self._t0))

    # ------------------------------------------------------------------ time
    def ptp_ns(self) -> int:
        """PTP time now (TAI ns)."""
        return time.clock_gettime_ns(CLOCK) + self.utc_offset_ns - self.offset_ns()

    def local_ns(self, ptp_ns: int) -> int:
        """The CLOCK_REALTIME instant of a PTP time (what to sleep until on CLOCK)."""
        return ptp_ns - self.utc_offset_ns + self.offset_ns()

    def mono_to_ptp(self, mono_ns: int) -> int:
        """PTP time of a CLOCK_MONOTONIC instant (e.g. a tap block's timestamp)."""
        return mono_ns + (time.clock_gettime_ns(CLOCK) - time.monotonic_ns()) + \
            self.utc_offset_ns - self.offset_ns(mono_ns)

    def sample_index(self, ptp_ns: int) -> int:
        """Samples since the PTP epoch at this rate (64-bit, not wrapped)."""
        return ptp_ns * self.rate // NS

    def sample_time_ns(self, index: int) -> int:
        """PTP time (ns) of a sample index (rounded up to the next ns)."""
        return -(-index * NS // self.rate)

    def rtp_timestamp(self, ptp_ns: int, offset: int = 0) -> int:
        """RTP timestamp of a PTP time (mediaclk:direct=offset)."""
        return (self.sample_index(ptp_ns) + offset) % RTP_MOD

    def status(self) -> dict:
        """For status.streams: mode, grandmaster, offset, kernel TAI offset."""
        return {"mode": self.mode, "synchronised": self.synchronised,
                "gm_identity": self.gm_identity, "domain": self.domain,
                "offset_ns": self.offset_ns(),
                "drift_ppm": round(self._slope * 1e6, 3),
                "utc_offset_s": self.utc_offset_ns // NS,
                "kernel_tai_offset_s": self.kernel_tai_offset_s}


class ClockBusSource:
    """Reads the clock service's status.clock from ipc://{run_dir}/bus-clock.sock."""

    def __init__(self, run_dir: str, service: str = "clock") -> None:
        import zmq
        self._zmq = zmq
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, f"status.{service}".encode())
        self.sock.connect(f"ipc://{run_dir}/bus-{service}.sock")
        self.last: ClockReading | None = None
        self.last_status: dict | None = None

    def __call__(self) -> ClockReading | None:
        """The newest reading published so far (drains the socket without waiting)."""
        zmq = self._zmq
        while True:
            try:
                _topic, body = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                st = json.loads(body)
                self.last_status = st
                self.last = ClockReading.from_status(st)
            except (ValueError, TypeError, AttributeError):
                continue
        return self.last

    def close(self) -> None:
        """Disconnect."""
        self.sock.close()


# ---------------------------------------------------------------------- pacing primitives
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.clock_nanosleep.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Timespec),
                                  ctypes.POINTER(_Timespec)]


def sleep_until(clock_id: int, t_ns: int) -> None:
    """Absolute clock_nanosleep on clock_id until t_ns (the GIL is released meanwhile)."""
    ts = _Timespec(t_ns // NS, t_ns % NS)
    while _libc.clock_nanosleep(clock_id, TIMER_ABSTIME, ctypes.byref(ts), None) == 4:
        pass  # EINTR: sleep on to the same instant


def set_timer_slack(ns: int = 1) -> str | None:
    """PR_SET_TIMERSLACK for the calling thread; None or why not."""
    if _libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(ns), 0, 0, 0) != 0:
        return f"PR_SET_TIMERSLACK {ns} ns refused (errno {ctypes.get_errno()})"
    return None


def shorten_gil_switch(interval_s: float = 2e-4) -> None:
    """Let a paced thread that wakes get the GIL within interval_s (Python's default is 5 ms:
    a busy thread could otherwise hold a sender back by several packets). Process-wide: call it
    in a process that runs senders or receivers."""
    import sys
    sys.setswitchinterval(interval_s)
