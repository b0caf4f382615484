"""The BLE heart-rate client with bleak's real BlueZ backend against the BlueZ stand-in on a
private D-Bus (tests/bluez_standin.py): scan, connect, every 0x2A37 variant, malformed
notifications, duplicates, drops and reconnects with gaps marked, refused connects, two sensors.

References: what the stand-in sent (bytes laid out by the specification's field table, see
test_heart_rate_packet.spec_packet) against what reached `on_beat`."""

import argparse
import asyncio
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from echoel.daemon.bio_cli import add_bio_parser
from echoel.daemon.bio_service import (
    BioService,
    bio_lines,
    bio_modulation_table,
    check_bio,
    sensor_targets,
)
from echoel.daemon.bus_listener import BusListener
from echoel.daemon.config import ConfigError
from echoel.drivers.ble_heart_rate import (
    HeartRateSensor,
    ReconnectPolicy,
    SensorOptions,
    SensorState,
)
from echoel.drivers.ble_scan import DeviceFinder, scan_heart_rate_sensors
from echoel.drivers.heart_rate_packet import Beat
from echoel.drivers.simulated_heart_rate import RRGenerator

from tests.bluez_standin import BlueZStandIn, dbus_daemon_missing
from tests.test_heart_rate_packet import spec_packet

A = "C0:FF:EE:00:00:01"
B = "C0:FF:EE:00:00:02"
WAIT_S = 30.0  # generous: the machine is shared and loaded

pytestmark = pytest.mark.skipif(dbus_daemon_missing() is not None,
                                reason=dbus_daemon_missing() or "")


@pytest.fixture
def bz(monkeypatch):
    with BlueZStandIn() as standin:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", standin.address)
        yield standin


def fast_options(**kw) -> SensorOptions:
    return SensorOptions(scan_timeout_s=kw.pop("scan_timeout_s", 10.0),
                         policy=ReconnectPolicy(0.05, 0.5), **kw)


async def until(cond: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.02)


class Rig:
    """Sensor clients collecting beats and events, run in the test's event loop."""

    def __init__(self, bz: BlueZStandIn) -> None:
        self.bz = bz
        self.finder = DeviceFinder()
        self.beats: list[Beat] = []
        self.events: list[tuple[str, dict]] = []
        self.sensors: list[HeartRateSensor] = []
        self.tasks: list[asyncio.Task] = []

    def start(self, target: str, **kw) -> HeartRateSensor:
        s = HeartRateSensor(target, self.beats.append,
                            lambda k, d: self.events.append((k, d)), finder=self.finder,
                            options=kw.pop("options", fast_options()),
                            rng=random.Random(7), **kw)
        self.sensors.append(s)
        self.tasks.append(asyncio.create_task(s.run()))
        return s

    async def send(self, address: str, data: bytes, twice: bool = False) -> None:
        assert await asyncio.to_thread(self.bz.notify, address, data, twice), \
            f"{address} is not subscribed"

    async def subscribed(self, address: str) -> None:
        await asyncio.to_thread(self.bz.wait_subscribed, address, WAIT_S)

    def kinds(self, sensor: str | None = None) -> list[str]:
        return [k for k, d in self.events if sensor is None or d["sensor"] == sensor]

    async def stop(self) -> None:
        for s in self.sensors:
            s.stop()
        await asyncio.wait_for(asyncio.gather(*self.tasks), WAIT_S)
        await self.finder.close()
        assert all(s.state is SensorState.STOPPED for s in self.sensors)


def run(coro_fn: Callable[[Rig], object], bz: BlueZStandIn) -> None:
    async def main() -> None:
        rig = Rig(bz)
        try:
            await coro_fn(rig)
        finally:
            await rig.stop()
    asyncio.run(main())


def test_scan_lists_heart_rate_sensors_with_rssi(bz):
    bz.add_sensor(A, "Polar H10 0001", rssi=-48)
    bz.add_sensor(B, "TICKR 0002", rssi=-71)
    bz.add_sensor("C0:FF:EE:00:00:09", "Keyboard", heart_rate=False)
    found = asyncio.run(scan_heart_rate_sensors(1.5))
    assert [(f.address, f.name) for f in found] == [(A, "Polar H10 0001"), (B, "TICKR 0002")]
    assert abs(found[0].rssi + 48) <= 1 and abs(found[1].rssi + 71) <= 1
    assert "StopDiscovery" in bz.calls  # the scan was ended


