"""Compressor and true-peak limiter (dsp/dynamics.py).

The compressor's static curve is checked against the textbook formula (Giannoulis, Massberg &
Reiss, JAES 2012, eq. 4) written out here, on long tones with each detector; its attack and
release time constants are measured from level steps; lookahead and make-up gain are checked
sample for sample against the gain the kernel reports. The limiter's ceiling is measured in
true peak with dsp/true_peak.true_peak_dbtp on hard material at 44.1, 48 and 96 kHz.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from echoel.dsp.dynamics import MARGIN, Compressor, Limiter
from echoel.dsp.true_peak import group_delay, true_peak_dbtp
from numba.core.runtime import _nrt_python, rtsys

from bench.dsp_filters import clipped_music

RATE = 48000
FRAMES = 128


def expected_out_db(level_db: float, thr: float, ratio: float, knee: float) -> float:
    """Static curve, output level for an input level (dB), soft knee of width knee."""
    over = level_db - thr
    if 2 * over <= -knee:
        return level_db
    if 2 * abs(over) < knee:
        return level_db + (1 / ratio - 1) * (over + knee / 2) ** 2 / (2 * knee)
    return thr + over / ratio


def square(n: int, freq: float, amp: float, rate: int = RATE, ch: int = 2) -> np.ndarray:
    """A square wave of exactly +-amp (never 0)."""
    s = np.where(np.sin(2 * np.pi * freq * np.arange(n) / rate + 0.1) >= 0, amp, -amp)
    return np.repeat(s[:, None], ch, axis=1)


def sine(n: int, freq: float, amp: float, rate: int = RATE, ch: int = 2,
         phase: float = 0.0) -> np.ndarray:
    s = amp * np.sin(2 * np.pi * freq * np.arange(n) / rate + phase)
    return np.repeat(s[:, None], ch, axis=1)


def run_blocks(proc, x: np.ndarray, block: int = FRAMES, gain: np.ndarray | None = None
               ) -> np.ndarray:
    y = np.empty_like(x)
    for start in range(0, x.shape[0], block):
        stop = min(start + block, x.shape[0])
        proc.process(x[start:stop], y[start:stop],
                     None if gain is None else gain[start:stop])
    return y


def db(v):
    return 20.0 * np.log10(np.abs(v))


def delayed(x: np.ndarray, d: int) -> np.ndarray:
    out = np.zeros_like(x)
    out[d:] = x[:x.shape[0] - d]
    return out


# --------------------------------------------------------------------------- static curve

CURVES = [  # threshold, ratio, knee
    (-20.0, 4.0, 0.0),
    (-20.0, 4.0, 12.0),
    (-30.0, 2.0, 6.0),
    (-10.0, math.inf, 6.0),
    (-24.0, 10.0, 20.0),
]
LEVELS = np.arange(-50.0, 0.1, 2.5)
STEP = int(0.3 * RATE)


def level_steps(make_tone, levels: np.ndarray) -> np.ndarray:
    return np.vstack([make_tone(STEP, lv) for lv in levels])


@pytest.mark.parametrize(("thr", "ratio", "knee"), CURVES)
def test_static_curve_peak_detector_on_square_tones(thr, ratio, knee):
    # a square tone has a constant |x|: the peak detector reads its level exactly
    x = level_steps(lambda n, lv: square(n, 500.0, 10 ** (lv / 20)), LEVELS)  # rising levels
    comp = Compressor(RATE, 2, threshold_db=thr, ratio=ratio, knee_db=knee, attack_ms=5.0,
                      release_ms=50.0)
    y = comp.process(x)
    for k, lv in enumerate(LEVELS):
        tail = y[(k + 1) * STEP - 4800:(k + 1) * STEP]
        out_db = db(np.abs(tail).max())
        assert out_db == pytest.approx(expected_out_db(lv, thr, ratio, knee), abs=0.1), lv
        assert db(np.abs(tail).min()) == pytest.approx(out_db, abs=1e-6)  # settled, steady


@pytest.mark.parametrize(("thr", "ratio", "knee"), CURVES[:3])
def test_static_curve_rms_detector_on_sine_tones(thr, ratio, knee):
    # levels in dB RMS (a full-scale sine is -3.01 dB); the output's RMS follows the curve
    x = level_steps(lambda n, lv: sine(n, 1000.0, math.sqrt(2) * 10 ** (lv / 20)), LEVELS)
    comp = Compressor(RATE, 2, threshold_db=thr, ratio=ratio, knee_db=knee, attack_ms=5.0,
                      release_ms=50.0, detector="rms", rms_ms=20.0)
    y = comp.process(x)
    for k, lv in enumerate(LEVELS):
        tail = y[(k + 1) * STEP - 4800:(k + 1) * STEP, 0]
        out_db = 10 * math.log10(np.mean(tail ** 2))
        assert out_db == pytest.approx(expected_out_db(lv, thr, ratio, knee), abs=0.1), lv


def test_makeup_gain_lifts_the_curve():
    thr, ratio, knee, makeup = -20.0, 3.0, 6.0, 7.5
    levels = np.array([-40.0, -23.0, -20.0, -17.0, -5.0])
    x = level_steps(lambda n, lv: square(n, 300.0, 10 ** (lv / 20)), levels)
    comp = Compressor(RATE, 2, threshold_db=thr, ratio=ratio, knee_db=knee, attack_ms=5.0,
                      makeup_db=makeup)
    y = comp.process(x)
    for k, lv in enumerate(levels):
        tail = y[(k + 1) * STEP - 4800:(k + 1) * STEP]
        assert db(np.abs(tail).max()) == pytest.approx(
            expected_out_db(lv, thr, ratio, knee) + makeup, abs=0.1)
    # below the knee it is a plain gain
    np.testing.assert_allclose(y[:STEP], x[:STEP] * 10 ** (makeup / 20), rtol=1e-12)


# --------------------------------------------------------------------------- time constants

@pytest.mark.parametrize(("attack_ms", "release_ms", "lookahead_ms"),
                         [(5.0, 50.0, 0.0), (20.0, 200.0, 3.0), (1.0, 400.0, 10.0)])
def test_attack_and_release_time_constants_from_a_step(attack_ms, release_ms, lookahead_ms):
    thr, ratio = -20.0, 4.0
    demand = (0.0 - thr) * (1 - 1 / ratio)  # 15 dB at 0 dBFS
    quiet, loud = 10 ** (-40 / 20), 1.0
    n1, n2, n3 = RATE // 5, RATE, 3 * RATE
    x = np.vstack([square(n1, 200.0, quiet), square(n2, 200.0, loud), square(n3, 200.0, quiet)])
    comp = Compressor(RATE, 2, threshold_db=thr, ratio=ratio, knee_db=0.0, attack_ms=attack_ms,
                      release_ms=release_ms, lookahead_ms=lookahead_ms)
    g = np.empty(x.shape[0])
    y = run_blocks(comp, x, FRAMES, g)
    lat = comp.latency
    assert lat == round(lookahead_ms * 1e-3 * RATE)
    gr = -db(g)
    # the gain moves at the step as the detector sees it, lat samples before the output
    assert gr[n1 - 1] == 0.0 and gr[n1] > 0.0
    assert np.all(gr[n1 - 1 + lat: n1 + lat] < gr[n1 + lat])
    t_att = np.argmax(gr[n1:] >= (1 - 1 / math.e) * demand) / RATE * 1e3
    assert t_att == pytest.approx(attack_ms, rel=0.10)
    assert gr[n1 + n2 - 1] == pytest.approx(demand, abs=0.01)
    t_rel = np.argmax(gr[n1 + n2:] <= demand / math.e) / RATE * 1e3
    assert t_rel == pytest.approx(release_ms, rel=0.10)
    # exactly the delayed input times that gain
    assert np.array_equal(y, delayed(x, lat) * g[:, None])


# --------------------------------------------------------------------------- lookahead, linking

@pytest.mark.parametrize("rate", [44100, 48000, 96000])
def test_lookahead_is_exact_and_reported(rate):
    ms = 5.0
    comp = Compressor(rate, 2, threshold_db=-30.0, lookahead_ms=ms)
    assert comp.latency == round(ms * 1e-3 * rate)
    rng = np.random.default_rng(rate)
    x = rng.uniform(-1, 1, (rate // 2, 2)) * np.linspace(0, 1, rate // 2)[:, None]
    g = np.empty(x.shape[0])
    y = run_blocks(comp, x, 100, g)
    assert np.array_equal(y, delayed(x, comp.latency) * g[:, None])
    assert g.min() < 0.5  # it did compress
    # below the threshold: the delayed input, bit for bit
    quiet = Compressor(rate, 2, threshold_db=-6.0, knee_db=6.0, lookahead_ms=ms)
    xq = 0.25 * x  # peak -12 dBFS, under the knee (-9 dBFS)
    assert np.array_equal(run_blocks(quiet, xq, 100), delayed(xq, comp.latency))


@pytest.mark.parametrize("make", [
    lambda: Compressor(RATE, 2, threshold_db=-30.0, lookahead_ms=2.0),
    lambda: Compressor(RATE, 2, threshold_db=-30.0, detector="rms"),
    lambda: Limiter(RATE, 2, ceiling_db=-6.0),
])
def test_output_does_not_depend_on_block_size(make):
    x = np.random.default_rng(3).uniform(-1, 1, (24000, 2))
    outs = [run_blocks(make(), x, b) for b in (1, 64, 128, 1000, 24000)]
    for y in outs[1:]:
        np.testing.assert_allclose(y, outs[0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("loud", [0, 1])
@pytest.mark.parametrize("detector", ["peak", "rms"])
def test_stereo_link_applies_the_loud_channels_gain_to_both(loud, detector):
    n = RATE // 2
    x = np.zeros((n, 2))
    x[:, loud] = sine(n, 1000.0, 1.0, ch=1)[:, 0]
    x[:, 1 - loud] = sine(n, 440.0, 0.01, ch=1)[:, 0]
    comp = Compressor(RATE, 2, threshold_db=-20.0, ratio=4.0, detector=detector)
    g = np.empty(n)
    y = comp.process(x, gain=g)
    assert np.array_equal(y, x * g[:, None])
    assert g[-1] < 0.3  # the quiet channel is pulled down with the loud one
    mono = Compressor(RATE, 1, threshold_db=-20.0, ratio=4.0, detector=detector)
    gm = np.empty(n)
    mono.process(np.ascontiguousarray(x[:, loud:loud + 1]), gain=gm)
    np.testing.assert_allclose(g, gm, rtol=1e-12)  # the loud channel alone sets the gain


# --------------------------------------------------------------------------- limiter ceiling

def isp_sine(n: int, rate: int) -> np.ndarray:
    """fs/4 at 45 degrees: samples at +-1.0 (0 dBFS), true peak sqrt 2 (+3 dBTP)."""
    s = np.sin(np.pi / 2 * np.arange(n) + np.pi / 4) / math.sin(math.pi / 4)
    return np.repeat(s[:, None], 2, axis=1)


def impulses(n: int, rate: int) -> np.ndarray:
    x = np.zeros((n, 2))
    x[1000::rate // 10, :] = 1.0
    x[3001::rate // 7, 1] = -1.0
    x[5003::rate // 5] = [1.0, -1.0]
    return x


HARD = {
    "square 997 Hz": lambda n, rate: square(n, 997.0, 1.0, rate),
    "square 5 kHz": lambda n, rate: square(n, 5000.0, 1.0, rate),
    "isp sine fs/4 45deg": isp_sine,
    "impulses": impulses,
    "clipped music": lambda n, rate: clipped_music(rate, n / rate),
}


def limit_whole(lim: Limiter, x: np.ndarray, block: int = FRAMES) -> np.ndarray:
    """The limiter's output for x followed by enough silence to flush its delay line."""
    xp = np.vstack([x, np.zeros((lim.latency + FRAMES, x.shape[1]))])
    return run_blocks(lim, xp, block)


