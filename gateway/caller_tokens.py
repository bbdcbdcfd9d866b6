"""Entra ID access tokens that callers present (`inbound.entra_id`), validated into a `Caller`.

A token is accepted when all of this holds, checked in this order (the first failure is the answer):

1. it is a compact JWT (three base64url parts) whose header says `alg: RS256` (`none`, HS256 and every
   other algorithm are refused) and carries no key of its own (`jwk`, `jku`, `x5u`, `x5c`: only Entra
   ID's published keys count);
2. its `kid` names a key Entra ID publishes for an accepted tenant (`gateway.signing_keys`), and the
   RS256 signature verifies with that key (PyJWT, `algorithms=["RS256"]`);
3. `exp` and `nbf` hold against the clock, give or take `clock_skew_s`;
4. `aud` is one of `audiences`;
5. `tid` is an accepted tenant, and `iss` is that tenant's v1 issuer (`https://sts.windows.net/{tid}/`,
   `https://sts.chinacloudapi.cn/{tid}/` for Azure China) or v2 issuer (`{authority}/{tid}/v2.0`, or what
   the tenant's discovery document announces), and the tenant publishes the signing key;
6. it names its client: `azp` (v2) or `appid` (v1).

The caller is `app:<appid or azp>` with `oid`, `tid` and `roles`. A failure raises `CallerUnauthenticated`
(401 `caller_unauthenticated`, `WWW-Authenticate: Bearer error="invalid_token"`) whose message says what is
wrong and never holds the token; claim values it quotes are cut short and made printable.

Cost: `validate()` does no I/O. A validated token is remembered until it expires (plus the skew), in a
bounded cache, so a caller that reuses its token (every Azure SDK credential does, for an hour) pays for
the signature once. The cache is keyed by the token's SHA-256, not the token: a long-lived structure of
the process holds no bearer token a heap dump or a core file could give away, and a hit costs one hash
(about a microsecond for a 1.5 KB token on a CPU with SHA instructions) and one dict look-up. Only a
token naming an unknown `kid` needs I/O:
`authenticate()` then has the keys read again (at most once per 5 minutes) and tries once more. One
validator per event loop (not thread-safe).
"""

from __future__ import annotations

import binascii
import datetime as dt
import json
import math
import time
from collections.abc import Callable
from hashlib import sha256
from typing import Any, Final
from urllib.parse import urlsplit

import jwt

from gateway import metrics
from gateway.callers import Caller, CallerFactory
from gateway.config import EntraIdConfig
from gateway.errors import CallerUnauthenticated, UnknownSigningKey
from gateway.signing_keys import EntraSigningKeys

DEFAULT_CACHE_SIZE: Final = 10_000
# Header parameters that would bring a key with the token; a token carrying one is refused outright.
EMBEDDED_KEY_HEADERS: Final = ("jwk", "jku", "x5u", "x5c")
# Azure China's v1 tokens come from their own STS; every other cloud's (US Government's too) from this one.
_V1_ISSUER_ORIGINS: Final = {
    "login.chinacloudapi.cn": "https://sts.chinacloudapi.cn",
    "login.partner.microsoftonline.cn": "https://sts.chinacloudapi.cn",
}
_DEFAULT_V1_ISSUER_ORIGIN: Final = "https://sts.windows.net"
# PyJWT checks the signature only: every claim is checked below, with the injected clock and own messages.
_SIGNATURE_ONLY: Final = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
}
_MAX_SHOWN = 100
# Entra ID's headers are ~100 bytes; a header far larger is not one of theirs (and is not parsed).
_MAX_HEADER_BYTES = 4096
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def v1_issuer(authority: str, tenant: str) -> str:
    host = urlsplit(authority).hostname or ""
    return f"{_V1_ISSUER_ORIGINS.get(host, _DEFAULT_V1_ISSUER_ORIGIN)}/{tenant}/"


def v2_issuer(authority: str, tenant: str) -> str:
    return f"{authority.rstrip('/')}/{tenant}/v2.0"


def bearer_token(authorization: bytes) -> bytes | None:
    """The credential of an `Authorization: Bearer <token>` header value (scheme in any case), or None."""
    if authorization[:7] == b"Bearer ":  # what every Azure SDK sends: no partition, no case folding
        return authorization[7:].strip() or None
    scheme, _, credential = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return credential.strip() or None


