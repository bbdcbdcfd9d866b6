"""Local PKI for the emulator: a throwaway CA, a loopback server certificate, app-registration certificates.

MSAL refuses non-https authorities, so the emulated Entra ID must serve TLS that clients can verify
against a CA file, and certificate credentials need a key pair whose thumbprints match what Entra shows.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "ClientCertificate",
    "TlsFiles",
    "generate_client_certificate",
    "generate_tls",
    "thumbprints",
]

# Backdating absorbs clock differences between the process that signs and the one that verifies.
_BACKDATE = dt.timedelta(minutes=5)
_SERVER_NAMES = ("localhost",)
_SERVER_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files written by `generate_tls`. Clients trust `ca_cert`; the server uses the other two."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class ClientCertificate:
    """A certificate credential for an app registration, in the shapes MSAL and Entra ID use.

    Thumbprints are lowercase hex digests of the DER certificate (what MSAL computes itself).
    """

    private_key_pem: str
    certificate_pem: str
    sha1_thumbprint: str
    sha256_thumbprint: str


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "scoring-gateway emulator"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    # Keys are created 0600 from the start rather than chmod-ed after the fact.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def thumbprints(certificate_pem: str | bytes) -> tuple[str, str]:
    """Return the (SHA-1, SHA-256) lowercase hex thumbprints of a PEM certificate."""
    data = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
    cert = x509.load_pem_x509_certificate(data)
    return cert.fingerprint(hashes.SHA1()).hex(), cert.fingerprint(hashes.SHA256()).hex()


def generate_tls(directory: Path, *, valid_days: int = 30) -> TlsFiles:
    """Create `ca.pem`, `server.pem` and `server-key.pem` in `directory` (created if missing).

    The server certificate covers localhost, 127.0.0.1 and ::1. The CA private key is never written:
    nothing needs to sign with it after this call.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=valid_days)

    ca_key = _new_key()
    ca_name = _name("scoring-gateway emulator CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = _new_key()
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in _SERVER_NAMES]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in _SERVER_IPS]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        # OpenSSL 3 strict verification (the default from Python 3.13 on) insists on the AKI.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
    )
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write(files.server_key, _key_pem(server_key), private=True)
    return files


def generate_client_certificate(
    common_name: str = "scoring-gateway emulator app", *, valid_days: int = 365
) -> ClientCertificate:
    """Create a self-signed certificate + key, as uploaded to an app registration's "Certificates" blade.

    Entra ID accepts self-signed certificates for client credentials, so no CA is involved.
    """
    now = dt.datetime.now(dt.UTC)
    key = _new_key()
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    sha1, sha256 = thumbprints(cert_pem)
    return ClientCertificate(
        private_key_pem=_key_pem(key).decode(),
        certificate_pem=cert_pem,
        sha1_thumbprint=sha1,
        sha256_thumbprint=sha256,
    )
