"""The box's configuration: one TOML file, every key documented, validated before anything starts.

Errors name the file, the key, the value and what is allowed. A config is either wholly valid
or refused; the daemon never runs half-configured.
"""

from __future__ import annotations

import copy
import importlib
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echoel.dsp.biquad_design import BAND_TYPES
from echoel.dsp.chain_layout import Band, ChainSpec
from echoel.dsp.sample_format import FORMATS

RATES = (44100, 48000, 88200, 96000, 176400, 192000)


class ConfigError(ValueError):
    """A config that cannot be used; the message says where, what and what is allowed."""


@dataclass(frozen=True)
class Key:
    """One setting: type, default, bounds or choices, and its meaning."""

    type: type
    default: Any
    doc: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple | None = None
    live: bool = False  # changeable while audio runs, without reopening the device

    def allowed(self) -> str:
        """Human wording of what is allowed."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        text = kind[self.type]
        if self.lo is not None and self.hi is not None:
            text += f" from {self.lo:g} to {self.hi:g}"
        return text


SCHEMA: dict[str, dict[str, Key]] = {
    "engine": {
        "device": Key(str, "auto", "ALSA PCM for both directions, or 'auto' (a USB interface "
                      "preferred over onboard audio)"),
        "capture_device": Key(str, "", "ALSA PCM for capture; empty: same as device"),
        "playback_device": Key(str, "", "ALSA PCM for playback; empty: same as device"),
        "rate": Key(int, 48000, "sample rate (Hz)", choices=RATES),
        "period": Key(int, 128, "frames per period (block)", 32, 1024),
        "periods": Key(int, 4, "periods in the device buffer", 2, 16),
        "prefill": Key(int, 2, "periods of silence queued before start: the latency, in "
                       "periods, from capture to playback", 1, 15),
        "channels_in": Key(int, 2, "capture channels", 1, 32),
        "channels_out": Key(int, 2, "playback channels (out channel c plays input c mod "
                            "channels_in)", 1, 32),
        "format": Key(str, "S32_LE", "sample format", choices=tuple(FORMATS)),
        "poll_timeout_ms": Key(int, 250, "no data from the device for this long: device lost",
                               20, 5000),
        "rescan_ms": Key(int, 1000, "how often to look for an absent interface", 100, 60000),
    },
    "realtime": {
        "priority": Key(int, 70, "SCHED_FIFO priority of the audio thread", 1, 99),
        "cpu": Key(int, 1, "CPU the audio thread is pinned to; -1: not pinned", -1, 1023),
        "mlock": Key(bool, True, "lock all memory (mlockall) so the loop never page-faults"),
        "gc_freeze": Key(bool, True, "freeze and disable Python's garbage collector while "
                         "audio runs"),
    },
    "chain": {
        "gain_db": Key(float, 0.0, "gain (dB)", -60.0, 24.0, live=True),
        "smoothing_ms": Key(float, 10.0, "time constant of parameter changes (ms)", 1.0,
                            500.0),
    },
    "chain.limiter": {
        "enabled": Key(bool, True, "soft-knee peak limiter with a ceiling at 0 dBFS"),
        "threshold_db": Key(float, -1.0, "limiter threshold (dBFS)", -40.0, 0.0, live=True),
        "release_ms": Key(float, 80.0, "limiter release (ms)", 5.0, 2000.0, live=True),
    },
    "chain.eq": {  # an array of tables: [[chain.eq]]
        "kind": Key(str, "peaking", "band type", choices=tuple(BAND_TYPES)),
        "freq": Key(float, 1000.0, "centre or corner frequency (Hz), below rate/2", 10.0,
                    96000.0, live=True),
        "gain_db": Key(float, 0.0, "band gain (dB; shelves and peaking)", -24.0, 24.0,
                       live=True),
        "q": Key(float, 0.7071, "band Q", 0.1, 20.0, live=True),
    },
    "taps": {  # an array of tables: [[taps]]
        "name": Key(str, "", "consumer name (shared-memory ring echoel.INSTANCE.ring.tap.NAME)"),
        "source": Key(str, "input", "which signal the tap carries", choices=("input", "output")),
        "slots": Key(int, 256, "blocks the ring holds before it counts overflows", 4, 65536),
    },
    "daemon": {
        "instance": Key(str, "main", "instance name (shared memory and bus sockets)"),
        "run_dir": Key(str, "", "runtime folder for sockets; empty: $RUNTIME_DIRECTORY, "
                       "/run/echoel as root, else /tmp/echoel-UID"),
        "status_interval_ms": Key(int, 250, "how often status is published", 50, 10000),
        "xrun_burst_ms": Key(int, 1000, "xruns closer together than this make one event",
                             10, 60000),
        "log_level": Key(str, "info", "log level", choices=("debug", "info", "warning",
                                                            "error")),
        "state_dir": Key(str, "", "folder for state kept across restarts (fleet config, "
                         "spool); empty: $STATE_DIRECTORY, /var/lib/echoel as root, else "
                         "~/.local/state/echoel"),
    },
    "agent": {
        "enabled": Key(bool, False, "connect to the fleet (`echoel agent`)"),
        "broker_host": Key(str, "localhost", "the fleet's MQTT broker (TLS)"),
        "broker_port": Key(int, 8883, "the broker's TLS port", 1, 65535),
        "ca_file": Key(str, "/etc/echoel/pki/ca.crt", "the fleet CA certificate"),
        "cert_file": Key(str, "/etc/echoel/pki/device.crt", "this box's certificate "
                         "(CN = device id)"),
        "key_file": Key(str, "/etc/echoel/pki/device.key", "this box's private key"),
        "group": Key(str, "", "device group the box announces (the fleet may regroup it)"),
        "telemetry_interval_s": Key(float, 10.0, "seconds between telemetry reports", 0.2,
                                    3600.0),
        "keepalive_s": Key(int, 30, "MQTT keepalive; the box is marked lost after 1.5x this",
                           5, 3600),
        "reconnect_max_s": Key(float, 60.0, "longest wait between reconnect attempts "
                               "(exponential backoff with jitter)", 1.0, 3600.0),
        "spool_max_messages": Key(int, 100000, "messages kept on disk while the broker is "
                                  "unreachable; the oldest are dropped (and counted) beyond",
                                  100, 10000000),
        "allow_reboot": Key(bool, False, "accept the fleet's reboot command"),
        "reboot_command": Key(str, "systemctl reboot", "what the reboot command runs"),
    },
}
ARRAYS = ("chain.eq", "taps")
MAX_BANDS = 16
MAX_TAPS = 16


def _check(where: str, key: str, spec: Key, value: Any) -> Any:
    """Validate one value; returns it converted (int -> float where a number is wanted)."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r}: {why}; allowed: {spec.allowed()}")

    if spec.type is bool:
        if not isinstance(value, bool):
            raise bad(f"is a {type(value).__name__}, not true/false")
    elif spec.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"is a {type(value).__name__}, not an integer")
    elif spec.type is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad(f"is a {type(value).__name__}, not a number")
        value = float(value)
        if not math.isfinite(value):
            raise bad("is not finite")
    elif spec.type is str and not isinstance(value, str):
        raise bad(f"is a {type(value).__name__}, not a string")
    if spec.choices is not None and value not in spec.choices:
        raise bad("is not a valid choice")
    if spec.lo is not None and not (spec.lo <= value <= spec.hi):
        raise bad("is out of range")
    return value


