"""The fleet service (`echoel fleet serve`): takes in what the boxes send and stores it.

Each worker is one MQTT 5 client in the shared subscription `$share/fleet/devices/#`, so the
broker spreads the load over several workers (or several machines). Messages are acknowledged
(QoS 1, manual ack) only after the transaction that stores them commits, and the sessions are
persistent: a stopped or killed service finds on restart what the broker kept for it. Beyond
that, each box keeps every telemetry and event message until this service confirms it stored
it (`devices/<id>/ack`, the sequence numbers), and sends again what is not confirmed: a broker
restart (mosquitto 2.0 does not restore shared subscriptions from its persistence file) or a
session that expired loses nothing either.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import paho.mqtt.client as mqtt
from echoel.drivers.mqtt_tls import BrokerLink, make_client
from echoel.fleet.confirmations import Confirmer, Publish
from echoel.fleet.protocol import MessageError, decode, parse_topic
from echoel.fleet.store import FleetStore

log = logging.getLogger("echoel.fleet")
SHARE_GROUP = "fleet"
INGESTED = ("telemetry", "events", "state", "config/reported")
SESSION_EXPIRY_S = 7 * 24 * 3600


class Incoming(NamedTuple):
    """What the writer needs of a received message."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    corr: bytes | None


class IngestWorker:
    """One MQTT client feeding one writer thread that stores in batches."""

    def __init__(self, store: FleetStore, link: BrokerLink, client_id: str,
                 batch_max: int = 2000, batch_s: float = 0.05,
                 share: str = SHARE_GROUP, confirmer: Confirmer | None = None,
                 on_update: Callable[[], None] | None = None) -> None:
        self.store = store
        self.on_update = on_update
        self.own_confirmer = confirmer is None
        self.confirmer = confirmer or Confirmer()
        self.confirmer.add_publisher(self.publisher)
        self.subscription = f"$share/{share}/devices/#"
        self.link = link
        self.batch_max = batch_max
        self.batch_s = batch_s
        self.q: queue.Queue = queue.Queue()
        self.client = make_client(link, client_id, manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.reconnect_delay_set(1, 30)
        self.stored = 0
        self.bad = 0
        self.running = True
        self.connected = threading.Event()
        self.writer = threading.Thread(target=self._write_loop, name=f"{client_id}-writer",
                                       daemon=True)

    def start(self) -> None:
        """Connect (persistent session) and start the network and writer threads."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        self.writer.start()
        if self.own_confirmer:
            self.confirmer.start()
        self.client.connect_async(self.link.host, self.link.port, self.link.keepalive_s,
                                  clean_start=False, properties=props)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("the broker refused the fleet service: %s (is its certificate from "
                      "the fleet CA and named in the ACL?)", reason_code)
            return
        client.subscribe(self.subscription, qos=1)
        self.connected.set()
        log.info("fleet worker %s connected (session %s)", client._client_id.decode(),
                 "resumed" if flags.session_present else "new")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if self.running:
            log.warning("fleet worker lost the broker (%s); reconnecting", reason_code)

    def publisher(self) -> Publish | None:
        """Publish (QoS 0) through this worker's client, or None while it is not connected."""
        if not self.connected.is_set():
            return None
        return lambda t, payload: self.client.publish(t, payload, qos=0)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        # keep only what storing needs: paho's message objects (properties, a condition)
        # alive by the thousand cost the garbage collector more than the storing
        corr = None
        if msg.topic.endswith("/reply") or "/reply/" in msg.topic:
            corr = getattr(msg.properties, "CorrelationData", None)
        self.q.put(Incoming(msg.topic, msg.payload, msg.mid, msg.qos, corr))

    def _write_loop(self) -> None:
        while self.running or not self.q.empty():
            try:
                first = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            msgs = [first]
            end = time.monotonic() + self.batch_s
            while len(msgs) < self.batch_max:
                left = end - time.monotonic()
                if left <= 0:
                    break
                try:
                    msgs.append(self.q.get(timeout=left))
                except queue.Empty:
                    break
            self._store(msgs)

    def _store(self, msgs: list[Incoming]) -> None:
        batch = []
        for m in msgs:
            where = parse_topic(m.topic)
            if where is None:
                continue
            device, leaf = where
            if leaf not in INGESTED and not leaf.startswith("reply/"):
                continue  # the fleet's own commands and desired configs
            try:
                doc = decode(m.payload, f"{m.topic}")
            except MessageError as exc:
                self.bad += 1
                log.warning("ignored a malformed message: %s", exc)
                continue
            if leaf.startswith("reply/"):
                if m.corr is None:
                    continue
                doc["corr"] = m.corr.decode(errors="replace")
            batch.append((device, leaf, doc, m.payload))
        while self.running:
            try:
                self.store.ingest(batch)
                break
            except Exception:
                log.exception("storing %d messages failed; retrying in 1 s (they stay "
                              "unacknowledged at the broker)", len(batch))
                time.sleep(1.0)
        else:
            return  # stopping: unacknowledged messages come back after a restart
        self.stored += len(batch)
        for m in msgs:
            if m.qos > 0:
                self.client.ack(m.mid, m.qos)
        self._confirm(batch)
        if self.on_update and any((leaf == "events" and doc.get("kind") == "update") or
                                  leaf.startswith("reply/") for _, leaf, doc, _ in batch):
            self.on_update()

    def _confirm(self, batch: list[tuple[str, str, dict, bytes]]) -> None:
        """Tell each box which of its messages are stored, so it can drop them from its spool
        (the broker's PUBACK only means the broker has them)."""
        seqs: dict[str, list[int]] = {}
        for device, leaf, doc, _ in batch:
            if leaf in ("telemetry", "events") and isinstance(doc.get("seq"), int):
                seqs.setdefault(device, []).append(doc["seq"])
        self.confirmer.stored(seqs)

    def drain(self) -> None:
        """Store what is queued and stop the writer."""
        end = time.monotonic() + 5.0
        while not self.q.empty() and time.monotonic() < end:
            time.sleep(0.05)
        self.running = False
        self.writer.join(5.0)

    def disconnect(self) -> None:
        """Leave the broker (the session stays for the next start)."""
        self.client.disconnect()
        self.client.loop_stop()

    def stop(self) -> None:
        """Store what is queued, confirm it, then disconnect."""
        self.drain()
        if self.own_confirmer:
            self.confirmer.stop()
        self.disconnect()


class FleetService:
    """Several ingest workers sharing one store."""

    def __init__(self, store: FleetStore, link: BrokerLink, workers: int = 2,
                 name: str = "fleet-service", share: str = SHARE_GROUP,
                 on_update: Callable[[], None] | None = None) -> None:
        self.store = store
        # PostgreSQL: a connection per worker, so one worker's transaction does not wait for
        # another's round trips (SQLite has one writer at a time: the workers share its one)
        self.extra_stores = [FleetStore(store.url) for _ in range(workers - 1)] if store.pg \
            else []
        stores = [store, *self.extra_stores] if store.pg else [store] * workers
        self.confirmer = Confirmer()
        self.workers = [IngestWorker(stores[i], link, f"{name}-w{i}", share=share,
                                     confirmer=self.confirmer, on_update=on_update)
                        for i in range(workers)]

    def start(self, wait_s: float = 10.0) -> None:
        """Start every worker and wait until all are subscribed."""
        self.confirmer.start()
        for w in self.workers:
            w.start()
        end = time.monotonic() + wait_s
        for w in self.workers:
            if not w.connected.wait(max(0.0, end - time.monotonic())):
                log.warning("a fleet worker is not connected yet; it keeps trying")

    @property
    def stored(self) -> int:
        """Messages stored by all workers since start."""
        return sum(w.stored for w in self.workers)

    def stop(self) -> None:
        """Stop every worker (the last confirmations go out before the clients disconnect)."""
        for w in self.workers:
            w.drain()
        self.confirmer.stop()
        for w in self.workers:
            w.disconnect()
        for st in self.extra_stores:
            st.close()
