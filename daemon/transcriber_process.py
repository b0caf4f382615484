"""`echoel transcriber`: live audio-to-MIDI on the engine's `notes` tap.

Reads the tap's blocks (mono mix, the engine's sample clock), runs the streaming
transcriber with the active basic-pitch model from the model store, and sends the notes to a
MIDI port (the ALSA sequencer on the box; JACK MIDI where a JACK server is the sound card), to
a Standard MIDI File when asked, and to the local bus (`bus-transcriber.sock`: topic
`event` for each note, `status.transcriber` twice a second).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import zmq
from echoel.daemon import bus, shm_segment
from echoel.daemon import config as config_mod
from echoel.daemon.midi_out import MidiOut, MidiPortError, SmfWriter
from echoel.daemon.spsc_ring import Ring
from echoel.daemon.transcriber_service import ServiceConfig, TranscriberService
from echoel.dsp.pitch_yin import note_name
from echoel.dsp.streaming_transcriber import StreamConfig

log = logging.getLogger("echoel.transcriber")
TAP = "notes"
class TapSource:
    """Blocks of a tap ring as (sample, mono float32), waiting while the ring is empty."""

    def __init__(self, instance: str, tap: str, period: int, channels: int, rate: int,
                 stop: threading.Event) -> None:
        self.path = shm_segment.segment_path(instance, "ring.tap." + tap)
        self.period, self.ch, self.rate = period, channels, rate
        self.stop = stop
        self.ring: Ring | None = None
        self.buf = np.zeros(period * channels, np.float32)
        self.next_sample: int | None = None
        self.t0_ns: int | None = None

    def _attach(self) -> None:
        while self.ring is None and not self.stop.is_set():
            try:
                self.ring = Ring.attach(self.path)
                self.ring.skip_to_latest()
            except OSError:
                self.stop.wait(1.0)

    def __call__(self) -> tuple[int, np.ndarray] | None:
        self._attach()
        while not self.stop.is_set():
            got = self.ring.pop(self.buf) if self.ring else None
            if got is None:
                time.sleep(0.005)
                continue
            _, t_ns = got
            if self.t0_ns is None:
                self.t0_ns = t_ns
            # the block's place on the engine's clock: the running count, unless the time
            # stamps say blocks were lost (then the service fills or restarts)
            clock = round((t_ns - self.t0_ns) * self.rate / 1e9)
            if self.next_sample is None or abs(clock - self.next_sample) > 2 * self.period:
                self.next_sample = clock
            sample = self.next_sample
            self.next_sample += self.period
            mono = self.buf.reshape(self.period, self.ch).mean(axis=1, dtype=np.float32)
            return sample, mono
        return None


class TranscriberProcess:
    """The service with its tap, MIDI port, MIDI file and bus."""

    def __init__(self, cfg: config_mod.Config, store: str, tap: str = TAP,
                 midi_api: str = "alsa", smf_path: str | None = None, threads: int = 1,
                 workers: int = 1) -> None:
        e = cfg["engine"]
        ch = config_mod.tap_channels(cfg, tap, "transcriber", "input")
        self.rate = e["rate"]
        self.stop_ev = threading.Event()
        self.source = TapSource(cfg["daemon"]["instance"], tap, e["period"], ch, self.rate,
                                self.stop_ev)
        rdir = bus.run_dir(cfg["daemon"]["run_dir"])
        self.pub = zmq.Context.instance().socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(f"ipc://{rdir}/bus-transcriber.sock")
        self.lock = threading.Lock()
        self.midi = None
        if midi_api != "none":
            try:
                self.midi = MidiOut("Echoel Box notes", api=midi_api)
            except MidiPortError as exc:
                log.warning("no MIDI port (%s); notes still go to the bus%s", exc,
                            " and the MIDI file" if smf_path else "")
        self.smf_path = smf_path
        self.smf = SmfWriter(self.rate) if smf_path else None
        self.recent: deque[dict] = deque(maxlen=8)
        self.sounding: set[int] = set()
        self.svc = TranscriberService.from_store(
            store, cfg=ServiceConfig(stream=StreamConfig(rate_in=self.rate), threads=threads,
                                     workers=workers), midi=self.midi,
            smf=self.smf, publish=self._publish)
        self.svc.keep_emitted = False

    def _publish(self, ev: dict) -> None:
        with self.lock:
            self.pub.send_multipart([b"event", json.dumps(ev).encode()])
            if ev["kind"] == "on":
                self.sounding.add(ev["pitch"])
                self.recent.append(ev)
            else:
                self.sounding.discard(ev["pitch"])

    def status(self) -> dict:
        """Counters and the notes sounding now."""
        st = self.svc.stats
        lat = list(self.svc.latency_ms)
        return {"notes": st.get("notes", 0), "windows": st.get("windows", 0),
                "dropped_windows": st.get("dropped_windows", 0),
                "sounding": [note_name(p) for p in sorted(self.sounding)],
                "recent": [note_name(e["pitch"]) for e in self.recent],
                "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if lat else None,
                "midi_port": self.midi.name if self.midi else None}

    def run(self, duration: float | None = None) -> int:
        """Transcribe until SIGTERM/SIGINT or `duration` seconds."""
        def stop(*_):
            self.stop_ev.set()
            self.svc.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        worker = threading.Thread(target=self.svc.run, args=(self.source,), daemon=True)
        worker.start()
        end = None if duration is None else time.monotonic() + duration
        while worker.is_alive() and (end is None or time.monotonic() < end):
            time.sleep(0.5)
            with self.lock:
                self.pub.send_multipart([b"status.transcriber",
                                         json.dumps(self.status()).encode()])
        stop()
        worker.join(10)
        if self.smf is not None and self.smf_path:
            self.smf.save(Path(self.smf_path))
            log.info("notes written to %s", self.smf_path)
        self.pub.close()
        return 0
