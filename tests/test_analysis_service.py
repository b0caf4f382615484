"""The live analysis service on the engine's tap: what the harness plays is measured and
published on the local bus (loudness as the offline meter gives it, the tuner's note)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import zmq
from echoel.dsp.loudness import measure
from rig import CH, RATE, Daemon

pytestmark = [pytest.mark.jack, pytest.mark.timeout(180)]
TAP = '[[taps]]\nname = "analysis"\nsource = "input"\nslots = 256\n'


def _sub(ctx: zmq.Context, run_dir) -> zmq.Socket:
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, b"status.analysis")
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{run_dir}/bus-analysis.sock")
    return s


def test_live_loudness_and_tuner_follow_what_is_played(rig, tmp_path):
    d = Daemon(rig, extra=TAP)
    svc = None
    # a private context, destroyed at the end: zmq's threads left in this process break the
    # in-process JACK clients of later test modules (the harness)
    ctx = zmq.Context()
    try:
        d.wait_running()
        svc = subprocess.Popen([sys.executable, "-m", "echoel.daemon.cli", "analyzer",
                                "--config", str(d.config)], env={**os.environ, **rig.env},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        sub = _sub(ctx, d.run_dir)
        t = np.arange(int(8.0 * RATE)) / RATE
        tone = (0.1 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
        sig = np.repeat(tone[:, None], CH, axis=1)
        # the service compiles its kernels on first start: wait until it publishes
        end = time.monotonic() + 90
        while time.monotonic() < end and not sub.poll(200):
            assert svc.poll() is None, svc.stdout.read().decode()
        assert sub.poll(1000), "the analysis service never published"
        wav = tmp_path / "tone.wav"
        sf.write(wav, sig, RATE, subtype="FLOAT")
        # aplay: a plain ALSA client on the rig's h_play PCM (patched into the engine's input)
        played = subprocess.Popen(["aplay", "-q", "-D", "h_play", str(wav)],
                                  env={**os.environ, **rig.env})
        seen = []
        stop = time.monotonic() + 7.5
        while time.monotonic() < stop:
            if sub.poll(300):
                seen.append(json.loads(sub.recv_multipart()[1]))
        played.wait(30)
        during = [s for s in seen if (s["loudness"]["momentary"] or -999) > -40]
        assert len(during) > 8, seen[-3:]
        # the offline meter on the same tone: the live one agrees
        ref = measure(sig[: 4 * RATE], RATE)
        mid = during[len(during) // 2]
        assert abs(mid["loudness"]["momentary"] - ref.momentary) < 0.5, (mid, ref.momentary)
        assert abs(during[-1]["loudness"]["integrated"] - ref.integrated) < 0.5
        assert mid["tuner"]["note"] == "A4" and abs(mid["tuner"]["cents"]) < 5, mid
        assert mid["loudness"]["bad_blocks"] == 0
        assert svc.poll() is None
    finally:
        ctx.destroy(linger=0)
        if svc:
            svc.terminate()
            svc.wait(10)
        d.stop()


def test_a_config_without_the_tap_is_refused_with_what_to_add(tmp_path):
    cfg = tmp_path / "box.toml"
    cfg.write_text("[daemon]\ninstance = \"x1\"\n")
    r = subprocess.run([sys.executable, "-m", "echoel.daemon.cli", "analyzer", "--config",
                        str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "no tap named 'analysis'" in r.stderr and "[[taps]]" in r.stderr
