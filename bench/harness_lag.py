"""The 'studio' side of the latency measurement, run as its own process by the benchmark.

Opens a playback and a capture ALSA PCM (JACK-backed), prints `ready` once both exist, waits
for a line on stdin (the benchmark patches the JACK ports in between), then plays white noise
and records it back, and prints one JSON line: the lag of the noise in the recording (frames),
the xruns it had, and how clearly the correlation peak stands out.

Whatever lies between its playback and capture ports (a direct wire, or the engine) adds to
the lag; the benchmark takes the difference of two such measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import alsaaudio
import numpy as np


def noise(n: int, channels: int, seed: int = 1, amp: float = 0.25) -> np.ndarray:
    """Reproducible white noise, float32 [n, channels], different per channel."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-amp, amp, (n, channels)).astype(np.float32)


def find_lag(sig: np.ndarray, rec: np.ndarray) -> tuple[int, float]:
    """Delay (frames) of sig inside rec by cross-correlation of channel 0, and the ratio of the
    highest correlation peak to the next highest one away from it (clarity of the answer)."""
    a = sig[:, 0].astype(np.float64)
    b = rec[:, 0].astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(a) + len(b))))
    xc = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)[: len(b)]
    lag = int(np.argmax(xc))
    rest = np.abs(np.delete(xc, np.s_[max(0, lag - 8): lag + 9]))
    second = float(rest.max()) if rest.size else 0.0
    return lag, float(xc[lag] / second) if second > 0 else float("inf")


def take_realtime(priority: int) -> str | None:
    """SCHED_FIFO for this process (it starts nothing), so a busy machine does not make the
    harness itself xrun; None or why not."""
    if priority <= 0:
        return None
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return None
    except OSError as exc:
        return str(exc)


def measure(play_pcm: str, cap_pcm: str, rate: int, period: int, channels: int,
            seconds: float, tail: int) -> dict:
    """Open both PCMs, hand-shake on stdin/stdout, play and record; the figures as a dict."""
    kw = dict(rate=rate, channels=channels, format=alsaaudio.PCM_FORMAT_FLOAT_LE,
              periodsize=period, periods=4)
    play = alsaaudio.PCM(alsaaudio.PCM_PLAYBACK, device=play_pcm, **kw)
    cap = alsaaudio.PCM(alsaaudio.PCM_CAPTURE, device=cap_pcm, **kw)
    try:
        print("ready", flush=True)
        if not sys.stdin.readline():
            return {"error": "no go from the benchmark"}
        sig = noise(int(seconds * rate), channels)
        total = sig.shape[0] + tail
        total += -total % period
        src = np.zeros((total, channels), np.float32)
        src[: sig.shape[0]] = sig
        rec = np.zeros_like(src)
        silence = np.zeros((period, channels), np.float32)
        play.drop()
        cap.drop()
        play.write(silence)
        play.write(silence)
        xruns = 0
        for k in range(total // period):
            if play.write(src[k * period:(k + 1) * period]) < 0:
                xruns += 1
            n, data = cap.read()
            if n == period:
                rec[k * period:(k + 1) * period] = np.frombuffer(data, np.float32).reshape(
                    -1, channels)
            else:
                xruns += 1
        lag, clarity = find_lag(sig, rec)
        return {"lag": lag, "xruns": xruns, "clarity": round(clarity, 2)}
    finally:
        play.close()
        cap.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python bench/harness_lag.py --play PCM --cap PCM --period N`."""
    ap = argparse.ArgumentParser(prog="harness_lag")
    ap.add_argument("--play", default="h_play")
    ap.add_argument("--cap", default="h_cap")
    ap.add_argument("--rate", type=int, default=48000)
    ap.add_argument("--period", type=int, default=128)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=0.5, help="length of the noise burst")
    ap.add_argument("--tail", type=int, default=16384, help="frames recorded after the noise")
    ap.add_argument("--rt-priority", type=int, default=60, help="SCHED_FIFO priority; 0: none")
    a = ap.parse_args(argv)
    rt_error = take_realtime(a.rt_priority)
    try:
        out = measure(a.play, a.cap, a.rate, a.period, a.channels, a.seconds, a.tail)
    except alsaaudio.ALSAAudioError as exc:
        out = {"error": f"ALSA: {exc}"}
    if rt_error:
        out["rt_error"] = rt_error
    print(json.dumps(out), flush=True)
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main())
