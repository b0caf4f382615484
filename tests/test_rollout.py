"""Releases and staged rollouts (issue 9), against real parts: mosquitto with the fleet's TLS and
ACL, the fleet service with its rollout worker in its own process (SQLite and a real
PostgreSQL), and 40 simulated boxes (bench/update_sim.py) that answer `update` with the agreed
protocol: progress events, a reboot (new connection, new birth with the new software), healthy,
or failed / rolled back.

The references are the boxes' own accounts (the software each runs, the commands each took,
how each update ended), read from the simulator processes, and the rules of the state machine
for the pure unit tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from echoel.daemon.cli import main as echoel_main
from echoel.fleet import releases
from echoel.fleet.broker_process import Broker
from echoel.fleet.rollout import (
    Assignment,
    Observations,
    Presence,
    Rollout,
    RolloutBook,
    RolloutError,
    Stage,
    parse_stages,
    plan,
    stage_sizes,
)
from echoel.fleet.store import FleetStore
from fleet_rig import PG_BIN, PgServer, wait_for
from rig import short_tmpdir

from bench.fleet_sim import SERVICE, ensure_pki
from bench.update_sim import UpdateFleet, outcome

pytestmark = pytest.mark.timeout(240)
BOXES = 40
GROUP = "lab"
SHA = "5" * 64


# ---------------------------------------------------------------------- pure decisions
def test_stages_parse_and_refuse_with_the_reason():
    assert parse_stages("1,10,50,100%") == [1.0, 10.0, 50.0, 100.0]
    assert parse_stages("5%, 100%") == [5.0, 100.0]
    for bad, words in (("0,120%", "stage 1 is 0%"), ("10,120", "stage 2 is 120%"),
                       ("50,10,100", "must be above stage 1"), ("10,50", "must be 100%"),
                       ("a,100", "'a', not a number"), ("", "cumulative percentages"),
                       ("10,,100", "cumulative percentages")):
        with pytest.raises(RolloutError, match=words):
            parse_stages(bad)


@pytest.mark.parametrize("n", [1, 3, 7, 40, 1000])
def test_stage_sizes_cover_each_share_and_no_more(n):
    pct = [1.0, 10.0, 50.0, 100.0]
    sizes = stage_sizes(n, pct)
    assert sum(sizes) == n and all(s >= 0 for s in sizes)
    upto = 0
    for p, s in zip(pct, sizes, strict=True):
        upto += s
        assert upto * 100.0 >= p * n - 1e-9  # the stage reaches its share...
        assert upto == 1 or (upto - 1) * 100.0 < p * n  # ...with no box more than needed


def _rollout(n: int, stages: list[float], max_failures: int = 0) -> tuple:
    ro = Rollout(1, "2026.11.2", GROUP, stages, max_failures, "now", 60.0, 300.0)
    st = [Stage(i, p) for i, p in enumerate(stages)]
    sizes = stage_sizes(n, stages)
    devs, k = {}, 0
    for i, s in enumerate(sizes):
        for j in range(k, k + s):
            devs[f"b{j}"] = Assignment(f"b{j}", i, "pending", 0.0)
        k += s
    return ro, st, devs


def _ev(state: str, release: str = "2026.11.2", **kw) -> dict:
    return {"kind": "update", "release": release, "artifact": "system", "state": state, **kw}


def test_plan_advances_only_on_healthy_and_pauses_beyond_max_failures():
    ro, st, devs = _rollout(10, [10.0, 50.0, 100.0], max_failures=1)
    online = {d: Presence(True, "2026.10.0") for d in devs}
    p = plan(ro, "system", st, devs, Observations(presence=online), 100.0, 30.0)
    first = [d for d, a in devs.items() if a.stage == 0]
    assert p.send == first and st[0].state == "active"
    assert all(a.state == "pending" for a in devs.values() if a.stage > 0)
    # accepted, progressing: the stage stays
    obs = Observations(replies={d: (devs[d].corr, True, {"ok": True}) for d in first},
                       events={d: [(5, _ev("downloading", progress=50))] for d in first},
                       presence=online)
    p = plan(ro, "system", st, devs, obs, 101.0, 30.0)
    assert not p.send and devs[first[0]].state == "downloading"
    # healthy, but its birth still shows the old software: not a success yet
    obs = Observations(events={d: [(9, _ev("healthy"))] for d in first}, presence=online)
    p = plan(ro, "system", st, devs, obs, 102.0, 30.0)
    assert devs[first[0]].state == "confirming" and not p.send
    online[first[0]] = Presence(True, "2026.11.2")
    p = plan(ro, "system", st, devs, Observations(presence=online), 103.0, 30.0)
    assert devs[first[0]].state == "healthy" and st[0].state == "done"
    second = sorted(d for d, a in devs.items() if a.stage == 1)
    assert sorted(p.send) == second and st[1].state == "active"
    # one failure is tolerated, the second pauses by itself
    obs = Observations(events={second[0]: [(3, _ev("rolled_back", evidence={"x": 1}))]},
                       presence=online)
    plan(ro, "system", st, devs, obs, 104.0, 30.0)
    assert ro.state == "running"
    obs = Observations(events={second[1]: [(3, _ev("failed", error="sig"))]}, presence=online)
    p = plan(ro, "system", st, devs, obs, 105.0, 30.0)
    assert ro.state == "paused" and "2 failures" in (ro.reason or "")
    assert devs[second[0]].evidence == {"x": 1} and devs[second[1]].error == "sig"
    # paused: nothing is sent and no stage starts, even when the stage is done
    healthy = {d: [(4, _ev("healthy"))] for d in second[2:]}
    online.update({d: Presence(True, "2026.11.2") for d in second})
    p = plan(ro, "system", st, devs, Observations(events=healthy, presence=online), 106.0, 30)
    assert not p.send and st[1].state == "active"


def test_plan_timeouts_offline_boxes_and_a_stage_without_healthy_box():
    ro, st, devs = _rollout(4, [50.0, 100.0], max_failures=1)
    pres = {d: Presence(d != "b1", "2026.10.0") for d in devs}  # b1 is offline
    p = plan(ro, "system", st, devs, Observations(presence=pres), 0.0, 30.0)
    assert p.send == ["b0"] and devs["b1"].state == "waiting"
    # no answer in reply_timeout_s: waiting again, and sent again (it is online)
    p = plan(ro, "system", st, devs, Observations(presence=pres), 31.0, 30.0)
    assert [c.new for c in p.changes if c.device == "b0"] == ["waiting", "sent"]
    assert p.send == ["b0"] and devs["b0"].tries == 2 and devs["b0"].corr.endswith("-2")
    p = plan(ro, "system", st, devs, Observations(presence=pres), 32.0, 30.0)
    assert not p.send
    # accepted but never final within update_timeout_s: a failure with evidence
    obs = Observations(replies={"b0": (devs["b0"].corr, True, {})}, presence=pres)
    plan(ro, "system", st, devs, obs, 33.0, 30.0)
    plan(ro, "system", st, devs, Observations(presence=pres), 32.0 + 301.0, 30.0)
    assert devs["b0"].state == "timeout" and devs["b0"].evidence["last_state"] == "accepted"
    # b1 offline past the stage timeout: offline, not a failure; the stage had no healthy box
    assert devs["b1"].state == "offline" and ro.state == "paused"
    assert "without a healthy box" in (ro.reason or "")


# ---------------------------------------------------------------------- real fleet
class Fleet:
    """Broker, the fleet service with the rollout worker (own process), simulated boxes."""

    def __init__(self, root: Path, db: str) -> None:
        self.root = root
        self.db = db
        self.pki = ensure_pki(BOXES)
        self.broker = Broker(self.pki, root / "broker")
        self.broker.start()
        crt, key = self.pki.paths("service", SERVICE)
        self.cfg = root / "fleet.toml"
        self.cfg.write_text(f'[fleet]\ndb = "{db}"\nbroker_host = "127.0.0.1"\n'
                            f'broker_port = {self.broker.port}\n'
                            f'ca_file = "{self.pki.ca_cert_path}"\ncert_file = "{crt}"\n'
                            f'key_file = "{key}"\nworkers = 2\n'
                            '[rollout]\npoll_s = 0.3\nreply_timeout_s = 10.0\n')
        self.proc: subprocess.Popen | None = None
        self.sims: UpdateFleet | None = None
        self.store = FleetStore(db)
        self.book = RolloutBook(self.store)
        self.start_service()
        self.sims = UpdateFleet(self.pki, self.broker.port, BOXES, procs=2, group=GROUP,
                                dl_s=0.4, install_s=0.2, reboot_s=0.5)
        c = self.sims.connect(120.0)
        assert c["up"] == BOXES, f"simulated boxes that did not connect: {c}"
        self.sims.steady(2.0)
        wait_for(lambda: len(self.store.devices(GROUP)) == BOXES, 60.0,
                 what=f"{BOXES} boxes in the store")

    def start_service(self) -> None:
        """`serve` with the rollout worker, until its ingest workers are subscribed."""
        log = self.root / "service.log"
        start = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "echoel.daemon.cli", "fleet",
                                          "--fleet-config", str(self.cfg), "serve"],
                                         stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: log.read_bytes()[start:].count(b"connected (session") >= 2 or
                 self.proc.poll() is not None, 120.0, what="the fleet service")
        assert self.proc.poll() is None, log.read_text()[-2000:]

    def kill_service(self) -> None:
        """SIGKILL: no clean stop, the lease stays held until it expires."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10.0)

    def cli(self, *args: str) -> tuple[int, str]:
        """`echoel fleet --fleet-config ... ARGS`: (exit code, output)."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = echoel_main(["fleet", "--fleet-config", str(self.cfg), *args])
        return rc, out.getvalue()

    def release(self, name: str) -> None:
        rc, out = self.cli("release", "add", f"https://updates.example/{name}.raucb",
                           "--name", name, "--sha256", SHA, "--size", "1048576")
        assert rc == 0, out

    def start(self, name: str, *opts: str) -> int:
        rc, out = self.cli("rollout", "start", name, "--group", GROUP, *opts)
        assert rc == 0, out
        return int(out.split()[1].rstrip(":"))

    def wait_state(self, rid: int, states: tuple[str, ...], timeout: float = 90.0) -> dict:
        def done():
            st = self.book.status(rid)
            return st if st["state"] in states else None
        try:
            return wait_for(done, timeout, 0.2, what=f"rollout {rid} {states}")
        except AssertionError:
            raise AssertionError(f"{json.dumps(self.book.status(rid), indent=1)[:3000]}\n"
                                 f"{self.log()[-2000:]}") from None

    def log(self) -> str:
        return (self.root / "service.log").read_text(errors="replace")

    def abort_active(self) -> None:
        for rid in self.book.ids(("running", "paused")):
            self.book.abort(rid)

    def stop(self) -> None:
        if self.sims is not None:
            self.sims.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        self.store.close()
        self.broker.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(request):
    """A fleet per store kind (PostgreSQL: a private cluster of Debian's binaries)."""
    if request.param == "postgresql" and not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL 15 binaries absent ({PG_BIN}): apt-get install postgresql-15")
    root = short_tmpdir()
    pg = None
    f = None
    try:
        if request.param == "postgresql":
            pg = PgServer()
            db = pg.start()
        else:
            db = str(root / "fleet.db")
        f = Fleet(root, db)
        yield f
    finally:
        if f is not None:
            f.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def clean(fleet):
    """The fleet with no box busy with an update (an aborted rollout's boxes finish what they
    had started, and a busy box refuses another release), and with any rollout a failed test
    left active aborted afterwards."""
    wait_for(lambda: not any(u["busy"] for u in fleet.sims.updates().values()), 120.0,
             what="the boxes to finish the updates of the previous test")
    yield fleet
    fleet.abort_active()


def _commands_for(fleet: Fleet, release: str) -> dict[str, float]:
    """When each box was sent the release's command (the store's command log)."""
    with fleet.store.tx() as cur:
        rows = cur.execute("SELECT device, args, sent FROM commands WHERE name = 'update'")\
            .fetchall()
    out: dict[str, float] = {}
    for dev, args, sent in rows:
        if json.loads(args)["release"] == release:
            out[dev] = min(out.get(dev, sent), sent)
    return out


def test_stages_advance_only_when_the_previous_stage_is_healthy(clean):
    f = clean
    f.release("2026.11.2")
    took0 = {d: u["jobs"] for d, u in f.sims.updates().items()}
    rid = f.start("2026.11.2", "--stages", "10,50,100%")
    st = f.wait_state(rid, ("completed", "paused", "aborted"))
    assert st["state"] == "completed", st["reason"]
    boxes = f.sims.updates()
    # the boxes' own account: every one runs the release, each installed it exactly once
    assert {d: u["software"] for d, u in boxes.items()} == {d: "2026.11.2" for d in boxes}
    assert all(boxes[d]["jobs"] - took0[d] == 1 for d in boxes)
    assert st["counts"] == {"healthy": BOXES}
    assert {d["software"] for d in f.store.devices(GROUP)} == {"2026.11.2"}
    # no box of stage k+1 was sent the command before every box of stage k was healthy
    sent = _commands_for(f, "2026.11.2")
    devs = f.book.assignments(rid)
    healthy_at = {e["device"]: e["ts"] for e in f.book.log(rid, limit=10000)
                  if e["new"] == "healthy"}
    for k in (1, 2):
        prev_done = max(healthy_at[d] for d, a in devs.items() if a.stage == k - 1)
        first_sent = min(sent[d] for d, a in devs.items() if a.stage == k)
        assert first_sent >= prev_done
    assert [s["boxes"] for s in st["stages"]] == stage_sizes(BOXES, [10.0, 50.0, 100.0])


def test_a_failing_release_pauses_by_itself_then_resume_and_abort(clean):
    f = clean
    f.release("2026.11.3")
    f.sims.behave(per_release={"2026.11.3": {"fail": 0.25, "rollback": 0.25}})
    took0 = {d: u["commands"] for d, u in f.sims.updates().items()}
    rid = f.start("2026.11.3", "--stages", "10,30,100%", "--max-failures", "1")
    st = f.wait_state(rid, ("paused", "completed"))
    assert st["state"] == "paused" and "more than max_failures 1" in st["reason"]
    active = st["current_stage"]
    # boxes already updating finish; nothing is sent beyond the stage that failed
    wait_for(lambda: all(s["state"] != "active" or not any(
        k in s["counts"] for k in ("sent", "accepted", "downloading", "verifying",
                                   "installing", "installed", "rebooting", "confirming"))
        for s in f.book.status(rid)["stages"]), 60.0, what="in-flight boxes to finish")
    boxes = f.sims.updates()
    devs = f.book.assignments(rid)
    got = {d for d in boxes if boxes[d]["commands"] > took0[d]}
    assert got == {d for d, a in devs.items() if a.stage < active}
    # failures as the boxes tell them, with their evidence
    st = f.book.status(rid)
    failed = {x["device"]: x for x in st["failed"]}
    expected = {d for d in got if outcome(d, "2026.11.3", 0.25, 0.25) != "healthy"}
    assert set(failed) == expected and len(expected) >= 2
    for d, x in failed.items():
        assert x["state"] == outcome(d, "2026.11.3", 0.25, 0.25) == boxes[d]["last"]
        assert x["evidence"]["checks"], x
    rc, out = f.cli("rollout", "status", str(rid))
    assert rc == 0 and "evidence" in out and "paused" in out
    # resume: the failures so far are acknowledged, the next stage starts
    rc, out = f.cli("rollout", "resume", str(rid), "--max-failures", "1000")
    assert rc == 0 and "running" in out, out
    wait_for(lambda: f.book.status(rid)["current_stage"] > active, 60.0, what="next stage")
    rc, out = f.cli("rollout", "abort", str(rid))
    assert rc == 0 and "aborted" in out, out
    wait_for(lambda: not any(a.state in ("pending", "waiting") for a in
                             f.book.assignments(rid).values()), 30.0, what="cancellations")
    time.sleep(2.0)
    devs = f.book.assignments(rid)
    boxes = f.sims.updates()
    cancelled = [d for d, a in devs.items() if a.state == "cancelled"]
    assert cancelled, "the last stage should not have been reached"
    assert all(boxes[d]["commands"] == took0[d] for d in cancelled)
    rc, out = f.cli("rollout", "resume", str(rid))
    assert rc == 2 and "aborted" in out
    f.sims.behave(per_release={})


def test_operator_pause_holds_the_next_stage_and_offline_boxes_do_not_block(clean):
    f = clean
    f.release("2026.11.4")
    gone = ["sim-00003"]
    f.sims.set_online(gone, False)
    try:
        _pause_and_offline(f, gone)
    finally:
        f.sims.set_online(gone, True)


def _pause_and_offline(f: Fleet, gone: list[str]) -> None:
    wait_for(lambda: f.store.device(gone[0])["state"] == "offline", 30.0, what="goodbye")
    took0 = {d: u["commands"] for d, u in f.sims.updates().items()}
    rid = f.start("2026.11.4", "--stages", "25,100%", "--stage-timeout", "6")
    wait_for(lambda: f.book.status(rid)["stages"][0]["state"] == "active", 30.0,
             what="stage 1")
    rc, out = f.cli("rollout", "pause")
    assert rc == 0 and "paused" in out, out
    time.sleep(8.0)  # stage 1 finishes and its stage timeout passes while paused
    st = f.book.status(rid)
    assert st["state"] == "paused" and st["stages"][1]["state"] == "pending"
    devs = f.book.assignments(rid)
    boxes = f.sims.updates()
    assert not any(boxes[d]["commands"] > took0[d] for d, a in devs.items() if a.stage == 1)
    rc, out = f.cli("rollout", "resume")
    assert rc == 0, out
    st = f.wait_state(rid, ("completed",), 90.0)
    assert st["counts"] == {"healthy": BOXES - 1, "offline": 1}
    assert st["failures"] == 0 and st["not_counted"][0]["device"] == gone[0]
    assert f.sims.updates()[gone[0]]["commands"] == took0[gone[0]]


def test_a_service_restart_mid_rollout_continues_where_it_stopped(clean):
    f = clean
    f.release("2026.11.5")
    took0 = {d: u["jobs"] for d, u in f.sims.updates().items()}
    rid = f.start("2026.11.5", "--stages", "10,50,100%")
    wait_for(lambda: f.book.status(rid)["stages"][1]["state"] == "active", 60.0,
             what="stage 2")
    f.kill_service()
    mid = f.book.status(rid)
    time.sleep(2.0)  # the boxes go on; their reports wait in their spools and the broker
    f.start_service()
    st = f.wait_state(rid, ("completed", "paused"), 120.0)
    assert st["state"] == "completed", st["reason"]
    boxes = f.sims.updates()
    assert all(u["software"] == "2026.11.5" for u in boxes.values())
    assert all(boxes[d]["jobs"] - took0[d] == 1 for d in boxes), \
        "a box installed the update twice (or never) across the restart"
    assert mid["stages"][0]["state"] == "done" and mid["stages"][2]["state"] == "pending"
    log = [e["new"] for e in reversed(f.book.log(rid, limit=100000))
           if e["device"] is None]
    assert log.count("stage 2 active") == 1 and log[-1] == "completed"


# ---------------------------------------------------------------------- bad input
def test_bad_input_gets_clear_errors(tmp_path):
    db = tmp_path / "fleet.db"
    cfg = tmp_path / "fleet.toml"
    cfg.write_text(f'[fleet]\ndb = "{db}"\n')
    store = FleetStore(str(db))
    store.set_group("box-1", "studio")

    def cli(*args: str) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = echoel_main(["fleet", "--fleet-config", str(cfg), *args])
        return rc, out.getvalue()

    art = tmp_path / "echoel-2026.11.2.raucb"
    data = b"bundle" * 1000
    art.write_bytes(data)
    rc, out = cli("release", "add", str(art), "--url", "https://u.example/b.raucb")
    assert rc == 0, out
    rel = releases.require(store, "echoel-2026.11.2")
    assert (rel.size, rel.sha256, rel.artifact) == (len(data), hashlib.sha256(data).hexdigest(),
                                                    "system")
    for args, words in (
            (("release", "add", str(tmp_path / "nope.raucb"), "--url", "https://a/b"),
             "no such file"),
            (("release", "add", "https://a.example/x.raucb"), "needs --sha256 and --size"),
            (("release", "add", str(art), "--url", "https://a/b", "--sha256", "0" * 64),
             "does not match"),
            (("release", "add", str(art), "--url", "http://a/b"), "https only"),
            (("release", "add", str(art), "--url", "https://x/y", "--name",
              "echoel-2026.11.2"), "already recorded with other content"),
            (("rollout", "start", "9.9.9", "--group", "studio"), "no release '9.9.9'"),
            (("rollout", "start", "echoel-2026.11.2", "--group", "studio", "--stages",
              "0,120%"), "stage 1 is 0%"),
            (("rollout", "start", "echoel-2026.11.2", "--group", "nobody"),
             "group 'nobody' has no boxes; groups: studio \\(1\\)"),
            (("rollout", "start", "echoel-2026.11.2", "--group", "a b"), "group 'a b'"),
            (("rollout", "start", "echoel-2026.11.2", "--group", "studio",
              "--max-failures", "-1"), "max failures -1"),
            (("rollout", "pause", "7"), "no rollout 7"),
            (("rollout", "resume"), "none is active")):
        rc, out = cli(*args)
        assert rc == 2, (args, out)
        assert re.search(words, out), (args, out)
    rc, out = cli("rollout", "start", "echoel-2026.11.2", "--group", "studio")
    assert rc == 0, out
    rc, out = cli("rollout", "start", "echoel-2026.11.2", "--group", "studio")
    assert rc == 2 and "still active on group 'studio'" in out
    rc, out = cli("rollout", "status", "--json")
    assert rc == 0 and json.loads(out)["counts"] == {"pending": 1}
    store.close()


def test_start_skips_boxes_on_the_release_and_incompatible_ones(tmp_path):
    store = FleetStore(str(tmp_path / "fleet.db"))
    running = {"b1": "2026.10.3", "b2": "2026.11.2", "b3": "2026.09.1", "b4": "2026.10.0"}
    store.ingest([(d, "state", {"state": "online", "seq": 1, "software": sw, "group": "g"})
                  for d, sw in running.items()])
    releases.add(store, releases.Release("2026.11.2", "system", "https://u.example/r",
                                         10, SHA, ("2026.10.*",)))
    book = RolloutBook(store)
    rid = book.create("2026.11.2", "g", "50,100%", 0)
    states = {d: a.state for d, a in book.assignments(rid).items()}
    want = {d: "healthy" if sw == "2026.11.2" else "pending" if sw.startswith("2026.10.")
            else "incompatible" for d, sw in running.items()}
    assert states == want
    st = book.status(rid)
    assert [n["device"] for n in st["not_counted"]] == ["b3"]
    assert "installs over 2026.10.*" in st["not_counted"][0]["error"]
    store.close()
