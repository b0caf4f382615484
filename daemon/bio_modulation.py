"""Bio-reactive modulation: heart beats in, live engine parameters out.

`BioModulation` takes each sensor's beats (`on_beat(beat)`, a drivers.heart_rate_packet.Beat)
and link changes (`on_sensor_state(sensor, "connected" | "lost")`). Per sensor it corrects
artifacts (dsp/hrv_artifacts.py, Lipponen & Tarvainen 2019) and keeps rolling-window HRV
(dsp/hrv.py), updated on every beat. `tick()` (called by the bio service's loop, e.g. every
10-50 ms) steps the mappings (dsp/bio_mapping.py: curves, smoothing, presence glides) and sends
the values that moved to the supervisor as {"cmd": "modulate", "values": {...}} on
control.sock, at most `rate_hz` times a second; the engine then glides each change over
chain.smoothing_ms. A beat with gap_before restarts that sensor's series (the windows never
bridge a gap); a lost sensor's mappings (or a connected one silent for `stale_s`) glide back
to neutral and glide in again when its figures return. It also hands its figures (per sensor
HR, RMSSD, SDNN, pNN50, LF, HF, LF/HF, coherence, artifacts corrected) to `publish` (the bio
service puts them on the bus as status.bio) `publish_hz` times a second.

Thread-safe: beats may arrive on the BLE thread while `tick` runs on another.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from echoel.daemon import bus
from echoel.daemon import config as config_mod
from echoel.daemon.config import ConfigError, Key
from echoel.dsp.bio_mapping import Mapping, MappingBank, parse_mappings
from echoel.dsp.hrv import RESULT_NAMES, HrvConfig, HrvWindow
from echoel.dsp.hrv_artifacts import ArtifactConfig, ArtifactCorrector

log = logging.getLogger("echoel.bio")
CONNECTED, LOST = "connected", "lost"
PUBLISHED = ("hr_bpm", "rmssd_ms", "sdnn_ms", "pnn50", "lf_ms2", "hf_ms2", "lf_hf",
             "coherence", "coherence_norm", "hr_trend", "mean_nn_ms", "beats", "span_s")
SEND_TIMEOUT_S = 1.0
SECTION = "bio"
# [bio]; its [[bio.mappings]] keys are dsp/bio_mapping.py KEYS
KEYS: dict[str, Key] = {
    "window_s": Key(float, 60.0, "HRV window (s; 300 for standard short-term LF)", 10.0,
                    600.0),
    "min_span_s": Key(float, 30.0, "span the window needs before LF, HF, LF/HF and coherence "
                      "are computed (s)", 5.0, 600.0),
    "artifact_lag": Key(int, 5, "beats an interval is held back for artifact correction",
                        3, 20),
    "rate_hz": Key(float, 20.0, "most modulate commands per second", 0.5, 100.0),
    "publish_hz": Key(float, 4.0, "status.bio publications per second", 0.1, 50.0),
    "stale_s": Key(float, 5.0, "a connected sensor silent this long counts as absent: its "
                   "mappings glide back to neutral", 1.0, 120.0),
}


class BeatLike(Protocol):
    """What on_beat reads of a drivers.heart_rate_packet.Beat."""

    sensor: str
    t_ns: int
    bpm: int
    rr_ms: list[float]
    contact: bool | None
    gap_before: bool


class SensorTrack:
    """One sensor's series: artifact correction, HRV window, counters."""

    def __init__(self, name: str, hrv: HrvConfig, art: ArtifactConfig) -> None:
        self.name = name
        self.state = CONNECTED
        self.corrector = ArtifactCorrector(art)
        self.hrv = HrvWindow(hrv)
        self.figures: dict[str, float] = dict.fromkeys(RESULT_NAMES, math.nan)
        self.beats = 0  # records received
        self.intervals = 0  # RR intervals received
        self.gaps = 0  # restarts: gap_before, or an interval refused
        self.no_contact = 0  # records ignored: the sensor reported no skin contact
        self.last_bpm: int | None = None
        self.last_seen = -math.inf  # service clock at the last record

    def restart(self) -> None:
        """Start a new series (a gap)."""
        self.corrector.reset()
        self.hrv.reset()
        self.figures = dict.fromkeys(RESULT_NAMES, math.nan)

    def add(self, beat: BeatLike) -> None:
        """Feed one record; figures are recomputed once for all its intervals."""
        self.beats += 1
        self.last_bpm = beat.bpm
        if beat.gap_before:
            self.gaps += 1
            self.restart()
        if beat.contact is False:
            self.no_contact += 1
            return
        released = False
        for rr in beat.rr_ms:
            self.intervals += 1
            m = self.corrector.push(float(rr))
            if m < 0:  # refused interval: treat as a gap
                self.gaps += 1
                self.hrv.reset()
                continue
            for v in self.corrector.out[:m]:
                self.hrv.push(float(v))
            released = released or m > 0
        if released:
            res = self.hrv.update()
            self.figures = dict(zip(RESULT_NAMES, (float(v) for v in res), strict=True))

    def value(self, source: str) -> float:
        """A source figure (NaN when not computable). hr_bpm falls back on the sensor's own
        bpm while the HRV window has none (a sensor that sends no RR intervals)."""
        v = self.figures.get(source, math.nan)
        if source == "hr_bpm" and not math.isfinite(v) and self.last_bpm:
            return float(self.last_bpm)
        return v

    def status(self) -> dict[str, Any]:
        """Published figures of this sensor."""
        def num(v: float) -> float | None:
            return round(v, 4) if math.isfinite(v) else None

        out: dict[str, Any] = {"state": self.state, "bpm": self.last_bpm}
        out.update({k: num(self.figures[k]) for k in PUBLISHED})
        out.update({"records": self.beats, "intervals": self.intervals, "gaps": self.gaps,
                    "no_contact": self.no_contact,
                    "artifacts_corrected": self.corrector.corrected,
                    "artifacts": {k: v for k, v in self.corrector.counts.items()
                                  if k != "normal"},
                    "invalid_intervals": self.corrector.invalid})
        return out


