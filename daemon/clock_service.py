"""The clock service (`echoel clock run`): ptp4l supervised, its state read and published.

It starts ptp4l with a config generated from [clock] (drivers/ptp4l_config.py), restarts it
with backoff when it dies (drivers/ptp4l_process.py), and four times a second reads its data
sets over the management socket (drivers/ptp_management.py). It publishes on
`bus-clock.sock` in the run folder: `status.clock` each poll, `event.clock` on changes
(grandmaster found, lost, changed; locked, unlocked; port state; ptp4l unavailable/available).

The status carries the read time on both clocks, so a consumer (the AES67 media clock) can
compute grandmaster time = system time + correction_ns (correction_ns = -offset_ns, the
last measured offset of the local clock from the grandmaster). With software timestamping the
local clock is CLOCK_REALTIME; with hardware timestamping it is the NIC's PTP clock, which
the system clock follows only through phc2sys.

`state` names the situation: "unavailable" (ptp4l not answering), "faulty", "listening" (no
grandmaster), "grandmaster" (this box leads), "passive", "uncalibrated" (servo settling),
"slave", and "free_running": free_running ptp4l never adjusts the clock, so its port stays
UNCALIBRATED for good while it measures offsets; it is reported as such, with the offsets.
Lock has hysteresis: `lock_samples` measurements in a row within lock_threshold_ns lock
(a measurement: a new sync, once a delay response has given a path delay),
`unlock_samples` beyond unlock_threshold_ns unlock; losing the grandmaster, a port state that
does not follow one, no new measurement for a while, or ptp4l not answering unlock at once.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from echoel.drivers import ptp4l_config
from echoel.drivers.ptp4l_process import Ptp4lProcess
from echoel.drivers.ptp_management import ManagementClient, ManagementError, Snapshot

log = logging.getLogger("echoel.clock")
UNAVAILABLE_AFTER = 3  # failed polls in a row before ptp4l counts as unavailable
FOLLOWING = ("slave", "free_running")  # states in which the lock can hold


@dataclass(frozen=True)
class LockPolicy:
    """Lock hysteresis: thresholds (ns) and the measurements in a row each needs."""

    lock_threshold_ns: int = 1000
    unlock_threshold_ns: int = 10000
    lock_samples: int = 8
    unlock_samples: int = 3

    @classmethod
    def from_clock(cls, clock: dict[str, Any]) -> LockPolicy:
        """The policy of a validated [clock] table."""
        return cls(clock["lock_threshold_ns"], clock["unlock_threshold_ns"],
                   clock["lock_samples"], clock["unlock_samples"])


def summarize(snap: Snapshot, free_running: bool) -> tuple[str, str | None]:
    """(state, identity of the grandmaster in charge or None) of one snapshot."""
    port = snap.port.port_state
    present = snap.time_status.gm_present
    if port in ("MASTER", "GRAND_MASTER") and not present:
        return "grandmaster", snap.port.port_identity.clock_identity
    gm = snap.parent.gm_identity if present else None
    if port == "SLAVE":
        return "slave", gm
    if port == "UNCALIBRATED":
        measuring = present and snap.time_status.ingress_time_ns != 0
        return ("free_running" if free_running and measuring else "uncalibrated"), gm
    if port == "PASSIVE":
        return "passive", gm
    # A slave-only ptp4l that lost its grandmaster goes back to LISTENING but keeps the old
    # parent data set (and gmPresent): no grandmaster is followed in these states.
    if port in ("FAULTY", "DISABLED"):
        return "faulty", None
    return "listening", None  # INITIALIZING, LISTENING, PRE_MASTER, unknown


class ClockTracker:
    """The clock's state from successive snapshots; `update` returns the events it caused."""

    def __init__(self, policy: LockPolicy, free_running: bool) -> None:
        self.policy = policy
        self.free_running = free_running
        self.state = "unavailable"
        self.port_state: str | None = None
        self.gm: str | None = None
        self.locked = False
        self.snap: Snapshot | None = None
        self.available = False
        self.failures = 0
        self.errors = 0
        self.last_error: str | None = None
        self.samples = 0
        self._good = self._bad = 0
        self._last_ingress = 0
        self._last_sample_mono = 0.0

    def _stale_s(self) -> float:
        log_sync = self.snap.port.log_sync_interval if self.snap else 0
        return max(2.0, 8 * 2.0 ** log_sync)

    def update(self, snap: Snapshot | None, error: str | None = None,
               now: float | None = None) -> list[dict]:
        """Feed one poll's result (a snapshot, or None and the error); events caused."""
        now = time.monotonic() if now is None else now
        ev: list[dict] = []
        if snap is None:
            self.errors += 1
            self.failures += 1
            self.last_error = error
            if self.failures >= UNAVAILABLE_AFTER and self.available:
                self.available = False
                ev.append({"event": "ptp4l_unavailable", "error": error})
            if not self.available:
                self._set_port(None, ev)
                self._set(None, "unavailable", ev)
                self.snap = None
                self._unlock(f"ptp4l not answering: {error}", ev)
            return ev
        self.failures = 0
        if not self.available:
            self.available = True
            ev.append({"event": "ptp4l_available"})
        self.snap = snap
        self._set_port(snap.port.port_state, ev)
        state, gm = summarize(snap, self.free_running)
        self._set(gm, state, ev)
        if state not in FOLLOWING or gm is None:
            self._unlock(f"state {state}", ev)
            return ev
        ts = snap.time_status
        if snap.current.mean_path_delay_ns == 0:  # no delay response yet: offsets are off
            return ev  # by the path delay; they do not count towards the lock
        if ts.ingress_time_ns and ts.ingress_time_ns != self._last_ingress:
            self._last_ingress = ts.ingress_time_ns
            self._last_sample_mono = now
            self.samples += 1
            self._measure(ts.master_offset_ns, ev)
        elif self.locked and now - self._last_sample_mono > self._stale_s():
            self._unlock(f"no new offset measurement for {now - self._last_sample_mono:.1f} s",
                         ev)
        return ev

    def _set_port(self, port: str | None, ev: list[dict]) -> None:
        if port != self.port_state:
            ev.append({"event": "port_state", "from": self.port_state, "to": port})
            self.port_state = port

    def _set(self, gm: str | None, state: str, ev: list[dict]) -> None:
        if gm != self.gm:
            if self.gm is None:
                ev.append({"event": "gm_found", "gm_identity": gm,
                           "self": state == "grandmaster"})
            elif gm is None:
                ev.append({"event": "gm_lost", "gm_identity": self.gm})
            else:
                ev.append({"event": "gm_changed", "from": self.gm, "to": gm})
            self._unlock("grandmaster changed" if gm else "grandmaster lost", ev)
            self.gm = gm
        self.state = state

    def _measure(self, offset_ns: int, ev: list[dict]) -> None:
        p = self.policy
        mag = abs(offset_ns)
        if mag <= p.lock_threshold_ns:
            self._good += 1
            self._bad = 0
        elif mag > p.unlock_threshold_ns:
            self._bad += 1
            self._good = 0
        else:  # between the thresholds: holds whichever state we are in
            self._good = self._bad = 0
        if not self.locked and self._good >= p.lock_samples:
            self.locked = True
            ev.append({"event": "locked", "gm_identity": self.gm, "offset_ns": offset_ns})
        elif self.locked and self._bad >= p.unlock_samples:
            self._unlock(f"|offset| above {p.unlock_threshold_ns} ns for {self._bad} "
                         "measurements", ev, offset_ns)

    def _unlock(self, reason: str, ev: list[dict], offset_ns: int | None = None) -> None:
        self._good = self._bad = 0
        if self.locked:
            self.locked = False
            ev.append({"event": "unlocked", "reason": reason, "offset_ns": offset_ns})

    def status(self) -> dict[str, Any]:
        """The clock's state as published (without the service's own fields)."""
        s = self.snap
        measured = (s is not None and self.gm is not None
                    and self.state in ("slave", "uncalibrated", "free_running")
                    and s.time_status.ingress_time_ns != 0)
        out: dict[str, Any] = {
            "state": self.state, "port_state": self.port_state, "gm_identity": self.gm,
            "gm_present": self.gm is not None and self.state != "grandmaster",
            "locked": self.locked,
            "offset_ns": s.time_status.master_offset_ns if measured else None,
            "correction_ns": -s.time_status.master_offset_ns if measured else None,
            # 0 until the first delay response: no measurement yet
            "path_delay_ns": (round(s.current.mean_path_delay_ns, 1)
                              if measured and s.current.mean_path_delay_ns else None),
            "ingress_time_ns": s.time_status.ingress_time_ns if measured else None,
            "samples": self.samples,
            "read_mono_ns": s.mono_ns if s else None,
            "read_realtime_ns": s.realtime_ns if s else None,
            "management_errors": self.errors, "last_error": self.last_error,
        }
        if s is not None:
            out.update({
                "clock_identity": s.port.port_identity.clock_identity,
                "parent_port": str(s.parent.parent_port_identity),
                "steps_removed": s.current.steps_removed,
                "gm_priority1": s.parent.gm_priority1, "gm_priority2": s.parent.gm_priority2,
                "gm_clock_class": s.parent.gm_clock_class,
                "log_sync_interval": s.port.log_sync_interval,
                "log_announce_interval": s.port.log_announce_interval,
            })
        return out


