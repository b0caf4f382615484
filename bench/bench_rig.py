"""The benchmark's stage: a JACK dummy server with ALSA PCMs, a CPU hog, the daemon, the demo
player and the latency harness, each started as a process and stopped by its own handle.

PCMs on the server (all 2 channels unless told):
    box_cap / box_play  the engine's capture and playback
    src_play            the demo player (music into the engine's input)
    h_play / h_cap      the latency harness (noise into the engine's input, its output back)
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import suppress
from pathlib import Path

from echoel.daemon import bus
from echoel.drivers.jack_server import JackError, JackServer, alsa_env, jack_pcm_conf

HERE = Path(__file__).resolve().parent
ECHOEL = str(Path(sys.executable).with_name("echoel"))
CLEAR_PEAK = 10.0  # correlation peak / next highest: below this a harness lag is not trusted


def short_tmpdir(prefix: str = "ebn") -> Path:
    """A short folder under /tmp (unix socket paths must stay under 108 characters)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0,
                 sig: int = signal.SIGTERM) -> int | None:
    """Stop one process we started (by its handle): signal, wait, kill if it will not go."""
    if proc is None:
        return None
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def start_hog(cpu: int) -> subprocess.Popen:
    """A busy loop pinned to `cpu`, at normal priority, in its own session."""
    return subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", "while True: pass"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            start_new_session=True)


class Stage:
    """A fresh JACK dummy server (its buffer = the engine period) and the PCMs on it."""

    def __init__(self, rate: int, period: int, channels: int, workdir: Path) -> None:
        self.rate, self.period, self.channels = rate, period, channels
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = f"bench{uuid.uuid4().hex[:8]}"
        conf = workdir / "asound.conf"
        conf.write_text(jack_pcm_conf({
            "box_cap": ("capture", channels), "box_play": ("playback", channels),
            "src_play": ("playback", channels),
            "h_play": ("playback", channels), "h_cap": ("capture", channels),
        }))
        self.env = {**os.environ, **alsa_env(conf, self.name)}
        self.server = JackServer(self.name, rate, period, log_path=workdir / "jackd.log")

    def start(self, tries: int = 3, pause: float = 10.0) -> None:
        """Start jackd and wait until it answers; on failure try again (a busy machine), then
        raise with jackd's own words."""
        for attempt in range(1, tries + 1):
            try:
                self.server.start(timeout=30.0)
                return
            except JackError as exc:
                self.stop()
                log = self.dir / "jackd.log"
                said = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                if attempt == tries:
                    raise JackError(f"{exc}; jackd said: {said.strip()}"
                                    + registry_hint(said)) from None
                time.sleep(pause)

    def stop(self) -> None:
        """Stop jackd gently (a killed jackd keeps its slot in JACK's shared registry of 8
        servers for good), then remove what it or its clients leave in /dev/shm."""
        proc = self.server.proc
        if proc is not None and proc.poll() is None:
            stop_process(proc, 20)
        self.server.stop()
        for leftover in Path("/dev/shm").glob(f"jack*_{self.name}_*"):
            with suppress(OSError):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    def wire(self, src: str, dst: str, timeout: float = 10.0) -> None:
        """Connect every channel of client src's outputs to client dst's inputs, waiting for
        the ports to appear."""
        pairs = [(f"{src}:out_{i:03d}", f"{dst}:in_{i:03d}") for i in range(self.channels)]
        end = time.monotonic() + timeout
        while True:
            ports = self.server.ports()
            if all(s in ports and d in ports for s, d in pairs):
                break
            if time.monotonic() > end:
                raise TimeoutError(f"JACK ports {pairs} did not appear within {timeout:g} s; "
                                   f"ports: {sorted(ports)}")
            time.sleep(0.05)
        for s, d in pairs:
            if d not in ports[s] and not self.server.connect(s, d):
                raise RuntimeError(f"could not connect {s} -> {d}")

    def harness_lag(self, src: str, dst: str, rt_priority: int = 60,
                    timeout: float = 60.0) -> dict:
        """Run bench/harness_lag.py on h_play/h_cap with h_play -> `dst` and `src` -> h_cap
        patched (dst = h_cap, src = h_play: the direct wire); its JSON answer."""
        cmd = [sys.executable, str(HERE / "harness_lag.py"), "--rate", str(self.rate),
               "--period", str(self.period), "--channels", str(self.channels),
               "--rt-priority", str(rt_priority)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.env, text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            if not select.select([proc.stdout], [], [], 30)[0]:
                return {"error": "harness did not open its PCMs within 30 s"}
            line = proc.stdout.readline().strip()
            if line != "ready":
                proc.wait(10)
                raise RuntimeError(f"harness did not start: {line} {proc.stderr.read()[-2000:]}")
            self.wire("h_play", dst)
            self.wire(src, "h_cap")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"harness did not finish within {timeout:g} s"}
        finally:
            stop_process(proc, 5)
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"error": f"harness said nothing usable: {out[-500:]} {err[-1500:]}"}


