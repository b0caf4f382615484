"""Monophonic pitch tracking (dsp/pitch_yin.py, dsp/pitch_hmm.py) against references.

References measured in the same run: scipy (decimator design, beta prior), numpy restatements
of YIN's difference function and of pYIN's threshold rule, librosa's HMM pieces and Viterbi
decoder, librosa.pyin and the generators' ground truth (bench/evalset/pitch_clips.py) scored
with mir_eval.melody. Streaming behaviour: block-size independence, the stated latency to the
sample, NaN/Inf blocks, silence and noise, no allocation per block (numba's runtime counters).
"""

from __future__ import annotations

import math

import librosa
import numba
import numpy as np
import pytest
import scipy.signal
import scipy.stats
from echoel.dsp.pitch_hmm import (
    backtrack,
    bin_freq,
    build_hmm,
    hmm_step,
    transition_matrix,
)
from echoel.dsp.pitch_yin import (
    C_NIN,
    PitchConfig,
    PitchTracker,
    candidates,
    cumulative_mean_normalised,
    decimator_taps,
    difference_direct,
    difference_fft,
    layout,
    note_name,
    threshold_prior,
    track,
    track_block,
)
from numba.core.runtime import _nrt_python, rtsys

from bench.evalset.pitch_clips import evaluation_set, score

RATE = 48000
CFG = PitchConfig()


def harmonic_tone(f0: float | np.ndarray, seconds: float, amp: float = 0.3,
                  harmonics: int = 6) -> np.ndarray:
    """float32 tone with 1/k harmonics below 0.45 x rate; f0 constant or per sample."""
    n = int(seconds * RATE)
    f = np.broadcast_to(np.asarray(f0, dtype=np.float64), (n,))
    phase = 2 * np.pi * np.cumsum(f) / RATE
    x = np.zeros(n)
    for k in range(1, harmonics + 1):
        x += np.where(k * f < 0.45 * RATE, np.sin(k * phase) / k, 0.0)
    return (amp * x / np.max(np.abs(x))).astype(np.float32)


def stream(tr: PitchTracker, x: np.ndarray, sizes) -> dict[str, np.ndarray]:
    """Feed x in blocks of the given sizes (cycled), flush; concatenated outputs."""
    parts: list[dict[str, np.ndarray]] = []

    def grab(n: int) -> None:
        parts.append({k: getattr(tr, k)[:n].copy() for k in
                      ("index", "f0", "voiced", "voiced_prob", "confidence", "midi", "cents")})

    pos = 0
    k = 0
    while pos < x.shape[0]:
        size = sizes[k % len(sizes)]
        grab(tr.process(x[pos:pos + size]))
        pos += size
        k += 1
    grab(tr.flush())
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


# ----------------------------------------------------------------------------- design pieces

def test_decimator_is_scipy_firwin_and_meets_its_band_edges():
    taps = decimator_taps(3)
    n = taps.shape[0]
    beta = 0.1102 * (60.0 - 8.7)
    ref = scipy.signal.firwin(n, (0.35 + 0.5) / 2 / 3 * 2, window=("kaiser", beta))
    np.testing.assert_allclose(taps, ref, rtol=0, atol=1e-12)
    w, h = scipy.signal.freqz(taps, worN=1 << 15, fs=RATE)
    mag = 20 * np.log10(np.abs(h) + 1e-300)
    rate_int = RATE / 3
    assert np.max(np.abs(mag[w <= 0.35 * rate_int])) < 0.02  # flat pass band
    assert np.max(mag[w >= 0.5 * rate_int]) < -59.0  # nothing folds below the internal Nyquist
    assert decimator_taps(1).tolist() == [1.0]


def test_threshold_prior_is_the_beta_distribution():
    for a, b in ((2.0, 18.0), (1.0, 1.0), (3.5, 7.25)):
        ref = np.diff(scipy.stats.beta.cdf(np.linspace(0, 1, 101), a, b))
        np.testing.assert_allclose(threshold_prior(100, a, b), ref, rtol=0, atol=1e-9)


def test_transition_matrix_is_librosas():
    n_bins, width, switch = 40, 9, 0.01
    ref = np.kron(librosa.sequence.transition_loop(2, 1 - switch),
                  librosa.sequence.transition_local(n_bins, width, window="triangle",
                                                    wrap=False))
    np.testing.assert_allclose(transition_matrix(n_bins, width, switch), ref, atol=1e-15)


