"""MIDI out (virtual port, Standard MIDI File, bus dicts) and the transcription service.

The JACK MIDI test needs the JACK dummy server of tests/conftest.py (`rig`): it is marked
`jack`. Everything else runs without a sound server.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pretty_midi
import pytest
from echoel.daemon.litert_runner import ModelLoadError
from echoel.daemon.midi_out import MidiOut, MidiPortError, SmfWriter, note_bytes, note_event_dict
from echoel.daemon.model_fetch import fetch_into_store
from echoel.daemon.model_store import ModelRefusedError
from echoel.daemon.transcriber_service import (
    ServiceConfig,
    TranscriberService,
    blocks_of,
    paced,
    transcribe_offline,
)
from echoel.dsp.streaming_transcriber import NoteMsg, StreamConfig, StreamingTranscriber

from bench.evalset import transcription_set
from bench.evalset.render import render

RATE = 48000


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("store")
    fetch_into_store(d)
    return d


@pytest.fixture(scope="module")
def model(store):
    from echoel.daemon.model_store import ModelStore

    return ModelStore(store).active("basic-pitch")


@pytest.fixture(scope="module")
def guitar() -> np.ndarray:
    return render(transcription_set.piece("guitar_arpeggio", 6.0), rate=RATE)


class Recorder:
    """A MIDI sink that keeps what the service sends (the port itself is tested apart)."""

    def __init__(self) -> None:
        self.msgs: list[NoteMsg] = []
        self.offs_all = 0

    def send(self, m: NoteMsg) -> None:
        self.msgs.append(m)

    def all_notes_off(self) -> None:
        self.offs_all += 1


def test_note_bytes_and_bus_dict():
    on = NoteMsg("on", 60, 100, 48000, 86, 0.79)
    assert note_bytes(on, 2) == [0x92, 60, 100]
    assert note_bytes(NoteMsg("on", 60, 0, 0, 0, 0.0)) == [0x90, 60, 1]  # never a 0-velocity on
    assert note_bytes(NoteMsg("off", 61, 90, 0, 0, 0.5)) == [0x80, 61, 0]
    with pytest.raises(ValueError, match="MIDI channel is 16"):
        note_bytes(on, 16)
    d = note_event_dict(on, RATE)
    assert d == {"event": "note", "source": "transcriber", "kind": "on", "pitch": 60,
                 "velocity": 100, "sample": 48000, "time_s": 1.0, "frame": 86,
                 "amplitude": 0.79}


def test_smf_writer_round_trip(tmp_path):
    w = SmfWriter(RATE, t0_sample=1000)
    msgs = [NoteMsg("on", 64, 90, 1000 + 24000, 0, 0.7),
            NoteMsg("off", 64, 90, 1000 + 48000, 0, 0.7),
            NoteMsg("on", 67, 80, 1000 + 96000, 0, 0.6),
            # a note-on that arrives late but happened earlier (streaming back-dates)
            NoteMsg("on", 60, 70, 1000 + 36000, 0, 0.5),
            NoteMsg("off", 60, 70, 1000 + 72000, 0, 0.5),
            NoteMsg("off", 67, 80, 1000 + 120000, 0, 0.6),
            NoteMsg("on", 72, 60, 1000 + 130000, 0, 0.5)]  # never ended: closed at the end
    for m in msgs:
        w.add(m)
    p = w.save(tmp_path / "out" / "notes.mid")
    pm = pretty_midi.PrettyMIDI(str(p))  # an independent parser reads it back
    got = sorted((round(n.start, 4), round(n.end, 4), n.pitch, n.velocity)
                 for n in pm.instruments[0].notes)
    assert got[:3] == [(0.5, 1.0, 64, 90), (0.75, 1.5, 60, 70), (2.0, 2.5, 67, 80)]
    assert got[3][2:] == (72, 60) and got[3][0] == pytest.approx(130000 / RATE, abs=1e-3)
    assert not list(p.parent.glob("*.tmp"))
    small = SmfWriter(RATE, max_events=2)
    for m in msgs:
        small.add(m)
    assert small.dropped == len(msgs) - 2


def test_alsa_port_opens_or_says_why():
    if os.path.exists("/dev/snd/seq"):
        import rtmidi

        out = MidiOut("echoel-test-alsa", api="alsa")
        probe = rtmidi.MidiIn(rtapi=rtmidi.API_LINUX_ALSA)
        assert any("echoel-test-alsa" in p for p in probe.get_ports())
        out.close()
    else:
        with pytest.raises(MidiPortError, match="ALSA sequencer missing \\(/dev/snd/seq\\)"):
            MidiOut("echoel-test-alsa", api="alsa")
    with pytest.raises(MidiPortError, match="MIDI API 'coreaudio' unknown"):
        MidiOut(api="coreaudio")


@pytest.mark.jack
def test_jack_midi_port_delivers_notes(rig):
    """A JACK MIDI virtual output port, read back by a JACK MIDI input in the same server."""
    import rtmidi

    out = MidiOut("echoel-notes", api="jack")
    probe = rtmidi.MidiIn(rtapi=rtmidi.API_UNIX_JACK, name="echoel-probe")
    deadline = time.monotonic() + 5
    idx = None
    while idx is None and time.monotonic() < deadline:
        ports = probe.get_ports()
        idx = next((i for i, p in enumerate(ports) if "echoel-notes" in p), None)
        time.sleep(0.05)
    assert idx is not None, f"virtual port not listed by JACK: {probe.get_ports()}"
    probe.open_port(idx)
    time.sleep(0.2)
    sent = [NoteMsg("on", 60, 100, 0, 0, 0.8), NoteMsg("off", 60, 100, 100, 1, 0.8),
            NoteMsg("on", 67, 50, 200, 2, 0.4)]
    for m in sent:
        out.send(m)
    got = []

    def receive(n: int) -> None:
        end = time.monotonic() + 5
        while len(got) < n and time.monotonic() < end:
            m = probe.get_message()
            if m is None:
                time.sleep(0.005)
                continue
            got.append(m[0])

    receive(3)
    out.all_notes_off()  # the 67 still sounds: its note-off goes out
    receive(4)
    out.close()
    probe.close_port()
    assert got == [[0x90, 60, 100], [0x80, 60, 0], [0x90, 67, 50], [0x80, 67, 0]]
    assert out.errors == 0 and out.sent == 3


def test_service_emits_what_the_streaming_transcriber_finds(model, guitar, tmp_path):
    cfg = ServiceConfig(stream=StreamConfig(rate_in=RATE), max_pending=64)
    rec, smf, bus = Recorder(), SmfWriter(RATE, t0_sample=5000), []
    svc = TranscriberService(model.model_path, model.manifest, cfg, midi=rec, smf=smf,
                             publish=bus.append)
    clip = guitar[: RATE * 4]
    stats = svc.run(blocks_of(clip, 1024, t0=5000))
    # the same audio through the transcriber alone, synchronously
    from echoel.daemon.litert_runner import LiteRTRunner

    r = LiteRTRunner(model.model_path, model.manifest)
    st = StreamingTranscriber(cfg.stream, t0_sample=5000)
    want = []
    for a in range(0, clip.shape[0], 700):  # other block sizes: the same notes
        want += st.process(clip[a:a + 700], r.run)
    want += st.close(r.run)
    assert stats["dropped_windows"] == 0 and stats["inference_errors"] == 0
    assert rec.msgs == want and len(want) > 12
    assert [b["sample"] for b in bus] == [m.sample for m in want]
    assert rec.offs_all == 1
    pm = pretty_midi.PrettyMIDI(str(smf.save(tmp_path / "s.mid")))
    assert len(pm.instruments[0].notes) == sum(m.kind == "on" for m in want)
    # and it is the same music as the offline transcription (F1 against it)
    import mir_eval

    off = transcribe_offline(clip, RATE, r)
    ref_iv = np.array([[n.start_s, n.end_s] for n in off])
    ref_hz = 440.0 * 2 ** ((np.array([n.pitch for n in off]) - 69) / 12)
    est_iv = np.array([[n.start, n.end] for n in pm.instruments[0].notes])
    est_hz = 440.0 * 2 ** ((np.array([n.pitch for n in pm.instruments[0].notes]) - 69) / 12)
    f = mir_eval.transcription.precision_recall_f1_overlap(ref_iv, ref_hz, est_iv, est_hz,
                                                           offset_ratio=None)[2]
    assert f > 0.8


def test_service_drops_whole_windows_when_behind_and_keeps_running(model, guitar):
    cfg = ServiceConfig(stream=StreamConfig(rate_in=RATE, hop_frames=8), max_pending=1)
    rec = Recorder()
    svc = TranscriberService(model.model_path, model.manifest, cfg, midi=rec)
    stats = svc.run(blocks_of(guitar, 4096))  # as fast as it can read: far ahead of the model
    assert stats["dropped_windows"] > 0
    assert stats["transcriber"]["dropped_windows"] == stats["dropped_windows"]
    assert stats["windows"] >= stats["dropped_windows"] + 1
    ons = sum(m.kind == "on" for m in rec.msgs)
    assert ons == sum(m.kind == "off" for m in rec.msgs)  # every note ended


def test_service_survives_model_errors_and_source_gaps(model, guitar):
    class Flaky(TranscriberService):
        failed = False

        def _infer(self, w):
            if w.index == 5 and not Flaky.failed:
                Flaky.failed = True
                raise RuntimeError("inference failed")
            return super()._infer(w)

    svc = Flaky(model.model_path, model.manifest,
                ServiceConfig(stream=StreamConfig(rate_in=RATE), max_pending=64))
    blocks = list(blocks_of(guitar[: RATE * 4], 1024))
    # a 1000-sample hole (filled with silence) and a 10 s jump (a new stream)
    src = [(t + (1000 if t >= RATE else 0) + (10 * RATE if t >= 2 * RATE else 0), x)
           for t, x in blocks]
    stats = svc.run(iter(src))
    assert stats["inference_errors"] == 1
    assert stats["gaps_filled"] == 1 and stats["restarts"] == 1
    assert stats["notes"] > 3
    ons = [m for m in svc.emitted if m.kind == "on"]
    assert any(m.sample > 12 * RATE for m in ons)  # notes after the jump, in the new clock


def test_service_refuses_bad_models_clearly(tmp_path, model, store):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(model.model_path.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="not a loadable TFLite model"):
        TranscriberService(bad, None)
    with pytest.raises(ModelLoadError, match="model file missing"):
        TranscriberService(tmp_path / "none.tflite", None)
    with pytest.raises(ModelRefusedError, match="no active version of model other"):
        TranscriberService.from_store(store, "other")
    m = model.manifest
    wrong = type(m)(**{**m.__dict__, "sample_rate": 16000})
    with pytest.raises(ValueError, match="takes 16000 Hz; this transcriber feeds 22050"):
        TranscriberService(model.model_path, wrong)
    with pytest.raises(ValueError, match="transcriber workers is 0"):
        ServiceConfig(workers=0)


def test_service_latency_through_a_real_time_source(store, guitar):
    """Paced like a live input: the measured onset-to-note-on time is at least the
    algorithmic minimum and the service keeps up (loose bounds: the machine is shared)."""
    cfg = ServiceConfig(stream=StreamConfig(rate_in=RATE), workers=1, threads=2)
    svc = TranscriberService.from_store(store, cfg=cfg)
    stats = svc.run(paced(blocks_of(guitar[: RATE * 3], 512), RATE))
    best, _ = StreamingTranscriber(cfg.stream).algorithmic_latency_s()
    assert stats["notes"] >= 5
    assert stats["latency_ms_p50"] >= best * 1e3 - 5
    assert stats["latency_ms_p50"] < 2000
    assert stats["cpu_share"] < 1.5
