"""The agent's spool: ordered, persistent, bounded with drops counted."""

from __future__ import annotations

from echoel.daemon.agent_spool import Spool


def test_order_persistence_and_sequence(tmp_path):
    s = Spool(tmp_path / "spool.sqlite", 100)
    seqs = [s.append("devices/a/telemetry", lambda q: f"m{q}".encode()) for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    s.remove(1)
    s.remove(2)
    s.close()
    s = Spool(tmp_path / "spool.sqlite", 100)  # an agent restart
    assert s.depth == 3
    assert [r[0] for r in s.after(0, 10)] == [3, 4, 5]
    assert s.after(3, 1)[0][2] == b"m4"
    assert [r[0] for r in s.get([5, 3, 99])] == [3, 5]
    for r in s.after(0, 10):
        s.remove(r[0])
    # the sequence never goes back, even when the spool is empty
    assert s.append("devices/a/events", lambda q: b"x") == 6


def test_bounded_oldest_dropped_and_counted(tmp_path):
    s = Spool(tmp_path / "spool.sqlite", 10)
    for _ in range(25):
        s.append("t", lambda q: b"x")
    assert s.depth == 10 and s.dropped == 15
    assert [r[0] for r in s.after(0, 100)] == list(range(16, 26))
    s.close()
    assert Spool(tmp_path / "spool.sqlite", 10).dropped == 15
