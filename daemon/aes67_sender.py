"""An AES67 sender: RTP L24/L16 packets paced by the PTP media clock, from a source.

Packet n carries samples n*F .. n*F+F-1 (F frames per packet; RTP timestamp n*F + the
mediaclk offset, mod 2^32) and leaves when its last sample is due: at PTP time (n+1)*F/rate,
reached with an absolute clock_nanosleep on CLOCK_REALTIME (corrected by the clock's offset). The
sending thread asks for SCHED_FIFO and a 1 ns timer slack where allowed (what it could not have
is reported in status). After a stall it sends the packets it owes at once, up to
max_catchup_ms; beyond that it skips ahead (counted) so the stream stays on the media clock.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np
from echoel.daemon.aes67_sources import warm_kernels as warm_sources
from echoel.daemon.media_clock import CLOCK, MediaClock, set_timer_slack, sleep_until
from echoel.drivers import realtime
from echoel.drivers.rtp_packet import PacketWriter, warm_kernels
from echoel.drivers.sdp_aes67 import StreamSdp, build_sdp, check_stream
from echoel.drivers.udp_multicast import open_sender, source_address

STAT_WINDOW = 4096  # send intervals kept for the status figures


@dataclass
class SenderConfig:
    """One outgoing stream."""

    name: str
    address: str
    port: int = 5004
    channels: int = 2
    encoding: str = "L24"
    rate: int = 48000
    ptime_us: int = 1000
    ttl: int = 32
    dscp: str | int = "AF41"
    payload_type: int = 96
    iface: str | None = None  # interface IPv4 address for multicast
    origin: str | None = None  # the SDP's o= address (default: iface, else the routed source)
    mediaclk_offset: int = 0
    ssrc: int = field(default_factory=lambda: random.getrandbits(32))
    fifo_priority: int = 60
    max_catchup_ms: float = 20.0

    def stream(self, gm_identity: str | None = None, domain: int = 0) -> StreamSdp:
        """The SDP description of this stream."""
        return StreamSdp(name=self.name, address=self.address, port=self.port,
                         channels=self.channels, encoding=self.encoding, rate=self.rate,
                         ptime_us=self.ptime_us, payload_type=self.payload_type, ttl=self.ttl,
                         origin=self.origin or self.iface or source_address(self.address),
                         session_id=self.ssrc, session_version=1, gm_identity=gm_identity,
                         domain=domain, mediaclk_offset=self.mediaclk_offset)


class Aes67Sender:
    """Sends one stream from `source` (an object with read(out) and skip(frames))."""

    def __init__(self, cfg: SenderConfig, source, clock: MediaClock,
                 sock: socket.socket | None = None) -> None:
        check_stream(cfg.stream())
        if cfg.rate != clock.rate:
            raise ValueError(f"sender {cfg.name!r}: rate {cfg.rate} but the media clock runs "
                             f"at {clock.rate}")
        self.cfg, self.source, self.clock = cfg, source, clock
        self.frames = cfg.rate * cfg.ptime_us // 1_000_000
        self.writer = PacketWriter(self.frames, cfg.channels, cfg.encoding, cfg.payload_type,
                                   cfg.ssrc)
        self.block = np.zeros((self.frames, cfg.channels), np.float32)
        self.sock = sock or open_sender(cfg.ttl, cfg.dscp, cfg.iface)
        self.dest = (cfg.address, cfg.port)
        self.seq0 = random.getrandbits(16)
        self.packets = 0
        self.send_errors = 0
        self.last_error = ""
        self.skipped_packets = 0
        self.catchup_packets = 0
        self.first_index: int | None = None
        self.next_index = 0
        self.lateness = np.zeros(STAT_WINDOW, np.int64)  # wake-up minus due time, ns
        self.intervals = np.zeros(STAT_WINDOW, np.int64)  # between sends, ns
        self._stat_i = 0
        self.rt_problems: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sdp_gm: tuple[str | None, int] | None = None
        self._sdp_text = ""
        self._sdp_version = 0
        self._started = 0.0
        self._last_send = 0
        self._cpu_s = 0.0
        self._ran_s = 0.0
        warm_kernels()
        warm_sources()

    # ------------------------------------------------------------------ SDP
    def sdp(self) -> str:
        """The stream's SDP with the media clock's current grandmaster."""
        key = (self.clock.gm_identity, self.clock.domain)
        if key != self._sdp_gm:
            self._sdp_version += 1
            s = replace(self.cfg.stream(*key), session_version=self._sdp_version)
            self._sdp_gm, self._sdp_text = key, build_sdp(s)
        return self._sdp_text

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        """Start the sending thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"aes67-send-{self.cfg.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop sending (the socket stays open until close())."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Stop and close the socket."""
        self.stop()
        self.sock.close()

    def _run(self) -> None:
        why = set_timer_slack(1)
        if why:
            self.rt_problems.append(why)
        if self.cfg.fifo_priority > 0:
            why = realtime.set_fifo(self.cfg.fifo_priority)
            if why:
                self.rt_problems.append(why)
        self._started = time.monotonic()
        try:
            self.run_until(self._stop)
        finally:
            self._cpu_s = time.thread_time()
            self._ran_s = time.monotonic() - self._started
            if self.cfg.fifo_priority > 0:
                try:
                    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
                except OSError:
                    pass

    def run_until(self, stop: threading.Event, max_packets: int | None = None) -> None:
        """The pacing loop (in the calling thread) until stop is set or max_packets sent."""
        pace([self], stop, max_packets)

    def _emit(self, n: int, late: int) -> None:
        """Read, build and send packet n (its wake-up was `late` ns after the due time)."""
        f = self.frames
        self.source.read(self.block)
        pkt = self.writer.build(self.block, self.seq0 + self.packets,
                                n * f + self.cfg.mediaclk_offset)
        try:
            self.sock.sendto(pkt, self.dest)
        except OSError as exc:
            self.send_errors += 1
            self.last_error = f"send to {self.dest[0]}:{self.dest[1]}: {exc.strerror}"
        mono = time.monotonic_ns()
        i = self._stat_i % STAT_WINDOW
        self.lateness[i] = late
        self.intervals[i] = mono - self._last_send if self._last_send else \
            f * 1_000_000_000 // self.cfg.rate
        self._stat_i += 1
        self._last_send = mono
        self.packets += 1
        self.next_index = (n + 1) * f

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        """Counters, interval figures over the last packets, source status, SDP."""
        k = min(self._stat_i, STAT_WINDOW)
        ptime_ns = self.frames * 1_000_000_000 // self.cfg.rate
        st: dict = {"name": self.cfg.name, "direction": "send",
                    "destination": f"{self.cfg.address}:{self.cfg.port}",
                    "packets": self.packets, "send_errors": self.send_errors,
                    "skipped_packets": self.skipped_packets,
                    "catchup_packets": self.catchup_packets, "last_error": self.last_error,
                    "rt_problems": list(self.rt_problems),
                    "source": self.source.status() if hasattr(self.source, "status") else {}}
        th = self._thread
        if th is not None and th.ident is not None and th.is_alive():
            try:
                cpu = time.clock_gettime(time.pthread_getcpuclockid(th.ident))
                ran = time.monotonic() - self._started
            except OSError:
                cpu, ran = 0.0, 0.0
        else:
            cpu, ran = self._cpu_s, self._ran_s
        if ran > 0:
            st["cpu_pct"] = round(100 * cpu / ran, 2)
        if k > 1:
            err = np.abs(self.intervals[:k] - ptime_ns) / 1e3
            late = self.lateness[:k] / 1e3
            st["interval_error_us"] = {"mean": round(float(err.mean()), 1),
                                       "p99": round(float(np.percentile(err, 99)), 1),
                                       "max": round(float(err.max()), 1)}
            st["wake_late_us"] = {"p50": round(float(np.percentile(late, 50)), 1),
                                  "p99": round(float(np.percentile(late, 99)), 1)}
        return st


def pace(senders: list[Aes67Sender], stop: threading.Event,
         max_packets: int | None = None) -> None:
    """Send the packets of several streams of one rate and packet time from one thread: one
    wake-up per packet time for all of them (fewer wake-ups and GIL hand-overs than a thread
    each). Runs until stop is set or max_packets packets per stream are sent."""
    if not senders:
        return
    s0 = senders[0]
    clk, f, rate = s0.clock, s0.frames, s0.cfg.rate
    for s in senders:
        if (s.frames, s.cfg.rate) != (f, rate) or s.clock is not clk:
            raise ValueError(f"sender {s.cfg.name!r}: a group shares one media clock, rate "
                             f"and packet time ({rate} Hz, {f} frames)")
    n = clk.sample_index(clk.ptp_ns()) // f + 1
    for s in senders:
        s.first_index = n * f
        s._last_send = 0
    max_late = int(s0.cfg.max_catchup_ms * 1e6)
    ptime_ns = f * 1_000_000_000 // rate
    sent = 0
    while not stop.is_set() and (max_packets is None or sent < max_packets):
        due = clk.local_ns(clk.sample_time_ns((n + 1) * f))
        sleep_until(CLOCK, due)
        late = time.clock_gettime_ns(CLOCK) - due
        if late > max_late:  # a stall: skip what cannot be caught up
            behind = clk.sample_index(clk.ptp_ns()) // f - 1 - n
            if behind > 0:
                for s in senders:
                    s.source.skip(behind * f)
                    s.skipped_packets += behind
                n += behind
        elif late > ptime_ns:
            for s in senders:
                s.catchup_packets += 1
        for s in senders:
            s._emit(n, late)
        sent += 1
        n += 1


class SenderGroup:
    """Senders of one rate and packet time driven by one paced thread (see pace)."""

    def __init__(self, senders: list[Aes67Sender], fifo_priority: int = 60) -> None:
        self.senders = list(senders)
        self.fifo_priority = fifo_priority
        self.rt_problems: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"aes67-send-x{len(self.senders)}")
            self._thread.start()

    def _run(self) -> None:
        for why in (set_timer_slack(1),
                    realtime.set_fifo(self.fifo_priority) if self.fifo_priority > 0 else None):
            if why:
                self.rt_problems.append(why)
        for s in self.senders:
            s.rt_problems = self.rt_problems
        pace(self.senders, self._stop)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
