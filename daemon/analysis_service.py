"""The analysis service (`echoel analyzer`): what the studio plays, measured live.

It reads the engine's `analysis` tap (a shared-memory ring of audio blocks; the engine never
waits for it), and runs, in its own process, the loudness meter (momentary, short-term,
integrated, LRA, true peak), the tuner (pYIN on the mono mix), key and chords (chroma with
tuning, fixed-lag HMM). Four times a second it publishes `status.analysis` on its bus socket
(`bus-analysis.sock` in the run folder): the live view and the fleet agent pick it up.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import numpy as np
import zmq
from echoel.daemon import bus, shm_segment
from echoel.daemon import config as config_mod
from echoel.daemon.spsc_ring import Ring
from echoel.dsp.chord_recognition import ChordRecognizer
from echoel.dsp.chroma import ChromaConfig
from echoel.dsp.key_estimate import KeyTracker
from echoel.dsp.loudness import LoudnessMeter
from echoel.dsp.pitch_yin import PitchConfig, PitchTracker, note_name

log = logging.getLogger("echoel.analysis")
TAP = "analysis"
CHUNK_BLOCKS = 8  # blocks gathered before the kernels run (fewer Python calls)
PUBLISH_S = 0.25


def _db(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 2)


class AnalysisService:
    """Tap in, figures out; see the module docstring."""

    def __init__(self, cfg: config_mod.Config, tap: str = TAP) -> None:
        e = cfg["engine"]
        self.ch = config_mod.tap_channels(cfg, tap, "analysis", "output")
        self.instance = cfg["daemon"]["instance"]
        self.tap = tap
        self.rate, self.period = e["rate"], e["period"]
        self.path = shm_segment.segment_path(self.instance, "ring.tap." + tap)
        self.ring: Ring | None = None
        self.block = np.zeros(self.period * self.ch, np.float32)
        self.chunk = np.zeros((CHUNK_BLOCKS * self.period, self.ch), np.float32)
        self.mono = np.zeros(CHUNK_BLOCKS * self.period, np.float32)
        self.fill = 0
        self.loud = LoudnessMeter(self.ch, self.rate)
        self.pitch = PitchTracker(PitchConfig(rate=self.rate), max_block=self.mono.shape[0])
        self.chords = ChordRecognizer(ChromaConfig(rate=self.rate, channels=self.ch))
        self.key = KeyTracker(self.chords.chroma.config.hop_seconds)
        self.chord = "N"
        self.tuner: dict = {}
        self.blocks = 0
        self._overflows0 = 0
        rdir = bus.run_dir(cfg["daemon"]["run_dir"])
        self.pub = zmq.Context.instance().socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(f"ipc://{rdir}/bus-analysis.sock")
        self.stopping = False
        self._inode = None

    # ------------------------------------------------------------------ tap
    def _attach(self) -> bool:
        try:
            ino = Path(self.path).stat().st_ino
        except OSError:
            self.ring = None
            return False
        if self.ring is None or ino != self._inode:
            self.ring = Ring.attach(self.path)
            self._inode = ino
            self.ring.skip_to_latest()
            self._overflows0 = self.ring.overflows
            log.info("analysis: attached to tap %r (%d ch at %d Hz)", self.tap, self.ch,
                     self.rate)
        return True

    def _drain(self) -> int:
        n = 0
        while self.ring is not None:
            if self.ring.pop(self.block) is None:
                break
            i = self.fill * self.period
            self.chunk[i:i + self.period] = self.block.reshape(self.period, self.ch)
            self.fill += 1
            self.blocks += 1
            n += 1
            if self.fill == CHUNK_BLOCKS:
                self._analyse()
                self.fill = 0
        return n

    # ------------------------------------------------------------------ kernels
    def _analyse(self) -> None:
        x = self.chunk
        self.loud.process(x)
        np.mean(x, axis=1, out=self.mono)
        n = self.pitch.process(self.mono)
        if n:
            i = n - 1
            if self.pitch.voiced[i]:
                midi = int(self.pitch.midi[i])
                self.tuner = {"f0_hz": round(float(self.pitch.f0[i]), 2),
                              "note": note_name(midi), "cents": round(float(
                                  self.pitch.cents[i]), 1)}
            else:
                self.tuner = {"f0_hz": None, "note": None, "cents": None}
        k = self.chords.process(x)
        if self.chords.new_frames:
            self.key.push(self.chords.chroma.chroma, self.chords.new_frames)
        if k:
            self.chord = self.chords.label(int(self.chords.states[k - 1]))

    def status(self) -> dict:
        """The figures as published."""
        lr = self.loud.result()
        return {
            "tap": self.tap, "blocks": self.blocks,
            # blocks the engine could not hand over because this service was behind
            "dropped_blocks": (self.ring.overflows - self._overflows0
                               if self.ring is not None else 0),
            "loudness": {"momentary": _db(lr.momentary), "short_term": _db(lr.short_term),
                         "integrated": _db(lr.integrated), "lra": _db(lr.lra),
                         "true_peak_dbtp": _db(lr.true_peak_max_dbtp),
                         "bad_blocks": lr.bad_blocks},
            "tuner": self.tuner,
            "key": {"key": self.key.key, "confidence": round(self.key.confidence, 3)},
            "chord": self.chord,
            "chord_lag_s": round(self.chords.lag_seconds, 2),
        }

    # ------------------------------------------------------------------ loop
    def warm(self) -> None:
        """Compile the kernels now, not on the first block."""
        z = np.zeros((self.chunk.shape[0], self.ch), np.float32)
        self.loud.process(z)
        self.pitch.process(self.mono)
        self.chords.process(z)
        self.loud.reset()
        self.pitch.reset()
        self.chords.reset()

    def run(self, duration: float | None = None) -> int:
        """Run until SIGTERM/SIGINT or `duration` seconds."""
        signal.signal(signal.SIGTERM, lambda *a: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, lambda *a: setattr(self, "stopping", True))
        self.warm()
        end = None if duration is None else time.monotonic() + duration
        next_pub = next_attach = 0.0
        while not self.stopping and (end is None or time.monotonic() < end):
            now = time.monotonic()
            if now >= next_attach:
                next_attach = now + 1.0
                self._attach()
            if not self._drain():
                time.sleep(0.005)
            if now >= next_pub:
                next_pub = now + PUBLISH_S
                self.pub.send_multipart([b"status.analysis",
                                         json.dumps(self.status()).encode()])
        self.pub.close()
        return 0