class ClockService:
    """ptp4l + management polling + the bus; see the module docstring."""

    def __init__(self, clock: dict[str, Any], run_dir: str | Path, source: str = "<config>",
                 manage_ptp4l: bool = True, uds_address: str | Path | None = None) -> None:
        self.clock = clock
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uds_address = Path(uds_address or self.run_dir / "ptp4l.sock")
        self.poll_s = clock["poll_interval_ms"] / 1000.0
        self.ptp4l: Ptp4lProcess | None = None
        self.time_stamping: str | None = None
        if manage_ptp4l:
            self.time_stamping = ptp4l_config.resolve_time_stamping(clock)
            text = ptp4l_config.generate(clock, self.uds_address, self.time_stamping, source)
            self.ptp4l = Ptp4lProcess(text, self.run_dir, clock["ptp4l"],
                                      clock["restart_max_s"])
        self.client = ManagementClient(self.uds_address, domain=clock["domain"],
                                       timeout_s=max(0.2, min(1.0, 2 * self.poll_s)))
        self.tracker = ClockTracker(LockPolicy.from_clock(clock), clock["free_running"])
        self.pub = zmq.Context.instance().socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(f"ipc://{self.run_dir}/bus-clock.sock")
        self.event_seq = 0
        self._stop = threading.Event()

    def poll_once(self) -> tuple[dict[str, Any], list[dict]]:
        """Supervise ptp4l, read its data sets once, publish; (status, events)."""
        if self.ptp4l is not None:
            self.ptp4l.supervise()
        try:
            snap, err = self.client.snapshot(), None
        except ManagementError as exc:
            snap, err = None, str(exc)
            log.debug("clock: %s", err)
        events = self.tracker.update(snap, err)
        for ev in events:
            self._event(ev)
        status = self.status()
        self.pub.send_multipart([b"status.clock", json.dumps(status).encode()])
        return status, events

    def status(self) -> dict[str, Any]:
        """The status as published on status.clock."""
        c = self.clock
        return {**self.tracker.status(), "free_running": c["free_running"],
                "domain": c["domain"], "interface": c["interface"], "profile": c["profile"],
                "transport": c["transport"], "time_stamping": self.time_stamping,
                # the local clock offset_ns is measured on: the system clock with software
                # timestamps; the NIC's PTP clock with hardware ones (system time follows it
                # only through phc2sys, which this service does not run)
                "offset_of": {"software": "CLOCK_REALTIME", "hardware": "PHC"}.get(
                    self.time_stamping or ""),
                "ptp4l": self.ptp4l.status() if self.ptp4l else None}

    def _event(self, ev: dict) -> None:
        self.event_seq += 1
        doc = {**ev, "time": time.time(), "seq": self.event_seq}
        level = logging.WARNING if ev["event"] in ("gm_lost", "unlocked",
                                                   "ptp4l_unavailable") else logging.INFO
        log.log(level, "clock: %s", json.dumps(ev))
        self.pub.send_multipart([b"event.clock", json.dumps(doc).encode()])

    def run(self, duration: float | None = None) -> int:
        """Poll until SIGTERM/SIGINT, `stop()` or `duration` seconds; stops ptp4l at the end."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *a: self.stop())
            signal.signal(signal.SIGINT, lambda *a: self.stop())
        end = None if duration is None else time.monotonic() + duration
        try:
            if self.ptp4l is not None:
                self.ptp4l.start()
            next_poll = time.monotonic()
            while not self._stop.is_set() and (end is None or time.monotonic() < end):
                try:
                    self.poll_once()
                except Exception:  # a bug must not take the clock's supervision down
                    log.exception("clock: poll failed")
                next_poll += self.poll_s
                delay = next_poll - time.monotonic()
                if delay < 0:  # overran (a slow ptp4l answer): do not try to catch up
                    next_poll, delay = time.monotonic(), 0.0
                self._stop.wait(delay)
        finally:
            self.close()
        return 0

    def stop(self) -> None:
        """Ask `run` to return after the current poll."""
        self._stop.set()

    def close(self) -> None:
        """Stop ptp4l, close the sockets."""
        if self.ptp4l is not None:
            self.ptp4l.stop()
        self.client.close()
        self.pub.close()
