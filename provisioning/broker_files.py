"""The MQTT broker's TLS and access-control files, written from the fleet PKI.

The broker (mosquitto here; any MQTT 5 broker with client certificates in production) requires
a client certificate from the fleet CA, takes the certificate's CN as the user name, and
confines every box to its own subtree `devices/<CN>/#`. Fleet services (CN `fleet-*`) may use
the whole `devices/#` tree.
"""

from __future__ import annotations

import os
from pathlib import Path

from echoel.provisioning.pki import FleetPki, PkiError

DEVICE_PATTERN = "pattern readwrite devices/%u/#"


def acl_text(services: list[str]) -> str:
    """The ACL: each box its own subtree; named fleet services the whole device tree."""
    lines = ["# written by `echoel pki broker-files`: one subtree per box (CN = device id)",
             DEVICE_PATTERN, ""]
    for s in services:
        lines += [f"user {s}", "topic readwrite devices/#", ""]
    return "\n".join(lines)


def mosquitto_conf(folder: Path, pki: FleetPki, port: int, bind: str = "127.0.0.1",
                   persistence: bool = False, user: str | None = None) -> str:
    """A mosquitto 2 config: one TLS listener, client certificates required, the ACL."""
    server_crt, server_key = pki.paths("broker", "broker")
    lines = ["per_listener_settings true",
             f"persistence {'true' if persistence else 'false'}"]
    if persistence:
        lines.append(f"persistence_location {folder}/")
    if user:
        lines.append(f"user {user}")
    lines += ["log_dest stdout", "log_type error", "log_type warning", "log_type notice",
              "log_type information", "connection_messages true",
              # a stopped fleet service must find everything it missed
              "max_queued_messages 1000000", "max_inflight_messages 100",
              f"listener {port} {bind}",
              f"cafile {pki.ca_cert_path}", f"certfile {server_crt}", f"keyfile {server_key}",
              f"crlfile {pki.crl_path}", "require_certificate true",
              "use_identity_as_username true", f"acl_file {folder / 'acl'}",
              "allow_anonymous false", "max_packet_size 262144", ""]
    return "\n".join(lines)


def write_broker_files(pki: FleetPki, folder: str | Path, port: int, services: list[str],
                       bind: str = "127.0.0.1", persistence: bool = False) -> Path:
    """Write mosquitto.conf and acl into `folder` (issuing the broker certificate if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    crt, _ = pki.paths("broker", "broker")
    if not crt.exists():
        raise PkiError(f"{crt}: no broker certificate; `echoel pki issue broker broker` first")
    (folder / "acl").write_text(acl_text(services))
    # mosquitto drops root privileges; running it as the caller keeps the key readable
    user = None if os.geteuid() != 0 else "root"
    conf = folder / "mosquitto.conf"
    conf.write_text(mosquitto_conf(folder, pki, port, bind, persistence, user))
    return conf
