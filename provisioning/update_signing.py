"""The update CA: who may sign what a box installs (RAUC bundles, models, config).

It is a CA of its own, separate from the fleet CA (provisioning/pki.py) that identifies boxes
and services: a leaked device key must never be able to sign an update, and the signing key
can live offline. One folder holds it:

    update-ca.crt, update-ca.key    the update CA (keys 0600)
    signing/NAME.crt|.key           a signing certificate: keyUsage digitalSignature and
                                    extendedKeyUsage codeSigning (what RAUC's
                                    `check-purpose=codesign` and this module's verifier demand)

RAUC bundles are signed by `rauc bundle` (image/bundle.py) with the signing certificate and
checked by RAUC against the update CA (its keyring). Model manifests and config artifacts are
JSON documents carrying detached signatures in a `signatures` list; each entry is

    {"key_id": sha256 fingerprint of the signing certificate (hex),
     "algorithm": "ecdsa-p256-sha256",
     "value": base64 of the DER ECDSA signature over the canonical bytes,
     "cert": the signing certificate (PEM)}

over the document less `signatures` as compact JSON with sorted keys (the bytes of
daemon/model_manifest.canonical_bytes). The box holds only the update CA certificate: a signing
certificate is accepted when the CA issued it, it is in its validity period, it is not a CA, and
it has digitalSignature and codeSigning.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from echoel.provisioning.pki import PkiError, check_name, self_signed_ca

ALGORITHM = "ecdsa-p256-sha256"
CA_CERT = "update-ca.crt"
CA_KEY = "update-ca.key"


class SignatureError(ValueError):
    """A signed artifact that must not be installed: the message says which check failed."""


@dataclass(frozen=True)
class SigningIdentity:
    """A signing certificate and its key (what `rauc bundle` and `sign_document` take)."""

    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


SIGNING_USAGE = x509.KeyUsage(digital_signature=True, content_commitment=False,
                              key_encipherment=False, data_encipherment=False,
                              key_agreement=False, key_cert_sign=False, crl_sign=False,
                              encipher_only=False, decipher_only=False)


class UpdateCa:
    """The update CA folder: create it once, then issue signing certificates."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def ca_cert_path(self) -> Path:
        """The update CA certificate: RAUC's keyring and the box's trust for artifacts."""
        return self.root / CA_CERT

    def exists(self) -> bool:
        """True when the folder holds an update CA."""
        return self.ca_cert_path.exists() and (self.root / CA_KEY).exists()

    def init(self, org: str = "Echoel fleet", days: int = 3650) -> Path:
        """Create the update CA (refuses to overwrite one)."""
        if self.exists():
            raise PkiError(f"{self.root}: an update CA is already there; replacing it makes "
                           "every box refuse every update signed with the new one")
        key, cert = self_signed_ca(f"{org} update CA", org, days)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        _write(self.root / CA_KEY, _key_pem(key), 0o600)
        _write(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return self.ca_cert_path

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.exists():
            raise PkiError(f"{self.root}: no update CA here; create one with UpdateCa.init()")
        cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        key = serialization.load_pem_private_key((self.root / CA_KEY).read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.root / CA_KEY}: not an EC key")
        return cert, key

    def paths(self, name: str) -> SigningIdentity:
        """Where the signing certificate `name` and its key are."""
        return SigningIdentity(self.root / "signing" / f"{name}.crt",
                               self.root / "signing" / f"{name}.key")

    def issue_signing(self, name: str = "release", days: int = 825) -> SigningIdentity:
        """Issue a signing certificate (digitalSignature + EKU codeSigning)."""
        check_name(name, "signing certificate name")
        ca_cert, ca_key = self._ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                       _org(ca_cert)),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"{name} update signing")]))
                .issuer_name(ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(SIGNING_USAGE, critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        ident = self.paths(name)
        _write(ident.key, _key_pem(key), 0o600)
        _write(ident.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return ident


def _org(cert: x509.Certificate) -> str:
    got = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(got[0].value) if got else "Echoel fleet"


def canonical_bytes(doc: dict[str, Any]) -> bytes:
    """What a detached signature covers: the document less `signatures`, compact JSON with
    sorted keys, UTF-8 (the same bytes as model_manifest.canonical_bytes)."""
    d = dict(doc)
    d.pop("signatures", None)
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def fingerprint(cert: x509.Certificate) -> str:
    """sha256 fingerprint of a certificate (hex): a signature's key_id."""
    return cert.fingerprint(hashes.SHA256()).hex()


def sign_document(doc: dict[str, Any], identity: SigningIdentity) -> dict[str, Any]:
    """A copy of `doc` with one more detached signature (existing ones are kept)."""
    cert = x509.load_pem_x509_certificate(identity.cert.read_bytes())
    key = serialization.load_pem_private_key(identity.key.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{identity.key}: not an EC key ({ALGORITHM} needs P-256)")
    sig = key.sign(canonical_bytes(doc), ec.ECDSA(hashes.SHA256()))
    out = dict(doc)
    out["signatures"] = [*doc.get("signatures", []), {
        "key_id": fingerprint(cert), "algorithm": ALGORITHM,
        "value": base64.b64encode(sig).decode(),
        "cert": cert.public_bytes(serialization.Encoding.PEM).decode()}]
    return out


def load_ca(path: str | Path) -> x509.Certificate:
    """The update CA certificate the box trusts."""
    p = Path(path)
    try:
        return x509.load_pem_x509_certificate(p.read_bytes())
    except OSError as exc:
        raise SignatureError(f"{p}: cannot read the update CA certificate ({exc.strerror}); "
                             "the box refuses every signed artifact without it") from None
    except ValueError:
        raise SignatureError(f"{p}: not a PEM certificate (the update CA)") from None


def check_signing_cert(cert: x509.Certificate, ca: x509.Certificate,
                       at: dt.datetime | None = None) -> None:
    """Raise SignatureError unless `ca` issued `cert` as a code-signing leaf valid at `at`."""
    who = cert.subject.rfc4514_string()
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise SignatureError(f"signing certificate {who!r} was not issued by the update CA "
                             f"{ca.subject.rfc4514_string()!r} (another key signed it)") from None
    now = at or _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise SignatureError(f"signing certificate {who!r} is valid from "
                             f"{cert.not_valid_before_utc:%Y-%m-%d} to "
                             f"{cert.not_valid_after_utc:%Y-%m-%d}; now is {now:%Y-%m-%d}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        raise SignatureError(f"signing certificate {who!r} is a CA; a signing leaf is needed")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise SignatureError(f"signing certificate {who!r} lacks {exc.oid._name}: needs "
                             "keyUsage digitalSignature and extendedKeyUsage codeSigning") from None
    if not ku.digital_signature or ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        raise SignatureError(f"signing certificate {who!r}: unsuitable purpose (needs keyUsage "
                             "digitalSignature and extendedKeyUsage codeSigning)")


def verify_document(doc: dict[str, Any], ca: x509.Certificate, what: str = "artifact") -> str:
    """Check that at least one signature of `doc` is valid and from the update CA.

    Returns the signer's subject; SignatureError names what failed (unsigned, another CA,
    tampered content, unknown algorithm).
    """
    sigs = doc.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise SignatureError(f"{what}: not signed (no 'signatures'); the box installs only "
                             "artifacts signed with the fleet's update key")
    data = canonical_bytes(doc)
    errors: list[str] = []
    for i, s in enumerate(sigs):
        if not isinstance(s, dict):
            errors.append(f"signature {i}: not an object")
            continue
        if s.get("algorithm") != ALGORITHM:
            errors.append(f"signature {i}: algorithm {s.get('algorithm')!r}; "
                          f"allowed: {ALGORITHM!r}")
            continue
        try:
            cert = x509.load_pem_x509_certificate(str(s.get("cert", "")).encode())
            raw = base64.b64decode(str(s.get("value", "")), validate=True)
        except (ValueError, binascii.Error):
            errors.append(f"signature {i}: unreadable certificate or value")
            continue
        try:
            check_signing_cert(cert, ca)
        except SignatureError as exc:
            errors.append(f"signature {i}: {exc}")
            continue
        if s.get("key_id") != fingerprint(cert):
            errors.append(f"signature {i}: key_id {s.get('key_id')!r} is not the fingerprint "
                          "of its certificate")
            continue
        pub = cert.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            errors.append(f"signature {i}: the certificate's key is not EC")
            continue
        try:
            pub.verify(raw, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            errors.append(f"signature {i}: does not match the content (tampered after signing)")
            continue
        return cert.subject.rfc4514_string()
    raise SignatureError(f"{what}: no valid signature: " + "; ".join(errors))


def sign_json_file(path: str | Path, identity: SigningIdentity,
                   out: str | Path | None = None) -> Path:
    """Sign a JSON document on disk (a model manifest or a config artifact {"version",
    "values"}); writes `out` (default: in place, atomically) with sorted keys."""
    src = Path(path)
    try:
        doc = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PkiError(f"{src}: not a readable JSON document ({exc})") from None
    if not isinstance(doc, dict):
        raise PkiError(f"{src}: the document must be a JSON object")
    if "inputs" in doc and "sha256" in doc:  # a model manifest: sign what the box will see
        from echoel.daemon import model_manifest

        try:
            doc = model_manifest.from_dict(doc, str(src)).to_dict()
        except model_manifest.ManifestError as exc:
            raise PkiError(str(exc)) from None
    dest = Path(out) if out else src
    _write(dest, (json.dumps(sign_document(doc, identity), indent=2, sort_keys=True)
                  + "\n").encode(), 0o644)
    return dest
