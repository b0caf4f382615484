"""The `bio` service (`echoel bio run`): the performers' heart-rate sensors, live.

It keeps every configured BLE heart-rate sensor connected (drivers/ble_heart_rate.py; one per
performer, by address or name) or, with `simulated = true`, runs clearly labelled simulated
sensors instead. On its bus socket (`bus-bio.sock` in the run folder) it publishes
`status.bio` a few times a second (per sensor: state, bpm, last RR, battery, location,
counters), `event.bio` (connected, lost, gap, malformed) and `beat.bio` (every Beat, for
`echoel bio watch`). Every Beat is also handed to `on_beat` (the HRV and sound-mapping code plugs
in there); it runs in the service's event loop, so it must return quickly. Further seams:
`on_state(sensor, "connected" | "lost")`, `tick()` called every `tick_interval_s` on a thread of
its own (it may block), and `extra_status()` whose dict goes into status.bio as "modulation".

The [bio] table is shared with daemon/bio_modulation.py (its keys and [[bio.mappings]]):
`check_bio` accepts their keys too and `bio_modulation_table` hands them theirs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import zmq
from echoel.daemon import bus
from echoel.daemon import config as config_mod
from echoel.daemon.config import ConfigError, Key
from echoel.drivers.ble_heart_rate import HeartRateSensor, ReconnectPolicy, SensorOptions
from echoel.drivers.ble_scan import DeviceFinder, is_address
from echoel.drivers.heart_rate_packet import Beat
from echoel.drivers.simulated_heart_rate import (
    SIMULATED_PREFIX,
    RRGenerator,
    SimulatedHeartRateSensor,
)

log = logging.getLogger("echoel.bio")
SECTION = "bio"

KEYS: dict[str, Key] = {
    "enabled": Key(bool, False, "run the bio service (heart-rate sensors) with the box"),
    "sensors": Key(str, "", "heart-rate sensors to connect, comma-separated: Bluetooth "
                   "addresses (AA:BB:CC:DD:EE:FF) or advertised names (see `echoel bio scan`)"),
    "labels": Key(str, "", "performer names for the sensors, comma-separated, in the same "
                  "order; empty: the sensor's address or name"),
    "scan_timeout_s": Key(float, 10.0, "one search for a sensor lasts this long", 1.0, 120.0),
    "connect_timeout_s": Key(float, 20.0, "connect and resolve the sensor's services within "
                             "this long", 5.0, 120.0),
    "reconnect_min_s": Key(float, 0.5, "first wait before trying a lost sensor again", 0.1,
                           60.0),
    "reconnect_max_s": Key(float, 30.0, "longest wait between attempts (exponential backoff "
                           "with jitter)", 1.0, 600.0),
    "dup_window_s": Key(float, 0.1, "identical notifications closer than this are one "
                        "delivered twice (dropped and counted)", 0.01, 1.0),
    "max_uncovered_s": Key(float, 3.0, "silence between notifications not explained by their "
                           "RR intervals marks a gap", 1.0, 60.0),
    "simulated": Key(bool, False, "run simulated sensors (labelled SIMULATED) instead of "
                     "Bluetooth ones"),
    "simulated_count": Key(int, 1, "how many simulated sensors", 1, 8),
    "simulated_bpm": Key(float, 68.0, "mean heart rate of the first simulated sensor (the "
                         "others a few bpm higher)", 30.0, 200.0),
    "status_interval_ms": Key(int, 250, "how often status.bio is published", 50, 10000),
}
MAX_SENSORS = 8


def check_bio(raw: dict, where: str = "<config>") -> dict:
    """Validate a raw [bio] table: defaults filled in, sensors and labels consistent."""
    foreign = modulation_keys()
    ours = {k: v for k, v in raw.items() if k != "mappings"} if isinstance(raw, dict) else raw
    bio = config_mod.check_table(where, SECTION, ours, {SECTION: {**KEYS, **foreign}})
    bio = {k: v for k, v in bio.items() if k in KEYS}
    targets = sensor_targets(bio)
    labels = [x.strip() for x in bio["labels"].split(",")] if bio["labels"].strip() else []
    if len(targets) > MAX_SENSORS:
        raise ConfigError(f"{where} [bio]: sensors = {bio['sensors']!r}: {len(targets)} "
                          f"sensors; allowed: at most {MAX_SENSORS}")
    if len(set(t.upper() if is_address(t) else t.casefold() for t in targets)) != len(targets):
        raise ConfigError(f"{where} [bio]: sensors = {bio['sensors']!r}: a sensor is named "
                          "twice; allowed: each address or name once")
    if labels and len(labels) != len(targets):
        raise ConfigError(f"{where} [bio]: labels = {bio['labels']!r}: {len(labels)} labels "
                          f"for {len(targets)} sensors; allowed: one label per sensor, or none")
    if labels and (any(not x for x in labels) or len(set(labels)) != len(labels)):
        raise ConfigError(f"{where} [bio]: labels = {bio['labels']!r}: allowed: distinct, "
                          "non-empty names")
    if bio["reconnect_min_s"] > bio["reconnect_max_s"]:
        raise ConfigError(f"{where} [bio]: reconnect_min_s = {bio['reconnect_min_s']:g} is above "
                          f"reconnect_max_s = {bio['reconnect_max_s']:g}; allowed: min <= max")
    return bio


def modulation_keys() -> dict[str, Key]:
    """The [bio] keys daemon/bio_modulation.py owns (none if that module is absent)."""
    try:
        from echoel.daemon.bio_modulation import KEYS as MODULATION_KEYS
    except ImportError:
        return {}
    return dict(MODULATION_KEYS)


def bio_modulation_table(raw: dict) -> dict:
    """The part of a raw [bio] table daemon/bio_modulation.from_config reads (its keys and
    [[bio.mappings]])."""
    foreign = modulation_keys()
    return {k: v for k, v in raw.items() if k in foreign or k == "mappings"}


def sensor_targets(bio: dict) -> list[str]:
    """The configured sensors (addresses or names), in order."""
    return [t.strip() for t in bio["sensors"].split(",") if t.strip()]


@dataclass(frozen=True)
class BioFile:
    """What `echoel bio` reads from a box config file."""

    bio: dict  # [bio], validated (with bio_modulation's keys and [[bio.mappings]])
    cfg: config_mod.Config  # the rest of the file, validated
    rdir: Path  # the run folder (bus sockets)
    source: str


def load_bio_file(path: str | Path | None) -> BioFile:
    """The [bio] settings and the box config from a file (None: the defaults)."""
    cfg = config_mod.load(path) if path is not None else config_mod.defaults()
    bio = cfg[SECTION]
    return BioFile(bio, cfg, bus.run_dir(cfg["daemon"]["run_dir"]), cfg.source)


def sensor_options(bio: dict) -> SensorOptions:
    """The sensor clients' timing from [bio]."""
    return SensorOptions(scan_timeout_s=bio["scan_timeout_s"],
                         connect_timeout_s=bio["connect_timeout_s"],
                         dup_window_s=bio["dup_window_s"],
                         max_uncovered_s=bio["max_uncovered_s"],
                         policy=ReconnectPolicy(bio["reconnect_min_s"], bio["reconnect_max_s"]))


