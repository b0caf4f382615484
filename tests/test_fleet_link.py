"""The fleet link end to end: real mosquitto (TLS, ACL), real agent and supervisor processes,
the fleet service storing in SQLite (and one pass on PostgreSQL)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import time

import paho.mqtt.client as mqtt
import pytest
from echoel.daemon import bus
from echoel.drivers.mqtt_tls import BrokerLink, make_client
from echoel.fleet import fleet_config
from echoel.fleet.ingest_service import FleetService
from echoel.fleet.operator_link import OperatorLink
from echoel.fleet.protocol import MAX_COMMAND_BYTES, encode, topic
from echoel.fleet.store import FleetStore
from echoel.provisioning.pki import FleetPki
from fleet_rig import FleetRig, PgServer, wait_for
from rig import short_tmpdir

pytestmark = pytest.mark.timeout(240)
BOX = "studio-1"


@pytest.fixture(scope="module")
def fleet():
    root = short_tmpdir()
    try:
        rig = FleetRig(root).start()
        store = FleetStore(str(root / "fleet.db"))
        fcfg = fleet_config.load(rig.fleet_config(str(root / "fleet.db")))
        svc = FleetService(store, fleet_config.link(fcfg), workers=2)
        svc.start()
        marker = root / "rebooted"
        cfg = rig.box_config(BOX, extra=f'allow_reboot = true\nreboot_command = "touch '
                                        f'{marker}"\n')
        rig.sup = rig.spawn("run", "--config", str(cfg), log="sup.log")
        rig.agent = rig.spawn("agent", "--config", str(cfg), log="agent.log")
        rig.cfg, rig.store, rig.fcfg, rig.svc, rig.marker = cfg, store, fcfg, svc, marker
        try:
            wait_for(lambda: (store.device(BOX) or {}).get("state") == "online", 30,
                     what=f"{BOX} online in the store")
            yield rig
        finally:
            rig.stop()
            rig.svc.stop()
            store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _op(rig, timeout=10.0) -> OperatorLink:
    return OperatorLink(fleet_config.link(rig.fcfg), timeout)


def _link(rig, kind, name) -> BrokerLink:
    crt, key = rig.pki.paths(kind, name)
    return BrokerLink("localhost", rig.broker.port, str(rig.pki.ca_cert_path), str(crt),
                      str(key))


def _sup(rig, req) -> dict:
    return bus.request(rig.root / BOX / "run", req, 5.0)


# ---------------------------------------------------------------------- identity and access
def test_broker_refuses_clients_without_a_fleet_certificate(fleet, tmp_path):
    ctx = ssl.create_default_context(cafile=str(fleet.pki.ca_cert_path))
    with socket.create_connection(("127.0.0.1", fleet.broker.port), 5) as s, \
            pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            t.sendall(b"\x10\x00")  # the broker's alert arrives on first use
            assert t.recv(1) == b"", "the broker answered a client without a certificate"
    other = FleetPki(tmp_path / "other")
    other.init()
    crt, key = other.paths("device", BOX)
    other.issue("device", BOX)
    c = make_client(BrokerLink("localhost", fleet.broker.port, str(fleet.pki.ca_cert_path),
                               str(crt), str(key)), "impostor")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c.connect("localhost", fleet.broker.port)
        for _ in range(40):  # the handshake completes in the loop
            if c.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError("refused")
    assert "unknown ca" in fleet.broker.log_tail() or "certificate" in fleet.broker.log_tail()


def test_a_box_cannot_publish_or_read_outside_its_subtree(fleet):
    fleet.pki.issue("device", "studio-2")
    c = make_client(_link(fleet, "device", "studio-2"), "studio-2-probe")
    acks, got = {}, []
    c.on_publish = lambda cl, u, mid, rc, p: acks.__setitem__(mid, rc)
    c.on_message = lambda cl, u, m: got.append(m.topic)
    c.connect("localhost", fleet.broker.port)
    c.loop_start()
    try:
        c.subscribe(f"devices/{BOX}/#", 1)
        own = c.publish("devices/studio-2/telemetry", b"{}", qos=1).mid
        other = c.publish(f"devices/{BOX}/telemetry", b"{}", qos=1).mid
        wait_for(lambda: own in acks and other in acks, 10, what="PUBACKs")
        assert not acks[own].is_failure
        assert acks[other].value == 135  # MQTT 5: Not authorized
        time.sleep(1.5)  # studio-1 publishes telemetry every 0.5 s
        assert got == [], f"a box read another box's topics: {got[:3]}"
    finally:
        c.disconnect()
        c.loop_stop()


def test_a_revoked_box_is_refused_after_the_broker_reloads(tmp_path):
    rig = FleetRig(tmp_path).start()
    try:
        rig.pki.issue("device", "gone-1")
        link = _link(rig, "device", "gone-1")
        ok = make_client(link, "gone-1")
        assert ok.connect("localhost", rig.broker.port) == mqtt.MQTT_ERR_SUCCESS
        ok.disconnect()
        rig.pki.revoke("device", "gone-1")
        rig.broker.stop()
        rig.broker.start()
        c = make_client(link, "gone-1b")
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            c.connect("localhost", rig.broker.port)
            for _ in range(40):
                if c.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                    raise ConnectionError("refused")
    finally:
        rig.stop()


# ---------------------------------------------------------------------- telemetry and state
def test_box_reports_state_telemetry_and_events(fleet):
    t = wait_for(lambda: ((d := fleet.store.device(BOX)) and d["telemetry"] and
                          d["telemetry"]["engine"]["state"] == "searching" and
                          d["telemetry"]), 15, what="telemetry with the engine's state")
    assert t["schema"] == 1
    assert "hw:99" in t["engine"]["problem"]  # no sound card on this rig: it says so
    assert t["engine"]["rate"] == 48000
    for k in ("uptime_s", "cpu_pct", "mem_used_pct", "disk_free_mb"):
        assert k in t["box"]
    assert t["versions"]["software"]
    dev = fleet.store.device(BOX)
    assert dev["state"] == "online" and dev["software"]
    # the supervisor's events reach the fleet (the interface is absent: it says so)
    ev = wait_for(lambda: fleet.store.recent(BOX, "events", 20), 15, what="events stored")
    missing = [e for e in ev if e.get("kind") == "interface_missing"]
    assert missing and "hw:99" in missing[0]["data"]["reason"], ev


def test_keys_never_leave_the_box(fleet):
    key = fleet.pki.paths("device", BOX)[1].read_text()
    body = key.split("-----")[2].strip().splitlines()[0]
    for row in fleet.store.recent(BOX, "telemetry", 50) + fleet.store.recent(BOX, "events", 50):
        assert body not in json.dumps(row)
    for log in ("agent.log", "sup.log"):
        assert body not in fleet.log(log)


# ---------------------------------------------------------------------- commands
def test_commands_round_trip(fleet):
    with _op(fleet) as op:
        r = op.command(BOX, "ping")
        assert r["ok"] and r["result"]["pong"] and r["device"] == BOX
        r = op.command(BOX, "status")
        assert r["ok"] and r["result"]["engine"]["state"] == "searching"
        r = op.command(BOX, "config.get")
        assert r["ok"] and r["result"]["effective"]["engine"]["rate"] == 48000


@pytest.mark.parametrize("payload, says", [
    (b"\xff\xfe not json", "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (encode({"name": "format-disk"}), "unknown command 'format-disk'"),
    (encode({"name": 7}), "name = 7"),
    (encode({"name": "restart"}), "missing argument 'service'"),
    (encode({"name": "restart", "args": {"service": 3}}), "service = 3: must be a str"),
    (encode({"name": "restart", "args": {"service": "kernel"}}), "allowed: 'engine'"),
    (encode({"name": "ping", "args": {"x": 1}}), "unexpected argument 'x'"),
    (encode({"name": "ping", "args": [1]}), "args = [1]: must be an object"),
    (encode({"name": "ping", "sudo": True}), "unexpected field 'sudo'"),
    (b"{" + b" " * MAX_COMMAND_BYTES + b"}", f"at most {MAX_COMMAND_BYTES} allowed"),
])
def test_bad_commands_get_an_error_reply_and_the_agent_keeps_running(fleet, payload, says):
    with _op(fleet) as op:
        r = op.command(BOX, "raw", payload=payload)
        assert r["ok"] is False and says in r["error"], r
        assert op.command(BOX, "ping")["ok"]
    assert fleet.agent.poll() is None


def test_reboot_is_guarded(fleet):
    with _op(fleet) as op:
        r = op.command(BOX, "reboot", {"confirm": "studio-9"})
        assert not r["ok"] and "not this box" in r["error"]
        time.sleep(0.5)
        assert not fleet.marker.exists()
        r = op.command(BOX, "reboot", {"confirm": BOX})
        assert r["ok"], r
    wait_for(fleet.marker.exists, 5, what="the reboot command to run")


def test_update_command_checked_accepted_and_reported_as_events(fleet):
    good = {"release": "2099.1.1", "artifact": "models", "url": "https://127.0.0.1:9/m.tar",
            "size": 1000, "sha256": "ab" * 32, "reboot": "never"}
    with _op(fleet) as op:
        r = op.command(BOX, "update", {**good, "artifact": "kernel"})
        assert not r["ok"] and "artifact = 'kernel'" in r["error"], r
        r = op.command(BOX, "update", {**good, "sha256": "xyz"})
        assert not r["ok"] and "sha256" in r["error"], r
        r = op.command(BOX, "update", good)  # well formed; nothing listens at that address
        assert r["ok"] and r["accepted"] == "2099.1.1", r
    ev = wait_for(lambda: [e for e in fleet.store.recent(BOX, "events", 30)
                           if e.get("kind") == "update" and e.get("state") == "failed"], 60,
                  what="the update's failure reported as an event")
    assert ev[0]["release"] == "2099.1.1" and ev[0]["error"], ev[0]
    t = wait_for(lambda: (d := fleet.store.device(BOX)) and d["telemetry"] and
                 (d["telemetry"].get("update") or {}).get("state") == "failed" and
                 d["telemetry"], 30, what="telemetry with the update's last state")
    assert t["software"]
    assert fleet.agent.poll() is None


def test_command_log_keeps_the_reply(fleet):
    with _op(fleet) as op:
        fleet.store.log_command("corr-test-1", BOX, "ping", {})
        op.command(BOX, "ping", corr="corr-test-1")
    row = wait_for(lambda: (c := fleet.store.command("corr-test-1")) and c["reply"] and c, 10,
                   what="reply stored")
    assert row["ok"] is True and row["reply"]["result"]["pong"] is True


def test_restart_engine_and_agent_on_command(fleet):
    pid0 = _sup(fleet, {"cmd": "status"})["status"]["engine_pid"]
    seq0 = fleet.store.device(BOX)["state_seq"]
    with _op(fleet) as op:
        assert op.command(BOX, "restart", {"service": "engine"})["ok"]
        wait_for(lambda: _sup(fleet, {"cmd": "status"})["status"]["engine_pid"] not in
                 (pid0, 0), 15, what="a new engine process")
        assert op.command(BOX, "restart", {"service": "agent"})["ok"]
    wait_for(lambda: fleet.store.device(BOX)["state_seq"] > seq0 and
             fleet.store.device(BOX)["state"] == "online", 20, what="a new birth")
    assert fleet.agent.poll() is None  # the same process, re-executed


# ---------------------------------------------------------------------- desired / reported
def test_desired_config_applied_rejected_and_kept(fleet):
    with _op(fleet) as op:
        v, values = fleet.store.add_desired(BOX, {"chain.gain_db": -3.0})
        op.publish_desired(BOX, v, values)
        wait_for(lambda: fleet.store.device(BOX)["config_version"] == v and
                 fleet.store.device(BOX)["config_status"] == "applied", 15,
                 what="desired applied")
        assert _sup(fleet, {"cmd": "config"})["config"]["chain"]["gain_db"] == -3.0
        # invalid: the whole document is refused, the box stays on the last good one
        bad_v, bad = fleet.store.add_desired(BOX, {"chain.gain_db": 99, "engine.period": 256})
        op.publish_desired(BOX, bad_v, bad)
        d = wait_for(lambda: (fleet.store.device(BOX)["config_status"] == "rejected" and
                              fleet.store.device(BOX)), 15, what="rejection reported")
        assert "gain_db = 99" in d["config_error"] and "allowed" in d["config_error"]
        assert d["config_version"] == v
        cfg = _sup(fleet, {"cmd": "config"})["config"]
        assert cfg["chain"]["gain_db"] == -3.0 and cfg["engine"]["period"] == 128
        # a key the fleet may not touch
        op.publish_desired(BOX, bad_v + 1, {"agent.cert_file": "/tmp/x"})
        wait_for(lambda: "cannot be changed by the fleet" in
                 (fleet.store.device(BOX)["config_error"] or ""), 15, what="locked key refused")
    overlay = json.loads((fleet.root / BOX / "state" / "fleet-config.json").read_text())
    assert overlay == {"version": v, "values": {"chain.gain_db": -3.0}}


# ---------------------------------------------------------------------- loss and recovery
def _contiguous(seqs: list[int]) -> bool:
    return bool(seqs) and seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def _spool_seqs(store: FleetStore) -> list[int]:
    """Telemetry and events share the box's spool sequence."""
    return sorted(store.seqs(BOX, "telemetry") + store.seqs(BOX, "events"))


