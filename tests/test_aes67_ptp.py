"""The media clock follows the real clock service: a grandmaster ptp4l in namespace a, the clock
service (its own free-running ptp4l) in b, our sender in b with the service's run folder. The
sender's SDP and SAP announcement name the grandmaster (ts-refclk, clock-domain), its media
clock is in "offset" mode (free-running: measured offsets), and a receiver in a gets the stream
on the media clock timeline ("media", not re-anchored), sample-exact.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from aes67_rig import match, tone_codes, trim_silent_tail, wav_codes
from echoel.drivers.netns import NetnsPair, skip_reason, stop_process

PY = sys.executable
GM = "5A-8A-71-FF-FE-26-FD-8A"
pytestmark = pytest.mark.timeout(150)


def _need() -> None:
    if not shutil.which("ptp4l"):
        pytest.skip("linuxptp is not installed (apt-get install linuxptp)")
    if why := skip_reason():
        pytest.skip(why)
    try:
        from echoel.daemon import clock_cli  # noqa: F401
        from echoel.drivers import ptp4l_config  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the clock service is not in this tree: {exc}")


def test_sdp_names_the_grandmaster_and_the_stream_stays_on_the_media_clock():
    _need()
    from echoel.daemon.bus_listener import BusListener
    from echoel.drivers import ptp4l_config
    d = Path(tempfile.mkdtemp(prefix="/tmp/aes67p"))  # short: unix socket paths
    procs: list[subprocess.Popen] = []
    listener = None
    try:
        with NetnsPair() as net:
            net.wait_ready()
            gm = ptp4l_config.check({"profile": "default", "log_sync_interval": -3,
                                     "log_announce_interval": -2,
                                     "announce_receipt_timeout": 3, "free_running": True,
                                     "interface": net.if_a, "slave_only": False,
                                     "priority1": 100, "clock_identity": GM})
            (d / "gm.cfg").write_text(ptp4l_config.generate(gm, d / "gm.sock", "software"))
            net.popen(net.a, ["ptp4l", "-f", str(d / "gm.cfg"), "-q"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            (d / "box.toml").write_text(
                f'[daemon]\nrun_dir = "{d}"\n[clock]\nenabled = true\n'
                f'interface = "{net.if_b}"\nslave_only = true\nfree_running = true\n'
                'profile = "default"\nlog_sync_interval = -3\nlog_announce_interval = -2\n'
                "announce_receipt_timeout = 3\npoll_interval_ms = 100\n")
            svc = net.popen(net.b, [PY, "-m", "echoel.daemon.clock_cli", "run", "--config",
                                    str(d / "box.toml")], stdout=subprocess.DEVNULL,
                            stderr=open(d / "clock.log", "ab"))
            procs.append(svc)
            listener = BusListener(d, rescan_s=0.2)
            end = time.monotonic() + 40
            status: dict = {}
            while time.monotonic() < end and not (status.get("gm_identity") == GM
                                                  and status.get("offset_ns") is not None):
                for topic, doc in listener.poll():
                    if topic == "status.clock":
                        status = doc
                time.sleep(0.1)
            assert status.get("gm_identity") == GM, (status, (d / "clock.log").read_text()
                                                     [-2000:])
            got = d / "rx.wav"
            tx = net.popen(net.b, [PY, "-m", "echoel.daemon.streams_cli", "--run-dir", str(d),
                                   "send", "--address", "239.69.9.1", "--iface", net.addr_b,
                                   "--duration", "6", "--sdp-out", str(d / "tx.sdp")],
                           stderr=subprocess.PIPE, text=True)
            procs.append(tx)
            # the receiver reads the SDP when it starts: start it once the file is there
            end = time.monotonic() + 20
            while not (d / "tx.sdp").exists() and time.monotonic() < end:
                time.sleep(0.1)
            sdp = (d / "tx.sdp").read_text()
            assert f"a=ts-refclk:ptp=IEEE1588-2008:{GM}:0" in sdp, sdp
            assert "a=clock-domain:PTPv2 0" in sdp and "a=mediaclk:direct=0" in sdp
            rx = net.popen(net.a, [PY, "-m", "echoel.daemon.streams_cli", "receive", "--sdp",
                                   str(d / "tx.sdp"), "--iface", net.addr_a, "--duration",
                                   "3", "--latency-ms", "100", "--out", str(got), "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = rx.communicate(timeout=60)
            assert rx.returncode == 0, err
            st = json.loads(out.strip().splitlines()[-1])
            _o, terr = tx.communicate(timeout=60)
            assert "media clock offset" in terr, terr[-1000:]
            sent = json.loads([ln for ln in terr.splitlines() if ln.startswith("{")][-1])
            assert sent["packets"] > 3000
            # our sender on the PTP media clock, our receiver on its own clock (the same
            # machine clock): the timestamps fit its buffer, no re-anchoring
            why = json.dumps([st, sent["clock"], status])
            assert st["clock_mode"] == "media" and st["realigned"] == 0, why
            assert st["received"] > 2000 and st["malformed"] == 0, st
            _, x = wav_codes(got)
            x = trim_silent_tail(x)
            _k, n, bad = match(x, tone_codes(48000 + len(x) + 10, 2))
            assert n > 2 * 48000 and bad == 0, (n, bad)
    finally:
        for p in procs:
            stop_process(p, grace=10)
        if listener is not None:
            listener.close()
        shutil.rmtree(d, ignore_errors=True)
