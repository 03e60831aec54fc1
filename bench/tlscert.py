"""A self-signed certificate for ``127.0.0.1``, made at bench time for the ``wss://`` rows.

With the ``cryptography`` package (PyJWT's ``crypto`` extra, so always here):
an ECDSA P-256 key and a certificate valid for a day whose subject
alternative names are ``127.0.0.1`` and ``localhost``. The same file is the
clients' CA file, so they verify the server as a browser would.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class CertPair:
    """Where the PEM files are: ``certfile`` is also the clients' CA file."""

    certfile: Path
    keyfile: Path


def make_cert(directory: Path) -> CertPair:
    """Write ``cert.pem`` and ``key.pem`` (mode 0600) into ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wsserver bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pair = CertPair(directory / "cert.pem", directory / "key.pem")
    pair.certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.keyfile.touch(mode=0o600)
    pair.keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pair