def test_every_variant_reaches_on_beat_with_location_and_battery(bz):
    bz.add_sensor(A, "Polar H10 0001", location=1, battery=64)
    sent = [(flags, bpm, 1234, rr) for flags, bpm, rr in [
        (0x00, 61, []), (0x01, 300, []), (0x04, 62, []), (0x06, 63, []), (0x02, 64, []),
        (0x08, 65, []), (0x10, 66, []), (0x10, 67, [900]), (0x16, 68, [880, 870, 860]),
        (0x1F, 301, [1000, 1100]), (0x19, 302, [777])]]

    async def go(rig: Rig) -> None:
        s = rig.start("polar h10 0001")  # by name, case ignored
        await rig.subscribed(A)
        for p in sent:
            await rig.send(A, spec_packet(*p))
        await until(lambda: len(rig.beats) == len(sent), "every variant")
        assert s.state is SensorState.CONNECTED
        assert (s.location, s.battery_pct, s.address) == ("chest", 64, A)
        for beat, (flags, bpm, energy, rr) in zip(rig.beats, sent, strict=True):
            assert beat.sensor == "polar h10 0001" and beat.bpm == bpm
            assert beat.contact == (bool(flags & 0x02) if flags & 0x04 else None)
            assert beat.energy_kj == (energy if flags & 0x08 else None)
            assert beat.rr_ms == pytest.approx([v * 1000 / 1024 for v in rr])
        # 0x04 (contact supported, none) then 0x06 (contact): RR while off skin are missing
        assert [i for i, b in enumerate(rig.beats) if b.gap_before] == [3]
        c = s.counters
        assert (c.notifications, c.beats, c.malformed, c.duplicates_dropped) == (11, 11, 0, 0)
        assert c.rr_intervals == 7
        ts = [b.t_ns for b in rig.beats]
        assert ts == sorted(ts) and abs(ts[-1] - time.monotonic_ns()) < 60e9  # CLOCK_MONOTONIC
    run(go, bz)


def test_malformed_notifications_are_counted_and_dropped(bz):
    bz.add_sensor(A, "Polar H10 0001")
    bad = [b"", b"\x01\x48", b"\x10\x48\x00\x04\x01", b"\x08\x48"]

    async def go(rig: Rig) -> None:
        s = rig.start(A)
        await rig.subscribed(A)
        await rig.send(A, spec_packet(0x10, 70, 0, [850]))
        for raw in bad:
            await rig.send(A, raw)
        await rig.send(A, spec_packet(0x10, 71, 0, [840]))
        await until(lambda: len(rig.beats) == 2 and s.counters.malformed == 4, "two beats")
        assert [b.bpm for b in rig.beats] == [70, 71]
        assert s.state is SensorState.CONNECTED and s.counters.notifications == 6
        events = [d for k, d in rig.events if k == "malformed"]
        assert events and "byte" in events[0]["error"]  # rate-limited, names the byte
    run(go, bz)


def test_duplicates_dropped_identical_genuine_beats_kept(bz):
    bz.add_sensor(A, "Polar H10 0001")
    same = spec_packet(0x10, 70, 0, [857])

    async def go(rig: Rig) -> None:
        s = rig.start(A, options=fast_options(dup_window_s=0.3))
        await rig.subscribed(A)
        await rig.send(A, same, twice=True)  # one notification delivered twice
        await until(lambda: s.counters.notifications == 2, "both deliveries")
        await asyncio.sleep(1.2)  # a genuine next beat with the very same RR
        await rig.send(A, same)
        await until(lambda: s.counters.notifications == 3, "the third delivery")
        assert len(rig.beats) == 2 and s.counters.duplicates_dropped == 1
        assert sum(len(b.rr_ms) for b in rig.beats) == 2
    run(go, bz)


