"""Dynamics: a feed-forward compressor and a true-peak brickwall limiter, stereo linked.

Both work in the log domain: a detector level in dB goes through the static curve (threshold,
ratio, soft knee of `knee_db` centred on the threshold) into a gain reduction in dB, which is
smoothed and applied to the audio delayed by the lookahead (the gain computer sees the
future). Every channel gets the same gain (linked). Make-up gain glides (10 ms one-pole).

Compressor detector: "peak" (per sample, max |x| over channels) or "rms" (per channel one-pole
mean square over `rms_ms`, the loudest channel; a full-scale sine reads -3.01 dB). Its gain
reduction is smoothed by a branching one-pole: attack_ms / release_ms are the time constants
(1 - 1/e of a step in dB) while the reduction rises / falls. Latency: the lookahead.

Limiter detector: the true peak (dsp/true_peak.py: oversampled, BS.1770-4), max over channels.
Ratio is infinite; the knee (if any) lies below the ceiling, so the curve never exceeds it. The
required gain is held (sliding minimum) for attack + 2 * MARGIN samples, released by a one-pole
in dB (release_ms) and averaged over attack samples: the gain ramps down over attack_ms and is
fully down, for the peak and MARGIN samples either side, when the peak reaches the output.
Latency: attack + MARGIN + the detector's group delay, in samples (`latency`). Make-up gain
drives the input before detection, so the ceiling holds.

Non-finite input samples are read as 0 and the block counted (`bad_blocks`); smoothing state
that is no longer finite is reset. Kernels allocate nothing; all state is built by the classes.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from echoel.dsp.biquad_cascade import check_block
from echoel.dsp.true_peak import (
    TruePeakState,
    oversampled_peak_per_sample,
)

DETECTORS = {"peak": 0, "rms": 1}
DET_PEAK, DET_RMS = 0, 1
MAKEUP_SMOOTHING_MS = 10.0
MARGIN = 4  # limiter: samples either side of a peak held at its gain (interpolation lobes)
CHUNK = 256  # limiter: frames driven and detected per pass
DENORMAL = 1e-30
SNAP_DB = 1e-9  # smoothed gains this close to their target land on it

# compressor parameter slots (float64 array p)
P_THR, P_INV_RATIO, P_KNEE, P_MAKEUP, P_ATT, P_REL, P_RMS, P_DET, P_MK_K, P_LO = range(10)
# float state slots (array s): gain reduction (compressor) / held gain in dB (limiter),
# make-up gain now, sum of the limiter's attack window
S_GR, S_MAKEUP, S_BOX_SUM = 0, 1, 2
# limiter parameter slots
L_CEIL, L_KNEE, L_MAKEUP, L_REL, L_MK_K, L_LO = range(6)
# int state slots
I_POS, I_BAD, I_T, I_HEAD, I_COUNT, I_BOX_POS = range(6)


@numba.njit(nogil=True, cache=True)
def curve_gain_db(level_db: float, thr: float, inv_ratio: float, knee: float) -> float:
    """Static curve: gain change in dB (<= 0) for a detector level, soft knee centred on thr."""
    over = level_db - thr
    if 2.0 * over <= -knee:
        return 0.0
    if 2.0 * over < knee:  # inside the knee (knee > 0 here)
        t = over + 0.5 * knee
        return (inv_ratio - 1.0) * t * t / (2.0 * knee)
    return (inv_ratio - 1.0) * over


@numba.njit(nogil=True, cache=True)
def _glide_db(cur: float, tgt: float, k: float) -> float:
    d = tgt - cur
    if abs(d) <= SNAP_DB:
        return tgt
    return cur + d * k


@numba.njit(nogil=True, cache=True)
def _db_to_gain(g_db: float) -> float:
    return 1.0 if g_db == 0.0 else 10.0 ** (g_db / 20.0)


@numba.njit(nogil=True, cache=True)
def compressor_block(x, y, gain_out, p, s, ms, cur, delay, istate):
    """Compress one block.

    x, y: float64[frames, channels] (y may be x); gain_out: float64[frames] receives the linear
    gain applied to each output frame, or float64[0] for none; p: parameters (P_*); s: float
    state (S_*); ms: float64[channels] mean squares; cur: float64[channels] scratch; delay:
    float64[lookahead, channels] (0 rows: no lookahead); istate: int64[6] (I_POS, I_BAD).
    """
    frames, chans = x.shape
    lookahead = delay.shape[0]
    thr, inv_ratio, knee = p[P_THR], p[P_INV_RATIO], p[P_KNEE]
    a_att, a_rel, a_rms, k_mk, lo = p[P_ATT], p[P_REL], p[P_RMS], p[P_MK_K], p[P_LO]
    rms = p[P_DET] == DET_RMS
    trace = gain_out.shape[0] > 0
    gr, mk = s[S_GR], s[S_MAKEUP]
    pos = istate[I_POS]
    bad = False
    for n in range(frames):
        level = 0.0
        for c in range(chans):
            v = x[n, c]
            if not math.isfinite(v):
                v = 0.0
                bad = True
            cur[c] = v
            if rms:
                m = ms[c] + (v * v - ms[c]) * (1.0 - a_rms)
                ms[c] = m
                if m > level:
                    level = m
            elif abs(v) > level:
                level = abs(v)
        demand = 0.0
        if level > lo:
            level_db = 10.0 * math.log10(level) if rms else 20.0 * math.log10(level)
            demand = -curve_gain_db(level_db, thr, inv_ratio, knee)
        if demand > gr:
            gr = a_att * gr + (1.0 - a_att) * demand
        else:
            gr = a_rel * gr + (1.0 - a_rel) * demand
            if gr - demand <= SNAP_DB:
                gr = demand
        mk = _glide_db(mk, p[P_MAKEUP], k_mk)
        g = _db_to_gain(mk - gr)
        if trace:
            gain_out[n] = g
        if lookahead == 0:
            for c in range(chans):
                y[n, c] = cur[c] * g
        else:
            for c in range(chans):
                d = delay[pos, c]
                delay[pos, c] = cur[c]
                y[n, c] = d * g
            pos += 1
            if pos == lookahead:
                pos = 0
    if not (math.isfinite(gr) and math.isfinite(mk)):
        gr, mk = 0.0, p[P_MAKEUP]
        bad = True
    for c in range(chans):
        if ms[c] < DENORMAL or not math.isfinite(ms[c]):
            ms[c] = 0.0
    s[S_GR], s[S_MAKEUP] = gr, mk
    istate[I_POS] = pos
    if bad:
        istate[I_BAD] += 1


@numba.njit(nogil=True, cache=True)
def limiter_block(x, y, gain_out, p, s, istate, phases, hist, tp_out, drive, hold_val,
                  hold_idx, box, delay):
    """Limit one block to the true-peak ceiling.

    x, y: float64[frames, channels] (y may be x); gain_out: float64[frames] or float64[0] as
    for compressor_block; p: parameters (L_*); s: float state (S_*);
    istate: int64[6]; phases, hist: the true-peak detector's filter and history; tp_out,
    drive: float64[CHUNK, channels] scratch; hold_val: float64[hold], hold_idx: int64[hold]
    (sliding-minimum ring); box: float64[attack] (averaging ring); delay: float64[latency,
    channels].
    """
    frames, chans = x.shape
    ceil, knee, k_mk, lo = p[L_CEIL], p[L_KNEE], p[L_MK_K], p[L_LO]
    a_rel = p[L_REL]
    hold_len = hold_val.shape[0]
    box_len = box.shape[0]
    lat = delay.shape[0]
    chunk = drive.shape[0]
    trace = gain_out.shape[0] > 0
    mk = s[S_MAKEUP]
    env = s[S_GR]  # held and released gain in dB (<= 0)
    box_sum = s[S_BOX_SUM]
    t = istate[I_T]
    head = istate[I_HEAD]
    count = istate[I_COUNT]
    bpos = istate[I_BOX_POS]
    pos = istate[I_POS]
    bad = False
    start = 0
    while start < frames:
        m = min(chunk, frames - start)
        # drive (make-up gain) and clean the input, then detect its true peak
        for i in range(m):
            mk = _glide_db(mk, p[L_MAKEUP], k_mk)
            g_in = _db_to_gain(mk)
            for c in range(chans):
                v = x[start + i, c]
                if not math.isfinite(v):
                    v = 0.0
                    bad = True
                drive[i, c] = v * g_in
        oversampled_peak_per_sample(drive[:m], phases, hist, tp_out[:m])
        for i in range(m):
            peak = 0.0
            for c in range(chans):
                if tp_out[i, c] > peak:
                    peak = tp_out[i, c]
            need = 0.0
            if peak > lo:
                need = curve_gain_db(20.0 * math.log10(peak), ceil, 0.0, knee)
            # sliding minimum of the needed gain over hold_len samples (monotonic ring)
            while count > 0:
                tail = head + count - 1
                if tail >= hold_len:
                    tail -= hold_len
                if hold_val[tail] >= need:
                    count -= 1
                else:
                    break
            tail = head + count
            if tail >= hold_len:
                tail -= hold_len
            hold_val[tail] = need
            hold_idx[tail] = t
            count += 1
            if hold_idx[head] <= t - hold_len:
                head += 1
                if head == hold_len:
                    head = 0
                count -= 1
            held = hold_val[head]
            t += 1
            # instant fall to the held gain, one-pole release back up
            if held <= env:
                env = held
            else:
                env = held + (env - held) * a_rel
                if held - env <= SNAP_DB:
                    env = held
            # average over the attack: a ramp that is fully down when the peak comes out
            box_sum += env - box[bpos]
            box[bpos] = env
            bpos += 1
            if bpos == box_len:
                bpos = 0
                box_sum = 0.0
                for j in range(box_len):
                    box_sum += box[j]
            g_db = box_sum / box_len
            g = 1.0 if g_db > -SNAP_DB * 1e-3 else 10.0 ** (g_db / 20.0)
            if trace:
                gain_out[start + i] = g
            if lat == 0:
                for c in range(chans):
                    y[start + i, c] = drive[i, c] * g
            else:
                for c in range(chans):
                    d = delay[pos, c]
                    delay[pos, c] = drive[i, c]
                    y[start + i, c] = d * g
                pos += 1
                if pos == lat:
                    pos = 0
        start += m
    if not (math.isfinite(env) and math.isfinite(box_sum) and math.isfinite(mk)):
        env, mk = 0.0, p[L_MAKEUP]
        box_sum = 0.0
        for j in range(box_len):
            box[j] = 0.0
        count = 0
        bad = True
    s[S_MAKEUP], s[S_GR], s[S_BOX_SUM] = mk, env, box_sum
    istate[I_T] = t
    istate[I_HEAD] = head
    istate[I_COUNT] = count
    istate[I_BOX_POS] = bpos
    istate[I_POS] = pos
    if bad:
        istate[I_BAD] += 1


def _coef(ms: float, rate: float) -> float:
    """One-pole coefficient of a time constant in ms (0 ms: no smoothing)."""
    return 0.0 if ms <= 0.0 else math.exp(-1.0 / (ms * 1e-3 * rate))


def _check_range(name: str, value: float, lo: float, hi: float, unit: str) -> float:
    v = float(value)
    if not lo <= v <= hi:
        raise ValueError(f"{name} {value!r} {unit} out of range [{lo:g}, {hi:g}]")
    return v


def _check_io(x: np.ndarray, out: np.ndarray | None, gain: np.ndarray | None,
              channels: int) -> np.ndarray:
    check_block(x, channels, "input")
    if out is None:
        out = np.empty_like(x)
    else:
        check_block(out, channels, "output")
        if out.shape[0] != x.shape[0]:
            raise ValueError(f"output has {out.shape[0]} frames, input {x.shape[0]}")
    if gain is not None and (not isinstance(gain, np.ndarray) or gain.dtype != np.float64
                             or gain.shape != (x.shape[0],)):
        raise ValueError(f"gain trace must be float64[{x.shape[0]}], got "
                         f"{getattr(gain, 'dtype', type(gain))} {getattr(gain, 'shape', '')}")
    return out


def _check_rate_channels(rate: float, channels: int) -> tuple[float, int]:
    try:
        r = float(rate)
    except (TypeError, ValueError):
        r = math.nan
    if not (math.isfinite(r) and 8000 <= r <= 384000):
        raise ValueError(f"sample rate {rate!r} Hz out of range [8000, 384000]")
    if not isinstance(channels, int | np.integer) or channels < 1:
        raise ValueError(f"channels {channels!r}: need an integer >= 1")
    return r, int(channels)


class Compressor:
    """Feed-forward, stereo-linked compressor with lookahead (state preallocated here)."""

    def __init__(self, rate: float, channels: int, threshold_db: float = -20.0,
                 ratio: float = 4.0, knee_db: float = 6.0, attack_ms: float = 10.0,
                 release_ms: float = 100.0, makeup_db: float = 0.0, lookahead_ms: float = 0.0,
                 detector: str = "peak", rms_ms: float = 10.0) -> None:
        self.rate, self.channels = _check_rate_channels(rate, channels)
        if detector not in DETECTORS:
            raise ValueError(f"detector {detector!r} unknown: use one of {sorted(DETECTORS)}")
        _check_range("lookahead", lookahead_ms, 0.0, 50.0, "ms")
        self.detector = detector
        self.p = np.zeros(10)
        self.p[P_DET] = DETECTORS[detector]
        self.p[P_MK_K] = 1.0 - _coef(MAKEUP_SMOOTHING_MS, self.rate)
        self.p[P_RMS] = _coef(_check_range("RMS window", rms_ms, 0.1, 1000.0, "ms"), self.rate)
        self.set(threshold_db=threshold_db, ratio=ratio, knee_db=knee_db, attack_ms=attack_ms,
                 release_ms=release_ms, makeup_db=makeup_db)
        self.s = np.zeros(2)
        self.s[S_MAKEUP] = makeup_db
        self.ms = np.zeros(self.channels)
        self.cur = np.zeros(self.channels)
        self.delay = np.zeros((round(lookahead_ms * 1e-3 * self.rate), self.channels))
        self.istate = np.zeros(6, dtype=np.int64)
        self.no_trace = np.zeros(0)

    @property
    def latency(self) -> int:
        """Delay of the audio path in samples: the lookahead."""
        return int(self.delay.shape[0])

    @property
    def bad_blocks(self) -> int:
        """Blocks that carried NaN/Inf samples (read as 0)."""
        return int(self.istate[I_BAD])

    @property
    def gain_reduction_db(self) -> float:
        """Current smoothed gain reduction in dB (>= 0), without make-up gain."""
        return float(self.s[S_GR])

    def set(self, threshold_db: float | None = None, ratio: float | None = None,
            knee_db: float | None = None, attack_ms: float | None = None,
            release_ms: float | None = None, makeup_db: float | None = None) -> None:
        """Change parameters live (None keeps one): checked, written into the parameter array."""
        p = self.p
        if threshold_db is not None:
            p[P_THR] = _check_range("threshold", threshold_db, -100.0, 20.0, "dB")
        if ratio is not None:
            p[P_INV_RATIO] = 1.0 / _check_range("ratio", ratio, 1.0, math.inf, ":1")
        if knee_db is not None:
            p[P_KNEE] = _check_range("knee", knee_db, 0.0, 48.0, "dB")
        if attack_ms is not None:
            p[P_ATT] = _coef(_check_range("attack", attack_ms, 0.0, 1000.0, "ms"), self.rate)
        if release_ms is not None:
            p[P_REL] = _coef(_check_range("release", release_ms, 1.0, 10000.0, "ms"), self.rate)
        if makeup_db is not None:
            p[P_MAKEUP] = _check_range("make-up gain", makeup_db, -24.0, 48.0, "dB")
        # below the knee the curve is flat: no log needed (level in |x| or mean square)
        lo_db = p[P_THR] - p[P_KNEE] / 2.0
        p[P_LO] = 10.0 ** (lo_db / 10.0) if p[P_DET] == DET_RMS else 10.0 ** (lo_db / 20.0)

    def kernel_args(self, x: np.ndarray, y: np.ndarray, gain: np.ndarray | None = None) -> tuple:
        """Arguments of compressor_block for preallocated x, y (and gain trace)."""
        return (x, y, self.no_trace if gain is None else gain, self.p, self.s, self.ms,
                self.cur, self.delay, self.istate)

    def process(self, x: np.ndarray, out: np.ndarray | None = None,
                gain: np.ndarray | None = None) -> np.ndarray:
        """Compress x (float64[frames, channels]) into out (allocated if None; may be x).

        gain, if given (float64[frames]), receives the linear gain of every output frame."""
        out = _check_io(x, out, gain, self.channels)
        compressor_block(*self.kernel_args(x, out, gain))
        return out

    def reset(self) -> None:
        """Forget the signal (after a stream restart): detector, gain and lookahead cleared."""
        self.s[S_GR] = 0.0
        self.s[S_MAKEUP] = self.p[P_MAKEUP]
        self.ms[:] = 0.0
        self.delay[:] = 0.0
        self.istate[I_POS] = 0


class Limiter:
    """True-peak brickwall limiter with lookahead, stereo linked (state preallocated here)."""

    def __init__(self, rate: int, channels: int, ceiling_db: float = -1.0,
                 attack_ms: float = 1.0, release_ms: float = 100.0, knee_db: float = 0.0,
                 makeup_db: float = 0.0) -> None:
        rate_f, self.channels = _check_rate_channels(rate, channels)
        if rate_f != int(rate_f):
            raise ValueError(f"sample rate {rate!r} Hz: the true-peak detector needs whole Hz")
        self.rate = int(rate_f)
        _check_range("attack", attack_ms, 0.0, 50.0, "ms")
        self.tp = TruePeakState(self.channels, self.rate, chunk=CHUNK)
        self.attack = max(1, round(attack_ms * 1e-3 * self.rate))
        self.p = np.zeros(6)
        self.p[L_MK_K] = 1.0 - _coef(MAKEUP_SMOOTHING_MS, self.rate)
        self.set(ceiling_db=ceiling_db, release_ms=release_ms, knee_db=knee_db,
                 makeup_db=makeup_db)
        self.s = np.zeros(3)
        self.s[S_MAKEUP] = makeup_db
        self.istate = np.zeros(6, dtype=np.int64)
        hold = self.attack + 2 * MARGIN
        self.hold_val = np.zeros(hold)
        self.hold_idx = np.zeros(hold, dtype=np.int64)
        self.box = np.zeros(self.attack)
        self.delay = np.zeros((self.attack - 1 + MARGIN + self.tp.delay, self.channels))
        self.tp_out = np.zeros((CHUNK, self.channels))
        self.drive = np.zeros((CHUNK, self.channels))
        self.no_trace = np.zeros(0)

    @property
    def latency(self) -> int:
        """Delay of the audio path in samples: attack + MARGIN + true-peak group delay - 1."""
        return int(self.delay.shape[0])

    @property
    def bad_blocks(self) -> int:
        """Blocks that carried NaN/Inf samples (read as 0)."""
        return int(self.istate[I_BAD])

    def set(self, ceiling_db: float | None = None, release_ms: float | None = None,
            knee_db: float | None = None, makeup_db: float | None = None) -> None:
        """Change parameters live (None keeps one). Attack is fixed: it sets the latency."""
        p = self.p
        if ceiling_db is not None:
            p[L_CEIL] = _check_range("ceiling", ceiling_db, -60.0, 0.0, "dBTP")
        if release_ms is not None:
            p[L_REL] = _coef(_check_range("release", release_ms, 1.0, 10000.0, "ms"), self.rate)
        if knee_db is not None:
            p[L_KNEE] = _check_range("knee", knee_db, 0.0, 24.0, "dB")
        if makeup_db is not None:
            p[L_MAKEUP] = _check_range("make-up gain", makeup_db, -24.0, 48.0, "dB")
        p[L_LO] = 10.0 ** ((p[L_CEIL] - p[L_KNEE] / 2.0) / 20.0)

    def kernel_args(self, x: np.ndarray, y: np.ndarray, gain: np.ndarray | None = None) -> tuple:
        """Arguments of limiter_block for preallocated x, y (and gain trace)."""
        return (x, y, self.no_trace if gain is None else gain, self.p, self.s, self.istate,
                self.tp.phases, self.tp.hist, self.tp_out, self.drive, self.hold_val,
                self.hold_idx, self.box, self.delay)

    def process(self, x: np.ndarray, out: np.ndarray | None = None,
                gain: np.ndarray | None = None) -> np.ndarray:
        """Limit x (float64[frames, channels]) into out (allocated if None; may be x).

        gain, if given (float64[frames]), receives the linear gain of every output frame (the
        make-up gain is applied before it, to the input)."""
        out = _check_io(x, out, gain, self.channels)
        limiter_block(*self.kernel_args(x, out, gain))
        return out

    def reset(self) -> None:
        """Forget the signal (after a stream restart): detector, gains and lookahead cleared."""
        self.tp.reset()
        self.s[:] = 0.0
        self.s[S_MAKEUP] = self.p[L_MAKEUP]
        self.istate[[I_POS, I_T, I_HEAD, I_COUNT, I_BOX_POS]] = 0
        self.box[:] = 0.0
        self.delay[:] = 0.0
