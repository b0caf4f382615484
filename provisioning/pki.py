"""The fleet's certificate authority: CA, device/service/broker certificates, revocation.

One folder holds it all (the technician's or the fleet's PKI folder):

    ca.crt, ca.key            the fleet CA (keys are written 0600 and never logged)
    index.json                every certificate issued: serial, kind, name, expiry, revocation
    crl.pem                   the revocation list the broker checks
    devices/ID.crt|.key       a box: CN = device id, clientAuth
    services/NAME.crt|.key    a fleet service or operator: CN = NAME, clientAuth
    broker/broker.crt|.key    the MQTT broker: serverAuth, subjectAltName DNS and IP names

Keys are EC P-256: small, fast on the box, accepted by mosquitto/OpenSSL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
KINDS = {"device": "devices", "service": "services", "broker": "broker"}
SERVICE_PREFIX = "fleet-"


_ISSUE_LOCK = threading.Lock()  # threads of one process (flash jobs) issue one at a time


class PkiError(RuntimeError):
    """A PKI operation that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Issued:
    """Where a freshly issued certificate and its key are."""

    cert: Path
    key: Path
    serial: int


def check_name(name: str, what: str = "device id") -> str:
    """A device or service name usable as a certificate CN and an MQTT topic level."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PkiError(f"{what} {name!r}: use 2-63 characters: lower-case letters, digits and "
                       "'-', starting with a letter or digit (it becomes the certificate CN and "
                       "a topic level)")
    return name


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.replace(tmp, path)


def _write_pem(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def self_signed_ca(common_name: str, org: str, days: int
                   ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new EC P-256 CA key and its self-signed certificate (signs certificates and CRLs,
    nothing else)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


class FleetPki:
    """The CA folder: create it once, then issue and revoke certificates."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def ca_cert_path(self) -> Path:
        """The CA certificate (what the broker and every client trust)."""
        return self.root / "ca.crt"

    @property
    def crl_path(self) -> Path:
        """The certificate revocation list (PEM)."""
        return self.root / "crl.pem"

    def exists(self) -> bool:
        """True when the folder holds a CA."""
        return self.ca_cert_path.exists() and (self.root / "ca.key").exists()

    def init(self, org: str = "Echoel fleet", days: int = 3650) -> Path:
        """Create the CA (refuses to overwrite one) and an empty CRL."""
        if self.exists():
            raise PkiError(f"{self.root}: a CA is already there; use it, or choose another "
                           "folder (replacing a CA locks every box out)")
        key, cert = self_signed_ca(f"{org} CA", org, days)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        _write_key(self.root / "ca.key", key)
        _write_pem(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._save_index([])
        self._write_crl([])
        return self.ca_cert_path

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.exists():
            raise PkiError(f"{self.root}: no CA here; create one with `echoel pki init "
                           f"--dir {self.root}`")
        cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        key = serialization.load_pem_private_key((self.root / "ca.key").read_bytes(), None)
        return cert, key  # type: ignore[return-value]

    def _index(self) -> list[dict]:
        path = self.root / "index.json"
        return json.loads(path.read_text()) if path.exists() else []

    def _save_index(self, rows: list[dict]) -> None:
        _write_pem(self.root / "index.json", json.dumps(rows, indent=1).encode())

    def paths(self, kind: str, name: str) -> tuple[Path, Path]:
        """Certificate and key paths of an identity."""
        folder = self.root / KINDS[kind]
        return folder / f"{name}.crt", folder / f"{name}.key"

    def sign(self, kind: str, name: str, public_key: ec.EllipticCurvePublicKey,
             days: int = 825, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
             **index_extra: Any) -> x509.Certificate:
        """A certificate for a public key (kind 'device', 'service' or 'broker'), recorded in
        the index under a lock (technicians may issue from several processes at once)."""
        if kind not in KINDS:
            raise PkiError(f"certificate kind {kind!r}: allowed: {', '.join(KINDS)}")
        check_name(name, f"{kind} name")
        ca_cert, ca_key = self._ca()
        with _ISSUE_LOCK, self._index_locked():
            now = _now()
            serial = x509.random_serial_number()
            eku = ExtendedKeyUsageOID.SERVER_AUTH if kind == "broker" else \
                ExtendedKeyUsageOID.CLIENT_AUTH
            b = (x509.CertificateBuilder()
                 .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                 .issuer_name(ca_cert.subject).public_key(public_key).serial_number(serial)
                 .not_valid_before(now - dt.timedelta(minutes=5))
                 .not_valid_after(min(now + dt.timedelta(days=days),
                                      ca_cert.not_valid_after_utc))
                 .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                critical=True)
                 .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                              key_encipherment=False, data_encipherment=False,
                                              key_agreement=True, key_cert_sign=False,
                                              crl_sign=False, encipher_only=False,
                                              decipher_only=False), critical=True)
                 .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                     ca_key.public_key()), critical=False))
            if kind == "broker":
                alt: list[x509.GeneralName] = [x509.DNSName(d) for d in (dns or ("localhost",))]
                alt += [x509.IPAddress(ipaddress.ip_address(i)) for i in (ips or ("127.0.0.1",))]
                b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
            cert = b.sign(ca_key, hashes.SHA256())
            rows = self._index()
            rows.append({"serial": str(serial), "kind": kind, "name": name,
                         "not_after": cert.not_valid_after_utc.isoformat(), "revoked_at": None,
                         **index_extra})
            self._save_index(rows)
        return cert

    def issue(self, kind: str, name: str, days: int = 825, dns: tuple[str, ...] = (),
              ips: tuple[str, ...] = ()) -> Issued:
        """Issue a certificate and its key into the PKI folder: kind 'device', 'service' or
        'broker'."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.sign(kind, name, key.public_key(), days, dns, ips)
        crt_path, key_path = self.paths(kind, name)
        _write_key(key_path, key)
        _write_pem(crt_path, cert.public_bytes(serialization.Encoding.PEM))
        return Issued(crt_path, key_path, cert.serial_number)

    @contextlib.contextmanager
    def _index_locked(self) -> Iterator[None]:
        """An exclusive lock on the CA folder while its index is read and rewritten."""
        fd = os.open(self.root / ".index.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def revoke(self, kind: str, name: str) -> int:
        """Revoke every certificate issued to `name`; returns how many; rewrites the CRL."""
        rows = self._index()
        hit = [r for r in rows if r["kind"] == kind and r["name"] == name and not r["revoked_at"]]
        if not hit:
            raise PkiError(f"no valid {kind} certificate named {name!r} in {self.root}; "
                           "`echoel pki list` shows what was issued")
        stamp = _now().isoformat()
        for r in hit:
            r["revoked_at"] = stamp
        self._save_index(rows)
        self._write_crl(rows)
        return len(hit)

    def list(self) -> list[dict]:
        """Every certificate issued, oldest first."""
        return self._index()

    def _write_crl(self, rows: list[dict]) -> None:
        ca_cert, ca_key = self._ca()
        now = _now()
        b = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
             .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=30)))
        for r in rows:
            if r["revoked_at"]:
                b = b.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(int(r["serial"]))
                    .revocation_date(dt.datetime.fromisoformat(r["revoked_at"])).build())
        crl = b.sign(ca_key, hashes.SHA256())
        _write_pem(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
