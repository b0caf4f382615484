"""The engine on real ALSA PCMs (JACK dummy server), driven and measured by a studio harness.

The harness plays into the engine's capture and records its playback through JACK; the
engine's round-trip latency is the harness lag through the engine minus the harness lag on a
direct connection, measured in the same run. The machine stalls now and then: measurements
that saw an xrun (harness or engine) are repeated, a few times at most.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from echoel.daemon.engine_shared import EngineShared
from echoel.daemon.spsc_ring import Ring
from rig import CH, PERIOD, RATE, Daemon, Harness, HarnessStuckError, find_lag, noise

PREFILL = 2
TRIES = 4


@pytest.fixture(scope="module")
def harness(rig):
    h = Harness()
    yield h
    h.close()


@pytest.fixture(scope="module")
def daemon(rig, harness):
    d = Daemon(rig, extra='[[taps]]\nname = "slow"\nsource = "input"\nslots = 16\n')
    d.wait_running()
    rig.wait_patched()
    yield d
    assert d.stop() == 0, d.output()


def clean_run(rig, daemon: Daemon | None, harness: Harness, sig: np.ndarray, on_block=None,
              before_each=None, check=None) -> np.ndarray:
    """A recording during which neither the harness nor the engine saw an xrun.

    JACK can also skip a late client for a cycle without ALSA seeing an xrun (jackd logs
    "client ... was not finished"): `check(rec)` tells whether a run came through whole; a
    run that fails it is tried again, and a real fault fails every try.
    """
    why = []
    for _ in range(TRIES):
        if before_each:
            before_each()
        before = daemon.status()["xruns"] if daemon else None
        try:
            rec, hx = harness.play_record(sig, on_block=on_block)
        except HarnessStuckError as exc:
            why.append(f"stuck: {exc}")
            continue
        after = daemon.status()["xruns"] if daemon else None
        if hx == 0 and after == before:
            if check is None or check(rec):
                return rec
            why.append("the recording failed the check")
            continue
        why.append(f"harness odd blocks {harness.odd[:5]}, engine xruns {before} -> {after}")
    pytest.fail(f"every measurement saw an xrun or a stuck client: {why}; load "
                f"{os.getloadavg()}")


def test_unity_chain_is_bit_exact_and_meters_see_it(rig, daemon, harness):
    sig = noise(RATE // 2)  # uniform in +-0.25: peaks near -12 dBFS
    seen: dict = {}

    def look(k):  # status is asked from another thread while the signal plays
        if k == 150:
            threading.Thread(target=lambda: seen.update(daemon.status()), daemon=True).start()

    def exact(rec):
        lag = find_lag(sig, rec)
        return np.array_equal(rec[lag:lag + len(sig)], sig)

    clean_run(rig, daemon, harness, sig, on_block=look, check=exact)  # fails unless exact
    for key in ("in_peak_dbfs", "out_peak_dbfs"):  # levels came through the meter ring
        assert all(-13.0 < v < -11.9 for v in seen["levels"][key]), seen["levels"]


def probe(daemon: Daemon) -> dict:
    """Round trip through a loopback (box_play:out_000 -> box_cap:in_000), measured by the
    engine itself: it mutes, sends one impulse and times its return."""
    r = daemon.request({"cmd": "probe"}, timeout=10)
    assert r["ok"], r
    return r


@pytest.fixture
def loopback(rig, daemon):
    """The engine's output 1 wired to its input 1 (JACK then runs playback before capture)."""
    assert rig.server.connect("box_play:out_000", "box_cap:in_000")
    yield
    rig.server.disconnect("box_play:out_000", "box_cap:in_000")


def test_round_trip_latency_is_prefill_times_period(daemon, loopback):
    for _ in range(3):
        r = probe(daemon)
        assert r["frames"] == PREFILL * PERIOD == r["expected_frames"], r
    assert daemon.status()["measured_latency_ms"] == pytest.approx(
        PREFILL * PERIOD * 1000 / RATE, abs=0.01)


