"""Staged rollouts: the state machine (pure decisions) and its stored form.

A rollout sends one release to a group of boxes in cumulative stages (e.g. 1, 10, 50, 100 % of
the group). Each box of the group is assigned to a stage when the rollout starts (a fixed,
well-spread order), and goes through these states:

    pending     its stage has not come
    waiting     its stage is active; the `update` command goes out as soon as it is online
    sent        command published, no reply yet (no reply in reply_timeout_s: waiting again)
    accepted    the box said {"ok": true}; then its update events: downloading, verifying,
                installing, installed, rebooting
    confirming  it reported healthy, but its running software is not the release yet (a system
                update is healthy only when the box runs it: its birth or telemetry says so)
    healthy     success
    failed, rolled_back, timeout   failures (timeout: accepted, no final report within
                update_timeout_s of the command: a box that took the update and did not come
                back healthy is evidence against the release)
    refused     the box said no (busy, malformed...): not a failure, the release did not run
    offline     never reachable while its stage was active (stage_timeout_s): not a failure,
                nothing is known; a later rollout of the release picks it up (a box that
                reports on the update after all, while the rollout is tracked, is followed)
    incompatible  its running software is not one the release installs over (at start)
    (a box that already runs a system release is healthy from the start: nothing is sent)
    cancelled   the rollout was aborted before the box got the command

A stage is done when each of its boxes is final. The next stage starts only then, and only if
the rollout is running. More failures (over the whole rollout) than `max_failures` pause it by
itself; `resume` acknowledges the failures seen so far (the threshold counts from there). A stage
that ends without a single healthy box (all offline or refused) pauses too: nothing proves the
release. Boxes already updating when a rollout is paused or aborted go on (the command cannot be
taken back) and their reports are still recorded.

`plan()` is pure: it takes the rollout as loaded plus what was observed (replies, update events,
presence) and the time, changes the in-memory objects and returns the changes and the commands
to send. `RolloutBook` loads and stores (FleetStore: SQLite or PostgreSQL, the same SQL); every
change is in `rollout_log` with its time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from echoel.fleet import releases
from echoel.fleet.store import FleetStore

PROGRESS = ("downloading", "verifying", "installing", "installed", "rebooting")
IN_FLIGHT = ("sent", "accepted", *PROGRESS, "confirming")
FAILURES = ("failed", "rolled_back", "timeout")
NOT_COUNTED = ("refused", "offline", "incompatible", "cancelled")
FINAL = ("healthy", *FAILURES, *NOT_COUNTED)
DEVICE_STATES = ("pending", "waiting", *IN_FLIGHT, *FINAL)
ROLLOUT_STATES = ("running", "paused", "completed", "aborted")
ACTIVE = ("running", "paused")
REBOOT = ("now", "window", "never")
REPORTED = (*PROGRESS, "healthy", "failed", "rolled_back", "refused")  # the box's event states
GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS rollouts (id BIGINT PRIMARY KEY, release TEXT NOT NULL,
        grp TEXT NOT NULL, stages TEXT NOT NULL, max_failures INTEGER NOT NULL,
        failures_base INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, reason TEXT,
        current INTEGER NOT NULL DEFAULT 0, reboot TEXT NOT NULL,
        stage_timeout_s DOUBLE PRECISION NOT NULL, update_timeout_s DOUBLE PRECISION NOT NULL,
        created DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL,
        rev BIGINT NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS rollout_stages (rollout BIGINT NOT NULL, idx INTEGER NOT NULL,
        percent DOUBLE PRECISION NOT NULL, state TEXT NOT NULL, started DOUBLE PRECISION,
        finished DOUBLE PRECISION, PRIMARY KEY (rollout, idx))""",
    """CREATE TABLE IF NOT EXISTS rollout_devices (rollout BIGINT NOT NULL, device TEXT NOT NULL,
        stage INTEGER NOT NULL, state TEXT NOT NULL, since DOUBLE PRECISION NOT NULL,
        sent_at DOUBLE PRECISION, tries INTEGER NOT NULL DEFAULT 0, corr TEXT,
        event_seq BIGINT NOT NULL DEFAULT 0, progress INTEGER, error TEXT, evidence TEXT,
        PRIMARY KEY (rollout, device))""",
    """CREATE TABLE IF NOT EXISTS rollout_log (rollout BIGINT NOT NULL, ts DOUBLE PRECISION
        NOT NULL, pos INTEGER NOT NULL, device TEXT, old TEXT, new TEXT NOT NULL,
        detail TEXT)""",
    "CREATE INDEX IF NOT EXISTS rollout_log_by ON rollout_log (rollout, ts, pos)",
]


