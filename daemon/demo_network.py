"""`make run`'s studio network: a PTP grandmaster on the other end of a veth pair, the box's
clock service following it, and the box's output sent as an AES67 stream (announced by SAP).

Two network namespaces joined by a veth (drivers/netns.py): "studio" holds a grandmaster
ptp4l (as a Dante or RAVENNA device would be), "box" holds the box's own ptp4l (run by
`echoel clock run`) and the AES67 sender (`echoel streams serve`). Both ptp4l run free, so
nothing on this machine has its clock moved. Needs root (namespaces) and linuxptp; without
them the view says why and the rest of `make run` goes on.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from echoel.daemon.child_processes import stop_all
from echoel.drivers import netns

STREAM_NAME = "Echoel Box out"
STREAM_ADDRESS = "239.69.83.67"
TAP = {"name": "aes67", "source": "output", "slots": 256}
GM_CONFIG = """[global]
uds_address {sock}
priority1 100
clockClass 6
free_running 1
network_transport UDPv4
time_stamping software
logSyncInterval -3
logAnnounceInterval 0
summary_interval 10
[{iface}]
"""


def network_toml(iface: str, addr: str) -> str:
    """The box side's [clock] and [[streams]] (appended to the services' config)."""
    return (f'[clock]\nenabled = true\ninterface = "{iface}"\nfree_running = true\n'
            'log_sync_interval = -3\nlog_announce_interval = 0\nannounce_receipt_timeout = 3\n'
            'profile = "default"\nlock_threshold_ns = 200000\nunlock_threshold_ns = 1000000\n'
            f'[[streams]]\nname = "{STREAM_NAME}"\ndirection = "send"\ntap = "{TAP["name"]}"\n'
            f'address = "{STREAM_ADDRESS}"\nchannels = 2\ninterface = "{addr}"\n')


def clock_lines(s: dict | None) -> list[str]:
    """The live view's line for status.clock."""
    if not s:
        return ["  clock    starting ptp4l"]
    off = "-" if s.get("offset_ns") is None else f"{s['offset_ns']:+.0f} ns"
    delay = "-" if s.get("path_delay_ns") is None else f"{s['path_delay_ns']:.0f} ns"
    lock = "locked" if s.get("locked") else "not locked"
    return [f"  clock    PTP {s['state']} ({lock}), grandmaster {s.get('gm_identity') or '-'}, "
            f"offset {off}, path delay {delay}"]


def stream_lines(s: dict | None) -> list[str]:
    """The live view's lines for status.streams: each stream and its SDP's key lines."""
    if not s:
        return ["  aes67    streams service starting"]
    out = []
    for st in s.get("streams", []):
        if st.get("state") == "failed":
            out.append(f"  aes67    {st['name']}: failed: {st.get('error')}")
            continue
        err = st.get("interval_error_us") or {}
        p99 = f", interval error p99 {err['p99']:.0f} us" if "p99" in err else ""
        out.append(f"  aes67    {st['name']} -> {st.get('destination', '-')}: "
                   f"{st.get('packets', 0)} packets{p99}")
        sdp = [ln for ln in str(st.get("sdp", "")).splitlines()
               if ln.startswith(("a=rtpmap", "a=ts-refclk", "a=mediaclk", "a=ptime"))]
        if sdp:
            out.append("           SDP " + "  ".join(sdp))
    return out


def unavailable() -> str | None:
    """Why the studio network cannot run here (None when it can)."""
    why = netns.skip_reason()
    if why is None and not shutil.which("ptp4l"):
        why = "linuxptp (ptp4l) is not installed"
    return why


class DemoNetwork:
    """Starts the studio network; `lines()` for the live view; `stop()` removes it all."""

    def __init__(self, folder: Path, service_config: Path) -> None:
        self.folder = folder
        self.service_config = service_config
        self.problem: str | None = None
        self.net: netns.NetnsPair | None = None
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        """Make the namespaces and start the grandmaster, the clock and the streams service."""
        self.problem = unavailable()
        if self.problem:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.net = netns.NetnsPair()
        net = self.net.__enter__()
        gm = self.folder / "studio-gm.cfg"
        gm.write_text(GM_CONFIG.format(sock=self.folder / "studio-gm.sock", iface=net.if_a))
        with open(self.service_config, "a") as f:
            f.write(network_toml(net.if_b, net.addr_b))
        log = open(self.folder / "network.log", "ab")  # handed to the children
        net.popen(net.a, ["ptp4l", "-f", str(gm), "-m", "-q"], stdout=log,
                  stderr=subprocess.STDOUT)
        for args in (["clock", "run", "--config", str(self.service_config)],
                     ["streams", "serve", "--config", str(self.service_config)]):
            self.procs.append(net.popen(net.b, [sys.executable, "-m", "echoel.daemon.cli",
                                                *args], stdout=log, stderr=subprocess.STDOUT))
        log.close()

    def lines(self, latest: dict[str, dict]) -> list[str]:
        """Clock and stream lines from the services' latest status."""
        if self.problem:
            return [f"  network  studio network not started: {self.problem}"]
        return clock_lines(latest.get("clock")) + stream_lines(latest.get("streams"))

    def stop(self) -> None:
        """Stop the services and remove the namespaces."""
        stop_all(self.procs)
        if self.net is not None:
            self.net.close()
