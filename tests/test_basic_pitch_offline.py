"""Offline transcription (our windowing, stitching and note decoding on LiteRT) against
basic-pitch's own predict() output (tests/fixtures/basic_pitch, made by
bench/reference/basic_pitch_reference.py in basic-pitch's own environment) on the same audio.

"Equal" means: the same number of notes; sorted by (onset, pitch) each pair has the same MIDI
pitch, onset and offset times within one model frame (256 / 22050 s = 11.6 ms), amplitude
within 1e-4 and identical pitch-bend lists. (Measured: times are identical, amplitudes differ
by < 2e-7 because basic-pitch averages in float32.)
"""

from __future__ import annotations

import json
from pathlib import Path

import mir_eval
import numpy as np
import pytest
import scipy.signal
from echoel.daemon.litert_runner import LiteRTRunner
from echoel.daemon.model_fetch import fetch_into_store
from echoel.dsp.basic_pitch_frames import (
    HOP_SAMPLES,
    WINDOW_SAMPLES,
    ModelFrames,
    fill_window,
    frame_times,
    n_output_frames,
    n_windows,
    predict_frames,
)
from echoel.dsp.note_decoding import DecodeParams, min_note_frames, notes_from_frames
from echoel.dsp.streaming_transcriber import resample

from bench.evalset import transcription_set
from bench.reference.basic_pitch_reference import CLIP_SECONDS, audio_sha256, clip_audio

FIXTURES = Path(__file__).parent / "fixtures" / "basic_pitch"
FRAME_S = 256 / 22050


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> LiteRTRunner:
    """basic-pitch's model from a model store, checked against its manifest."""
    m = fetch_into_store(tmp_path_factory.mktemp("store"))
    return LiteRTRunner(m.model_path, m.manifest, num_threads=1)


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _f1(pm_or_gt, notes: list[tuple[float, float, int]], offsets: bool) -> float:
    iv, hz = pm_or_gt
    if not notes:
        return 0.0
    est_iv = np.array([[s, e] for s, e, _ in notes])
    est_hz = 440.0 * 2 ** ((np.array([p for _, _, p in notes]) - 69) / 12)
    return mir_eval.transcription.precision_recall_f1_overlap(
        iv, hz, est_iv, est_hz, onset_tolerance=0.05,
        offset_ratio=0.2 if offsets else None)[2]


@pytest.mark.parametrize("name", list(transcription_set.PIECES))
def test_offline_notes_equal_basic_pitch_predict(runner, name):
    fx = _fixture(name)
    audio = clip_audio(name)
    assert audio_sha256(audio) == fx["audio_sha256"], (
        f"the rendered clip {name} differs from the one the fixture was made from "
        f"(FluidSynth or soundfont changed?): regenerate with `{fx['command']}`")
    notes = notes_from_frames(predict_frames(audio, runner.run), DecodeParams())
    ours = sorted(notes, key=lambda n: (n.start_s, n.pitch))
    ref = fx["notes"]
    assert len(ours) == len(ref), f"{name}: {len(ours)} notes, basic-pitch {len(ref)}"
    for o, (s, e, pitch, amp, bends) in zip(ours, ref, strict=True):
        assert o.pitch == pitch
        assert abs(o.start_s - s) <= FRAME_S and abs(o.end_s - e) <= FRAME_S
        assert abs(o.amplitude - amp) <= 1e-4
        assert list(o.bends) == bends
    # and the accuracy against the MIDI ground truth is the same as basic-pitch's
    gt = transcription_set.ground_truth(transcription_set.piece(name, CLIP_SECONDS))
    f_ours = _f1(gt, [(n.start_s, n.end_s, n.pitch) for n in ours], False)
    f_ref = _f1(gt, [(s, e, p) for s, e, p, *_ in ref], False)
    assert f_ours == pytest.approx(f_ref, abs=1e-9)
    assert f_ours > 0.5  # the model does transcribe these clips


def test_windowing_matches_basic_pitch_rules():
    """Window count, start positions and frame count as basic-pitch's predict() computes."""
    n = 100_000
    audio = np.arange(n, dtype=np.float32)
    padded = np.concatenate([np.zeros(3840, np.float32), audio])
    starts = list(range(0, padded.shape[0], HOP_SAMPLES))
    assert n_windows(n) == len(starts)
    buf = np.empty((1, WINDOW_SAMPLES, 1), np.float32)
    for k, s in enumerate(starts):
        want = padded[s:s + WINDOW_SAMPLES]
        want = np.pad(want, (0, WINDOW_SAMPLES - want.shape[0]))
        fill_window(audio, k, buf)
        np.testing.assert_array_equal(buf[0, :, 0], want)
    assert n_output_frames(n) == int(np.floor(n * (86 / 22050)))
    # basic-pitch's frame times: librosa frames_to_time minus its per-172-frame correction
    t = frame_times(400)
    assert t[171] == pytest.approx(171 * 256 / 22050)
    assert t[172] == pytest.approx(172 * 256 / 22050 - ((256 / 22050) * (172 - 43844 / 256)
                                                        + 0.0018))
    assert min_note_frames() == 11


