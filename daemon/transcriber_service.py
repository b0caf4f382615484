"""The transcription service: audio blocks in, notes out to MIDI, a MIDI file and the bus.

It reads (timestamp, block) pairs from a source (an iterator, or a callable returning a pair or
None at the end), never in the audio thread: the engine hands blocks over through its rings.
Windows go to a thread pool (each worker has its own LiteRT interpreter, `threads` threads
each). Results are decoded in window order; when `max_pending` windows are already waiting
for the model, the new window is dropped whole and counted (the notes sounding then end),
so the service never falls further behind. A model error or a non-finite output is counted
and handled the same way; the service keeps running.

Also `transcribe_offline` for whole files (basic-pitch's own windowing and decoding).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from echoel.daemon.litert_runner import LiteRTRunner
from echoel.daemon.midi_out import note_event_dict
from echoel.daemon.model_manifest import Manifest
from echoel.daemon.model_store import ModelStore
from echoel.dsp.basic_pitch_frames import SAMPLE_RATE, predict_frames
from echoel.dsp.note_decoding import DecodeParams, NoteEvent, notes_from_frames
from echoel.dsp.streaming_transcriber import (
    NoteMsg,
    StreamConfig,
    StreamingTranscriber,
    Window,
    resample,
)

Block = tuple[int, np.ndarray]  # (input-clock sample of the block's first frame, audio)
MAX_GAP_S = 0.5  # a source gap up to this long is filled with silence; longer restarts


def transcribe_offline(audio: np.ndarray, rate: int, runner: LiteRTRunner,
                       params: DecodeParams | None = None) -> list[NoteEvent]:
    """Notes of a whole clip, as basic-pitch's predict() finds them (resampled to 22050 Hz
    with the streaming resampler first when needed)."""
    a = np.asarray(audio, np.float32)
    if a.ndim == 2:
        a = a.mean(axis=1)
    if rate != SAMPLE_RATE:
        a = resample(a, rate)
    return notes_from_frames(predict_frames(a, runner.run), params)


@dataclass
class ServiceConfig:
    """Service settings: streaming, thread pool and model threads, backlog before dropping."""

    stream: StreamConfig = field(default_factory=StreamConfig)
    workers: int = 1  # inference threads in the pool (one interpreter each)
    threads: int = 1  # LiteRT threads per interpreter
    max_pending: int = 3  # windows waiting for the model before new ones are dropped

    def __post_init__(self) -> None:
        for name, hi in (("workers", 8), ("threads", 8), ("max_pending", 64)):
            v = getattr(self, name)
            if not isinstance(v, int) or not 1 <= v <= hi:
                raise ValueError(f"transcriber {name} is {v!r}; allowed: an integer 1..{hi}")


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class TranscriberService:
    """Runs the streaming transcriber on a source; see the module docstring."""

    def __init__(self, model_path: str | Path, manifest: Manifest | None,
                 cfg: ServiceConfig | None = None, midi: Any = None, smf: Any = None,
                 publish: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg = cfg or ServiceConfig()
        self.model_path, self.manifest = Path(model_path), manifest
        if manifest is not None and manifest.sample_rate not in (None, SAMPLE_RATE):
            raise ValueError(f"model {manifest.name} {manifest.version} takes "
                             f"{manifest.sample_rate} Hz; this transcriber feeds {SAMPLE_RATE}")
        # load once here so a bad model fails now, with its message, not in a worker
        LiteRTRunner(self.model_path, manifest, self.cfg.threads)
        self.midi, self.smf, self.publish = midi, smf, publish
        self._local = threading.local()
        self._stop = threading.Event()
        self.stats: dict[str, Any] = {}
        self.infer_ms: collections.deque[float] = collections.deque(maxlen=10000)
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=10000)
        self.emitted: list[NoteMsg] = []
        self.keep_emitted = True

    @classmethod
    def from_store(cls, store: str | Path, name: str = "basic-pitch",
                   cfg: ServiceConfig | None = None, **kw: Any) -> TranscriberService:
        """The active version of `name` in a model store (size and sha256 checked)."""
        m = ModelStore(store).active(name)
        return cls(m.model_path, m.manifest, cfg, **kw)

    def stop(self) -> None:
        """Ask run() to end (it finishes the notes sounding)."""
        self._stop.set()

    # ---- inference (pool threads)
    def _runner(self) -> LiteRTRunner:
        r = getattr(self._local, "runner", None)
        if r is None:
            r = LiteRTRunner(self.model_path, self.manifest, self.cfg.threads)
            self._local.runner = r
        return r

    def _infer(self, w: Window) -> dict[str, np.ndarray]:
        t = time.perf_counter()
        out = self._runner().run(w.audio)
        self.infer_ms.append((time.perf_counter() - t) * 1e3)
        return out

    # ---- emission
    def _emit(self, msgs: list[NoteMsg], rate: int) -> None:
        now = time.monotonic()
        for m in msgs:
            if self.midi is not None:
                self.midi.send(m)
            if self.smf is not None:
                self.smf.add(m)
            if self.publish is not None:
                try:
                    self.publish(note_event_dict(m, rate))
                except Exception:
                    self.stats["publish_errors"] += 1
            if m.kind == "on":
                self.stats["notes"] += 1
                arrival = self._arrival_wall(m.sample, rate)
                if arrival is not None:
                    self.latency_ms.append((now - arrival) * 1e3)
            if self.keep_emitted:
                self.emitted.append(m)

    def _arrival_wall(self, sample: int, rate: int) -> float | None:
        """Wall time at which `sample` was captured: the arrival of its block less the time
        from the sample to the block's end."""
        for end, wall in self._arrivals:
            if end > sample:
                return wall - (end - sample) / rate
        return None

    # ---- main loop
    def run(self, source: Iterable[Block] | Callable[[], Block | None]) -> dict[str, Any]:
        """Transcribe until the source ends or stop() is called; returns the summary."""
        it: Iterator[Block] = iter(source, None) if callable(source) else iter(source)
        rate = self.cfg.stream.rate_in
        self.stats = {"blocks": 0, "windows": 0, "dropped_windows": 0, "inference_errors": 0,
                      "notes": 0, "publish_errors": 0, "gaps_filled": 0, "restarts": 0}
        self._arrivals: collections.deque[tuple[int, float]] = collections.deque(maxlen=4096)
        st: StreamingTranscriber | None = None
        expected = None
        pending: collections.deque[tuple[int, Future | None]] = collections.deque()
        wall0, cpu0 = time.monotonic(), time.process_time()
        pool = ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="echoel-infer")
        try:
            for t_sample, block in it:
                now = time.monotonic()
                x = np.asarray(block)
                n = x.shape[0]
                self.stats["blocks"] += 1
                if st is not None and expected is not None and t_sample != expected:
                    gap = t_sample - expected
                    if 0 < gap <= MAX_GAP_S * rate:
                        self.stats["gaps_filled"] += 1
                        self._submit(st, st.push(np.zeros(gap, np.float32)), pending, pool)
                    else:
                        self.stats["restarts"] += 1
                        self._drain(st, pending, rate, wait=True)
                        self._emit(st.finish(), rate)  # no flush: the audio did not end
                        st = None
                if st is None:
                    st = StreamingTranscriber(self.cfg.stream, t0_sample=t_sample)
                self._arrivals.append((t_sample + n, now))
                expected = t_sample + n
                self._submit(st, st.push(x), pending, pool)
                self._drain(st, pending, rate, wait=False)
                if self._stop.is_set():
                    break
            if st is not None:
                self._drain(st, pending, rate, wait=True)
                for w in st.flush():  # the last frames: windows padded with silence
                    pending.append((w.index, pool.submit(self._infer, w)))
                    self._drain(st, pending, rate, wait=True)
                self._emit(st.finish(), rate)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if self.midi is not None and hasattr(self.midi, "all_notes_off"):
                self.midi.all_notes_off()
        wall = time.monotonic() - wall0
        cpu = time.process_time() - cpu0
        self.stats.update({
            "wall_s": wall, "cpu_s": cpu, "cpu_share": cpu / wall if wall > 0 else None,
            "infer_ms_p50": _pct(list(self.infer_ms), 50),
            "infer_ms_p99": _pct(list(self.infer_ms), 99),
            "latency_ms_p50": _pct(list(self.latency_ms), 50),
            "latency_ms_p99": _pct(list(self.latency_ms), 99),
            "transcriber": st.counters if st is not None else {},
        })
        return self.stats

    def _submit(self, st: StreamingTranscriber, windows: list[Window],
                pending: collections.deque, pool: ThreadPoolExecutor) -> None:
        for w in windows:
            self.stats["windows"] += 1
            busy = sum(1 for _, f in pending if f is not None and not f.done())
            if busy >= self.cfg.max_pending:
                pending.append((w.index, None))  # dropped: decoded as a gap, in order
            else:
                pending.append((w.index, pool.submit(self._infer, w)))

    def _drain(self, st: StreamingTranscriber, pending: collections.deque, rate: int,
               wait: bool) -> None:
        while pending:
            k, fut = pending[0]
            if fut is not None and not fut.done() and not wait:
                return
            pending.popleft()
            if fut is None:
                self.stats["dropped_windows"] += 1
                self._emit(st.drop(k), rate)
                continue
            try:
                out = fut.result()
            except Exception:
                self.stats["inference_errors"] += 1
                self._emit(st.drop(k), rate)
                continue
            self._emit(st.decode(k, out), rate)


def paced(blocks: Iterable[Block], rate: int, speed: float = 1.0) -> Iterator[Block]:
    """Yield blocks no faster than real time (times `speed`): a stand-in for a live input."""
    t0 = time.monotonic()
    first = None
    for t_sample, x in blocks:
        if first is None:
            first = t_sample
        due = t0 + (t_sample + np.shape(x)[0] - first) / rate / speed
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield t_sample, x


def blocks_of(audio: np.ndarray, block: int, t0: int = 0) -> Iterator[Block]:
    """(timestamp, block) pairs over an array."""
    for a in range(0, audio.shape[0], block):
        yield t0 + a, audio[a:a + block]