def _header(raw: bytes) -> dict[str, Any] | None:
    """The JOSE header of a compact JWT, read to learn `alg` and `kid` before anything is trusted; None
    when it is not one. (PyJWT's `get_unverified_header` decodes the whole token, byte by byte in Python:
    the signature check decodes it again anyway, so only the header is read here.)"""
    segment, dot, rest = raw.partition(b".")
    if not dot or rest.count(b".") != 1 or len(segment) > _MAX_HEADER_BYTES:
        return None
    try:
        decoded = binascii.a2b_base64(
            segment.translate(_URLSAFE_TO_STANDARD) + b"=" * (-len(segment) % 4), strict_mode=True
        )
        header = json.loads(decoded)
    except (binascii.Error, ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def _shown(value: Any) -> str:
    """A claim value for a message: printable, quoted, cut short."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = "".join(c if c.isprintable() else "?" for c in text[: _MAX_SHOWN + 1])
    return repr(text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "...")


def _when(seconds: float) -> str:
    try:
        return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{seconds:g} (Unix time)"


def _time_claim(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CallerUnauthenticated(
            f"the access token's `{name}` claim is not a time (seconds since 1970)", reason="malformed"
        )
    return float(value)


class CallerTokenValidator:
    """Validates caller tokens against `config` with the keys of `keys`; makes callers with `callers`.
    `clock` is the wall clock (Unix seconds) for `exp`/`nbf` and the cache's expiry."""

    def __init__(
        self,
        config: EntraIdConfig,
        keys: EntraSigningKeys,
        callers: CallerFactory,
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.config = config
        self._keys = keys
        self._callers = callers
        self._clock = clock
        self._skew = config.clock_skew_s
        self._audiences = frozenset(audience.lower() for audience in config.audiences)
        self._expected_audiences = " or ".join(repr(audience) for audience in config.audiences)
        self._tenants = frozenset(config.tenants())
        # Issuer -> the tenant it speaks for; the tenants' discovery documents may add one each (`issuers`).
        self._static_issuers: dict[str, str] = {}
        for tenant in self._tenants:
            self._static_issuers[v1_issuer(config.authority, tenant)] = tenant
            self._static_issuers[v2_issuer(config.authority, tenant)] = tenant
        # A validated token's SHA-256 -> (valid until, its caller); insertion-ordered, the oldest evicted
        # first. A plain dict: a hit is one look-up (cachetools' TLRU cache cost three Python calls more).
        self._cache: dict[bytes, tuple[float, Caller]] = {}
        self._cache_size = cache_size
        self._refusals = {
            reason: metrics.CALLER_TOKEN_REFUSALS.labels(reason)
            for reason in (
                "malformed",
                "algorithm",
                "embedded_key",
                "unknown_key",
                "bad_signature",
                "expired",
                "not_yet_valid",
                "wrong_audience",
                "wrong_tenant",
                "wrong_issuer",
                "no_client",
            )
        }

    # ------------------------------------------------------------------------------ the request path
    def validate(self, token: bytes | str) -> Caller:
        """The caller `token` proves, or `CallerUnauthenticated`. No I/O: a token naming a key the
        gateway does not hold raises `UnknownSigningKey` (see `authenticate`)."""
        return self.validate_until(token)[0]

    def validate_until(self, token: bytes | str) -> tuple[Caller, float]:
        """`validate`, and until when (on `clock()`) the answer holds: the token's expiry plus the skew."""
        raw = token if isinstance(token, bytes) else token.encode("latin-1", "replace")
        # The hash of the whole token: an exact match, where a prefix or a part would let an altered
        # token share a genuine one's entry.
        digest = sha256(raw).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            if self._clock() < cached[0]:
                return cached[1], cached[0]
            del self._cache[digest]  # expired: checked again, and the check says why
        try:
            caller, valid_until = self._verify(raw)
        except UnknownSigningKey:
            raise  # counted by `authenticate`, which may still succeed after reading the keys again
        except CallerUnauthenticated as refusal:
            self._refusals[refusal.reason].inc()
            raise
        cache = self._cache
        if cache and len(cache) >= self._cache_size:
            del cache[next(iter(cache))]
        cache[digest] = (valid_until, caller)
        return caller, valid_until

    def clock(self) -> float:
        """The clock `valid_until` is read on."""
        return self._clock()

    async def authenticate(self, token: bytes | str) -> Caller:
        """`validate`, and when the token names an unknown key, read the keys again (unless that was done
        less than 5 minutes ago) and validate once more."""
        try:
            return self.validate(token)
        except UnknownSigningKey:
            if not await self._keys.refetch_for_unknown_kid():
                self._refusals["unknown_key"].inc()
                raise
        try:
            return self.validate(token)
        except UnknownSigningKey:
            self._refusals["unknown_key"].inc()
            raise

    # ------------------------------------------------------------------------------ inspection
    def issuers(self) -> dict[str, str]:
        """Every accepted issuer and the tenant it speaks for (for `gateway check`)."""
        accepted = dict(self._static_issuers)
        for tenant in self._tenants:
            discovered = self._keys.issuer(tenant)
            if discovered is not None:
                accepted[discovered] = tenant
        return accepted

    @property
    def signing_keys(self) -> EntraSigningKeys:
        return self._keys

    @property
    def cached_tokens(self) -> int:
        return len(self._cache)

    @property
    def cache_size(self) -> int:
        return self._cache_size

    # ------------------------------------------------------------------------------ the checks
    def _verify(self, raw: bytes) -> tuple[Caller, float]:
        header = _header(raw)
        if header is None:
            raise CallerUnauthenticated(
                "the access token is not a JWT (three base64url parts, a JSON header first); send the "
                "access token Entra ID issued for this gateway",
                reason="malformed",
            )
        algorithm = header.get("alg")
        if algorithm != "RS256":
            raise CallerUnauthenticated(
                f"the access token is signed with algorithm {_shown(algorithm)}, not RS256: only tokens "
                "signed by Entra ID with its published keys are accepted",
                reason="algorithm",
            )
        embedded = [name for name in EMBEDDED_KEY_HEADERS if name in header]
        if embedded:
            raise CallerUnauthenticated(
                f"the access token brings its own key ({', '.join(embedded)} in its header): only the "
                "signing keys Entra ID publishes are used",
                reason="embedded_key",
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise CallerUnauthenticated(
                "the access token names no signing key (no `kid` in its header); Entra ID's tokens always do",
                reason="unknown_key",
            )
        published = self._keys.key(kid)
        if published is None:
            raise UnknownSigningKey(
                f"the access token is signed with key {_shown(kid)}, which is not among the signing keys "
                "Entra ID publishes for this gateway's tenants; get a new token (if Entra ID has just "
                "started signing with a new key, retry in a few minutes)",
                kid=kid,
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                raw,
                published.key,
                algorithms=["RS256"],
                options=_SIGNATURE_ONLY,  # type: ignore[arg-type]
            )
        except jwt.InvalidSignatureError:
            raise CallerUnauthenticated(
                f"the access token's signature does not verify with Entra ID's key {_shown(kid)}: the "
                "token was altered, or not issued by Entra ID",
                reason="bad_signature",
            ) from None
        except jwt.PyJWTError:
            raise CallerUnauthenticated(
                "the access token is not a JWT with a JSON object as its payload", reason="malformed"
            ) from None
        return self._caller(claims, kid, published.tenants)

    def _caller(self, claims: dict[str, Any], kid: str, key_tenants: frozenset[str]) -> tuple[Caller, float]:
        now = self._clock()
        skew = self._skew
        expires = _time_claim(claims, "exp")
        if expires is None:
            raise CallerUnauthenticated(
                "the access token has no expiry (`exp`); Entra ID's tokens always do", reason="malformed"
            )
        if now > expires + skew:
            raise CallerUnauthenticated(
                f"the access token expired at {_when(expires)}, {now - expires:.0f} s ago (clock skew "
                f"allowed: {skew:g} s); get a new token",
                reason="expired",
            )
        not_before = _time_claim(claims, "nbf")
        if not_before is not None and now + skew < not_before:
            raise CallerUnauthenticated(
                f"the access token is not valid before {_when(not_before)}, {not_before - now:.0f} s from "
                f"now (clock skew allowed: {skew:g} s); check the clocks of the caller and the gateway",
                reason="not_yet_valid",
            )
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if not any(isinstance(a, str) and a.lower() in self._audiences for a in audiences):
            raise CallerUnauthenticated(
                f"the access token is for audience {_shown(audience)}, not for this gateway: it accepts "
                f"{self._expected_audiences} (ask Entra ID for a token for the scope '<audience>/.default')",
                reason="wrong_audience",
            )
        tenant = claims.get("tid")
        if not isinstance(tenant, str) or tenant.lower() not in self._tenants:
            raise CallerUnauthenticated(
                f"the access token is from tenant {_shown(tenant)}, whose callers this gateway does not "
                "accept (inbound.entra_id.allowed_tenants)",
                reason="wrong_tenant",
            )
        tenant = tenant.lower()
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or self._issuer_tenant(issuer) != tenant:
            raise CallerUnauthenticated(
                f"the access token's issuer {_shown(issuer)} is not Entra ID's v1 or v2 issuer of its "
                f"tenant {tenant} ({v2_issuer(self.config.authority, tenant)!r} or "
                f"{v1_issuer(self.config.authority, tenant)!r})",
                reason="wrong_issuer",
            )
        if tenant not in key_tenants:
            raise CallerUnauthenticated(
                f"the access token is signed with key {_shown(kid)}, which tenant {tenant} does not publish",
                reason="unknown_key",
            )
        version = claims.get("ver")
        app_id = claims.get("azp") if version == "2.0" else claims.get("appid")
        if not isinstance(app_id, str) or not app_id:
            app_id = claims.get("appid") or claims.get("azp")
        if not isinstance(app_id, str) or not app_id:
            raise CallerUnauthenticated(
                "the access token names no client application (`appid` or `azp`)", reason="no_client"
            )
        oid = claims.get("oid")
        roles = claims.get("roles")
        caller = self._callers.app(
            app_id,
            oid=oid if isinstance(oid, str) else None,
            tenant_id=tenant,
            roles=[role for role in roles if isinstance(role, str)] if isinstance(roles, list) else (),
        )
        return caller, expires + skew

    def _issuer_tenant(self, issuer: str) -> str | None:
        """The tenant an accepted issuer speaks for, or None."""
        tenant = self._static_issuers.get(issuer)
        if tenant is not None:
            return tenant
        for candidate in self._tenants:
            if self._keys.issuer(candidate) == issuer:
                return candidate
        return None
