"""The engine's shared memory: status block, control words and rings, by instance name.

The supervisor creates every segment before it starts the engine process, so consumers and a
restarted engine find them in place. The real-time thread writes the status block (single
8-byte-aligned int64 stores, each atomic) and reads the control words.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np
from echoel.daemon import shm_segment
from echoel.daemon.spsc_ring import Ring

HIST_BINS = 20001  # 1 us bins up to 20 ms; the last bin holds everything above
TEXT_BYTES = 4096
N_FIELDS = 64
N_CONTROL = 16
MAX_CHANNELS = 32


class F(IntEnum):
    """Status fields (int64)."""

    STATE = 0
    RATE = 1
    PERIOD = 2
    PERIODS = 3
    PREFILL = 4
    CH_IN = 5
    CH_OUT = 6
    BLOCKS = 7
    XRUN_CAPTURE = 8
    XRUN_PLAYBACK = 9
    LAST_XRUN_NS = 10
    HEARTBEAT_NS = 11  # monotonic time of the last completed block
    STARTED_NS = 12
    DSP_NS_SUM = 13
    DSP_NS_MAX = 14
    R2W_NS_MAX = 15
    JITTER_NS_MAX = 16
    PREV_WAKE_NS = 17
    OPENS = 18
    LOSSES = 19
    PARAMS_APPLIED = 20
    PARAMS_REJECTED = 21
    TAP_OVERFLOWS = 22
    RECOVERIES = 23
    TEXT_VERSION = 24
    ENGINE_PID = 25
    GUARANTEES = 26  # bit set of Guarantee
    LIMITER_GR_MDB = 27  # limiter gain reduction, millidecibels
    FLOW_STARTED_NS = 28  # first block after the latest (re)start
    POLL_TIMEOUTS = 29
    XRUN_EVENTS_DROPPED = 30
    MAIN_HEARTBEAT_NS = 31  # the engine's main thread is alive (also while searching)
    FORMAT_CODE = 32
    LATENCY_FRAMES = 33  # measured: playback queue + capture backlog when a block is written
    PROBE_FRAMES = 35  # last round trip measured by the loopback probe; -1: not returned
    PROBE_DONE_SEQ = 36  # the probe request this result answers
    RETURN_BLOCKS = 37  # blocks of network audio (returns) mixed into the input
    RETURN_EMPTY = 38  # blocks a return had nothing for (stream not there, late, lost)


class State(IntEnum):
    """Engine states, as in the STATE field."""

    STOPPED = 0
    SEARCHING = 1  # no interface present: waiting for one
    STARTING = 2
    RUNNING = 3
    RECOVERING = 4
    FAILED = 5


class Guarantee(IntEnum):
    """Real-time guarantees the engine obtained (bits in GUARANTEES)."""

    SCHED_FIFO = 1
    AFFINITY = 2
    MLOCK = 4
    GC_FROZEN = 8


class C(IntEnum):
    """Control words (supervisor -> engine)."""

    STOP = 0
    STALL_SEQ = 2  # diagnostic: bumped by the supervisor to stall the audio thread once
    STALL_MS = 3
    PROBE_SEQ = 4  # diagnostic: bumped to measure round-trip latency through a loopback


class H(IntEnum):
    """Histograms."""

    DSP = 0
    READ_TO_WRITE = 1
    WAKE_JITTER = 2


EXIT_DEVICE_LOST = 75  # engine process exit code: interface lost; restart at once, no backoff

# event records (int64 x 4): kind, direction, monotonic ns, blocks
EV_XRUN, EV_DEVICE_LOST, EV_DEVICE_OPENED = 1, 2, 3
DIR_CAPTURE, DIR_PLAYBACK, DIR_BOTH = 1, 2, 3


RETURN_SLOTS = 64


def return_ring(stream: str) -> str:
    """The ring (key in EngineShared.rings) through which a received stream reaches the
    engine's input: blocks of period x channels_in float32, written by the streams service."""
    return "stream." + stream.replace(" ", "_")


@dataclass
class RingSizes:
    """Shapes of the rings an engine needs (from the config)."""

    period: int
    ch_in: int
    ch_out: int
    taps: dict[str, tuple[str, int]]  # name -> (source "input"/"output", slots)
    returns: tuple[str, ...] = ()  # received streams mixed into the input (names)


