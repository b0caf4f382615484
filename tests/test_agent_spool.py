"""The agent's spool: ordered, persistent, bounded with drops counted."""

from __future__ import annotations

import time

from echoel.daemon.agent_spool import Spool


def test_order_persistence_and_sequence(tmp_path):
    s = Spool(tmp_path / "spool.sqlite", 100)
    seqs = [s.append("devices/a/telemetry", lambda q: f"m{q}".encode()) for _ in range(5)]
    # a new spool starts at the clock (ms): a reflashed box never reuses its old numbers
    assert abs(seqs[0] - time.time() * 1000) < 60_000
    assert seqs == list(range(seqs[0], seqs[0] + 5))
    base = seqs[0] - 1
    seqs = [q - base for q in seqs]
    assert seqs == [1, 2, 3, 4, 5]
    s.remove(base + 1)
    s.remove(base + 2)
    s.close()
    s = Spool(tmp_path / "spool.sqlite", 100)  # an agent restart
    assert s.depth == 3
    assert [r[0] - base for r in s.after(0, 10)] == [3, 4, 5]
    assert s.after(base + 3, 1)[0][2] == f"m{base + 4}".encode()
    assert [r[0] - base for r in s.get([base + 5, base + 3, 99])] == [3, 5]
    for r in s.after(0, 10):
        s.remove(r[0])
    # the sequence never goes back, even when the spool is empty
    assert s.append("devices/a/events", lambda q: b"x") == base + 6


def test_bounded_oldest_dropped_and_counted(tmp_path):
    s = Spool(tmp_path / "spool.sqlite", 10)
    for _ in range(25):
        s.append("t", lambda q: b"x")
    assert s.depth == 10 and s.dropped == 15
    first = s.after(0, 1)[0][0]
    assert [r[0] - first for r in s.after(0, 100)] == list(range(10))
    s.close()
    assert Spool(tmp_path / "spool.sqlite", 10).dropped == 15
