"""First boot (`echoel first-boot --root / --data /data`): apply the box's provisioning.

Reads DATA/provisioning/provision.json and the PKI files beside it, checks them (schema,
certificate CN = device id, issued by the CA, key matching and 0600), then writes into ROOT:

    etc/hostname, etc/hosts (127.0.1.1 line)
    etc/systemd/network/10-echoel-wired.network      wired: DHCP or static (always present;
                                                     networkd takes it before the image's
                                                     20-wired.network)
    etc/systemd/network/15-echoel-wifi.network       Wi-Fi: DHCP on wlan0 (Wi-Fi only)
    etc/wpa_supplicant/wpa_supplicant-wlan0.conf     Wi-Fi: SSID and passphrase (0600)
    root/.ssh/authorized_keys                        technicians' keys (sshd: root by key
                                                     only); home/tech/.ssh/authorized_keys
                                                     instead when the image has a user `tech`
    etc/echoel/box.toml                              [agent] enabled with the broker and the
                                                     PKI files; [provisioning] state

and DATA/provisioning/state.json: "provisioned", or "unprovisioned" with the reason. A box
without (valid) provisioning keeps its agent disabled and says why, in state.json and in
box.toml's [provisioning] section, so `echoel status` can show it. Running it again changes
nothing (idempotent); other keys of box.toml and other lines of authorized_keys are kept.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from echoel.daemon import config as config_mod
from echoel.daemon.config import Key
from echoel.provisioning.image_layout import write_atomic
from echoel.provisioning.provision import (
    PKI_DIR,
    PROV_DIR,
    PROV_FILE,
    SCHEMA_VERSION,
    BoxSettings,
    Network,
    ProvisionError,
    check_settings,
)

SECTION = "provisioning"
STATES = ("provisioned", "unprovisioned")
KEYS: dict[str, Key] = {
    "state": Key(str, "unprovisioned", "set by `echoel first-boot`: whether the box has a "
                 "valid identity (the agent stays disabled without one)", choices=STATES),
    "reason": Key(str, "", "why the box is unprovisioned (empty when provisioned)"),
    "device_id": Key(str, "", "the box's device id (its certificate CN)"),
    "state_file": Key(str, "/data/provisioning/state.json", "first boot's state file"),
}
BOX_TOML = "etc/echoel/box.toml"
WIRED_FILE = "etc/systemd/network/10-echoel-wired.network"  # before the image's 20-wired
WIFI_FILE = "etc/systemd/network/15-echoel-wifi.network"
WPA_FILE = "etc/wpa_supplicant/wpa_supplicant-wlan0.conf"
WPA_WANTS = "etc/systemd/system/multi-user.target.wants/wpa_supplicant@wlan0.service"
WPA_UNIT = "/lib/systemd/system/wpa_supplicant@.service"
KEYS_BEGIN = "# echoel-provisioning: begin (managed by `echoel first-boot`)"
KEYS_END = "# echoel-provisioning: end"
TECH_USER = "tech"
AGENT_USER = "echoel"


@dataclass
class FirstBoot:
    """What first boot found and did."""

    state: str
    reason: str = ""
    device_id: str = ""
    hostname: str = ""
    ssh_keys_file: str = ""
    warning: str = ""
    written: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """state.json's content (without the timestamps)."""
        return {"state": self.state, "reason": self.reason, "device_id": self.device_id,
                "hostname": self.hostname, "ssh_keys_file": self.ssh_keys_file,
                "warning": self.warning, "written": self.written}


class _UnprovisionedError(Exception):
    pass


def _load_settings(doc: Any) -> BoxSettings:
    """BoxSettings from provision.json, validated."""
    if not isinstance(doc, dict):
        raise _UnprovisionedError("provision.json is not a JSON object")
    if doc.get("schema") != SCHEMA_VERSION:
        raise _UnprovisionedError(f"provision.json schema {doc.get('schema')!r}: this software "
                                  f"reads schema {SCHEMA_VERSION}; provision the box again")
    try:
        n = doc["network"]
        net = Network(n["mode"], n.get("address", ""), n.get("gateway", ""),
                      tuple(n.get("dns", ())), n.get("ssid", ""), n.get("psk", ""))
        s = BoxSettings(doc["device_id"], doc["broker_host"], int(doc["broker_port"]),
                        doc.get("group", ""), doc.get("hostname", ""), net,
                        tuple(doc.get("ssh_authorized_keys", ())))
        return check_settings(s)
    except (KeyError, TypeError, ValueError) as exc:
        raise _UnprovisionedError(f"provision.json: missing or bad field {exc}") from None
    except ProvisionError as exc:
        raise _UnprovisionedError(f"provision.json: {exc}") from None


