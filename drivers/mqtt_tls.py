"""An MQTT 5 client over mutual TLS (paho-mqtt), as the box's agent and the fleet use it."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt


class LinkConfigError(ValueError):
    """A broker address or TLS file that cannot be used."""


@dataclass(frozen=True)
class BrokerLink:
    """Where the broker is and who we are: host, port, CA, our certificate and key."""

    host: str
    port: int
    ca_file: str
    cert_file: str
    key_file: str
    keepalive_s: int = 30

    def check(self) -> None:
        """Raise LinkConfigError naming the first missing or unreadable file."""
        for what, path in (("ca_file", self.ca_file), ("cert_file", self.cert_file),
                           ("key_file", self.key_file)):
            p = Path(path)
            if not path or not p.is_file():
                raise LinkConfigError(f"{what} = {path!r}: no such file; provision the box "
                                      "(`echoel pki issue device ID`) and point the config at it")
            try:
                p.open("rb").close()
            except OSError as exc:
                raise LinkConfigError(f"{what} = {path!r}: cannot read it: {exc.strerror}") \
                    from None
        if not 1 <= self.port <= 65535:
            raise LinkConfigError(f"port = {self.port}: must be from 1 to 65535")


def tls_context(link: BrokerLink) -> ssl.SSLContext:
    """TLS 1.2+ context that verifies the broker against the fleet CA and presents our cert."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=link.ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(link.cert_file, link.key_file)
    return ctx


def make_client(link: BrokerLink, client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
    """A paho MQTT 5 client with TLS set up (not yet connected)."""
    link.check()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5, manual_ack=manual_ack)
    c.tls_set_context(tls_context(link))
    return c


def common_name(cert_file: str) -> str:
    """The CN of a PEM certificate (a box's device id)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise LinkConfigError(f"cert_file = {cert_file!r}: the certificate has no CN")
    return str(attrs[0].value)
