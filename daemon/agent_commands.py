"""The commands a box takes from the fleet, and how a request is checked before it runs.

A request is a JSON object {"name": NAME, "args": {...}} sent to devices/<id>/cmd with an MQTT 5
response topic and correlation data. Anything else gets an error reply that says what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from echoel.fleet.protocol import MAX_COMMAND_BYTES, MessageError, decode


@dataclass(frozen=True)
class Arg:
    """One argument: its type, whether it is required, allowed values, meaning."""

    type: type
    doc: str
    required: bool = True
    choices: tuple | None = None


COMMANDS: dict[str, tuple[str, dict[str, Arg]]] = {
    "ping": ("answer at once (a liveness check)", {}),
    "status": ("the engine's status and the box's health", {}),
    "config.get": ("the effective config and the fleet config version", {}),
    "restart": ("restart a service", {
        "service": Arg(str, "what to restart", choices=("engine", "agent"))}),
    "reboot": ("reboot the box (only where agent.allow_reboot is true)", {
        "confirm": Arg(str, "the device id, so a reboot meant for another box is refused")}),
    "update": ("install a signed release (system bundle, models or config); progress comes "
               "as `update` events", {
                   "release": Arg(str, "the release name, e.g. 2026.11.2"),
                   "artifact": Arg(str, "what it is", choices=("system", "models", "config")),
                   "url": Arg(str, "https:// address of the artifact"),
                   "size": Arg(int, "its size in bytes"),
                   "sha256": Arg(str, "its sha256, hex"),
                   "reboot": Arg(str, "when a system update may reboot",
                                 choices=("now", "window", "never"))}),
}


@dataclass(frozen=True)
class Command:
    """A checked request."""

    name: str
    args: dict[str, Any]


def describe() -> str:
    """The command list, for errors and help."""
    return ", ".join(COMMANDS)


def parse(payload: bytes) -> Command:
    """Check a request against the schema; MessageError says what is wrong."""
    doc = decode(payload, "command", MAX_COMMAND_BYTES)
    unknown_top = sorted(set(doc) - {"name", "args"})
    if unknown_top:
        raise MessageError(f"command: unexpected field {unknown_top[0]!r}; a command is "
                           "{\"name\": ..., \"args\": {...}}")
    name = doc.get("name")
    if not isinstance(name, str):
        raise MessageError(f"command: name = {name!r}: must be a string, one of {describe()}")
    if name not in COMMANDS:
        raise MessageError(f"command: unknown command {name!r}; allowed: {describe()}")
    args = doc.get("args", {})
    if not isinstance(args, dict):
        raise MessageError(f"{name}: args = {args!r}: must be an object")
    spec = COMMANDS[name][1]
    extra = sorted(set(args) - set(spec))
    if extra:
        allowed = ", ".join(spec) or "none"
        raise MessageError(f"{name}: unexpected argument {extra[0]!r}; allowed: {allowed}")
    for key, arg in spec.items():
        if key not in args:
            if arg.required:
                raise MessageError(f"{name}: missing argument {key!r} ({arg.doc})")
            continue
        v = args[key]
        if not isinstance(v, arg.type) or (arg.type is int and isinstance(v, bool)):
            raise MessageError(f"{name}: {key} = {v!r}: must be a {arg.type.__name__}")
        if arg.choices and v not in arg.choices:
            raise MessageError(f"{name}: {key} = {v!r}: allowed: "
                               + ", ".join(repr(c) for c in arg.choices))
    return Command(name, args)
