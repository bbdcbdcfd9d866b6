"""Inbound protection, the first stage of a proxied request: whether the client may use the gateway's
credentials at all, and who it is, as one `Caller` (`gateway.callers`).

In this order:

1. its network (`inbound.allow_cidrs`): outside, 403 `client_not_allowed`;
2. its credential, the first form present deciding:
   - an Entra ID access token in `Authorization: Bearer` (with `inbound.entra_id`): validated by
     `gateway.caller_tokens`; a refused token is 401 `caller_unauthenticated`, whatever else the request
     carries. The caller is `app:<appid>`;
   - a key of `inbound.api_keys` in `inbound.api_key_header`: the caller is `key:<its name>`; a key that
     matches none is 401 `client_unauthenticated`;
   - with `inbound.entra_id` or `inbound.api_keys` configured, one of the two is required: a request
     with neither is 401 (`caller_unauthenticated` when Entra ID tokens are accepted, with the bare
     `WWW-Authenticate: Bearer` challenge; `client_unauthenticated` otherwise, as before tokens existed);
   - otherwise the client certificate of a mutual-TLS connection (`server.tls.client_ca`, which the TLS
     handshake requires): `cert:<CN>`; and with none of these, `anonymous`.

So a client certificate names the caller only where it is the one credential the gateway asks for: next
to API keys it stays what it was, a requirement of the connection, and the key names the caller.

The key header is removed from the request; `Authorization` never reaches the upstream anyway
(`gateway.headers`), which gets the route's own credential. Everything is decided without I/O, except
a token naming a signing key the gateway does not hold: `authenticate` then has the keys read again
(at most once per 5 minutes, see `gateway.signing_keys`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.caller_tokens import bearer_token
from gateway.callers import Caller, CallerFactory, certificate_common_name
from gateway.config import GatewayConfig, is_loopback
from gateway.errors import CallerTokenMissing, CallerUnauthenticated, ClientNotAllowed, ClientUnauthenticated

if TYPE_CHECKING:
    from gateway.caller_tokens import CallerTokenValidator
    from gateway.exchange import Exchange

_AUTHORIZATION = b"authorization"
# Client addresses whose verdict is remembered (a bounded cache: a scan of many addresses is checked anew).
_MAX_REMEMBERED_ADDRESSES = 4096


def inbound_problem(config: GatewayConfig) -> str | None:
    """Why `config` must not serve, or None: a listener other machines reach needs inbound protection
    (client networks, API keys, Entra ID tokens or client certificates) unless the operator says the
    network is enough."""
    server = config.server
    if not server.tcp or is_loopback(server.host) or server.allow_unauthenticated_remote:
        return None
    if config.has_inbound_protection():
        return None
    return (
        f"server.host is {server.host}, which is reachable from other machines, and no inbound protection "
        "is configured: anyone who can reach it could use this gateway's credentials. Configure "
        "`inbound.allow_cidrs`, `inbound.api_keys`, `inbound.entra_id` (Entra ID caller tokens), "
        "`server.tls.client_ca` (mutual TLS), bind 127.0.0.1, or set "
        "`server.allow_unauthenticated_remote: true` if the network already restricts access"
    )


def needs_inbound(config: GatewayConfig) -> bool:
    """Whether requests pass an inbound stage at all (without one, every caller is `anonymous`)."""
    server_tls = config.server.tls
    return (
        config.inbound.enabled
        or config.inbound.entra_id is not None
        or (server_tls is not None and server_tls.client_ca is not None)
    )


class Inbound:
    """The inbound stage of one configuration, built once (`gateway.assembly`). `identify` decides without
    I/O; for a token naming a signing key the gateway does not hold it raises `UnknownSigningKey`, and the
    proxy awaits `authenticate`, which reads the keys again."""

    __slots__ = (
        "_allowed_cache",
        "_anonymous",
        "_callers",
        "_identify",
        "_key_hashes",
        "_key_header",
        "_networks",
        "tokens",
    )

    def __init__(
        self, config: GatewayConfig, callers: CallerFactory, tokens: CallerTokenValidator | None = None
    ) -> None:
        inbound = config.inbound
        self._callers = callers
        self._networks = [ipaddress.ip_network(c, strict=False) for c in inbound.allow_cidrs]
        self._allowed_cache: dict[str, bool] = {}
        self._key_hashes = [(callers.key(k.name), bytes.fromhex(k.sha256)) for k in inbound.api_keys]
        self._key_header = inbound.api_key_header.encode("latin-1")
        self.tokens = tokens
        self._anonymous = callers.anonymous
        # The form of this configuration, chosen once: a token or a key is required when either is
        # configured (see the module docstring); API keys alone keep their own single pass.
        server_tls = config.server.tls
        self._identify: Callable[[Exchange], Caller]
        if tokens is not None:
            self._identify = self._token_or_key
        elif self._key_hashes:
            self._identify = self._key
        elif server_tls is not None and server_tls.client_ca is not None:
            self._identify = self._certificate
        else:
            self._identify = self._nobody

    def identify(self, exchange: Exchange) -> Caller:
        """The request's caller, or a refusal (`ClientFacingError`). Removes the API key header. With
        Entra ID callers, raises `UnknownSigningKey` for a token whose key the gateway does not hold."""
        if self._networks:
            self._check_network(exchange)
        return self._identify(exchange)

    async def authenticate(self, exchange: Exchange) -> Caller:
        """After `identify` raised `UnknownSigningKey`: the caller, once the signing keys were read again
        (at most once per 5 minutes), or a refusal. Rare: Entra ID started signing with a new key, or the
        token is forged."""
        tokens = self.tokens
        token = _authorization_token(exchange.headers)
        assert tokens is not None and token is not None
        return await tokens.authenticate(token)

    # ------------------------------------------------------------------------------ the forms
    def _check_network(self, exchange: Exchange) -> None:
        client = exchange.client
        host = client[0] if client else ""
        allowed = self._allowed_cache.get(host)
        if allowed is None:
            allowed = self._in_networks(host)
            if len(self._allowed_cache) < _MAX_REMEMBERED_ADDRESSES:
                self._allowed_cache[host] = allowed
        if not allowed:
            raise ClientNotAllowed(
                f"client address {host or 'unknown'} is not in inbound.allow_cidrs; ask the operator "
                "to allow your network"
            )

    def _key(self, exchange: Exchange) -> Caller:
        """`inbound.api_keys` alone: one pass that finds the key and keeps the other headers."""
        key_header = self._key_header
        presented: bytes | None = None
        kept = []
        for header in exchange.headers:
            if header[0] == key_header:
                presented = header[1]
            else:
                kept.append(header)
        exchange.headers = kept
        caller = None if presented is None else self._key_caller(presented)
        if caller is None:
            raise ClientUnauthenticated(f"send a valid gateway API key in the {key_header.decode()} header")
        return caller

    def _token_or_key(self, exchange: Exchange) -> Caller:
        """`inbound.entra_id`, with or without API keys: the token if there is one, else the key."""
        key_header = self._key_header if self._key_hashes else None
        authorization: bytes | None = None
        presented: bytes | None = None
        headers = exchange.headers
        for name, value in headers:
            if name == _AUTHORIZATION:
                if authorization is not None:
                    # Which of them a proxy in front of the gateway read is unknown: neither counts.
                    raise CallerUnauthenticated(
                        "the request has more than one Authorization header; send one", reason="malformed"
                    )
                authorization = value
            elif name == key_header:
                presented = value
        if presented is not None:
            exchange.headers = [(name, value) for name, value in headers if name != key_header]
        if authorization is not None:
            token = bearer_token(authorization)
            if token is not None:
                tokens: CallerTokenValidator = self.tokens  # type: ignore[assignment]  # set for this form
                memo = exchange.memo
                # The token this connection's last request proved, proved by this configuration's
                # validator and not expired since: a byte comparison instead of a hash and a look-up.
                # (The comparison may stop early: its timing tells a client about its own last token.)
                if memo.token == token and memo.validator is tokens and tokens.clock() < memo.valid_until:
                    return memo.caller  # type: ignore[return-value]  # set with the token
                proved, valid_until = tokens.validate_until(token)
                memo.token, memo.caller, memo.valid_until, memo.validator = token, proved, valid_until, tokens
                return proved
        if presented is not None:
            caller = self._key_caller(presented)
            if caller is None:
                raise ClientUnauthenticated(
                    f"send a valid gateway API key in the {self._key_header.decode()} header"
                )
            return caller
        raise self._missing()

    def _key_caller(self, presented: bytes) -> Caller | None:
        digest = hashlib.sha256(presented).digest()
        found: Caller | None = None
        for caller, expected in self._key_hashes:
            # Compared against every stored hash, so timing does not reveal which one matched.
            if hmac.compare_digest(digest, expected):
                found = caller
        return found

    def _missing(self) -> Exception:
        header = self._key_header.decode()
        if self.tokens is None:
            return ClientUnauthenticated(f"send a valid gateway API key in the {header} header")
        audience = self.tokens.config.audiences[0]
        keys = f", or a gateway API key in the {header} header" if self._key_hashes else ""
        # Worded so that redaction, which masks whatever follows "Bearer ", leaves it readable.
        return CallerTokenMissing(
            "send an Entra ID access token for this gateway in the Authorization header (scheme: Bearer; "
            f"ask Entra ID for the scope '{audience}/.default'){keys}"
        )

    def _nobody(self, exchange: Exchange) -> Caller:
        return self._anonymous

    def _certificate(self, exchange: Exchange) -> Caller:
        peercert = exchange.transport.get_extra_info("peercert")
        if not peercert:
            return self._anonymous  # not over TLS: no certificate to name the caller
        return self._callers.cert(certificate_common_name(peercert))

    def _in_networks(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._networks)


def _authorization_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == _AUTHORIZATION:
            return bearer_token(value)
    return None
