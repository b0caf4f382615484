"""A BlueZ stand-in on a private D-Bus system bus: bleak's real BlueZ backend without a radio.

There is no Bluetooth adapter on a build machine, so bluetoothd cannot run. bleak talks to BlueZ
only over D-Bus, and finds the system bus through DBUS_SYSTEM_BUS_ADDRESS: this module starts a
private `dbus-daemon`, owns `org.bluez` on it and exports what bleak 3.1 reads and calls (an
adapter, devices, the Heart Rate, Body Sensor Location and Battery characteristics), with the
same object paths, property types and signal order as bluetoothd. Tests script it: emit a
notification with given bytes, deliver one twice, drop the link, refuse connects, stop
advertising, several sensors at once.

It runs its own asyncio loop in a thread; every public method is synchronous and thread-safe:

    with BlueZStandIn() as bz:               # starts dbus-daemon + the stand-in
        bz.add_sensor("C0:FF:EE:00:00:01", "Polar H10 0001")
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bz.address)
        ... bleak code ...
        bz.notify("C0:FF:EE:00:00:01", bytes([0x10, 72, 0x00, 0x04]))

`python tests/bluez_standin.py` runs one with two sensors beating until Ctrl-C (prints the bus
address to export), for trying `echoel bio scan` / `echoel bio run` by hand.
"""

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Annotated, Any

from dbus_fast import BusType, DBusError
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusBytes,
    DBusDict,
    DBusInt16,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
)
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_method, dbus_property
from echoel.drivers.private_dbus import BUS_CONFIG

DBusStrList = Annotated[list[str], DBusSignature("as")]
DBusByteOut = Annotated[int, DBusSignature("y")]

ADAPTER = "/org/bluez/hci0"
HEART_RATE_SERVICE = "0000180d-0000-1000-8000-00805f9b34fb"
HEART_RATE_MEASUREMENT = "00002a37-0000-1000-8000-00805f9b34fb"
BODY_SENSOR_LOCATION = "00002a38-0000-1000-8000-00805f9b34fb"
BATTERY_SERVICE = "0000180f-0000-1000-8000-00805f9b34fb"
BATTERY_LEVEL = "00002a19-0000-1000-8000-00805f9b34fb"
HID_SERVICE = "00001812-0000-1000-8000-00805f9b34fb"



class StandInError(RuntimeError):
    """The stand-in could not start or was asked for something it does not have."""


def dbus_daemon_missing() -> str | None:
    """Why the stand-in cannot run here (for pytest.skip), or None."""
    if shutil.which("dbus-daemon") is None:
        return "dbus-daemon is not installed (Debian package dbus-daemon)"
    return None


def device_path(address: str) -> str:
    """BlueZ's object path of a device: /org/bluez/hci0/dev_AA_BB_CC_DD_EE_FF."""
    return f"{ADAPTER}/dev_{address.upper().replace(':', '_')}"


class Adapter1(ServiceInterface):
    """org.bluez.Adapter1: powered, central, discovery on and off."""

    def __init__(self, standin: "BlueZStandIn") -> None:
        super().__init__("org.bluez.Adapter1")
        self._standin = standin
        self.discovering = False
        self.filter: dict[str, Any] = {}

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> DBusStr:  # noqa: N802 (D-Bus names)
        return "00:1A:7D:DA:71:13"

    @dbus_property(access=PropertyAccess.READ)
    def Powered(self) -> DBusBool:  # noqa: N802
        return True

    @dbus_property(access=PropertyAccess.READ)
    def Discovering(self) -> DBusBool:  # noqa: N802
        return self.discovering

    @dbus_property(access=PropertyAccess.READ)
    def Roles(self) -> DBusStrList:  # noqa: N802
        return ["central", "peripheral"]

    @dbus_method()
    def SetDiscoveryFilter(self, properties: DBusDict) -> None:  # noqa: N802
        self.filter = {k: v.value for k, v in properties.items()}
        self._standin.calls.append("SetDiscoveryFilter")

    @dbus_method()
    def StartDiscovery(self) -> None:  # noqa: N802
        self._standin.calls.append("StartDiscovery")
        if self.discovering:  # bluetoothd: one discovery session per D-Bus client
            raise DBusError("org.bluez.Error.InProgress", "Operation already in progress")
        self.discovering = True
        self.emit_properties_changed({"Discovering": True})
        self._standin._start_advertising()

    @dbus_method()
    def StopDiscovery(self) -> None:  # noqa: N802
        self._standin.calls.append("StopDiscovery")
        if not self.discovering:
            raise DBusError("org.bluez.Error.Failed", "No discovery started")
        self.discovering = False
        self.emit_properties_changed({"Discovering": False})
        self._standin._stop_advertising()


