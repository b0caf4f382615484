"""RBJ biquad designs (dsp/biquad_design.py) and cascades (dsp/biquad_cascade.py).

Designs are checked against scipy: scipy.signal.bilinear of the cookbook's analog prototypes
(every type), butter(2), iirnotch and iirpeak where the definitions coincide, and the
frequency response (scipy.signal.freqz) at each type's defining points. Cascades are checked
against scipy.signal.sosfilt on the same input across rates, channel counts and block sizes;
parameter glides against click-free bounds taken from the static filters they pass through,
against an unsmoothed switch (which must fail the same bound), and for exact convergence.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from echoel.dsp.biquad_cascade import (
    SUB,
    BiquadCascade,
    Section,
)
from echoel.dsp.biquad_design import BAND_TYPES, FILTER_TYPES, design
from numba.core.runtime import _nrt_python, rtsys
from scipy import optimize, signal

SQRT1_2 = 1.0 / math.sqrt(2.0)


def noise(n: int, ch: int, amp: float = 1.0, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-amp, amp, (n, ch))


def sine(n: int, rate: float, freq: float, amp: float, ch: int = 2) -> np.ndarray:
    s = amp * np.sin(2 * np.pi * freq * np.arange(n) / rate)
    return np.repeat(s[:, None], ch, axis=1)


def run_blocks(c: BiquadCascade, x: np.ndarray, block: int, on_block=None) -> np.ndarray:
    """Process x through c in blocks of `block` frames (the last may be shorter)."""
    y = np.empty_like(x)
    for k, start in enumerate(range(0, x.shape[0], block)):
        if on_block is not None:
            on_block(k * block, c)
        c.process(x[start:start + block], y[start:start + block])
    return y


def ba(coef: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return coef[:3], np.r_[1.0, coef[3:]]


def db(v):
    return 20.0 * np.log10(np.abs(v))


def response_db(kind: str, f0: float, gain_db: float, q: float, rate: float, at_hz) -> np.ndarray:
    b, a = ba(design(kind, f0, gain_db, q, rate))
    _, h = signal.freqz(b, a, worN=np.atleast_1d(np.asarray(at_hz, float)), fs=rate)
    return db(h)


# --------------------------------------------------------------------------- designs vs scipy

def analog_prototype(kind: str, gain_db: float, q: float) -> tuple[list, list]:
    """The cookbook's analog H(s) at a normalised frequency of 1 (numerator, denominator)."""
    A = 10.0 ** (gain_db / 40.0)
    sa = math.sqrt(A)
    den = [1.0, 1.0 / q, 1.0]
    return {
        "lowpass": ([0.0, 0.0, 1.0], den),
        "highpass": ([1.0, 0.0, 0.0], den),
        "bandpass": ([0.0, 1.0 / q, 0.0], den),
        "bandpass_skirt": ([0.0, 1.0, 0.0], den),
        "notch": ([1.0, 0.0, 1.0], den),
        "allpass": ([1.0, -1.0 / q, 1.0], den),
        "peaking": ([1.0, A / q, 1.0], [1.0, 1.0 / (A * q), 1.0]),
        "lowshelf": ([A, A * sa / q, A * A], [A, sa / q, 1.0]),
        "highshelf": ([A * A, A * sa / q, A], [1.0, sa / q, A]),
    }[kind]


DESIGN_CASES = [
    (44100.0, 63.0, -9.0, 0.5),
    (48000.0, 1000.0, 6.0, SQRT1_2),
    (48000.0, 12000.0, 12.0, 3.0),
    (96000.0, 250.0, -3.0, 8.0),
    (96000.0, 30000.0, 4.5, 1.2),
]


