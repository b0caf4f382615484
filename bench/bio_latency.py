"""Issue 7: heart-rate notification -> engine parameter latency, end to end.

The stage: a JACK dummy server and the real daemon (`echoel run`, bench/bench_rig.py) whose
supervisor answers on control.sock; the BlueZ stand-in on a private D-Bus
(tests/bluez_standin.py) with one strap; the bio service (daemon/bio_service.py BioService with
daemon/bio_modulation.py's BioModulation, as `echoel bio run` plugs them) in this process,
bleak's real BlueZ backend in between. The modulation's `send` is the real supervisor sender
wrapped to timestamp each modulate and its answer.

Measured: from just before the stand-in's notify() to the moment the supervisor's answer
(ok) to the modulate carrying that beat's value is back, per notification. The mapping has no
smoothing and the notifications carry no RR intervals (hr_bpm is then the strap's own bpm), so
each beat's value is known exactly: hr_bpm 40..200 -> chain.gain_db -16..0, every beat a new
bpm; notifications are spaced by a random 60-160 ms so they fall at every phase of the
service's 20 ms tick and of the modulation's rate limit. Reference in the same run, same bus:
the bare bleak notification latency (stand-in notify -> a BleakClient start_notify callback).
Cases: the shipped defaults (rate_hz 20: at most one modulate per 50 ms) and rate_hz 100.

`python bench/bio_latency.py [--quick]` prints the rows as a table.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from echoel.daemon import bus  # noqa: E402
from echoel.daemon import config as config_mod  # noqa: E402
from echoel.daemon.bio_modulation import from_config  # noqa: E402
from echoel.daemon.bio_service import BioService, check_bio  # noqa: E402
from echoel.drivers.ble_heart_rate import HEART_RATE_MEASUREMENT  # noqa: E402
from echoel.drivers.ble_scan import DeviceFinder  # noqa: E402
from echoel.drivers.heart_rate_packet import encode_heart_rate  # noqa: E402

from bench.bench_rig import EngineRun, Stage, short_tmpdir  # noqa: E402
from tests.bluez_standin import BlueZStandIn, dbus_daemon_missing  # noqa: E402

GROUP = "bio"
KERNEL = "bio_modulation -> supervisor"
ADDR = "C0:FF:EE:00:00:01"
IN_LO, IN_HI, OUT_LO, OUT_HI = 40.0, 200.0, -16.0, 0.0
TICK_S = 0.02  # BioService's tick interval (what `echoel bio run` uses)
WAIT_S = 30.0


def row(case: str, metric: str, ours: float | None, reference: str = "",
        ref: float | None = None, unit: str = "ms", goal: str = "",
        met: bool | None = None, kernel: str = KERNEL) -> dict:
    """One benchmark row."""
    return {"group": GROUP, "kernel": kernel, "case": case, "metric": metric, "ours": ours,
            "reference": reference, "ref": ref, "unit": unit, "goal": goal, "met": met}


def mapped(bpm: int) -> float:
    """The mapping's value for a bpm (linear, no smoothing)."""
    u = min(max((bpm - IN_LO) / (IN_HI - IN_LO), 0.0), 1.0)
    return OUT_LO + u * (OUT_HI - OUT_LO)


