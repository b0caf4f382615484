"""The fleet's desired configuration as an overlay on the box's config file.

The fleet sends the complete set of keys it wants changed (`values`) with a `version`. The
box's effective config is its config file with those values on top, validated together: all of
them or none. The last good overlay is kept in the state folder, so the box comes back on it
after a restart; a removed key falls back to the file's value.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from echoel.daemon import bus
from echoel.daemon import config as config_mod

log = logging.getLogger("echoel.config")
OVERLAY_NAME = "fleet-config.json"
# Keys the fleet may not change remotely: the box's identity, where it keeps state and sockets.
LOCKED_PREFIXES = ("daemon.instance", "daemon.run_dir", "daemon.state_dir", "agent.ca_file",
                   "agent.cert_file", "agent.key_file", "agent.enabled", "agent.reboot_command")


def state_dir(cfg: config_mod.Config) -> Path:
    """The state folder: configured, systemd's STATE_DIRECTORY, /var/lib/echoel, or ~/.local."""
    return bus.service_dir(cfg["daemon"]["state_dir"], "STATE_DIRECTORY", "/var/lib/echoel",
                           Path.home() / ".local" / "state" / "echoel")


def check_remote(values: Any) -> dict[str, Any]:
    """Refuse a desired-config document the fleet may not send; returns the values."""
    if not isinstance(values, dict):
        raise config_mod.ConfigError(f"values = {values!r}: must be an object of dotted "
                                     "keys to values, e.g. {\"chain.gain_db\": -3}")
    for key in values:
        if not isinstance(key, str):
            raise config_mod.ConfigError(f"key {key!r}: must be a string")
        if any(key == p or key.startswith(p + ".") for p in LOCKED_PREFIXES):
            raise config_mod.ConfigError(
                f"{key}: cannot be changed by the fleet (identity, state and sockets are set "
                "on the box at provisioning); locked: " + ", ".join(LOCKED_PREFIXES))
    return values


def read(path: Path) -> tuple[int, dict[str, Any]]:
    """(version, values) of an overlay file; (0, {}) when there is none."""
    if not path.exists():
        return 0, {}
    doc = json.loads(path.read_text())
    return int(doc["version"]), dict(doc["values"])


def write(path: Path, version: int, values: dict[str, Any]) -> None:
    """Replace the overlay file atomically (write, fsync, rename)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump({"version": version, "values": values}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def effective(base: config_mod.Config) -> tuple[config_mod.Config, int]:
    """The base config with the stored overlay on top, and the overlay's version.

    An overlay that no longer fits the file (a key removed, a value now out of range) is
    reported and ignored: the box runs on its file rather than not at all.
    """
    path = state_dir(base) / OVERLAY_NAME
    try:
        version, values = read(path)
        if not values:
            return base, version
        return base.with_values(values, f"{path} (fleet config v{version})"), version
    except (ValueError, KeyError, TypeError, OSError, config_mod.ConfigError) as exc:
        log.error("fleet config in %s is not usable, running on %s alone: %s; the fleet's "
                  "next desired config replaces it", path, base.source, exc)
        return base, 0
