"""The rollout worker: moves stored rollouts forward (fleet/rollout.py decides, this acts).

It runs inside the fleet service, as a thread beside the ingest workers: the boxes' replies and
update events reach it through the store (the ingest path stores replies to logged commands and
every event), so it needs the ingest path running anyway, and the service's restart is its
restart: everything it knows is in the store (rollouts, stages, each box's state, the event
cursor), so a restarted service continues where it stopped. Each second (or when woken by the
ingest path, see `wake`) it loads every tracked rollout, observes replies, update events and
presence, plans, stores the plan in one transaction and only then publishes the `update`
commands (a crash between the two: no reply, sent again after reply_timeout_s). With several
fleet service instances on one store, a lease row lets one worker act at a time.

Commands go out on one MQTT 5 client with the service's identity (the box answers on
devices/<id>/reply/<this client>, which the ingest workers' subscription stores).

`python -m echoel.fleet.rollout_worker --fleet-config fleet.toml` runs the ingest service and
this worker together (what `echoel fleet serve` does once wired).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from echoel.daemon.config import Key, check_table
from echoel.drivers.mqtt_tls import BrokerLink, make_client
from echoel.fleet import releases
from echoel.fleet.protocol import encode, topic
from echoel.fleet.rollout import ConflictError, Presence, RolloutBook, plan
from echoel.fleet.store import FleetStore
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("echoel.fleet.rollout")

KEYS: dict[str, Key] = {
    "poll_s": Key(float, 1.0, "how often the worker looks at the rollouts (s)", 0.05, 60.0),
    "reply_timeout_s": Key(float, 30.0, "a box that does not answer the update command in "
                           "this long gets it again when online (s)", 1.0, 3600.0),
    "online_window_s": Key(float, 120.0, "a box counts as online when its birth says so and "
                           "it was heard from within this long (s)", 5.0, 86400.0),
    "lease_s": Key(float, 15.0, "one worker acts at a time on a shared store; a silent "
                   "holder loses the lease after this long (s)", 2.0, 600.0),
}
LEASE_SQL = """CREATE TABLE IF NOT EXISTS rollout_lease (name TEXT PRIMARY KEY, holder TEXT
    NOT NULL, expires DOUBLE PRECISION NOT NULL)"""


def settings(raw: dict | None = None, where: str = "<defaults>") -> dict:
    """The [rollout] table checked (defaults for what is not given)."""
    return check_table(where, "rollout", raw or {}, {"rollout": KEYS})


def _dead_here(holder: str) -> bool:
    """Whether a lease holder ("host/pid/tag") is a process of this host that is gone."""
    host, _, rest = holder.partition("/")
    pid = rest.partition("/")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class CommandSender:
    """One MQTT 5 client publishing `update` commands with a response topic and correlation
    data, as the operator's link does, without waiting for the reply (the store gets it)."""

    def __init__(self, link: BrokerLink, client_id: str | None = None) -> None:
        self.link = link
        self.me = client_id or f"fleet-rollout-{socket.gethostname()}-{os.getpid()}"
        self.client = make_client(link, self.me)
        self.client.reconnect_delay_set(1, 30)
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, f, rc, p: self.connected.clear()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("the broker refused the rollout sender: %s", reason_code)
            return
        self.connected.set()

    def start(self) -> None:
        """Connect in the background (and reconnect when the broker goes away)."""
        self.client.connect_async(self.link.host, self.link.port, self.link.keepalive_s)
        self.client.loop_start()

    def send(self, device: str, corr: str, args: dict) -> bool:
        """Publish the `update` command to a box (QoS 1); False if it could not be queued."""
        p = Properties(PacketTypes.PUBLISH)
        p.ResponseTopic = topic(device, f"reply/{self.me}")
        p.CorrelationData = corr.encode()
        info = self.client.publish(topic(device, "cmd"), encode({"name": "update",
                                                                 "args": args}),
                                   qos=1, properties=p)
        return info.rc == 0

    def stop(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


class RolloutWorker:
    """Moves every tracked rollout forward, in a thread (`start`/`stop`) or step by step
    (`tick`)."""

    def __init__(self, store: FleetStore, sender: CommandSender, cfg: dict | None = None,
                 holder: str | None = None) -> None:
        self.store = store
        self.sender = sender
        self.cfg = settings(cfg)
        self.book = RolloutBook(store)
        self.holder = holder or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.ticks = 0
        self.sent = 0
        self.conflicts = 0
        self.step_s: list[float] = []  # how long each step with a rollout to look at took
        with store.tx() as cur:
            cur.execute(LEASE_SQL)

    # -- lease
    def _lease(self, now: float) -> bool:
        """Hold (or take over an expired) lease; True when this worker may act. A holder on
        this host whose process is gone (a killed service) loses it at once."""
        exp = now + self.cfg["lease_s"]
        with self.store.tx() as cur:
            cur.execute("INSERT INTO rollout_lease VALUES ('rollouts', ?, ?) "
                        "ON CONFLICT (name) DO NOTHING", (self.holder, exp))
            row = cur.execute("SELECT holder FROM rollout_lease WHERE name = 'rollouts'")\
                .fetchone()
            dead = row is not None and row[0] != self.holder and _dead_here(row[0])
            n = cur.execute("UPDATE rollout_lease SET holder = ?, expires = ? WHERE name = "
                            "'rollouts' AND (holder = ? OR expires < ? OR holder = ?)",
                            (self.holder, exp, self.holder, now,
                             row[0] if dead else self.holder)).rowcount
        return n == 1

    def release_lease(self) -> None:
        """Give the lease up (a clean stop: another instance may take over at once)."""
        with self.store.tx() as cur:
            cur.execute("DELETE FROM rollout_lease WHERE name = 'rollouts' AND holder = ?",
                        (self.holder,))

    # -- one step
    def tick(self, now: float | None = None) -> int:
        """Move every tracked rollout one step; the number of commands sent."""
        now = time.time() if now is None else now
        t0 = time.monotonic()
        self.ticks += 1
        if not self._lease(now):
            return 0
        sent = 0
        tracked = self.book.tracked()
        for rid in tracked:
            for _ in range(3):
                try:
                    sent += self._step(rid, now)
                    break
                except ConflictError:
                    self.conflicts += 1  # an operator changed it meanwhile: plan again
        self.sent += sent
        if tracked and len(self.step_s) < 100_000:
            self.step_s.append(time.monotonic() - t0)
        return sent

    def _step(self, rid: int, now: float) -> int:
        book = self.book
        ro = book.rollout(rid)
        stages = book.stages(rid)
        devs = book.assignments(rid)
        obs = book.observe(ro, devs, self.cfg["online_window_s"], now)
        if not self.sender.connected.is_set():  # send nothing until the broker is there
            obs.presence = {d: Presence(False, p.software) for d, p in obs.presence.items()}
        rel = releases.require(self.store, ro.release)
        p = plan(ro, rel.artifact, stages, devs, obs, now, self.cfg["reply_timeout_s"])
        if p.empty and not any(a.dirty for a in devs.values()):
            return 0
        first = [d for d in p.send if devs[d].tries == 1]
        for d, seq in book.first_event_seq(first).items():
            devs[d].event_seq = max(devs[d].event_seq, seq)
        args = rel.command_args(ro.reboot)
        book.save(ro, stages, devs, p, {d: args for d in p.send}, now)
        for c in p.changes:
            if c.device is None:
                log.info("rollout %d (%s on %s): %s%s", ro.id, ro.release, ro.group, c.new,
                         f": {c.detail['reason']}" if c.detail.get("reason") else "")
            elif c.new in ("failed", "rolled_back", "timeout"):
                log.warning("rollout %d: %s %s: %s", ro.id, c.device, c.new,
                            c.detail.get("error"))
        n = 0
        for d in p.send:
            n += self.sender.send(d, devs[d].corr or "", args)
        if p.send:
            log.info("rollout %d: update %s sent to %d boxes", ro.id, ro.release, n)
        return n

    # -- thread
    def wake(self) -> None:
        """Look at the rollouts now (the ingest path may call this after storing update
        events or replies)."""
        self._wake.set()

    def start(self) -> None:
        """Start the sender and the worker thread."""
        self.sender.start()
        self.thread = threading.Thread(target=self._run, name="rollout-worker", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("rollout worker step failed; trying again")
            self._wake.wait(self.cfg["poll_s"])
            self._wake.clear()

    def stop(self) -> None:
        """Stop the thread, give up the lease, disconnect."""
        self._stop.set()
        self._wake.set()
        if self.thread is not None:
            self.thread.join(10.0)
        if self.step_s:
            s = sorted(self.step_s)
            log.info("rollout worker steps: %d, median %.1f ms, max %.1f ms; %d commands "
                     "sent", len(s), 1000.0 * s[len(s) // 2], 1000.0 * s[-1], self.sent)
        try:
            self.release_lease()
        except Exception:
            log.exception("could not give up the rollout lease (it expires by itself)")
        self.sender.stop()
