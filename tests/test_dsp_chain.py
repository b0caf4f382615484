"""The processing chain (dsp/chain_kernels.py) and its biquad design (dsp/biquad_design.py).

Signals are processed block by block through ChainState, as the real-time loop does, and
checked against scipy references and against the behaviour the chain promises: bit-exact at
unity, click-free parameter changes, a limiter that never lets a sample past 0 dBFS, meters,
and filter state that decays to exact zeros instead of denormals.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from echoel.dsp.biquad_design import BAND_TYPES, design
from echoel.dsp.chain_kernels import (
    L_ENV,
    L_GAIN,
    M_IN_MS,
    M_IN_PEAK,
    M_OUT_MS,
    M_OUT_PEAK,
    SUB,
    ChainState,
)
from echoel.dsp.chain_layout import GAIN_DB, Band, ChainSpec
from scipy import signal

RATE = 48000
FRAMES = 128
TINY = np.finfo(np.float64).tiny  # smallest normal float64


def sine(n: int, freq: float, amp: float, ch: int = 1, phase: float = 0.0) -> np.ndarray:
    """float64 [n, ch] sine, the same on every channel."""
    t = np.arange(n) / RATE
    s = amp * np.sin(2 * np.pi * freq * t + phase)
    return np.repeat(s[:, None], ch, axis=1)


def noise(n: int, ch: int, amp: float = 0.1, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-amp, amp, (n, ch))


def run(st: ChainState, x: np.ndarray, on_block=None) -> np.ndarray:
    """Process x (a whole number of blocks) through st; returns the concatenated output.

    on_block(k, st) runs before block k is processed (to change targets) and may check
    state after the previous one."""
    frames = st.x.shape[0]
    assert x.shape[0] % frames == 0
    out = np.empty((x.shape[0], st.y.shape[1]))
    for k in range(x.shape[0] // frames):
        if on_block is not None:
            on_block(k, st)
        st.x[:] = x[k * frames:(k + 1) * frames]
        st.run()
        out[k * frames:(k + 1) * frames] = st.y
    return out


def sos_of(spec: ChainSpec) -> np.ndarray:
    """The chain's EQ as second-order sections, designed independently of the kernel state."""
    rows = []
    for b in spec.bands:
        b0, b1, b2, a1, a2 = design(b.kind, b.freq, b.gain_db, b.q, RATE)
        rows.append([b0, b1, b2, 1.0, a1, a2])
    return np.array(rows)


def db(v):
    return 20.0 * np.log10(np.abs(v))


# --------------------------------------------------------------------------- unity

def test_unity_chain_is_bit_exact():
    bands = (Band("peaking", 100.0, 0.0, 0.7), Band("peaking", 1000.0, 0.0, 2.0),
             Band("peaking", 8000.0, 0.0, 4.0))
    spec = ChainSpec(gain_db=0.0, bands=bands, limiter=True, limiter_threshold_db=-1.0)
    st = ChainState(spec, RATE, FRAMES, 2, 2)
    # peak 0.5 (-6 dBFS): below the threshold and below the bottom of the 6 dB soft knee
    x = noise(FRAMES * 40, 2, amp=0.5, seed=1)
    y = run(st, x)
    assert np.array_equal(y, x), f"max diff {np.abs(y - x).max():g}"
    assert st.lim[L_GAIN] == 1.0


# --------------------------------------------------------------------------- EQ vs scipy

STATIC_BANDS = {
    "peaking": Band("peaking", 1000.0, 9.0, 1.4),
    "lowshelf": Band("lowshelf", 150.0, -8.0, 0.7071),
    "highshelf": Band("highshelf", 6000.0, 5.0, 0.7071),
    "lowpass": Band("lowpass", 3000.0, 0.0, 0.7071),
    "highpass": Band("highpass", 80.0, 0.0, 2.0),
}


