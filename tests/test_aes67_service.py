"""The streams service end to end on loopback: a sender on an engine tap (fed like the engine
feeds it), a receiver of the same stream into its playout ring, status.streams on the bus, the
SDP served to `echoel streams sdp`; and the [[streams]] keys refused with clear messages."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from echoel.daemon import config as config_mod
from echoel.daemon import shm_segment
from echoel.daemon.aes67_sources import tone_block
from echoel.daemon.config import ConfigError
from echoel.daemon.spsc_ring import Ring
from echoel.daemon.streams_cli import main as streams_main
from echoel.daemon.streams_service import StreamsService, check_streams, load
from echoel.drivers.sdp_aes67 import parse_sdp

sys.path.insert(0, str(Path(__file__).parent))
from aes67_rig import codes

PERIOD = 128


def _feed(ring: Ring, stop: threading.Event) -> None:
    """The engine's side of a tap: one block per period, stamped with CLOCK_MONOTONIC."""
    n = 0
    t0 = time.monotonic()
    while not stop.is_set():
        due = t0 + (n + 1) * PERIOD / 48000
        d = due - time.monotonic()
        if d > 0:
            time.sleep(d)
        ring.push(tone_block(n * PERIOD, PERIOD, 2, 48000), time.monotonic_ns())
        n += 1


def _found(chunk: np.ndarray, ref: np.ndarray) -> bool:
    for k in np.flatnonzero(np.all(ref == chunk[0], axis=1)):
        if np.array_equal(ref[k:k + len(chunk)], chunk):
            return True
    return False


