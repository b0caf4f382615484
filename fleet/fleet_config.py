"""The fleet service's settings (a TOML file with a [fleet] table and, optionally, the rollout
worker's [rollout]), checked like the box's."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from echoel.daemon.config import ConfigError, Key, check_table
from echoel.drivers.mqtt_tls import BrokerLink
from echoel.fleet import rollout_worker

SCHEMA: dict[str, dict[str, Key]] = {
    "fleet": {
        "db": Key(str, "/var/lib/echoel-fleet/fleet.db", "the store: a SQLite file, or "
                  "postgresql://user@host/dbname"),
        "broker_host": Key(str, "localhost", "the MQTT broker"),
        "broker_port": Key(int, 8883, "the broker's TLS port", 1, 65535),
        "ca_file": Key(str, "/etc/echoel-fleet/pki/ca.crt", "the fleet CA certificate"),
        "cert_file": Key(str, "/etc/echoel-fleet/pki/services/fleet-service.crt",
                         "the service's certificate (CN fleet-*)"),
        "key_file": Key(str, "/etc/echoel-fleet/pki/services/fleet-service.key",
                        "the service's private key"),
        "workers": Key(int, 2, "ingest workers in the shared subscription", 1, 64),
        "lost_after_s": Key(float, 60.0, "a box silent this long shows as 'silent' in "
                            "`fleet devices`", 5.0, 86400.0),
    }
}


def load(path: str | Path | None) -> dict[str, Any]:
    """The [fleet] table of a TOML file (defaults without a file)."""
    raw: dict = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the fleet config: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    extra = sorted(set(raw) - {"fleet", "rollout"})
    if extra:
        raise ConfigError(f"{path}: unknown section [{extra[0]}]; allowed: fleet, rollout")
    where = str(path or "<defaults>")
    cfg = check_table(where, "fleet", raw.get("fleet", {}), SCHEMA)
    cfg["rollout"] = check_table(where, "rollout", raw.get("rollout", {}),
                                 {"rollout": rollout_worker.KEYS})
    return cfg


def link(cfg: dict[str, Any]) -> BrokerLink:
    """The service's broker link."""
    return BrokerLink(cfg["broker_host"], cfg["broker_port"], cfg["ca_file"], cfg["cert_file"],
                      cfg["key_file"])
