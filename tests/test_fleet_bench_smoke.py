"""The fleet benchmark's machinery, small: a few dozen simulated boxes (bench/fleet_sim.py)
against real mosquitto and `echoel fleet serve` on SQLite, checked against the store itself.

The reference is the boxes' own account (which seqs each made), read back through the fleet's
own store API (FleetStore), not the benchmark's reader."""

from __future__ import annotations

import math
import shutil

import pytest
from echoel.fleet.broker_process import Broker
from echoel.fleet.store import FleetStore
from fleet_rig import wait_for
from rig import short_tmpdir

from bench.fleet_bench import Case, StoreSink, clear_sessions, run_case
from bench.fleet_sim import SERVICE, SimFleet, ensure_pki

pytestmark = pytest.mark.timeout(120)
BOXES = 30


@pytest.fixture(scope="module")
def fleet():
    """Broker, the fleet service (SQLite, own process) and 30 connected simulated boxes."""
    root = short_tmpdir()
    pki = ensure_pki(BOXES)
    broker = Broker(pki, root / "broker")
    broker.start()
    db = str(root / "fleet.db")
    sink = StoreSink("sqlite", pki, broker.port, db, root / "svc")
    sims = SimFleet(pki, broker.port, BOXES, procs=2)
    ctx: dict = {}
    try:
        c = sims.connect(60.0)
        assert c["up"] == BOXES, f"boxes that did not connect: {c}"
        sims.confirmations(True)
        ctx = {"pki": pki, "broker": broker, "db": db, "sink": sink, "sims": sims,
               "root": root}
        yield ctx
    finally:
        sims.stop()
        ctx.get("sink", sink).stop()
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


def _store_has(db: str, boxes: dict[str, tuple[int, int]]) -> list[str]:
    """Boxes whose seqs lo..hi are not all in the store (the lead's store API)."""
    store = FleetStore(db)
    try:
        return [d for d, (lo, hi) in boxes.items()
                if not set(range(lo, hi + 1)) <= set(store.seqs(d))]
    finally:
        store.close()


def test_births_reach_the_store(fleet):
    store = FleetStore(fleet["db"])
    try:
        devs = wait_for(lambda: [d for d in store.devices() if d["state"] == "online"]
                        if len(store.devices()) >= BOXES else None, 20,
                        what="every simulated box online in the store")
    finally:
        store.close()
    assert len(devs) == BOXES
    assert {d["state_seq"] for d in devs} == {1}, "birth seq: the box's first connection"
    assert {d["group"] for d in devs} == {"sim"}


def test_steady_reports_are_all_stored_and_confirmed(fleet):
    logs: list[str] = []
    w = run_case(fleet["sims"], fleet["sink"], Case("steady", seconds=4.0, period=1.0),
                 fleet["broker"].proc.pid, logs.append, stored_wait_s=30.0)
    assert w["made"] >= BOXES * 3, w
    assert w["drained"], "some reports were never confirmed by the fleet service"
    assert w["confirmed"] == w["made"] and w["rejected"] == 0
    assert w["lost"] == 0 and w["stored"] == w["made"], w
    win = fleet["sims"].window(True)
    assert _store_has(fleet["db"], win.boxes) == []
    lag = w["lag_s"]
    assert 0.0 <= lag["p50"] <= lag["p99"] <= lag["max"] < 30.0, lag
    assert w["confirm_lag_s"]["p99"] >= lag["p50"], "confirmed before it was stored?"
    assert math.isfinite(w["cpu_pct"]["sink"]) and w["sink_peak_rss_mb"] > 10.0
    assert 500 < w["bytes_per_msg"] < 1000, "telemetry of the agent's size"
    assert logs and "lost 0" in logs[0]


def test_burst_then_backlog_across_a_service_restart_loses_nothing(fleet):
    sims, sink = fleet["sims"], fleet["sink"]
    w = run_case(sims, sink, Case("bursts", bursts=1), fleet["broker"].proc.pid,
                 lambda m: None, stored_wait_s=30.0)
    assert w["made"] == BOXES and w["lost"] == 0 and w["stored"] == BOXES, w
    # the service goes down; its session stays; the boxes report; the broker queues
    sink.stop()
    sims.mark()
    sims.burst(5)
    assert sims.flushed(30.0), "the broker did not acknowledge the reports"
    assert sims.window(False).confirmed == 0, "confirmed while the service was down"
    fleet["sink"] = sink = StoreSink("sqlite", fleet["pki"], fleet["broker"].port, fleet["db"],
                                     fleet["root"] / "svc")
    assert sims.drain(60.0), "the restarted service did not confirm the backlog"
    win = sims.window(True)
    assert win.made == 5 * BOXES and win.confirmed == win.made
    assert _store_has(fleet["db"], win.boxes) == []
    assert "session resumed" in sink.log()


def test_boxes_send_again_what_a_cleared_session_lost(fleet):
    sims = fleet["sims"]
    sims.confirmations(True, period=1.0)  # unconfirmed after 5 s: send again
    fleet["sink"].stop()
    clear_sessions(fleet["pki"], fleet["broker"].port, SERVICE)
    sims.mark()
    sims.burst(1)  # nobody subscribed: the broker acknowledges and drops them
    assert sims.flushed(30.0)
    fleet["sink"] = sink = StoreSink("sqlite", fleet["pki"], fleet["broker"].port, fleet["db"],
                                     fleet["root"] / "svc")
    started = sink.log()
    assert started.count("session new") == 2 and "session resumed" not in started
    assert sims.drain(60.0), "unconfirmed reports were not sent again"
    win = sims.window(True)
    assert win.resent >= BOXES and win.confirmed == win.made == BOXES
    assert _store_has(fleet["db"], win.boxes) == []
