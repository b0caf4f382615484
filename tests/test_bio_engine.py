"""Issue 7 end to end: a heart-rate sensor's beats move the sound in the running engine.

The daemon runs on JACK's dummy driver (tests/rig.py); a BlueZ stand-in on a private D-Bus
(tests/bluez_standin.py) plays one chest strap; `echoel bio run --config F` runs as a process
with DBUS_SYSTEM_BUS_ADDRESS pointing at the stand-in and one [[bio.mappings]]
(hr_bpm 60..120 -> chain.gain_db -12..0 dB). A pacer thread sends notifications (bpm with
matching, jittered RR intervals) while the harness plays noise into the engine and records its
output, so the engine's gain is measured sample by sample (output / input).

References, all from the same run: the RR intervals the pacer sent (the heart rate they imply,
through the mapping's formula, is the gain the engine must settle at), the supervisor's
status (params.modulated), and the signal the harness played. Xruns are tolerated: a harness
xrun or a cycle JACK skips shifts the output against the input, so the recording is lined up
chunk by chunk and chunks holding a shift (output/input changes sign) are left out; a phase
is recorded again only when too little of it is left. Clicks are judged with the engine gain
test's per-sample bound.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from echoel.daemon.child_processes import stop_all
from rig import ECHOEL, RATE, Daemon, Harness, HarnessStuckError, noise

from tests.bluez_standin import BlueZStandIn, dbus_daemon_missing
from tests.test_heart_rate_packet import spec_packet

A = "C0:FF:EE:00:00:01"
LABEL = "alice"
IN_LO, IN_HI, OUT_LO, OUT_HI = 60.0, 120.0, -12.0, 0.0  # the mapping under test
NEUTRAL = 0.0  # chain.gain_db as configured (the daemon's default)
WINDOW_S = 10.0  # [bio] window_s: the HRV window hr_bpm is the mean heart rate of
ARTIFACT_LAG = 3  # [bio] artifact_lag: beats held back by the artifact corrector
FADE_S = 1.5  # fade_in_s and fade_out_s
STALE_S = 3.0
WAIT_S = 30.0  # generous: the machine is shared and loaded
TRIES = 3
SLOPE_MAX = 0.002  # per-sample gain change: the engine gain test's bound (a step is ~0.5)
ACT_BLOCK = 60  # harness block at which a phase's action starts (1.3 s into the recording)


def _missing() -> str | None:
    if shutil.which("jackd") is None:
        return "jackd is missing (Debian package jackd2; `make setup`)"
    return dbus_daemon_missing()


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


# ---------------------------------------------------------------------- references
def mapped_gain_db(bpm: float) -> float:
    """The mapping's value for a heart rate (linear curve, clamped), as dsp/bio_mapping.py
    documents it."""
    u = min(max((bpm - IN_LO) / (IN_HI - IN_LO), 0.0), 1.0)
    return OUT_LO + u * (OUT_HI - OUT_LO)


def window_hr_bpm(rr_units: list[int]) -> float:
    """Mean heart rate of the intervals the HRV window holds at the end of `rr_units`
    (1/1024 s each): the newest ARTIFACT_LAG are still held back, the window spans WINDOW_S
    of the series' own time."""
    released = [u * 1000.0 / 1024.0 for u in rr_units[:-ARTIFACT_LAG]]
    held, span = [], 0.0
    for rr in reversed(released):
        if span + rr > WINDOW_S * 1000.0 and held:
            break
        held.append(rr)
        span += rr
    return 60000.0 / (sum(held) / len(held))


