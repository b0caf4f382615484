"""Test rig: a JACK dummy server with ALSA PCMs for the engine and for a 'studio' harness,
the daemon started as a real process, and the harness that plays into and records from it."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import alsaaudio
import numpy as np
from echoel.daemon import bus
from echoel.daemon.child_processes import stop_all
from echoel.drivers.jack_server import JackServer, Patchbay, alsa_env, jack_pcm_conf
from echoel.drivers.realtime import die_with_parent

RATE, PERIOD, CH = 48000, 128, 2
HARNESS_PERIODS = 8
ECHOEL = str(Path(sys.executable).with_name("echoel"))


def short_tmpdir() -> Path:
    """A short folder (unix socket paths must stay under 108 characters)."""
    return Path(tempfile.mkdtemp(prefix="ech", dir="/tmp"))


@dataclass
class Rig:
    """JACK server + PCMs: box_cap/box_play (engine), h_play/h_cap (harness), patched
    h_play -> box_cap and box_play -> h_cap."""

    dir: Path
    name: str
    server: JackServer
    env: dict[str, str]
    patch: Patchbay | None = None
    pairs: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def start(cls, period: int = PERIOD) -> Rig:
        d = short_tmpdir()
        name = f"t{uuid.uuid4().hex[:8]}"
        conf = d / "asound.conf"
        conf.write_text(jack_pcm_conf({
            "box_cap": ("capture", CH), "box_play": ("playback", CH),
            "h_play": ("playback", CH), "h_cap": ("capture", CH),
            "mono_cap": ("capture", 1),
        }))
        env = alsa_env(conf, name)
        os.environ.update(env)  # the harness in this process uses the same PCMs
        server = JackServer(name, RATE, period, log_path=d / "jackd.log")
        server.start()
        rig = cls(d, name, server, env)
        rig.pairs = [(f"h_play:out_{i:03d}", f"box_cap:in_{i:03d}") for i in range(CH)]
        rig.pairs += [(f"box_play:out_{i:03d}", f"h_cap:in_{i:03d}") for i in range(CH)]
        rig.patch = Patchbay(server, rig.pairs, interval=0.05)
        rig.patch.start()
        return rig

    def restart_server(self) -> None:
        """Start the JACK server again after stop_server (the interface comes back)."""
        self.server.start()

    def stop(self) -> None:
        if self.patch:
            self.patch.stop()
        self.server.stop()
        if os.environ.get("KEEP_RIG"):
            print("rig kept at", self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def wait_patched(self, timeout: float = 10.0) -> None:
        """Until every harness<->engine connection is made."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ports = self.server.ports()
            if all(dst in ports.get(src, []) for src, dst in self.pairs):
                return
            time.sleep(0.05)
        raise TimeoutError(f"JACK ports not patched within {timeout} s: {self.server.ports()}")


def write_config(path: Path, run_dir: Path, instance: str, extra: str = "",
                 engine: dict | None = None) -> Path:
    """A daemon config for the rig (engine on box_cap/box_play, float samples)."""
    e = {"capture_device": '"box_cap"', "playback_device": '"box_play"', "format": '"FLOAT_LE"',
         "rate": RATE, "period": PERIOD, "periods": 4, "prefill": 2, "channels_in": CH,
         "channels_out": CH, "poll_timeout_ms": 250, "rescan_ms": 200}
    e.update(engine or {})
    body = "[engine]\n" + "".join(f"{k} = {v}\n" for k, v in e.items())
    body += f'[daemon]\ninstance = "{instance}"\nrun_dir = "{run_dir}"\nstatus_interval_ms = 100\n'
    body += "[realtime]\ncpu = -1\n"
    path.write_text(body + extra)
    return path


class Daemon:
    """`echoel run` as a real process."""

    def __init__(self, rig: Rig, extra: str = "", engine: dict | None = None,
                 env: dict | None = None, prefix: list[str] | None = None) -> None:
        self.dir = short_tmpdir()
        self.instance = f"i{uuid.uuid4().hex[:8]}"
        self.run_dir = self.dir / "run"
        self.config = write_config(self.dir / "box.toml", self.run_dir, self.instance, extra,
                                   engine)
        self.log = self.dir / "daemon.log"
        full_env = {**os.environ, **rig.env, **(env or {})}
        self.proc = subprocess.Popen(
            [*(prefix or []), ECHOEL, "run", "--config", str(self.config)],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=full_env,
            preexec_fn=die_with_parent)

    def request(self, msg: dict, timeout: float = 5.0) -> dict:
        return bus.request(self.run_dir, msg, timeout)

    def status(self) -> dict:
        return self.request({"cmd": "status"})["status"]

    def set(self, key: str, value) -> dict:
        return self.request({"cmd": "set", "key": key, "value": value})

    def wait_for(self, pred, timeout: float = 30.0, what: str = "condition") -> dict:
        """Poll status until pred(status) holds."""
        end = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}): {self.output()}")
            with suppress(TimeoutError, FileNotFoundError):
                last = self.status()
                if pred(last):
                    return last
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last status {last}; "
                             f"log: {self.output()[-3000:]}")

    def wait_running(self, timeout: float = 60.0) -> dict:
        return self.wait_for(lambda s: s["state"] == "running" and s["blocks"] > 10, timeout,
                             "audio to flow")

    def engine_pid(self) -> int:
        return self.status()["engine_pid"]

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        stop_all([self.proc], 15.0)
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.returncode


