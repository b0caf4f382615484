"""Plays the generated demo music into an ALSA PCM forever: the 'musician' of `make run`."""

from __future__ import annotations

import argparse
import signal
import sys

import alsaaudio
import numpy as np
from echoel.dsp.demo_signal import demo_loop


def play(pcm_name: str, rate: int, period: int, channels: int) -> None:
    """Open the PCM (blocking mode) and write the loop until killed."""
    pcm = alsaaudio.PCM(alsaaudio.PCM_PLAYBACK, device=pcm_name, rate=rate, channels=channels,
                        format=alsaaudio.PCM_FORMAT_FLOAT_LE, periodsize=period, periods=4)
    music = np.ascontiguousarray(demo_loop(rate, channels=channels))
    frames = music.shape[0] - music.shape[0] % period
    pos = 0
    while True:
        pcm.write(music[pos:pos + period])
        pos = (pos + period) % frames


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m echoel.daemon.demo_player --pcm NAME`."""
    ap = argparse.ArgumentParser(prog="echoel-demo-player")
    ap.add_argument("--pcm", required=True)
    ap.add_argument("--rate", type=int, default=48000)
    ap.add_argument("--period", type=int, default=128)
    ap.add_argument("--channels", type=int, default=2)
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        play(a.pcm, a.rate, a.period, a.channels)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