@pytest.mark.parametrize("kind", sorted(FILTER_TYPES))
@pytest.mark.parametrize(("rate", "f0", "gain_db", "q"), DESIGN_CASES)
def test_design_is_bilinear_of_cookbook_prototype(kind, rate, f0, gain_db, q):
    # s -> s / Wc with Wc = 2 fs tan(w0 / 2): the bilinear transform prewarped at f0
    num, den = analog_prototype(kind, gain_db, q)
    wc = 2.0 * rate * math.tan(math.pi * f0 / rate)
    scale = np.array([wc ** -2, wc ** -1, 1.0])
    bz, az = signal.bilinear(np.array(num) * scale, np.array(den) * scale, fs=rate)
    b, a = ba(design(kind, f0, gain_db, q, rate))
    np.testing.assert_allclose(b, bz / az[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a, az / az[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rate", [44100.0, 48000.0, 96000.0])
@pytest.mark.parametrize("fc", [40.0, 1000.0, 15000.0])
def test_lowpass_highpass_at_butterworth_q_are_butter2(rate, fc):
    for kind, btype in (("lowpass", "low"), ("highpass", "high")):
        b_ref, a_ref = signal.butter(2, fc, btype=btype, fs=rate)
        b, a = ba(design(kind, fc, 0.0, SQRT1_2, rate))
        np.testing.assert_allclose(b, b_ref, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(a, a_ref, rtol=1e-9, atol=1e-15)


def scipy_q(f0: float, q: float, rate: float) -> float:
    """scipy's iirnotch/iirpeak Q (w0 / -3 dB bandwidth) of an RBJ section of Q q.

    RBJ's alpha = sin(w0) / (2 q); scipy's is tan(bandwidth / 2), bandwidth = w0 / Q."""
    w0 = 2 * math.pi * f0 / rate
    return w0 / (2 * math.atan(math.sin(w0) / (2 * q)))


@pytest.mark.parametrize(("rate", "f0", "q"), [(48000.0, 1000.0, 5.0), (44100.0, 60.0, 30.0),
                                               (96000.0, 9000.0, 0.8), (48000.0, 18000.0, 2.0)])
def test_notch_and_bandpass_are_iirnotch_and_iirpeak(rate, f0, q):
    qs = scipy_q(f0, q, rate)
    for kind, ref in (("notch", signal.iirnotch), ("bandpass", signal.iirpeak)):
        b_ref, a_ref = ref(f0, qs, fs=rate)
        b, a = ba(design(kind, f0, 0.0, q, rate))
        np.testing.assert_allclose(b, b_ref, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(a, a_ref, rtol=1e-9, atol=1e-14)
    # and the -3 dB bandwidth of the band pass is w0 / qs, 0 dB at f0
    half_power_db = 10 * math.log10(0.5)

    def edge(lo: float, hi: float) -> float:
        return optimize.brentq(
            lambda f: response_db("bandpass", f0, 0.0, q, rate, [f])[0] - half_power_db,
            lo, hi, xtol=1e-9)

    edges = [edge(1e-3, f0), edge(f0, rate / 2 - 1e-3)]
    assert response_db("bandpass", f0, 0.0, q, rate, [f0])[0] == pytest.approx(0.0, abs=1e-9)
    assert edges[1] - edges[0] == pytest.approx(f0 / qs, rel=1e-6)
    # the notch: a zero at f0, -3 dB at the same edges (it is the band pass's complement)
    assert response_db("notch", f0, 0.0, q, rate, [f0])[0] < -150.0
    np.testing.assert_allclose(response_db("notch", f0, 0.0, q, rate, edges), half_power_db,
                               atol=1e-6)


@pytest.mark.parametrize("rate", [44100.0, 48000.0, 96000.0])
@pytest.mark.parametrize(("f0", "gain_db", "q"), [(100.0, 6.0, 0.7), (1000.0, -12.0, 1.0),
                                                  (5000.0, 15.0, 4.0)])
def test_responses_at_defining_points(rate, f0, gain_db, q):
    nyq = rate / 2
    # peaking: the gain at f0, and an extremum there
    h = response_db("peaking", f0, gain_db, q, rate, [f0, f0 / 1.2, f0 * 1.2])
    assert h[0] == pytest.approx(gain_db, abs=1e-9)
    assert abs(h[1]) < abs(h[0]) and abs(h[2]) < abs(h[0])
    # shelves: full gain on their side, 0 dB on the other, half the gain (in dB) at f0
    lo = response_db("lowshelf", f0, gain_db, q, rate, [0.0, f0, nyq])
    np.testing.assert_allclose(lo, [gain_db, gain_db / 2, 0.0], atol=1e-9)
    hi = response_db("highshelf", f0, gain_db, q, rate, [0.0, f0, nyq])
    np.testing.assert_allclose(hi, [0.0, gain_db / 2, gain_db], atol=1e-9)
    # low/high pass: |H(f0)| = q (so -3.01 dB at the corner for q = 1/sqrt 2), 0 dB passband
    for kind, passband in (("lowpass", 0.0), ("highpass", nyq)):
        h = response_db(kind, f0, 0.0, q, rate, [f0, passband])
        assert h[0] == pytest.approx(db(q), abs=1e-9)
        assert h[1] == pytest.approx(0.0, abs=1e-9)
        corner = response_db(kind, f0, 0.0, SQRT1_2, rate, [f0])[0]
        assert corner == pytest.approx(-3.0103, abs=1e-4)
    # band passes: 0 dB peak (constant peak gain) or q (constant skirt gain) at f0
    assert response_db("bandpass", f0, 0.0, q, rate, [f0])[0] == pytest.approx(0.0, abs=1e-9)
    assert response_db("bandpass_skirt", f0, 0.0, q, rate, [f0])[0] == pytest.approx(
        db(q), abs=1e-9)
    # all pass: unity everywhere, -180 degrees at f0
    w = np.geomspace(10.0, nyq * 0.999, 50)
    np.testing.assert_allclose(response_db("allpass", f0, 0.0, q, rate, w), 0.0, atol=1e-9)
    b, a = ba(design("allpass", f0, 0.0, q, rate))
    _, h0 = signal.freqz(b, a, worN=[f0], fs=rate)
    assert abs(abs(np.angle(h0[0])) - math.pi) < 1e-6


def test_engine_types_keep_their_values():
    assert BAND_TYPES == {"peaking": 0, "lowshelf": 1, "highshelf": 2, "lowpass": 3,
                          "highpass": 4}
    assert set(BAND_TYPES.items()) <= set(FILTER_TYPES.items())
    assert len(set(FILTER_TYPES.values())) == len(FILTER_TYPES)
    with pytest.raises(ValueError, match="filter type 'bandstop' unknown"):
        design("bandstop", 1000.0, 0.0, 1.0, 48000.0)


# --------------------------------------------------------------------------- cascades vs sosfilt

CASCADES = {
    44100.0: [Section("highpass", 30.0, 0.0, 0.6), Section("lowshelf", 120.0, 5.0),
              Section("peaking", 2500.0, -7.0, 3.0), Section("notch", 60.0, 0.0, 10.0),
              Section("lowpass", 18000.0)],
    48000.0: [Section("bandpass", 900.0, 0.0, 0.8), Section("highshelf", 8000.0, -4.0),
              Section("peaking", 150.0, 9.0, 0.7), Section("allpass", 3000.0, 0.0, 2.0),
              Section("bandpass_skirt", 400.0, 0.0, 1.5)],
    96000.0: [Section("peaking", 40.0, 12.0, 4.0), Section("lowpass", 25000.0, 0.0, 1.2),
              Section("highpass", 10.0), Section("highshelf", 15000.0, 6.0, 0.5)],
}


def sos_of(sections: list[Section], rate: float) -> np.ndarray:
    """Second-order sections designed apart from any cascade state."""
    rows = []
    for s in sections:
        b, a = ba(design(s.kind, s.freq, s.gain_db, s.q, rate))
        rows.append(np.r_[b, a])
    return np.array(rows)


@pytest.mark.parametrize("rate", sorted(CASCADES))
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("block", [1, 64, 128, 1000, None])
def test_cascade_matches_sosfilt(rate, channels, block):
    n = 6000 if block == 1 else 30000  # block 1 is one Python call per frame
    x = noise(n, channels, amp=1.0, seed=int(rate) + channels)
    c = BiquadCascade(CASCADES[rate], rate, channels)
    sos = sos_of(CASCADES[rate], rate)
    assert np.array_equal(c.sos(), sos)
    y = run_blocks(c, x, block or n)
    ref = signal.sosfilt(sos, x, axis=0)
    err = np.abs(y - ref).max()
    assert err <= 1e-9, err  # relative to full scale (the input spans +-1)
    assert np.abs(ref).max() > 0.1  # not two silences
    assert c.bad_blocks == 0 and c.latency == 0


def test_process_in_place_and_empty_blocks():
    rate = 48000.0
    x = noise(4096, 2, seed=3)
    ref = signal.sosfilt(sos_of(CASCADES[rate], rate), x, axis=0)
    c = BiquadCascade(CASCADES[rate], rate, 2)
    buf = x.copy()
    c.process(buf[:0], buf[:0])
    c.process(buf[:1000], buf[:1000])
    c.process(buf[1000:], buf[1000:])
    assert np.abs(buf - ref).max() <= 1e-9


# --------------------------------------------------------------------------- glides

GLIDES = [  # kind, (freq, gain_db, q) at the start, parameter, end value
    ("peaking", (1000.0, 6.0, 1.0), "freq", 5000.0),
    ("peaking", (5000.0, 6.0, 1.0), "freq", 200.0),
    ("peaking", (1000.0, 0.0, 1.0), "gain_db", 12.0),
    ("peaking", (1000.0, 6.0, 0.5), "q", 8.0),
    ("lowpass", (8000.0, 0.0, 0.7), "freq", 300.0),
    ("highshelf", (2000.0, 0.0, 0.7), "gain_db", 12.0),
]
RATE = 48000.0
FRAMES = 128
PARAMS = ("freq", "gain_db", "q")


def section_with(kind: str, start: tuple, param: str, value: float) -> Section:
    p = dict(zip(PARAMS, start, strict=True))
    p[param] = value
    return Section(kind, **p)


@pytest.mark.parametrize(("kind", "start", "param", "end"), GLIDES)
def test_glide_is_click_free_and_an_instant_switch_is_not(kind, start, param, end):
    change_at = 10 * FRAMES
    x = sine(200 * FRAMES, RATE, 110.0, 0.3) + sine(200 * FRAMES, RATE, 3100.0, 0.05)

    def change(pos, c):
        if pos == change_at:
            c.set_section(0, **{param: end})

    # the steepest step and the loudest sample of the static filters the glide passes through
    grid = (np.linspace if param == "gain_db" else np.geomspace)(start[PARAMS.index(param)],
                                                                   end, 25)
    static_step = static_peak = 0.0
    for v in grid:
        ys = run_blocks(BiquadCascade([section_with(kind, start, param, v)], RATE, 2),
                        x[:40 * FRAMES], FRAMES)[20 * FRAMES:]
        static_step = max(static_step, np.abs(np.diff(ys, axis=0)).max())
        static_peak = max(static_peak, np.abs(ys).max())

    def glide(ms: float) -> np.ndarray:
        c = BiquadCascade([Section(kind, *start)], RATE, 2, smoothing_ms=ms)
        return run_blocks(c, x, FRAMES, change)

    y = glide(10.0)
    assert np.abs(np.diff(y, axis=0)).max() < 1.15 * static_step
    assert np.abs(y).max() < 1.15 * static_peak
    # the same bound catches the click of switching the coefficients in one go
    y0 = glide(0.0)
    assert np.abs(np.diff(y0, axis=0)).max() > 1.25 * static_step


@pytest.mark.parametrize(("kind", "start", "param", "end"), GLIDES)
def test_glide_converges_exactly(kind, start, param, end):
    c = BiquadCascade([Section("lowshelf", 80.0, 3.0), Section(kind, *start)], RATE, 2)
    x = noise(180 * FRAMES, 2, amp=0.5, seed=11)
    y = run_blocks(c, x[:10 * FRAMES], FRAMES)
    c.set_section(1, **{param: end})
    y = run_blocks(c, x[10 * FRAMES:140 * FRAMES], FRAMES)  # 347 ms: ~35 time constants
    target = section_with(kind, start, param, end)
    sos = sos_of([Section("lowshelf", 80.0, 3.0), target], RATE)
    assert np.array_equal(c.p_cur, c.p_tgt)
    assert np.array_equal(c.sos(), sos)  # bit for bit the design of the target
    # from here on, it is the target filter carrying on from the cascade's own state
    zi = np.stack([np.stack([c.z[s, :, 0], c.z[s, :, 1]]) for s in range(2)])  # [s, 2, ch]
    rest = x[140 * FRAMES:]
    y = run_blocks(c, rest, FRAMES)
    ref, _ = signal.sosfilt(sos, rest, axis=0, zi=zi)
    assert np.abs(y - ref).max() <= 1e-9


def test_glide_follows_the_one_pole_step_by_step():
    tau_ms = 20.0
    c = BiquadCascade([Section("peaking", 1000.0, 0.0, 1.0)], RATE, 1, smoothing_ms=tau_ms)
    c.set_section(0, freq=4000.0, gain_db=-12.0)
    k = 1.0 - math.exp(-SUB / (tau_ms * 1e-3 * RATE))
    x = np.zeros((SUB, 1))
    for step in range(1, 40):
        c.process(x, x)
        left = (1.0 - k) ** step  # fraction of the way still to go
        assert c.p_cur[0, 1] == pytest.approx(-12.0 * (1.0 - left), rel=1e-9)
        assert math.log(c.p_cur[0, 0]) == pytest.approx(
            math.log(1000.0) + math.log(4.0) * (1.0 - left), rel=1e-12)
    # after one time constant 1 - 1/e of the way (to the SUB grid)
    n = round(tau_ms * 1e-3 * RATE / SUB)
    assert 1.0 - (1.0 - k) ** n == pytest.approx(1.0 - math.exp(-1.0), abs=1e-3)


def test_output_does_not_depend_on_block_size_while_gliding():
    x = noise(48000, 2, amp=0.5, seed=5)
    change_at = 16000  # a multiple of every block size

    def change(pos, c):
        if pos == change_at:
            c.set_section(0, freq=300.0, gain_db=-9.0, q=3.0)

    outs = []
    for block in (1, 64, 128, 1000):
        c = BiquadCascade([Section("peaking", 2000.0, 6.0, 1.0), Section("highpass", 50.0)],
                          RATE, 2)
        outs.append(run_blocks(c, x, block, change))
    for y in outs[1:]:
        assert np.array_equal(y, outs[0])


def test_parameter_change_and_kernel_do_not_allocate():
    c = BiquadCascade(CASCADES[48000.0], 48000.0, 2)
    small, big = np.zeros((1, 2)), noise(1000, 2, seed=2)
    c.process(small, small)
    arrays = [c.p_tgt, c.p_cur, c.coef, c.z, c.ctl]
    was_enabled = _nrt_python.memsys_stats_enabled()
    _nrt_python.memsys_enable_stats()
    try:
        def allocations(fn) -> int:
            before = rtsys.get_allocation_stats().alloc
            fn()
            return rtsys.get_allocation_stats().alloc - before

        def sweep():
            for i in range(50):
                c.set_section(i % 5, freq=500.0 + i, gain_db=i % 7, q=1.0 + i / 50)

        assert allocations(sweep) == 0
        # numba boxes each array argument per call (a fixed count); the kernel body adds none,
        # whatever the block length and while every section is gliding
        per_call = allocations(lambda: c.process(small, small))
        assert allocations(lambda: c.process(big, big)) == per_call
        assert per_call <= len(c.kernel_args(small, small))
    finally:
        if not was_enabled:
            _nrt_python.memsys_disable_stats()
    assert all(a is b for a, b in zip(arrays, [c.p_tgt, c.p_cur, c.coef, c.z, c.ctl],
                                      strict=True))


# --------------------------------------------------------------------------- bad input, limits

def test_nan_and_inf_blocks_are_counted_and_do_not_stick():
    secs = CASCADES[48000.0]
    x = noise(40 * FRAMES, 2, amp=0.5, seed=9)
    bad = x.copy()
    bad[5 * FRAMES + 3, 0] = np.nan
    bad[9 * FRAMES + 100, 1] = np.inf
    bad[9 * FRAMES + 101, 0] = -np.inf
    c = BiquadCascade(secs, RATE, 2)
    y = run_blocks(c, bad, FRAMES)
    assert c.bad_blocks == 2
    assert np.isfinite(y).all() and np.isfinite(c.z).all()
    # exactly what the same input with those samples silent gives
    clean = np.where(np.isfinite(bad), bad, 0.0)
    ref = signal.sosfilt(sos_of(secs, RATE), clean, axis=0)
    assert np.abs(y - ref).max() <= 1e-9


def test_overflowing_state_is_reset_and_counted():
    c = BiquadCascade([Section("highshelf", 1000.0, 60.0)], RATE, 1)
    x = np.full((FRAMES, 1), 1e307)
    x[::2] = -1e307  # at Nyquist: 1e310 after the shelf
    c.process(x, np.empty_like(x))
    assert c.bad_blocks == 1 and np.isfinite(c.z).all()
    quiet = noise(10 * FRAMES, 1, amp=0.1, seed=4)
    y = run_blocks(c, quiet, FRAMES)
    assert np.isfinite(y).all()
    ref = signal.sosfilt(c.sos(), quiet, axis=0)
    assert np.abs(y - ref).max() <= 1e-9  # as if fresh: nothing of the overflow left


def test_silence_decays_to_exact_zero_state():
    c = BiquadCascade(CASCADES[48000.0], RATE, 2)
    c.process(noise(FRAMES, 2, seed=1), np.empty((FRAMES, 2)))
    silence, out = np.zeros((FRAMES, 2)), np.empty((FRAMES, 2))
    for _ in range(2000):  # 5 s: the slowest section (150 Hz, Q 0.7) is long gone
        c.process(silence, out)
    assert np.count_nonzero(c.z) == 0
    assert not out.any()


def test_dc_through_shelf_gets_the_shelf_gain():
    c = BiquadCascade([Section("lowshelf", 200.0, -6.0)], RATE, 1)
    y = run_blocks(c, np.full((48000, 1), 0.5), FRAMES)
    assert y[-1, 0] == pytest.approx(0.5 * 10 ** (-6 / 20), rel=1e-9)


@pytest.mark.parametrize(("call", "message"), [
    (lambda c: c.set_section(0, freq=24000.0), r"freq 24000.0 Hz out of range \[1, 24000\)"),
    (lambda c: c.set_section(0, freq=0.0), "freq 0.0 Hz out of range"),
    (lambda c: c.set_section(0, q=0.0), r"Q 0.0 out of range \[0.01, 100\]"),
    (lambda c: c.set_section(0, gain_db=90.0), r"gain 90.0 dB out of range \[-60, 60\]"),
    (lambda c: c.set_smoothing(-1.0), "smoothing -1.0 ms out of range"),
    (lambda c: c.process(np.zeros((8, 2), np.float32)), "input must be a float64 array"),
    (lambda c: c.process(np.zeros((8, 1))), "input has 1 channels, the state was built for 2"),
    (lambda c: c.process(np.zeros((8, 2)), np.zeros((4, 2))), "output has 4 frames"),
])
def test_bad_parameters_and_shapes_are_refused_with_the_value(call, message):
    c = BiquadCascade([Section("peaking", 1000.0, 3.0)], RATE, 2)
    with pytest.raises(ValueError, match=message):
        call(c)


def test_bad_construction_is_refused():
    with pytest.raises(ValueError, match="section 1: filter type 'comb' unknown"):
        BiquadCascade([Section("peaking", 1000.0), Section("comb", 100.0)], RATE, 2)
    with pytest.raises(ValueError, match="channels 0"):
        BiquadCascade([], RATE, 0)
    with pytest.raises(ValueError, match=r"freq 30000\.0 Hz"):
        BiquadCascade([Section("lowpass", 30000.0)], RATE, 1)
