"""A SIMULATED heart-rate sensor: a plain Python source of Beats, no Bluetooth at all.

For `make run` on a machine without a strap (and for trying the HRV mapping): it behaves like
`HeartRateSensor` seen from the outside (run/stop/status/state/counters, one Beat about every
second with the RR intervals of the beats that ended since the last one) and says everywhere
that it is simulated: its label starts with "SIMULATED", its status has "simulated": true.

The RR series: a mean interval from `bpm`, respiratory sinus arrhythmia (a sine at the breathing
rate, `rsa_ms` deep), slow drift and beat-to-beat noise (`noise_ms`); seeded, so repeatable.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict

from echoel.drivers.ble_heart_rate import SensorCounters, SensorState
from echoel.drivers.heart_rate_packet import RR_UNITS_PER_S, Beat

SIMULATED_PREFIX = "SIMULATED"


class RRGenerator:
    """Successive RR intervals (ms), quantised to 1/1024 s as a strap sends them."""

    def __init__(self, bpm: float = 68.0, rsa_ms: float = 45.0, breath_hz: float = 0.2,
                 noise_ms: float = 12.0, seed: int = 0) -> None:
        if not 25.0 <= bpm <= 240.0:
            raise ValueError(f"simulated bpm = {bpm}: allowed 25 to 240")
        if rsa_ms < 0 or noise_ms < 0 or not 0.0 < breath_hz < 1.0:
            raise ValueError(f"simulated rsa_ms = {rsa_ms}, noise_ms = {noise_ms} (both >= 0), "
                             f"breath_hz = {breath_hz} (allowed between 0 and 1)")
        self.mean_ms = 60000.0 / bpm
        self.rsa_ms, self.breath_hz, self.noise_ms = rsa_ms, breath_hz, noise_ms
        self.rng = random.Random(seed)
        self.t_s = 0.0  # time of the last beat
        self._drift = 0.0

    def next_ms(self) -> float:
        """The next RR interval in ms."""
        self._drift = 0.995 * self._drift + self.rng.gauss(0.0, 3.0)
        rr = (self.mean_ms + self.rsa_ms * math.sin(2 * math.pi * self.breath_hz * self.t_s)
              + self._drift + self.rng.gauss(0.0, self.noise_ms))
        rr = min(2000.0, max(250.0, rr))
        q = round(rr * RR_UNITS_PER_S / 1000.0) * 1000.0 / RR_UNITS_PER_S
        self.t_s += q / 1000.0
        return q

    def series(self, n: int) -> list[float]:
        """`n` successive intervals (ms), e.g. for offline tests of the HRV maths."""
        return [self.next_ms() for _ in range(n)]


class SimulatedHeartRateSensor:
    """A labelled simulated sensor; see the module docstring."""

    simulated = True

    def __init__(self, on_beat: Callable[[Beat], None],
                 on_event: Callable[[str, dict], None] | None = None, *,
                 label: str = f"{SIMULATED_PREFIX} sensor", generator: RRGenerator | None = None,
                 notify_interval_s: float = 1.0,
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.label = label if label.startswith(SIMULATED_PREFIX) else \
            f"{SIMULATED_PREFIX} {label}"
        self.target = self.label
        self.on_beat, self.on_event = on_beat, on_event
        self.gen = generator or RRGenerator()
        self.notify_interval_s = notify_interval_s
        self.clock_ns = clock_ns
        self.state = SensorState.SEARCHING
        self.counters = SensorCounters()
        self.bpm: int | None = None
        self.last_rr_ms: float | None = None
        self._stop = asyncio.Event()
        self._next_beat_s = 0.0  # time (since start) the next beat ends

    def stop(self) -> None:
        """Ask `run()` to return."""
        self._stop.set()

    async def run(self) -> None:
        """Emit a Beat every `notify_interval_s` until `stop()`."""
        t0 = time.monotonic()
        self.state = SensorState.CONNECTED
        self.counters.connects += 1
        if self.on_event is not None:
            self.on_event("connected", {"sensor": self.label, "address": "", "simulated": True})
        pending_rr = self.gen.next_ms()
        try:
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), self.notify_interval_s)
                    break
                except TimeoutError:
                    pass
                now_s = time.monotonic() - t0
                rr: list[float] = []
                while self._next_beat_s + pending_rr / 1000.0 <= now_s:
                    self._next_beat_s += pending_rr / 1000.0
                    rr.append(pending_rr)
                    pending_rr = self.gen.next_ms()
                recent = rr[-1] if rr else pending_rr
                self.bpm = round(60000.0 / recent)
                self.last_rr_ms = round(rr[-1], 1) if rr else self.last_rr_ms
                self.counters.notifications += 1
                self.counters.beats += 1
                self.counters.rr_intervals += len(rr)
                self.on_beat(Beat(self.label, self.clock_ns(), self.bpm, rr, True, None, False))
        finally:
            self.state = SensorState.STOPPED

    def status(self) -> dict:
        """The same fields as HeartRateSensor.status(), marked simulated."""
        return {
            "sensor": self.label, "target": self.target, "state": str(self.state),
            "simulated": True, "address": "", "name": self.label, "rssi": None,
            "bpm": self.bpm, "last_rr_ms": self.last_rr_ms, "contact": True,
            "battery_pct": None, "location": None, "last_notification_age_s": None,
            "last_error": "", "next_attempt_s": None, "counters": asdict(self.counters),
        }
