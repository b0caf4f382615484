"""numba kernels the real-time loop calls besides the chain: parameter intake and accounting."""

from __future__ import annotations

import math

import numba
from echoel.daemon.engine_shared import HIST_BINS, F, H
from echoel.daemon.spsc_ring import pop
from echoel.dsp.chain_kernels import L_GAIN

MAX_PARAMS_PER_BLOCK = 64


@numba.njit(nogil=True, cache=True)
def mix_returns(h, meta, data, block, meta_out, x, f):
    """Add one block of a return ring (network audio, period x channels_in) to the input;
    an empty ring (stream absent, late or lost) adds nothing and is counted."""
    if not pop(h, meta, data, block, meta_out):
        f[F.RETURN_EMPTY] += 1
        return False
    frames, ch = x.shape
    for i in range(frames):
        for c in range(ch):
            x[i, c] += block[i * ch + c]
    f[F.RETURN_BLOCKS] += 1
    return True


@numba.njit(nogil=True, cache=True)
def drain_params(h, meta, data, rec, meta_out, p_tgt, f):
    """Apply pending (slot, value) records to the chain's targets; bad ones are counted."""
    n = 0
    while n < MAX_PARAMS_PER_BLOCK and pop(h, meta, data, rec, meta_out):
        n += 1
        slot = rec[0]
        value = rec[1]
        if slot >= 0 and slot < p_tgt.shape[0] and slot == math.floor(slot) \
                and math.isfinite(value):
            p_tgt[int(slot)] = value
            f[F.PARAMS_APPLIED] += 1
        else:
            f[F.PARAMS_REJECTED] += 1
    return n


@numba.njit(nogil=True, cache=True)
def _bin(hist, row, ns):
    b = ns // 1000
    if b >= HIST_BINS:
        b = HIST_BINS - 1
    if b < 0:
        b = 0
    hist[row, b] += 1


@numba.njit(nogil=True, cache=True)
def account_block(f, hist, lim, t_wake, t_read, t_dsp0, t_dsp1, t_written, period_ns):
    """Per-block figures: DSP time, read-to-write time, wake-up jitter, heartbeat."""
    dsp = t_dsp1 - t_dsp0
    f[F.DSP_NS_SUM] += dsp
    if dsp > f[F.DSP_NS_MAX]:
        f[F.DSP_NS_MAX] = dsp
    _bin(hist, H.DSP, dsp)
    r2w = t_written - t_read
    if r2w > f[F.R2W_NS_MAX]:
        f[F.R2W_NS_MAX] = r2w
    _bin(hist, H.READ_TO_WRITE, r2w)
    prev = f[F.PREV_WAKE_NS]
    if prev > 0:
        j = abs((t_wake - prev) - period_ns)
        if j > f[F.JITTER_NS_MAX]:
            f[F.JITTER_NS_MAX] = j
        _bin(hist, H.WAKE_JITTER, j)
    f[F.PREV_WAKE_NS] = t_wake
    g = lim[L_GAIN]
    f[F.LIMITER_GR_MDB] = 0 if g >= 1.0 or g <= 0.0 else int(-20000.0 * math.log10(g))
    f[F.BLOCKS] += 1
    f[F.HEARTBEAT_NS] = t_written


@numba.njit(nogil=True, cache=True)
def onset(x, threshold):
    """Index of the first frame whose channel 0 exceeds threshold, or -1."""
    for n in range(x.shape[0]):
        if abs(x[n, 0]) > threshold:
            return n
    return -1