@pytest.mark.parametrize("rate", [44100, 48000, 96000])
@pytest.mark.parametrize("material", sorted(HARD))
def test_limiter_holds_true_peak_ceiling(rate, material):
    ceiling = -1.0
    x = HARD[material](rate // 2, rate)
    for makeup in (0.0, 12.0):
        lim = Limiter(rate, 2, ceiling_db=ceiling, attack_ms=1.0, release_ms=50.0,
                      makeup_db=makeup)
        y = limit_whole(lim, x)
        tp_in = true_peak_dbtp(x, rate).max() + makeup
        tp_out = true_peak_dbtp(y, rate).max()
        assert tp_in > ceiling + 0.9  # hard material: well over the ceiling
        assert tp_out <= ceiling + 0.1, (material, makeup, tp_out)
        assert tp_out >= ceiling - 0.5  # and it is limited to the ceiling, not far below it


@pytest.mark.parametrize("knee", [0.0, 6.0])
def test_limiter_holds_ceiling_with_knee_and_live_ceiling_change(knee):
    x = clipped_music(RATE, 1.0)
    lim = Limiter(RATE, 2, ceiling_db=-1.0, knee_db=knee)
    half = x.shape[0] // 2
    y1 = run_blocks(lim, x[:half])
    lim.set(ceiling_db=-6.0)
    y2 = limit_whole(lim, x[half:])
    assert true_peak_dbtp(y1, RATE).max() <= -1.0 + 0.1
    # the new ceiling holds once the old lookahead has left the delay line
    assert true_peak_dbtp(y2[lim.latency + 64:], RATE).max() <= -6.0 + 0.1


# --------------------------------------------------------------------------- limiter timing

@pytest.mark.parametrize("rate", [44100, 48000, 96000, 192000])
def test_limiter_latency_and_output_are_exact(rate):
    attack_ms = 1.5
    lim = Limiter(rate, 2, ceiling_db=-3.0, attack_ms=attack_ms, makeup_db=4.0)
    attack = round(attack_ms * 1e-3 * rate)
    assert lim.latency == attack - 1 + MARGIN + group_delay(rate)
    n = rate // 2
    x = np.random.default_rng(rate).uniform(-2.0, 2.0, (n, 2)) * np.hanning(n)[:, None]
    g = np.empty(x.shape[0])
    y = run_blocks(lim, x, 128, g)
    driven = x * 10 ** (4.0 / 20)  # make-up gain drives the input (its glide starts at target)
    np.testing.assert_allclose(y, delayed(driven, lim.latency) * g[:, None], rtol=1e-15,
                               atol=0)
    assert g.min() < 0.5
    # below the ceiling: the delayed input, bit for bit
    quiet = Limiter(rate, 2, ceiling_db=-1.0)
    xq = sine(rate // 4, 1000.0, 0.5, rate)  # -6 dBTP
    assert np.array_equal(run_blocks(quiet, xq), delayed(xq, quiet.latency))


def test_limiter_gain_is_down_before_the_peak_and_ramps_over_the_attack():
    attack_ms, ceiling_db = 2.0, -1.0
    lim = Limiter(RATE, 1, ceiling_db=ceiling_db, attack_ms=attack_ms, release_ms=20.0)
    attack = round(attack_ms * 1e-3 * RATE)
    x = np.zeros((RATE // 4, 1))
    edge = 4000
    x[edge:edge + 2000] = 2.0  # DC burst at +6 dBFS
    g = np.empty(x.shape[0])
    y = lim.process(x, gain=g)
    out_edge = edge + lim.latency  # the burst reaches the output here
    ceiling = 10 ** (ceiling_db / 20)
    assert np.abs(y).max() <= ceiling * (1 + 1e-12)
    assert g[out_edge] <= ceiling / 2.0 * (1 + 1e-12)  # fully down when the burst comes out
    # it starts moving no earlier than the attack (widened by the hold margin and the
    # interpolator's pre-ringing) before the burst comes out
    first = int(np.argmax(g < 1.0))
    assert out_edge - first <= attack + 2 * MARGIN + group_delay(RATE)
    # a ramp, not a jump: each sample moves the gain by at most its whole range / attack
    gr = -db(g)
    assert np.abs(np.diff(gr)).max() <= gr.max() / attack * (1 + 1e-9)
    assert gr.max() > 7.0


@pytest.mark.parametrize("release_ms", [20.0, 100.0])
def test_limiter_release_time_constant(release_ms):
    lim = Limiter(RATE, 2, ceiling_db=-1.0, attack_ms=1.0, release_ms=release_ms)
    x = np.vstack([square(RATE // 4, 200.0, 4.0), square(RATE * 3, 200.0, 0.01)])
    g = np.empty(x.shape[0])
    lim.process(x, gain=g)
    gr = -db(g)
    g0 = gr.max()
    assert g0 > 13.0  # +12 dBFS (and more in true peak) into -1 dBTP
    tail = gr[RATE // 4:]  # from the end of the loud part (while the lookahead empties)
    # exponential from the end of the hold; the attack's averaging scales it, does not bend it
    t1 = np.argmax(tail <= g0 / math.e)
    t3 = np.argmax(tail <= g0 / math.e ** 3)
    assert (t3 - t1) / 2 / RATE * 1e3 == pytest.approx(release_ms, rel=0.10)
    assert gr[-1] == 0.0  # fully recovered, exactly unity


# --------------------------------------------------------------------------- bad input, edges

@pytest.mark.parametrize("make", [
    lambda: Compressor(RATE, 2, threshold_db=-20.0, lookahead_ms=2.0),
    lambda: Compressor(RATE, 2, threshold_db=-20.0, detector="rms"),
    lambda: Limiter(RATE, 2, ceiling_db=-3.0),
])
def test_nan_inf_blocks_are_counted_and_leave_nothing_behind(make):
    x = np.random.default_rng(8).uniform(-1, 1, (40 * FRAMES, 2))
    bad = x.copy()
    bad[5 * FRAMES + 7, 0] = np.nan
    bad[12 * FRAMES + 1, 1] = np.inf
    bad[12 * FRAMES + 2, 0] = -np.inf
    proc = make()
    y = run_blocks(proc, bad)
    assert proc.bad_blocks == 2
    assert np.isfinite(y).all()
    # exactly what the same input with those samples silent gives
    clean = np.where(np.isfinite(bad), bad, 0.0)
    ref_proc = make()
    assert np.array_equal(y, run_blocks(ref_proc, clean))
    assert ref_proc.bad_blocks == 0


@pytest.mark.parametrize("make", [
    lambda: Compressor(RATE, 2, threshold_db=-40.0, lookahead_ms=2.0, makeup_db=6.0),
    lambda: Compressor(RATE, 2, threshold_db=-40.0, detector="rms"),
    lambda: Limiter(RATE, 2, ceiling_db=-20.0, makeup_db=6.0),
])
def test_silence_stays_exact_silence(make):
    proc = make()
    y = run_blocks(proc, np.zeros((20 * FRAMES, 2)))
    assert not y.any()
    assert proc.bad_blocks == 0


def test_dc_is_compressed_and_limited_to_the_curve():
    # DC at -6 dBFS, threshold -20 dB, ratio 4, hard knee: -16.5 dBFS out
    x = np.full((RATE, 2), 10 ** (-6 / 20))
    comp = Compressor(RATE, 2, threshold_db=-20.0, ratio=4.0, knee_db=0.0)
    y = comp.process(x)
    assert db(y[-1, 0]) == pytest.approx(expected_out_db(-6.0, -20.0, 4.0, 0.0), abs=0.01)
    # DC driven to +6 dBFS into a -1 dBTP limiter: the true peak of DC is DC
    lim = Limiter(RATE, 2, ceiling_db=-1.0, makeup_db=12.0)
    y = limit_whole(lim, x)  # the whole burst, its end included
    # (the interpolator's DC gain is 1 + 6e-6: its true peak of DC reads 0.00005 dB high)
    assert db(y[RATE - 1, 0]) == pytest.approx(-1.0, abs=1e-3)
    assert true_peak_dbtp(y, RATE).max() <= -1.0 + 0.1


@pytest.mark.parametrize("make", [
    lambda: Compressor(RATE, 2, lookahead_ms=3.0, detector="rms"),
    lambda: Limiter(RATE, 2, ceiling_db=-6.0),
])
def test_kernels_do_not_allocate(make):
    proc = make()
    small, big = np.zeros((1, 2)), np.random.default_rng(1).uniform(-1, 1, (3000, 2))
    g_small, g_big = np.empty(1), np.empty(3000)
    proc.process(small, small, g_small)
    proc.process(big, big, g_big)

    def allocations(fn) -> int:
        before = rtsys.get_allocation_stats().alloc
        fn()
        return rtsys.get_allocation_stats().alloc - before

    was_enabled = _nrt_python.memsys_stats_enabled()
    _nrt_python.memsys_enable_stats()
    try:
        # numba boxes each array argument per call (a fixed count); the kernel body adds none,
        # whatever the block length
        per_call = allocations(lambda: proc.process(small, small, g_small))
        assert allocations(lambda: proc.process(big, big, g_big)) == per_call
        assert per_call <= len(proc.kernel_args(small, small, g_small))
        assert allocations(lambda: proc.set(release_ms=77.0)) == 0
    finally:
        if not was_enabled:
            _nrt_python.memsys_disable_stats()


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Compressor(RATE, 2, ratio=0.5), r"ratio 0.5 :1 out of range \[1, inf\]"),
    (lambda: Compressor(RATE, 2, detector="vu"), "detector 'vu' unknown"),
    (lambda: Compressor(RATE, 2, lookahead_ms=80.0), r"lookahead 80.0 ms out of range"),
    (lambda: Compressor(RATE, 0), "channels 0"),
    (lambda: Compressor(1000, 2), r"sample rate 1000 Hz out of range"),
    (lambda: Limiter(RATE, 2, ceiling_db=3.0), r"ceiling 3.0 dBTP out of range \[-60, 0\]"),
    (lambda: Limiter(RATE, 2, release_ms=0.0), "release 0.0 ms out of range"),
    (lambda: Limiter(44100.5, 2), "needs whole Hz"),
    (lambda: Compressor(RATE, 2).process(np.zeros((4, 2), np.float32)),
     "input must be a float64 array"),
    (lambda: Limiter(RATE, 2).process(np.zeros((4, 3))), "input has 3 channels"),
    (lambda: Limiter(RATE, 2).process(np.zeros((4, 2)), gain=np.zeros(3)),
     r"gain trace must be float64\[4\]"),
])
def test_bad_settings_and_shapes_are_refused_with_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()