def _compare_with_sosfilt(bands: tuple[Band, ...], frames: int, cin: int = 2, cout: int = 2):
    spec = ChainSpec(gain_db=0.0, bands=bands, limiter=False)
    st = ChainState(spec, RATE, frames, cin, cout)
    sos = sos_of(spec)
    # the kernel designs its own coefficients: they must be the same
    assert np.array_equal(st.coef, sos[:, [0, 1, 2, 4, 5]])
    x = noise(frames * 60, cin, amp=0.3, seed=3)
    y = run(st, x)
    ref = signal.sosfilt(sos, x[:, [c % cin for c in range(cout)]], axis=0)
    err = np.abs(y - ref).max()
    assert err < 1e-9, err
    assert np.abs(ref).max() > 0.05  # the comparison is not between two silences


@pytest.mark.parametrize("kind", sorted(STATIC_BANDS))
def test_eq_band_matches_scipy_across_blocks(kind):
    _compare_with_sosfilt((STATIC_BANDS[kind],), FRAMES)


def test_eq_cascade_matches_scipy_odd_block_size():
    # every type in one cascade; 100-frame blocks end mid sub-block
    bands = tuple(STATIC_BANDS[k] for k in sorted(STATIC_BANDS))
    _compare_with_sosfilt(bands, 100, cin=1, cout=2)


def test_band_types_are_all_covered():
    assert set(STATIC_BANDS) == set(BAND_TYPES)


# --------------------------------------------------------------------------- designed responses

def _response_db(kind: str, freq: float, gain_db: float, q: float, at_hz) -> np.ndarray:
    b0, b1, b2, a1, a2 = design(kind, freq, gain_db, q, RATE)
    _, h = signal.freqz([b0, b1, b2], [1.0, a1, a2], worN=np.atleast_1d(at_hz), fs=RATE)
    return db(h)


@pytest.mark.parametrize(("f0", "gain_db", "q"), [
    (100.0, 6.0, 0.7), (1000.0, -12.0, 1.0), (1000.0, 3.0, 4.0), (10000.0, 15.0, 0.5),
    (250.0, -3.0, 8.0),
])
def test_peaking_gain_at_centre(f0, gain_db, q):
    h = _response_db("peaking", f0, gain_db, q, [f0, f0 / 1.5, min(f0 * 1.5, RATE / 2)])
    assert h[0] == pytest.approx(gain_db, abs=0.01)
    # the extremum is at f0: half an octave either side the boost/cut is smaller
    assert abs(h[1]) < abs(h[0]) - 0.05 and abs(h[2]) < abs(h[0]) - 0.05


@pytest.mark.parametrize("gain_db", [-12.0, -6.0, 4.0, 9.0])
def test_shelves_reach_gain(gain_db):
    low = _response_db("lowshelf", 200.0, gain_db, 0.7071, [0.0, RATE / 2])
    assert low[0] == pytest.approx(gain_db, abs=0.1)
    assert low[1] == pytest.approx(0.0, abs=0.1)
    high = _response_db("highshelf", 4000.0, gain_db, 0.7071, [0.0, RATE / 2])
    assert high[1] == pytest.approx(gain_db, abs=0.1)
    assert high[0] == pytest.approx(0.0, abs=0.1)
    # half the gain at the corner (RBJ shelf midpoint)
    mid = _response_db("lowshelf", 200.0, gain_db, 0.7071, [200.0])
    assert mid[0] == pytest.approx(gain_db / 2, abs=0.1)


@pytest.mark.parametrize("fc", [50.0, 1000.0, 8000.0, 15000.0])
def test_lowpass_highpass_minus_3db_at_corner(fc):
    lp = _response_db("lowpass", fc, 0.0, 0.7071, [fc, 0.0, RATE / 2 * 0.999])
    assert lp[0] == pytest.approx(-3.01, abs=0.05)
    assert lp[1] == pytest.approx(0.0, abs=1e-9)
    assert lp[2] < -40.0
    hp = _response_db("highpass", fc, 0.0, 0.7071, [fc, RATE / 2, 1.0])
    assert hp[0] == pytest.approx(-3.01, abs=0.05)
    assert hp[1] == pytest.approx(0.0, abs=1e-9)
    assert hp[2] < -40.0


