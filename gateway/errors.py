"""Every exception the gateway raises on purpose, in one place, so callers can catch precisely.

GatewayError
├── ConfigError                 invalid configuration (exit status 2)
├── SecretError                 a secret source cannot be read
├── TransportError              the upstream connection failed (mapped to 502/503/504 by the proxy)
│   ├── ConnectError            no connection could be opened (nothing was sent)
│   │   └── ProxyRefused        the egress proxy refused the CONNECT tunnel
│   ├── PoolTimeout             no pooled connection became free in time (nothing was sent)
│   ├── ConnectionLost          the connection closed before the exchange ended
│   ├── ProtocolError           the upstream's answer is not valid HTTP/1.1 (or breaks a limit)
│   └── TransportTimeout        a timer ran out: `phase` says which (connect, read, write, total)
└── ClientFacingError           turned into a JSON error response with a stable code
    ├── RouteNotFound           404 route_not_found
    ├── ClientTimeout           408 client_timeout
    ├── BadRequestPath          400 bad_request_path
    ├── MalformedRequest        400 malformed_request        (refused by gateway.server_protocol)
    ├── UpgradeNotSupported     400 upgrade_not_supported    (refused by gateway.server_protocol)
    ├── ChunkExtensionTooLong   400 chunk_extension_too_long (refused by gateway.server_protocol)
    ├── ClientUnauthenticated   401 client_unauthenticated
    ├── CallerUnauthenticated   401 caller_unauthenticated   (an Entra ID token was refused, or none sent)
    │   ├── UnknownSigningKey       the token names a signing key the gateway does not hold (yet)
    │   └── CallerTokenMissing      no token (nor API key) at all
    ├── ClientNotAllowed        403 client_not_allowed
    ├── CallerNotAllowed        403 caller_not_allowed       (a route's `callers` refused the caller)
    ├── BodyTooLarge            413 body_too_large
    ├── HeadersTooLarge         431 headers_too_large
    ├── TrailersTooLarge        431 trailers_too_large       (refused by gateway.server_protocol)
    ├── UrlTooLong              414 url_too_long             (refused by gateway.server_protocol)
    ├── UpstreamUnreachable     502 upstream_unreachable
    ├── UpstreamProtocolError   502 upstream_protocol_error
    ├── UpstreamTimeout         504 upstream_timeout
    ├── CredentialUnavailable   503 credential_unavailable
    ├── Overloaded              503 overloaded
    ├── RouteBusy               503 route_busy               (refused by the admission stage)
    └── RateLimited             429 rate_limited             (refused by the admission stage)
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of the gateway's own exceptions."""


class ConfigError(GatewayError):
    """The configuration file is invalid. The message names the file, the key path and the problem."""


class SecretError(GatewayError):
    """A secret source (environment variable or file) cannot be read. Never carries the value."""


# What a failed connection or exchange with an upstream was, as a stable name (the `cause` of the
# operator's log line, see gateway.failure_log) and as the failure class a client may read in its 502/504:
# never a host, a port, a proxy or its answer (those are in the log line only).
CAUSES: dict[str, str] = {
    "tls_unknown_ca": "the upstream's TLS certificate is not signed by a CA the gateway trusts",
    "tls_name_mismatch": "the upstream's TLS certificate is not valid for its host name",
    "tls_expired": "the upstream's TLS certificate has expired",
    "tls_not_yet_valid": "the upstream's TLS certificate is not valid yet",
    "tls_rejected": "the upstream's TLS certificate was rejected",
    "tls_handshake": "the TLS handshake with the upstream failed",
    "dns": "the upstream's host name could not be resolved",
    "refused": "the upstream refused the connection",
    "reset": "the upstream reset the connection",
    "unreachable": "the upstream could not be reached",
    "closed": "the upstream closed the connection",
    "protocol": "the upstream's answer was not valid HTTP/1.1 or broke the gateway's limits",
    "connect_timeout": "no connection to the upstream within connect_timeout_s",
    "read_timeout": "the upstream sent nothing for read_timeout_s",
    "write_timeout": "the upstream stopped reading the request for write_timeout_s",
    "total_timeout": "the upstream did not complete its answer within timeout_s",
    "deadline_timeout": "the request's retry.deadline_s ran out before the upstream's answer was complete",
    "pool_timeout": "every connection to the upstream stayed busy for pool_timeout_s",
    "proxy_unreachable": "the egress proxy could not be reached",
    "proxy_refused": "the egress proxy refused the connection to the upstream",
    "proxy_error": "the egress proxy failed to open a connection to the upstream",
}


class TransportError(GatewayError):
    """The connection to an upstream failed. The message is the operator's detail (host, port, proxy,
    TLS verdict, which timeout and its value), never a header; `cause` names the failure (a key of
    `CAUSES`) and `summary` says it without any of that detail, for the client.

    `request_sent` is the one fact the replay policy needs: False only when no byte of the request
    reached the socket, so the upstream cannot have executed it. When in doubt it is True.
    """

    cause = "unreachable"

    def __init__(self, message: str, *, request_sent: bool = True, cause: str | None = None) -> None:
        super().__init__(message)
        self.request_sent = request_sent
        if cause is not None:
            self.cause = cause

    @property
    def summary(self) -> str:
        return CAUSES[self.cause]


class ConnectError(TransportError):
    def __init__(self, message: str, *, cause: str = "unreachable") -> None:
        super().__init__(message, request_sent=False, cause=cause)


