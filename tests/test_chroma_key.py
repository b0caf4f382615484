"""Chroma front end (dsp/chroma.py), tuning (dsp/tuning.py) and key estimation
(dsp/key_estimate.py).

References in the same run: numpy's FFT, the decimator's own frequency response, numpy-
synthesised harmonic tones of known pitch and detuning (librosa.estimate_tuning beside ours),
FluidSynth renderings of known chords, generated songs of known key and chorales with
music21's analysed key.
"""

from __future__ import annotations

import math

import mir_eval
import numpy as np
import pretty_midi
import pytest
from echoel.dsp.chord_vocabulary import PITCH_NAMES
from echoel.dsp.chroma import (
    ChromaConfig,
    ChromaState,
    chroma_offline,
    decimator_taps,
    fft_tables,
    rfft_magnitude,
)
from echoel.dsp.key_estimate import KEY_LABELS, KeyTracker, estimate_key
from echoel.dsp.tuning import new_histogram, tuning_estimate, tuning_vote

from bench.evalset.chord_set import small_set
from bench.evalset.render import render

RATE = 48000
BLOCK = 128


def tones(midi: list[float], seconds: float = 2.0, cents: float = 0.0, amp: float = 0.1,
          partials: int = 10, rate: int = RATE) -> np.ndarray:
    """Stereo float32 sum of harmonic tones (partial h at amplitude 0.6^(h-1)), detuned by
    `cents` from A4 = 440 Hz."""
    t = np.arange(int(seconds * rate)) / rate
    y = np.zeros_like(t)
    for m in midi:
        f0 = 440.0 * 2.0 ** ((m - 69) / 12.0 + cents / 1200.0)
        for h in range(1, partials + 1):
            if h * f0 < rate / 2.5:
                y += amp * 0.6 ** (h - 1) * np.sin(2 * np.pi * h * f0 * t + h)
    return np.repeat(y[:, None], 2, axis=1).astype(np.float32)