# --------------------------------------------------------------------------- gain smoothing

@pytest.mark.parametrize(("from_db", "to_db"), [(0.0, -6.0), (-6.0, 0.0)])
def test_gain_change_is_smooth_and_converges(from_db, to_db):
    smoothing_ms = 10.0
    spec = ChainSpec(gain_db=from_db, limiter=False, smoothing_ms=smoothing_ms)
    st = ChainState(spec, RATE, FRAMES, 1, 2)
    change_block = 5
    n_blocks = 130  # ~33 time constants: long enough for the smoother to snap to target
    x = sine(FRAMES * n_blocks, 997.0, 0.5)

    def on_block(k, s):
        if k == change_block:
            s.p_tgt[GAIN_DB] = to_db

    y = run(st, x, on_block)
    assert np.array_equal(y[:, 0], y[:, 1])
    start = change_block * FRAMES
    g_from, g_to = 10 ** (from_db / 20), 10 ** (to_db / 20)
    np.testing.assert_allclose(y[:start, 0], x[:start, 0] * g_from, rtol=1e-14, atol=0)

    mask = np.abs(x[:, 0]) > 0.05
    idx = np.nonzero(mask)[0]
    g = y[idx, 0] / x[idx, 0]
    after = idx >= start
    ga, ia = g[after], idx[after]
    sign = np.sign(to_db - from_db)
    # starts moving in the first block after the change (already its first samples)
    first_block = ia < start + FRAMES
    assert sign * (ga[first_block][0] - g_from) > 1e-6
    assert sign * (ga[first_block][-1] - ga[first_block][0]) > 0
    # monotonic, no jumps: per-sample step at most 0.5 % of full gain
    steps = sign * np.diff(g)
    assert steps.min() >= -1e-12, "gain moved away from its target"
    max_step = 0.005
    assert steps.max() < max_step, f"gain jump {steps.max():.5f}"
    # within 0.01 dB of the target after ~6.4 time constants (ln(6/0.01)); not before 5, by 7
    err_db = np.abs(db(ga / g_to))
    bad = np.nonzero(err_db >= 0.01)[0]
    settle_samples = ia[bad[-1] + 1] - start if bad.size else 0
    tau = smoothing_ms * 1e-3 * RATE
    assert 5 * tau < settle_samples <= 7 * tau + SUB, settle_samples / tau
    # and lands exactly on the target
    tail = slice(-FRAMES, None)
    np.testing.assert_allclose(y[tail, 0], x[tail, 0] * g_to, rtol=1e-14, atol=0)
    assert st.p_cur[GAIN_DB] == to_db


def test_gain_smoothing_time_constant_follows_spec():
    # settling time scales with smoothing_ms (20 ms vs 5 ms: 4x)
    def settle(ms: float) -> int:
        st = ChainState(ChainSpec(limiter=False, smoothing_ms=ms), RATE, FRAMES, 1, 1)
        st.p_tgt[GAIN_DB] = -20.0
        for k in range(400):
            st.run()
            if abs(st.p_cur[GAIN_DB] + 20.0) < 0.01:
                return k
        raise AssertionError("gain never settled")

    slow, fast = settle(20.0), settle(5.0)
    assert 3.0 < slow / fast < 5.0, (slow, fast)


# --------------------------------------------------------------------------- EQ sweeps

