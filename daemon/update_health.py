"""After booting a new slot: prove the box healthy within a deadline, else roll back.

`echoel update health-check` (the echoel-update-health systemd unit, after every boot) reads
the update state on the data partition:

- not after a system update, or still on the old slot with the reboot pending: nothing to do;
- booted the new slot (on trial): run the checks every few seconds until all of them pass
  continuously for `settle_s`: the engine running with xruns under the threshold (supervisor
  status over the local bus), the fleet agent connected (its heartbeat file), every named
  service publishing status; pass -> `rauc status mark-good`, event `healthy`; fail or no
  decision by the deadline (counted from the first boot on trial, so a crash loop cannot
  extend it) -> mark the slot bad, make the other slot primary, event `rebooting` with the
  evidence, reboot;
- back on the old slot after that (or the bootloader never started the new one): event
  `rolled_back` with the evidence.

Events go to the update folder's outbox; the fleet agent sends them (UpdateAgent.tick).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from echoel.daemon.update_agent import (
    LINK_FILE,
    RebootError,
    StateFile,
    UpdateSettings,
    make_event,
    post_to_outbox,
    run_reboot,
)
from echoel.drivers.rauc_client import RaucClient, RaucError

log = logging.getLogger("echoel.update.health")


@dataclass(frozen=True)
class Check:
    """One health check's outcome and its figures."""

    name: str
    ok: bool
    figures: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class HealthPolicy:
    """What healthy means and how long the box has to show it."""

    deadline_s: float = 300.0
    settle_s: float = 20.0
    max_xruns: int = 10
    services: tuple[str, ...] = ()
    need_agent: bool = True
    interval_s: float = 2.0

    @classmethod
    def from_settings(cls, s: UpdateSettings) -> HealthPolicy:
        """The policy in the [update] section (health_* keys)."""
        h = s.health
        names = tuple(n.strip() for n in str(h.get("services", "")).split(",") if n.strip())
        return cls(float(h.get("deadline_s", 300.0)), float(h.get("settle_s", 20.0)),
                   int(h.get("max_xruns", 10)), names, bool(h.get("need_agent", True)))


def engine_check(run_dir: Path, max_xruns: int, timeout_s: float = 3.0) -> Check:
    """The supervisor answers and the engine runs with at most `max_xruns` xruns."""
    from echoel.daemon import bus

    try:
        res = bus.request(run_dir, {"cmd": "status"}, timeout_s)
    except (TimeoutError, OSError, ValueError) as exc:
        return Check("engine", False, {}, f"supervisor unreachable: {exc}")
    s = res.get("status") or {}
    x = s.get("xruns") or {}
    xruns = int(x.get("capture", 0)) + int(x.get("playback", 0))
    figures = {"state": s.get("state"), "xruns": xruns, "max_xruns": max_xruns,
               "dsp_load_pct": s.get("dsp_load_pct"), "problem": s.get("problem"),
               "engine_restarts": s.get("engine_restarts")}
    if s.get("state") != "running":
        return Check("engine", False, figures, f"engine state {s.get('state')!r}, not running "
                     f"({s.get('problem') or 'no problem reported'})")
    if xruns > max_xruns:
        return Check("engine", False, figures, f"{xruns} xruns; at most {max_xruns} allowed")
    return Check("engine", True, figures)


def agent_check(update_dir: Path, max_age_s: float = 30.0) -> Check:
    """The fleet agent reported itself connected within `max_age_s`."""
    try:
        doc = json.loads((update_dir / LINK_FILE).read_text())
    except (OSError, ValueError):
        return Check("agent", False, {}, "no heartbeat from the fleet agent (not running?)")
    age = time.time() - float(doc.get("ts", 0))
    figures = {"connected": bool(doc.get("connected")), "heartbeat_age_s": round(age, 1)}
    if age > max_age_s:
        return Check("agent", False, figures, f"the agent's last heartbeat is {age:.0f} s old")
    if not doc.get("connected"):
        return Check("agent", False, figures, "the agent is not connected to the fleet")
    return Check("agent", True, figures)


def services_check(run_dir: Path, names: tuple[str, ...], wait_s: float = 3.0) -> Check:
    """Every named service publishes status.<name> on ipc://RUN/bus-<name>.sock."""
    import zmq

    if not names:
        return Check("services", True, {"required": []})
    ctx = zmq.Context.instance()
    socks = {}
    seen: dict[str, bool] = {n: False for n in names}
    try:
        for n in names:
            s = ctx.socket(zmq.SUB)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SUBSCRIBE, f"status.{n}".encode())
            s.connect(f"ipc://{run_dir}/bus-{n}.sock")
            socks[n] = s
        poller = zmq.Poller()
        for s in socks.values():
            poller.register(s, zmq.POLLIN)
        end = time.monotonic() + wait_s
        while not all(seen.values()) and time.monotonic() < end:
            for sock, _ in poller.poll(100):
                sock.recv_multipart()
                for n, s in socks.items():
                    if s is sock:
                        seen[n] = True
    finally:
        for s in socks.values():
            s.close()
    missing = [n for n, ok in seen.items() if not ok]
    figures = {"required": list(names), "silent": missing}
    if missing:
        return Check("services", False, figures, f"no status within {wait_s:g} s from: "
                     + ", ".join(missing))
    return Check("services", True, figures)