@contextmanager
def realtime_priority(prio: int):
    """SCHED_FIFO for the calling thread for a while (root only; else unchanged)."""
    old = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(prio))
    except PermissionError:
        pass
    try:
        yield
    finally:
        os.sched_setscheduler(0, old[0], old[1])


class HarnessStuckError(RuntimeError):
    """The JACK device stopped delivering data to the harness."""


class Harness:
    """The studio side: plays a signal into the engine's input, records its output.

    One thread streams continuously (silence between signals) from open to close: starting
    and stopping JACK-backed PCMs while other clients run is what upsets JACK, so the harness
    never does it. Non-blocking I/O with poll timeouts: a stuck client is reported, not hung on.
    """

    def __init__(self, play_pcm: str = "h_play", cap_pcm: str = "h_cap") -> None:
        self.names = play_pcm, cap_pcm
        self._lock = threading.Lock()
        self._job: dict | None = None
        self.stuck: str | None = None
        self.capture_restarts = 0
        self._running = True
        self._open()
        self._thread = threading.Thread(target=self._run, name="harness", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        # deep buffers: the harness's own latency is measured, only its xruns would hurt
        kw = dict(rate=RATE, channels=CH, format=alsaaudio.PCM_FORMAT_FLOAT_LE,
                  periodsize=PERIOD, periods=HARNESS_PERIODS)
        nb = alsaaudio.PCM_NONBLOCK
        self.play = alsaaudio.PCM(alsaaudio.PCM_PLAYBACK, nb, device=self.names[0], **kw)
        self.cap = alsaaudio.PCM(alsaaudio.PCM_CAPTURE, nb, device=self.names[1], **kw)
        self.cap_poll = select.poll()
        for fd, mask in self.cap.polldescriptors():
            self.cap_poll.register(fd, mask)

    def close(self) -> None:
        self._running = False
        self._thread.join(5)
        self.play.close()
        self.cap.close()

    def _run(self) -> None:
        silence = np.zeros((PERIOD, CH), np.float32)
        with realtime_priority(50):
            for _ in range(HARNESS_PERIODS // 2):
                self.play.write(silence)
            self.cap.read()  # starts capture
            k = 0
            while self._running:
                deadline = time.monotonic() + 2.0
                while self._running:
                    if self.cap.state() == alsaaudio.PCM_STATE_PREPARED:
                        # after an xrun alsa-lib prepares the stream again but does not
                        # start it: a read does (on a loaded machine, seen while the daemon
                        # starts); else no data ever comes
                        self.capture_restarts += 1
                        with suppress(alsaaudio.ALSAAudioError):
                            self.cap.read()
                    avail = self.cap.avail()
                    if avail < 0 or avail >= PERIOD:
                        break
                    ready = self.cap_poll.poll(200)
                    if ready:
                        self.cap.polldescriptors_revents(ready)  # acknowledge (else: spin)
                    if time.monotonic() > deadline:
                        self.stuck = (f"no capture data for 2 s (capture state "
                                      f"{self.cap.state()}, playback {self.play.state()})")
                        deadline = time.monotonic() + 2.0
                n, data = self.cap.read()
                with self._lock:
                    job = self._job
                block = silence
                if job is not None:
                    i = job["k"]
                    block = job["src"][i * PERIOD:(i + 1) * PERIOD]
                    if job["on_block"]:
                        job["on_block"](i)
                w = self.play.write(block)
                if job is not None:
                    if n == PERIOD:
                        job["rec"][i * PERIOD:(i + 1) * PERIOD] = \
                            np.frombuffer(data, np.float32).reshape(-1, CH)
                    if n != PERIOD or w != PERIOD:
                        job["odd"].append((i, n, w))
                    job["k"] += 1
                    if job["k"] * PERIOD >= len(job["src"]):
                        with self._lock:
                            self._job = None
                        job["done"].set()
                k += 1

    def play_record(self, sig: np.ndarray, tail: int = 8192, on_block=None
                    ) -> tuple[np.ndarray, int]:
        """Play sig (float32 [n, CH]) and record as long plus a tail; returns (rec, xruns).

        on_block(k) is called from the audio thread as block k goes out: keep it quick.
        """
        total = sig.shape[0] + tail
        total += -total % PERIOD
        src = np.zeros((total, CH), np.float32)
        src[: sig.shape[0]] = sig
        job = {"src": src, "rec": np.zeros_like(src), "k": 0, "odd": [],
               "on_block": on_block, "done": threading.Event()}
        self.stuck = None
        with self._lock:
            self._job = job
        if not job["done"].wait(total / RATE + 5.0):
            with self._lock:
                self._job = None
            raise HarnessStuckError(f"the harness did not finish: {self.stuck}")
        self.odd = job["odd"]
        return job["rec"], len(self.odd)


def noise(n: int, seed: int = 1, amp: float = 0.25) -> np.ndarray:
    """Reproducible white noise, float32 [n, CH], different per channel."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(-amp, amp, (n, CH))).astype(np.float32)


def find_lag(sig: np.ndarray, rec: np.ndarray) -> int:
    """Delay (frames) of sig inside rec, by cross-correlation of channel 0."""
    a = sig[:, 0].astype(np.float64)
    b = rec[:, 0].astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(a) + len(b))))
    xc = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)
    return int(np.argmax(xc[: len(b)]))
