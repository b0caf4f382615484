"""AES67 interop between two network namespaces: our sender -> GStreamer and ffmpeg (SDP file
and SAP), GStreamer's sender -> our receiver. Received audio must equal what was sent, sample for
sample after alignment (two tones, 1 kHz and 440 Hz: a lost or repeated 1 ms packet shifts the
440 Hz tone and breaks the equality).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from echoel.drivers.sdp_aes67 import StreamSdp, build_sdp

sys.path.insert(0, str(Path(__file__).parent))
from aes67_rig import have, match, tone_codes, trim_silent_tail, wav_codes
from echoel.drivers.netns import NetnsPair, skip_reason, wait_joined

PY = sys.executable
CAPS = "application/x-rtp,media=audio,clock-rate=48000,encoding-name=L24,channels=2,payload=96"
PACKETS = 2000  # 2 s of 1 ms packets
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def net():
    why = skip_reason() or have("gst-launch-1.0", "ffmpeg")
    if why:
        pytest.skip(why)
    with NetnsPair() as n:
        n.wait_ready()
        yield n


def _send(net: NetnsPair, group: str, seconds: float, tmp: Path, *extra: str):
    sdp = tmp / "ours.sdp"
    p = net.popen(net.a, [PY, "-m", "echoel.daemon.streams_cli", "send", "--address", group,
                          "--iface", net.addr_a, "--duration", str(seconds), "--sdp-out",
                          str(sdp), *extra], stderr=subprocess.PIPE, text=True)
    return p, sdp


def _finish(p: subprocess.Popen) -> str:
    try:
        _out, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        _out, err = p.communicate()
    return err


def _check_tone(wav: Path, min_frames: int) -> None:
    rate, rx = wav_codes(wav)
    assert rate == 48000
    rx = trim_silent_tail(rx)
    ref = tone_codes(48000 + len(rx) + 10, 2)
    _k, n, bad = match(rx, ref)
    assert n >= min_frames, f"only {n} frames received"
    assert bad == 0, f"{bad} of {n} frames differ from what was sent"


def test_our_sender_to_gstreamer(net, tmp_path):
    out = tmp_path / "gst.wav"
    g = net.popen(net.b, ["gst-launch-1.0", "-q", "udpsrc", "address=239.69.8.1", "port=5004",
                          f"multicast-iface={net.if_b}", f"num-buffers={PACKETS}",
                          f"caps={CAPS}", "!", "rtpjitterbuffer", "!", "rtpL24depay", "!",
                          "audioconvert", "!", "wavenc", "!", "filesink",
                          f"location={out}"], stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    s, _ = _send(net, "239.69.8.1", PACKETS / 1000 + 3, tmp_path)
    assert g.wait(60) == 0, g.stderr.read()
    _finish(s)
    _check_tone(out, PACKETS * 48 - 2000)


def test_our_sender_to_ffmpeg_by_sdp_and_by_sap(net, tmp_path):
    by_sap = tmp_path / "sap.wav"
    by_sdp = tmp_path / "sdp.wav"
    # ffmpeg's SAP demuxer takes the first announcement it hears: start it before the sender
    f_sap = net.popen(net.b, ["ffmpeg", "-y", "-nostdin", "-loglevel", "error", "-i",
                              "sap://239.255.255.255:9875", "-t", "2", "-c:a", "pcm_s24le",
                              str(by_sap)], stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    s, sdp = _send(net, "239.69.8.2", 9, tmp_path)
    end = time.monotonic() + 15
    while not sdp.exists() and time.monotonic() < end:
        time.sleep(0.1)
    assert sdp.exists(), "the sender wrote no SDP: " + (_finish(s) if s.poll() is not None
                                                        else "")
    f_sdp = net.run(net.b, ["ffmpeg", "-y", "-nostdin", "-loglevel", "error",
                            "-protocol_whitelist", "file,udp,rtp", "-localaddr", net.addr_b,
                            "-i", str(sdp), "-t", "2", "-c:a", "pcm_s24le", str(by_sdp)],
                    check=False, timeout=60)
    assert f_sdp.returncode == 0, f_sdp.stderr
    assert f_sap.wait(60) == 0, f_sap.stderr.read()
    s.terminate()
    _finish(s)
    _check_tone(by_sdp, 2 * 48000 - 2000)
    _check_tone(by_sap, 2 * 48000 - 2000)


def test_gstreamer_sender_to_our_receiver(net, tmp_path):
    sent = tmp_path / "sent.wav"
    got = tmp_path / "got.wav"
    sdp = tmp_path / "gst.sdp"
    # GStreamer's timestamps start at a random offset and follow no PTP clock: no mediaclk
    sdp.write_text(build_sdp(StreamSdp(name="gst", address="239.69.8.3", port=5004,
                                       origin=net.addr_a, mediaclk_offset=None)))
    r = net.popen(net.b, [PY, "-m", "echoel.daemon.streams_cli", "receive", "--sdp", str(sdp),
                          "--iface", net.addr_b, "--duration", "40", "--latency-ms", "100",
                          "--out", str(got), "--json"], stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
    wait_joined(net.b, "239.69.8.3")  # joined (its start may take seconds when loaded)
    assert "receiving" in r.stderr.readline()  # printed as its receiving thread starts
    time.sleep(0.5)
    src = ("audiotestsrc freq={f} volume=0.5 num-buffers={n} samplesperbuffer=48 is-live=true"
           " ! audio/x-raw,format=F32LE,rate=48000,channels=1 ! i.sink_{k}")
    pipe = ("interleave name=i ! audioconvert ! audio/x-raw,format=S24BE,rate=48000,channels=2"
            " ! tee name=t ! queue ! rtpL24pay pt=96 min-ptime=1000000 max-ptime=1000000 ! "
            "udpsink host=239.69.8.3 port=5004 auto-multicast=true "
            f"t. ! queue ! audioconvert ! wavenc ! filesink location={sent} "
            + src.format(f=1000, n=PACKETS, k=0) + " " + src.format(f=440, n=PACKETS, k=1))
    g = net.run(net.a, ["gst-launch-1.0", "-q", *pipe.split()], check=False, timeout=60)
    assert g.returncode == 0, g.stderr
    _wait_read(net, 5004)  # a loaded machine may leave the receiver behind: let it catch up
    time.sleep(0.5)  # the last packets played out (latency 100 ms)
    r.terminate()  # the receiver stops on SIGTERM, writes its file and prints its counters
    out, err = r.communicate(timeout=60)
    assert r.returncode == 0, err
    import json
    st = json.loads(out.strip().splitlines()[-1])
    assert st["received"] >= PACKETS - 20 and st["malformed"] == 0, json.dumps(st)
    _, ref = wav_codes(sent)
    _, rx = wav_codes(got)
    rx = trim_silent_tail(rx)
    k, n, bad = match(rx, ref)
    assert n >= len(ref) - k - 48 and n >= PACKETS * 48 - 4800, (k, n, len(ref))
    assert bad == 0, f"{bad} of {n} frames differ from what GStreamer sent"


def _wait_read(net: NetnsPair, port: int, timeout: float = 20.0) -> None:
    """Until the receiving socket's queue in namespace b is empty (`ss` Recv-Q)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = net.run(net.b, ["ss", "-u", "-a", "-n", f"sport = :{port}"]).stdout
        queued = [int(line.split()[1]) for line in out.splitlines()[1:] if line.split()]
        if not any(queued):
            return
        time.sleep(0.1)