class RolloutError(ValueError):
    """A rollout that cannot be started or changed; the message says what and why."""


class ConflictError(RuntimeError):
    """The rollout changed in the store while a plan was made (an operator's pause, abort...):
    the plan is dropped and made again from the new state."""


# ---------------------------------------------------------------------- the model
@dataclass
class Stage:
    """One stage: its cumulative share of the group and its state (pending, active, done)."""

    idx: int
    percent: float
    state: str = "pending"
    started: float | None = None
    finished: float | None = None


@dataclass
class Assignment:
    """One box in a rollout."""

    device: str
    stage: int
    state: str
    since: float
    sent_at: float | None = None
    tries: int = 0
    corr: str | None = None
    event_seq: int = 0
    progress: int | None = None
    error: str | None = None
    evidence: dict | None = None
    dirty: bool = False


@dataclass
class Rollout:
    """A rollout's own row."""

    id: int
    release: str
    group: str
    stages: list[float]
    max_failures: int
    reboot: str
    stage_timeout_s: float
    update_timeout_s: float
    state: str = "running"
    reason: str | None = None
    current: int = 0
    failures_base: int = 0
    created: float = 0.0
    updated: float = 0.0
    rev: int = 0


@dataclass(frozen=True)
class Presence:
    """What the store knows of a box now: online, and the software it runs."""

    online: bool
    software: str | None


@dataclass
class Observations:
    """What came in since the last plan: replies to our commands (by device), update events
    (by device, (seq, document) in seq order) and every assigned box's presence."""

    replies: dict[str, tuple[str, bool, dict]] = field(default_factory=dict)  # corr, ok, doc
    events: dict[str, list[tuple[int, dict]]] = field(default_factory=dict)
    presence: dict[str, Presence] = field(default_factory=dict)


@dataclass(frozen=True)
class Change:
    """One state change, as logged: device None for the rollout or a stage ("stage N")."""

    device: str | None
    old: str | None
    new: str
    detail: dict


@dataclass
class Plan:
    """What one planning step decided: changes to store and devices to send `update` to."""

    changes: list[Change] = field(default_factory=list)
    send: list[str] = field(default_factory=list)
    rollout_changed: bool = False
    stages_changed: set[int] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        """Nothing to store or send."""
        return not (self.changes or self.send or self.rollout_changed or self.stages_changed)