class Device1(ServiceInterface):
    """org.bluez.Device1 of one sensor: connect, disconnect, RSSI, the link's state."""

    def __init__(self, standin: "BlueZStandIn", sensor: "Sensor") -> None:
        super().__init__("org.bluez.Device1")
        self._standin = standin
        self._sensor = sensor
        self.connected = False
        self.resolved = False
        self.rssi = sensor.rssi

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> DBusStr:  # noqa: N802
        return self._sensor.address

    @dbus_property(access=PropertyAccess.READ)
    def AddressType(self) -> DBusStr:  # noqa: N802
        return "random"

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> DBusStr:  # noqa: N802
        return self._sensor.name

    @dbus_property(access=PropertyAccess.READ)
    def Alias(self) -> DBusStr:  # noqa: N802
        return self._sensor.name

    @dbus_property(access=PropertyAccess.READ)
    def Adapter(self) -> DBusObjectPath:  # noqa: N802
        return ADAPTER

    @dbus_property(access=PropertyAccess.READ)
    def Paired(self) -> DBusBool:  # noqa: N802
        return False

    @dbus_property(access=PropertyAccess.READ)
    def Trusted(self) -> DBusBool:  # noqa: N802
        return False

    @dbus_property(access=PropertyAccess.READ)
    def Connected(self) -> DBusBool:  # noqa: N802
        return self.connected

    @dbus_property(access=PropertyAccess.READ)
    def ServicesResolved(self) -> DBusBool:  # noqa: N802
        return self.resolved

    @dbus_property(access=PropertyAccess.READ)
    def UUIDs(self) -> DBusStrList:  # noqa: N802
        return list(self._sensor.service_uuids)

    @dbus_property(access=PropertyAccess.READ)
    def RSSI(self) -> DBusInt16:  # noqa: N802
        return self.rssi

    @dbus_method()
    async def Connect(self) -> None:  # noqa: N802
        s = self._sensor
        s.connect_calls += 1
        self._standin.calls.append(f"Connect {s.address}")
        if s.refuse_connects > 0:
            s.refuse_connects -= 1
            await asyncio.sleep(0.05)
            raise DBusError("org.bluez.Error.Failed", "Page Timeout (stand-in refused)")
        if self.connected:
            raise DBusError("org.bluez.Error.AlreadyConnected", "Already Connected")
        self.connected = True
        self.emit_properties_changed({"Connected": True})
        await asyncio.sleep(0.01)
        self._standin._export_gatt(s)  # GATT objects (InterfacesAdded) before ServicesResolved
        await asyncio.sleep(0.01)
        self.resolved = True
        self.emit_properties_changed({"ServicesResolved": True})

    @dbus_method()
    async def Disconnect(self) -> None:  # noqa: N802
        self._standin.calls.append(f"Disconnect {self._sensor.address}")
        self._standin._drop(self._sensor)


class Battery1(ServiceInterface):
    """org.bluez.Battery1: where bluetoothd's battery plugin puts a sensor's battery level."""

    def __init__(self, sensor: "Sensor") -> None:
        super().__init__("org.bluez.Battery1")
        self._sensor = sensor

    @dbus_property(access=PropertyAccess.READ)
    def Percentage(self) -> DBusByteOut:  # noqa: N802
        return self._sensor.battery