class BioService:
    """The sensor clients, the bus socket (rdir None: none) and the on_beat seam; see the
    module docstring."""

    def __init__(self, bio: dict, rdir: Path | None,
                 on_beat: Callable[[Beat], None] | None = None,
                 on_event: Callable[[str, dict], None] | None = None, *,
                 on_state: Callable[[str, str], None] | None = None,
                 tick: Callable[[], object] | None = None, tick_interval_s: float = 0.02,
                 extra_status: Callable[[], dict] | None = None) -> None:
        self.bio = bio
        self.on_beat = on_beat
        self.on_event = on_event
        self.on_state = on_state
        self.tick = tick
        self.tick_interval_s = tick_interval_s
        self.extra_status = extra_status
        self.tick_errors = 0
        self.beats = 0
        self.events = 0
        self.consumer_errors = 0
        self.started = time.monotonic()
        self.finder = DeviceFinder()
        self.sensors: list[HeartRateSensor | SimulatedHeartRateSensor] = []
        if bio["simulated"]:
            for i in range(bio["simulated_count"]):
                gen = RRGenerator(bpm=bio["simulated_bpm"] + 7 * i, seed=i)
                self.sensors.append(SimulatedHeartRateSensor(
                    self._beat, self._event, label=f"{SIMULATED_PREFIX} {i + 1}",
                    generator=gen))
        else:
            targets = sensor_targets(bio)
            labels = [x.strip() for x in bio["labels"].split(",")] if bio["labels"].strip() \
                else targets
            opts = sensor_options(bio)
            for target, label in zip(targets, labels, strict=True):
                self.sensors.append(HeartRateSensor(target, self._beat, self._event,
                                                    label=label, options=opts,
                                                    finder=self.finder))
        self.pub: zmq.Socket | None = None
        if rdir is not None:
            self.endpoint = f"ipc://{rdir}/bus-bio.sock"
            self.pub = zmq.Context.instance().socket(zmq.PUB)
            self.pub.setsockopt(zmq.LINGER, 0)
            self.pub.bind(self.endpoint)
        self._stopping: asyncio.Event | None = None

    # ------------------------------------------------------------------ seams
    def _send(self, topic: bytes, doc: dict) -> None:
        if self.pub is not None:
            self.pub.send_multipart([topic, json.dumps(doc).encode()])

    def _beat(self, beat: Beat) -> None:
        self.beats += 1
        self._send(b"beat.bio", asdict(beat))
        if self.on_beat is not None:
            try:
                self.on_beat(beat)
            except Exception:
                self.consumer_errors += 1
                log.exception("bio: on_beat failed (beat of %s)", beat.sensor)

    def _event(self, kind: str, doc: dict) -> None:
        self.events += 1
        log.info("bio: %s %s", kind, doc)
        self._send(b"event.bio", {"event": kind, "time": time.time(), **doc})
        for hook, args in ((self.on_event, (kind, doc)),
                           (self.on_state if kind in ("connected", "lost") else None,
                            (doc["sensor"], kind))):
            if hook is not None:
                try:
                    hook(*args)
                except Exception:
                    self.consumer_errors += 1
                    log.exception("bio: %s hook failed on %s", hook, kind)

    def status(self) -> dict:
        """status.bio as published (with the extra_status hook's figures as "modulation")."""
        doc = {"simulated": self.bio["simulated"], "beats": self.beats,
               "consumer_errors": self.consumer_errors, "tick_errors": self.tick_errors,
               "uptime_s": round(time.monotonic() - self.started, 1),
               "scan_errors": self.finder.scan_errors,
               "sensors": [s.status() for s in self.sensors]}
        if self.extra_status is not None:
            try:
                doc["modulation"] = self.extra_status()
            except Exception:
                self.consumer_errors += 1
                log.exception("bio: extra_status hook failed")
        return doc

    def _tick_loop(self, stop: threading.Event) -> None:
        """The tick hook, on its own thread (it may block, e.g. asking the supervisor)."""
        assert self.tick is not None
        while not stop.wait(self.tick_interval_s):
            try:
                self.tick()
            except Exception:
                self.tick_errors += 1
                if self.tick_errors <= 3:
                    log.exception("bio: tick hook failed")

    # ------------------------------------------------------------------ loop
    def stop(self) -> None:
        """Ask a running service to stop (thread-unsafe; from its loop or a signal handler)."""
        if self._stopping is not None:
            self._stopping.set()

    async def run_async(self, duration: float | None = None) -> None:
        """Run the sensors and publish status until stop() or `duration` seconds."""
        self._stopping = asyncio.Event()
        tasks = [asyncio.create_task(s.run()) for s in self.sensors]
        tick_stop = threading.Event()
        ticker = None
        if self.tick is not None:
            ticker = threading.Thread(target=self._tick_loop, args=(tick_stop,),
                                      name="bio-tick", daemon=True)
            ticker.start()
        interval = self.bio["status_interval_ms"] / 1000.0
        end = None if duration is None else time.monotonic() + duration
        try:
            while not self._stopping.is_set():
                self._send(b"status.bio", self.status())
                wait = interval if end is None else min(interval, end - time.monotonic())
                if wait <= 0:
                    break
                try:
                    await asyncio.wait_for(self._stopping.wait(), wait)
                except TimeoutError:
                    pass
        finally:
            tick_stop.set()
            if ticker is not None:
                await asyncio.to_thread(ticker.join, 10.0)
            for s in self.sensors:
                s.stop()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30.0)
            await self.finder.close()
            self._send(b"status.bio", self.status())

    def run(self, duration: float | None = None) -> int:
        """Run in the foreground until SIGTERM/SIGINT or `duration` seconds."""
        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            await self.run_async(duration)

        try:
            asyncio.run(main())
        finally:
            self.close()
        return 0

    def close(self) -> None:
        """Close the bus socket."""
        if self.pub is not None:
            self.pub.close()
            self.pub = None


