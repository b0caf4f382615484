"""Give one box its identity and settings without rebuilding its image (`echoel provision`).

What a box gets, in its data partition (p4, /data on the box):

    provisioning/provision.json   device id, hostname, broker, group, network, SSH keys (0600:
                                  it may hold the Wi-Fi passphrase)
    provisioning/pki/ca.crt       the fleet CA
    provisioning/pki/device.crt   this box's certificate, CN = device id, issued by the fleet CA
    provisioning/pki/device.key   its private key (0600)

The key pair is generated in memory and written only to the target; the technician's folders
keep nothing secret unless asked (keep_secrets). The CA's index records the certificate, so
`echoel pki revoke device ID` works for a provisioned box.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from echoel.provisioning import image_layout
from echoel.provisioning.pki import SERVICE_PREFIX, FleetPki, PkiError, check_name

SCHEMA_VERSION = 1
PROV_DIR = "provisioning"
PROV_FILE = "provision.json"
PKI_DIR = "pki"
HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
SSH_KEY_RE = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|"
                        r"sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com) "
                        r"[A-Za-z0-9+/=]+( .*)?$")
DEFAULT_PORT = 8883


class ProvisionError(RuntimeError):
    """Provisioning that cannot be done; the message names the thing, the value, what is
    allowed."""


@dataclass(frozen=True)
class Network:
    """How the box reaches the network: wired DHCP, wired static, or Wi-Fi (DHCP)."""

    mode: str = "dhcp"  # "dhcp" | "static" | "wifi"
    address: str = ""  # static: IP/prefix, e.g. 192.168.10.20/24
    gateway: str = ""
    dns: tuple[str, ...] = ()
    ssid: str = ""
    psk: str = field(default="", repr=False)

    def to_json(self) -> dict[str, Any]:
        """The network object of provision.json."""
        if self.mode == "dhcp":
            return {"mode": "dhcp"}
        if self.mode == "static":
            return {"mode": "static", "address": self.address, "gateway": self.gateway,
                    "dns": list(self.dns)}
        return {"mode": "wifi", "ssid": self.ssid, "psk": self.psk}


def check_network(net: Network) -> Network:
    """Validate a network setting; returns it."""
    if net.mode == "dhcp":
        return net
    if net.mode == "static":
        try:
            iface = ipaddress.ip_interface(net.address)
        except ValueError:
            raise ProvisionError(f"static address {net.address!r}: write IP/prefix, e.g. "
                                 "192.168.10.20/24") from None
        if "/" not in net.address or iface.network.prefixlen in (0, iface.max_prefixlen):
            raise ProvisionError(f"static address {net.address!r}: give the prefix length "
                                 "(1-31 for IPv4), e.g. 192.168.10.20/24")
        for what, value in [("gateway", net.gateway), *(("dns", d) for d in net.dns)]:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ProvisionError(f"{what} {value!r}: must be an IP address") from None
        if ipaddress.ip_address(net.gateway) not in iface.network:
            raise ProvisionError(f"gateway {net.gateway}: not in the box's network "
                                 f"{iface.network}")
        if not net.dns:
            raise ProvisionError("static network: give at least one --dns server")
        return net
    if net.mode == "wifi":
        if not 1 <= len(net.ssid.encode()) <= 32:
            raise ProvisionError(f"Wi-Fi SSID {net.ssid!r}: must be 1-32 bytes")
        psk = net.psk
        hex64 = len(psk) == 64 and all(c in "0123456789abcdefABCDEF" for c in psk)
        if not hex64 and not (8 <= len(psk) <= 63 and all(32 <= ord(c) < 127 for c in psk)):
            raise ProvisionError(f"Wi-Fi passphrase for {net.ssid!r}: must be 8-63 printable "
                                 f"ASCII characters or 64 hex digits (got {len(psk)} "
                                 "characters)")
        return net
    raise ProvisionError(f"network mode {net.mode!r}: allowed: dhcp, static, wifi")


@dataclass(frozen=True)
class BoxSettings:
    """What one box is told at provisioning (everything but its key pair)."""

    device_id: str
    broker_host: str
    broker_port: int = DEFAULT_PORT
    group: str = ""
    hostname: str = ""
    network: Network = Network()
    ssh_keys: tuple[str, ...] = ()

    def document(self, created: str | None = None) -> dict[str, Any]:
        """provision.json's content."""
        return {"schema": SCHEMA_VERSION, "device_id": self.device_id,
                "hostname": self.hostname or self.device_id, "broker_host": self.broker_host,
                "broker_port": self.broker_port, "group": self.group,
                "network": self.network.to_json(),
                "ssh_authorized_keys": list(self.ssh_keys),
                "created": created or dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def check_settings(s: BoxSettings) -> BoxSettings:
    """Validate every field; returns the settings."""
    try:
        check_name(s.device_id)
    except PkiError as exc:
        raise ProvisionError(str(exc)) from None
    if s.device_id.startswith(SERVICE_PREFIX):
        raise ProvisionError(f"device id {s.device_id!r}: names starting with "
                             f"{SERVICE_PREFIX!r} are for fleet services")
    host = s.hostname or s.device_id
    if not HOSTNAME_RE.match(host):
        raise ProvisionError(f"hostname {host!r}: use 1-63 lower-case letters, digits and '-', "
                             "not starting or ending with '-'")
    if not s.broker_host or any(c.isspace() for c in s.broker_host):
        raise ProvisionError(f"broker host {s.broker_host!r}: give a host name or IP address")
    if not 1 <= s.broker_port <= 65535:
        raise ProvisionError(f"broker port {s.broker_port}: must be 1-65535")
    if s.group and not re.match(r"^[A-Za-z0-9_.-]{1,64}$", s.group):
        raise ProvisionError(f"group {s.group!r}: use 1-64 letters, digits, '_', '.', '-'")
    for k in s.ssh_keys:
        check_ssh_key(k, "SSH key")
    check_network(s.network)
    return s


def parse_broker(text: str) -> tuple[str, int]:
    """'HOST[:PORT]' or '[IPv6]:PORT' -> (host, port); the port defaults to 8883."""
    text = text.strip()
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\](?::(\d+))?$", text)
    if m:
        return m.group(1), int(m.group(2) or DEFAULT_PORT)
    host, sep, port = text.rpartition(":")
    if not sep or ":" in host:
        return text, DEFAULT_PORT
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ProvisionError(f"broker {text!r}: the port {port!r} must be 1-65535")
    return host, int(port)