def stream(st: ChromaState, audio: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Chroma frames of `audio` fed block by block; returns [frames, 24] (chroma, bass)."""
    out = []
    for s in range(0, audio.shape[0] - block + 1, block):
        n = st.process(np.ascontiguousarray(audio[s:s + block]))
        out.append(np.hstack([st.chroma[:n], st.bass[:n]]))
    return np.vstack(out)


def top_classes(chroma: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(chroma)[-k:].tolist())


# ----------------------------------------------------------------------------- building blocks

def test_real_fft_matches_numpy():
    rng = np.random.default_rng(1)
    for n in (256, 2048, 4096):
        x = rng.standard_normal(n)
        re, im, mag = np.zeros(n // 2), np.zeros(n // 2), np.zeros(n // 2 + 1)
        rfft_magnitude(x, re, im, *fft_tables(n), mag)
        np.testing.assert_allclose(mag, np.abs(np.fft.rfft(x)), atol=1e-9 * n)


def test_decimator_response():
    """Pass band flat to 0.4 of the output rate, >= 80 dB down where it would alias into it."""
    for factor in (4, 3, 2):
        h = decimator_taps(factor)
        n = 1 << 16
        resp = np.abs(np.fft.rfft(h, n))
        f = np.fft.rfftfreq(n)  # cycles per input sample
        out_rate = 1.0 / factor
        passband = resp[f <= 0.4 * out_rate]
        stop = resp[f >= 0.6 * out_rate]
        assert 20 * np.log10(passband.max() / passband.min()) < 0.1, factor
        assert 20 * np.log10(stop.max()) < -79.0, factor


def test_tuning_histogram_wraps_and_finds_the_mode():
    hist = new_histogram()
    for c, w in ((48.0, 1.0), (-49.0, 1.0), (49.5, 2.0), (10.0, 0.5), (-14.0, 0.4)):
        tuning_vote(hist, c, w)
    est = tuning_estimate(hist)
    assert abs(((est - 49.2) + 50) % 100 - 50) < 2.0  # the cluster across the wrap at +-50
    assert tuning_estimate(new_histogram()) == 0.0


# ----------------------------------------------------------------------------- chroma

@pytest.mark.parametrize(("notes", "expect"), [
    ([60, 64, 67], {0, 4, 7}),  # C major
    ([57, 60, 64], {9, 0, 4}),  # A minor
    ([62, 66, 69, 72], {2, 6, 9, 0}),  # D7
    ([54], {6}),  # F#3 alone
])
def test_chroma_of_synthesised_chords(notes, expect):
    frames = chroma_offline(tones(notes))
    mid = frames.chroma[frames.chroma.shape[0] // 2]
    assert top_classes(mid, len(expect)) == expect
    # harmonics of the notes (e.g. the 3rd partial's fifth) stay well below the chord tones
    others = np.delete(mid, sorted(expect))
    assert others.max() < 0.5 * min(mid[p] for p in expect)


def test_bass_chroma_follows_the_lowest_note():
    frames = chroma_offline(tones([40, 60, 67, 72]))  # E2 under C major: C/E
    mid = frames.bass[frames.bass.shape[0] // 2]
    assert int(np.argmax(mid)) == 4
    treble = frames.chroma[frames.chroma.shape[0] // 2]
    assert top_classes(treble, 3) == {0, 4, 7}


def test_chroma_of_rendered_piano_and_strings_chords():
    """FluidSynth (FluidR3_GM) renderings: the chord tones are the strongest pitch classes,
    as with librosa chroma_cqt on the same audio."""
    import librosa

    for program, notes, expect in ((0, [50, 57, 62, 66, 73], {2, 6, 9, 1}),  # D:maj7, piano
                                   (48, [45, 60, 64, 69], {9, 0, 4})):  # A:min, strings
        pm = pretty_midi.PrettyMIDI()
        inst = pretty_midi.Instrument(program=program)
        for m in notes:
            inst.notes.append(pretty_midi.Note(90, m, 0.0, 2.0))
        pm.instruments.append(inst)
        audio = render(pm)
        frames = chroma_offline(audio)
        sel = (frames.times > 0.3) & (frames.times < 1.7)
        ours = frames.chroma[sel].mean(axis=0)
        assert top_classes(ours, len(expect)) == expect
        ref = librosa.feature.chroma_cqt(y=audio.mean(axis=1), sr=RATE, hop_length=1024)
        assert top_classes(ref[:, 15:75].mean(axis=1), len(expect)) == expect


def test_block_size_does_not_change_the_result():
    audio = tones([55, 59, 62, 65], seconds=1.5) + tones([43], seconds=1.5)
    small = stream(ChromaState(max_frames=BLOCK), audio, BLOCK)
    big = stream(ChromaState(max_frames=48000), audio[: audio.shape[0] // 4800 * 4800], 4800)
    n = min(small.shape[0], big.shape[0])
    assert n > 50
    np.testing.assert_allclose(small[:n], big[:n], rtol=1e-9, atol=1e-12)


def test_frame_times_follow_the_signal():
    """A tone starting at 1.0 s shows up in the frame centred there (delay accounted for)."""
    audio = np.concatenate([np.zeros((RATE, 2), np.float32), tones([69], seconds=1.0)])
    frames = chroma_offline(audio)
    level = frames.chroma.sum(axis=1)
    onset = frames.times[np.argmax(level > 0.5 * level.max())]
    assert abs(onset - 1.0) < 0.1  # half the 171 ms window at most


# ----------------------------------------------------------------------------- tuning

@pytest.mark.parametrize("cents", [30.0, -20.0, 0.0])
def test_tuning_recovers_detuned_tones(cents):
    """Harmonic tones (a chord sequence) detuned by `cents`: estimate within 5 cents; librosa's
    estimate_tuning on the same audio is computed beside it."""
    import librosa

    audio = np.concatenate([tones(c, seconds=1.5, cents=cents)
                            for c in ([60, 64, 67], [57, 62, 65], [55, 59, 62, 65])])
    st = ChromaState(max_frames=BLOCK)
    stream(st, audio)
    ours = st.tuning_cents
    ref = 100.0 * librosa.estimate_tuning(y=audio.mean(axis=1), sr=RATE)
    assert abs(ours - cents) <= 5.0, (ours, ref)
    assert abs(ref - cents) <= 10.0  # the reference agrees (it resolves 1 cent bins)


def test_tuning_is_applied_to_the_chroma():
    """45 cents sharp is nearer the next semitone: without the tuning estimate the chroma of
    C major would be C# F G#."""
    frames = chroma_offline(tones([60, 64, 67], seconds=3.0, cents=45.0))
    assert abs(frames.tuning[-1] - 45.0) <= 5.0
    assert top_classes(frames.chroma[-20], 3) == {0, 4, 7}


# ----------------------------------------------------------------------------- bad input

def test_nan_block_is_counted_and_forgotten():
    audio = tones([60, 64, 67], seconds=2.0)
    clean = stream(ChromaState(max_frames=BLOCK), audio)
    dirty = audio.copy()
    dirty[24000:24000 + BLOCK // 2, 0] = np.nan
    dirty[30000, 1] = np.inf
    st = ChromaState(max_frames=BLOCK)
    out = stream(st, dirty)
    assert st.bad_blocks == 2
    assert np.all(np.isfinite(out))
    # once the frames no longer reach back to the bad blocks, the output is the clean one
    # (but for the tuning histogram, which kept its votes and missed those of the gap)
    # frame t spans input frames (t + 1) x 1024 - 8192 .. (t + 1) x 1024; the bad block ends
    # at 30080
    first_clean = math.ceil((30080 + 8192) / 1024) - 1
    scale = clean[first_clean:, :12].max(axis=1, keepdims=True)
    assert np.all(np.abs(out[first_clean:] - clean[first_clean:]) <= 0.05 * scale)
    assert np.abs(out[first_clean - 10:first_clean - 3] - clean[first_clean - 10:
                                                              first_clean - 3]).max() > 0.1


def test_a_block_longer_than_built_for_drops_frames_instead_of_writing_past_the_end():
    st = ChromaState(max_frames=BLOCK)
    assert st.chroma.shape[0] == 1
    n = st.process(tones([60], seconds=0.5))  # 24000 frames: 23 chroma frames made
    assert n == 1 and st.dropped_frames == st.frames - 1 > 20


def test_silence_gives_empty_chroma():
    st = ChromaState(max_frames=BLOCK)
    out = stream(st, np.zeros((RATE, 2), np.float32))
    assert out.shape[0] > 40
    assert np.all(out == 0.0)
    assert st.tuning_cents == 0.0


def test_wrong_configuration_and_shapes_raise_at_construction():
    with pytest.raises(ValueError, match="fft_size"):
        ChromaState(ChromaConfig(fft_size=3000))
    with pytest.raises(ValueError, match="rate"):
        ChromaState(ChromaConfig(rate=1000))
    with pytest.raises(ValueError, match="hop"):
        ChromaState(ChromaConfig(hop=0))
    with pytest.raises(ValueError, match="max_frames"):
        ChromaState(max_frames=0)
    st = ChromaState(ChromaConfig(channels=2), max_frames=BLOCK)
    with pytest.raises(ValueError, match="channels"):
        st.check_block(np.zeros((BLOCK, 1), np.float32))
    with pytest.raises(ValueError, match="frames"):
        st.check_block(np.zeros((BLOCK + 1, 2), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        st.check_block(np.zeros(BLOCK, np.float32))
    with pytest.raises(ValueError, match="12"):
        estimate_key(np.zeros((5, 11)))
    with pytest.raises(ValueError, match="window_seconds"):
        KeyTracker(0.02, window_seconds=0.1)


# ----------------------------------------------------------------------------- key

@pytest.fixture(scope="module")
def pieces():
    return small_set()


def test_key_of_generated_songs_and_chorales(pieces):
    """MIREX weighted key score against the drawn key (songs) and music21's analysed key
    (chorales)."""
    scores = []
    for p in pieces:
        frames = chroma_offline(p.audio)
        est = estimate_key(frames.chroma)
        assert est.key in KEY_LABELS and est.confidence > 0.0
        scores.append(mir_eval.key.weighted_score(p.key, est.key))
    assert np.mean(scores) >= 0.8, scores


def test_streaming_key_settles_on_the_offline_key(pieces):
    p = next(q for q in pieces if q.kind == "pop")
    cfg = ChromaConfig()
    st = ChromaState(cfg, max_frames=4096)
    tracker = KeyTracker(cfg.hop_seconds, window_seconds=60.0)
    assert tracker.key == ""
    all_frames = []
    for s in range(0, p.audio.shape[0] - 4096 + 1, 4096):
        n = st.process(p.audio[s:s + 4096])
        tracker.push(st.chroma, n)
        all_frames.append(st.chroma[:n].copy())
    offline = estimate_key(np.vstack(all_frames))
    assert tracker.key == offline.key
    assert math.isclose(tracker.confidence, offline.confidence, rel_tol=1e-9, abs_tol=1e-12)


def test_key_of_a_scale_and_a_flat_chroma():
    """A major scale's chroma with a heavy tonic triad is its key; a flat chroma has none."""
    for tonic in (0, 7, 10):
        c = np.zeros(12)
        for i, w in zip((0, 2, 4, 5, 7, 9, 11), (3, 1, 2, 1, 2.5, 1, 1), strict=True):
            c[(tonic + i) % 12] = w
        assert estimate_key(c).key == f"{PITCH_NAMES[tonic]} major"
    flat = estimate_key(np.ones((10, 12)))
    assert flat.key == "" and flat.confidence == 0.0
