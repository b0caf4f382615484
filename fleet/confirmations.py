"""Confirmations to the boxes: which of their messages the fleet has stored.

A box keeps every telemetry and event message in its spool until the fleet confirms it
(`devices/<id>/ack` with the sequence numbers) and sends again what stays unconfirmed. The
broker spreads one box's messages over all ingest workers (shared subscription, round robin),
so each worker would confirm a box's messages one by one. One `Confirmer` per service gathers
the sequence numbers that every worker has stored, and sends one confirmation per box per
window (0.2 s by default, far below the boxes' resend time of 5 s or more): at 10,000 boxes
draining a backlog this halves the messages the service publishes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from echoel.fleet.protocol import encode, topic

Publish = Callable[[str, bytes], object]


class Confirmer:
    """Gathers stored sequence numbers per box and publishes them once per window."""

    def __init__(self, window_s: float = 0.2) -> None:
        self.window_s = window_s
        self._pending: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._publishers: list[Callable[[], Publish | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fleet-confirmer", daemon=True)
        self.sent = 0  # confirmation messages published
        self.unsent = 0  # boxes whose confirmation found no connected worker (they resend)

    def add_publisher(self, publisher: Callable[[], Publish | None]) -> None:
        """A source of a publish function: returns None while its client is not connected."""
        self._publishers.append(publisher)

    def start(self) -> None:
        """Start the publishing thread."""
        self._thread.start()

    def stored(self, seqs: dict[str, list[int]]) -> None:
        """Sequence numbers just committed to the store, per box."""
        if not seqs:
            return
        with self._lock:
            for device, s in seqs.items():
                self._pending.setdefault(device, []).extend(s)

    def flush(self) -> None:
        """Publish what is pending now (one message per box)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        publish = next((p for p in (src() for src in self._publishers) if p is not None), None)
        if publish is None:
            self.unsent += len(pending)  # the boxes send again; nothing is lost
            return
        for device, s in pending.items():
            publish(topic(device, "ack"), encode({"seqs": sorted(set(s))}))
        self.sent += len(pending)

    def _loop(self) -> None:
        while not self._stop.wait(self.window_s):
            self.flush()

    def stop(self) -> None:
        """Publish what is left and stop."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        self.flush()