def default_probes(s: UpdateSettings, p: HealthPolicy) -> list[Callable[[], Check]]:
    """The checks of the policy, on this box's run and update folders."""
    run_dir = s.run_dir or Path("/run/echoel")
    probes: list[Callable[[], Check]] = [lambda: engine_check(run_dir, p.max_xruns)]
    if p.need_agent:
        probes.append(lambda: agent_check(s.dir))
    if p.services:
        probes.append(lambda: services_check(run_dir, p.services))
    return probes


class HealthCheck:
    """The post-boot decision for one box (see the module docstring)."""

    def __init__(self, settings: UpdateSettings, rauc: RaucClient | None = None,
                 emit: Callable[[dict], None] | None = None,
                 reboot: Callable[[], None] | None = None,
                 probes: list[Callable[[], Check]] | None = None,
                 policy: HealthPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.s = settings
        self.rauc = rauc or RaucClient(settings.rauc_conf or None)
        self.state = StateFile(settings.dir)
        self.emit = emit or (lambda ev: post_to_outbox(settings.dir, ev))
        self.policy = policy or HealthPolicy.from_settings(settings)
        self.probes = probes if probes is not None else default_probes(settings, self.policy)
        self.sleep = sleep
        self.reboot = reboot or (lambda: run_reboot(settings.reboot_command))

    def _event(self, st: dict, state: str, error: str | None = None,
               evidence: dict | None = None) -> dict:
        ev = make_event(st.get("release", "?"), "system", state, None, error, evidence)
        self.state.update(last_event=ev, state=state)
        self.emit(ev)
        return ev

    def run(self) -> dict | None:
        """Decide for this boot; returns the event emitted (None: nothing to decide)."""
        st = self.state.load()
        if st.get("artifact") != "system" or "to_slot" not in st:
            return None
        phase, state = st.get("phase"), st.get("state")
        if phase in ("done", None) and state not in ("installed", "rebooting"):
            return None
        try:
            booted = self.rauc.status().booted
        except RaucError as exc:
            return self._event(st, "failed", f"cannot read the boot state: {exc.message}")
        to_slot, from_slot = st["to_slot"], st["from_slot"]
        if phase == "rolling_back":
            if booted == from_slot:
                ev_data = dict(st.get("evidence") or {})
                ev_data["booted"] = booted
                self.state.update(phase="done")
                return self._event(st, "rolled_back", st.get("error"), ev_data)
            return self._roll_back(st, st.get("error") or "rollback did not happen",
                                   st.get("evidence") or {})
        if booted == from_slot:
            if state == "rebooting":
                self.state.update(phase="done")
                return self._event(st, "rolled_back", "the new slot did not come up: the "
                                   f"bootloader started slot {booted} again",
                                   {"booted": booted, "expected": to_slot})
            return None  # installed, the reboot has not happened yet
        if booted != to_slot:
            return None
        return self._trial(st)

    def _trial(self, st: dict) -> dict:
        started = st.get("trial_started") or time.time()
        boots = int(st.get("trial_boots", 0)) + 1
        self.state.update(phase="trial", trial_started=started, trial_boots=boots)
        p = self.policy
        deadline = started + p.deadline_s
        passing_since: float | None = None
        checks: list[Check] = []
        while True:
            checks = [probe() for probe in self.probes]
            now = time.time()
            if all(c.ok for c in checks):
                passing_since = passing_since or now
                if now - passing_since >= p.settle_s:
                    break
            else:
                passing_since = None
            if now >= deadline:
                failed = [c for c in checks if not c.ok]
                why = "; ".join(f"{c.name}: {c.error}" for c in failed) or \
                    f"not healthy for {p.settle_s:g} s in a row"
                return self._roll_back(st, f"health check failed within {p.deadline_s:g} s: "
                                       f"{why}", self._evidence(checks, started, boots))
            self.sleep(min(p.interval_s, max(0.05, deadline - now)))
        try:
            self.rauc.mark_good("booted")
        except RaucError as exc:
            return self._roll_back(st, f"rauc mark-good failed: {exc.message}",
                                   self._evidence(checks, started, boots))
        self.state.update(phase="done")
        return self._event(st, "healthy", None, self._evidence(checks, started, boots))

    def _evidence(self, checks: list[Check], started: float, boots: int) -> dict:
        return {"checks": [asdict(c) for c in checks],
                "seconds_on_trial": round(time.time() - started, 1), "trial_boots": boots,
                "deadline_s": self.policy.deadline_s}

    def _roll_back(self, st: dict, error: str, evidence: dict) -> dict:
        steps = []
        for what, fn in (("mark-bad booted", lambda: self.rauc.mark_bad("booted")),
                         ("mark-active other", lambda: self.rauc.mark_active("other"))):
            try:
                fn()
                steps.append(what)
            except RaucError as exc:
                steps.append(f"{what} failed: {exc.message}")
        evidence = {**evidence, "rollback_steps": steps}
        self.state.update(phase="rolling_back", error=error, evidence=evidence)
        ev = self._event(st, "rebooting", error, evidence)
        try:
            self.reboot()
        except RebootError as exc:
            # the previous slot is primary already: the next reboot, whoever makes it, is
            # the rollback
            log.error("rolling back: %s", exc)
            ev = self._event(st, "rebooting", f"{error}; and the reboot failed: {exc}",
                             {**evidence, "reboot_error": str(exc)})
        return ev