class EngineShared:
    """Mapped views of one instance's segments."""

    def __init__(self, instance: str, bufs: dict[str, mmap.mmap], rings: dict[str, Ring]):
        self.instance = instance
        self._bufs = bufs
        st = bufs["status"]
        self.fields = np.frombuffer(st, np.int64, N_FIELDS)
        self.hist = np.frombuffer(st, np.int64, 3 * HIST_BINS, N_FIELDS * 8).reshape(3, HIST_BINS)
        self._text = np.frombuffer(st, np.uint8, TEXT_BYTES, N_FIELDS * 8 + 3 * HIST_BINS * 8)
        self.control = np.frombuffer(bufs["control"], np.int64, N_CONTROL)
        self.rings = rings

    @staticmethod
    def _status_size() -> int:
        return N_FIELDS * 8 + 3 * HIST_BINS * 8 + TEXT_BYTES

    @classmethod
    def create(cls, instance: str, sizes: RingSizes) -> EngineShared:
        """Make every segment of an instance (the supervisor does this once)."""
        p = lambda n: shm_segment.segment_path(instance, n)  # noqa: E731
        bufs = {
            "status": shm_segment.create(p("status"), cls._status_size()),
            "control": shm_segment.create(p("control"), N_CONTROL * 8),
        }
        rings = {
            "params": Ring.create(p("ring.params"), 256, 2, np.float64),
            "events": Ring.create(p("ring.events"), 256, 4, np.int64),
            "meters": Ring.create(p("ring.meters"), 64, 4 * MAX_CHANNELS, np.float32),
        }
        for name, (source, slots) in sizes.taps.items():
            ch = sizes.ch_in if source == "input" else sizes.ch_out
            rings["tap." + name] = Ring.create(p("ring.tap." + name), slots,
                                               sizes.period * ch, np.float32)
        for stream in sizes.returns:
            key = return_ring(stream)
            rings[key] = Ring.create(p("ring." + key), RETURN_SLOTS, sizes.period * sizes.ch_in,
                                     np.float32)
        (shm_segment.SHM_DIR / f"echoel.{instance}.index").write_text(json.dumps(
            {"rings": sorted(rings), "taps": {k: v[0] for k, v in sizes.taps.items()},
             "returns": [return_ring(s) for s in sizes.returns]}))
        return cls(instance, bufs, rings)

    @classmethod
    def attach(cls, instance: str) -> EngineShared:
        """Map an instance's segments made by its supervisor."""
        index_path = shm_segment.SHM_DIR / f"echoel.{instance}.index"
        try:
            index = json.loads(index_path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no running engine instance {instance!r} ({index_path} missing): start it "
                f"with `echoel run` or `make run`") from None
        p = lambda n: shm_segment.segment_path(instance, n)  # noqa: E731
        bufs = {n: shm_segment.attach(p(n)) for n in ("status", "control")}
        rings = {n: Ring.attach(p("ring." + n)) for n in index["rings"]}
        return cls(instance, bufs, rings)

    @staticmethod
    def remove(instance: str) -> None:
        """Unlink every segment of an instance."""
        for path in shm_segment.SHM_DIR.glob(f"echoel.{instance}.*"):
            shm_segment.remove(path)

    def write_text(self, info: dict) -> None:
        """Publish the engine's descriptive state (device, missing guarantees...) as JSON."""
        raw = json.dumps(info).encode()[: TEXT_BYTES - 1]
        self._text[:] = 0
        self._text[: len(raw)] = np.frombuffer(raw, np.uint8)
        self.fields[F.TEXT_VERSION] += 1

    def read_text(self) -> dict:
        """The latest descriptive state ({} before the engine wrote any)."""
        for _ in range(10):
            v1 = int(self.fields[F.TEXT_VERSION])
            raw = self._text.tobytes().split(b"\0", 1)[0]
            if v1 == int(self.fields[F.TEXT_VERSION]):
                try:
                    return json.loads(raw) if raw else {}
                except ValueError:
                    continue
        return {}

    def tap_path(self, name: str) -> Path:
        """The file of a tap ring, for consumers that attach to it alone."""
        return shm_segment.segment_path(self.instance, "ring.tap." + name)
