"""The real-time audio loop: capture -> chain -> playback, one period at a time.

Runs in its own thread of the engine process. Everything it touches is allocated before the
stream starts; it waits only on the capture PCM's poll descriptors (with a timeout, so a device
that vanishes is noticed); it never logs or locks. Xruns restart both streams at the configured
prefill, so latency after recovery equals latency before.
"""

from __future__ import annotations

import select
import time

import alsaaudio
import numpy as np
from echoel.daemon import rt_kernels
from echoel.daemon.engine_shared import (
    DIR_BOTH,
    DIR_CAPTURE,
    DIR_PLAYBACK,
    EV_XRUN,
    HIST_BINS,
    C,
    EngineShared,
    F,
    State,
)
from echoel.daemon.spsc_ring import Ring, push
from echoel.drivers import realtime
from echoel.drivers.alsa_pcm import EPIPE
from echoel.dsp import sample_format
from echoel.dsp.chain_kernels import ChainState
from echoel.dsp.chain_layout import ChainSpec

POLLGONE = select.POLLHUP | select.POLLNVAL
PROBE_LEVEL = 0.5
PROBE_MAX_BLOCKS = 64


class AudioLoop:
    """One open stream pair and all the memory its loop needs."""

    def __init__(self, shared: EngineShared, cap: alsaaudio.PCM, play: alsaaudio.PCM,
                 engine: dict, chain: ChainSpec, taps: list[dict],
                 returns: list[str] | None = None) -> None:
        self.shared = shared
        self.cap, self.play = cap, play
        self.period = engine["period"]
        self.periods = engine["periods"]
        self.buffer_frames = self.period * self.periods
        self.prefill = engine["prefill"]
        self.cin, self.cout = engine["channels_in"], engine["channels_out"]
        self.period_ns = round(self.period * 1e9 / engine["rate"])
        self.timeout_ms = engine["poll_timeout_ms"]
        self.dtype, self.scale = sample_format.FORMATS[engine["format"]]
        self.encode = sample_format.encoder_for(engine["format"])
        self.chain = ChainState(chain, engine["rate"], self.period, self.cin, self.cout)
        self.out_raw = np.zeros(self.period * self.cout, self.dtype)
        self.silence = np.zeros(self.period * self.cout, self.dtype)
        self.in_f32 = np.zeros((self.period, self.cin), np.float32)
        self.out_f32 = np.zeros((self.period, self.cout), np.float32)
        rings = shared.rings
        self.params = rings["params"]
        self.events = rings["events"]
        self.meters = rings["meters"]
        self.taps = [(rings["tap." + t["name"]], t["source"] == "input") for t in taps]
        # received network streams, mixed into the input (daemon/streams_service.py writes)
        self.returns = [rings[r] for r in (returns or [])]
        self.return_block = np.zeros(self.period * self.cin, np.float32)
        self.param_rec = np.zeros(2)
        self.meta_out = np.zeros(2, np.int64)
        self.event = np.zeros(4, np.int64)
        self.poller = select.poll()
        for fd, mask in cap.polldescriptors():
            self.poller.register(fd, mask)
        self.exit_reason = ""
        self.rt_missing: dict[str, str] = {}

    # ------------------------------------------------------------------ helpers (not per block)
    def warm_up(self) -> None:
        """Compile and run every kernel with the exact types the loop will pass."""
        warm_kernels(self.chain, self.dtype, self.scale, self.encode,
                     [ring for ring, _ in self.taps], self.params, self.meters, self.events,
                     self.period_ns, self.returns, self.return_block)

    def _event(self, kind: int, direction: int, t: int) -> None:
        ev = self.event
        ev[0], ev[1], ev[2], ev[3] = kind, direction, t, self.shared.fields[F.BLOCKS]
        if not self.events.push(ev, t):
            self.shared.fields[F.XRUN_EVENTS_DROPPED] += 1

    def prime(self) -> None:
        """(Re)align both streams at `prefill` periods of latency, after open or an xrun.

        Never snd_pcm_drop(): JACK's ALSA plugin deactivates its client on drop, and
        reactivating it while others run leaves the JACK graph waiting on it. Instead: clear
        the capture's xrun state and discard its backlog, clear the playback's xrun state, top
        playback up to `prefill` periods of silence, then start capture.
        """
        cap, play, period = self.cap, self.play, self.period
        for _ in range(4 * self.periods + 4):
            avail = cap.avail()
            if avail < 0 or avail >= period:
                cap.read()  # after an xrun: prepares; else: drops one period of backlog
            else:
                break
        # avail() first: it syncs the pointer, which is how an underrun becomes visible
        if play.avail() < 0 or play.state() == alsaaudio.PCM_STATE_XRUN:
            play.write(self.silence)  # returns -EPIPE and prepares the stream
        queued = 0
        if play.state() != alsaaudio.PCM_STATE_PREPARED:
            queued = max(0, self.buffer_frames - play.avail())
        while queued + period <= self.prefill * period:
            play.write(self.silence)
            queued += period
        if cap.state() == alsaaudio.PCM_STATE_PREPARED:
            cap.read()  # starts capture; non-blocking, returns nothing yet
        self.shared.fields[F.PREV_WAKE_NS] = 0

    def _probe_step(self, state: int, t: int) -> tuple[int, int]:
        """Round-trip probe through a loopback: mute, send one impulse, time its return.

        state 1: emit the impulse (output muted otherwise); t counts frames since. state 2:
        listen; the output stays muted so the impulse does not circulate. Gives up after
        PROBE_MAX_BLOCKS. Returns the next (state, t); 0 when done.
        """
        y = self.chain.y
        y[:] = 0.0
        f = self.shared.fields
        if state == 1:
            y[0, 0] = PROBE_LEVEL
            return 2, 0
        hit = rt_kernels.onset(self.chain.x, PROBE_LEVEL / 2)
        if hit >= 0:  # the input block of this iteration: t + one period after the impulse
            f[F.PROBE_FRAMES] = t + self.period + hit
        elif t // self.period < PROBE_MAX_BLOCKS:
            return 2, t + self.period
        else:
            f[F.PROBE_FRAMES] = -1
        f[F.PROBE_DONE_SEQ] = self.shared.control[C.PROBE_SEQ]
        return 0, 0

    def _xrun(self, direction: int, t: int) -> None:
        f = self.shared.fields
        if direction & DIR_CAPTURE:
            f[F.XRUN_CAPTURE] += 1
        if direction & DIR_PLAYBACK:
            f[F.XRUN_PLAYBACK] += 1
        f[F.LAST_XRUN_NS] = t
        f[F.RECOVERIES] += 1
        self._event(EV_XRUN, direction, t)
        self.prime()

    # ------------------------------------------------------------------ the thread
    def run_rt(self, priority: int, cpu: int) -> None:
        """Thread body: take real-time scheduling, then loop until stopped or the device goes."""
        for name, err in (("sched_fifo", realtime.set_fifo(priority)),
                          ("affinity", realtime.pin(cpu))):
            if err:
                self.rt_missing[name] = err
        try:
            self.exit_reason = self._loop()
        except alsaaudio.ALSAAudioError as exc:
            self.exit_reason = f"device error: {exc}"
        self.shared.fields[F.STATE] = State.SEARCHING if self.exit_reason != "stopped" \
            else State.STOPPED

    def _loop(self) -> str:
        sh = self.shared
        f, hist, ctl = sh.fields, sh.hist, sh.control
        cap, play, poll = self.cap, self.play, self.poller.poll
        period, timeout = self.period, self.timeout_ms
        dtype, scale, encode, out_raw = self.dtype, self.scale, self.encode, self.out_raw
        ch = self.chain
        decode, process = sample_format.decode, ch.run
        drain, account, ring_push = rt_kernels.drain_params, rt_kernels.account_block, push
        ph, pm, pd = self.params.h, self.params.meta, self.params.data
        rec, meta_out, p_tgt = self.param_rec, self.meta_out, ch.p_tgt
        mh, mm, md = self.meters.h, self.meters.meta, self.meters.data
        taps, in_f32, out_f32 = self.taps, self.in_f32, self.out_f32
        returns, rblock, mix = self.returns, self.return_block, rt_kernels.mix_returns
        lim, period_ns, now = ch.lim, self.period_ns, time.monotonic_ns
        buffer_frames = self.buffer_frames
        self.prime()
        f[F.STATE] = State.RUNNING
        f[F.FLOW_STARTED_NS] = now()
        timeout_ns = timeout * 1_000_000
        empty_since = 0  # first of consecutive wake-ups that brought no full period
        revents = cap.polldescriptors_revents
        t_wake = 0
        stall_seen = ctl[C.STALL_SEQ]
        probe_seen, probe_state, probe_t = ctl[C.PROBE_SEQ], 0, 0
        failed_writes, wedge_blocks = 0, 2 * self.periods + 16
        while ctl[C.STOP] == 0:
            if ctl[C.STALL_SEQ] != stall_seen:  # diagnostic stall (echoel diag stall)
                stall_seen = ctl[C.STALL_SEQ]
                time.sleep(ctl[C.STALL_MS] / 1000.0)
            avail = cap.avail()
            if avail < 0:
                self._xrun(DIR_BOTH if play.avail() < 0 else DIR_CAPTURE, now())
                empty_since = 0
                continue
            if avail < period:
                # Sleep until the device has data. revents() also acknowledges the wake-up
                # (the JACK plugin's poll pipe stays readable until it is called).
                ready = poll(timeout)
                t_wake = now()
                if not ready:
                    f[F.POLL_TIMEOUTS] += 1
                    return f"device lost: no audio from the capture device for {timeout} ms"
                if revents(ready) & POLLGONE:
                    return "device lost: the capture device hung up"
                if empty_since == 0:
                    empty_since = t_wake
                elif t_wake - empty_since > timeout_ns:
                    return (f"device lost: the capture device woke us for {timeout} ms "
                            "without delivering audio")
                continue
            empty_since = 0
            woke = t_wake if t_wake else now()  # data already there: no wake-up to time
            t_wake = 0
            n, data = cap.read()
            t_read = now()
            if n != period:
                if n == EPIPE:
                    self._xrun(DIR_CAPTURE, t_read)
                continue
            # Latency of this block = what playback still holds + what capture holds (avail
            # includes this block): shown in status. It is not corrected here: JACK may run
            # the playback and capture clients in either order within a cycle, which moves
            # this reading by a period without any change in the real latency.
            pavail = play.avail()
            if pavail < 0:
                self._xrun(DIR_PLAYBACK, t_read)
                continue
            f[F.LATENCY_FRAMES] = buffer_frames - pavail + avail
            decode(np.frombuffer(data, dtype), scale, ch.x)
            for ring in returns:
                mix(ring.h, ring.meta, ring.data, rblock, meta_out, ch.x, f)
            drain(ph, pm, pd, rec, meta_out, p_tgt, f)
            process()
            if probe_state:  # diagnostic round-trip probe (echoel diag latency)
                probe_state, probe_t = self._probe_step(probe_state, probe_t)
            elif ctl[C.PROBE_SEQ] != probe_seen:
                probe_seen = ctl[C.PROBE_SEQ]
                probe_state, probe_t = self._probe_step(1, 0)
            encode(ch.y, scale, out_raw)
            t_dsp1 = now()
            w = play.write(out_raw)
            t_written = now()
            if w != period:
                self._xrun(DIR_PLAYBACK, t_written)
                failed_writes += 1
                if failed_writes > wedge_blocks:
                    return (f"device wedged: {failed_writes} writes in a row failed; "
                            "reopening it")
                continue
            failed_writes = 0
            ring_push(mh, mm, md, ch.meters, t_read)
            if taps:
                in_f32[:] = ch.x
                out_f32[:] = ch.y
                for ring, is_input in taps:
                    if not ring_push(ring.h, ring.meta, ring.data,
                                     in_f32 if is_input else out_f32, t_read):
                        f[F.TAP_OVERFLOWS] += 1
            account(f, hist, lim, woke, t_read, t_read, t_dsp1, t_written, period_ns)
        return "stopped"


