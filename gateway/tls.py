"""One TLS policy for every outbound connection: the system's CAs plus `tls.ca_bundle`, always verified.

Built once and handed to every client explicitly, so `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE` and
`SSL_CERT_FILE` in the environment can neither replace nor weaken it.
"""

from __future__ import annotations

import ssl

from gateway.errors import ConfigError


def client_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if context.cert_store_stats().get("x509_ca", 0) == 0:
        # Slim images may ship without a system store that OpenSSL finds; certifi comes with httpx.
        try:
            import certifi

            context.load_verify_locations(cafile=certifi.where())
        except (ImportError, OSError):
            pass
    if ca_bundle:
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls.ca_bundle: cannot load {ca_bundle}: {exc}") from None
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context