def path_logp(states, obs, trans, p_init) -> float:
    """Log probability of a state path (log(x + tiny), as librosa's viterbi)."""
    tiny = np.finfo(np.float64).tiny
    lp = math.log(p_init[states[0]] + tiny) + math.log(obs[states[0], 0] + tiny)
    for t in range(1, len(states)):
        lp += math.log(trans[states[t - 1], states[t]] + tiny)
        lp += math.log(obs[states[t], t] + tiny)
    return lp


@pytest.mark.parametrize("leap", [0.0, 1e-3])
def test_viterbi_with_full_lookahead_finds_librosas_best_path(leap):
    """Candidates at bin centres with random probabilities; with lookahead = whole sequence
    the fixed-lag decoder is plain Viterbi: its path is as probable as the one
    librosa.sequence.viterbi finds with the dense matrix (pYIN's, or with leaps)."""
    n_bins, width, frames, bps, fmin = 48, 9, 60, 5, 100.0
    hm = build_hmm(n_bins, width, 0.01, frames - 1, 8, bps, fmin, leap)
    rng = np.random.default_rng(3)
    obs = np.zeros((2 * n_bins, frames))
    centre = 20
    for t in range(frames):
        centre = int(np.clip(centre + rng.integers(-3, 4), 2, n_bins - 3))
        if t in (20, 40):
            centre = (centre + n_bins // 2) % n_bins  # a leap, beyond the band
        nc = int(rng.integers(0, 4)) if t % 17 else 0
        bins = [centre, *rng.integers(0, n_bins, size=3)]
        p = rng.dirichlet(np.ones(4)) * rng.uniform(0.2, 0.95)
        p[0] = max(p[0], 0.6) if nc else p[0]
        for c in range(nc):
            hm.cand_f[t, c] = bin_freq(hm, int(bins[c]))
            hm.cand_p[t, c] = p[c]
            obs[int(bins[c]), t] += p[c]
        hm.cand_n[t] = nc
        vp = min(float(p[:nc].sum()), 1.0)
        hm.voiced_p[t] = vp
        obs[n_bins:, t] = (1 - vp) / n_bins
        hmm_step(hm, t)
    backtrack(hm, frames - 1, frames - 1)
    ours = hm.path[:frames].copy()
    trans = transition_matrix(n_bins, width, 0.01, leap)
    np.testing.assert_allclose(trans.sum(axis=1), 1.0, rtol=1e-12)
    if leap == 0.0:
        ref_trans = np.kron(librosa.sequence.transition_loop(2, 0.99),
                            librosa.sequence.transition_local(n_bins, width, window="triangle",
                                                              wrap=False))
        np.testing.assert_allclose(trans, ref_trans, atol=1e-15)
    p_init = np.full(2 * n_bins, 1 / (2 * n_bins))
    ref = librosa.sequence.viterbi(obs, trans, p_init=p_init)
    lp_ours = path_logp(ours, obs, trans, p_init)
    lp_ref = path_logp(ref, obs, trans, p_init)
    assert lp_ours == pytest.approx(lp_ref, rel=1e-12, abs=1e-9)
    assert np.mean((ours < n_bins) == (ref < n_bins)) == 1.0  # same voicing everywhere


def load_frame(tr: PitchTracker, x: np.ndarray) -> None:
    fe = tr.front
    fe.frame[:] = x
    fe.csum[0] = 0.0
    fe.csum[1:] = np.cumsum(x.astype(np.float64) ** 2)


def test_difference_function_matches_its_definition():
    """Direct (fixed window and lag-centred) and FFT forms against YIN's sum of squares."""
    tr = PitchTracker()
    lay = tr.layout
    rng = np.random.default_rng(5)
    t = np.arange(lay.frame) / lay.rate_int
    x = np.sin(2 * np.pi * 196.0 * t) + 0.4 * np.sin(2 * np.pi * 392.0 * t + 1)
    x = x + 0.1 * rng.standard_normal(lay.frame)
    load_frame(tr, x)
    w = lay.window
    for centred in (False, True):
        ref = np.zeros(lay.tau_max + 2)
        for tau in range(1, lay.tau_max + 2):
            a = (lay.frame - w - tau) // 2 if centred else 0
            ref[tau] = np.sum((x[a:a + w] - x[a + tau:a + tau + w]) ** 2)
        difference_direct(tr.front, centred)
        np.testing.assert_allclose(tr.front.diff, ref, rtol=1e-9, atol=1e-9 * ref.max())
        if not centred:
            difference_fft(tr.front)
            np.testing.assert_allclose(tr.front.diff, ref, rtol=1e-9, atol=1e-9 * ref.max())
        cumulative_mean_normalised(tr.front)
        cm = ref[1:] * np.arange(1, lay.tau_max + 2) / np.cumsum(ref[1:])
        np.testing.assert_allclose(tr.front.cmnd[1:], cm, rtol=1e-9)


def pyin_rule(cm: np.ndarray, tau_min: int, tau_max: int, beta_probs: np.ndarray,
              no_trough: float) -> dict[int, float]:
    """pYIN's threshold rule written out: per threshold, the first trough below it takes the
    threshold's prior; with none below, the global minimum takes no_trough of it."""
    n = beta_probs.shape[0]
    troughs = [t for t in range(tau_min, tau_max + 1) if cm[t] < cm[t - 1] and
               cm[t] <= cm[t + 1]]
    probs: dict[int, float] = {}
    if not troughs:
        return probs
    gmin = min(troughs, key=lambda t: cm[t])
    for i in range(1, n + 1):
        below = [t for t in troughs if cm[t] < i / n]
        tau, p = (below[0], beta_probs[i - 1]) if below else (gmin, no_trough * beta_probs[i - 1])
        probs[tau] = probs.get(tau, 0.0) + p
    return probs


def test_candidates_follow_the_pyin_threshold_rule():
    tr = PitchTracker()
    lay = tr.layout
    rng = np.random.default_rng(9)
    t = np.arange(lay.frame) / lay.rate_int
    beta_probs = threshold_prior(100, 2.0, 18.0)
    for f, noise in ((110.0, 0.3), (523.25, 1.0), (1318.5, 0.05), (61.7, 0.6)):
        x = sum(np.sin(2 * np.pi * k * f * t + k) / k for k in range(1, 5))
        load_frame(tr, x + noise * rng.standard_normal(lay.frame))
        difference_direct(tr.front, True)
        cumulative_mean_normalised(tr.front)
        candidates(tr.front, tr.hmm, 0)
        cm = tr.front.cmnd
        ref = pyin_rule(cm, lay.tau_min, lay.tau_max, beta_probs, CFG.no_trough_prob)
        n = tr.hmm.cand_n[0]
        ours = {}
        for c in range(n):
            f_c = tr.hmm.cand_f[0, c]
            ours[round(lay.rate_int / f_c)] = tr.hmm.cand_p[0, c]  # |shift| <= 0.5
        # masses below 1e-12 are rounding (1 - 1 of the prior's cumulative sums)
        ours = {k: v for k, v in ours.items() if v > 1e-12}
        ref = {k: v for k, v in ref.items() if v > 1e-12}
        assert ours.keys() == ref.keys(), (f, ours, ref)
        for k in ref:
            assert ours[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12)
        assert tr.hmm.voiced_p[0] == pytest.approx(min(1.0, sum(ref.values())), rel=1e-9)


# ----------------------------------------------------------------------------- accuracy

@pytest.fixture(scope="module")
def clips():
    return evaluation_set(seconds=1.25, seed=1)


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def test_accuracy_against_truth_and_librosa_pyin(clips):
    """GM flute, violin, clarinet, trumpet, voice oohs, bass and synthetic vibrato/glide clips
    (10 s in all), same fmin/fmax/frame/hop for librosa.pyin (at 48 kHz) and for us."""
    ours, ref = [], []
    for clip in clips:
        tr = track(clip.audio, CFG)
        ours.append(score(clip.truth_at(tr.times), tr.f0))
        f0, vflag, _ = librosa.pyin(clip.audio, sr=clip.rate, fmin=CFG.fmin, fmax=CFG.fmax,
                                    frame_length=CFG.frame_length, hop_length=CFG.hop_length)
        times = librosa.times_like(f0, sr=clip.rate, hop_length=CFG.hop_length)
        ref.append(score(clip.truth_at(times), np.where(vflag, f0, 0.0)))
    o, r = mean_scores(ours), mean_scores(ref)
    print(f"\nours {o}\npyin {r}")
    assert o["raw_pitch"] >= 0.9
    assert o["raw_pitch"] >= r["raw_pitch"] - 0.02
    assert o["voicing_recall"] >= r["voicing_recall"] - 0.02
    assert o["voicing_false_alarm"] <= r["voicing_false_alarm"]
    assert o["overall"] >= r["overall"]
    for clip, row in zip(clips, ours, strict=True):
        assert row["raw_pitch"] >= 0.8, (clip.name, row)


def test_tuner_cents_beat_pyin_bins():
    """Steady detuned tones from E1 to B6: our cents (refined at 48 kHz) are within 0.5 cent;
    librosa.pyin's f0 are 10-cent bin centres: on the same tones it is several times worse."""
    ours, ref = [], []
    for note, detune in ((28, 13.0), (45, -27.0), (69, 4.0), (81, -41.0), (88, 22.0),
                         (95, -8.0)):
        f = 440.0 * 2 ** ((note - 69 + detune / 100) / 12)
        x = harmonic_tone(f, 0.6)
        tr = track(x, CFG)
        mid = (tr.times > 0.1) & (tr.times < 0.5)
        assert tr.voiced[mid].all()
        assert (tr.midi[mid] == note).all(), (note, tr.midi[mid])
        np.testing.assert_allclose(tr.f0[mid], 440.0 * 2 ** ((tr.midi[mid] - 69 +
                                                               tr.cents[mid] / 100) / 12))
        err = np.abs(tr.cents[mid] - detune)
        assert np.max(err) < 0.5, (note, detune, np.max(err))
        ours.append(np.median(err))
        if note in (45, 69, 88):
            f0, _, _ = librosa.pyin(x, sr=RATE, fmin=CFG.fmin, fmax=CFG.fmax,
                                    frame_length=CFG.frame_length, hop_length=CFG.hop_length)
            lt = librosa.times_like(f0, sr=RATE, hop_length=CFG.hop_length)
            ref.append(np.median(np.abs(1200 * np.log2(f0[(lt > 0.1) & (lt < 0.5)] / f))))
    print(f"\nmedian |cents error|: ours {np.round(ours, 3)}, pyin {np.round(ref, 3)}")
    assert np.mean(ours) * 4 < np.mean(ref)
    assert [note_name(m) for m in (69, 61, 28, 60, -1)] == ["A4", "C#4", "E1", "C4", ""]


def test_pitch_step_is_located_at_the_frame_centre():
    """220 -> 233 Hz (a semitone, inside the HMM's per-frame band) at 0.5 s: the change shows
    within a hop of its time (frames are centred; lag-centred windows have no lag-dependent
    time offset)."""
    n = int(RATE)
    f2 = 220.0 * 2 ** (1 / 12)
    f = np.where(np.arange(n) < RATE // 2, 220.0, f2)
    tr = track(harmonic_tone(f, 1.0), CFG)
    hop_s = CFG.hop_length / RATE
    first_high = tr.times[np.argmax(tr.f0 > math.sqrt(220.0 * f2))]
    assert abs(first_high - 0.5) <= hop_s


# ----------------------------------------------------------------------------- streaming

def test_silence_and_noise_are_unvoiced():
    rng = np.random.default_rng(11)
    n = RATE
    white = rng.standard_normal(n)
    pink = scipy.signal.lfilter([0.049922035, -0.095993537, 0.050612699, -0.004408786],
                                [1, -2.494956002, 2.017265875, -0.522189400], white)
    brown = scipy.signal.lfilter([1.0], [1.0, -0.995], white)
    for name, x in (("silence", np.zeros(n)), ("white -20 dBFS", 0.1 * white),
                    ("white -50 dBFS", 0.00316 * white),
                    ("pink", 0.3 * pink / pink.std()), ("brown", 0.2 * brown / brown.std())):
        tr = track(x.astype(np.float32), CFG)
        assert tr.voiced.mean() <= 0.02, (name, tr.voiced.mean())
        assert (tr.f0[~tr.voiced] == 0).all() and (tr.midi[~tr.voiced] == -1).all()


def test_block_size_independence(clips):
    """128-frame blocks, odd sizes and one call give the same frames, bit for bit."""
    x = np.concatenate([clips[4].audio, clips[6].audio])
    ref = track(x, CFG)
    for sizes in ([128], [1, 7, 333, 2048, 129, 5000]):
        got = stream(PitchTracker(CFG, max_block=8192), x, sizes)
        assert np.array_equal(got["index"], np.arange(ref.f0.shape[0]))
        np.testing.assert_array_equal(got["f0"], ref.f0)
        np.testing.assert_array_equal(got["voiced"].astype(bool), ref.voiced)
        np.testing.assert_array_equal(got["voiced_prob"], ref.voiced_prob)
        np.testing.assert_array_equal(got["confidence"], ref.confidence)
        np.testing.assert_array_equal(got["cents"], ref.cents)
        np.testing.assert_array_equal(got["midi"], ref.midi)


def test_latency_is_as_stated_to_the_sample():
    """Sample by sample: frame u comes out with input sample u * hop + latency_samples."""
    tr = PitchTracker(CFG, max_block=1)
    x = harmonic_tone(330.0, 0.25)
    lat = tr.layout.latency_samples
    assert lat == 3 * (1024 // 2 - 1) + (decimator_taps(3).shape[0] - 1) // 2 + 4 * 384
    seen = 0
    for i in range(x.shape[0]):
        n = tr.process(x[i:i + 1])
        for k in range(n):
            u = int(tr.index[k])
            assert u == seen
            assert i == u * CFG.hop_length + lat, (u, i)
            seen += 1
    assert seen == (x.shape[0] - 1 - lat) // CFG.hop_length + 1
    assert tr.latency_seconds == pytest.approx(lat / RATE)


def test_nan_and_inf_blocks_are_counted_and_forgotten():
    x = harmonic_tone(261.63, 2.0)
    clean = stream(PitchTracker(CFG, max_block=128), x, [128])
    bad = x.copy()
    bad[200 * 128 + 5] = np.nan
    bad[400 * 128 + 100:400 * 128 + 110] = np.inf
    bad[500 * 128 + 1] = -np.inf
    tr = PitchTracker(CFG, max_block=128)
    got = stream(tr, bad, [128])
    assert tr.nan_blocks == 3
    assert tr.hmm_resets == 0
    for key in ("f0", "voiced_prob", "confidence", "cents"):
        assert np.isfinite(got[key]).all()
    # once a frame and the lookahead have passed the last bad block, the output is the clean one
    settle = (500 * 128 + 128 + CFG.frame_length + tr.layout.latency_samples) // CFG.hop_length
    np.testing.assert_allclose(got["f0"][settle:], clean["f0"][settle:], rtol=0, atol=1e-9)
    assert (got["voiced"][settle:] == 1).all()
    # before the first bad block nothing changed
    first = (200 * 128 - CFG.frame_length) // CFG.hop_length
    np.testing.assert_array_equal(got["f0"][:first], clean["f0"][:first])


def test_state_is_preallocated_and_reset_restarts():
    tr = PitchTracker(CFG, max_block=128)
    tr.warm()
    x = harmonic_tone(440.0, 0.5)
    a = stream(tr, x, [128])
    tr.reset()
    b = stream(tr, x, [128])
    np.testing.assert_array_equal(a["f0"], b["f0"])
    assert tr.front.cnt[C_NIN] > 0
    with pytest.raises(ValueError, match="max_block=128"):
        tr.process(np.zeros(129, dtype=np.float32))
    with pytest.raises(ValueError, match="1-D"):
        tr.process(np.zeros((128, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="contiguous: False"):
        tr.process(np.zeros((128, 2), dtype=np.float32)[:, 0])
    with pytest.raises(ValueError, match="int16"):
        tr.process(np.zeros(128, dtype=np.int16))


@numba.njit(nogil=True)
def feed_blocks(x, fe, hm, out_f, out_i, block):
    """Blocks fed from numba code: no argument unboxing per block."""
    total = 0
    for start in range(0, x.shape[0] - block + 1, block):
        total += track_block(x[start:start + block], fe, hm, out_f, out_i)
    return total


def test_kernel_allocates_nothing_per_block():
    """numba's runtime allocation counters: feeding 10 or 400 blocks from numba code costs the
    same allocations (the argument unboxing of the one call), i.e. none per block."""
    x = harmonic_tone(330.0, 1.2)
    counts = []
    for blocks in (10, 400):
        tr = PitchTracker(CFG, max_block=128)
        tr.warm()
        feed_blocks(x[:128], tr.front, tr.hmm, tr.out_f, tr.out_i, 128)  # compile
        _nrt_python.memsys_enable_stats()
        try:
            before = rtsys.get_allocation_stats()
            feed_blocks(x[:blocks * 128], tr.front, tr.hmm, tr.out_f, tr.out_i, 128)
            after = rtsys.get_allocation_stats()
        finally:
            _nrt_python.memsys_disable_stats()
        assert tr.front.cnt[C_NIN] == blocks * 128 + 128
        counts.append((after.alloc - before.alloc, after.mi_alloc - before.mi_alloc))
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("kwargs, words", [
    ({"fmin": 20.0}, "too short for fmin 20.0"),
    ({"fmax": 6000.0}, "fmax 6000.0"),
    ({"frame_length": 3071}, "frame_length 3071"),
    ({"hop_length": 256}, "hop_length 256"),
    ({"decimation": 7}, "decimation 7"),
    ({"method": "fast"}, "method 'fast'"),
    ({"a4": 500.0}, "a4 500.0"),
    ({"beta": (0.5, 2.0)}, "beta prior"),
])
def test_bad_configs_are_refused_with_the_value(kwargs, words):
    with pytest.raises(ValueError, match=words):
        PitchTracker(PitchConfig(**kwargs))
    layout(PitchConfig())  # the default is valid