def check_ssh_key(line: str, where: str) -> str:
    """One OpenSSH public key line; a private key is refused."""
    if "PRIVATE KEY" in line:
        raise ProvisionError(f"{where}: this is a private key; give the technician's public "
                             "key (the .pub file)")
    if not SSH_KEY_RE.match(line):
        raise ProvisionError(f"{where}: {line[:40]!r}... is not an OpenSSH public key line "
                             "(ssh-ed25519 AAAA... comment)")
    return line


def read_ssh_keys(files: list[str | Path]) -> tuple[str, ...]:
    """Public keys from authorized_keys-style files (blank lines and # comments skipped)."""
    keys: list[str] = []
    for f in files:
        try:
            text = Path(f).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ProvisionError(f"SSH key file {f}: cannot read it: {exc}") from None
        if "PRIVATE KEY" in text:
            check_ssh_key("PRIVATE KEY", f"SSH key file {f}")
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(check_ssh_key(line, f"SSH key file {f} line {n}"))
    return tuple(dict.fromkeys(keys))


def read_psk(path: str | Path) -> str:
    """The Wi-Fi passphrase from a file (its first line; kept off the command line)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProvisionError(f"Wi-Fi passphrase file {path}: cannot read it: {exc}") from None
    if not lines:
        raise ProvisionError(f"Wi-Fi passphrase file {path}: empty")
    return lines[0]


@dataclass(frozen=True)
class Identity:
    """A box's key pair and certificate, in memory (PEM)."""

    device_id: str
    key_pem: bytes = field(repr=False)
    cert_pem: bytes
    ca_pem: bytes
    serial: int