def _table(where: str, section: str, raw: dict,
           schema_map: dict[str, dict[str, Key]] | None = None) -> dict[str, Any]:
    schema = (schema_map or SCHEMA)[section]
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [{section}] must be a table, got {raw!r}")
    unknown = sorted(set(raw) - set(schema) - ({"limiter", "eq"} if section == "chain" else set()))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} in [{section}]; allowed: "
                          + ", ".join(sorted(schema)))
    out = {k: spec.default for k, spec in schema.items()}
    for k, v in raw.items():
        if k in schema:
            out[k] = _check(f"{where} [{section}]", k, schema[k], v)
    return out


@dataclass(frozen=True)
class Config:
    """A validated configuration: plain dicts per section, plus where it came from."""

    data: dict[str, Any]
    source: str

    def __getitem__(self, section: str) -> Any:
        return self.data[section]

    @property
    def capture_device(self) -> str:
        """The capture PCM name (or 'auto')."""
        e = self.data["engine"]
        return e["capture_device"] or e["device"]

    @property
    def playback_device(self) -> str:
        """The playback PCM name (or 'auto')."""
        e = self.data["engine"]
        return e["playback_device"] or e["device"]

    def chain_spec(self) -> ChainSpec:
        """The processing chain this config describes."""
        c = self.data["chain"]
        return ChainSpec(
            gain_db=c["gain_db"],
            bands=tuple(Band(b["kind"], b["freq"], b["gain_db"], b["q"]) for b in c["eq"]),
            limiter=c["limiter"]["enabled"],
            limiter_threshold_db=c["limiter"]["threshold_db"],
            limiter_release_ms=c["limiter"]["release_ms"],
            smoothing_ms=c["smoothing_ms"],
        )

    def with_value(self, dotted: str, value: Any) -> Config:
        """A copy with one key changed (validated), e.g. ('chain.eq.0.gain_db', -3.0)."""
        return self.with_values({dotted: value}, f"change of {dotted} to {value!r}")

    def with_values(self, values: dict[str, Any], source: str | None = None) -> Config:
        """A copy with several keys changed, validated together: all of them or none."""
        data = copy.deepcopy(self.data)
        for dotted, value in values.items():
            _set_dotted(data, dotted, value)
        return validate(data, source or f"change of {', '.join(values) or 'nothing'}")

    def changed_keys(self, other: Config) -> list[str]:
        """Dotted keys whose values differ between two configs."""
        out: list[str] = []
        _diff(self.data, other.data, "", out)
        return out


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    if not isinstance(dotted, str) or not dotted:
        raise ConfigError(f"{dotted!r}: a setting is a dotted name such as chain.gain_db")
    parts = dotted.split(".")
    node: Any = data
    for p in parts[:-1]:
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"{dotted}: no item {p!r} (there are {len(node)})")
            node = node[int(p)]
        elif isinstance(node, dict) and p in node and isinstance(node[p], dict | list):
            node = node[p]
        else:
            raise ConfigError(f"{dotted}: unknown setting; see `echoel config keys`")
    if not isinstance(node, dict) or parts[-1] not in node:
        raise ConfigError(f"{dotted}: unknown setting; see `echoel config keys`")
    node[parts[-1]] = value