class GattService1(ServiceInterface):
    """org.bluez.GattService1."""

    def __init__(self, uuid: str, device: str) -> None:
        super().__init__("org.bluez.GattService1")
        self._uuid, self._device = uuid, device

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> DBusStr:  # noqa: N802
        return self._uuid

    @dbus_property(access=PropertyAccess.READ)
    def Device(self) -> DBusObjectPath:  # noqa: N802
        return self._device

    @dbus_property(access=PropertyAccess.READ)
    def Primary(self) -> DBusBool:  # noqa: N802
        return True


class GattCharacteristic1(ServiceInterface):
    """org.bluez.GattCharacteristic1: read, start/stop notify; notifications as Value changes."""

    def __init__(self, standin: "BlueZStandIn", uuid: str, service: str, flags: list[str],
                 read: Callable[[], bytes] | None = None) -> None:
        super().__init__("org.bluez.GattCharacteristic1")
        self._standin = standin
        self._uuid, self._service, self._flags = uuid, service, flags
        self._read = read
        self.value = b""
        self.notifying = False

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> DBusStr:  # noqa: N802
        return self._uuid

    @dbus_property(access=PropertyAccess.READ)
    def Service(self) -> DBusObjectPath:  # noqa: N802
        return self._service

    @dbus_property(access=PropertyAccess.READ)
    def Flags(self) -> DBusStrList:  # noqa: N802
        return list(self._flags)

    @dbus_property(access=PropertyAccess.READ)
    def Value(self) -> DBusBytes:  # noqa: N802
        return self.value

    @dbus_property(access=PropertyAccess.READ)
    def Notifying(self) -> DBusBool:  # noqa: N802
        return self.notifying

    @dbus_method()
    def ReadValue(self, options: DBusDict) -> DBusBytes:  # noqa: N802
        if self._read is None:
            raise DBusError("org.bluez.Error.NotPermitted", "Read not permitted")
        self.value = self._read()
        return self.value

    @dbus_method()
    def StartNotify(self) -> None:  # noqa: N802
        if "notify" not in self._flags:
            raise DBusError("org.bluez.Error.NotSupported", "Operation is not supported")
        self._standin.calls.append(f"StartNotify {self._service}")
        if not self.notifying:
            self.notifying = True
            self.emit_properties_changed({"Notifying": True})

    @dbus_method()
    def StopNotify(self) -> None:  # noqa: N802
        self.notifying = False
        self.emit_properties_changed({"Notifying": False})

    def push(self, data: bytes) -> None:
        """A notification: a Value PropertiesChanged on this characteristic."""
        self.value = bytes(data)
        self.emit_properties_changed({"Value": self.value})


@dataclass
class Sensor:
    """One scripted heart-rate strap (or, with heart_rate=False, another BLE device)."""

    address: str
    name: str
    rssi: int = -60
    location: int | None = 1  # Body Sensor Location (1 = chest); None: not offered
    battery: int = 87
    battery_gatt: bool = True  # 0x2A19 as a GATT characteristic (else Battery1 only)
    heart_rate: bool = True
    advertising: bool = True
    refuse_connects: int = 0
    connect_calls: int = 0
    paths: list[str] = field(default_factory=list)
    hrm: GattCharacteristic1 | None = None
    device: Device1 | None = None

    @property
    def service_uuids(self) -> list[str]:
        """UUIDs in its advertisement."""
        return [HEART_RATE_SERVICE, BATTERY_SERVICE] if self.heart_rate else [HID_SERVICE]