def check_identity(pki_dir: Path, device_id: str) -> str:
    """The box's PKI files: present, key 0600 and matching, CN = device id, issued by the CA,
    not expired. Raises _UnprovisionedError with the reason; returns a warning ("" if none)."""
    paths = {n: pki_dir / n for n in ("ca.crt", "device.crt", "device.key")}
    for p in paths.values():
        if not p.is_file():
            raise _UnprovisionedError(f"{p} is missing")
    mode = paths["device.key"].stat().st_mode & 0o777
    if mode & 0o077:
        raise _UnprovisionedError(f"{paths['device.key']} has mode {mode:o}; must be 600")
    try:
        ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
        cert = x509.load_pem_x509_certificate(paths["device.crt"].read_bytes())
        key = serialization.load_pem_private_key(paths["device.key"].read_bytes(), None)
    except ValueError as exc:
        raise _UnprovisionedError(f"{pki_dir}: unreadable PEM: {exc}") from None
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cn or cn[0].value != device_id:
        raise _UnprovisionedError(f"device.crt is for {cn[0].value if cn else None!r}, "
                                  f"provision.json says {device_id!r}")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise _UnprovisionedError(f"device.crt was not issued by ca.crt ({type(exc).__name__})"
                                  ) from None
    if key.public_key() != cert.public_key():
        raise _UnprovisionedError("device.key does not belong to device.crt")
    now = dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        raise _UnprovisionedError(f"device.crt expired on {cert.not_valid_after_utc:%Y-%m-%d} "
                                  f"(today is {now:%Y-%m-%d}); provision the box again")
    if now < cert.not_valid_before_utc:  # a board without RTC boots before NTP has synced
        return (f"the clock ({now:%Y-%m-%d %H:%M}) is before device.crt's start "
                f"({cert.not_valid_before_utc:%Y-%m-%d %H:%M}): TLS fails until it syncs")
    return ""


def _passwd(root: Path) -> dict[str, tuple[int, int, str]]:
    """user -> (uid, gid, home) from ROOT/etc/passwd."""
    out = {}
    with contextlib.suppress(OSError):
        for line in (root / "etc/passwd").read_text().splitlines():
            f = line.split(":")
            if len(f) >= 7 and f[2].isdigit() and f[3].isdigit():
                out[f[0]] = (int(f[2]), int(f[3]), f[5])
    return out


def _write_if_changed(root: Path, rel: str, text: str, mode: int, done: FirstBoot,
                      owner: tuple[int, int] | None = None) -> None:
    path = root / rel
    data = text.encode()
    try:
        same = path.read_bytes() == data and path.stat().st_mode & 0o777 == mode
    except OSError:
        same = False
    if not same:
        write_atomic(path, data, mode)
    if owner is not None and os.geteuid() == 0:
        os.chown(path, *owner)
    done.written.append("/" + rel)