def _diff(a: Any, b: Any, prefix: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            _diff(a.get(k), b.get(k), f"{prefix}{k}.", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{prefix}{i}.", out)
    elif a != b:
        out.append(prefix[:-1])


def is_live(dotted: str) -> bool:
    """True if a key can change while audio runs (a chain parameter)."""
    parts = dotted.split(".")
    if parts[:2] == ["chain", "eq"] and len(parts) == 4:
        spec = SCHEMA["chain.eq"].get(parts[3])
        return bool(spec and spec.live)
    section, key = ".".join(parts[:-1]), parts[-1]
    spec = SCHEMA.get(section, {}).get(key)
    return bool(spec and spec.live)


# Sections whose keys and checks live with their service: the module has KEYS (dict of Key;
# ARRAY = True for an array of tables), check(raw, where) -> validated value and, optionally,
# cross_check(config) once the whole config is known. Imported on first use (those modules
# import this one).
SERVICE_SECTIONS = {
    "clock": "echoel.drivers.ptp4l_config",
    "provisioning": "echoel.provisioning.first_boot",
    "bio": "echoel.daemon.bio_config",
    "update": "echoel.daemon.update_agent",
    "streams": "echoel.daemon.streams_service",
}
CORE_SECTIONS = ("agent", "chain", "daemon", "engine", "realtime", "taps")


def service_sections() -> dict[str, Any]:
    """Section name -> the module that defines and checks it."""
    return {name: importlib.import_module(mod) for name, mod in SERVICE_SECTIONS.items()}


def validate(raw: dict, source: str = "<config>") -> Config:
    """Check a parsed TOML document against the schema; the whole of it or nothing."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a TOML table")
    allowed = sorted({*CORE_SECTIONS, *SERVICE_SECTIONS})
    top = set(raw) - set(allowed)
    if top:
        raise ConfigError(f"{source}: unknown section [{sorted(top)[0]}]; allowed: "
                          + ", ".join(allowed))
    data: dict[str, Any] = {}
    for name, mod in service_sections().items():
        empty: Any = [] if getattr(mod, "ARRAY", False) else {}
        data[name] = mod.check(raw.get(name, empty), source)
    for section in ("engine", "realtime", "daemon", "agent"):
        data[section] = _table(source, section, raw.get(section, {}))
    chain_raw = raw.get("chain", {})
    data["chain"] = _table(source, "chain", chain_raw)
    data["chain"]["limiter"] = _table(source, "chain.limiter", chain_raw.get("limiter", {}))
    bands = chain_raw.get("eq", [])
    if not isinstance(bands, list) or len(bands) > MAX_BANDS:
        raise ConfigError(f"{source}: [[chain.eq]] must be a list of at most {MAX_BANDS} "
                          f"bands, got {bands!r}")
    data["chain"]["eq"] = [_table(f"{source} band {i}", "chain.eq", b)
                           for i, b in enumerate(bands)]
    taps = raw.get("taps", [])
    if not isinstance(taps, list) or len(taps) > MAX_TAPS:
        raise ConfigError(f"{source}: [[taps]] must be a list of at most {MAX_TAPS}, "
                          f"got {taps!r}")
    data["taps"] = [_table(f"{source} tap {i}", "taps", t) for i, t in enumerate(taps)]
    _cross_checks(source, data)
    cfg = Config(data, source)
    for mod in service_sections().values():
        if hasattr(mod, "cross_check"):
            mod.cross_check(cfg)
    return cfg


def _cross_checks(source: str, d: dict) -> None:
    e = d["engine"]
    if e["prefill"] >= e["periods"]:
        raise ConfigError(f"{source} [engine]: prefill = {e['prefill']}: must be less than "
                          f"periods ({e['periods']}), or playback has no room to write")
    if not e["device"] and not (e["capture_device"] and e["playback_device"]):
        raise ConfigError(f"{source} [engine]: device = '': name an ALSA PCM or 'auto'")
    for i, b in enumerate(d["chain"]["eq"]):
        if b["freq"] >= e["rate"] / 2:
            raise ConfigError(f"{source} band {i} [chain.eq]: freq = {b['freq']:g}: must be "
                              f"below half the sample rate ({e['rate'] / 2:g} Hz)")
    names = [t["name"] for t in d["taps"]]
    for i, n in enumerate(names):
        if not n or not n.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{source} tap {i} [taps]: name = {n!r}: use letters, digits, "
                              "'_' or '-'")
    if len(set(names)) != len(names):
        raise ConfigError(f"{source} [taps]: tap names must be unique, got {names}")
    inst = d["daemon"]["instance"]
    if not inst or not inst.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{source} [daemon]: instance = {inst!r}: use letters, digits, "
                          "'_' or '-'")


def tap_channels(cfg: Config, tap: str, service: str, suggested_source: str) -> int:
    """Channels a tap carries; ConfigError saying what to add when the config has no such tap."""
    taps = {t["name"]: t for t in cfg["taps"]}
    if tap not in taps:
        raise ConfigError(f"{service}: no tap named {tap!r} in the config; add [[taps]] name = "
                          f"\"{tap}\" source = \"{suggested_source}\"")
    e = cfg["engine"]
    return e["channels_in"] if taps[tap]["source"] == "input" else e["channels_out"]


def check_table(where: str, section: str, raw: dict,
                schema_map: dict[str, dict[str, Key]]) -> dict[str, Any]:
    """Validate one table against another schema (the fleet service's, for example)."""
    return _table(where, section, raw, schema_map)


def load(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text (byte {exc.start})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return validate(raw, str(path))


def defaults() -> Config:
    """The embedded defaults (what an empty file gives)."""
    return validate({}, "<defaults>")


def parse_value(text: str) -> Any:
    """A command-line value as TOML would read it ('-6' -> -6, 'true' -> True, 'x' -> 'x')."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def describe_keys() -> str:
    """Every key with its default, what is allowed, and its meaning."""
    lines = []
    sections = [(k, v, k in ARRAYS) for k, v in SCHEMA.items()]
    sections += [(k, m.KEYS, getattr(m, "ARRAY", False)) for k, m in service_sections().items()]
    for section, keys, array in sections:
        head = f"[[{section}]]" if array else f"[{section}]"
        lines.append(head)
        for k, spec in keys.items():
            live = " (live)" if spec.live else ""
            lines.append(f"  {k} = {spec.default!r}  # {spec.doc}; {spec.allowed()}{live}")
    return "\n".join(lines)
