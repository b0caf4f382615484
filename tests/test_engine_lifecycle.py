"""The daemon's life on real ALSA PCMs (JACK dummy server): reconfiguration, bad devices,
hotplug, missing privileges, crashes and shutdown. No harness: these tests stop and start
the JACK server and the engine."""

from __future__ import annotations

import os
import signal
import time

import pytest
from echoel.daemon.shm_segment import SHM_DIR
from rig import Daemon


def test_non_live_change_restarts_the_stream_with_the_new_setting(rig):
    d = Daemon(rig)
    try:
        d.wait_running()
        pid = d.engine_pid()
        r = d.set("engine.periods", 8)
        assert r["ok"] and r["applied"] == "engine restarted"
        s = d.wait_for(lambda s: s["state"] == "running" and s["engine_pid"] != pid
                       and s["periods"] == 8 and s["blocks"] > 10, 60, "restart with periods 8")
        assert s["periods"] == 8
    finally:
        d.stop()


def test_invalid_reload_keeps_the_running_config(rig):
    d = Daemon(rig)
    try:
        d.wait_running()
        good = d.config.read_text()
        d.config.write_text(good.replace("period = 128", "period = 5"))
        os.kill(d.proc.pid, signal.SIGHUP)
        time.sleep(1.0)
        assert "config reload refused" in d.output()
        assert "period = 5" in d.output()
        r = d.request({"cmd": "reload"})
        assert not r["ok"] and "period" in r["error"] and "32 to 1024" in r["error"]
        s = d.status()
        assert s["state"] == "running" and s["period"] == 128
        d.config.write_text(good.replace("[engine]", "[chain]\ngain_db = -3.0\n[engine]"))
        r = d.request({"cmd": "reload"})
        assert r["ok"] and r["applied"] == "live" and r["changed"] == ["chain.gain_db"]
    finally:
        d.stop()


def test_device_that_changes_settings_is_refused_by_name(rig):
    d = Daemon(rig, engine={"format": '"S16_LE"'})
    try:
        s = d.wait_for(lambda s: s["problem"] and "format" in s["problem"], 30,
                       "the mismatch to be reported")
        assert s["state"] == "searching"
        assert "asked S16_LE, device gave FLOAT_LE" in s["problem"]
        assert "box_cap" in s["problem"]
    finally:
        d.stop()
    d = Daemon(rig, engine={"capture_device": '"mono_cap"'})
    try:
        s = d.wait_for(lambda s: s["problem"] and "channels" in s["problem"], 30,
                       "the channel mismatch to be reported")
        assert "channels: asked 2, device gave 1" in s["problem"]
    finally:
        d.stop()


def test_hotplug_interface_goes_and_comes_back(rig):
    d = Daemon(rig)
    try:
        d.wait_running()
        pid = d.proc.pid
        rig.server.stop()  # the interface disappears
        s = d.wait_for(lambda s: s["state"] == "searching", 15, "the loss to be noticed")
        assert s["interface_losses"] >= 1
        assert s["problem"]
        assert d.proc.poll() is None
        time.sleep(0.5)
        rig.restart_server()  # ...and comes back
        s = d.wait_for(lambda s: s["state"] == "running" and s["blocks"] > 0, 30,
                       "the engine to reopen the interface")
        b0 = s["blocks"]
        d.wait_for(lambda s: s["blocks"] > b0 + 100, 30, "audio to flow again")
        assert d.proc.pid == pid and s["engine_restarts"] == 0, "no daemon restart, no crash"
        assert s["engine_reopens"] >= 1
        assert "audio interface lost" in d.output()
    finally:
        d.stop()
        if not rig.server.running:
            rig.restart_server()


def test_missing_privileges_are_named_and_audio_still_flows(rig):
    prefix = ["prlimit", "--rtprio=0:0", "--memlock=65536:65536", "setpriv",
              "--bounding-set=-sys_nice,-ipc_lock", "--inh-caps=-sys_nice,-ipc_lock"]
    d = Daemon(rig, prefix=prefix, extra="")
    try:
        s = d.wait_running()
        s = d.wait_for(lambda s: "sched_fifo" in s["missing_guarantees"], 10,
                       "missing guarantees")
        miss = s["missing_guarantees"]
        assert "sched_fifo" in miss and "RLIMIT_RTPRIO" in miss["sched_fifo"]
        assert "mlock" in miss and "LimitMEMLOCK" in miss["mlock"]
        assert "affinity" not in miss
        d.wait_for(lambda s: "real-time guarantee missing: sched_fifo" in d.output(), 5,
                   "the log line")
    finally:
        d.stop()


def test_engine_crash_is_restarted_by_the_supervisor(rig):
    d = Daemon(rig)
    try:
        d.wait_running()
        pid = d.engine_pid()
        os.kill(pid, signal.SIGKILL)
        s = d.wait_for(lambda s: s["state"] == "running" and s["engine_pid"] != pid
                       and s["blocks"] > 10, 30, "the engine to be restarted")
        assert s["engine_restarts"] == 1
        assert "engine process exited" in d.output()
    finally:
        d.stop()


def test_sigterm_stops_everything(rig):
    d = Daemon(rig)
    d.wait_running()
    pid = d.engine_pid()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
    assert not list(SHM_DIR.glob(f"echoel.{d.instance}.*")), "shared memory left behind"
    d.stop()


def test_a_received_stream_is_mixed_into_the_engine_input(rig):
    """The return ring of a [[streams]] receive entry (what the streams service writes) is
    played into the engine's input: a -6 dBFS sine comes out at its level, and an absent
    stream is counted, never waited for."""
    import threading

    import numpy as np
    from echoel.daemon.engine_shared import EngineShared, return_ring

    d = Daemon(rig, extra='[[streams]]\nname = "studio console"\ndirection = "receive"\n'
                          'address = "239.69.1.2"\n')
    stop = threading.Event()
    try:
        d.wait_running()
        ring = EngineShared.attach(d.instance).rings[return_ring("studio console")]
        period, ch = 128, 2
        t = np.arange(period)[:, None]
        phase = [0]

        def feed() -> None:  # a streams service's pace: keep a few blocks queued
            while not stop.is_set():
                while ring.fill < 8:
                    k = phase[0] + t
                    ring.push(np.repeat(0.5 * np.sin(2 * np.pi * 1000 * k / 48000), ch, 1)
                              .astype(np.float32))
                    phase[0] += period
                time.sleep(0.002)

        before = d.status()["returns"]
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        s = d.wait_for(lambda s: s["returns"]["blocks"] - before["blocks"] > 300, 30,
                       "the stream's blocks to be mixed in")
        time.sleep(0.5)
        s = d.status()
        rms = s["levels"]["out_rms_dbfs"]
        assert all(abs(v - (-9.03)) < 1.0 for v in rms), s["levels"]  # 0.5 sine: -9.03 dBFS
        stop.set()
        feeder.join(2)
        e0 = d.status()["returns"]["empty"]
        s = d.wait_for(lambda s: s["returns"]["empty"] - e0 > 200, 30,
                       "blocks without the stream to be counted")
        assert s["state"] == "running"
    finally:
        stop.set()
        d.stop()