def test_drop_reconnect_gap_and_no_rr_counted_twice(bz):
    bz.add_sensor(A, "Polar H10 0001")
    rr_sent: list[int] = []

    async def burst(rig: Rig, n: int, bpm: int) -> None:
        for i in range(n):
            rr = [800 + bpm + i, 810 + i]
            rr_sent.extend(rr)
            await rig.send(A, spec_packet(0x10, bpm, 0, rr), twice=(i == 0))

    async def go(rig: Rig) -> None:
        s = rig.start(A, options=fast_options(dup_window_s=0.5))
        await rig.subscribed(A)
        await burst(rig, 3, 60)
        await until(lambda: len(rig.beats) == 3, "first burst")
        await asyncio.to_thread(bz.drop, A)
        await until(lambda: s.state is SensorState.LOST or s.counters.reconnects, "lost")
        await rig.subscribed(A)  # reconnected by itself
        await until(lambda: s.state is SensorState.CONNECTED, "connected again")
        await burst(rig, 3, 70)  # the first one after the reconnect delivered twice
        await until(lambda: len(rig.beats) == 6, "second burst")
        await asyncio.sleep(0.3)
        got = [round(v * 1024 / 1000) for b in rig.beats for v in b.rr_ms]
        assert got == rr_sent  # each RR once, in order
        assert [b.gap_before for b in rig.beats] == [False] * 3 + [True] + [False] * 2
        c = s.counters
        assert (c.drops, c.reconnects, c.gaps, c.duplicates_dropped) == (1, 1, 1, 2)
        assert rig.kinds() == ["connected", "lost", "connected", "gap"]
    run(go, bz)


def test_refused_connects_back_off_then_connect(bz):
    bz.add_sensor(A, "Polar H10 0001")
    bz.refuse_connects(A, 2)

    async def go(rig: Rig) -> None:
        s = rig.start(A)
        await rig.subscribed(A)
        await until(lambda: s.state is SensorState.CONNECTED, "connected")
        assert s.counters.connect_failures == 2 and bz.connect_calls(A) == 3
        assert s.counters.reconnects == 0  # never connected before: not a reconnect
        await rig.send(A, spec_packet(0x10, 66, 0, [900]))
        await until(lambda: len(rig.beats) == 1, "a beat")
        assert not rig.beats[0].gap_before
    run(go, bz)


def test_absent_sensor_keeps_searching_and_stops_promptly(bz):
    bz.add_sensor(A, "Polar H10 0001", advertising=False)

    async def go(rig: Rig) -> None:
        s = rig.start(A, options=fast_options(scan_timeout_s=0.3))
        await until(lambda: s.counters.connect_failures >= 2, "two failed searches")
        assert s.state is SensorState.SEARCHING and "not found" in s.last_error
        assert bz.connect_calls(A) == 0 and rig.beats == []
        t0 = time.monotonic()
        s.stop()
        await asyncio.wait_for(rig.tasks[0], WAIT_S)
        assert time.monotonic() - t0 < WAIT_S
    run(go, bz)


def test_two_sensors_at_once_one_dropping(bz):
    bz.add_sensor(A, "Polar H10 0001", battery=90)
    bz.add_sensor(B, "TICKR 0002", location=None, battery=41, battery_gatt=False)

    async def go(rig: Rig) -> None:
        sa = rig.start(A, label="alice")
        sb = rig.start("TICKR 0002", label="bob")
        await rig.subscribed(A)
        await rig.subscribed(B)
        await until(lambda: sa.state is sb.state is SensorState.CONNECTED, "both connected")
        for i in range(3):
            await rig.send(A, spec_packet(0x10, 60 + i, 0, [1000 + i]))
            await rig.send(B, spec_packet(0x10, 90 + i, 0, [660 + i]))
        await until(lambda: len(rig.beats) == 6, "six beats")
        await asyncio.to_thread(bz.drop, B)
        await rig.send(A, spec_packet(0x10, 63, 0, [1003]))
        await until(lambda: len(rig.beats) == 7, "alice goes on")
        await rig.subscribed(B)
        await rig.send(B, spec_packet(0x10, 93, 0, [663]))
        await until(lambda: len(rig.beats) == 8, "bob is back")
        by = {who: [b for b in rig.beats if b.sensor == who] for who in ("alice", "bob")}
        assert [b.bpm for b in by["alice"]] == [60, 61, 62, 63]
        assert [b.bpm for b in by["bob"]] == [90, 91, 92, 93]
        assert [b.gap_before for b in by["bob"]] == [False, False, False, True]
        assert not any(b.gap_before for b in by["alice"])
        assert (sa.battery_pct, sa.location) == (90, "chest")
        assert (sb.battery_pct, sb.location) == (41, None)  # Battery1, no 0x2A38
        assert sa.counters.drops == 0 and sb.counters.reconnects == 1
        assert bz.calls.count("StartDiscovery") >= 1  # one scan at a time (stand-in refuses 2)
    run(go, bz)


