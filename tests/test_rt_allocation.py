"""The audio loop's memory, measured: it keeps nothing it allocates, and the little it does
allocate per block (pyalsaaudio's read() returns a new bytes object) does not grow with time.

Runs the real loop in a fresh process on JACK PCMs with tracemalloc on; nothing else in that
process allocates meanwhile (the rig's patchbay is stopped).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from pathlib import Path

from echoel.daemon import config
from echoel.daemon.engine_shared import C, EngineShared, F, RingSizes
from echoel.daemon.rt_loop import AudioLoop
from echoel.drivers.alsa_pcm import StreamSpec, open_stream
from rig import CH, PERIOD, RATE


def run_traced(loop: AudioLoop, shared: EngineShared, seconds: float) -> tuple[int, int, int]:
    """(blocks, bytes still held afterwards, peak bytes above the start) for one run."""
    shared.control[C.STOP] = 0
    b0 = int(shared.fields[F.BLOCKS])
    thread = threading.Thread(target=loop.run_rt, args=(70, -1), name="echoel-rt")
    tracemalloc.start()
    start, _ = tracemalloc.get_traced_memory()
    thread.start()
    time.sleep(seconds)
    shared.control[C.STOP] = 1
    thread.join(5)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return int(shared.fields[F.BLOCKS]) - b0, current - start, peak - start


def measure(instance: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Open the rig's PCMs in this process and trace two runs of the loop (1 s and 3 s)."""
    cfg = config.validate({
        "engine": {"capture_device": "box_cap", "playback_device": "box_play",
                   "format": "FLOAT_LE", "period": PERIOD, "channels_in": CH,
                   "channels_out": CH},
        "chain": {"gain_db": -3.0, "eq": [{"kind": "peaking", "freq": 1000.0,
                                            "gain_db": 3.0}]},
        "taps": [{"name": "t", "source": "input", "slots": 8}],
        "daemon": {"instance": instance},
    })
    shared = EngineShared.create(instance, RingSizes(PERIOD, CH, CH, {"t": ("input", 8)}))
    try:
        spec = dict(rate=RATE, channels=CH, fmt="FLOAT_LE", period=PERIOD, periods=4)
        cap = open_stream(True, StreamSpec("box_cap", **spec))
        play = open_stream(False, StreamSpec("box_play", **spec))
        loop = AudioLoop(shared, cap, play, cfg["engine"], cfg.chain_spec(), cfg["taps"])
        loop.warm_up()
        short = run_traced(loop, shared, 1.0)
        long = run_traced(loop, shared, 3.0)
        cap.close()
        play.close()
    finally:
        EngineShared.remove(instance)
    return short, long


def test_audio_loop_keeps_no_allocation_and_its_peak_does_not_grow(rig):
    rig.patch.stop()
    # a fresh process: nothing else allocates there, and no JACK/ALSA client state is left
    # from earlier tests in this one
    instance = f"alloc{uuid.uuid4().hex[:6]}"
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_rt_allocation import measure; print(json.dumps(measure({instance!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    short, long = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\nloop memory (blocks, held bytes, peak bytes): 1 s {short}, 3 s {long}")
    for blocks, seconds in ((short[0], 1.0), (long[0], 3.0)):
        assert blocks > 0.5 * seconds * RATE / PERIOD, (short, long)
    # nothing the loop allocated is still held (a few hundred bytes of interpreter noise)
    assert short[1] < 4096 and long[1] < 4096, (short, long)
    # the transient peak is a few periods' worth, and three times longer is not more
    assert long[2] < 64 * 1024, (short, long)
    assert long[2] < short[2] + 8192, (short, long)
