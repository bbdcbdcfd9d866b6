"""The emulated Entra ID's token signing keys, and their rotation.

Entra ID publishes its signing keys (JWKS) for every tenant alike and rolls them over: a new key is
published, tokens are signed with it, and the old key stays published for a while so that tokens it
signed still verify, then it is removed. Here `rotate()` makes a new key the signing key while the old
ones stay published, and `retire()` removes every key but the current one. Thread-safe.
"""

from __future__ import annotations

import base64
import datetime as dt
import threading
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = ["SigningKey", "SigningKeys"]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_uint(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey
    certificate_der: bytes

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r})"

    @classmethod
    def generate(cls) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "emulated Entra ID token signing")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .sign(key, hashes.SHA256())
        )
        # Entra ID uses the certificate's base64url SHA-1 thumbprint as both `kid` and `x5t`.
        kid = _b64url(cert.fingerprint(hashes.SHA1()))
        return cls(kid, key, cert.public_bytes(serialization.Encoding.DER))

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    def jwk(self) -> dict[str, Any]:
        numbers = self.public_key.public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "x5t": self.kid,
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
            "x5c": [base64.b64encode(self.certificate_der).decode()],
        }


class SigningKeys:
    """The published keys, oldest first; the last one signs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._published: list[SigningKey] = [SigningKey.generate()]

    @property
    def current(self) -> SigningKey:
        with self._lock:
            return self._published[-1]

    def find(self, kid: str | None) -> SigningKey | None:
        with self._lock:
            return next((key for key in self._published if key.kid == kid), None)

    def kids(self) -> list[str]:
        with self._lock:
            return [key.kid for key in self._published]

    def jwks(self) -> list[dict[str, Any]]:
        with self._lock:
            published = list(self._published)
        return [key.jwk() for key in published]

    def sign(self, claims: dict[str, Any]) -> str:
        key = self.current
        headers = {"typ": "JWT", "kid": key.kid, "x5t": key.kid}
        return jwt.encode(claims, key.private_key, algorithm="RS256", headers=headers)

    def rotate(self) -> str:
        """Sign with a new key from now on; the previous keys stay published. Returns the new kid."""
        key = SigningKey.generate()
        with self._lock:
            self._published.append(key)
        return key.kid

    def retire(self) -> list[str]:
        """Stop publishing every key but the signing one; returns the kids removed."""
        with self._lock:
            removed = [key.kid for key in self._published[:-1]]
            del self._published[:-1]
        return removed
