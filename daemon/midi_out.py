"""Transcribed notes to the studio: a virtual MIDI output port, a Standard MIDI File, bus dicts.

The port is python-rtmidi's virtual output: on the box the ALSA sequencer (API LINUX_ALSA,
needs /dev/snd/seq, i.e. the snd-seq module), or JACK MIDI (API UNIX_JACK) where a JACK server
runs. A JACK client never starts a server here (JACK_NO_START_SERVER).
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import mido
from echoel.dsp.streaming_transcriber import NoteMsg

APIS = ("alsa", "jack")


class MidiPortError(RuntimeError):
    """The MIDI port cannot be opened or written."""


def note_bytes(msg: NoteMsg, channel: int = 0) -> list[int]:
    """Raw MIDI bytes: note-on (0x9n) with velocity >= 1, or note-off (0x8n)."""
    if not 0 <= channel <= 15:
        raise ValueError(f"MIDI channel is {channel}; allowed: 0..15")
    if not 0 <= msg.pitch <= 127:
        raise ValueError(f"MIDI pitch is {msg.pitch}; allowed: 0..127")
    if msg.kind == "on":
        return [0x90 | channel, msg.pitch, max(1, min(127, msg.velocity))]
    return [0x80 | channel, msg.pitch, 0]


class MidiOut:
    """A virtual MIDI output port called `name`; notes are sent as they come."""

    def __init__(self, name: str = "Echoel Box notes", api: str = "alsa",
                 channel: int = 0) -> None:
        import rtmidi

        if api not in APIS:
            raise MidiPortError(f"MIDI API {api!r} unknown; allowed: {', '.join(APIS)}")
        if not 0 <= channel <= 15:
            raise MidiPortError(f"MIDI channel is {channel}; allowed: 0..15")
        rtapi = rtmidi.API_LINUX_ALSA if api == "alsa" else rtmidi.API_UNIX_JACK
        if rtapi not in rtmidi.get_compiled_api():
            raise MidiPortError(f"python-rtmidi was built without the {api} API")
        if api == "alsa" and not os.path.exists("/dev/snd/seq"):
            raise MidiPortError("ALSA sequencer missing (/dev/snd/seq): load the snd-seq "
                                "kernel module, or use api='jack' with a running JACK server")
        if api == "jack":
            os.environ.setdefault("JACK_NO_START_SERVER", "1")
        self.name, self.api, self.channel = name, api, channel
        try:
            self._out = rtmidi.MidiOut(rtapi=rtapi, name=name)
            self._out.open_virtual_port(name)
        except rtmidi.RtMidiError as exc:
            where = "is a JACK server running?" if api == "jack" else "is snd-seq loaded?"
            raise MidiPortError(f"cannot open the {api} MIDI port {name!r} ({exc}); "
                                f"{where}") from None
        self._lock = threading.Lock()
        self._sounding: set[int] = set()
        self.sent = 0
        self.errors = 0

    def send(self, msg: NoteMsg) -> None:
        """Send one note-on/off now (errors are counted, never raised)."""
        data = note_bytes(msg, self.channel)
        with self._lock:
            try:
                self._out.send_message(data)
                self.sent += 1
                if msg.kind == "on":
                    self._sounding.add(msg.pitch)
                else:
                    self._sounding.discard(msg.pitch)
            except Exception:  # the port went away: keep the service alive, count it
                self.errors += 1

    def all_notes_off(self) -> None:
        """Note-off for every note still sounding (on stop or after a gap)."""
        with self._lock:
            for p in sorted(self._sounding):
                try:
                    self._out.send_message([0x80 | self.channel, p, 0])
                except Exception:
                    self.errors += 1
            self._sounding.clear()

    def close(self) -> None:
        """All notes off, port closed."""
        self.all_notes_off()
        with self._lock:
            self._out.close_port()
            del self._out


class SmfWriter:
    """Notes collected in memory (bounded), written as a type-0 Standard MIDI File.

    Times: input-clock samples at `rate` from `t0_sample`, at `tempo_bpm` and `ppq` ticks per
    beat. Note-ons may arrive later than they happened (they carry their own time): events
    are sorted when written.
    """

    def __init__(self, rate: int, t0_sample: int = 0, ppq: int = 480, tempo_bpm: float = 120.0,
                 program: int = 0, channel: int = 0, max_events: int = 1_000_000) -> None:
        if rate <= 0 or ppq <= 0 or tempo_bpm <= 0:
            raise ValueError(f"rate {rate}, ppq {ppq}, tempo {tempo_bpm}: all must be > 0")
        self.rate, self.t0, self.ppq, self.tempo_bpm = rate, t0_sample, ppq, tempo_bpm
        self.program, self.channel, self.max_events = program, channel, max_events
        self._raw: list[tuple[int, int, str, int, int]] = []
        self.dropped = 0
        self._lock = threading.Lock()

    def ticks(self, sample: int) -> int:
        """MIDI ticks of an input-clock sample."""
        seconds = (sample - self.t0) / self.rate
        return max(0, round(seconds * self.tempo_bpm / 60.0 * self.ppq))

    def add(self, msg: NoteMsg) -> None:
        """Keep one note event (dropped and counted beyond max_events)."""
        with self._lock:
            if len(self._raw) >= self.max_events:
                self.dropped += 1
                return
            # offs before ons at the same tick, so a re-attack is not cut by its own off
            self._raw.append((self.ticks(msg.sample), 0 if msg.kind == "off" else 1, msg.kind,
                              msg.pitch, max(1, min(127, msg.velocity))))

    def midi_file(self) -> mido.MidiFile:
        """The file as a mido object."""
        mf = mido.MidiFile(type=0, ticks_per_beat=self.ppq)
        tr = mido.MidiTrack()
        mf.tracks.append(tr)
        tr.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(self.tempo_bpm), time=0))
        tr.append(mido.Message("program_change", program=self.program, channel=self.channel,
                               time=0))
        with self._lock:
            raw = sorted(self._raw)
        last = 0
        sounding: dict[int, int] = {}
        for tick, _, kind, pitch, vel in raw:
            if kind == "on":
                sounding[pitch] = sounding.get(pitch, 0) + 1
                m = mido.Message("note_on", note=pitch, velocity=vel, channel=self.channel,
                                 time=tick - last)
            else:
                if not sounding.get(pitch):
                    continue  # an off without its on (e.g. the on came before t0)
                sounding[pitch] -= 1
                m = mido.Message("note_off", note=pitch, velocity=0, channel=self.channel,
                                 time=tick - last)
            tr.append(m)
            last = tick
        tail = self.ppq // 8  # notes never ended close a 1/32 note after the last event
        for pitch, n in sorted(sounding.items()):
            for _ in range(n):
                tr.append(mido.Message("note_off", note=pitch, velocity=0, channel=self.channel,
                                       time=tail))
                tail = 0
        tr.append(mido.MetaMessage("end_of_track", time=0))
        return mf

    def save(self, path: str | Path) -> Path:
        """Write the file atomically (temporary file renamed over the target)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                self.midi_file().save(file=f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p


def note_event_dict(msg: NoteMsg, rate: int, source: str = "transcriber") -> dict[str, Any]:
    """A note event for the local ZeroMQ bus (topic `event`): JSON-ready."""
    return {"event": "note", "source": source, "kind": msg.kind, "pitch": msg.pitch,
            "velocity": msg.velocity, "sample": msg.sample, "time_s": msg.sample / rate,
            "frame": msg.frame, "amplitude": round(msg.amplitude, 4)}