# ---------------------------------------------------------------------- pure decisions
def parse_stages(text: str) -> list[float]:
    """'1,10,50,100%' (or '1%,10%,...') as cumulative percentages; RolloutError otherwise."""
    parts = [p.strip().rstrip("%").strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise RolloutError(f"stages {text!r}: write cumulative percentages of the group, "
                           "e.g. 1,10,50,100%")
    out: list[float] = []
    for i, p in enumerate(parts, 1):
        try:
            v = float(p)
        except ValueError:
            raise RolloutError(f"stages {text!r}: stage {i} is {p!r}, not a number") from None
        if not (0.0 < v <= 100.0) or not math.isfinite(v):
            raise RolloutError(f"stages {text!r}: stage {i} is {v:g}%; each stage is a share "
                               "of the group above 0 and at most 100%")
        if out and v <= out[-1]:
            raise RolloutError(f"stages {text!r}: stage {i} ({v:g}%) must be above stage "
                               f"{i - 1} ({out[-1]:g}%): stages are cumulative")
        out.append(v)
    if out[-1] != 100.0:
        raise RolloutError(f"stages {text!r}: the last stage is {out[-1]:g}%; it must be 100% "
                           "(a rollout ends with the whole group)")
    if len(out) > 20:
        raise RolloutError(f"stages {text!r}: {len(out)} stages; at most 20")
    return out


def spread_order(rollout_id: int, devices: list[str]) -> list[str]:
    """The boxes in a fixed order that differs per rollout (so the first stage is not always
    the same few boxes) and does not depend on when they joined."""
    return sorted(devices, key=lambda d: hashlib.sha256(f"{rollout_id}/{d}".encode()).digest())


def stage_sizes(n: int, stages: list[float]) -> list[int]:
    """Boxes per stage: stage k takes the group up to ceil(n * p_k / 100) (at least 1)."""
    out, before = [], 0
    for p in stages:
        upto = min(n, max(1, math.ceil(n * p / 100.0 - 1e-9))) if n else 0
        out.append(upto - before)
        before = upto
    return out


def report_of(doc: dict) -> dict:
    """The update report of an event: its fields at top level (the protocol), or under
    "data" (the agent's wrapping of supervisor events)."""
    if "state" not in doc and isinstance(doc.get("data"), dict):
        return doc["data"]
    return doc


def _set(plan: Plan, a: Assignment, new: str, now: float, **detail: Any) -> None:
    if a.state == new:
        return
    plan.changes.append(Change(a.device, a.state, new, {k: v for k, v in detail.items()
                                                         if v is not None}))
    a.state, a.since, a.dirty = new, now, True


def _rollout_state(plan: Plan, ro: Rollout, new: str, reason: str | None, **detail: Any) -> None:
    plan.changes.append(Change(None, ro.state, new, {"reason": reason, **detail}))
    ro.state, ro.reason = new, reason
    plan.rollout_changed = True


def _apply_reply(plan: Plan, a: Assignment, ok: bool, doc: dict, now: float) -> None:
    if a.state not in ("sent", "waiting"):
        return  # events got there first, or the stage moved on
    if ok:
        _set(plan, a, "accepted", now)
    else:
        a.error = str(doc.get("error") or "refused without a reason")
        _set(plan, a, "refused", now, error=a.error)


def _apply_event(plan: Plan, ro: Rollout, artifact: str, a: Assignment, seq: int, doc: dict,
                 presence: Presence | None, now: float) -> None:
    a.event_seq = max(a.event_seq, seq)
    a.dirty = True
    rep = report_of(doc)
    if rep.get("release") != ro.release:
        return
    state = rep.get("state")
    if state not in REPORTED:
        return
    if a.state in ("healthy", *FAILURES) and state in PROGRESS:
        return  # a late progress report never undoes a final one
    prog = rep.get("progress")
    a.progress = int(prog) if isinstance(prog, int | float) and not isinstance(prog, bool) \
        else a.progress
    if state == "healthy":
        if artifact == "system" and (presence is None or presence.software != ro.release):
            running = presence.software if presence else None
            _set(plan, a, "confirming", now, running=running)
        else:
            a.error, a.evidence = None, None
            _set(plan, a, "healthy", now)
        return
    if state in ("failed", "rolled_back", "refused"):
        a.error = str(rep.get("error") or state)
        ev = rep.get("evidence")
        a.evidence = ev if isinstance(ev, dict) else ({"reported": ev} if ev else None)
        _set(plan, a, state, now, error=a.error, evidence=a.evidence)
        return
    _set(plan, a, state, now, progress=a.progress if state in ("downloading", "installing")
         else None)


def failures(devs: dict[str, Assignment]) -> list[Assignment]:
    """The boxes that count as failures now."""
    return [a for a in devs.values() if a.state in FAILURES]


def plan(ro: Rollout, artifact: str, stages: list[Stage], devs: dict[str, Assignment],
         obs: Observations, now: float, reply_timeout_s: float) -> Plan:
    """Decide one step: apply replies and events, time out, pause on failures, finish and
    start stages, pick the boxes to send the command to. Changes the objects given."""
    p = Plan()
    # 1. what the boxes said
    for dev, (corr, ok, doc) in obs.replies.items():
        a = devs.get(dev)
        if a is not None and a.corr == corr:
            _apply_reply(p, a, ok, doc, now)
    for dev, evs in obs.events.items():
        a = devs.get(dev)
        if a is None:
            continue
        for seq, doc in evs:
            if seq > a.event_seq:
                _apply_event(p, ro, artifact, a, seq, doc, obs.presence.get(dev), now)
    # 2. a confirming box whose birth or telemetry now shows the release
    for a in devs.values():
        pr = obs.presence.get(a.device)
        if a.state == "confirming" and pr is not None and pr.software == ro.release:
            _set(p, a, "healthy", now)
    # 3. timeouts
    for a in devs.values():
        if a.state == "sent" and a.sent_at is not None and now - a.sent_at > reply_timeout_s:
            _set(p, a, "waiting", now, why=f"no answer to the command in {reply_timeout_s:g} s"
                 "; sent again when online")
        elif a.state in IN_FLIGHT and a.state != "sent" and a.sent_at is not None and \
                now - a.sent_at > ro.update_timeout_s:
            pr = obs.presence.get(a.device)
            a.error = (f"no final report {now - a.sent_at:.0f} s after the command (limit "
                       f"{ro.update_timeout_s:g} s); last state {a.state}")
            a.evidence = {"last_state": a.state, "seconds": round(now - a.sent_at, 1),
                          "online": pr.online if pr else None,
                          "running": pr.software if pr else None}
            _set(p, a, "timeout", now, error=a.error, evidence=a.evidence)
    if ro.state == "aborted":
        for a in devs.values():
            if a.state in ("pending", "waiting"):
                _set(p, a, "cancelled", now, why="rollout aborted")
    if ro.state != "running":
        return p
    # 4. too many failures: pause by itself
    failed = failures(devs)
    if len(failed) - ro.failures_base > ro.max_failures:
        names = ", ".join(f"{a.device} {a.state}" for a in failed[:5])
        _rollout_state(p, ro, "paused", f"{len(failed) - ro.failures_base} failures, more than "
                       f"max_failures {ro.max_failures}: {names}",
                       failures=[a.device for a in failed])
        return p
    # 5. stages
    while ro.current < len(stages):
        st = stages[ro.current]
        members = [a for a in devs.values() if a.stage == st.idx]
        if st.state == "pending":
            st.state, st.started = "active", now
            p.stages_changed.add(st.idx)
            p.changes.append(Change(None, "pending", f"stage {st.idx + 1} active",
                                    {"percent": st.percent, "boxes": len(members)}))
            for a in members:
                if a.state == "pending":
                    _set(p, a, "waiting", now)
        if st.state == "active":
            if st.started is not None and now - st.started > ro.stage_timeout_s:
                for a in members:  # a box sent to gets its reply_timeout_s first
                    if a.state == "waiting":
                        why = "offline" if a.tries == 0 else \
                            f"no answer to {a.tries} command(s)"
                        _set(p, a, "offline", now, why=f"{why} while stage {st.idx + 1} was "
                             f"active ({ro.stage_timeout_s:g} s)")
            if any(a.state not in FINAL for a in members):
                break
            st.state, st.finished = "done", now
            p.stages_changed.add(st.idx)
            counts = _counts(members)
            p.changes.append(Change(None, "active", f"stage {st.idx + 1} done", counts))
            eligible = [a for a in members if a.state != "incompatible"]
            if eligible and counts.get("healthy", 0) == 0:
                ro.current += 1
                _rollout_state(p, ro, "paused", f"stage {st.idx + 1} ended without a healthy "
                               f"box ({_count_text(counts)}): nothing proves the release; "
                               "resume to go on")
                return p
        ro.current += 1
        p.rollout_changed = True
    if ro.current >= len(stages):
        counts = _counts(list(devs.values()))
        _rollout_state(p, ro, "completed", f"every stage done: {_count_text(counts)}")
        return p
    # 6. send to the active stage's boxes that are online
    st = stages[ro.current]
    for a in devs.values():
        if a.stage == st.idx and a.state == "waiting":
            pr = obs.presence.get(a.device)
            if pr is not None and pr.online:
                a.tries += 1
                a.sent_at = now
                a.corr = f"ro{ro.id}-{a.device}-{a.tries}"
                _set(p, a, "sent", now, corr=a.corr)
                p.send.append(a.device)
    return p


def _counts(members: list[Assignment]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in members:
        out[a.state] = out.get(a.state, 0) + 1
    return dict(sorted(out.items()))


def _count_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in counts.items()) or "no boxes"


# ---------------------------------------------------------------------- stored form
class RolloutBook:
    """Rollouts in the fleet store: create, load, observe, save a plan, operator actions."""

    def __init__(self, store: FleetStore) -> None:
        self.store = store
        releases.ensure_tables(store)
        with store.tx() as cur:
            for stmt in SCHEMA:
                cur.execute(stmt)

    # -- operator actions
    def create(self, release: str, group: str, stages: str, max_failures: int,
               reboot: str = "now", stage_timeout_s: float = 1800.0,
               update_timeout_s: float = 3600.0, now: float | None = None) -> int:
        """Record a new running rollout (the worker starts its first stage); its id."""
        now = time.time() if now is None else now
        rel = releases.require(self.store, release)
        pct = parse_stages(stages)
        if not GROUP_RE.match(group):
            raise RolloutError(f"group {group!r}: 1-64 letters, digits, '.', '_' or '-'")
        if isinstance(max_failures, bool) or not isinstance(max_failures, int) or \
                max_failures < 0:
            raise RolloutError(f"max failures {max_failures!r}: a whole number >= 0 (0: the "
                               "first failure pauses the rollout)")
        if reboot not in REBOOT:
            raise RolloutError(f"reboot {reboot!r}: allowed: {', '.join(REBOOT)}")
        for what, v in (("stage timeout", stage_timeout_s), ("update timeout",
                                                             update_timeout_s)):
            if not (1.0 <= v <= 7 * 86400.0):
                raise RolloutError(f"{what} {v:g} s: allowed from 1 s to 7 days")
        with self.store.tx() as cur:
            rows = cur.execute("SELECT id, software FROM devices WHERE grp = ?",
                               (group,)).fetchall()
            if not rows:
                groups = cur.execute("SELECT grp, count(*) FROM devices WHERE grp <> '' "
                                     "GROUP BY grp ORDER BY grp").fetchall()
                known = ", ".join(f"{g} ({n})" for g, n in groups[:10]) or "none yet"
                raise RolloutError(f"group {group!r} has no boxes; groups: {known}")
            busy = cur.execute("SELECT id, release FROM rollouts WHERE grp = ? AND state IN "
                               "('running', 'paused')", (group,)).fetchone()
            if busy:
                raise RolloutError(f"rollout {busy[0]} ({busy[1]}) is still active on group "
                                   f"{group!r}: let it complete or abort it first")
            rid = int(cur.execute("SELECT COALESCE(MAX(id), 0) FROM rollouts").fetchone()[0]) + 1
            software = dict(rows)
            order = spread_order(rid, list(software))
            sizes = stage_sizes(len(order), pct)
            cur.execute("INSERT INTO rollouts (id, release, grp, stages, max_failures, "
                        "failures_base, state, reason, current, reboot, stage_timeout_s, "
                        "update_timeout_s, created, updated, rev) VALUES "
                        "(?, ?, ?, ?, ?, 0, 'running', NULL, 0, ?, ?, ?, ?, ?, 0)",
                        (rid, rel.name, group, json.dumps(pct), max_failures, reboot,
                         float(stage_timeout_s), float(update_timeout_s), now, now))
            cur.executemany("INSERT INTO rollout_stages VALUES (?, ?, ?, 'pending', NULL, "
                            "NULL)", [(rid, i, p) for i, p in enumerate(pct)])
            rows_dev, k = [], 0
            for i, n in enumerate(sizes):
                for dev in order[k:k + n]:
                    state, err = "pending", None
                    if rel.artifact == "system" and software[dev] == rel.name:
                        state = "healthy"  # already runs it (its birth says so)
                    elif not rel.installs_over(software[dev]):
                        state = "incompatible"
                        err = f"runs {software[dev]}; the release installs over " \
                              f"{', '.join(rel.compatible)}"
                    rows_dev.append((rid, dev, i, state, now, err))
                k += n
            cur.executemany("INSERT INTO rollout_devices (rollout, device, stage, state, since, "
                            "error) VALUES (?, ?, ?, ?, ?, ?)", rows_dev)
            log = [(rid, now, 0, None, None, "running",
                    json.dumps({"release": rel.name, "group": group, "stages": pct,
                                "sizes": sizes, "max_failures": max_failures}))]
            log += [(rid, now, i, r[1], None, r[3], json.dumps({"stage": r[2] + 1}))
                    for i, r in enumerate(rows_dev, 1)]
            cur.executemany("INSERT INTO rollout_log VALUES (?, ?, ?, ?, ?, ?, ?)", log)
        return rid

    def _operator(self, rid: int, allowed: tuple[str, ...], new: str, why: str,
                  extra_sql: str = "", extra: tuple = ()) -> Rollout:
        ro = self.rollout(rid)
        if ro.state not in allowed:
            raise RolloutError(f"rollout {rid} is {ro.state}; {new} needs it "
                               f"{' or '.join(allowed)}")
        now = time.time()
        with self.store.tx() as cur:
            n = cur.execute(f"UPDATE rollouts SET state = ?, reason = ?, updated = ?, "
                            f"rev = rev + 1{extra_sql} WHERE id = ? AND rev = ?",
                            (new, why, now, *extra, rid, ro.rev)).rowcount
            if n != 1:
                raise RolloutError(f"rollout {rid} changed meanwhile; try again")
            cur.execute("INSERT INTO rollout_log VALUES (?, ?, 0, NULL, ?, ?, ?)",
                        (rid, now, ro.state, new, json.dumps({"reason": why})))
        return self.rollout(rid)

    def pause(self, rid: int) -> Rollout:
        """Stop sending to more boxes (boxes already updating go on)."""
        return self._operator(rid, ("running",), "paused", "paused by the operator")

    def resume(self, rid: int, max_failures: int | None = None) -> Rollout:
        """Go on; failures so far are acknowledged (the threshold counts from here)."""
        ro = self.rollout(rid)
        nfail = sum(1 for a in self.assignments(rid).values() if a.state in FAILURES)
        mf = ro.max_failures if max_failures is None else max_failures
        if isinstance(mf, bool) or not isinstance(mf, int) or mf < 0:
            raise RolloutError(f"max failures {mf!r}: a whole number >= 0")
        out = self._operator(rid, ("paused",), "running",
                             f"resumed by the operator ({nfail} failures acknowledged)",
                             ", failures_base = ?, max_failures = ?", (nfail, mf))
        with self.store.tx() as cur:  # the stage timeout counts from the resume
            cur.execute("UPDATE rollout_stages SET started = ? WHERE rollout = ? AND "
                        "state = 'active'", (time.time(), rid))
        return out

    def abort(self, rid: int) -> Rollout:
        """End the rollout: boxes not sent to yet are cancelled (the worker marks them)."""
        return self._operator(rid, ACTIVE, "aborted", "aborted by the operator")

    # -- loading
    def rollout(self, rid: int) -> Rollout:
        """One rollout's row; RolloutError if there is none."""
        with self.store.tx() as cur:
            r = cur.execute("SELECT id, release, grp, stages, max_failures, reboot, "
                            "stage_timeout_s, update_timeout_s, state, reason, current, "
                            "failures_base, created, updated, rev FROM rollouts WHERE id = ?",
                            (rid,)).fetchone()
        if r is None:
            raise RolloutError(f"no rollout {rid}; `echoel fleet rollout list` shows them")
        return Rollout(int(r[0]), r[1], r[2], json.loads(r[3]), int(r[4]), r[5], float(r[6]),
                       float(r[7]), r[8], r[9], int(r[10]), int(r[11]), float(r[12]),
                       float(r[13]), int(r[14]))

    def ids(self, states: tuple[str, ...] | None = None) -> list[int]:
        """Rollout ids (in these states), oldest first."""
        q, p = "SELECT id FROM rollouts", ()
        if states:
            q += " WHERE state IN (" + ", ".join("?" * len(states)) + ")"
            p = states
        with self.store.tx() as cur:
            return [int(r[0]) for r in cur.execute(q + " ORDER BY id", p).fetchall()]

    def tracked(self) -> list[int]:
        """Rollouts the worker looks after: active ones, and ended ones with boxes still
        updating (their reports are recorded)."""
        inflight = ", ".join(f"'{s}'" for s in IN_FLIGHT)
        with self.store.tx() as cur:
            rows = cur.execute("SELECT id FROM rollouts WHERE state IN ('running', 'paused') "
                               "OR id IN (SELECT DISTINCT rollout FROM rollout_devices WHERE "
                               f"state IN ({inflight}, 'pending', 'waiting')) "
                               "ORDER BY id").fetchall()
        return [int(r[0]) for r in rows]

    def stages(self, rid: int) -> list[Stage]:
        """A rollout's stages in order."""
        with self.store.tx() as cur:
            rows = cur.execute("SELECT idx, percent, state, started, finished FROM "
                               "rollout_stages WHERE rollout = ? ORDER BY idx",
                               (rid,)).fetchall()
        return [Stage(int(r[0]), float(r[1]), r[2], r[3], r[4]) for r in rows]

    def assignments(self, rid: int) -> dict[str, Assignment]:
        """A rollout's boxes."""
        with self.store.tx() as cur:
            rows = cur.execute("SELECT device, stage, state, since, sent_at, tries, corr, "
                               "event_seq, progress, error, evidence FROM rollout_devices "
                               "WHERE rollout = ?", (rid,)).fetchall()
        return {r[0]: Assignment(r[0], int(r[1]), r[2], float(r[3]), r[4], int(r[5]), r[6],
                                 int(r[7]), r[8], r[9], json.loads(r[10]) if r[10] else None)
                for r in rows}

    def observe(self, ro: Rollout, devs: dict[str, Assignment], online_window_s: float,
                now: float | None = None) -> Observations:
        """Replies, new update events and presence of a rollout's boxes, from the store (the
        ingest path puts them there)."""
        now = time.time() if now is None else now
        obs = Observations()
        with self.store.tx() as cur:
            rows = cur.execute(
                "SELECT d.device, c.corr, c.ok, c.reply FROM rollout_devices d JOIN commands c "
                "ON c.corr = d.corr WHERE d.rollout = ? AND d.state IN ('sent', 'waiting') "
                "AND c.replied IS NOT NULL", (ro.id,)).fetchall()
            for dev, corr, ok, reply in rows:
                obs.replies[dev] = (corr, bool(ok), json.loads(reply) if reply else {})
            rows = cur.execute(
                "SELECT e.device, e.seq, e.payload FROM rollout_devices d JOIN events e ON "
                "e.device = d.device WHERE d.rollout = ? AND d.corr IS NOT NULL AND "
                "e.kind = 'update' AND e.seq > d.event_seq ORDER BY e.device, e.seq",
                (ro.id,)).fetchall()
            for dev, seq, payload in rows:
                try:
                    doc = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    obs.events.setdefault(dev, []).append((int(seq), doc))
            rows = cur.execute(
                "SELECT v.id, v.state, v.last_seen, v.software FROM rollout_devices d JOIN "
                "devices v ON v.id = d.device WHERE d.rollout = ?", (ro.id,)).fetchall()
            confirming = {a.device for a in devs.values() if a.state == "confirming"}
            for dev, state, seen, software in rows:
                online = state == "online" and (seen is None or now - seen < online_window_s)
                if dev in confirming and software != ro.release:
                    software = self._telemetry_software(cur, dev) or software
                obs.presence[dev] = Presence(online, software)
        return obs

    @staticmethod
    def _telemetry_software(cur, dev: str) -> str | None:
        r = cur.execute("SELECT last_telemetry FROM devices WHERE id = ?", (dev,)).fetchone()
        try:
            t = json.loads(r[0]) if r and r[0] else {}
        except ValueError:
            return None
        return t.get("software") or (t.get("versions") or {}).get("software")

    def first_event_seq(self, devices: list[str]) -> dict[str, int]:
        """Each box's newest stored event seq (events before a command are not its reports)."""
        if not devices:
            return {}
        out: dict[str, int] = {}
        with self.store.tx() as cur:
            for i in range(0, len(devices), 500):
                part = devices[i:i + 500]
                rows = cur.execute("SELECT device, MAX(seq) FROM events WHERE device IN (" +
                                   ", ".join("?" * len(part)) + ") GROUP BY device",
                                   part).fetchall()
                out.update({d: int(s) for d, s in rows})
        return out

    # -- storing a plan
    def save(self, ro: Rollout, stages: list[Stage], devs: dict[str, Assignment], p: Plan,
             commands: dict[str, dict], now: float | None = None) -> None:
        """Store a plan in one transaction (the rollout row only if nobody changed it since it
        was loaded: else ConflictError, nothing stored) and log each change."""
        now = time.time() if now is None else now
        with self.store.tx() as cur:
            n = cur.execute("UPDATE rollouts SET state = ?, reason = ?, current = ?, "
                            "updated = ?, rev = rev + 1 WHERE id = ? AND rev = ?",
                            (ro.state, ro.reason, ro.current, now, ro.id, ro.rev)).rowcount
            if n != 1:
                raise ConflictError(f"rollout {ro.id} changed in the store")
            cur.executemany("UPDATE rollout_stages SET state = ?, started = ?, finished = ? "
                            "WHERE rollout = ? AND idx = ?",
                            [(s.state, s.started, s.finished, ro.id, s.idx) for s in stages
                             if s.idx in p.stages_changed])
            cur.executemany(
                "UPDATE rollout_devices SET state = ?, since = ?, sent_at = ?, tries = ?, "
                "corr = ?, event_seq = ?, progress = ?, error = ?, evidence = ? "
                "WHERE rollout = ? AND device = ?",
                [(a.state, a.since, a.sent_at, a.tries, a.corr, a.event_seq, a.progress,
                  a.error, json.dumps(a.evidence) if a.evidence is not None else None, ro.id,
                  a.device) for a in devs.values() if a.dirty])
            cur.executemany("INSERT INTO rollout_log VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [(ro.id, now, i, c.device, c.old, c.new,
                              json.dumps(c.detail) if c.detail else None)
                             for i, c in enumerate(p.changes)])
            cur.executemany("INSERT INTO commands (corr, device, name, args, sent) VALUES "
                            "(?, ?, 'update', ?, ?) ON CONFLICT (corr) DO NOTHING",
                            [(devs[d].corr, d, json.dumps(commands[d]), now) for d in p.send])
        ro.rev += 1
        for a in devs.values():
            a.dirty = False

    # -- the operator's view
    def log(self, rid: int, device: str | None = None, limit: int = 50) -> list[dict]:
        """The newest state changes of a rollout (or of one of its boxes), newest first."""
        q = "SELECT ts, device, old, new, detail FROM rollout_log WHERE rollout = ?"
        p: tuple = (rid,)
        if device:
            q, p = q + " AND device = ?", (rid, device)
        with self.store.tx() as cur:
            rows = cur.execute(q + " ORDER BY ts DESC, pos DESC LIMIT ?",
                               (*p, limit)).fetchall()
        return [{"ts": r[0], "device": r[1], "old": r[2], "new": r[3],
                 "detail": json.loads(r[4]) if r[4] else {}} for r in rows]

    def status(self, rid: int) -> dict:
        """A rollout: its row, each stage with counts per state, failures with evidence."""
        ro = self.rollout(rid)
        stages = self.stages(rid)
        devs = self.assignments(rid)
        out_stages = []
        for s in stages:
            members = [a for a in devs.values() if a.stage == s.idx]
            out_stages.append({"stage": s.idx + 1, "percent": s.percent, "state": s.state,
                               "boxes": len(members), "started": s.started,
                               "finished": s.finished, "counts": _counts(members)})
        failed = sorted(failures(devs), key=lambda a: a.since)
        nfail = len(failed)
        return {"id": ro.id, "release": ro.release, "group": ro.group, "state": ro.state,
                "reason": ro.reason, "current_stage": min(ro.current, len(stages) - 1) + 1,
                "max_failures": ro.max_failures, "failures": nfail,
                "failures_acknowledged": ro.failures_base, "reboot": ro.reboot,
                "stage_timeout_s": ro.stage_timeout_s, "update_timeout_s": ro.update_timeout_s,
                "created": ro.created, "updated": ro.updated, "counts": _counts(
                    list(devs.values())), "stages": out_stages,
                "failed": [{"device": a.device, "stage": a.stage + 1, "state": a.state,
                            "since": a.since, "error": a.error, "evidence": a.evidence}
                           for a in failed],
                "not_counted": [{"device": a.device, "stage": a.stage + 1, "state": a.state,
                                 "error": a.error} for a in devs.values()
                                if a.state in NOT_COUNTED],
                "log": self.log(rid, limit=20)}
