"""The stand-in's own floor: a bare capture loop on the same JACK-backed ALSA PCM.

Same priority, CPU, poll + revents + read as the engine's audio thread, but no DSP, no
playback, no rings: its wake-up jitter is what jackd's timer, the JACK plugin's thread and a
Python poll loop give by themselves. Prints one JSON object:
{"p50_us", "p99_us", "max_us", "count"} of |(t_k - t_k-1) - period|.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time

import alsaaudio
import numpy as np
from echoel.daemon.hist_stats import percentile_us
from echoel.drivers import realtime

HIST_BINS = 20001


def main(argv: list[str] | None = None) -> int:
    """Run the loop for --seconds and print its jitter figures."""
    ap = argparse.ArgumentParser(prog="bare_loop")
    ap.add_argument("--pcm", default="box_cap")
    ap.add_argument("--rate", type=int, default=48000)
    ap.add_argument("--period", type=int, default=128)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--priority", type=int, default=70)
    ap.add_argument("--cpu", type=int, default=1)
    a = ap.parse_args(argv)
    realtime.lock_memory()
    realtime.set_fifo(a.priority)
    realtime.pin(a.cpu)
    cap = alsaaudio.PCM(alsaaudio.PCM_CAPTURE, alsaaudio.PCM_NONBLOCK, device=a.pcm,
                        rate=a.rate, channels=a.channels,
                        format=alsaaudio.PCM_FORMAT_FLOAT_LE, periodsize=a.period, periods=4)
    poller = select.poll()
    for fd, mask in cap.polldescriptors():
        poller.register(fd, mask)
    hist = np.zeros(HIST_BINS, np.int64)
    period_ns = a.period * 1e9 / a.rate
    worst, prev, t_wake = 0, 0, 0
    cap.read()  # start
    end = time.monotonic() + a.seconds
    while time.monotonic() < end:
        avail = cap.avail()
        if avail < 0:
            cap.read()  # xrun: prepare and go on; the next interval is not counted
            prev = 0
            continue
        if avail < a.period:
            ready = poller.poll(250)
            t_wake = time.monotonic_ns()
            if ready:
                cap.polldescriptors_revents(ready)
            continue
        woke = t_wake or time.monotonic_ns()
        t_wake = 0
        cap.read()
        if prev:
            j = abs((woke - prev) - period_ns)
            worst = max(worst, j)
            hist[min(int(j // 1000), HIST_BINS - 1)] += 1
        prev = woke
    cap.close()
    json.dump({"p50_us": percentile_us(hist, 50), "p99_us": percentile_us(hist, 99),
               "max_us": round(worst / 1000, 1), "count": int(hist.sum())}, sys.stdout)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JACK_NO_START_SERVER", "1")
    sys.exit(main())
