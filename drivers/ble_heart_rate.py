"""One BLE heart-rate sensor (a chest strap, one per performer), kept connected through bleak.

`HeartRateSensor.run()` finds the sensor (by address or name, through a shared DeviceFinder),
connects, reads Body Sensor Location (0x2A38) and the battery level (0x2A19, or BlueZ's
Battery1 where bluetoothd's battery plugin took the service), subscribes to Heart Rate
Measurement (0x2A37) and hands every accepted notification to `on_beat` as a `Beat`. When the
link drops or a connect fails it tries again by itself, with exponential backoff and jitter.

RR intervals are never counted twice and never lost silently:
- each connection gets a fresh BleakClient and a generation number; a callback from an older
  subscription (bleak can keep one alive after a reconnect, bleak issue 2002) is dropped;
- a notification byte-identical to the previous one within `dup_window_s` (the same D-Bus
  signal delivered twice) is dropped;
- the first record after a reconnect, after a silence longer than the RR intervals explain,
  or after the sensor lost skin contact carries `gap_before=True`.
Malformed notifications are counted and dropped. States: searching (never connected yet),
connected, lost (was connected; trying again), stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from bleak import BleakClient
from bleak.backends.device import BLEDevice
from bleak.exc import BleakError
from echoel.drivers.ble_scan import DeviceFinder
from echoel.drivers.heart_rate_packet import (
    LOCATIONS,
    Beat,
    PacketError,
    parse_heart_rate,
)

log = logging.getLogger("echoel.ble")

HEART_RATE_MEASUREMENT = "00002a37-0000-1000-8000-00805f9b34fb"
BODY_SENSOR_LOCATION = "00002a38-0000-1000-8000-00805f9b34fb"
BATTERY_LEVEL = "00002a19-0000-1000-8000-00805f9b34fb"
READ_TIMEOUT_S = 5.0
BATTERY_POLL_S = 300.0
MALFORMED_EVENT_EVERY_S = 1.0  # at most one `malformed` event a second per sensor (all counted)

EventSink = Callable[[str, dict], None]


class SensorState(enum.StrEnum):
    """Where a sensor client is."""

    SEARCHING = "searching"
    CONNECTED = "connected"
    LOST = "lost"
    STOPPED = "stopped"


@dataclass
class SensorCounters:
    """What a sensor client has seen (since it started)."""

    notifications: int = 0  # every 0x2A37 callback, duplicates and malformed included
    beats: int = 0  # records handed on
    rr_intervals: int = 0  # RR intervals handed on
    malformed: int = 0
    duplicates_dropped: int = 0
    connects: int = 0
    reconnects: int = 0  # connections after a loss
    connect_failures: int = 0  # not found, refused, timed out, services not resolved
    drops: int = 0  # links lost while connected
    gaps: int = 0  # records marked gap_before
    consumer_errors: int = 0  # on_beat raised (logged; the sensor goes on)


@dataclass(frozen=True)
class ReconnectPolicy:
    """Exponential backoff with jitter between attempts: min_s * factor**n, at most max_s,
    each wait scaled by a random factor in [1 - jitter, 1 + jitter] (and never above max_s)."""

    min_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.min_s <= self.max_s:
            raise ValueError(f"reconnect min_s = {self.min_s}, max_s = {self.max_s}: need "
                             "0 < min_s <= max_s")
        if self.factor < 1 or not 0 <= self.jitter < 1:
            raise ValueError(f"reconnect factor = {self.factor} (allowed >= 1), jitter = "
                             f"{self.jitter} (allowed 0 to < 1)")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before attempt number `attempt` + 1 (attempt counts from 0)."""
        base = min(self.max_s, self.min_s * self.factor ** min(attempt, 60))
        return min(self.max_s, base * (1.0 + self.jitter * (2.0 * rng.random() - 1.0)))


@dataclass(frozen=True)
class SensorOptions:
    """Timing of one sensor client."""

    scan_timeout_s: float = 10.0  # one search for the device
    connect_timeout_s: float = 20.0  # connect + services resolved
    dup_window_s: float = 0.05  # identical notifications closer than this: one delivered twice
    max_uncovered_s: float = 3.0  # silence not explained by the RR intervals: a gap
    policy: ReconnectPolicy = ReconnectPolicy()


