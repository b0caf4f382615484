"""The fleet link's topics and messages, shared by the box's agent and the fleet service.

Every box lives under `devices/<id>/` (its certificate's CN); the broker's ACL keeps it there.

    devices/<id>/state            retained  box -> fleet   birth {"state": "online", "seq"} and
                                                          last will {"state": "lost", "seq"};
                                                          {"state": "offline"} on a clean stop
    devices/<id>/telemetry        QoS 1     box -> fleet   periodic figures ("seq" per message)
    devices/<id>/events           QoS 1     box -> fleet   xrun bursts, interface lost/found...
    devices/<id>/cmd              QoS 1     fleet -> box   MQTT 5 request: response topic and
                                                          correlation data in the properties
    devices/<id>/reply/<who>      QoS 1     box -> fleet   the response (same correlation data)
    devices/<id>/config/desired   retained  fleet -> box   {"version", "values"}
    devices/<id>/config/reported  retained  box -> fleet   {"version", "status", "error"}
    devices/<id>/ack              QoS 0     fleet -> box   {"seqs": [...]} stored: the box may
                                                          drop them from its spool

`seq` on state messages grows with every connection of the box (kept on disk), so a last will
that arrives late (seq of an older connection) never replaces a newer birth. `seq` on telemetry
and events is the box's spool sequence: the fleet stores each (device, seq) once.
"""

from __future__ import annotations

import json
from typing import Any

SCHEMA_VERSION = 1
ROOT = "devices"
MAX_COMMAND_BYTES = 16 * 1024


def topic(device: str, leaf: str) -> str:
    """devices/<device>/<leaf>."""
    return f"{ROOT}/{device}/{leaf}"


def parse_topic(t: str) -> tuple[str, str] | None:
    """(device, leaf) of a device topic, or None."""
    parts = t.split("/", 2)
    if len(parts) < 3 or parts[0] != ROOT or not parts[1]:
        return None
    return parts[1], parts[2]


def encode(doc: dict[str, Any]) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


class MessageError(ValueError):
    """A message that does not follow the protocol; the text says what is wrong."""


def decode(payload: bytes, what: str, max_bytes: int | None = None) -> dict[str, Any]:
    """A JSON object from a payload, or MessageError naming what is wrong."""
    if max_bytes is not None and len(payload) > max_bytes:
        raise MessageError(f"{what}: {len(payload)} bytes; at most {max_bytes} allowed")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"{what}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise MessageError(f"{what}: must be a JSON object, got {type(doc).__name__}")
    return doc
