"""The fleet store: the same behaviour on SQLite and PostgreSQL."""

from __future__ import annotations

import os

import pytest
from echoel.fleet.store import FleetStore
from fleet_rig import PgServer


@pytest.fixture(scope="module")
def pg():
    if os.geteuid() != 0:
        pytest.skip("PostgreSQL runs as the postgres user (needs root to switch)")
    server = PgServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = FleetStore(str(tmp_path / "fleet.db"))
    else:
        s = FleetStore(request.getfixturevalue("pg").createdb(f"t{abs(hash(tmp_path))}"))
    yield s
    s.close()


def test_state_from_an_older_connection_never_wins(store):
    store.ingest([("b1", "state", {"state": "online", "seq": 4, "ts": 1.0, "software": "1.2"})])
    store.ingest([("b1", "state", {"state": "lost", "seq": 3})])  # a late will
    d = store.device("b1")
    assert (d["state"], d["state_seq"], d["software"]) == ("online", 4, "1.2")
    store.ingest([("b1", "state", {"state": "lost", "seq": 4})])  # this connection's will
    assert store.device("b1")["state"] == "lost"
    store.ingest([("b1", "state", {"state": "online", "seq": 5, "incarnation": "a"})])
    assert store.device("b1")["state"] == "online"
    # reflashed: its counters start again, with a new incarnation; taken as new
    store.ingest([("b1", "state", {"state": "online", "seq": 1, "incarnation": "b"})])
    assert store.device("b1")["state_seq"] == 1
    store.ingest([("b1", "state", {"state": "lost", "seq": 0, "incarnation": "b"})])
    assert store.device("b1")["state"] == "online"


def test_telemetry_stored_once_and_latest_kept(store):
    batch = [("b1", "telemetry", {"seq": s, "ts": float(s), "engine": {"state": "running"}})
             for s in (1, 2, 3)]
    store.ingest(batch)
    store.ingest(batch[1:])  # redelivered (QoS 1 duplicates, resends)
    assert store.seqs("b1") == [1, 2, 3]
    assert store.device("b1")["telemetry"]["seq"] == 3
    store.ingest([("b1", "telemetry", {"seq": 2, "ts": 2.0})])  # an older batch, stored late
    assert store.device("b1")["telemetry"]["seq"] == 3
    store.ingest([("b1", "events", {"seq": 4, "ts": 4.0, "kind": "xrun_burst"})])
    assert store.recent("b1", "events")[0]["kind"] == "xrun_burst"
    assert store.count("telemetry", "b1") == 3


def test_desired_versions_groups_and_commands(store):
    assert store.desired("b2") == (0, {})
    assert store.add_desired("b2", {"chain.gain_db": -3}) == (1, {"chain.gain_db": -3})
    assert store.add_desired("b2", {"agent.telemetry_interval_s": 5}) == \
        (2, {"chain.gain_db": -3, "agent.telemetry_interval_s": 5})
    assert store.add_desired("b2", {}, removals=["chain.gain_db"]) == \
        (3, {"agent.telemetry_interval_s": 5})
    store.ingest([("b2", "config/reported", {"version": 2, "status": "rejected",
                                             "error": "bad", "desired_version": 3})])
    d = store.device("b2")
    assert (d["config_version"], d["config_status"], d["config_error"]) == (2, "rejected", "bad")
    store.set_group("b2", "lab")
    store.set_group("b3", "tour")
    assert [d["id"] for d in store.devices("lab")] == ["b2"]
    store.log_command("c1", "b2", "ping", {})
    store.ingest([("b2", "reply/cli", {"ok": True, "corr": "c1", "result": {"pong": True}})])
    assert store.command("c1")["ok"] is True