def issue_identity(pki: FleetPki, device_id: str, days: int = 825) -> Identity:
    """A new EC P-256 key (never written here) and a device certificate from the fleet CA,
    recorded in the CA's index."""
    check_name(device_id)
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        cert = pki.sign("device", device_id, key.public_key(), days, provisioned=True)
    except PkiError as exc:
        raise ProvisionError(str(exc)) from None
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Identity(device_id, key_pem, cert.public_bytes(serialization.Encoding.PEM),
                    pki.ca_cert_path.read_bytes(), cert.serial_number)


def write_provisioning(data_root: Path, settings: BoxSettings, ident: Identity) -> Path:
    """Write the provisioning files under a data partition's root (mounted p4, or /data);
    provision.json goes last, so its presence means the set is complete."""
    if ident.device_id != settings.device_id:
        raise ProvisionError(f"identity of {ident.device_id!r} given for box "
                             f"{settings.device_id!r}")
    prov = data_root / PROV_DIR
    pki_dir = prov / PKI_DIR
    old = prov / PROV_FILE
    if old.exists():
        old.unlink()  # a half-rewritten set must not look complete
    pki_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(prov, 0o755)
    os.chmod(pki_dir, 0o755)
    image_layout.write_atomic(pki_dir / "ca.crt", ident.ca_pem, 0o644)
    image_layout.write_atomic(pki_dir / "device.crt", ident.cert_pem, 0o644)
    image_layout.write_atomic(pki_dir / "device.key", ident.key_pem, 0o600)
    doc = settings.document()
    image_layout.write_atomic(old, (json.dumps(doc, indent=1) + "\n").encode(), 0o600)
    return old


def keep_secrets(folder: str | Path, ident: Identity) -> Path:
    """Copy a box's key and certificate to a folder the technician chose (key 0600)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_layout.write_atomic(folder / f"{ident.device_id}.key", ident.key_pem, 0o600)
    image_layout.write_atomic(folder / f"{ident.device_id}.crt", ident.cert_pem, 0o644)
    return folder / f"{ident.device_id}.key"


@dataclass(frozen=True)
class Provisioned:
    """What provisioning one target did."""

    target: str
    device_id: str
    serial: int
    kept_key: str | None

    def to_json(self) -> dict[str, Any]:
        """A plain dict for summaries."""
        d = asdict(self)
        d["serial"] = str(self.serial)
        return d


def provision_target(target: str | Path, settings: BoxSettings, pki: FleetPki,
                     keep_dir: str | Path | None = None, days: int = 825) -> Provisioned:
    """Provision an image file or a card: issue the identity, mount p4, write, unmount."""
    from echoel.provisioning.flash import FlashError, inspect_target, refusal  # (import cycle)

    check_settings(settings)
    try:
        why = refusal(inspect_target(target), 0)
    except FlashError as exc:
        raise ProvisionError(str(exc)) from None
    if why:  # a mounted data partition mounted twice would be corrupted
        raise ProvisionError(f"refused: {why}")
    image_layout.data_partition(target)  # refuse a wrong layout before issuing anything
    ident = issue_identity(pki, settings.device_id, days)
    with image_layout.data_mounted(target) as root:
        write_provisioning(root, settings, ident)
    kept = str(keep_secrets(keep_dir, ident)) if keep_dir else None
    return Provisioned(str(target), settings.device_id, ident.serial, kept)


def read_back(target: str | Path) -> dict[str, Any]:
    """The provisioning on a target, read through a read-only mount: provision.json, the PEMs
    and each file's mode (for checks and tests)."""
    with image_layout.data_mounted(target, readonly=True) as root:
        prov = root / PROV_DIR
        out: dict[str, Any] = {"provision": json.loads((prov / PROV_FILE).read_text()),
                               "modes": {}}
        for name in ("ca.crt", "device.crt", "device.key"):
            p = prov / PKI_DIR / name
            out[name] = p.read_bytes()
            out["modes"][name] = p.stat().st_mode & 0o777
        out["modes"][PROV_FILE] = (prov / PROV_FILE).stat().st_mode & 0o777
    return out
