"""TLS termination of client connections, with the certificate and key picked up when rotated.

The TLS listener (`gateway.tls_listener`) asks `for_new_connection()` for the context of each
connection it accepts. At most once a second that looks whether the certificate or key secret, or the
client CA file, changed; if so it builds a new context, and from then on each new connection gets the
newest context that loaded. A half-rotated pair (a new certificate beside the old key) fails to load:
the previous context stays in use and the problem is logged once, until the pair matches.

Session resumption skips the client certificate check: a resumed session keeps the verdict of the
handshake that created it. So a connection starts in the context it will finish in (OpenSSL looks a
session up in the context the connection was created with, even when a callback switches it later),
and a trust change (`client_ca`) builds a new context with its own session cache and ticket keys: no
session from before the change resumes. With `client_ca` set, no session tickets are issued either: a
TLS 1.3 client makes a full handshake (its certificate checked) on every connection, and a TLS 1.2
session id resumes only within the session's lifetime and trust.

The secrets come from the app's assembly (`gateway.assembly`): files are re-read when they change, Key
Vault secrets follow the vault's poll, so a certificate rotated in Key Vault is used by new connections
within one `keyvault.refresh_every_s` (plus a second).
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config import ServerTlsConfig
from gateway.errors import ConfigError, SecretError
from gateway.secrets import Secret

if TYPE_CHECKING:
    from gateway.assembly import Assembly

logger = logging.getLogger("gateway.server")

CHECK_INTERVAL_S = 1.0


def _file_signature(path: str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class ServerTls:
    """The server-side SSLContext (`context`, for the listener) and its rotation."""

    def __init__(self, config: ServerTlsConfig, assembly: Assembly) -> None:
        self.client_ca = config.client_ca
        # Built by the app's assembly: a Key Vault certificate is read with the configuration's TLS trust,
        # egress and Key Vault settings, and follows the vault's poll (new versions reach `_versions`).
        self.cert: Secret = assembly.secret(config.cert, "server.tls.cert")
        self.key: Secret = assembly.secret(config.key, "server.tls.key")
        self._loaded = self._versions()
        self._next_check = time.monotonic() + CHECK_INTERVAL_S
        self._last_error: str | None = None
        try:
            self.context = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"server.tls: cannot load the certificate and key: {exc}") from None
        self.current = self.context

    def _versions(self) -> tuple[int, int, tuple[int, int, int] | None]:
        return (self.cert.version, self.key.version, _file_signature(self.client_ca))

    def _build(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        # load_cert_chain reads files only: the secrets (perhaps from the environment) go through a
        # private directory that exists just for the call.
        with tempfile.TemporaryDirectory(prefix="gateway-tls-") as directory:
            cert_file = Path(directory, "cert.pem")
            key_file = Path(directory, "key.pem")
            for path, secret in ((cert_file, self.cert), (key_file, self.key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(secret.value + "\n")
            context.load_cert_chain(cert_file, key_file)
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"server.tls.client_ca: cannot load {self.client_ca}: {exc}") from None
            context.verify_mode = ssl.CERT_REQUIRED
            # A ticket would let a client resume without its certificate being checked again, and
            # each resumption issues a new ticket: a session could outlive its certificate forever.
            context.options |= ssl.OP_NO_TICKET  # TLS 1.2
            context.num_tickets = 0  # TLS 1.3
        return context

    def for_new_connection(self) -> ssl.SSLContext:
        """The context for a connection just accepted: the newest that loaded. A context carries its
        own session cache and ticket keys, so sessions of a replaced context do not resume."""
        if time.monotonic() >= self._next_check:
            self.refresh()
        return self.current

    def refresh(self) -> bool:
        """Build a new context if a secret or the client CA changed; True when one was built."""
        self._next_check = time.monotonic() + CHECK_INTERVAL_S
        try:
            self.cert.value  # noqa: B018 - reading a file secret re-checks its file
            self.key.value  # noqa: B018
        except SecretError:
            pass  # the secret keeps its last value and logs why
        versions = self._versions()
        if versions == self._loaded:
            return False
        try:
            context = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            message = (
                f"server.tls: the changed certificate or key does not load ({exc}); serving the previous one"
            )
            if message != self._last_error:
                self._last_error = message
                logger.warning(message)
            return False
        self._last_error = None
        self._loaded = versions
        self.current = context
        logger.warning("server.tls: certificate reloaded; new connections use it")
        return True