class BlueZStandIn:
    """A private dbus-daemon with a scripted `org.bluez` on it; see the module docstring."""

    def __init__(self, advertise_interval_s: float = 0.1) -> None:
        self.advertise_interval_s = advertise_interval_s
        self.sensors: dict[str, Sensor] = {}
        self.calls: list[str] = []
        self.address = ""
        self._tmp: str | None = None
        self._daemon: subprocess.Popen | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._bus: MessageBus | None = None
        self._adapter: Adapter1 | None = None
        self._adv_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "BlueZStandIn":
        """Start dbus-daemon and the stand-in; sets `address` (for DBUS_SYSTEM_BUS_ADDRESS)."""
        why = dbus_daemon_missing()
        if why:
            raise StandInError(why)
        self._tmp = tempfile.mkdtemp(prefix="bz-")  # socket paths must stay under 108 chars
        sock = os.path.join(self._tmp, "system_bus_socket")
        conf = os.path.join(self._tmp, "bus.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(BUS_CONFIG.format(socket=sock))
        self._daemon = subprocess.Popen(
            ["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self._daemon.stdout is not None
        line = self._daemon.stdout.readline().strip()
        if not line:
            self.close()
            raise StandInError("dbus-daemon printed no address (did it start?)")
        self.address = line
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bluez-standin",
                                        daemon=True)
        self._thread.start()
        try:
            self._call(self._setup(), 15.0)
        except Exception:
            self.close()
            raise
        return self

    async def _setup(self) -> None:
        self._bus = await MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM).connect()
        self._adapter = Adapter1(self)
        self._bus.export(ADAPTER, self._adapter)
        await self._bus.request_name("org.bluez")

    def close(self) -> None:
        """Stop the stand-in and its dbus-daemon, remove the temporary folder."""
        if self._loop is not None and self._thread is not None:
            if self._bus is not None:
                try:
                    self._call(self._teardown(), 5.0)
                except Exception:  # closing anyway
                    pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
            if not self._thread.is_alive():
                self._loop.close()
            self._loop = self._thread = None
        if self._daemon is not None:
            self._daemon.send_signal(signal.SIGTERM)
            try:
                self._daemon.wait(5.0)
            except subprocess.TimeoutExpired:
                self._daemon.kill()
                self._daemon.wait(5.0)
            if self._daemon.stdout is not None:
                self._daemon.stdout.close()
            self._daemon = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    async def _teardown(self) -> None:
        if self._adv_task is not None:
            self._adv_task.cancel()
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    def __enter__(self) -> "BlueZStandIn":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        if self._loop is None:
            raise StandInError("the stand-in is not running (call start())")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _run(self, fn: Callable[[], Any]) -> Any:
        async def go() -> Any:
            return fn()
        return self._call(go())

    # ------------------------------------------------------------------ scripting (any thread)
    def add_sensor(self, address: str, name: str, **kw: Any) -> Sensor:
        """A sensor (fields of `Sensor` as keywords), exported as a known device."""
        s = Sensor(address.upper(), name, **kw)

        def add() -> Sensor:
            s.device = Device1(self, s)
            assert self._bus is not None
            self._bus.export(device_path(s.address), s.device)
            if not s.battery_gatt and s.heart_rate:
                self._bus.export(device_path(s.address), Battery1(s))
            self.sensors[s.address] = s
            return s
        return self._run(add)

    def notify(self, address: str, data: bytes, twice: bool = False) -> bool:
        """Send a Heart Rate Measurement notification (twice: the same one delivered again).

        Returns False (nothing sent) when the sensor is not connected or not subscribed."""
        def go() -> bool:
            s = self._sensor(address)
            if s.hrm is None or not s.hrm.notifying or s.device is None \
                    or not s.device.connected:
                return False
            s.hrm.push(data)
            if twice:
                s.hrm.push(data)
            return True
        return self._run(go)

    def drop(self, address: str) -> None:
        """The link drops (out of range, strap taken off): Connected=false, GATT objects gone."""
        self._run(lambda: self._drop(self._sensor(address)))

    def refuse_connects(self, address: str, count: int) -> None:
        """The next `count` Connect calls fail as a page timeout would."""
        def go() -> None:
            self._sensor(address).refuse_connects = count
        self._run(go)

    def set_advertising(self, address: str, on: bool) -> None:
        """Whether a scan sees the sensor (off: out of range, switched off)."""
        def go() -> None:
            self._sensor(address).advertising = on
        self._run(go)

    def is_connected(self, address: str) -> bool:
        """The link's state as BlueZ shows it."""
        def go() -> bool:
            d = self._sensor(address).device
            return bool(d is not None and d.connected)
        return self._run(go)

    def is_subscribed(self, address: str) -> bool:
        """Connected, services resolved and notifications on (a notification would arrive)."""
        def go() -> bool:
            s = self._sensor(address)
            return bool(s.device is not None and s.device.connected and s.device.resolved
                        and s.hrm is not None and s.hrm.notifying)
        return self._run(go)

    def connect_calls(self, address: str) -> int:
        """How many times Connect was called on the sensor."""
        return self._run(lambda: self._sensor(address).connect_calls)

    def wait_subscribed(self, address: str, timeout_s: float = 30.0) -> None:
        """Block until a notification to `address` would arrive; StandInError after timeout."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.is_subscribed(address):
                return
            time.sleep(0.02)
        raise StandInError(f"{address}: not subscribed to 0x2A37 after {timeout_s:g} s")

    # ------------------------------------------------------------------ internals (loop)
    def _sensor(self, address: str) -> Sensor:
        try:
            return self.sensors[address.upper()]
        except KeyError:
            raise StandInError(f"no sensor {address!r} in the stand-in; have "
                               f"{sorted(self.sensors)}") from None

    def _start_advertising(self) -> None:
        if self._adv_task is None or self._adv_task.done():
            self._adv_task = asyncio.get_running_loop().create_task(self._advertise())

    def _stop_advertising(self) -> None:
        if self._adv_task is not None:
            self._adv_task.cancel()
            self._adv_task = None

    async def _advertise(self) -> None:
        """While discovering: an RSSI change per advertising, unconnected device (what makes a
        device show up in bleak's scanner)."""
        n = 0
        while True:
            for s in list(self.sensors.values()):
                d = s.device
                if d is not None and s.advertising and not d.connected:
                    d.rssi = s.rssi + (n % 3) - 1
                    d.emit_properties_changed({"RSSI": d.rssi})
            n += 1
            await asyncio.sleep(self.advertise_interval_s)

    def _export_gatt(self, s: Sensor) -> None:
        assert self._bus is not None
        dev = device_path(s.address)
        objs: list[tuple[str, ServiceInterface]] = []
        if s.heart_rate:
            svc = f"{dev}/service000c"
            objs.append((svc, GattService1(HEART_RATE_SERVICE, dev)))
            s.hrm = GattCharacteristic1(self, HEART_RATE_MEASUREMENT, svc, ["notify"])
            objs.append((f"{svc}/char000d", s.hrm))
            if s.location is not None:
                loc = s.location
                objs.append((f"{svc}/char0010", GattCharacteristic1(
                    self, BODY_SENSOR_LOCATION, svc, ["read"], lambda: bytes([loc]))))
            if s.battery_gatt:
                bsvc = f"{dev}/service0012"
                objs.append((bsvc, GattService1(BATTERY_SERVICE, dev)))
                objs.append((f"{bsvc}/char0013", GattCharacteristic1(
                    self, BATTERY_LEVEL, bsvc, ["read", "notify"], lambda: bytes([s.battery]))))
        for path, iface in objs:
            self._bus.export(path, iface)
            s.paths.append(path)

    def _drop(self, s: Sensor) -> None:
        d = s.device
        if d is None or not d.connected:
            return
        assert self._bus is not None
        if s.hrm is not None:
            s.hrm.notifying = False
        for path in reversed(s.paths):
            self._bus.unexport(path)
        s.paths.clear()
        s.hrm = None
        d.connected = d.resolved = False
        d.emit_properties_changed({"ServicesResolved": False, "Connected": False})


def main() -> int:
    """Two sensors beating (about 70 and 80 bpm, RR intervals in every notification)."""
    import random
    with BlueZStandIn() as bz:
        bz.add_sensor("C0:FF:EE:00:00:01", "Polar H10 STANDIN1")
        bz.add_sensor("C0:FF:EE:00:00:02", "Wahoo TICKR STANDIN2", location=None,
                      battery_gatt=False)
        print(f"export DBUS_SYSTEM_BUS_ADDRESS={bz.address}", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *a: stop.set())
        signal.signal(signal.SIGTERM, lambda *a: stop.set())
        rng = random.Random(1)
        while not stop.wait(1.0):
            for addr, bpm in (("C0:FF:EE:00:00:01", 70), ("C0:FF:EE:00:00:02", 80)):
                rr = round(60.0 / bpm * 1024 * (1 + rng.uniform(-0.05, 0.05)))
                bz.notify(addr, bytes([0x16, bpm, rr & 0xFF, rr >> 8]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