@pytest.mark.parametrize(("slot", "start_value", "end_value"), [
    (0, 200.0, 5000.0),   # freq up, in one step of the target
    (0, 5000.0, 200.0),   # freq down
    (1, 0.0, 12.0),       # gain
    (2, 0.5, 8.0),        # q
])
def test_eq_sweep_is_click_free_and_converges(slot, start_value, end_value):
    base = [1000.0, 6.0, 1.0]  # freq, gain_db, q of one peaking band
    base[slot] = start_value

    def spec_with(value: float) -> ChainSpec:
        p = list(base)
        p[slot] = value
        return ChainSpec(bands=(Band("peaking", *p),), limiter=False)

    n_blocks = 320  # 850 ms: the log smoother snaps to the exact target after ~22 tau
    change_block = 10
    x = sine(FRAMES * n_blocks, 110.0, 0.3, 2) + sine(FRAMES * n_blocks, 3100.0, 0.05, 2)

    def on_block(k, s):
        if k == change_block:
            s.p_tgt[1 + slot] = end_value

    y = run(ChainState(spec_with(start_value), RATE, FRAMES, 2, 2), x, on_block)
    assert np.isfinite(y).all()
    # Click-free: the output is never steeper (largest sample-to-sample step) or louder than
    # the steepest/loudest of the static filters the sweep passes through, plus 20 %.
    # (Switching the coefficients in one go instead gives 1.3x to 2x here.)
    grid = (np.linspace if slot == 1 else np.geomspace)(start_value, end_value, 25)
    steady = slice(20 * FRAMES, 40 * FRAMES)
    static_step = static_peak = 0.0
    for v in grid:
        ys = run(ChainState(spec_with(v), RATE, FRAMES, 2, 2), x[: 40 * FRAMES])[steady]
        static_step = max(static_step, np.abs(np.diff(ys, axis=0)).max())
        static_peak = max(static_peak, np.abs(ys).max())
    sweep_step = np.abs(np.diff(y, axis=0)).max()
    assert sweep_step < 1.2 * static_step, (sweep_step, static_step)
    assert np.abs(y).max() < 1.2 * static_peak
    # before the change it is the start filter; at the end exactly the end filter
    ya = run(ChainState(spec_with(start_value), RATE, FRAMES, 2, 2), x)
    yb = run(ChainState(spec_with(end_value), RATE, FRAMES, 2, 2), x)
    assert np.array_equal(y[: change_block * FRAMES], ya[: change_block * FRAMES])
    np.testing.assert_allclose(y[-20 * FRAMES:], yb[-20 * FRAMES:], rtol=0, atol=1e-9)
    assert not np.allclose(ya[-FRAMES:], yb[-FRAMES:], atol=1e-3)  # start and end do differ


# --------------------------------------------------------------------------- limiter

def test_limiter_holds_ceiling_on_hot_sine():
    spec = ChainSpec(limiter=True, limiter_threshold_db=-1.0, limiter_release_ms=80.0)
    st = ChainState(spec, RATE, FRAMES, 2, 2)
    x = sine(FRAMES * 60, 1000.0, 2.0, 2)  # +6 dBFS
    gains = []
    y = run(st, x, lambda k, s: gains.append(s.lim[L_GAIN]))
    gains.append(st.lim[L_GAIN])
    assert np.abs(y).max() <= 1.0
    assert all(g < 1.0 for g in gains[1:]), gains[:5]
    # once settled, the peak sits at about the threshold (not merely clipped at 1.0)
    settled = np.abs(y[-20 * FRAMES:]).max()
    assert db(settled) == pytest.approx(-1.0, abs=0.5)
    assert st.lim[L_GAIN] == pytest.approx(10 ** (-7.0 / 20), abs=0.05)


def test_hard_ceiling_above_threshold_and_on_sudden_onsets():
    # threshold above 0 dBFS: the soft limiter lets +6 dBFS through, the ceiling does not
    st = ChainState(ChainSpec(limiter=True, limiter_threshold_db=6.0), RATE, FRAMES, 2, 2)
    y = run(st, sine(FRAMES * 10, 1000.0, 1.9, 2))
    assert np.abs(y).max() == 1.0
    # a sudden +20 dBFS burst after silence: the 0.5 ms attack is too slow for the first
    # samples, the ceiling catches them
    st = ChainState(ChainSpec(limiter=True, limiter_threshold_db=-1.0), RATE, FRAMES, 2, 2)
    x = np.zeros((FRAMES * 10, 2))
    x[FRAMES * 3 + 5:] = sine(FRAMES * 7 - 5, 3000.0, 10.0, 2, phase=np.pi / 2)
    y = run(st, x)
    assert np.abs(y).max() <= 1.0
    assert np.abs(y[FRAMES * 3 + 5]).max() == 1.0