def warm_kernels(chain: ChainState, dtype, scale: float, encode, taps: list[Ring],
                 params: Ring, meters: Ring, events: Ring, period_ns: int,
                 returns: list[Ring] = (), return_block: np.ndarray | None = None) -> None:
    """Run every kernel of the loop once on private copies (no consumer sees warm-up data),
    so that nothing compiles once audio runs. With numba's cache this also fills the cache."""
    f = np.zeros(64, np.int64)
    hist = np.zeros((3, HIST_BINS), np.int64)
    frames, cin = chain.x.shape
    raw = np.frombuffer(bytes(frames * cin * np.dtype(dtype).itemsize), dtype)  # read-only
    sample_format.decode(raw, scale, chain.x)
    saved = chain.p_cur.copy(), chain.z.copy(), chain.lim.copy()
    chain.run()
    chain.p_cur[:], chain.z[:], chain.lim[:] = saved
    out_raw = np.zeros(frames * chain.y.shape[1], dtype)
    encode(chain.y, scale, out_raw)
    p = params.like()
    p.push(np.array([0.0, chain.p_tgt[0]]), 0)
    rec, meta_out = np.zeros(2), np.zeros(2, np.int64)
    rt_kernels.drain_params(p.h, p.meta, p.data, rec, meta_out, chain.p_tgt, f)
    block = np.zeros(chain.x.shape, np.float32)
    for ring in taps:
        scratch = ring.like()
        push(scratch.h, scratch.meta, scratch.data, block, 0)
    if return_block is not None:
        x = chain.x.copy()
        for ring in returns:
            scratch = ring.like()
            push(scratch.h, scratch.meta, scratch.data, return_block, 0)
            rt_kernels.mix_returns(scratch.h, scratch.meta, scratch.data, return_block,
                                   meta_out, x, f)
    m = meters.like()
    push(m.h, m.meta, m.data, chain.meters, 0)
    e = events.like()
    push(e.h, e.meta, e.data, np.zeros(4, np.int64), 0)
    rt_kernels.account_block(f, hist, chain.lim, 1, 2, 3, 4, 5, period_ns)
    rt_kernels.onset(chain.x, 0.5)


def precompile(cfg) -> None:
    """Compile (and cache) the loop's kernels for a config, without a device."""
    from echoel.daemon.engine_shared import MAX_CHANNELS

    e = cfg["engine"]
    chain = ChainState(cfg.chain_spec(), e["rate"], e["period"], e["channels_in"],
                       e["channels_out"])
    dtype, scale = sample_format.FORMATS[e["format"]]
    rings = [Ring.private(4, e["period"] * e["channels_in"], np.float32)]
    warm_kernels(chain, dtype, scale, sample_format.encoder_for(e["format"]), rings,
                 Ring.private(4, 2, np.float64), Ring.private(4, 4 * MAX_CHANNELS, np.float32),
                 Ring.private(4, 4, np.int64), 1)