class HeartRateSensor:
    """A client for one configured sensor; see the module docstring."""

    def __init__(self, target: str, on_beat: Callable[[Beat], None],
                 on_event: EventSink | None = None, *, label: str | None = None,
                 options: SensorOptions | None = None, finder: DeviceFinder | None = None,
                 rng: random.Random | None = None,
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        if not target.strip():
            raise ValueError("sensor target is empty: give a Bluetooth address "
                             "(AA:BB:CC:DD:EE:FF) or the sensor's advertised name")
        self.target = target.strip()
        self.label = label or self.target
        self.on_beat = on_beat
        self.on_event = on_event
        self.options = options or SensorOptions()
        self.finder = finder or DeviceFinder()
        self.rng = rng or random.Random()
        self.clock_ns = clock_ns
        self.state = SensorState.SEARCHING
        self.counters = SensorCounters()
        self.address = ""
        self.name = ""
        self.rssi: int | None = None
        self.location: str | None = None
        self.battery_pct: int | None = None
        self.bpm: int | None = None
        self.last_rr_ms: float | None = None
        self.contact: bool | None = None
        self.last_error = ""
        self.next_attempt_s: float | None = None
        self._stop = asyncio.Event()
        self._live_gen = 0  # generation whose callbacks are accepted (0: none)
        self._gen = 0
        self._last_data = b""
        self._last_rx_ns: int | None = None
        self._gap_pending = ""  # reason the next record starts after a gap
        self._ever_connected = False
        self._last_malformed_event_ns: int | None = None
        self._malformed_unreported = 0

    # ------------------------------------------------------------------ public
    def stop(self) -> None:
        """Ask `run()` to disconnect and return."""
        self._stop.set()

    async def run(self) -> None:
        """Keep the sensor connected until `stop()`; never raises for BLE trouble."""
        attempt = 0
        try:
            while not self._stop.is_set():
                ok = await self._attempt()
                if self._stop.is_set():
                    break
                attempt = 0 if ok else attempt + 1
                delay = self.options.policy.delay(attempt if not ok else 0, self.rng)
                self.next_attempt_s = delay
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                self.next_attempt_s = None
        finally:
            self._live_gen = 0
            self.state = SensorState.STOPPED

    def status(self) -> dict:
        """The sensor's figures as published on the bus."""
        age = None
        if self._last_rx_ns is not None:
            age = round((self.clock_ns() - self._last_rx_ns) / 1e9, 2)
        return {
            "sensor": self.label, "target": self.target, "state": str(self.state),
            "address": self.address, "name": self.name, "rssi": self.rssi,
            "bpm": self.bpm, "last_rr_ms": self.last_rr_ms, "contact": self.contact,
            "battery_pct": self.battery_pct, "location": self.location,
            "last_notification_age_s": age, "last_error": self.last_error,
            "next_attempt_s": (round(self.next_attempt_s, 2)
                               if self.next_attempt_s is not None else None),
            "counters": asdict(self.counters),
        }

    # ------------------------------------------------------------------ one attempt
    async def _attempt(self) -> bool:
        """Find, connect, stream until the link drops. True if it got connected."""
        device = await self.finder.find(self.target, self.options.scan_timeout_s)
        if self._stop.is_set():
            return False
        if device is None:
            self._failed(f"not found within {self.options.scan_timeout_s:g} s of scanning")
            return False
        self.address, self.name = device.address, device.name or self.name
        self.rssi = self.finder.rssi.get(device.address.upper(), self.rssi)
        self._gen += 1
        gen = self._gen
        dropped = asyncio.Event()
        client = BleakClient(device, disconnected_callback=lambda _c: dropped.set(),
                             timeout=self.options.connect_timeout_s)
        connected = False
        try:
            await client.connect()
            await self._read_details(client, device)
            self._live_gen = gen
            await client.start_notify(HEART_RATE_MEASUREMENT,
                                      lambda _ch, data: self._on_notification(gen, data))
            connected = True
            self._on_connected()
            await self._stream(client, device, dropped)
        except Exception as exc:  # BLE trouble of any kind must not end the client
            if not connected:
                self._failed(f"{type(exc).__name__}: {exc}" if str(exc) else
                             type(exc).__name__)
            else:
                log.warning("%s: %s while connected", self.label, exc)
        finally:
            self._live_gen = 0
            if client.is_connected:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.disconnect(), 10.0)
            if connected:
                self._on_lost("stopped" if self._stop.is_set() else "link lost")
        return connected

    async def _stream(self, client: BleakClient, device: BLEDevice,
                      dropped: asyncio.Event) -> None:
        """Wait for the drop (or stop), re-reading the battery now and then."""
        next_battery = time.monotonic() + BATTERY_POLL_S
        while not dropped.is_set() and not self._stop.is_set():
            stop_wait = asyncio.ensure_future(self._stop.wait())
            drop_wait = asyncio.ensure_future(dropped.wait())
            try:
                await asyncio.wait({stop_wait, drop_wait},
                                   timeout=max(0.0, next_battery - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_wait.cancel()
                drop_wait.cancel()
            if time.monotonic() >= next_battery and client.is_connected:
                next_battery = time.monotonic() + BATTERY_POLL_S
                await self._read_battery(client, device)

    async def _read_details(self, client: BleakClient, device: BLEDevice) -> None:
        if client.services.get_characteristic(HEART_RATE_MEASUREMENT) is None:
            raise BleakError(f"{device.address} offers no Heart Rate Measurement (0x2A37): "
                             "not a heart-rate sensor")
        if client.services.get_characteristic(BODY_SENSOR_LOCATION) is not None:
            try:
                raw = await asyncio.wait_for(client.read_gatt_char(BODY_SENSOR_LOCATION),
                                             READ_TIMEOUT_S)
                self.location = LOCATIONS.get(raw[0], f"reserved ({raw[0]})") if raw else None
            except Exception as exc:  # optional: the sensor works without it
                log.info("%s: Body Sensor Location unreadable: %s", self.label, exc)
        await self._read_battery(client, device)

    async def _read_battery(self, client: BleakClient, device: BLEDevice) -> None:
        try:
            if client.services.get_characteristic(BATTERY_LEVEL) is not None:
                raw = await asyncio.wait_for(client.read_gatt_char(BATTERY_LEVEL),
                                             READ_TIMEOUT_S)
                if raw and raw[0] <= 100:
                    self.battery_pct = raw[0]
                return
            details = device.details if isinstance(device.details, dict) else {}
            path = details.get("path")  # BlueZ backend: the device's D-Bus object path
            if path:
                self.battery_pct = await asyncio.wait_for(bluez_battery_percentage(path),
                                                          READ_TIMEOUT_S)
        except Exception as exc:  # optional
            log.info("%s: battery level unreadable: %s", self.label, exc)

    # ------------------------------------------------------------------ state
    def _event(self, kind: str, **doc: object) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, {"sensor": self.label, "address": self.address, **doc})
            except Exception:
                log.exception("%s: event sink failed on %s", self.label, kind)

    def _failed(self, why: str) -> None:
        self.counters.connect_failures += 1
        self.last_error = why
        log.info("%s: connect failed: %s", self.label, why)

    def _on_connected(self) -> None:
        self.counters.connects += 1
        if self._ever_connected:
            self.counters.reconnects += 1
        self._ever_connected = True
        self.state = SensorState.CONNECTED
        self.last_error = ""
        self._event("connected", name=self.name, location=self.location,
                    battery_pct=self.battery_pct, reconnect=self.counters.reconnects > 0)

    def _on_lost(self, why: str) -> None:
        if self._stop.is_set():
            return
        self.counters.drops += 1
        self.state = SensorState.LOST
        self._gap_pending = "reconnect"
        self.last_error = why
        self._event("lost", reason=why)

    # ------------------------------------------------------------------ notifications
    def _on_notification(self, gen: int, data: bytearray) -> None:
        t = self.clock_ns()
        self.counters.notifications += 1
        if gen != self._live_gen:  # a callback of an older subscription (bleak issue 2002)
            self.counters.duplicates_dropped += 1
            return
        raw = bytes(data)
        if (raw == self._last_data and self._last_rx_ns is not None
                and t - self._last_rx_ns < self.options.dup_window_s * 1e9):
            self.counters.duplicates_dropped += 1
            return
        try:
            m = parse_heart_rate(raw)
        except PacketError as exc:
            self._malformed(t, raw, exc)
            return
        rr = m.rr_ms
        gap = self._gap_reason(t, rr, m.contact)
        self._last_data, self._last_rx_ns = raw, t
        self.bpm, self.contact = m.bpm, m.contact
        if rr:
            self.last_rr_ms = round(rr[-1], 1)
        if gap:
            self.counters.gaps += 1
            self._event("gap", reason=gap)
        beat = Beat(self.label, t, m.bpm, rr, m.contact, m.energy_kj, bool(gap))
        self.counters.beats += 1
        self.counters.rr_intervals += len(rr)
        try:
            self.on_beat(beat)
        except Exception:
            self.counters.consumer_errors += 1
            log.exception("%s: on_beat failed", self.label)

    def _gap_reason(self, t: int, rr_ms: list[float], contact: bool | None) -> str:
        reason, self._gap_pending = self._gap_pending, ""
        if reason:
            return reason
        if self._last_rx_ns is not None:
            uncovered = (t - self._last_rx_ns) / 1e9 - sum(rr_ms) / 1000.0
            if uncovered > self.options.max_uncovered_s:
                return f"silence ({uncovered:.1f} s not covered by RR intervals)"
        if contact is True and self.contact is False:
            return "skin contact regained"
        return ""

    def _malformed(self, t: int, raw: bytes, exc: PacketError) -> None:
        self.counters.malformed += 1
        self._malformed_unreported += 1
        last = self._last_malformed_event_ns
        if last is None or t - last >= MALFORMED_EVENT_EVERY_S * 1e9:
            self._event("malformed", error=str(exc), bytes=raw[:32].hex(),
                        count=self._malformed_unreported)
            self._last_malformed_event_ns = t
            self._malformed_unreported = 0


async def bluez_battery_percentage(device_path: str) -> int | None:
    """org.bluez.Battery1.Percentage of a device (where bluetoothd's battery plugin took the
    Battery Service off GATT), or None when the device has no Battery1."""
    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        reply = await bus.call(Message(destination="org.bluez", path=device_path,
                                       interface="org.freedesktop.DBus.Properties",
                                       member="Get", signature="ss",
                                       body=["org.bluez.Battery1", "Percentage"]))
        if reply is None or reply.message_type == MessageType.ERROR:
            return None
        return int(reply.body[0].value)
    finally:
        bus.disconnect()
