"""Turning a burst of xruns into one event instead of a log storm."""

from __future__ import annotations

from dataclasses import dataclass, field

from echoel.daemon.engine_shared import DIR_CAPTURE, DIR_PLAYBACK


@dataclass
class Burst:
    """Xruns close together in time."""

    first_ns: int
    last_ns: int
    capture: int = 0
    playback: int = 0

    @property
    def count(self) -> int:
        """Xruns in the burst (a both-direction xrun counts once)."""
        return self.capture + self.playback

    def describe(self, latency_ms: float) -> str:
        """One log line for a technician."""
        span = (self.last_ns - self.first_ns) / 1e6
        return (f"audio dropout: {self.capture} capture and {self.playback} playback xrun(s) "
                f"within {span:.0f} ms; streams restarted, latency back at {latency_ms:.2f} ms. "
                "If this repeats, raise [engine] period or periods, or look for a busy CPU")


@dataclass
class BurstTracker:
    """Collects xruns; a burst closes after `window_ns` without another."""

    window_ns: int
    max_span_ns: int = 10_000_000_000  # a storm is reported every 10 s, not only at its end
    current: Burst | None = None
    closed: list[Burst] = field(default_factory=list)

    def add(self, direction: int, t_ns: int) -> None:
        """Record one xrun."""
        b = self.current
        if b is None or t_ns - b.last_ns > self.window_ns \
                or t_ns - b.first_ns > self.max_span_ns:
            if b is not None:
                self.closed.append(b)
            b = self.current = Burst(t_ns, t_ns)
        b.last_ns = max(b.last_ns, t_ns)
        if direction & DIR_CAPTURE:
            b.capture += 1
        if direction & DIR_PLAYBACK:
            b.playback += 1

    def poll(self, now_ns: int) -> list[Burst]:
        """Bursts that have ended by now (each reported once)."""
        if self.current is not None and now_ns - self.current.last_ns > self.window_ns:
            self.closed.append(self.current)
            self.current = None
        out, self.closed = self.closed, []
        return out