def test_silence_and_contact_regained_mark_gaps(bz):
    bz.add_sensor(A, "Polar H10 0001")

    async def go(rig: Rig) -> None:
        s = rig.start(A, options=fast_options(max_uncovered_s=1.0))
        await rig.subscribed(A)
        await rig.send(A, spec_packet(0x16, 60, 0, [1024]))
        await until(lambda: len(rig.beats) == 1, "beat 1")
        await asyncio.sleep(2.5)  # one RR of 0.1 s cannot cover 2.5 s of silence
        await rig.send(A, spec_packet(0x16, 60, 0, [102]))
        await rig.send(A, spec_packet(0x04, 0, 0, []))  # contact lost: no RR
        await rig.send(A, spec_packet(0x16, 61, 0, [1000]))  # contact back
        await until(lambda: len(rig.beats) == 4, "four beats")
        assert [b.gap_before for b in rig.beats] == [False, True, False, True]
        assert s.counters.gaps == 2
        reasons = [d["reason"] for k, d in rig.events if k == "gap"]
        assert reasons[0].startswith("silence") and reasons[1] == "skin contact regained"
    run(go, bz)


# ---------------------------------------------------------------------- the bio service
def test_bio_config_checks_name_key_value_and_what_is_allowed():
    bio = check_bio({"sensors": f"{A}, Polar H10 0001", "labels": "alice, bob"})
    assert sensor_targets(bio) == [A, "Polar H10 0001"] and bio["reconnect_max_s"] == 30.0
    shared = {"sensors": A, "window_s": 120.0, "mappings": [{"source": "rmssd_ms"}]}
    assert "window_s" not in check_bio(shared)  # bio_modulation's keys are accepted, not ours
    assert set(bio_modulation_table(shared)) == {"window_s", "mappings"}
    for raw, words in [({"sensors": f"{A},{A.lower()}"}, ["sensors", "twice"]),
                       ({"sensors": "x, y", "labels": "a"}, ["labels", "1 labels for 2"]),
                       ({"reconnect_max_s": 0.1}, ["reconnect_max_s", "out of range"]),
                       ({"reconnect_min_s": 9.0, "reconnect_max_s": 5.0}, ["min <= max"]),
                       ({"sensor": "x"}, ["unknown key 'sensor'"])]:
        with pytest.raises(ConfigError) as err:
            check_bio(raw, "box.toml")
        assert all(w in str(err.value) for w in ["box.toml", *words]), str(err.value)