def supervisor_sender(run_dir: Path) -> Callable[[dict], dict]:
    """A `send` that asks the supervisor at run_dir/control.sock (daemon/bus.py request)."""
    def send(msg: dict) -> dict:
        return bus.request(run_dir, msg, timeout_s=SEND_TIMEOUT_S)
    return send


class BioModulation:
    """Beats and sensor states in; modulate commands and status out. See the module doc."""

    def __init__(self, mappings: list[Mapping], send: Callable[[dict], dict] | None = None,
                 publish: Callable[[dict], None] | None = None, *,
                 hrv: HrvConfig | None = None, artifacts: ArtifactConfig | None = None,
                 rate_hz: float = 20.0, publish_hz: float = 4.0, stale_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0.5 <= rate_hz <= 100.0:
            raise ValueError(f"bio modulation rate_hz = {rate_hz}: allowed 0.5 to 100 per s")
        if not 0.1 <= publish_hz <= 50.0:
            raise ValueError(f"bio publish_hz = {publish_hz}: allowed 0.1 to 50 per s")
        self.hrv_config = hrv or HrvConfig()
        self.hrv_config.check()
        self.art_config = artifacts or ArtifactConfig()
        self.art_config.check()
        self.bank = MappingBank(mappings)
        self.send = send
        self.publish = publish
        self.stale_s = stale_s
        self.min_interval = 1.0 / rate_hz
        self.publish_interval = 1.0 / publish_hz
        self.clock = clock
        self.sensors: dict[str, SensorTrack] = {}
        # smallest move worth sending: a thousandth of each mapping's output span
        self.deadband = [max(abs(m.out_hi - m.out_lo), abs(m.neutral - m.out_lo)) * 1e-3 + 1e-9
                         for m in self.bank.mappings]
        self.sent: list[float | None] = [None] * len(self.bank.mappings)
        self.messages = 0  # modulate commands sent
        self.send_errors = 0  # no answer, or refused by the supervisor
        self.last_error = ""
        self._lock = threading.Lock()
        self._last_step: float | None = None
        self._last_send = -math.inf
        self._last_publish = -math.inf

    # ------------------------------------------------------------------ inputs
    def on_beat(self, beat: BeatLike) -> None:
        """One record of a sensor: correct, update its HRV window."""
        with self._lock:
            track = self.sensors.get(beat.sensor)
            if track is None:
                track = self.sensors[beat.sensor] = SensorTrack(beat.sensor, self.hrv_config,
                                                                self.art_config)
            track.last_seen = self.clock()
            track.add(beat)

    def on_sensor_state(self, sensor: str, state: str) -> None:
        """A sensor's link changed: "connected" or "lost" (others are ignored)."""
        if state not in (CONNECTED, LOST):
            return
        with self._lock:
            track = self.sensors.get(sensor)
            if track is None:
                track = self.sensors[sensor] = SensorTrack(sensor, self.hrv_config,
                                                           self.art_config)
            if state == LOST and track.state != LOST:
                track.restart()  # what comes after the loss is a new series
                # and nothing from before it drives the sound again: a sensor back
                # within stale_s waits for its first new beat
                track.last_bpm, track.last_seen = None, -math.inf
            track.state = state

    # ------------------------------------------------------------------ mapping
    def _live(self, t: SensorTrack | None, now: float) -> bool:
        return t is not None and t.state == CONNECTED and now - t.last_seen <= self.stale_s

    def _source(self, m: Mapping, now: float) -> float:
        if m.sensor:
            t = self.sensors.get(m.sensor)
            return t.value(m.source) if self._live(t, now) else math.nan
        for t in self.sensors.values():
            if self._live(t, now):
                v = t.value(m.source)
                if math.isfinite(v):
                    return v
        return math.nan

    def step(self, now: float) -> list[float]:
        """Advance the mappings to `now`; returns the values to apply, one per mapping."""
        with self._lock:
            dt = 0.0 if self._last_step is None else now - self._last_step
            self._last_step = now
            for i, m in enumerate(self.bank.mappings):
                v = self._source(m, now)
                self.bank.inputs[i] = v
                self.bank.valid[i] = math.isfinite(v)
            return [float(v) for v in self.bank.step(dt)]

    def due(self, values: list[float]) -> dict[str, float]:
        """The values that moved past their deadband since last sent (all, the first time)."""
        out: dict[str, float] = {}
        for i, (m, v) in enumerate(zip(self.bank.mappings, values, strict=True)):
            last = self.sent[i]
            if last is None or abs(v - last) > self.deadband[i] or (
                    v == m.neutral and last != m.neutral):
                out[m.target] = v
        return out

    def tick(self, now: float | None = None) -> dict[str, float] | None:
        """Step, and send what moved if the rate allows; returns the values sent, if any."""
        now = self.clock() if now is None else now
        values = self.step(now)
        sent = None
        if self.send is not None and now - self._last_send >= self.min_interval:
            todo = self.due(values)
            if todo:
                self._last_send = now
                if self._send(todo):
                    sent = todo
                    for i, m in enumerate(self.bank.mappings):
                        if m.target in todo:
                            self.sent[i] = todo[m.target]
        if self.publish is not None and now - self._last_publish >= self.publish_interval:
            self._last_publish = now
            self.publish(self.status())
        return sent

    def _send(self, values: dict[str, float]) -> bool:
        self.messages += 1
        try:
            reply = self.send({"cmd": "modulate", "values": values})
        except Exception as exc:  # the bus may be down: count it and keep running
            self.send_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("bio: modulate not delivered: %s", self.last_error)
            return False
        if not isinstance(reply, dict) or not reply.get("ok"):
            self.send_errors += 1
            self.last_error = str(reply.get("error") if isinstance(reply, dict) else reply)
            log.warning("bio: modulate refused: %s", self.last_error)
            return False
        return True

    # ------------------------------------------------------------------ output
    def status(self) -> dict[str, Any]:
        """Figures per sensor and the mappings' current values (JSON-ready)."""
        with self._lock:
            return {
                "sensors": {n: t.status() for n, t in self.sensors.items()},
                "mappings": [{"target": m.target, "source": m.source,
                              "value": round(float(self.bank.out[i]), 5),
                              "presence": round(float(self.bank.presence[i]), 4)}
                             for i, m in enumerate(self.bank.mappings)],
                "modulate_sent": self.messages,
                "send_errors": self.send_errors,
                "last_error": self.last_error,
            }


def from_config(cfg: config_mod.Config, raw_bio: Any, where: str = "<config>",
                send: Callable[[dict], dict] | None = None,
                publish: Callable[[dict], None] | None = None) -> BioModulation:
    """A BioModulation from a raw [bio] table (with its [[bio.mappings]]), validated.

    send defaults to the supervisor at the config's run folder.
    """
    if not isinstance(raw_bio, dict):
        raise ConfigError(f"{where}: [bio] must be a table, got {raw_bio!r}")
    raw = {k: v for k, v in raw_bio.items() if k != "mappings"}
    t = config_mod.check_table(where, SECTION, raw, {SECTION: KEYS})
    if t["min_span_s"] > t["window_s"]:
        raise ConfigError(f"{where} [bio]: min_span_s = {t['min_span_s']:g}: allowed up to "
                          f"window_s ({t['window_s']:g} s)")
    mappings = parse_mappings(where, raw_bio.get("mappings", []), cfg)
    if send is None:
        send = supervisor_sender(bus.run_dir(cfg["daemon"]["run_dir"]))
    return BioModulation(mappings, send, publish,
                         hrv=HrvConfig(window_s=t["window_s"], min_span_s=t["min_span_s"]),
                         artifacts=ArtifactConfig(lag=t["artifact_lag"]),
                         rate_hz=t["rate_hz"], publish_hz=t["publish_hz"],
                         stale_s=t["stale_s"])