@pytest.mark.parametrize("loud", [0, 1])
def test_limiter_is_linked_across_channels(loud):
    st = ChainState(ChainSpec(limiter=True, limiter_threshold_db=-1.0), RATE, FRAMES, 2, 2)
    quiet = 1 - loud
    x = np.zeros((FRAMES * 30, 2))
    x[:, loud] = sine(FRAMES * 30, 1000.0, 2.0)[:, 0]
    x[:, quiet] = sine(FRAMES * 30, 440.0, 0.1)[:, 0]
    y = run(st, x)
    tail = slice(-10 * FRAMES, None)
    ok = (np.abs(x[tail, loud]) > 0.01) & (np.abs(x[tail, quiet]) > 0.01)
    g_loud = y[tail, loud][ok] / x[tail, loud][ok]
    g_quiet = y[tail, quiet][ok] / x[tail, quiet][ok]
    np.testing.assert_allclose(g_quiet, g_loud, rtol=1e-9)
    assert g_quiet.max() < 0.5  # the quiet channel is pulled down with the loud one


def test_limiter_leaves_quiet_signal_alone():
    st = ChainState(ChainSpec(limiter=True, limiter_threshold_db=-1.0), RATE, FRAMES, 2, 2)
    x = sine(FRAMES * 20, 1000.0, 0.5, 2)  # -6 dBFS, below the knee (-4 dBFS)
    y = run(st, x)
    assert np.array_equal(y, x)
    assert st.lim[L_GAIN] == 1.0


def test_limiter_threshold_is_live():
    st = ChainState(ChainSpec(limiter=True, limiter_threshold_db=-1.0), RATE, FRAMES, 1, 1)
    x = sine(FRAMES * 80, 1000.0, 0.5)

    def on_block(k, s):
        if k == 5:
            s.p_tgt[s.spec.limiter_base] = -20.0

    y = run(st, x, on_block)
    assert np.array_equal(y[: 5 * FRAMES], x[: 5 * FRAMES])
    assert db(np.abs(y[-10 * FRAMES:]).max()) == pytest.approx(-20.0, abs=0.5)


def test_limiter_release_recovers_gain():
    release_ms = 50.0
    st = ChainState(ChainSpec(limiter=True, limiter_threshold_db=-1.0,
                              limiter_release_ms=release_ms), RATE, FRAMES, 2, 2)
    loud = sine(FRAMES * 20, 1000.0, 2.0, 2)
    run(st, loud)
    assert st.lim[L_GAIN] < 0.5
    quiet = sine(FRAMES * 200, 1000.0, 0.1, 2)
    gains = []
    y = run(st, quiet, lambda k, s: gains.append(s.lim[L_GAIN]))
    gains.append(st.lim[L_GAIN])
    g = np.array(gains)
    assert (np.diff(g) >= 0).all(), "gain must only recover while the signal is quiet"
    # not instantaneous: still reducing 10 ms after the drop
    assert g[int(0.010 * RATE / FRAMES)] < 0.9
    # back to unity well within 10 release time constants (env 2.0 -> knee at -4 dBFS)
    back = int(np.argmax(g == 1.0))
    assert g[back] == 1.0
    assert back * FRAMES < 10 * release_ms * 1e-3 * RATE
    assert np.array_equal(y[-FRAMES:], quiet[-FRAMES:])


# --------------------------------------------------------------------------- meters

