"""The fleet CA: what it issues is what mosquitto and the agent rely on."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from echoel.daemon.cli import main
from echoel.provisioning.broker_files import acl_text
from echoel.provisioning.pki import FleetPki, PkiError


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ca_device_and_broker_certificates(tmp_path):
    pki = FleetPki(tmp_path / "pki")
    pki.init()
    ca = _cert(pki.ca_cert_path)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    dev = pki.issue("device", "studio-7")
    c = _cert(dev.cert)
    assert c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "studio-7"
    assert ExtendedKeyUsageOID.CLIENT_AUTH in \
        c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    c.verify_directly_issued_by(ca)  # signed by the fleet CA
    assert stat.S_IMODE(dev.key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "pki" / "ca.key").stat().st_mode) == 0o600
    b = _cert(pki.issue("broker", "broker", dns=("mqtt.example",), ips=("10.0.0.5",)).cert)
    san = b.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.example"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert isinstance(c.public_key(), ec.EllipticCurvePublicKey)


def test_refusals(tmp_path):
    pki = FleetPki(tmp_path / "pki")
    with pytest.raises(PkiError, match="no CA here"):
        pki.issue("device", "studio-1")
    pki.init()
    with pytest.raises(PkiError, match="already there"):
        pki.init()
    for bad in ("Studio", "a/b", "dev#", "x", "+", ""):
        with pytest.raises(PkiError, match="lower-case letters"):
            pki.issue("device", bad)
    with pytest.raises(PkiError, match="allowed: device, service, broker"):
        pki.issue("printer", "p1")
    with pytest.raises(PkiError, match="no valid device certificate named 'ghost'"):
        pki.revoke("device", "ghost")


def test_revocation_lands_in_the_crl(tmp_path):
    pki = FleetPki(tmp_path / "pki")
    pki.init()
    serial = pki.issue("device", "studio-3").serial
    keep = pki.issue("device", "studio-4").serial
    assert pki.revoke("device", "studio-3") == 1
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(keep) is None
    assert crl.is_signature_valid(_cert(pki.ca_cert_path).public_key())


def test_acl_confines_boxes_and_names_services():
    text = acl_text(["fleet-service"])
    assert "pattern readwrite devices/%u/#" in text
    assert "user fleet-service\ntopic readwrite devices/#" in text


def test_cli_names_rules(tmp_path, capsys):
    d = str(tmp_path / "pki")
    assert main(["pki", "--dir", d, "init"]) == 0
    assert main(["pki", "--dir", d, "issue", "device", "fleet-x"]) == 2
    assert "are for fleet services" in capsys.readouterr().out
    assert main(["pki", "--dir", d, "issue", "service", "billing"]) == 2
    assert "must start with 'fleet-'" in capsys.readouterr().out
    assert main(["pki", "--dir", d, "issue", "device", "studio-1"]) == 0
    out = capsys.readouterr().out
    assert "studio-1.crt" in out and "BEGIN" not in out  # keys never printed