def test_gain_change_applies_within_two_periods_without_a_step(rig, daemon, harness):
    n = RATE  # 1 s of noise (not a sine: its lag would be ambiguous by whole cycles)
    sig = noise(n, seed=5)
    at_block = 100
    sent = {}
    go = threading.Event()

    def sender():  # the command goes out from another thread: the harness never waits
        go.wait()
        sent["reply"] = daemon.set("chain.gain_db", -6.0)
        sent["ack_block"] = sent["block"]

    def on_block(k):
        sent["block"] = k
        if k == at_block:
            go.set()

    def reset():
        daemon.set("chain.gain_db", 0.0)
        time.sleep(0.2)
        go.clear()
        sent.clear()
        threading.Thread(target=sender, daemon=True).start()

    head = at_block * PERIOD // 2  # before the change the copy is exact: it gives the lag

    def exact_head(rec):
        lag = find_lag(sig[:head], rec[: head + 4 * RATE // 10])
        return np.array_equal(rec[lag:lag + head], sig[:head])

    rec = clean_run(rig, daemon, harness, sig, on_block=on_block, before_each=reset,
                    check=exact_head)
    assert sent["reply"]["ok"] and sent["reply"]["applied"] == "live"
    lag = find_lag(sig[:head], rec[: head + 4 * RATE // 10])
    out = rec[lag:lag + n, 0].astype(np.float64)
    x = sig[:, 0].astype(np.float64)
    ok = np.abs(x) > 0.05
    g = np.full(n, np.nan)
    g[ok] = out[ok] / x[ok]
    idx = np.flatnonzero(ok)
    moving = idx[np.abs(g[idx] - 1.0) > 1e-6]
    assert moving.size, "the gain never changed"
    start = moving[0]
    # At harness block k the engine processes signal samples between k * PERIOD - outside
    # and k * PERIOD, where `outside` is the part of the lag that is not the engine's. The
    # engine applies a change from the next block it processes: within 2 periods of the
    # reply (1 more for jitter), and never before the command was sent.
    outside = lag - PREFILL * PERIOD
    assert at_block * PERIOD - outside - PERIOD <= start <= (sent["ack_block"] + 3) * PERIOD, \
        (start, lag, sent)
    after = idx[idx >= start]
    gv = g[after]
    assert np.all(np.diff(gv) <= 1e-6), "gain must move monotonically down"
    # per-sample slope: a 10 ms smoother starts at about 0.001 per sample; a step is 0.5
    slope = np.abs(np.diff(gv)) / np.diff(after)
    assert np.max(slope) < 0.002, "a step in the gain (click)"
    assert gv[-1] == pytest.approx(10 ** (-6 / 20), abs=1e-4)
    daemon.set("chain.gain_db", 0.0)
    time.sleep(0.3)  # 30 time constants: back at exactly unity for the next test


def test_forced_xrun_is_counted_recovered_and_latency_unchanged(rig, daemon, harness,
                                                                loopback):
    assert probe(daemon)["frames"] == PREFILL * PERIOD
    before = daemon.status()
    pid = before["engine_pid"]
    log_before = len(daemon.output())
    # The audio thread stalls far past the device buffer (10.7 ms). (SIGSTOP would not do:
    # it also stops the JACK plugin's thread in the engine process, and JACK skips it.)
    assert daemon.request({"cmd": "stall", "ms": 150})["ok"]
    s = daemon.wait_for(lambda s: sum(s["xruns"].values()) > sum(before["xruns"].values())
                        and s["state"] == "running", 10, "the xrun to be counted")
    assert s["last_xrun_s_ago"] is not None
    assert s["engine_pid"] == pid, "recovered in place, not by restarting the engine"
    assert probe(daemon)["frames"] == PREFILL * PERIOD
    # one burst -> one event, not one log line per xrun (a stall of the machine itself may
    # add one more burst meanwhile)
    time.sleep(1.5)
    assert 1 <= daemon.output()[log_before:].count("audio dropout") <= 2


def test_stalled_or_dead_consumer_never_stalls_the_loop(daemon):
    shared = EngineShared.attach(daemon.instance)
    tap: Ring = shared.rings["tap.slow"]
    tap.skip_to_latest()
    block = np.zeros(PERIOD * CH, np.float32)
    got = 0
    for _ in range(200):  # a live consumer first: it gets blocks
        if tap.pop(block) is not None:
            got += 1
        else:
            time.sleep(0.002)
    assert got > 20
    s0 = daemon.status()
    time.sleep(2.0)  # the consumer stops reading: the 16-slot ring fills
    s1 = daemon.status()
    blocks = s1["blocks"] - s0["blocks"]
    assert blocks > 0.7 * 2.0 * RATE / PERIOD, "the loop slowed down with a stalled consumer"
    assert s1["tap_overflows"] - s0["tap_overflows"] >= blocks - 16 - 5
    assert s1["state"] == "running"


def test_commands_bad_and_good(daemon):
    bad = [
        ({"cmd": "set", "key": "chain.gain_db", "value": "loud"}, ["chain.gain_db", "loud",
                                                                  "number"]),
        ({"cmd": "set", "key": "chain.gain_db", "value": 99}, ["99", "-60 to 24"]),
        ({"cmd": "set", "key": "chain.nope", "value": 1}, ["chain.nope", "unknown"]),
        ({"cmd": "set", "key": "engine.period", "value": 7}, ["period", "32 to 1024"]),
        ({"cmd": "fly"}, ["fly", "allowed"]),
        ({"cmd": "stall", "ms": 10**6}, ["1000000", "1 to 5000"]),
        ({"nocmd": 1}, ["cmd"]),
        ({"cmd": "modulate", "values": {"engine.period": 64}}, ["engine.period",
                                                                "not a live parameter"]),
        ({"cmd": "modulate", "values": {"chain.gain_db": 99}}, ["99", "-60 to 24"]),
        ({"cmd": "modulate", "values": []}, ["values"]),
    ]
    for req, words in bad:
        r = daemon.request(req)
        assert r["ok"] is False, req
        for w in words:
            assert w in r["error"], (w, r["error"])
    assert daemon.status()["state"] == "running"
    cfg = daemon.request({"cmd": "config"})["config"]
    assert cfg["chain"]["gain_db"] == 0.0  # the refused changes left the config alone
    applied = daemon.status()["params"]["applied"]
    r = daemon.request({"cmd": "modulate", "values": {"chain.gain_db": -0.5}})
    assert r["ok"] and r["modulated"] == ["chain.gain_db"]
    s = daemon.wait_for(lambda s: s["params"]["applied"] > applied, 5, "the modulation")
    assert s["params"]["modulated"] == {"chain.gain_db": -0.5}
    assert daemon.request({"cmd": "config"})["config"]["chain"]["gain_db"] == 0.0
    assert daemon.request({"cmd": "modulate", "values": {"chain.gain_db": 0.0}})["ok"]


def test_malformed_requests_leave_the_daemon_running(daemon):
    import zmq
    from echoel.daemon import bus

    ctx = zmq.Context.instance()
    for raw in (b"not json", b"[1,2]", b"\xff\xfe", b"{" * 10):
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(bus.endpoints(daemon.run_dir)[1])
        s.send(raw)
        assert s.poll(5000)
        import json

        reply = json.loads(s.recv())
        assert reply["ok"] is False and "bad request" in reply["error"]
        s.close()
    assert daemon.status()["state"] == "running"


def test_bus_publishes_status(daemon):
    import json

    import zmq
    from echoel.daemon import bus

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"status")
    sub.connect(bus.endpoints(daemon.run_dir)[0])
    try:
        assert sub.poll(5000)
        topic, body = sub.recv_multipart()
        assert topic == b"status" and json.loads(body)["instance"] == daemon.instance
    finally:
        sub.close(0)
