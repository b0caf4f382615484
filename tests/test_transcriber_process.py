"""Live audio-to-MIDI on the engine's tap: a melody played into the box comes out as notes on
the bus and in a MIDI file (the model store's basic-pitch, LiteRT)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mido
import pretty_midi
import pytest
import soundfile as sf
import zmq
from rig import RATE, Daemon

from bench.evalset.render import render

pytestmark = [pytest.mark.jack, pytest.mark.timeout(240)]
TAP = '[[taps]]\nname = "notes"\nsource = "input"\nslots = 512\n'
STORE = Path(__file__).resolve().parents[1] / "build" / "models"
MELODY = (60, 62, 64, 67, 72)


@pytest.fixture(scope="module")
def model_store():
    from echoel.daemon.model_fetch import fetch_into_store

    if not (STORE / "basic-pitch" / "active").exists():
        fetch_into_store(STORE)  # make setup does this; the wheel is cached under build/
    return STORE


def test_a_played_melody_becomes_notes(rig, model_store, tmp_path):
    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    for i, p in enumerate(MELODY):
        piano.notes.append(pretty_midi.Note(100, p, 0.5 + 0.6 * i, 0.5 + 0.6 * i + 0.5))
    pm.instruments.append(piano)
    wav = tmp_path / "melody.wav"
    sf.write(wav, render(pm, RATE), RATE, subtype="FLOAT")
    d = Daemon(rig, extra=TAP)
    svc = None
    smf = tmp_path / "notes.mid"
    # a private context, destroyed at the end: zmq's threads left in this process break the
    # in-process JACK clients of later test modules (the harness)
    ctx = zmq.Context()
    try:
        d.wait_running()
        svc = subprocess.Popen([sys.executable, "-m", "echoel.daemon.cli", "transcriber",
                                "--config", str(d.config), "--store", str(model_store),
                                "--midi", "jack", "--smf", str(smf)],
                               env={**os.environ, **rig.env}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(f"ipc://{d.run_dir}/bus-transcriber.sock")
        end = time.monotonic() + 60
        while time.monotonic() < end and not sub.poll(200):  # up once it publishes status
            assert svc.poll() is None, svc.stdout.read().decode()
        play = subprocess.Popen(["aplay", "-q", "-D", "h_play", str(wav)],
                                env={**os.environ, **rig.env})
        ons, status = [], None
        stop = time.monotonic() + 8.0
        while time.monotonic() < stop:
            if sub.poll(200):
                topic, body = sub.recv_multipart()
                doc = json.loads(body)
                if topic == b"event" and doc["kind"] == "on":
                    ons.append(doc["pitch"])
                elif topic == b"status.transcriber":
                    status = doc
        play.wait(20)
        assert status and status["midi_port"] == "Echoel Box notes"
        hit = [p for p in MELODY if p in ons]
        assert len(hit) >= 4, f"heard {ons}, played {MELODY}"
        svc.terminate()
        assert svc.wait(20) == 0
        svc = None
        written = [m.note for m in mido.MidiFile(smf).tracks[0]
                   if m.type == "note_on" and m.velocity > 0]
        assert sorted(set(written)) == sorted(set(ons))
    finally:
        ctx.destroy(linger=0)
        if svc:
            svc.kill()
            svc.wait()
        d.stop()


def test_missing_tap_or_model_is_refused_clearly(tmp_path):
    cfg = tmp_path / "box.toml"
    cfg.write_text('[daemon]\ninstance = "x2"\n' + TAP)
    r = subprocess.run([sys.executable, "-m", "echoel.daemon.cli", "transcriber", "--config",
                        str(cfg), "--store", str(tmp_path / "nostore"), "--midi", "none"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "basic-pitch" in r.stderr and "make models" in r.stderr, \
        r.stderr
    cfg.write_text('[daemon]\ninstance = "x2"\n')
    r = subprocess.run([sys.executable, "-m", "echoel.daemon.cli", "transcriber", "--config",
                        str(cfg), "--midi", "none"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "no tap named 'notes'" in r.stderr