def _list(net: NetnsPair, seconds: float) -> subprocess.Popen:
    return net.popen(net.b, [PY, "-m", "echoel.daemon.streams_cli", "list", "--json",
                             "--seconds", str(seconds), "--iface", net.addr_b],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sap_browser_sees_the_announcement_then_its_deletion_and_subscribes_by_name(
        net, tmp_path):
    import json
    during = _list(net, 3.5)
    through = _list(net, 7.0)
    got = tmp_path / "by_name.wav"
    r = net.popen(net.b, [PY, "-m", "echoel.daemon.streams_cli", "receive", "--name",
                          "Echoel SAP test", "--wait", "10", "--iface", net.addr_b,
                          "--duration", "2", "--latency-ms", "100", "--out", str(got),
                          "--json"],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_joined(net.b, "239.255.255.255", 3)  # the three listeners are ready
    s, _ = _send(net, "239.69.8.4", 4.0, tmp_path, "--name", "Echoel SAP test",
                 "--sap-interval", "0.5")
    out, err = during.communicate(timeout=60)
    seen = json.loads(out)
    names = [x["name"] for x in seen["streams"]]
    assert "Echoel SAP test" in names, (seen, err)
    row = seen["streams"][names.index("Echoel SAP test")]
    assert row["address"] == "239.69.8.4:5004" and row["format"] == "L24/48000/2"
    assert row["origin"] == net.addr_a and row["ptime_us"] == 1000
    _finish(s)  # the sender stops after 4 s and deletes its announcement
    out, err = through.communicate(timeout=60)
    after = json.loads(out)
    assert after["deletions"] >= 1 and not after["streams"], (after, err)
    out, err = r.communicate(timeout=60)
    assert r.returncode == 0, err
    st = json.loads(out.strip().splitlines()[-1])
    assert st["received"] > 1000 and st["lost"] == 0, st
    _check_tone(got, 48000)