class ProxyRefused(ConnectError):
    """The egress proxy answered CONNECT with a non-2xx `status`. A 407 or 403 is the proxy's own
    policy (credentials, allowed destinations): replaying cannot help and the upstream is not at fault."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message, cause="proxy_refused")
        self.status = status

    @property
    def proxy_policy(self) -> bool:
        return self.status in (403, 407)


class PoolTimeout(TransportError):
    """Every pooled connection of the origin stayed busy for `pool_timeout_s`: the gateway is overloaded,
    the upstream is not at fault (503 overloaded, never retried, never counted against the upstream)."""

    cause = "pool_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, request_sent=False)


class ConnectionLost(TransportError):
    """`cause` is "closed", or "reset" when the upstream reset the connection."""

    cause = "closed"

    def __init__(
        self,
        message: str,
        *,
        request_sent: bool = True,
        reused: bool = False,
        received_any: bool = False,
        cause: str | None = None,
    ) -> None:
        super().__init__(message, request_sent=request_sent, cause=cause)
        self.reused = reused
        self.received_any = received_any


class ProtocolError(TransportError):
    cause = "protocol"


class TransportTimeout(TransportError):
    """`phase` is "connect" (TCP, TLS, proxy CONNECT), "read" (silence while awaiting the answer),
    "write" (stall while sending the request) or "total" (the whole attempt); the cause is
    `<phase>_timeout`."""

    def __init__(self, message: str, *, phase: str = "total", request_sent: bool = True) -> None:
        super().__init__(message, request_sent=request_sent, cause=f"{phase}_timeout")
        self.phase = phase


class ClientFacingError(GatewayError):
    """`headers`: extra response header lines (lower-case names) sent with the JSON error, besides
    `retry-after`, which `retry_after` gives."""

    status: int = 500
    code: str = "internal_error"
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class RouteNotFound(ClientFacingError):
    status = 404
    code = "route_not_found"


class ClientTimeout(ClientFacingError):
    status = 408
    code = "client_timeout"


class BadRequestPath(ClientFacingError):
    status = 400
    code = "bad_request_path"


class ClientUnauthenticated(ClientFacingError):
    status = 401
    code = "client_unauthenticated"


class ClientNotAllowed(ClientFacingError):
    status = 403
    code = "client_not_allowed"


class CallerUnauthenticated(ClientFacingError):
    """The caller's Entra ID access token was refused. `reason` is a stable word for metrics (expired,
    wrong_audience, ...); the message says what is wrong in words and never contains the token."""

    status = 401
    code = "caller_unauthenticated"
    # RFC 6750 3.1: a refused bearer token is answered with this challenge.
    headers = ((b"www-authenticate", b'Bearer error="invalid_token"'),)

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnknownSigningKey(CallerUnauthenticated):
    """The token names a signing key (`kid`) the gateway does not hold: re-reading the identity
    provider's keys may help (a new key), so the caller of the synchronous check may re-fetch them."""

    def __init__(self, message: str, *, kid: str) -> None:
        super().__init__(message, reason="unknown_key")
        self.kid = kid


class CallerTokenMissing(CallerUnauthenticated):
    """The request carries no credential where `inbound.entra_id` asks for one. RFC 6750 3.1: a request
    without authentication gets the challenge without an error code."""

    headers = ((b"www-authenticate", b"Bearer"),)

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="missing")


class CallerNotAllowed(ClientFacingError):
    """A route's `callers` rules refused the caller. The message names the caller and the route, never
    the rules (they would tell a prober which identities to try)."""

    status = 403
    code = "caller_not_allowed"


class BodyTooLarge(ClientFacingError):
    status = 413
    code = "body_too_large"


class HeadersTooLarge(ClientFacingError):
    status = 431
    code = "headers_too_large"


class UpstreamUnreachable(ClientFacingError):
    status = 502
    code = "upstream_unreachable"


class UpstreamProtocolError(ClientFacingError):
    status = 502
    code = "upstream_protocol_error"


class UpstreamTimeout(ClientFacingError):
    status = 504
    code = "upstream_timeout"


class CredentialUnavailable(ClientFacingError):
    status = 503
    code = "credential_unavailable"


class Overloaded(ClientFacingError):
    status = 503
    code = "overloaded"


class RouteBusy(ClientFacingError):
    """The route's concurrency limit is reached and no slot came free within `limits.queue_timeout_s`
    (or the request's deadline), or its queue is full. Refused before the body is read; never retried,
    never counted against an upstream."""

    status = 503
    code = "route_busy"


class RateLimited(ClientFacingError):
    """The caller used up its quota (`limits.per_caller`, `limits.callers` or `inbound.limits`). Carries
    the `RateLimit-Policy` and `RateLimit` header fields; a refused request consumes no quota."""

    status = 429
    code = "rate_limited"

    def __init__(
        self, message: str, *, retry_after: float, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.headers = headers


class InternalError(ClientFacingError):
    """An unexpected exception on the request path: a bug, answered instead of a bare server error."""

    status = 500
    code = "internal_error"

    def __init__(self) -> None:
        super().__init__(
            "the gateway failed unexpectedly while handling this request; report the request id to the "
            "operator"
        )


# Refused by `gateway.server_protocol` while the request arrives: answered, then the connection is closed.


class MalformedRequest(ClientFacingError):
    status = 400
    code = "malformed_request"


class UpgradeNotSupported(ClientFacingError):
    status = 400
    code = "upgrade_not_supported"


class ChunkExtensionTooLong(ClientFacingError):
    status = 400
    code = "chunk_extension_too_long"


class TrailersTooLarge(ClientFacingError):
    status = 431
    code = "trailers_too_large"


class UrlTooLong(ClientFacingError):
    status = 414
    code = "url_too_long"