def test_spool_across_broker_outage_and_agent_restart(fleet):
    n0 = fleet.store.count("telemetry", BOX)
    fleet.broker.stop()
    time.sleep(2.0)  # telemetry every 0.5 s piles up in the spool
    fleet.agent.send_signal(signal.SIGTERM)  # ...and the agent restarts while offline
    fleet.agent.wait(15)
    fleet.agent = fleet.spawn("agent", "--config", str(fleet.cfg), log="agent.log")
    time.sleep(1.5)
    fleet.broker.start()
    last = wait_for(lambda: fleet.store.recent(BOX, "telemetry", 1), 10)[0]["seq"]
    wait_for(lambda: fleet.store.count("telemetry", BOX) > n0 + 6, 20, what="spool delivered")
    # what the broker took before the service resubscribed is sent again (unconfirmed)
    wait_for(lambda: _contiguous(_spool_seqs(fleet.store)), 30,
             what=f"no gaps in what the box sent: {_spool_seqs(fleet.store)[-30:]}")
    seqs = _spool_seqs(fleet.store)
    assert last >= seqs[-1] - 1000
    assert "wait in the spool" in fleet.log("agent.log")


def test_kill_9_marks_the_box_lost_and_a_late_will_never_wins(fleet):
    seq = fleet.store.device(BOX)["state_seq"]
    fleet.agent.kill()
    fleet.agent.wait()
    # keepalive 5 s: the broker sends the will after 1.5 x keepalive
    wait_for(lambda: fleet.store.device(BOX)["state"] == "lost", 20, what="will -> lost")
    assert fleet.store.device(BOX)["state_seq"] == seq
    fleet.agent = fleet.spawn("agent", "--config", str(fleet.cfg), log="agent.log")
    wait_for(lambda: fleet.store.device(BOX)["state"] == "online", 20, what="birth")
    new_seq = fleet.store.device(BOX)["state_seq"]
    assert new_seq > seq
    # a will from the older connection arriving now (late) changes nothing
    got = []
    with _op(fleet) as op:
        op.client.on_message = lambda c, u, m: got.append(json.loads(m.payload))
        op.client.subscribe(topic(BOX, "state"), 1)
        time.sleep(0.5)
        op.client.publish(topic(BOX, "state"), encode({"state": "lost", "seq": seq}), qos=1,
                          retain=True).wait_for_publish(5)
        wait_for(lambda: got and got[-1]["state"] == "online" and got[-1]["seq"] == new_seq,
                 10, what="the agent to restore its birth on the broker")
    time.sleep(0.5)
    d = fleet.store.device(BOX)
    assert d["state"] == "online" and d["state_seq"] == new_seq


