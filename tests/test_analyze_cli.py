"""`echoel analyze FILE` end to end (daemon/analyze_cli.py, daemon/file_analysis.py), through
echoel.daemon.cli.main on files written here with soundfile.

References in the same run: the MIDI a piece is rendered from (its chords and key), the
published level of a 1 kHz sine (EBU Tech 3341 case 1: -23 dBFS stereo -> -23 LUFS; BS.1770:
mono reads 3.01 dB lower), the frequency a tone is synthesised at, dsp.loudness.measure on the
very data of each file, and the input itself for the normalised output (gain and alignment).
"""

from __future__ import annotations

import json
import math

import mir_eval
import numpy as np
import pretty_midi
import pytest
import soundfile as sf
from echoel.daemon.cli import main
from echoel.dsp.loudness import measure

from bench.evalset.render import render

BPM = 120.0
BAR = 4 * 60.0 / BPM
# (Harte label, piano voicing, bass note, melody of chord tones one a beat)
PROGRESSION = [
    ("C:maj", (60, 64, 67), 48, (72, 76, 79, 76)),
    ("G:maj", (59, 62, 67), 43, (74, 71, 74, 79)),
    ("A:min", (60, 64, 69), 45, (76, 72, 69, 72)),
    ("F:maj", (60, 65, 69), 41, (77, 72, 69, 72)),
]
REPEATS = 2
CLICKS_S = (2.1, 7.3, 11.9)