class Pacer:
    """A thread sending the stand-in's 0x2A37 notifications: the current bpm and one RR
    interval of 60/bpm s jittered by +-15 ms, every `interval_s` (faster than a heart: the
    intervals, not the notification times, make the series' time)."""

    def __init__(self, bz: BlueZStandIn, address: str, interval_s: float = 0.12) -> None:
        self.bz, self.address, self.interval_s = bz, address, interval_s
        self.rng = random.Random(7)
        self._lock = threading.Lock()
        self._ramp = (66.0, 66.0, 0.0, 1.0)  # from, to, start time, duration
        self.paused = False
        self.sent: list[int] = []  # RR units of the delivered notifications, in order
        self.last_sent = -math.inf
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pacer", daemon=True)
        self._thread.start()

    def hold(self, bpm: float) -> None:
        with self._lock:
            self._ramp = (bpm, bpm, 0.0, 1.0)

    def ramp(self, to: float, seconds: float) -> None:
        now = self.bpm()
        with self._lock:
            self._ramp = (now, to, time.monotonic(), seconds)

    def bpm(self) -> float:
        with self._lock:
            a, b, t0, dur = self._ramp
        u = min(max((time.monotonic() - t0) / dur, 0.0), 1.0)
        return a + u * (b - a)

    def mark(self) -> int:
        """Index into `sent` from which the next notifications count."""
        return len(self.sent)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.paused:
                continue
            bpm = self.bpm()
            units = round((60000.0 / bpm + self.rng.uniform(-15.0, 15.0)) * 1.024)
            try:
                if self.bz.notify(self.address, spec_packet(0x10, round(bpm), 0, [units])):
                    self.sent.append(units)
                    self.last_sent = time.monotonic()
            except Exception as exc:  # the test reads them
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


# ---------------------------------------------------------------------- processes
def bio_config(path: Path, daemon: Daemon) -> Path:
    """The bio service's config: the test daemon's run folder, the stand-in's sensor, one
    mapping."""
    path.write_text(f"""[daemon]
instance = "{daemon.instance}"
run_dir = "{daemon.run_dir}"

[bio]
sensors = "{A}"
labels = "{LABEL}"
scan_timeout_s = 5.0
reconnect_min_s = 0.1
reconnect_max_s = 1.0
status_interval_ms = 100
window_s = {WINDOW_S}
min_span_s = 5.0
artifact_lag = {ARTIFACT_LAG}
rate_hz = 20.0
stale_s = {STALE_S}

[[bio.mappings]]
source = "hr_bpm"
target = "chain.gain_db"
in_lo = {IN_LO}
in_hi = {IN_HI}
out_lo = {OUT_LO}
out_hi = {OUT_HI}
smoothing_s = 0.2
fade_in_s = {FADE_S}
fade_out_s = {FADE_S}
""")
    return path