def _remove(root: Path, rel: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (root / rel).unlink()


def _network_files(root: Path, net: Network, done: FirstBoot) -> None:
    if net.mode == "static":
        body = (f"Address={net.address}\nGateway={net.gateway}\n"
                + "".join(f"DNS={d}\n" for d in net.dns))
    else:
        body = "DHCP=yes\n"
    _write_if_changed(root, WIRED_FILE, "# written by `echoel first-boot`\n[Match]\n"
                      "Type=ether\n\n[Network]\n" + body, 0o644, done)
    if net.mode == "wifi":
        # SSID as hex (any bytes are safe); a passphrase is printable ASCII, which
        # wpa_supplicant takes verbatim between the first and the last quote
        hex_psk = len(net.psk) == 64 and all(c in "0123456789abcdefABCDEF" for c in net.psk)
        psk = net.psk if hex_psk else f'"{net.psk}"'
        _write_if_changed(root, WPA_FILE, "# written by `echoel first-boot`\n"
                          "ctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev\n"
                          "update_config=0\n\nnetwork={\n"
                          f"    # ssid {json.dumps(net.ssid)}\n"
                          f"    ssid={net.ssid.encode().hex()}\n    psk={psk}\n"
                          "    key_mgmt=WPA-PSK\n}\n", 0o600, done)
        _write_if_changed(root, WIFI_FILE, "# written by `echoel first-boot`\n[Match]\n"
                          "Name=wlan0\n\n[Network]\nDHCP=yes\n", 0o644, done)
        wants = root / WPA_WANTS
        wants.parent.mkdir(parents=True, exist_ok=True)
        if not wants.is_symlink():
            wants.symlink_to(WPA_UNIT)
        done.written.append("/" + WPA_WANTS)
    else:
        for rel in (WPA_FILE, WIFI_FILE, WPA_WANTS):
            _remove(root, rel)


def _hostname(root: Path, host: str, done: FirstBoot) -> None:
    _write_if_changed(root, "etc/hostname", host + "\n", 0o644, done)
    try:
        lines = (root / "etc/hosts").read_text().splitlines()
    except OSError:
        lines = ["127.0.0.1\tlocalhost", "::1\t\tlocalhost ip6-localhost ip6-loopback"]
    lines = [ln for ln in lines if not ln.startswith("127.0.1.1")]
    lines.append(f"127.0.1.1\t{host}")
    _write_if_changed(root, "etc/hosts", "\n".join(lines) + "\n", 0o644, done)


def _ssh_keys(root: Path, keys: tuple[str, ...], done: FirstBoot) -> None:
    users = _passwd(root)
    if TECH_USER in users:
        uid, gid, home = users[TECH_USER]
        rel, owner = f"{home.strip('/')}/.ssh/authorized_keys", (uid, gid)
    else:
        rel, owner = "root/.ssh/authorized_keys", (0, 0)
    path = root / rel
    try:
        old = path.read_text().splitlines()
    except OSError:
        old = []
    keep, inside = [], False
    for ln in old:
        if ln == KEYS_BEGIN:
            inside = True
        elif ln == KEYS_END:
            inside = False
        elif not inside:
            keep.append(ln)
    text = "\n".join([*keep, KEYS_BEGIN, *keys, KEYS_END]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if os.geteuid() == 0:
        os.chown(path.parent, *owner)
    _write_if_changed(root, rel, text, 0o600, done, owner)
    done.ssh_keys_file = "/" + rel


def toml_text(doc: dict[str, Any]) -> str:
    """A config document as TOML (tables, nested tables, arrays of tables, scalars)."""
    out: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise ValueError(f"cannot write {v!r} as a TOML value")

    def table(name: str, t: dict[str, Any], array: bool = False) -> None:
        scalars = {k: v for k, v in t.items() if not _is_table(v)}
        out.append(f"[[{name}]]" if array else f"[{name}]")
        out.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        out.append("")
        for k, v in t.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)
            elif _is_table(v):
                for item in v:
                    table(f"{name}.{k}", item, True)

    for name, t in doc.items():
        if isinstance(t, dict):
            table(name, t)
        elif _is_table(t):
            for item in t:
                table(name, item, True)
        else:
            raise ValueError(f"top-level key {name!r}: only tables are written")
    return "\n".join(out)


def _is_table(v: Any) -> bool:
    return isinstance(v, dict) or (isinstance(v, list) and bool(v)
                                   and all(isinstance(x, dict) for x in v))


def box_config(old: dict[str, Any], done: FirstBoot, settings: BoxSettings | None,
               pki_dir: Path, state_file: Path) -> dict[str, Any]:
    """box.toml's document: the old one with [agent] and [provisioning] set; validated."""
    doc = dict(old)
    agent = dict(doc.get("agent", {}))
    if settings is not None and done.state == "provisioned":
        agent.update(enabled=True, broker_host=settings.broker_host,
                     broker_port=settings.broker_port, ca_file=str(pki_dir / "ca.crt"),
                     cert_file=str(pki_dir / "device.crt"),
                     key_file=str(pki_dir / "device.key"), group=settings.group)
    else:
        agent["enabled"] = False
    doc["agent"] = agent
    section = {"state": done.state, "reason": done.reason, "device_id": done.device_id,
               "state_file": str(state_file)}
    doc[SECTION] = check(section, BOX_TOML)
    config_mod.validate(doc, BOX_TOML)
    return doc


def check(raw: dict, where: str = "<config>") -> dict[str, Any]:
    """The [provisioning] table validated, with defaults filled in; ConfigError otherwise."""
    return config_mod.check_table(where, SECTION, raw, {SECTION: KEYS})


def _header(box: Path) -> str:
    """box.toml's leading comment lines (the image's), then first boot's own line."""
    ours = "# [agent] and [provisioning] are set by `echoel first-boot`"
    keep = []
    with contextlib.suppress(OSError):
        for line in box.read_text().splitlines():
            if not line.startswith("#"):
                break
            if line != ours and not line.startswith("# provisioning state:"):
                keep.append(line)
    return "".join(f"{line}\n" for line in [*keep, ours])


def _state_comment(done: FirstBoot) -> str:
    text = f"# provisioning state: {done.state}"
    if done.reason:
        text += f" ({done.reason})"
    return text.replace("\n", " ") + "\n"


def apply(root: str | Path = "/", data: str | Path = "/data") -> FirstBoot:
    """Apply DATA's provisioning to the system tree ROOT; returns what was found and done."""
    root, data = Path(root), Path(data)
    prov = data / PROV_DIR
    pki_dir = prov / PKI_DIR
    doc_path = prov / PROV_FILE
    done = FirstBoot("unprovisioned")
    settings: BoxSettings | None = None
    try:
        if not doc_path.is_file():
            raise _UnprovisionedError(f"no {doc_path}: the box was flashed without "
                                      "`echoel provision` (or its data partition was wiped)")
        try:
            raw = json.loads(doc_path.read_text())
        except (OSError, ValueError) as exc:
            raise _UnprovisionedError(f"{doc_path}: unreadable: {exc}") from None
        settings = _load_settings(raw)
        done.device_id = settings.device_id
        done.warning = check_identity(pki_dir, settings.device_id)
        done.state = "provisioned"
        done.hostname = settings.hostname or settings.device_id
    except _UnprovisionedError as exc:
        done.state, done.reason = "unprovisioned", str(exc)
    if done.state == "provisioned" and settings is not None:
        _hostname(root, done.hostname, done)
        _network_files(root, settings.network, done)
        _ssh_keys(root, settings.ssh_keys, done)
        agent = _passwd(root).get(AGENT_USER)
        if agent and os.geteuid() == 0:  # the agent runs as `echoel`: it must read its key
            for name in ("device.key", "device.crt", "ca.crt"):
                os.chown(pki_dir / name, agent[0], agent[1])
    state_file = prov / "state.json"
    box = root / BOX_TOML
    try:
        old = tomllib.loads(box.read_text()) if box.exists() else {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProvisionError(f"{box}: cannot read the box's config: {exc}") from None
    try:
        doc = box_config(old, done, settings, pki_dir, state_file)
    except config_mod.ConfigError as exc:
        raise ProvisionError(f"the box's config cannot take the provisioning: {exc}; fix "
                             f"{box} and run `echoel first-boot` again") from None
    _write_if_changed(root, BOX_TOML, _header(box) + _state_comment(done) + toml_text(doc),
                      0o644, done)
    _write_state(state_file, done, doc_path)
    return done


def _write_state(path: Path, done: FirstBoot, doc_path: Path) -> None:
    """state.json; 'since' is kept while the state and provision.json stay the same."""
    digest = ""
    with contextlib.suppress(OSError):
        digest = hashlib.sha256(doc_path.read_bytes()).hexdigest()
    body = done.to_json() | {"provision_sha256": digest}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    if {k: old.get(k) for k in body} == body and old.get("since"):
        return
    body["since"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(body, indent=1) + "\n").encode(), 0o644)


def read_state(data: str | Path = "/data") -> dict[str, Any]:
    """state.json, or an 'unprovisioned' state saying first boot has not run."""
    path = Path(data) / PROV_DIR / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"state": "unprovisioned", "reason": f"no {path}: first boot has not run"}