def bio_lines(s: dict | None) -> list[str]:
    """The live view's lines for status.bio (one per sensor)."""
    if not s:
        return ["  heart    bio service starting"]
    if not s["sensors"]:
        return ["  heart    no sensors configured ([bio] sensors, or simulated = true)"]
    out = []
    for x in s["sensors"]:
        c = x["counters"]
        bpm = f"{x['bpm']} bpm" if x["bpm"] is not None and x["state"] == "connected" else "-"
        rr = f"RR {x['last_rr_ms']:.0f} ms" if x["last_rr_ms"] is not None else "RR -"
        extra = [f"battery {x['battery_pct']}%"] if x.get("battery_pct") is not None else []
        if c["gaps"] or c["malformed"] or c["duplicates_dropped"]:
            extra.append(f"gaps {c['gaps']}, malformed {c['malformed']}, duplicates "
                         f"{c['duplicates_dropped']}")
        if x["state"] != "connected" and x.get("last_error"):
            extra.append(x["last_error"])
        out.append(f"  heart    {x['sensor']}: {x['state']}  {bpm}  {rr}"
                   + (f"  ({'; '.join(extra)})" if extra else ""))
    mod = s.get("modulation") or {}
    for name, h in (mod.get("sensors") or {}).items():
        def f(key: str, fmt: str, h=h) -> str:
            return "-" if h.get(key) is None else format(h[key], fmt)
        out.append(f"  hrv      {name}: RMSSD {f('rmssd_ms', '.0f')} ms  SDNN "
                   f"{f('sdnn_ms', '.0f')} ms  pNN50 {f('pnn50', '.0f')} %  LF/HF "
                   f"{f('lf_hf', '.2f')}  coherence {f('coherence', '.2f')}  (artifacts "
                   f"corrected {h.get('artifacts_corrected', 0)})")
    for m in mod.get("mappings", []):
        out.append(f"  sound    {m['source']} -> {m['target']} = {m['value']:.2f} "
                   f"(presence {100 * m['presence']:.0f} %)")
    return out
