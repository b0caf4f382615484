"""The operator's side of the link: send a command and wait for its reply; publish a desired
config. Used by `echoel fleet command` and `echoel fleet config set`."""

from __future__ import annotations

import os
import threading
import uuid

import paho.mqtt.client as mqtt
from echoel.drivers.mqtt_tls import BrokerLink, make_client
from echoel.fleet.protocol import decode, encode, topic
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class OperatorError(RuntimeError):
    """The broker could not be reached or the box did not answer."""


class OperatorLink:
    """A short-lived MQTT 5 client with the fleet service's identity."""

    def __init__(self, link: BrokerLink, timeout_s: float = 10.0) -> None:
        self.link = link
        self.timeout_s = timeout_s
        self.me = f"fleet-cli-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.client = make_client(link, self.me)
        self.replies: dict[bytes, dict] = {}
        self.cv = threading.Condition()
        self.client.on_message = self._on_message
        self._up = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: None if rc.is_failure else self._up.set()

    def __enter__(self) -> OperatorLink:
        try:
            self.client.connect(self.link.host, self.link.port, 30)
        except OSError as exc:
            raise OperatorError(f"cannot reach the broker at {self.link.host}:"
                                f"{self.link.port}: {exc}") from None
        self.client.loop_start()
        if not self._up.wait(self.timeout_s):
            raise OperatorError("the broker did not accept the connection (certificate?)")
        return self

    def __exit__(self, *exc) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        try:
            doc = decode(msg.payload, msg.topic)
        except ValueError as exc:
            doc = {"ok": False, "error": str(exc)}
        with self.cv:
            self.replies[corr] = doc
            self.cv.notify_all()

    def command(self, device: str, name: str, args: dict | None = None,
                payload: bytes | None = None, corr: str | None = None) -> dict:
        """Send a command and wait for the reply (raw `payload` overrides name/args)."""
        corr_b = (corr or uuid.uuid4().hex).encode()
        resp = topic(device, f"reply/{self.me}")
        sub_rc, _ = self.client.subscribe(resp, qos=1)
        if sub_rc != mqtt.MQTT_ERR_SUCCESS:
            raise OperatorError(f"cannot subscribe to {resp}: {sub_rc}")
        p = Properties(PacketTypes.PUBLISH)
        p.ResponseTopic = resp
        p.CorrelationData = corr_b
        body = payload if payload is not None else encode({"name": name, "args": args or {}})
        self.client.publish(topic(device, "cmd"), body, qos=1, properties=p)
        with self.cv:
            if not self.cv.wait_for(lambda: corr_b in self.replies, self.timeout_s):
                raise OperatorError(f"{device} did not answer {name!r} within "
                                    f"{self.timeout_s:g} s (is it online? `echoel fleet "
                                    "devices`)")
            return self.replies.pop(corr_b)

    def publish_desired(self, device: str, version: int, values: dict) -> None:
        """Publish (retained) the desired config of a box."""
        info = self.client.publish(topic(device, "config/desired"),
                                   encode({"version": version, "values": values}), qos=1,
                                   retain=True)
        info.wait_for_publish(self.timeout_s)
