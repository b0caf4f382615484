"""The engine process: finds the interface, opens it, runs the real-time thread, recovers.

Started by the supervisor (`echoel run`) as `python -m echoel.daemon.engine_process`. Its main
thread only manages devices and sleeps; the audio thread does the work. It talks to nothing
but shared memory: the supervisor reads its status and rings and logs on its behalf.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import signal
import sys
import threading
import time

from echoel.daemon import config as config_mod
from echoel.daemon.engine_shared import (
    DIR_BOTH,
    EV_DEVICE_LOST,
    EV_DEVICE_OPENED,
    EXIT_DEVICE_LOST,
    C,
    EngineShared,
    F,
    Guarantee,
    State,
    return_ring,
)
from echoel.daemon.rt_loop import AudioLoop
from echoel.drivers import alsa_cards, realtime
from echoel.drivers.alsa_pcm import DeviceError, StreamSpec, open_stream
from echoel.dsp.sample_format import FORMATS

FORMAT_INDEX = {name: i for i, name in enumerate(FORMATS)}


class Engine:
    """Device management around the audio loop."""

    def __init__(self, cfg: config_mod.Config, shared: EngineShared) -> None:
        self.cfg = cfg
        self.shared = shared
        self.missing: dict[str, str] = {}
        self.info: dict = {}
        self.parent = os.getppid()

    def _publish(self, **info) -> None:
        self.info.update(info)
        self.info["missing_guarantees"] = self.missing
        self.shared.write_text(self.info)

    def _alive(self) -> None:
        self.shared.fields[F.MAIN_HEARTBEAT_NS] = time.monotonic_ns()

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping() and time.monotonic() < end:
            self._alive()
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))

    def stopping(self) -> bool:
        """True once the supervisor asked the engine to stop (or is gone)."""
        if os.getppid() != self.parent:
            self.shared.control[C.STOP] = 1
        return bool(self.shared.control[C.STOP])

    def setup_process(self) -> None:
        """Process-wide guarantees: locked memory. (Scheduling is per thread, in the loop.)"""
        if self.cfg["realtime"]["mlock"]:
            err = realtime.lock_memory()
            if err:
                self.missing["mlock"] = err
        else:
            self.missing["mlock"] = "disabled by [realtime] mlock = false"

    def run(self) -> int:
        """Until stopped: look for the interface, stream, recover; returns an exit code."""
        e = self.cfg["engine"]
        f = self.shared.fields
        f[F.ENGINE_PID] = os.getpid()
        for k, field in (("rate", F.RATE), ("period", F.PERIOD), ("periods", F.PERIODS),
                         ("prefill", F.PREFILL), ("channels_in", F.CH_IN),
                         ("channels_out", F.CH_OUT)):
            f[field] = e[k]
        f[F.FORMAT_CODE] = FORMAT_INDEX[e["format"]]
        f[F.STARTED_NS] = time.monotonic_ns()
        self.setup_process()
        rescan = e["rescan_ms"] / 1000.0
        while not self.stopping():
            self._alive()
            cap_name = alsa_cards.resolve(self.cfg.capture_device)
            play_name = alsa_cards.resolve(self.cfg.playback_device)
            if cap_name is None or play_name is None:
                f[F.STATE] = State.SEARCHING
                self._publish(device=None, problem="no audio interface present (device = "
                              "'auto' and no card in /proc/asound); plug one in")
                self._sleep(rescan)
                continue
            try:
                streams = self._open(cap_name, play_name)
            except DeviceError as exc:
                f[F.STATE] = State.SEARCHING
                self._publish(device=None, problem=str(exc))
                self._sleep(rescan)
                continue
            self._stream(*streams, cap_name, play_name)
        f[F.STATE] = State.STOPPED
        return 0

    def _open(self, cap_name: str, play_name: str):
        e = self.cfg["engine"]
        spec = dict(rate=e["rate"], fmt=e["format"], period=e["period"], periods=e["periods"])
        cap = open_stream(True, StreamSpec(cap_name, channels=e["channels_in"], **spec))
        try:
            play = open_stream(False, StreamSpec(play_name, channels=e["channels_out"], **spec))
        except DeviceError:
            cap.close()
            raise
        return cap, play

    def _stream(self, cap, play, cap_name: str, play_name: str) -> None:
        f = self.shared.fields
        f[F.STATE] = State.STARTING
        loop = AudioLoop(self.shared, cap, play, self.cfg["engine"], self.cfg.chain_spec(),
                         self.cfg["taps"], [return_ring(s["name"]) for s in self.cfg["streams"]
                                            if s["direction"] == "receive"])
        loop.warm_up()
        f[F.OPENS] += 1
        self._publish(device={"capture": cap_name, "playback": play_name}, problem=None)
        loop._event(EV_DEVICE_OPENED, DIR_BOTH, time.monotonic_ns())
        rt = self.cfg["realtime"]
        gc_frozen = rt["gc_freeze"]
        if gc_frozen:
            gc.collect()
            gc.freeze()
            gc.disable()
        thread = threading.Thread(target=loop.run_rt, args=(rt["priority"], rt["cpu"]),
                                  name="echoel-rt", daemon=True)
        thread.start()
        published = False
        while thread.is_alive():
            thread.join(0.1)
            self._alive()
            self.stopping()  # notices a dead supervisor and tells the loop to stop
            if not published and f[F.STATE] == State.RUNNING:
                self.missing.pop("sched_fifo", None)
                self.missing.pop("affinity", None)
                self.missing.update(loop.rt_missing)
                bits = Guarantee.GC_FROZEN if gc_frozen else 0
                for name, bit in (("sched_fifo", Guarantee.SCHED_FIFO),
                                  ("affinity", Guarantee.AFFINITY), ("mlock", Guarantee.MLOCK)):
                    if name not in self.missing:
                        bits |= bit
                f[F.GUARANTEES] = bits
                self._publish()
                published = True
        if gc_frozen:
            gc.enable()
            gc.unfreeze()
        if loop.exit_reason != "stopped":
            f[F.LOSSES] += 1
            loop._event(EV_DEVICE_LOST, DIR_BOTH, time.monotonic_ns())
            self._publish(device=None, problem=loop.exit_reason)
            # A vanished or wedged device can hang in close (seen with JACK's ALSA plugin):
            # leave the process instead; the supervisor starts a fresh engine, which looks
            # for the interface again. The supervisor itself (the daemon) keeps running.
            os._exit(EXIT_DEVICE_LOST)
        for pcm in (cap, play):
            pcm.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the engine process."""
    ap = argparse.ArgumentParser(prog="echoel-engine")
    ap.add_argument("--config-json", required=True, help="validated config, as the supervisor "
                    "wrote it")
    args = ap.parse_args(argv)
    realtime.die_with_parent()  # never outlive the supervisor
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: stacks
    with open(args.config_json) as fh:
        cfg = config_mod.validate(json.load(fh), args.config_json)
    shared = EngineShared.attach(cfg["daemon"]["instance"])
    engine = Engine(cfg, shared)

    def on_term(signum, frame):
        shared.control[C.STOP] = 1

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    return engine.run()


if __name__ == "__main__":
    sys.exit(main())