def test_resampler_matches_resample_poly():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(48000) * 0.2).astype(np.float32)
    for rate in (48000, 44100, 96000):
        xr = x if rate == 48000 else x[: rate // 2]
        ours = resample(xr, rate)
        ref = scipy.signal.resample_poly(xr.astype(np.float64), 22050, rate)
        assert ours.shape == ref.shape
        # the ends differ (resample_poly pads with zeros on both sides, so do we)
        assert np.max(np.abs(ours - ref)) < 1e-5, rate


def test_bad_input_is_refused_or_handled(runner):
    with pytest.raises(ValueError, match="audio is at 48000 Hz; the model takes 22050 Hz"):
        predict_frames(np.zeros(48000, np.float32), runner.run, rate=48000)
    with pytest.raises(ValueError, match="expected \\[samples\\]"):
        predict_frames(np.zeros((10, 4, 2), np.float32), runner.run)
    with pytest.raises(ValueError, match="dtype is int16"):
        predict_frames(np.zeros(22050, np.int16), runner.run)
    # silence: no notes (basic-pitch finds no positive frame difference: no onsets)
    assert notes_from_frames(predict_frames(np.zeros(3 * 22050, np.float32), runner.run)) == []
    # a clip with NaN/Inf samples: transcribed as if those samples were silent
    audio = clip_audio("flute_melody")
    ref = notes_from_frames(predict_frames(audio, runner.run))
    bad = audio.copy()
    bad[1000:1010] = np.nan
    bad[2000] = np.inf
    fixed = audio.copy()
    fixed[1000:1010] = 0
    fixed[2000] = 0
    assert notes_from_frames(predict_frames(bad, runner.run)) == \
        notes_from_frames(predict_frames(fixed, runner.run))
    # hard clipping (x8, clipped to +-1): still the same melody, found with the same onsets
    clipped = np.clip(audio * 8, -1, 1)
    got = notes_from_frames(predict_frames(clipped, runner.run))
    f = _f1((np.array([[n.start_s, n.end_s] for n in ref]),
             440.0 * 2 ** ((np.array([n.pitch for n in ref]) - 69) / 12)),
            [(n.start_s, n.end_s, n.pitch) for n in got], False)
    assert f > 0.6
    # model frames with NaN are refused with a clear message
    mf = predict_frames(audio[:22050], runner.run)
    mf.note[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        notes_from_frames(mf)
    with pytest.raises(ValueError, match=r"onset_thresh is 1\.5"):
        DecodeParams(onset_thresh=1.5)
    with pytest.raises(ValueError, match=r"model output 'note' is \[1, 10, 88\]"):
        predict_frames(audio[:22050], lambda w: {"note": np.zeros((1, 10, 88)),
                                                 "onset": np.zeros((1, 10, 88)),
                                                 "contour": np.zeros((1, 10, 264))})


@pytest.mark.parametrize("name", list(transcription_set.PIECES))
def test_offline_at_48k_equals_basic_pitch_on_the_same_48k_audio(runner, name):
    """The 48 kHz rendering: basic-pitch resamples it with librosa (soxr_hq), we with our
    polyphase resampler; the notes are still equal (same pitches, onsets and offsets within
    one frame), amplitudes within 0.01 (the resamplers differ slightly)."""
    fx = _fixture(name)
    audio = clip_audio(name, 48000)
    assert audio_sha256(audio) == fx["audio_48k_sha256"], (
        f"the 48 kHz rendering of {name} differs from the fixture's: regenerate with "
        f"`{fx['command']}`")
    ours = sorted(notes_from_frames(predict_frames(resample(audio, 48000), runner.run)),
                  key=lambda n: (n.start_s, n.pitch))
    ref = fx["notes_48k"]
    assert len(ours) == len(ref)
    for o, (s, e, pitch, amp, _) in zip(ours, ref, strict=True):
        assert o.pitch == pitch
        assert abs(o.start_s - s) <= FRAME_S and abs(o.end_s - e) <= FRAME_S
        assert abs(o.amplitude - amp) <= 0.01


def test_model_frames_shape_is_checked():
    with pytest.raises(ValueError, match=r"expected \[frames, 88\]"):
        notes_from_frames(ModelFrames(np.zeros((5, 80), np.float32),
                                      np.zeros((5, 80), np.float32),
                                      np.zeros((5, 264), np.float32)))