def quantile(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation."""
    s = sorted(xs)
    k = (len(s) - 1) * q
    i = int(k)
    return s[i] if i + 1 >= len(s) else s[i] + (s[i + 1] - s[i]) * (k - i)


class TimedSend:
    """The supervisor sender with each modulate's answer timestamped (CLOCK_MONOTONIC ns)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.log: list[tuple[int, int, float | None, bool]] = []  # sent, answered, value, ok
        self.lock = threading.Lock()

    def __call__(self, msg: dict) -> dict:
        t0 = time.monotonic_ns()
        reply = bus.request(self.run_dir, msg, 1.0)
        t1 = time.monotonic_ns()
        with self.lock:
            self.log.append((t0, t1, msg["values"].get("chain.gain_db"), bool(reply.get("ok"))))
        return reply

    def accepted(self, value: float, after_ns: int) -> int | None:
        """When the supervisor's ok to a modulate of `value` sent after `after_ns` came back."""
        with self.lock:
            for t0, t1, v, ok in self.log:
                if ok and t0 >= after_ns and v is not None and abs(v - value) < 1e-6:
                    return t1
        return None


async def _until(cond: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.001)


async def bare_bleak(bz: BlueZStandIn, n: int) -> list[float]:
    """Stand-in notify -> bleak callback (ms), n notifications: the reference."""
    from bleak import BleakClient

    finder = DeviceFinder()
    try:
        dev = await finder.find(ADDR, WAIT_S)
        if dev is None:
            raise RuntimeError("the stand-in's sensor was not found by a scan")
        got: list[int] = []
        lat = []
        async with BleakClient(dev, timeout=WAIT_S) as c:
            await c.start_notify(HEART_RATE_MEASUREMENT,
                                 lambda _ch, _d: got.append(time.monotonic_ns()))
            for i in range(n):
                t0 = time.monotonic_ns()
                await asyncio.to_thread(bz.notify, ADDR, encode_heart_rate(60 + i % 100))
                await _until(lambda i=i: len(got) > i, "the bare bleak callback")
                lat.append((got[i] - t0) / 1e6)
                await asyncio.sleep(0.02)
    finally:
        await finder.close()
    return lat


async def through_service(bz: BlueZStandIn, run_dir: Path, n: int, rate_hz: float,
                          seed: int) -> tuple[list[float], list[float], int]:
    """Stand-in notify -> supervisor's ok to the modulate with that beat's value (ms), n
    notifications; also the modulate round trips (ms) and the send errors."""
    cfg = config_mod.defaults()
    raw = {"rate_hz": rate_hz, "mappings": [{
        "source": "hr_bpm", "target": "chain.gain_db", "in_lo": IN_LO, "in_hi": IN_HI,
        "out_lo": OUT_LO, "out_hi": OUT_HI, "smoothing_s": 0.0, "fade_in_s": 0.05,
        "fade_out_s": 0.05}]}
    send = TimedSend(run_dir)
    mod = from_config(cfg, raw, "bench", send=send)
    bio = check_bio({"sensors": ADDR, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0})
    svc = BioService(bio, None, on_beat=mod.on_beat, on_state=mod.on_sensor_state,
                     tick=mod.tick, tick_interval_s=TICK_S, extra_status=mod.status)
    task = asyncio.create_task(svc.run_async())
    rng = random.Random(seed)
    lat: list[float] = []
    try:
        await asyncio.to_thread(bz.wait_subscribed, ADDR, WAIT_S)
        # fade in first (presence 0 -> 1), then every beat a new bpm
        await asyncio.to_thread(bz.notify, ADDR, encode_heart_rate(41))
        await _until(lambda: send.accepted(mapped(41), 0) is not None, "the first modulate")
        await asyncio.sleep(0.2)
        bpm = 41
        for _ in range(n):
            bpm = 42 + (bpm - 41) % 150  # 42..191, never the previous value
            await asyncio.sleep(rng.uniform(0.06, 0.16))
            t0 = time.monotonic_ns()
            if not await asyncio.to_thread(bz.notify, ADDR, encode_heart_rate(bpm)):
                raise RuntimeError("the stand-in's sensor is not subscribed")
            want = mapped(bpm)
            await _until(lambda v=want, t0=t0: send.accepted(v, t0) is not None,
                         f"the modulate for {bpm} bpm")
            t1 = send.accepted(want, t0)
            assert t1 is not None
            lat.append((t1 - t0) / 1e6)
    finally:
        svc.stop()
        await asyncio.wait_for(task, WAIT_S)
        svc.close()
    with send.lock:
        rtt = [(t1 - t0) / 1e6 for t0, t1, _, ok in send.log if ok]
    return lat, rtt, mod.send_errors


def _latency_rows(case: str, lat: list[float], ref: list[float], rate_hz: float) -> list[dict]:
    bound = TICK_S * 1e3 + 1e3 / rate_hz  # a tick, and the rate limit's wait at most
    p50, p99 = statistics.median(lat), quantile(lat, 0.99)
    r50, r99 = statistics.median(ref), quantile(ref, 0.99)
    ref_name = "bare bleak notify callback"
    return [
        row(case, "notify -> supervisor accepted, p50", round(p50, 3), ref_name, round(r50, 3),
            goal=f"<= ref p50 + tick + rate limit ({bound:g} ms) + 5 ms",
            met=p50 <= r50 + bound + 5.0),
        row(case, "notify -> supervisor accepted, p99", round(p99, 3), ref_name, round(r99, 3),
            goal="< 100 ms (a tenth of a beat at 60 bpm)", met=p99 < 100.0),
    ]


def bench_latency(quick: bool) -> list[dict]:
    """The stage, the reference and the cases; rows (a skipped row if a tool is missing)."""
    why = dbus_daemon_missing() or (None if shutil.which("jackd") else
                                    "jackd is not installed (Debian package jackd2)")
    if why:
        return [row(f"skipped: {why}", "notify -> supervisor accepted, p50", None)]
    n = 30 if quick else 300
    cases = [20.0] if quick else [20.0, 100.0]
    work = short_tmpdir("ebio")
    old = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    stage = Stage(48000, 128, 2, work / "stage")
    engine: EngineRun | None = None
    rows: list[dict] = []
    try:
        stage.start()
        engine = EngineRun(stage, work / "engine", {"period": 128, "periods": 4, "prefill": 2},
                           {"cpu": -1}, cap_seconds=1800.0)
        engine.start()
        engine.wait_running()
        with BlueZStandIn() as bz:
            bz.add_sensor(ADDR, "Polar H10 BENCH")
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bz.address
            ref = asyncio.run(bare_bleak(bz, n))
            rtts: list[float] = []
            errors = 0
            for k, rate_hz in enumerate(cases):
                lat, rtt, err = asyncio.run(through_service(bz, engine.run_dir, n, rate_hz, k))
                rtts += rtt
                errors += err
                what = "defaults" if rate_hz == 20.0 else "rate_hz"
                rows += _latency_rows(f"{n} beats, {what} {rate_hz:g}/s, tick 20 ms", lat, ref,
                                      rate_hz)
        rows.append(row(f"{len(rtts)} modulate requests", "control.sock round trip, p50",
                        round(statistics.median(rtts), 3), "", None, goal="< 5 ms",
                        met=statistics.median(rtts) < 5.0, kernel="supervisor modulate"))
        rows.append(row(f"{len(rtts)} modulate requests", "modulates refused or lost",
                        float(errors), unit="requests", goal="0", met=errors == 0,
                        kernel="supervisor modulate"))
        status = engine.status()
        rows.append(row("after the runs", "engine xruns", float(sum(status["xruns"].values())),
                        unit="xruns", goal="", met=None, kernel="engine"))
    finally:
        if old is None:
            os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        else:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = old
        if engine is not None:
            engine.kill()
        stage.stop()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def run(quick: bool = False) -> list[dict]:
    """Every row of this module."""
    return bench_latency(quick)


def main() -> None:
    """Print the rows as a table."""
    from bench.bench_all import module_main

    module_main(run, __doc__)


if __name__ == "__main__":
    main()
