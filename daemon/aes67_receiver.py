"""An AES67 receiver: RTP L24/L16 into a jitter buffer, played out on the media clock.

One thread does both jobs: it waits for packets until the next playout instant, stores them in
the jitter buffer by timestamp, and at each instant hands the block of `period` frames whose
samples are `latency` old to the sink (a Ring for the engine, or any callable). Packets that do
not match the SDP (payload type, payload size, another SSRC while the current one is alive) are
counted and ignored; packets that are not RTP are counted as malformed. Nothing a packet holds
can stop the thread.

Timestamps follow the media clock (RTP time = PTP time x rate + the SDP's mediaclk offset).
A sender whose timestamps are far from our clock (not PTP-locked, e.g. GStreamer's random
offset) is received on its own timeline instead: the offset is measured on its first packet
(clock_mode "arrival") and measured again when packets keep landing outside the buffer.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from echoel.daemon.jitter_buffer import DUPLICATE, EARLY, LATE, JitterBuffer
from echoel.daemon.jitter_buffer import warm_kernels as warm_jb
from echoel.daemon.media_clock import CLOCK, MediaClock, set_timer_slack
from echoel.daemon.spsc_ring import Ring
from echoel.drivers import realtime
from echoel.drivers.rtp_packet import RtpError, parse_header
from echoel.drivers.sdp_aes67 import StreamSdp
from echoel.drivers.udp_multicast import open_receiver

MAX_PACKET = 9000
REALIGN_AFTER = 50  # consecutive packets outside the buffer before the timeline is re-measured
SSRC_SILENT_NS = 1_000_000_000
# timestamps within this many seconds of our media clock are taken as on it (a PTP sender);
# others (a sender without PTP) are received on their own timeline
MEDIA_WINDOW_S = 2

Sink = Callable[[np.ndarray, int], None]  # (block float32[period, ch], first sample index)


def ring_sink(ring: Ring) -> Sink:
    """A sink pushing blocks into a Ring (overflow counted by the ring)."""
    def push(block: np.ndarray, _index: int) -> None:
        ring.push(block, time.monotonic_ns())
    return push


def channel_sink(ring: Ring, period: int, channels: int) -> Sink:
    """A sink into a ring of another channel count (the engine's input): stream channel c
    goes to channel c; channels the stream lacks are silent, extra ones are left out."""
    out = np.zeros((period, channels), np.float32)

    def push(block: np.ndarray, _index: int) -> None:
        b = block.reshape(period, -1)
        k = min(channels, b.shape[1])
        out[:, :k] = b[:, :k]
        ring.push(out, time.monotonic_ns())
    return push


@dataclass
class ReceiverConfig:
    """Reception settings of one stream."""

    latency_ms: float = 5.0
    period: int = 128  # frames per block handed to the sink
    iface: str | None = None
    fifo_priority: int = 0  # SCHED_FIFO for the receiving thread (0: normal)


class Aes67Receiver:
    """Receives one stream described by an SDP; see the module docstring."""

    def __init__(self, stream: StreamSdp, clock: MediaClock, sink: Sink,
                 cfg: ReceiverConfig | None = None, sock: socket.socket | None = None) -> None:
        self.cfg = cfg = cfg or ReceiverConfig()
        if stream.rate != clock.rate:
            raise ValueError(f"receiver {stream.name!r}: stream rate {stream.rate} but the "
                             f"media clock runs at {clock.rate}")
        if not 0.25 <= cfg.latency_ms <= 2000:
            raise ValueError(f"receiver {stream.name!r}: latency_ms = {cfg.latency_ms}: "
                             "allowed 0.25 to 2000")
        self.stream, self.clock, self.sink = stream, clock, sink
        self.frames = stream.frames
        self.bps = 3 if stream.encoding == "L24" else 2
        self.payload_bytes = self.frames * stream.channels * self.bps
        self.latency = max(1, round(cfg.latency_ms * stream.rate / 1000))
        cap = 1
        while cap < 4 * (self.latency + cfg.period + self.frames) + stream.rate // 10:
            cap *= 2
        self.jb = JitterBuffer(stream.channels, cap, stream.encoding)
        self.block = np.zeros((cfg.period, stream.channels), np.float32)
        self.buf = bytearray(MAX_PACKET)
        self.view = np.frombuffer(self.buf, np.uint8)
        self.sock = sock or open_receiver(stream.address, stream.port, cfg.iface)
        self.sock.setblocking(False)
        self.counts = {"packets": 0, "malformed": 0, "wrong_payload_type": 0,
                       "wrong_size": 0, "wrong_ssrc": 0, "ssrc_changes": 0, "realigned": 0,
                       "playout_jumps": 0, "blocks": 0}
        self.ssrc: int | None = None
        self.ssrc_seen_ns = 0
        self.ts_offset = stream.mediaclk_offset or 0
        self.clock_mode = "media"
        self._aligned = False
        self._bad_run = 0
        self.base_seq: int | None = None
        self.max_seq = 0
        self.margin_min = None  # frames ahead of playout a packet arrived, smallest seen
        self.margins = np.zeros(1024, np.int64)
        self._mi = 0
        self.jitter = 0.0  # RFC 3550 interarrival jitter, in samples
        self._transit: int | None = None
        self.last_error = ""
        self.rt_problems: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        warm_jb()

    # ------------------------------------------------------------------ packets
    def handle(self, data: np.ndarray, n: int, now_index: int) -> None:
        """One received datagram (the first n bytes of data)."""
        self.counts["packets"] += 1
        try:
            h = parse_header(data, n)
        except RtpError as exc:
            self.counts["malformed"] += 1
            self.last_error = str(exc)
            return
        if h.payload_type != self.stream.payload_type:
            self.counts["wrong_payload_type"] += 1
            self.last_error = (f"payload type {h.payload_type}; the SDP says "
                               f"{self.stream.payload_type}")
            return
        if h.payload_end - h.payload_offset != self.payload_bytes:
            self.counts["wrong_size"] += 1
            self.last_error = (f"payload of {h.payload_end - h.payload_offset} bytes; the SDP "
                               f"says {self.payload_bytes} ({self.frames} frames x "
                               f"{self.stream.channels} ch x {self.bps} bytes)")
            return
        mono = time.monotonic_ns()
        if self.ssrc is None:
            self.ssrc = h.ssrc
        elif h.ssrc != self.ssrc:
            if mono - self.ssrc_seen_ns < SSRC_SILENT_NS:
                self.counts["wrong_ssrc"] += 1
                self.last_error = f"SSRC {h.ssrc:08x} while {self.ssrc:08x} is streaming"
                return
            self.ssrc = h.ssrc
            self.counts["ssrc_changes"] += 1
            self.base_seq = None
            self._aligned = False
        self.ssrc_seen_ns = mono
        self._sequence(h.sequence)
        if not self._aligned:
            self._align(h.timestamp, now_index)
        index = self.jb.unwrap(h.timestamp, self.ts_offset)
        st = self.jb.insert(data, h.payload_offset, self.frames, index)
        # a run of packets outside the buffer (not merely late after a stall of ours) means
        # the sender's timeline moved
        if st == EARLY or (st == LATE and self.jb.read_pos - index > self.jb.capacity // 2):
            self._bad_run += 1
            if self._bad_run >= REALIGN_AFTER:
                self._align(h.timestamp, now_index, force=True)
        else:
            self._bad_run = 0
        if st not in (DUPLICATE, EARLY):
            margin = index + self.frames - self.jb.read_pos
            self.margins[self._mi % self.margins.shape[0]] = margin
            self._mi += 1
            transit = now_index - index
            if self._transit is not None:
                self.jitter += (abs(transit - self._transit) - self.jitter) / 16.0
            self._transit = transit

    def _sequence(self, seq: int) -> None:
        if self.base_seq is None:
            self.base_seq = self.max_seq = seq
            return
        d = (seq - self.max_seq) & 0xFFFF
        if 0 < d < 0x8000:  # newer (older ones and duplicates leave the maximum)
            self.max_seq += d

    def _align(self, timestamp: int, now_index: int, force: bool = False) -> None:
        """Decide the timeline: the media clock if the packet fits the buffer, else its own."""
        expected = self.stream.mediaclk_offset or 0
        d = (timestamp - expected - now_index) % (1 << 32)
        if d >= 1 << 31:
            d -= 1 << 32
        window = MEDIA_WINDOW_S * self.stream.rate
        if not force and -self.latency - window < d < window:
            self.ts_offset, self.clock_mode = expected, "media"
        else:
            # its own timeline: this packet's last sample is "now"
            self.ts_offset = (timestamp + self.frames - now_index) % (1 << 32)
            self.clock_mode = "arrival"
            self.counts["realigned"] += 1
            self.jb.reset(now_index - self.latency)
        self._aligned = True
        self._bad_run = 0

    # ------------------------------------------------------------------ loop
    def _drain(self, now_index: int) -> int:
        n = 0
        while True:
            try:
                k = self.sock.recv_into(self.buf)
            except (BlockingIOError, InterruptedError):
                return n
            except OSError as exc:
                self.last_error = f"receive: {exc.strerror}"
                return n
            self.handle(self.view, k, now_index)
            n += 1

    def _play(self, target: int) -> None:
        p = self.cfg.period
        if target - self.jb.read_pos > self.jb.capacity // 2 or target < self.jb.read_pos - p:
            self.counts["playout_jumps"] += 1
            self.jb.reset(target - p)
        while self.jb.read_pos + p <= target:
            start = self.jb.read_pos
            self.jb.read(self.block)
            self.sink(self.block, start)
            self.counts["blocks"] += 1

    def run_until(self, stop: threading.Event) -> None:
        """Receive and play out in the calling thread until stop is set."""
        clk, p = self.clock, self.cfg.period
        while True:  # packets queued before now are stale: they would misplace the timeline
            try:
                self.sock.recv_into(self.buf)
            except (BlockingIOError, InterruptedError):
                break
        self.jb.reset(clk.sample_index(clk.ptp_ns()) - self.latency)
        fd = self.sock.fileno()
        while not stop.is_set():
            next_play = self.jb.read_pos + p + self.latency  # media sample index to wait for
            due = clk.local_ns(clk.sample_time_ns(next_play))
            while True:
                now = time.clock_gettime_ns(CLOCK)
                left = due - now
                if left <= 0:
                    break
                r, _, _ = select.select([fd], [], [], min(left, 100_000_000) / 1e9)
                if r:
                    self._drain(clk.sample_index(clk.ptp_ns()))
                if stop.is_set():
                    return
            now_index = clk.sample_index(clk.ptp_ns())
            self._drain(now_index)
            self._play(now_index - self.latency)

    def start(self) -> None:
        """Start the receiving thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"aes67-recv-{self.stream.name}")
        self._thread.start()

    def _run(self) -> None:
        why = set_timer_slack(1)
        if why:
            self.rt_problems.append(why)
        if self.cfg.fifo_priority > 0:
            why = realtime.set_fifo(self.cfg.fifo_priority)
            if why:
                self.rt_problems.append(why)
        try:
            self.run_until(self._stop)
        finally:
            if self.cfg.fifo_priority > 0:
                try:
                    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
                except OSError:
                    pass

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread (the socket stays open until close())."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Stop and close the socket."""
        self.stop()
        self.sock.close()

    # ------------------------------------------------------------------ status
    @property
    def lost_packets(self) -> int:
        """Packets never received (RFC 3550: expected from the sequence numbers minus
        received ones, duplicates excluded)."""
        if self.base_seq is None:
            return 0
        expected = self.max_seq - self.base_seq + 1
        got = self.jb.counts["ok"] + self.jb.counts["late"] + self.jb.counts["early"]
        return max(0, expected - got)

    def status(self) -> dict:
        """Counters, timing figures, the stream."""
        k = min(self._mi, self.margins.shape[0])
        rate = self.stream.rate
        st = {"name": self.stream.name, "direction": "receive",
              "source": f"{self.stream.address}:{self.stream.port}",
              "clock_mode": self.clock_mode, "latency_ms": self.cfg.latency_ms,
              "ssrc": None if self.ssrc is None else f"{self.ssrc:08x}",
              **self.counts, "received": self.jb.counts["ok"],
              "late": self.jb.counts["late"], "duplicate": self.jb.counts["duplicate"],
              "early": self.jb.counts["early"], "lost": self.lost_packets,
              "concealed_frames": self.jb.missing_frames,
              "jitter_us": round(self.jitter * 1e6 / rate, 1), "last_error": self.last_error,
              "rt_problems": list(self.rt_problems)}
        if k:
            m = self.margins[:k] * 1e3 / rate
            st["arrival_margin_ms"] = {"min": round(float(m.min()), 3),
                                       "p50": round(float(np.percentile(m, 50)), 3)}
        return st