def test_bio_service_publishes_status_events_beats_and_feeds_on_beat(bz):
    bz.add_sensor(A, "Polar H10 0001")
    bz.add_sensor(B, "TICKR 0002")
    consumed: list[Beat] = []
    bio = check_bio({"sensors": f"{A}, TICKR 0002", "labels": "alice, bob",
                     "reconnect_min_s": 0.1, "reconnect_max_s": 1.0, "status_interval_ms": 50})
    rdir = Path(tempfile.mkdtemp(prefix="bio-"))  # short: ipc:// paths stay under 108 chars
    states: list[tuple[str, str]] = []
    ticks: list[float] = []
    svc = BioService(bio, rdir, on_beat=consumed.append,
                     on_state=lambda sensor, state: states.append((sensor, state)),
                     tick=lambda: ticks.append(time.monotonic()),
                     extra_status=lambda: {"ticks": len(ticks)})
    listener = BusListener(rdir, rescan_s=0.1)
    seen: list[tuple[str, dict]] = []

    async def pump(cond: Callable[[], bool], what: str) -> None:
        async def poll() -> bool:
            seen.extend(listener.poll())
            return cond()
        end = time.monotonic() + WAIT_S
        while not await poll():
            if time.monotonic() > end:
                pytest.fail(f"timed out waiting for {what}; seen {[t for t, _ in seen][-5:]}")
            await asyncio.sleep(0.05)

    def latest_status() -> dict:
        return [d for t, d in seen if t == "status.bio"][-1]

    async def go() -> None:
        task = asyncio.create_task(svc.run_async())
        try:
            await pump(lambda: any(t == "status.bio" for t, _ in seen), "status.bio")
            await asyncio.to_thread(bz.wait_subscribed, A, WAIT_S)
            await asyncio.to_thread(bz.wait_subscribed, B, WAIT_S)
            await asyncio.to_thread(bz.notify, A, spec_packet(0x10, 64, 0, [937]))
            await asyncio.to_thread(bz.notify, B, b"\x10\x48\x00")  # malformed
            await asyncio.to_thread(bz.notify, B, spec_packet(0x10, 88, 0, [698]))
            await pump(lambda: len(consumed) == 2 and [
                s["counters"]["malformed"] for s in latest_status()["sensors"]] == [0, 1],
                "two beats and the malformed count")
            await asyncio.to_thread(bz.drop, A)
            await pump(lambda: any(d.get("event") == "lost" for t, d in seen
                                   if t == "event.bio"), "event lost")
        finally:
            svc.stop()
            await asyncio.wait_for(task, WAIT_S)

    try:
        asyncio.run(go())
    finally:
        svc.close()
        listener.close()
        shutil.rmtree(rdir, ignore_errors=True)
    assert sorted((b.sensor, b.bpm) for b in consumed) == [("alice", 64), ("bob", 88)]
    beats = [d for t, d in seen if t == "beat.bio"]
    assert sorted((d["sensor"], d["rr_ms"][0]) for d in beats) == [
        ("alice", 937 * 1000 / 1024), ("bob", 698 * 1000 / 1024)]
    kinds = [(d["event"], d["sensor"]) for t, d in seen if t == "event.bio"]
    assert {("connected", "alice"), ("connected", "bob"), ("malformed", "bob"),
            ("lost", "alice")} <= set(kinds)
    st = [d for t, d in seen if t == "status.bio"]
    first_connected = next(d for d in st if all(s["state"] == "connected" for s in d["sensors"]))
    assert {s["sensor"]: (s["location"], s["battery_pct"]) for s in first_connected["sensors"]} \
        == {"alice": ("chest", 87), "bob": ("chest", 87)}
    assert all(line.startswith("  heart") for line in bio_lines(st[-1]))
    assert {("alice", "connected"), ("bob", "connected"), ("alice", "lost")} <= set(states)
    assert len(ticks) > 3 and st[-1]["modulation"]["ticks"] > 0  # the seams for bio_modulation


def test_simulated_sensor_is_labelled_and_beats():
    bio = check_bio({"simulated": True, "simulated_count": 2, "status_interval_ms": 50})
    got: list[Beat] = []
    svc = BioService(bio, None, on_beat=got.append)
    for s in svc.sensors:
        s.notify_interval_s = 0.05  # faster than a strap, same code path

    async def go() -> None:
        task = asyncio.create_task(svc.run_async())
        await until(lambda: sum(len(b.rr_ms) for b in got) >= 6, "simulated RR intervals")
        svc.stop()
        await asyncio.wait_for(task, WAIT_S)

    asyncio.run(go())
    st = svc.status()
    assert st["simulated"] and all(s["simulated"] for s in st["sensors"])
    assert {b.sensor for b in got} <= {"SIMULATED 1", "SIMULATED 2"}
    rr = [v for b in got for v in b.rr_ms]
    assert all(250 <= v <= 2000 for v in rr)
    # intervals are whole 1/1024 s, as a strap sends them
    assert all(abs(v * 1024 / 1000 - round(v * 1024 / 1000)) < 1e-6 for v in rr)
    gen = RRGenerator(bpm=60.0, seed=3)
    series = gen.series(300)
    assert abs(sum(series) / len(series) - 1000.0) < 30.0  # mean RR from bpm


def test_cli_bio_scan_prints_the_sensors(bz, capsys):
    bz.add_sensor(A, "Polar H10 0001", rssi=-52)
    bz.add_sensor("C0:FF:EE:00:00:09", "Keyboard", heart_rate=False)
    ap = argparse.ArgumentParser(prog="echoel")
    add_bio_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["bio", "scan", "--timeout", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["address", "rssi", "name"]
    assert len(out) == 2 and out[1].split()[0] == A and out[1].endswith("Polar H10 0001")
    args = ap.parse_args(["bio", "run", "--sensor", A, "--sensor", A.lower()])
    assert args.func(args) == 2  # the same sensor twice: a config error, said so
    assert "twice" in capsys.readouterr().out
