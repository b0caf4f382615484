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
    EV_POLL_TIMEOUT,
    EV_XRUN,
    C,
    EngineShared,
    F,
    State,
)
from echoel.daemon.spsc_ring import push
from echoel.drivers import realtime
from echoel.drivers.alsa_pcm import EPIPE
from echoel.dsp import sample_format
from echoel.dsp.chain_kernels import ChainState
from echoel.dsp.chain_layout import ChainSpec

POLLERR = select.POLLERR | select.POLLHUP | select.POLLNVAL


class AudioLoop:
    """One open stream pair and all the memory its loop needs."""

    def __init__(self, shared: EngineShared, cap: alsaaudio.PCM, play: alsaaudio.PCM,
                 engine: dict, chain: ChainSpec, taps: list[dict]) -> None:
        self.shared = shared
        self.cap, self.play = cap, play
        self.period = engine["period"]
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
        """Compile and run every kernel with the exact types the loop will pass.

        Uses private copies of the rings and status arrays, so no consumer sees warm-up data.
        """
        f = np.zeros_like(self.shared.fields)
        hist = np.zeros_like(self.shared.hist)
        raw = np.frombuffer(bytes(self.period * self.cin * np.dtype(self.dtype).itemsize),
                            self.dtype)  # read-only, as the loop sees it
        sample_format.decode(raw, self.scale, self.chain.x)
        saved = self.chain.p_cur.copy(), self.chain.z.copy(), self.chain.lim.copy()
        self.chain.run()
        self.chain.p_cur[:], self.chain.z[:], self.chain.lim[:] = saved
        self.encode(self.chain.y, self.scale, self.out_raw)
        p = self.params.like()
        p.push(np.array([0.0, self.chain.p_tgt[0]]), 0)
        rt_kernels.drain_params(p.h, p.meta, p.data, self.param_rec, self.meta_out,
                                self.chain.p_tgt, f)
        for ring, _ in self.taps:
            scratch = ring.like()
            push(scratch.h, scratch.meta, scratch.data, self.in_f32, 0)
        m = self.meters.like()
        push(m.h, m.meta, m.data, self.chain.meters, 0)
        e = self.events.like()
        push(e.h, e.meta, e.data, self.event, 0)
        rt_kernels.account_block(f, hist, self.chain.lim, 1, 2, 3, 4, 5, self.period_ns)

    def _event(self, kind: int, direction: int, t: int) -> None:
        ev = self.event
        ev[0], ev[1], ev[2], ev[3] = kind, direction, t, self.shared.fields[F.BLOCKS]
        if not self.events.push(ev, t):
            self.shared.fields[F.XRUN_EVENTS_DROPPED] += 1

    def prime(self) -> None:
        """(Re)start both streams: empty them, queue `prefill` periods of silence, start."""
        self.cap.drop()
        self.play.drop()
        for _ in range(self.prefill):
            self.play.write(self.silence)
        self.cap.read()  # starts capture; non-blocking, returns nothing yet
        self.shared.fields[F.PREV_WAKE_NS] = 0

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
        lim, period_ns, now = ch.lim, self.period_ns, time.monotonic_ns
        self.prime()
        f[F.STATE] = State.RUNNING
        f[F.FLOW_STARTED_NS] = now()
        while ctl[C.STOP] == 0:
            if not poll(timeout):
                t = now()
                f[F.POLL_TIMEOUTS] += 1
                self._event(EV_POLL_TIMEOUT, DIR_CAPTURE, t)
                return f"device lost: no audio from the capture device for {timeout} ms"
            t_wake = now()
            avail = cap.avail()
            if avail < 0:
                self._xrun(DIR_BOTH if play.avail() < 0 else DIR_CAPTURE, t_wake)
                continue
            if avail < period:
                continue
            n, data = cap.read()
            t_read = now()
            if n != period:
                if n == EPIPE:
                    self._xrun(DIR_CAPTURE, t_read)
                continue
            decode(np.frombuffer(data, dtype), scale, ch.x)
            drain(ph, pm, pd, rec, meta_out, p_tgt, f)
            process()
            encode(ch.y, scale, out_raw)
            t_dsp1 = now()
            w = play.write(out_raw)
            t_written = now()
            if w != period:
                self._xrun(DIR_PLAYBACK, t_written)
                continue
            ring_push(mh, mm, md, ch.meters, t_read)
            if taps:
                in_f32[:] = ch.x
                out_f32[:] = ch.y
                for ring, is_input in taps:
                    if not ring_push(ring.h, ring.meta, ring.data,
                                     in_f32 if is_input else out_f32, t_read):
                        f[F.TAP_OVERFLOWS] += 1
            account(f, hist, lim, t_wake, t_read, t_read, t_dsp1, t_written, period_ns)
        return "stopped"