def test_fleet_service_restart_loses_nothing(fleet):
    fleet.svc.stop()
    n_stopped = fleet.store.count("telemetry", BOX)
    time.sleep(2.5)  # ~5 telemetry messages queue at the broker for the service's session
    svc = FleetService(fleet.store, fleet_config.link(fleet.fcfg), workers=2)
    svc.start()
    fleet.svc = svc
    wait_for(lambda: fleet.store.count("telemetry", BOX) >= n_stopped + 5, 15,
             what="queued telemetry stored after the restart")
    assert _contiguous(_spool_seqs(fleet.store))


def test_fleet_cli_devices_and_show(fleet, capsys):
    from echoel.daemon.cli import main

    fcfg = str(fleet.root / next(p.name for p in fleet.root.glob("fleet-*.toml")))
    assert main(["fleet", "--fleet-config", fcfg, "group", BOX, "lab"]) == 0
    assert main(["fleet", "--fleet-config", fcfg, "devices", "--group", "lab"]) == 0
    out = capsys.readouterr().out
    assert BOX in out and "online" in out and "engine searching" in out
    assert main(["fleet", "--fleet-config", fcfg, "show", BOX]) == 0
    assert "engine:" in capsys.readouterr().out
    assert main(["fleet", "--fleet-config", fcfg, "show", "nobody"]) == 2
    assert "no box 'nobody'" in capsys.readouterr().out


def test_fleet_service_on_postgresql(fleet):
    if os.geteuid() != 0:
        pytest.skip("PostgreSQL is run as the postgres user (needs root to switch)")
    pg = PgServer()
    url = pg.start()
    try:
        store = FleetStore(url)
        svc = FleetService(store, fleet_config.link(fleet.fcfg), workers=1,
                           name="fleet-service-pg", share="fleet-pg")
        svc.start()
        try:
            d = wait_for(lambda: (store.device(BOX) or {}).get("telemetry"), 15,
                         what="telemetry in PostgreSQL")
            assert d["engine"]["state"] == "searching"
            wait_for(lambda: store.count("telemetry", BOX) >= 3, 10)
            assert _contiguous(_spool_seqs(store))
        finally:
            svc.stop()
            store.close()
    finally:
        pg.stop()
