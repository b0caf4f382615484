"""systemd integration: sd_notify over a NOTIFY_SOCKET the test binds, and the unit file."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from rig import Daemon, short_tmpdir

UNIT = Path(__file__).parent.parent / "daemon" / "units" / "echoel.service"


class NotifyListener:
    """A NOTIFY_SOCKET like systemd's: records every datagram with its arrival time."""

    def __init__(self) -> None:
        self.dir = short_tmpdir()
        self.path = str(self.dir / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._run = True
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while self._run:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for field in data.decode().split("\n"):
                self.messages.append((time.monotonic(), field))

    def fields(self, prefix: str, since: float = 0.0) -> list[tuple[float, str]]:
        return [(t, m) for t, m in self.messages if m.startswith(prefix) and t >= since]

    def close(self) -> None:
        self._run = False
        self._thread.join(2)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_ready_status_and_watchdog_that_stops_when_the_loop_is_stuck(rig):
    listener = NotifyListener()
    d = Daemon(rig, env={"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "400000"})
    try:
        d.wait_running()
        time.sleep(1.0)
        ready = listener.fields("READY=1")
        assert len(ready) == 1, listener.messages[:20]
        assert listener.fields("STATUS=running"), "a one-line STATUS= with the state"
        pings = listener.fields("WATCHDOG=1", since=ready[0][0])
        assert len(pings) >= 3, "pings every WATCHDOG_USEC/2 while audio flows"

        # the audio thread stops making progress for 3 s: pings must stop (after the 1 s
        # grace the supervisor allows) and come back once it runs again
        t0 = time.monotonic()
        assert d.request({"cmd": "stall", "ms": 3000})["ok"]
        time.sleep(3.5)
        during = [t for t, _ in listener.fields("WATCHDOG=1", since=t0 + 1.3)
                  if t < t0 + 2.9]
        assert during == [], f"pinged while the loop was stuck: {during}"
        d.wait_for(lambda s: s["state"] == "running" and s["blocks"] > 0, 15, "recovery")
        time.sleep(1.0)
        assert listener.fields("WATCHDOG=1", since=t0 + 3.2), "pings resume after recovery"
    finally:
        assert d.stop() == 0
        stopping = listener.fields("STOPPING=1")
        listener.close()
    assert stopping, "STOPPING=1 on shutdown"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_unit_file_is_valid_for_systemd(tmp_path):
    text = UNIT.read_text()
    for needed in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "LimitRTPRIO=",
                   "LimitMEMLOCK=", "NoNewPrivileges=yes", "ProtectSystem=strict",
                   "PrivateTmp=yes"):
        assert needed in text, needed
    unit = tmp_path / "echoel.service"
    # verify needs the ExecStart binary to exist and the user/group to be known here
    unit.write_text(text.replace("/opt/echoel/venv/bin/echoel", "/bin/true")
                    .replace("User=echoel", "User=root").replace("Group=audio", "Group=root")
                    .replace("SupplementaryGroups=audio\n", ""))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True)
    problems = [line for line in r.stderr.splitlines() if "echoel.service" in line]
    assert not problems, problems
