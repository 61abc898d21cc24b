"""Certificates made here for TLS tests: a CA, a member it signed, and an outsider's self-made pair."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from pdcluster.common.tls import TLSFiles


def make_certificates(directory: Path, addresses: tuple[str, ...] = ()) -> dict[str, TLSFiles]:
    """The cluster's CA and a certificate it signed ("member"); and an outsider's self-made
    pair that presents the same CA file but is not signed by it ("outsider"). Each names
    localhost, 127.0.0.1 and `addresses`."""
    ca_cert, ca_key = _issue("pdcluster test CA", ca=True)
    ca_path, _ = _write(directory, "ca", ca_cert, ca_key)
    member = _write(directory, "member", *_issue("pdcluster member", ca_cert, ca_key, addresses=addresses))
    outsider = _write(directory, "outsider", *_issue("outsider", addresses=addresses))
    return {
        "member": TLSFiles(cert=member[0], key=member[1], ca=ca_path),
        "outsider": TLSFiles(cert=outsider[0], key=outsider[1], ca=ca_path),
    }


def _issue(name: str, issuer=None, issuer_key=None, ca: bool = False, addresses: tuple[str, ...] = ()):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), *(x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", *addresses))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return cert, key


def _write(directory, name: str, cert, key) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(cert_path), str(key_path)