def song(kick: bool = False) -> tuple[pretty_midi.PrettyMIDI, list[tuple[float, float, str]]]:
    """C G Am F twice: piano, bass, a flute melody (and a kick drum); its chord segments."""
    pm = pretty_midi.PrettyMIDI(initial_tempo=BPM)
    piano, bass = pretty_midi.Instrument(program=0), pretty_midi.Instrument(program=33)
    lead = pretty_midi.Instrument(program=73)
    drums = pretty_midi.Instrument(program=0, is_drum=True)
    beat = BAR / 4
    truth, t = [], 0.0
    for _ in range(REPEATS):
        for label, voicing, root, melody in PROGRESSION:
            for k in range(4):
                tb = t + k * beat
                piano.notes += [pretty_midi.Note(80, p, tb, tb + 0.95 * beat) for p in voicing]
                lead.notes.append(pretty_midi.Note(95, melody[k], tb, tb + 0.9 * beat))
                if kick:
                    drums.notes.append(pretty_midi.Note(127, 36, tb, tb + 0.2))
            bass.notes.append(pretty_midi.Note(90, root, t, t + 0.98 * BAR))
            truth.append((t, t + BAR, label))
            t += BAR
    pm.instruments += [piano, bass, lead] + ([drums] if kick else [])
    return pm, truth


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """`echoel analyze ...`: (exit status, stdout, stderr)."""
    rc = main(["analyze", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_json(capsys, *argv: str) -> dict:
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def measured(path) -> dict:
    """dsp.loudness.measure on the file's samples (read here, as float64)."""
    x, rate = sf.read(str(path), dtype="float64", always_2d=True)
    return measure(x, rate).to_dict()


def wcsr(segments, truth) -> float:
    """Weighted chord symbol recall (mir_eval, majmin) of segments against the MIDI's chords,
    over the chords' span."""
    ref_iv = np.array([[s, e] for s, e, _ in truth])
    est_iv = np.array([[s, e] for s, e, _ in segments])
    est_iv, est_lab = mir_eval.util.adjust_intervals(
        est_iv, [lab for _, _, lab in segments], ref_iv.min(), ref_iv.max(),
        mir_eval.chord.NO_CHORD, mir_eval.chord.NO_CHORD)
    iv, ref_lab, est_lab = mir_eval.util.merge_labeled_intervals(
        ref_iv, [lab for _, _, lab in truth], est_iv, est_lab)
    durations = mir_eval.util.intervals_to_durations(iv)
    return float(mir_eval.chord.weighted_accuracy(
        mir_eval.chord.majmin(ref_lab, est_lab), durations))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The song rendered (FluidSynth, cached) and written as 48 kHz 16-bit WAV and 44.1 kHz
    24-bit FLAC; the drum version loud (float WAV with overs) and quiet with a few clicks."""
    d = tmp_path_factory.mktemp("analyze")
    pm, truth = song()
    out = {"truth": truth}
    a48 = render(pm, rate=48000)
    a44 = render(pm, rate=44100)
    out["wav48"] = d / "song.wav"
    sf.write(out["wav48"], a48, 48000, subtype="PCM_16")
    out["flac44"] = d / "song.flac"
    sf.write(out["flac44"], a44, 44100, subtype="PCM_24")
    drums = render(song(kick=True)[0], rate=48000)
    out["loud"] = d / "loud.wav"
    sf.write(out["loud"], drums * 5.0, 48000, subtype="FLOAT")  # about +6 dBTP, -7 LUFS
    quiet = render(song(kick=True)[0], rate=44100) * 0.05  # about -47 LUFS
    peak = np.abs(quiet).max()
    click = np.hanning(64) * np.sin(2 * np.pi * 3000.0 * np.arange(64) / 44100)
    for at in CLICKS_S:  # clicks 6 dB over the music's peak: only they need limiting
        i = round(at * 44100)
        quiet[i:i + 64] += 2.0 * peak * click[:, None]
    out["quiet"] = d / "quiet.flac"
    sf.write(out["quiet"], quiet, 44100, subtype="PCM_24")
    out["dir"] = d
    return out


# ----------------------------------------------------------------------------- the report

@pytest.mark.parametrize("name", ["wav48", "flac44"])
def test_music_report_matches_the_midi_and_the_meter(files, capsys, name):
    path = files[name]
    rep = run_json(capsys, str(path))
    assert rep["file"] == str(path)
    assert rep["format"] == ("WAV" if name == "wav48" else "FLAC")
    assert rep["subtype"] == ("PCM_16" if name == "wav48" else "PCM_24")
    # loudness: exactly dsp.loudness.measure on the same samples
    assert rep["loudness"] == measured(path)  # the same samples, the same kernel: bit for bit
    # key and chords against the MIDI
    assert rep["key"]["key"] == "C major"
    assert rep["key"]["confidence"] > 0.02
    assert rep["key"]["candidates"][0]["key"] == "C major"
    segs = rep["chords"]["segments"]
    score = wcsr(segs, files["truth"])
    assert score >= 0.85, (score, segs)
    summ = rep["chords"]["summary"]
    assert {h["label"] for h in summ["most_held"][:4]} == {"C:maj", "G:maj", "A:min", "F:maj"}
    # pitch: a summary and a track of 10 points a second over the whole file
    p = rep["pitch"]
    assert 0.0 <= p["voiced_share"] <= 1.0
    dur = rep["input"]["duration_s"]
    assert len(p["track"]["times_s"]) == len(p["track"]["f0_hz"])
    assert abs(len(p["track"]["times_s"]) - 10 * dur) <= 2
    # the human report: a few lines with the same figures
    rc, out, _ = run(capsys, str(path))
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) <= 10
    lo = rep["loudness"]
    assert f"integrated {lo['integrated']:.1f} LUFS" in out
    assert f"LRA {lo['lra']:.1f} LU" in out
    assert f"true peak {lo['true_peak_max_dbtp']:.1f} dBTP" in out
    assert f"max momentary {lo['max_momentary']:.1f} LUFS" in out
    assert f"max short-term {lo['max_short_term']:.1f} LUFS" in out
    assert f"duration {dur:.2f} s" in out
    assert "key: C major (confidence" in out
    chords = next(ln for ln in lines if ln.startswith("chords:"))
    first = [c.split()[0] for c in chords.removeprefix("chords: ").split(" | ")[:4]]
    assert first == ["C", "G", "Am", "F"], chords
    assert "pitch (mono mix): voiced" in out


def tone(rate: int, seconds: float, freq: float, peak_dbfs: float, harmonics: int = 1
         ) -> np.ndarray:
    """A tone whose partials fall as 1/h, scaled to the given sample peak."""
    t = np.arange(round(seconds * rate)) / rate
    y = sum(np.sin(2 * np.pi * h * freq * t) / h for h in range(1, harmonics + 1))
    return y / np.abs(y).max() * 10.0 ** (peak_dbfs / 20.0)


def test_sine_levels_and_pitch_stereo_and_mono(tmp_path, capsys):
    # EBU Tech 3341 case 1: 1 kHz at -23 dBFS in both channels reads -23 LUFS; mono 3 dB less
    s = tone(48000, 6.0, 1000.0, -23.0)
    stereo = tmp_path / "sine.wav"
    sf.write(stereo, np.stack([s, s], axis=1), 48000, subtype="FLOAT")
    rep = run_json(capsys, str(stereo))
    lo = rep["loudness"]
    assert lo["integrated"] == pytest.approx(-23.0, abs=0.1)
    assert lo["max_momentary"] == pytest.approx(-23.0, abs=0.1)
    assert lo["true_peak_max_dbtp"] == pytest.approx(-23.0, abs=0.1)
    assert rep["input"]["layout"] == "stereo (L R)"
    assert rep["pitch"]["median_f0_hz"] == pytest.approx(1000.0, abs=1.0)
    assert rep["pitch"]["median_note"] == "B5"  # 1000 Hz is B5 - 14 cents
    assert rep["pitch"]["median_cents"] == pytest.approx(
        1200 * math.log2(1000.0 / 987.7666), abs=2.0)
    mono = tmp_path / "sine-mono.flac"
    sf.write(mono, tone(44100, 6.0, 1000.0, -20.0), 44100, subtype="PCM_24")
    rep = run_json(capsys, str(mono), "--only", "loudness")
    assert rep["loudness"]["integrated"] == pytest.approx(-20.0 - 3.01, abs=0.1)
    assert rep["input"]["layout"] == "mono"
    assert set(rep) == {"file", "format", "subtype", "input", "loudness"}
    # 5.1 (L R C LFE Ls Rs): weights 1, 1, 1, 0, 1.41, 1.41; a loud LFE does not count
    s = tone(48000, 3.0, 1000.0, -23.0)
    surround = tmp_path / "sine-51.flac"
    sf.write(surround, np.stack([s, s, s, 10 * s, s, s], axis=1), 48000, subtype="PCM_24")
    rep = run_json(capsys, str(surround), "--only", "loudness")
    expected = -23.0 - 3.01 + 10 * math.log10(3 + 2 * 1.41)
    assert rep["loudness"]["integrated"] == pytest.approx(expected, abs=0.1)
    assert rep["input"]["layout"] == "5.1 (L R C LFE Ls Rs)"


def test_pitch_of_a_harmonic_tone_and_its_track(tmp_path, capsys):
    f0 = 220.0  # A3
    x = tone(44100, 3.0, f0, -12.0, harmonics=6)
    path = tmp_path / "a3.flac"
    sf.write(path, np.stack([x, x], axis=1), 44100, subtype="PCM_16")
    rep = run_json(capsys, str(path), "--only", "pitch")
    p = rep["pitch"]
    assert set(rep) == {"file", "format", "subtype", "input", "pitch"}
    assert p["voiced_share"] > 0.9
    assert p["median_f0_hz"] == pytest.approx(f0, abs=0.5)
    assert p["median_note"] == "A3" and abs(p["median_cents"]) < 5
    assert p["range_notes"] == ["A3", "A3"]
    track = [f for f in p["track"]["f0_hz"][1:-1] if f is not None]
    assert len(track) >= 0.9 * (len(p["track"]["f0_hz"]) - 2)
    assert np.allclose(track, f0, atol=1.0)
    rc, out, _ = run(capsys, str(path), "--only", "pitch")
    assert rc == 0 and "median 220.0 Hz (A3 +0 cents)" in out
    assert "loudness" not in out and "key" not in out


# ----------------------------------------------------------------------------- normalising

def _check_output(src, out, rep, target, ceiling=-1.0):
    """OUT: same rate, length, channels and sample format as the input; its re-measured
    loudness and true peak as reported and as promised."""
    i_in, i_out = sf.info(str(src)), sf.info(str(out))
    assert (i_out.samplerate, i_out.frames, i_out.channels) == (
        i_in.samplerate, i_in.frames, i_in.channels)
    assert (i_out.format, i_out.subtype) == (i_in.format, i_in.subtype)
    m = measured(out)
    n = rep["normalize"]
    assert n["achieved_lufs"] == pytest.approx(m["integrated"], abs=1e-9)
    assert n["achieved_true_peak_dbtp"] == pytest.approx(m["true_peak_max_dbtp"], abs=1e-9)
    assert m["true_peak_max_dbtp"] <= ceiling + 0.1
    assert abs(m["integrated"] - target) <= 0.5
    assert n["promise_kept"] and n["loudness_within_tolerance"] and n["true_peak_within_ceiling"]
    return m


@pytest.mark.parametrize("target", [-14.0, -23.0])
def test_normalize_loud_file_down(files, capsys, tmp_path, target):
    src = files["loud"]
    x, rate = sf.read(str(src), dtype="float64", always_2d=True)
    assert measure(x, rate).true_peak_max_dbtp > 3.0  # overs: a float file only
    out = tmp_path / "loud-out.wav"
    rep = run_json(capsys, str(src), "--normalize", str(target), "--ceiling", "-1",
                   "--out", str(out), "--only", "loudness")
    m = _check_output(src, out, rep, target)
    assert abs(m["integrated"] - target) <= 0.01
    assert rep["normalize"]["limiter"] is False
    # a plain gain: the output is the input times the gain, sample for sample (aligned)
    y, _ = sf.read(str(out), dtype="float64", always_2d=True)
    g = 10.0 ** (rep["normalize"]["drive_db"] / 20.0)
    np.testing.assert_allclose(y, (x * g).astype(np.float32), rtol=0, atol=1e-7)


@pytest.mark.parametrize("target", [-14.0, -23.0])
def test_normalize_quiet_file_up_with_the_limiter_where_needed(files, capsys, tmp_path, target):
    src = files["quiet"]
    x, rate = sf.read(str(src), dtype="float64", always_2d=True)
    out = tmp_path / "quiet-out.flac"
    rc, text, err = run(capsys, str(src), "--normalize", str(target), "--out", str(out))
    assert rc == 0, err
    assert f"(target {target:g})" in text and "(ceiling -1)" in text
    rep = run_json(capsys, str(src), "--normalize", str(target), "--out", str(out),
                   "--only", "key")
    m = _check_output(src, out, rep, target)
    n = rep["normalize"]
    assert f"integrated {m['integrated']:.1f} LUFS (target {target:g})" in text
    assert abs(m["integrated"] - target) <= 0.1
    plain_peak = measure(x, rate).true_peak_max_dbtp + (target - measure(x, rate).integrated)
    assert n["limiter"] is (plain_peak > -1.0)
    assert n["limiter"] is (target == -14.0)  # the clicks pass the ceiling at -14 only
    y, _ = sf.read(str(out), dtype="float64", always_2d=True)
    g = 10.0 ** (n["drive_db"] / 20.0)
    lsb = 2.0 ** -23
    if not n["limiter"]:
        np.testing.assert_allclose(y, x * g, rtol=0, atol=2 * lsb)
        return
    # limited: the clicks come down to the ceiling; away from them the output is the input
    # times the drive, sample for sample: the limiter's latency is compensated, same length
    assert n["limiter_max_reduction_db"] > 3.0 and n["limiter_latency_frames"] > 0
    assert n["limiter_time_share"] < 0.05
    assert n["input_true_peak_dbtp"] + n["drive_db"] > -1.0 + 3.0
    near = np.zeros(x.shape[0], dtype=bool)
    for at in CLICKS_S:  # the gain is back to exactly 1 some 22 release time constants later
        i = round(at * rate)
        near[i - rate // 20:i + round(1.3 * rate)] = True
    assert near.mean() < 0.3
    np.testing.assert_allclose(y[~near], x[~near] * g, rtol=0, atol=2 * lsb)


def test_normalize_reports_a_limiter_that_works_very_hard(tmp_path, capsys):
    # peaks 24 dB over the loudness everywhere (a click every 50 ms over a quiet tone): -14
    # LUFS under a -1 dBTP ceiling only by crushing every click
    rate = 48000
    x = tone(rate, 6.0, 220.0, -40.0)
    click = np.hanning(48) * np.sin(2 * np.pi * 2000.0 * np.arange(48) / rate)
    for i in range(0, x.shape[0] - 48, rate // 20):
        x[i:i + 48] += 0.5 * click
    src = tmp_path / "clicks.wav"
    sf.write(src, np.stack([x, x], axis=1), rate, subtype="PCM_24")
    out = tmp_path / "clicks-out.wav"
    rc, text, err = run(capsys, str(src), "--normalize", "-14", "--out", str(out),
                        "--only", "loudness")
    assert rc == 0, err
    m = measured(out)
    assert m["true_peak_max_dbtp"] <= -1.0 + 0.1
    assert m["integrated"] < -14.5
    assert "the limiter had to work very hard" in text
    assert f"integrated {m['integrated']:.1f} LUFS (target -14)" in text


# ----------------------------------------------------------------------------- bad inputs

def _refused(capsys, *argv: str) -> str:
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (rc, out, err)
    assert out == ""
    return err


def test_bad_files_are_refused_with_what_is_allowed(tmp_path, capsys):
    missing = tmp_path / "missing.wav"
    err = _refused(capsys, str(missing))
    assert str(missing) in err and "no such file" in err

    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    err = _refused(capsys, str(text))
    assert str(text) in err and "not a readable sound file" in err and "WAV" in err

    zero = tmp_path / "zero.wav"
    zero.write_bytes(b"")
    err = _refused(capsys, str(zero))
    assert str(zero) in err and "0 bytes" in err

    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 2)), 48000, subtype="PCM_16")
    err = _refused(capsys, str(empty))
    assert str(empty) in err and "no audio frames" in err and "need at least one" in err

    quad = tmp_path / "quad.wav"
    sf.write(quad, np.full((4800, 4), 0.1), 48000, subtype="PCM_16")
    err = _refused(capsys, str(quad))
    assert str(quad) in err and "4 channels" in err
    assert "allowed 1 (mono), 2 (stereo (L R)), 3 (L R C), 5" in err and "6 (5.1" in err
    rc, out, _ = run(capsys, str(quad), "--only", "pitch")  # no loudness: any channel count
    assert rc == 0 and "pitch (mono mix)" in out

    odd = tmp_path / "odd-rate.wav"
    sf.write(odd, np.zeros((4410, 2)), 44101, subtype="PCM_16")
    err = _refused(capsys, str(odd))
    assert str(odd) in err and "44101 Hz" in err and "allowed 8000..192000 Hz" in err

    nan = tmp_path / "nan.wav"
    x = tone(48000, 1.0, 440.0, -20.0)
    x[24000:24010] = np.nan
    sf.write(nan, np.stack([x, x], axis=1), 48000, subtype="FLOAT")
    err = _refused(capsys, str(nan))
    assert str(nan) in err and "20 non-finite samples" in err and "0.500 s" in err
    assert "allowed: finite samples only" in err


def test_bad_options_are_refused(files, tmp_path, capsys):
    src = str(files["wav48"])
    err = _refused(capsys, src, "--only", "loudness,tempo")
    assert "tempo" in err and "loudness, pitch, key, chords" in err
    err = _refused(capsys, src, "--normalize", "-14")
    assert "--out" in err
    err = _refused(capsys, src, "--out", str(tmp_path / "x.wav"))
    assert "without --normalize" in err
    err = _refused(capsys, src, "--normalize", "-14", "--ceiling", "1", "--out",
                   str(tmp_path / "x.wav"))
    assert "ceiling 1 dBTP" in err and "-30 to 0 dBTP" in err
    err = _refused(capsys, src, "--normalize", "5", "--out", str(tmp_path / "x.wav"))
    assert "--normalize 5 LUFS" in err and "-70 to 0 LUFS" in err
    err = _refused(capsys, src, "--normalize", "-14", "--out", str(tmp_path / "x.txt"))
    assert ".txt" in err and ".wav" in err and ".flac" in err
    err = _refused(capsys, src, "--normalize", "-14", "--out", src)
    assert "is the input file" in err
    assert not (tmp_path / "x.wav").exists()