def jack_registry() -> list[tuple[str, int, bool]]:
    """(server name, pid, alive) of each slot of JACK's shared-memory server registry, as
    jackd2 1.9 lays it out (24-byte header, 8 x [pid int32, name 256 bytes]); [] if unknown."""
    try:
        raw = Path("/dev/shm/jack-shm-registry").read_bytes()
    except OSError:
        return []
    out = []
    for i in range(8):
        off = 24 + 264 * i
        if off + 264 > len(raw):
            break
        pid = int.from_bytes(raw[off:off + 4], "little", signed=True)
        name = raw[off + 4:off + 260].split(b"\0", 1)[0].decode(errors="replace")
        name = name.split(":")[1] if name.count(":") >= 2 else name  # "jack-UID:NAME:"
        if pid > 0:
            alive = True
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:
                pass
            out.append((name, pid, alive))
    return out


def registry_hint(jackd_output: str) -> str:
    """An explanation when jackd refused to start because the registry is full."""
    if "Too many servers" not in jackd_output:
        return ""
    slots = jack_registry()
    dead = [f"{n} (pid {p})" for n, p, alive in slots if not alive]
    return (f" -- JACK's registry of 8 servers is full ({len(slots)} slots used, "
            f"{len(dead)} by servers that were killed: {', '.join(dead)}). A stale slot is freed "
            "by starting and cleanly stopping a jackd of the same name, or by removing "
            "/dev/shm/jack-shm-registry while no jackd runs.")


def measure_lag(stage: Stage, src: str, dst: str, tries: int = 3) -> dict:
    """A harness lag measurement without xruns (up to `tries` attempts); the last answer with
    the number of attempts."""
    res: dict = {}
    for attempt in range(1, tries + 1):
        res = stage.harness_lag(src, dst)
        res["attempts"] = attempt
        if "error" not in res and res["xruns"] == 0 and res["clarity"] >= CLEAR_PEAK:
            break
    return res


class EngineRun:
    """`echoel run --duration --summary-json` on the stage's box_cap/box_play PCMs."""

    def __init__(self, stage: Stage, workdir: Path, engine: dict, realtime: dict,
                 cap_seconds: float) -> None:
        self.stage = stage
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.run_dir = workdir / "run"
        self.summary_path = workdir / "summary.json"
        self.log = workdir / "daemon.log"
        e = {"capture_device": "box_cap", "playback_device": "box_play", "format": "FLOAT_LE",
             "rate": stage.rate, "channels_in": stage.channels, "channels_out": stage.channels,
             "poll_timeout_ms": 250, "rescan_ms": 200, **engine}
        body = "[engine]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in e.items())
        body += f'[daemon]\ninstance = "b{uuid.uuid4().hex[:8]}"\nrun_dir = "{self.run_dir}"\n'
        body += "status_interval_ms = 250\n"
        body += "[realtime]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in realtime.items())
        self.config = workdir / "box.toml"
        self.config.write_text(body)
        self.cap_seconds = cap_seconds
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the daemon; --duration is only a safety cap (stop() ends the run)."""
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [ECHOEL, "run", "--config", str(self.config), "--duration",
                 str(self.cap_seconds), "--summary-json", str(self.summary_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.stage.env)

    def status(self) -> dict:
        """The daemon's status over its bus."""
        return bus.request(self.run_dir, {"cmd": "status"}, 2.0)["status"]

    def wait_running(self, timeout: float = 90.0) -> dict:
        """Until audio flows (state running, some blocks done)."""
        end = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < end:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited early: {self.output()[-3000:]}")
            with suppress(TimeoutError, FileNotFoundError, OSError):
                last = self.status()
                if last["state"] == "running" and last["blocks"] > 10:
                    return last
            time.sleep(0.1)
        raise TimeoutError(f"audio did not flow within {timeout:g} s; last status {last}; "
                           f"log: {self.output()[-3000:]}")

    def stop(self) -> dict:
        """SIGTERM (the daemon writes its summary and exits); the summary."""
        code = stop_process(self.proc, 30)
        if not self.summary_path.exists():
            raise RuntimeError(f"no summary from the daemon (exit {code}): "
                               f"{self.output()[-3000:]}")
        return json.loads(self.summary_path.read_text())

    def kill(self) -> None:
        """Stop it whatever state it is in (cleanup)."""
        stop_process(self.proc, 30)

    def output(self) -> str:
        """The daemon's log."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def toml_value(v: object) -> str:
    """A scalar as TOML."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return str(v)


def start_demo_player(stage: Stage) -> subprocess.Popen:
    """The demo music player on src_play (patch it with stage.wire("src_play", "box_cap"))."""
    return subprocess.Popen(
        [sys.executable, "-m", "echoel.daemon.demo_player", "--pcm", "src_play", "--rate",
         str(stage.rate), "--period", str(stage.period), "--channels", str(stage.channels)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=stage.env)
