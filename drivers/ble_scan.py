"""Finding BLE heart-rate sensors: a one-off scan for the Heart Rate Service (0x180D), and a
shared finder that looks for configured sensors (by address or name) with one scan at a time.

BlueZ runs one discovery session per D-Bus client: two scanners in one process would fight over
it, so every sensor client of a process finds its device through one `DeviceFinder`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass

from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError

log = logging.getLogger("echoel.ble")

HEART_RATE_SERVICE = "0000180d-0000-1000-8000-00805f9b34fb"
_ADDRESS = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")


@dataclass(frozen=True)
class FoundSensor:
    """A sensor seen in a scan."""

    address: str
    name: str
    rssi: int


def is_address(target: str) -> bool:
    """True when `target` is a Bluetooth address (AA:BB:CC:DD:EE:FF), else it is a name."""
    return bool(_ADDRESS.match(target.strip()))


def matches(target: str, device: BLEDevice, adv: AdvertisementData | None = None) -> bool:
    """Whether a seen device is the configured one: same address, or same name (ignoring case
    and surrounding blanks)."""
    t = target.strip()
    if is_address(t):
        return device.address.upper() == t.upper()
    names = {device.name or "", (adv.local_name if adv is not None else None) or ""}
    return t.casefold() in {n.strip().casefold() for n in names if n}


async def scan_heart_rate_sensors(timeout_s: float = 5.0) -> list[FoundSensor]:
    """Sensors advertising the Heart Rate Service within `timeout_s`, strongest first."""
    found = await BleakScanner.discover(timeout=timeout_s, return_adv=True,
                                        service_uuids=[HEART_RATE_SERVICE])
    out = [FoundSensor(d.address, adv.local_name or d.name or "", adv.rssi)
           for d, adv in found.values()]
    return sorted(out, key=lambda s: (-s.rssi, s.address))


class DeviceFinder:
    """One scan at a time for every waiting sensor client; the scan stops when nobody waits."""

    def __init__(self, retry_s: float = 1.0) -> None:
        self.retry_s = retry_s
        self._waiters: dict[int, tuple[str, asyncio.Future[BLEDevice]]] = {}
        self._next = 0
        self._task: asyncio.Task[None] | None = None
        self.scan_errors = 0
        self.last_error = ""
        self.rssi: dict[str, int] = {}  # last RSSI seen per address

    async def find(self, target: str, timeout_s: float) -> BLEDevice | None:
        """The device for `target` (address or name), or None if not seen within `timeout_s`."""
        fut: asyncio.Future[BLEDevice] = asyncio.get_running_loop().create_future()
        key = self._next
        self._next += 1
        self._waiters[key] = (target, fut)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._scan_loop())
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            return None
        finally:
            self._waiters.pop(key, None)

    def _on_advertisement(self, device: BLEDevice, adv: AdvertisementData) -> None:
        self.rssi[device.address.upper()] = adv.rssi
        for target, fut in list(self._waiters.values()):
            if not fut.done() and matches(target, device, adv):
                fut.set_result(device)

    async def _scan_loop(self) -> None:
        while self._waiters:
            try:
                async with BleakScanner(detection_callback=self._on_advertisement):
                    while self._waiters:
                        await asyncio.sleep(0.1)
            except (BleakError, OSError, EOFError) as exc:
                self.scan_errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("BLE scan failed: %s (retrying in %.1f s)", self.last_error,
                            self.retry_s)
                await asyncio.sleep(self.retry_s)

    async def close(self) -> None:
        """Stop scanning (stop the sensor clients first: their waits would run to timeout)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
