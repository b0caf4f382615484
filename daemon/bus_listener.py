"""Listens to every publisher on the local bus: the supervisor's bus.sock and each service's
bus-<service>.sock in the run folder (found again as services come and go)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import zmq


class BusListener:
    """A SUB socket connected to every bus*.sock in the run folder; `poll()` drains it."""

    def __init__(self, rdir: Path, rescan_s: float = 2.0) -> None:
        self.rdir = rdir
        self.rescan_s = rescan_s
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.connected: set[str] = set()
        self._next_scan = 0.0
        self.bad_messages = 0

    def _scan(self) -> None:
        for p in sorted(self.rdir.glob("bus*.sock")):
            ep = f"ipc://{p}"
            if ep not in self.connected:
                self.sock.connect(ep)
                self.connected.add(ep)

    def poll(self, max_messages: int = 1000) -> list[tuple[str, dict]]:
        """Messages waiting now, as (topic, document); malformed ones are counted and skipped."""
        now = time.monotonic()
        if now >= self._next_scan:
            self._scan()
            self._next_scan = now + self.rescan_s
        out = []
        for _ in range(max_messages):
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                doc = json.loads(parts[1])
                if not isinstance(doc, dict):
                    raise ValueError("not an object")
                out.append((parts[0].decode(), doc))
            except (IndexError, ValueError, UnicodeDecodeError):
                self.bad_messages += 1
        return out

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()