class BioProcess:
    """`echoel bio run --config F` as a process talking to the stand-in's bus."""

    def __init__(self, config: Path, bus_address: str) -> None:
        self.log = config.with_name("bio.log")
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus_address}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([ECHOEL, "bio", "run", "--config", str(config)],
                                         stdout=out, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        stop_all([self.proc], 30.0)
        return self.proc.returncode


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def harness(rig):
    h = Harness()  # before any zmq or D-Bus thread exists in this process (see conftest)
    yield h
    h.close()


@pytest.fixture(scope="module")
def daemon(rig, harness):
    d = Daemon(rig)
    try:
        d.wait_running()
        rig.wait_patched()
    except BaseException:
        d.stop()
        raise
    yield d
    assert d.stop() == 0, d.output()


@pytest.fixture
def bz():
    with BlueZStandIn() as standin:
        standin.add_sensor(A, "Polar H10 0001")
        yield standin


@pytest.fixture
def pacer(bz):
    p = Pacer(bz, A)
    yield p
    p.stop()


@pytest.fixture
def bio(daemon, bz, pacer):
    cfg = bio_config(daemon.dir / "bio.toml", daemon)
    b = BioProcess(cfg, bz.address)
    yield b
    b.stop()


# ---------------------------------------------------------------------- measuring
def gain_of(status: dict) -> float | None:
    return status["params"]["modulated"].get("chain.gain_db")


def wait_gain(daemon: Daemon, bio: BioProcess, pred: Callable[[float | None], bool],
              what: str) -> float | None:
    """Poll the supervisor until params.modulated's chain.gain_db satisfies pred."""
    def ok(s: dict) -> bool:
        if bio.proc.poll() is not None:
            raise AssertionError(f"the bio service exited: {bio.output()[-3000:]}")
        return pred(gain_of(s))
    try:
        return gain_of(daemon.wait_for(ok, WAIT_S, what))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nbio service log: {bio.output()[-3000:]}") from None


class Poller:
    """params.modulated's chain.gain_db, polled from a thread while a recording runs."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.values: list[float | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.values.append(gain_of(self.daemon.status()))
            except (TimeoutError, OSError):
                pass

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(10.0)
        return [v for v in self.values if v is not None]


CHUNK = 2048  # frames of the recording lined up with the input at a time
MAX_LAG = RATE // 2  # harness + engine delay searched (measured: a few hundred frames)


def _chunk_lag(x: np.ndarray, y: np.ndarray, start: int) -> int:
    """Delay of recording chunk y (starting at frame `start`) behind input x, by
    cross-correlation over the MAX_LAG frames before it."""
    lo = max(0, start - MAX_LAG)
    a = x[lo:start + len(y)]
    m = 1 << int(np.ceil(np.log2(len(a) + len(y))))
    xc = np.fft.irfft(np.fft.rfft(a, m) * np.conj(np.fft.rfft(y, m)), m)[: len(a)]
    return start - lo - int(np.argmax(xc))


def gain_track(sig: np.ndarray, rec: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The engine's gain output/input on channel 0, sample by sample where the input is loud
    enough: (input sample index, gain, segment). An xrun (harness or engine) or a cycle JACK
    skipped shifts the output against the input: the recording is lined up chunk by chunk,
    a chunk that does not line up whole (a ratio <= 0: it holds the shift) is left out, and
    `segment` changes wherever the output is not continuous."""
    x = sig[:, 0].astype(np.float64)
    y = rec[:, 0].astype(np.float64)
    idx_parts, g_parts, seg_parts = [], [], []
    lag, seg, last_end = None, 0, -1
    for start in range(0, len(rec) - CHUNK + 1, CHUNK):
        chunk = y[start:start + CHUNK]
        if np.max(np.abs(chunk)) < 1e-3:
            continue
        found = None
        for cand in ([lag] if lag is not None else []) + [None]:
            if cand is None:
                cand = _chunk_lag(x, chunk, start)
            s0 = start - cand
            if s0 < 0 or s0 + CHUNK > len(x):
                continue
            xs = x[s0:s0 + CHUNK]
            ok = np.flatnonzero(np.abs(xs) > 0.05)
            g = chunk[ok] / xs[ok]
            if ok.size and np.all(g > 1e-3):
                found = (cand, s0 + ok, g)
                break
        if found is None:
            continue
        if found[0] != lag or start != last_end:
            seg += 1
        lag, last_end = found[0], start + CHUNK
        idx_parts.append(found[1])
        g_parts.append(found[2])
        seg_parts.append(np.full(found[1].size, seg))
    if not idx_parts:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate(idx_parts), np.concatenate(g_parts), np.concatenate(seg_parts)


def coverage(idx: np.ndarray, lo: int, hi: int) -> float:
    """Share of the input frames lo..hi that the gain track covers (in whole chunks)."""
    inside = idx[(idx >= lo) & (idx < hi)]
    return np.unique(inside // CHUNK).size * CHUNK / max(hi - lo, 1)


def envelope_db(idx: np.ndarray, g: np.ndarray, win: int = RATE // 50
                ) -> tuple[np.ndarray, np.ndarray]:
    """The gain in dB per 20 ms of input time (median of the per-sample ratios): (time s,
    dB), only where the track has samples."""
    bins = idx // win
    edges = np.flatnonzero(np.diff(bins)) + 1
    t = np.array([b[0] * win / RATE for b in np.split(bins, edges)])
    return t, np.array([20 * np.log10(np.median(part)) for part in np.split(g, edges)])


class Take:
    """One recording's gain track, its envelope and the modulated values polled meanwhile."""

    def __init__(self, idx: np.ndarray, g: np.ndarray, seg: np.ndarray,
                 polled: list[float]) -> None:
        self.idx, self.g, self.seg, self.polled = idx, g, seg, polled
        self.t, self.env = envelope_db(idx, g)


def record(harness: Harness, seconds: float, prepare: Callable[[], None],
           act: Callable[[], None], daemon: Daemon) -> Take:
    """prepare(), then a recording of `seconds` of noise with act() started (on a thread) at
    block ACT_BLOCK; taken again if xruns left too little of it (the first second, the last
    half second or two thirds of the whole)."""
    sig = noise(int(seconds * RATE), seed=11)
    n = len(sig)
    why = []
    for _ in range(TRIES):
        prepare()
        go = threading.Event()
        worker = threading.Thread(target=lambda go=go: go.wait(60) and act(), daemon=True)
        worker.start()

        def on_block(k: int, go: threading.Event = go) -> None:
            if k == ACT_BLOCK:
                go.set()

        poller = Poller(daemon)
        try:
            rec, _ = harness.play_record(sig, on_block=on_block)
        except HarnessStuckError as exc:
            why.append(f"stuck: {exc}")
            continue
        finally:
            go.set()
            worker.join(30)
            polled = poller.stop()
        idx, g, seg = gain_track(sig, rec)
        cov = (coverage(idx, 0, RATE), coverage(idx, n - RATE // 2, n - CHUNK),
               coverage(idx, 0, n))
        if cov[0] >= 0.5 and cov[1] >= 0.5 and cov[2] >= 0.67:
            return Take(idx, g, seg, polled)
        why.append(f"harness odd blocks {len(harness.odd)}, covered (start, end, all) "
                   f"{tuple(round(c, 2) for c in cov)}")
    pytest.fail(f"every recording lost too much to xruns: {why}; load {os.getloadavg()}")


def assert_no_click(take: Take) -> None:
    """No per-sample gain step above the engine gain test's bound, within continuous output."""
    same = (np.diff(take.seg) == 0) & (np.diff(take.idx) > 0)
    slope = np.abs(np.diff(take.g))[same] / np.diff(take.idx)[same]
    assert slope.size > 0.5 * take.idx.size, "too little continuous output to judge"
    worst = int(np.argmax(slope))
    assert slope[worst] < SLOPE_MAX, (
        f"a step in the gain (click): {slope[worst]:.4f} per sample, allowed < {SLOPE_MAX}")


def db(g: float) -> float:
    return 20 * math.log10(g)


# ---------------------------------------------------------------------- the test
def test_heart_rate_moves_the_engine_gain_glides_out_on_loss_and_back_in(
        daemon, harness, bz, pacer, bio):
    # the sensor connects, beats at 66 bpm: the gain glides in to the mapped value
    bz.wait_subscribed(A, WAIT_S)
    start = pacer.mark()
    pacer.hold(66.0)

    def settled_at(bpm: float) -> Callable[[float | None], bool]:
        def ok(v: float | None) -> bool:
            if v is None or len(pacer.sent) - start < 20:
                return False
            return abs(v - mapped_gain_db(window_hr_bpm(pacer.sent[start:]))) < 0.3 \
                and abs(pacer.bpm() - bpm) < 1e-9
        return ok

    # ---- rising heart rate: 66 -> 108 bpm over 3 s, then held
    def at_66() -> None:
        pacer.hold(66.0)
        wait_gain(daemon, bio, settled_at(66.0), "the gain settled for 66 bpm")

    rise_from = pacer.mark()
    take = record(harness, 10.0, at_66, lambda: pacer.ramp(108.0, 3.0), daemon)
    expected = mapped_gain_db(window_hr_bpm(pacer.sent))
    final = gain_of(daemon.status())
    env, polled = take.env, take.polled
    assert polled and all(OUT_LO <= v <= OUT_HI for v in polled), polled
    assert len({round(v, 2) for v in polled}) >= 3, f"modulated hardly moved: {polled}"
    assert np.all(np.diff(polled) >= -0.1), f"modulated went down while the bpm rose: {polled}"
    assert final == pytest.approx(expected, abs=0.3), (final, expected, pacer.sent[rise_from:])
    assert env[0] == pytest.approx(mapped_gain_db(66.0), abs=0.5)  # where it started
    assert env[-5:] == pytest.approx([final] * 5, abs=0.15)  # the engine is where status says
    assert env[-1] - env[0] > 5.0, "the engine's level did not follow the heart rate"
    assert np.all(np.diff(env) >= -0.1), "the level went down while the heart rate rose"
    assert_no_click(take)

    # ---- the sensor drops (and stays away): the gain glides back to the configured value
    def at_108() -> None:
        if not bz.is_subscribed(A):  # a retry: bring the sensor back first
            bz.set_advertising(A, True)
            bz.wait_subscribed(A, WAIT_S)
        pacer.hold(108.0)
        wait_gain(daemon, bio, settled_at(108.0), "the gain settled for 108 bpm")

    def drop() -> None:
        bz.set_advertising(A, False)  # out of range: no reconnect until told
        bz.drop(A)

    take = record(harness, 5.0, at_108, drop, daemon)
    env, polled = take.env, take.polled
    before = float(env[0])
    assert gain_of(daemon.status()) == NEUTRAL
    assert take.g[-1] == pytest.approx(1.0, abs=1e-4), "not back at the configured gain"
    assert before == pytest.approx(mapped_gain_db(108.0), abs=0.5)
    assert np.all(np.diff(env) >= -0.05), "the glide back was not monotonic"
    moving = np.flatnonzero((env > env[0] + 0.1 * (NEUTRAL - env[0]))
                            & (env < env[0] + 0.9 * (NEUTRAL - env[0])))
    glide_s = float(np.ptp(take.t[moving])) if moving.size else 0.0
    # a raised-cosine fade takes 0.59 x FADE_S from 10 to 90 %; a loaded machine delays the
    # service's ticks (the fade then moves in bigger steps, each smoothed by the engine), so
    # only a glide far longer than the engine's own 10 ms smoothing is asked for
    assert glide_s >= 0.1 * FADE_S, f"not a glide: {glide_s:.3f} s from 10 to 90 %"
    assert any(before + 0.5 < v < NEUTRAL - 0.5 for v in polled), \
        f"modulated jumped instead of gliding: {polled}"
    assert_no_click(take)

    # ---- the sensor returns: beats at 84 bpm, the gain glides back in
    def returned_silent() -> None:
        pacer.paused = True
        if bz.is_connected(A):  # a retry: drop it again
            bz.set_advertising(A, False)
            bz.drop(A)
        wait_gain(daemon, bio, lambda v: v == NEUTRAL, "the gain back at neutral")
        time.sleep(max(0.0, pacer.last_sent + STALE_S + 0.5 - time.monotonic()))
        pacer.hold(84.0)
        bz.set_advertising(A, True)
        bz.wait_subscribed(A, WAIT_S)
        time.sleep(0.5)
        assert gain_of(daemon.status()) == NEUTRAL, "moved before any beat of the new link"

    back_from = {}

    def resume() -> None:
        back_from["mark"] = pacer.mark()
        pacer.paused = False

    take = record(harness, 7.0, returned_silent, resume, daemon)
    assert bz.is_subscribed(A)
    expected = mapped_gain_db(window_hr_bpm(pacer.sent[back_from["mark"]:]))
    final = gain_of(daemon.status())
    env, polled = take.env, take.polled
    assert env[0] == pytest.approx(NEUTRAL, abs=1e-3)
    assert final == pytest.approx(expected, abs=0.3), (final, expected)
    assert env[-5:] == pytest.approx([final] * 5, abs=0.15)
    assert np.all(np.diff(env) <= 0.1), "the glide in was not monotonic"
    assert any(expected + 0.5 < v < NEUTRAL - 0.5 for v in polled), \
        f"modulated jumped instead of gliding in: {polled}"
    assert_no_click(take)
    assert not pacer.errors, pacer.errors
    assert bio.proc.poll() is None, bio.output()[-3000:]
