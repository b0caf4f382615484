"""The [bio] config section: the bio service's keys (sensors), the modulation's keys (HRV
windows, rates) and its [[bio.mappings]] (body -> sound), validated as one section."""

from __future__ import annotations

from typing import Any

from echoel.daemon import bio_modulation, bio_service
from echoel.daemon import config as config_mod
from echoel.daemon.config import ConfigError
from echoel.dsp import bio_mapping

SECTION = "bio"
KEYS = {**bio_service.KEYS, **bio_modulation.KEYS}


def check(raw: Any, where: str = "<config>") -> dict[str, Any]:
    """[bio] with defaults filled in; [[bio.mappings]] kept as written (checked against the
    chain by `cross_check`, once the rest of the config is known)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [bio] must be a table, got {raw!r}")
    bio = bio_service.check_bio(raw, where)
    mod = {k: v for k, v in raw.items() if k in bio_modulation.KEYS}
    bio.update(config_mod.check_table(where, SECTION, mod, {SECTION: bio_modulation.KEYS}))
    if bio["min_span_s"] > bio["window_s"]:
        raise ConfigError(f"{where} [bio]: min_span_s = {bio['min_span_s']:g}: allowed up to "
                          f"window_s ({bio['window_s']:g} s)")
    mappings = raw.get("mappings", [])
    if not isinstance(mappings, list):
        raise ConfigError(f"{where}: [[bio.mappings]] must be an array of tables, got "
                          f"{mappings!r}")
    bio["mappings"] = [dict(m) if isinstance(m, dict) else m for m in mappings]
    return bio


def cross_check(cfg: config_mod.Config) -> None:
    """Each mapping against the chain it drives (targets that exist, ranges, neutral)."""
    bio_mapping.parse_mappings(cfg.source, cfg["bio"]["mappings"], cfg)