def test_meters_of_known_sine_and_channel_mapping():
    frames = 480  # 10 whole cycles of 1 kHz at 48 kHz
    spec = ChainSpec(gain_db=20 * math.log10(0.5), limiter=False)
    st = ChainState(spec, RATE, frames, 1, 2)
    assert st.meters.shape == (4, 2)
    x = sine(frames * 3, 1000.0, 0.8)
    y = run(st, x)
    assert np.array_equal(y[:, 0], y[:, 1])  # out c <- in c % cin
    np.testing.assert_allclose(y[:, 0], 0.5 * x[:, 0], rtol=1e-12)
    m = st.meters
    assert m[M_IN_PEAK, 0] == pytest.approx(0.8, rel=1e-9)
    assert m[M_IN_MS, 0] == pytest.approx(0.8 ** 2 / 2, rel=1e-9)
    assert m[M_IN_PEAK, 1] == 0.0 and m[M_IN_MS, 1] == 0.0  # there is no input channel 1
    for c in range(2):
        assert m[M_OUT_PEAK, c] == pytest.approx(0.4, rel=1e-9)
        assert m[M_OUT_MS, c] == pytest.approx(0.4 ** 2 / 2, rel=1e-9)


def test_meters_per_channel_and_routing_2_in_3_out():
    frames = 480
    st = ChainState(ChainSpec(limiter=False), RATE, frames, 2, 3)
    x = np.hstack([sine(frames, 1000.0, 0.6), sine(frames, 2000.0, 0.3)])
    st.x[:] = x
    st.run()
    np.testing.assert_array_equal(st.y, x[:, [0, 1, 0]])
    m = st.meters
    np.testing.assert_allclose(m[M_IN_PEAK], [0.6, 0.3, 0.0], rtol=1e-9)
    np.testing.assert_allclose(m[M_IN_MS], [0.18, 0.045, 0.0], rtol=1e-9)
    np.testing.assert_allclose(m[M_OUT_PEAK], [0.6, 0.3, 0.6], rtol=1e-9)
    np.testing.assert_allclose(m[M_OUT_MS], [0.18, 0.045, 0.18], rtol=1e-9)
    # meters are per block, not accumulated
    st.x[:] = 0.0
    st.run()
    assert not st.meters.any()


# --------------------------------------------------------------------------- denormals

def test_state_decays_to_exact_zero_without_denormals():
    bands = (Band("lowpass", 30.0, 0.0, 0.7071), Band("highpass", 20.0, 0.0, 0.7071),
             Band("peaking", 60.0, 12.0, 10.0), Band("lowshelf", 100.0, 6.0, 0.7071),
             Band("highshelf", 12000.0, -6.0, 0.7071))
    spec = ChainSpec(bands=bands, limiter=True, limiter_release_ms=10.0)
    st = ChainState(spec, RATE, 256, 2, 2)
    st.x[:] = noise(256, 2, amp=0.5, seed=11)
    for _ in range(4):
        st.run()
    assert np.abs(st.z).max() > 1e-6 and st.lim[L_ENV] > 0.0
    st.x[:] = 0.0

    def subnormal(a: np.ndarray) -> bool:
        return bool(((a != 0.0) & (np.abs(a) < TINY)).any())

    # bound from the slowest pole: |state| <= 1 shrinks by r per sample down to the 1e-30 flush
    r_max = max(np.abs(np.roots([1.0, c[3], c[4]])).max() for c in st.coef)
    expected = math.log(1e30) / math.log(1.0 / r_max) / 256
    limit = int(1.2 * expected) + 10  # ~1400 blocks (7.5 s of audio), the Q=10 peak is slow
    for k in range(limit):
        st.run()
        assert not subnormal(st.y) and not subnormal(st.z), f"denormal in block {k}"
        assert not subnormal(st.lim)
        if not st.z.any() and st.lim[L_ENV] == 0.0:
            break
    else:
        raise AssertionError(f"state not exactly zero after {limit} blocks: "
                             f"{np.abs(st.z).max():g}, env {st.lim[L_ENV]:g}")
    assert k > 0.25 * expected  # it decayed: the flush did not zero live state early
    st.run()
    assert not st.y.any() and not st.z.any()