def test_service_sends_a_tap_receives_it_and_serves_status_and_sdp(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setattr(shm_segment, "SHM_DIR", tmp_path)
    cfg_file = tmp_path / "box.toml"
    cfg_file.write_text(f"""
[daemon]
instance = "aes67t"
run_dir = "{tmp_path}/run"
[engine]
period = {PERIOD}
[[taps]]
name = "aes"
source = "output"
[[streams]]
name = "out 1-2"
tap = "aes"
address = "127.0.0.1"
port = 25004
announce = false
[[streams]]
name = "back"
direction = "receive"
address = "127.0.0.1"
port = 25004
latency_ms = 10.0
""")
    cfg, streams = load(cfg_file)
    tap = Ring.create(shm_segment.segment_path("aes67t", "ring.tap.aes"), 256, PERIOD * 2)
    stop = threading.Event()
    feeder = threading.Thread(target=_feed, args=(tap, stop))
    feeder.start()
    svc = StreamsService(cfg, streams)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc://{tmp_path}/run/bus-streams.sock")
    runner = threading.Thread(target=svc.run, args=(4.0,))
    runner.start()
    try:
        time.sleep(1.0)
        out_ring = Ring.attach(shm_segment.segment_path("aes67t", "ring.stream.back"))
        assert streams_main(["--run-dir", f"{tmp_path}/run", "sdp", "out 1-2"]) == 0
        sdp = capsys.readouterr().out
        assert parse_sdp(sdp).name == "out 1-2" and "a=mediaclk:direct=0" in sdp
        assert (tmp_path / "run" / "streams" / "out_1-2.sdp").read_bytes().decode() == sdp
        got = np.zeros(PERIOD * 2, np.float32)
        blocks = []
        out_ring.skip_to_latest()
        end = time.monotonic() + 1.5
        while time.monotonic() < end:  # the engine's side: drain the playout ring
            while out_ring.pop(got) is not None:
                blocks.append(got.reshape(PERIOD, 2).copy())
            time.sleep(0.05)
        status = None
        events = []
        while sub.poll(100):
            topic, body = sub.recv_multipart()
            doc = json.loads(body)
            if topic == b"status.streams":
                status = doc
            else:
                events.append(doc)
    finally:
        runner.join(15)
        stop.set()
        feeder.join()
        sub.close()
        shm_segment.remove(tap.path)
    assert not runner.is_alive()
    assert {(e["event"], e["name"]) for e in events} >= {("started", "out 1-2"),
                                                         ("started", "back")}
    rows = {r["name"]: r for r in status["streams"]}
    assert rows["out 1-2"]["packets"] > 1000 and rows["out 1-2"]["source"]["kind"] == "tap"
    assert rows["back"]["received"] > 1000 and rows["back"]["malformed"] == 0, rows["back"]
    assert status["clock"]["mode"] == "unsynchronised"
    # the played-out ring carries the tap's tone, bit-exact (24-bit) in 10 ms stretches (the
    # drift correction may slip a frame between them; the tap is fed by a thread of this
    # process, less regular than the engine)
    audio = codes(np.concatenate(blocks))
    audio = audio[np.flatnonzero(np.any(audio != 0, axis=1))[0]:]
    ref = codes(tone_block(0, 48000 + 480, 2, 48000))
    chunks = [audio[i:i + 480] for i in range(0, len(audio) - 480, 480)]
    exact = sum(1 for c in chunks if _found(c, ref))
    assert len(chunks) > 100 and exact >= 0.9 * len(chunks), (exact, len(chunks), rows)
    # the service cleaned up: no playout ring, no SDP file
    assert not (tmp_path / "run" / "streams" / "out_1-2.sdp").exists()
    assert not shm_segment.segment_path("aes67t", "ring.stream.back").exists()


@pytest.mark.parametrize("table,words", [
    ({"name": "a", "tap": "aes"}, "a sender needs a destination address"),
    ({"name": "a", "address": "239.1.1.1"}, "a sender needs the engine tap"),
    ({"name": "a", "tap": "nope", "address": "239.1.1.1"}, "tap = 'nope': no such [[taps]]"),
    ({"name": "a", "tap": "aes", "address": "239.1.1.1", "dscp": "AF99"}, "dscp = 'AF99'"),
    ({"name": "a", "tap": "aes", "address": "239.1.1", "port": 5004}, "address = '239.1.1'"),
    ({"name": "a", "tap": "aes", "address": "239.1.1.1", "rate": 96000},
     "rate = 96000: a sender runs at the engine's rate (48000)"),
    ({"name": "a", "tap": "aes", "address": "239.1.1.1", "ptime_us": 333}, "ptime_us = 333"),
    ({"name": "a", "direction": "receive"}, "give exactly one of address, sdp_file, source"),
    ({"name": "a", "direction": "receive", "address": "239.1.1.1", "source": "x"},
     "got address, source"),
    ({"name": "a/b", "tap": "aes", "address": "239.1.1.1"}, "name = 'a/b'"),
    ({"name": "a", "tap": "aes", "address": "239.1.1.1", "channels": 9}, "channels = 9"),
    ({"name": "a", "tap": "aes", "address": "239.1.1.1", "colour": 1}, "unknown key 'colour'"),
])
def test_stream_tables_are_refused_with_the_key_and_value(table, words):
    taps = [{"name": "aes", "source": "output", "slots": 256}]
    with pytest.raises(ConfigError) as e:
        check_streams("box.toml", [table], taps, 48000)
    assert words in str(e.value)


def test_duplicate_stream_names_are_refused():
    t = {"name": "a", "tap": "aes", "address": "239.1.1.1"}
    with pytest.raises(ConfigError, match="must be unique"):
        check_streams("box.toml", [t, dict(t)], [{"name": "aes"}], 48000)
    assert config_mod.defaults()["engine"]["rate"] == 48000


def test_service_subscribes_to_a_stream_by_its_announced_name(tmp_path, monkeypatch):
    from echoel.drivers.sap import SapBrowser, build_sap
    from echoel.drivers.sdp_aes67 import StreamSdp, build_sdp
    monkeypatch.setattr(shm_segment, "SHM_DIR", tmp_path)
    cfg_file = tmp_path / "box.toml"
    cfg_file.write_text(f"""
[daemon]
instance = "aes67s"
run_dir = "{tmp_path}/run"
[[streams]]
name = "from stage"
direction = "receive"
source = "Stage box 1"
""")
    cfg, streams = load(cfg_file)
    svc = StreamsService(cfg, streams)
    svc.browser = SapBrowser()  # fed by hand below (no socket: no multicast route needed)
    try:
        svc.start()
        assert svc.status()["streams"][0]["state"].startswith("waiting for SAP")
        svc._tick()
        assert "from stage" not in svc.receivers
        other = StreamSdp(name="Someone else", address="127.0.0.1", port=25110, session_id=1)
        svc.browser.feed(build_sap(build_sdp(other), "10.0.0.9"))
        svc.browser.feed(b"\x20\0\0\0\1\2\3\4not an sdp")  # refused, counted
        svc._tick()
        assert "from stage" not in svc.receivers
        wanted = StreamSdp(name="Stage box 1", address="127.0.0.1", port=25112, channels=4,
                           session_id=2)
        svc.browser.feed(build_sap(build_sdp(wanted), "10.0.0.7"))
        svc._tick()
        rx = svc.receivers["from stage"]
        assert (rx.stream.port, rx.stream.channels) == (25112, 4)
        ring = Ring.attach(shm_segment.segment_path("aes67s", "ring.stream.from_stage"))
        assert ring.width == cfg["engine"]["period"] * 4
        st = svc.status()
        assert st["sap"]["refused"] == 1 and st["sap"]["streams"] == 2
    finally:
        svc.close()
