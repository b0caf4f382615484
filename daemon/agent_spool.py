"""The agent's outbox on disk: telemetry and events wait here until the fleet has stored them.

SQLite in WAL mode: every message is written before it is sent and deleted only when the fleet
service says it has stored it (its ack names the sequence numbers), so neither a network
outage, nor a broker restart, nor an agent restart loses it.
Messages get a sequence number that never goes back (kept in the same file) and leave in that
order. The spool is bounded: beyond `max_messages` the oldest are dropped and counted, and the
count travels in telemetry.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

PLAUSIBLE_EPOCH_S = 1_700_000_000  # 2023-11: a clock before this is not set yet


class Spool:
    """A bounded, ordered, persistent FIFO of (seq, topic, payload)."""

    def __init__(self, path: str | Path, max_messages: int) -> None:
        self.path = Path(path)
        self.max_messages = max_messages
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, "
                        "topic TEXT NOT NULL, payload BLOB NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER)")
        # a new spool (a new or reflashed box) starts its sequence at the clock in ms when the
        # clock is plausible, so a reflashed box's messages never collide with its history
        first = time.time_ns() // 1_000_000 if time.time() > PLAUSIBLE_EPOCH_S else 1
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', ?), ('dropped', 0)",
                        (first,))
        self.depth = self.db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    def _meta(self, key: str) -> int:
        return int(self.db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()[0])

    @property
    def dropped(self) -> int:
        """Messages dropped because the spool was full, since the box was provisioned."""
        return self._meta("dropped")

    def append(self, topic: str, make_payload) -> int:
        """Store one message; `make_payload(seq) -> bytes` builds it with its sequence number."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            seq = self._meta("next_seq")
            self.db.execute("UPDATE meta SET v = ? WHERE k = 'next_seq'", (seq + 1,))
            self.db.execute("INSERT INTO outbox VALUES (?, ?, ?)", (seq, topic, make_payload(seq)))
            self.depth += 1
            excess = self.depth - self.max_messages
            if excess > 0:
                n = self.db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox "
                                    "ORDER BY seq LIMIT ?)", (excess,)).rowcount
                self.db.execute("UPDATE meta SET v = v + ? WHERE k = 'dropped'", (n,))
                self.depth -= n
        return seq

    def after(self, seq: int, limit: int) -> list[tuple[int, str, bytes]]:
        """Up to `limit` messages with a sequence number above `seq`, oldest first."""
        return self.db.execute("SELECT seq, topic, payload FROM outbox WHERE seq > ? "
                               "ORDER BY seq LIMIT ?", (seq, limit)).fetchall()

    def get(self, seqs: list[int]) -> list[tuple[int, str, bytes]]:
        """The messages with these sequence numbers that are still here, oldest first."""
        if not seqs:
            return []
        marks = ",".join("?" * len(seqs))
        return self.db.execute(f"SELECT seq, topic, payload FROM outbox WHERE seq IN ({marks}) "
                               "ORDER BY seq", seqs).fetchall()

    def remove(self, seq: int) -> None:
        """Forget a message the broker has acknowledged."""
        n = self.db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount
        self.depth -= n

    def close(self) -> None:
        """Close the file."""
        self.db.close()
