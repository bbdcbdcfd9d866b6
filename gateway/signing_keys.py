"""Entra ID's token signing keys, for validating the access tokens callers present (`inbound.entra_id`).

For every accepted tenant the keys come from OpenID discovery: `GET {authority}/{tenant}/v2.0/.well-known/
openid-configuration` gives `jwks_uri` (and the tenant's v2 `issuer`), `GET jwks_uri` the keys, by `kid`.
Entra ID publishes the same keys for every tenant, so with several tenants the answers mostly repeat;
each tenant's own document is read all the same, because only its own answer says which keys may sign
its tokens (an app with custom signing keys, another OpenID provider standing in for Entra ID), and one
`jwks_uri` shared by several tenants is read once.

When they are read:

- at start-up (`start()`); a failure is a ConfigError naming the URL;
- every `refresh_every_s` (24 h) in the background (`run()`), discovery included; a failed refresh is
  retried with backoff (1 min up to 1 h) and keeps the last good keys meanwhile;
- at once when a token names a `kid` the gateway does not hold (a key Entra ID started signing with
  since the last read): `refetch_for_unknown_kid()`. After such a read no other for `refetch_interval_s`
  (5 min), so a flood of tokens with random `kid`s costs one read; concurrent callers share one read.
  The start-up read and the periodic refresh do not count against this.

A failed read keeps the last good keys (`gateway_signing_keys_stale`, `status()` for `/readyz`), logged
once per cause and once on recovery. Looking a key up (`key(kid)`) is a dict lookup: no I/O on the
request path. One instance per event loop (not thread-safe).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import RSAAlgorithm
from jwt.exceptions import InvalidKeyError

from gateway import metrics
from gateway.backoff import Backoff
from gateway.config import EntraIdConfig
from gateway.errors import ConfigError

logger = logging.getLogger("gateway.entra_id")

REFRESH_EVERY_S: Final = 24 * 3600.0
REFETCH_INTERVAL_S: Final = 300.0
FETCH_TIMEOUT_S: Final = 10.0
# A discovery document is ~2 KB and Entra ID's key set ~10 KB; anything far larger is not one.
MAX_DOCUMENT_BYTES: Final = 1024 * 1024
# Keys shorter than this are refused even if published: a weak key would make every token forgeable.
MIN_RSA_BITS: Final = 2048


class SigningKeyFetchError(Exception):
    """Discovery or the key set could not be read. The message names the URL and what was wrong."""


@dataclass(frozen=True, slots=True)
class PublishedKey:
    """A signing key and the tenants whose key sets publish it (a token of another tenant that names it
    is refused)."""

    key: RSAPublicKey
    tenants: frozenset[str]


@dataclass
class _Tenant:
    name: str
    discovery_url: str
    jwks_uri: str | None = None
    issuer: str | None = None
    keys: dict[str, RSAPublicKey] = field(default_factory=dict)
    fetched_at: float | None = None  # wall clock of the last good read of the key set
    error: str | None = None  # why the last read failed, None when it succeeded


class EntraSigningKeys:
    """The signing keys of every tenant `config` accepts, read with the client `http()` gives (the
    gateway's one client for Azure, `AzureRest.http`: its TLS trust and egress proxy; called for every
    read, as a client belongs to one event loop and start-up reads in another loop than the one that
    serves). `clock` (monotonic) times the refetch limit; `wall_clock` only dates `status()`."""

    def __init__(
        self,
        config: EntraIdConfig,
        http: Callable[[], httpx.AsyncClient],
        *,
        source: str = "<config>",
        refresh_every_s: float = REFRESH_EVERY_S,
        refetch_interval_s: float = REFETCH_INTERVAL_S,
        retry_base_s: float = 60.0,
        retry_cap_s: float = 3600.0,
        timeout_s: float = FETCH_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._http = http
        self._source = source
        self.refresh_every_s = refresh_every_s
        self.refetch_interval_s = refetch_interval_s
        self._backoff = Backoff(retry_base_s, retry_cap_s)
        self.timeout_s = timeout_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._tenants = {
            tenant: _Tenant(tenant, f"{config.authority}/{tenant}/v2.0/.well-known/openid-configuration")
            for tenant in config.tenants()
        }
        self._by_kid: dict[str, PublishedKey] = {}
        self._last_refetch: float | None = None
        self._refetch: asyncio.Task[bool] | None = None
        self._stale = False
        self._logged_problem: str | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------ the request path
    def key(self, kid: str) -> PublishedKey | None:
        """The published key named `kid`, or None. No I/O."""
        return self._by_kid.get(kid)

    def issuer(self, tenant: str) -> str | None:
        """The `issuer` the tenant's v2 discovery document announced, or None before it was read."""
        state = self._tenants.get(tenant)
        return None if state is None else state.issuer

    async def refetch_for_unknown_kid(self) -> bool:
        """Read the key sets again because a token named an unknown `kid`. False when no read happened:
        one was done less than `refetch_interval_s` ago. Concurrent callers share one read; a caller
        cancelled while it waits does not cancel the read."""
        if self._refetch is None:
            now = self._clock()
            if self._last_refetch is not None and now - self._last_refetch < self.refetch_interval_s:
                return False
            self._last_refetch = now
            self._refetch = asyncio.ensure_future(self._read_all("unknown_kid", discovery=False))
            self._refetch.add_done_callback(self._refetch_done)
        await asyncio.shield(self._refetch)
        return True

    def _refetch_done(self, task: asyncio.Task[bool]) -> None:
        self._refetch = None
        if not task.cancelled():
            logger.info(
                "inbound.entra_id: a token named an unknown signing key; the keys were read again "
                "(%d keys; the next such read in %d s at the earliest)",
                len(self._by_kid),
                round(self.refetch_interval_s),
            )

    # ------------------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Read every tenant's discovery document and keys; ConfigError (naming the URL) if one fails."""
        problems = await self._read_tenants(discovery=True)
        metrics.SIGNING_KEY_FETCHES.labels("startup", "error" if problems else "ok").inc()
        if problems:
            raise ConfigError(
                f"{self._source}: inbound.entra_id: cannot read Entra ID's signing keys: "
                + "; ".join(problems)
                + " (check inbound.entra_id.authority and tenant_id, network access to it and tls.ca_bundle)"
            )
        metrics.SIGNING_KEYS_STALE.set(0)
        logger.info(
            "inbound.entra_id: %d signing keys read for tenants %s",
            len(self._by_kid),
            ", ".join(self._tenants),
        )

    async def refresh(self) -> bool:
        """Read discovery and keys again (the periodic refresh); True when every tenant's read succeeded."""
        return await self._read_all("refresh", discovery=True)

    async def run(self) -> None:
        """Refresh every `refresh_every_s`, sooner (with backoff) after a failure. Runs until cancelled."""
        delay = self.refresh_every_s
        while True:
            await asyncio.sleep(delay)
            if await self.refresh():
                self._backoff.reset()
                delay = self.refresh_every_s
            else:
                delay = min(self._backoff.next_delay(), self.refresh_every_s)

    def start_refreshing(self) -> asyncio.Task[None]:
        """Start `run()` as a task of the running loop (once); `aclose()` stops it."""
        if self._task is None:
            self._task = asyncio.ensure_future(self.run())
        return self._task

    def stop(self) -> None:
        """Stop refreshing (a reload replaced these keys). A read for an unknown `kid` in progress is left
        to finish (within `timeout_s`): requests in flight wait for it."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def aclose(self) -> None:
        tasks: list[asyncio.Task[Any]] = [task for task in (self._task, self._refetch) if task is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass

    # ------------------------------------------------------------------------------ state
    @property
    def stale(self) -> bool:
        """True while the last read of some tenant's keys failed (its last good keys are in use)."""
        return self._stale

    @property
    def ready(self) -> bool:
        """Every tenant has keys (true from a successful `start()` on, stale or not)."""
        return all(state.keys for state in self._tenants.values())

    def status(self) -> dict[str, Any]:
        """For `/readyz` details and `gateway check`: per tenant its key set URL, issuer, key ids, when
        they were read and the last error."""

        def stamp(value: float | None) -> str | None:
            if value is None:
                return None
            return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        since = None if self._last_refetch is None else round(self._clock() - self._last_refetch, 1)
        return {
            "ready": self.ready,
            "stale": self._stale,
            "seconds_since_unknown_kid_read": since,
            "tenants": {
                state.name: {
                    "discovery": state.discovery_url,
                    "jwks_uri": state.jwks_uri,
                    "issuer": state.issuer,
                    "kids": sorted(state.keys),
                    "read_at": stamp(state.fetched_at),
                    "error": state.error,
                }
                for state in self._tenants.values()
            },
        }

    # ------------------------------------------------------------------------------ reading
    async def _read_tenants(self, *, discovery: bool) -> list[str]:
        """Read every tenant's keys (and discovery document if asked), each shared key set URL once;
        the problems, one per tenant whose read failed (it keeps its last good keys)."""
        shared: dict[str, asyncio.Future[dict[str, RSAPublicKey]]] = {}
        results = await asyncio.gather(
            *(self._read_tenant(state, shared, discovery=discovery) for state in self._tenants.values())
        )
        self._rebuild()
        return [problem for problem in results if problem is not None]

    async def _read_all(self, reason: str, *, discovery: bool) -> bool:
        problems = await self._read_tenants(discovery=discovery)
        metrics.SIGNING_KEY_FETCHES.labels(reason, "error" if problems else "ok").inc()
        was_stale, self._stale = self._stale, bool(problems)
        metrics.SIGNING_KEYS_STALE.set(1 if problems else 0)
        if problems:
            text = "; ".join(problems)
            if text != self._logged_problem:  # once per cause; the metric and status() count the rest
                self._logged_problem = text
                logger.warning(
                    "inbound.entra_id: cannot read the signing keys (%s): %s; the last good keys stay in use",
                    reason,
                    text,
                )
        elif was_stale:
            self._logged_problem = None
            logger.warning("inbound.entra_id: the signing keys were read again after a failure")
        return not problems

    async def _read_tenant(
        self, state: _Tenant, shared: dict[str, asyncio.Future[dict[str, RSAPublicKey]]], *, discovery: bool
    ) -> str | None:
        """Read one tenant's discovery document (if asked or never read) and key set; None on success,
        else the problem (the tenant keeps its last good keys)."""
        try:
            if discovery or state.jwks_uri is None:
                state.jwks_uri, state.issuer = _parse_discovery(
                    state.discovery_url, await self._get_json(state.discovery_url)
                )
            future = shared.get(state.jwks_uri)
            if future is None:  # the first tenant with this key set URL reads it for all of them
                future = shared[state.jwks_uri] = asyncio.ensure_future(self._read_jwks(state.jwks_uri))
            keys = await asyncio.shield(future)
        except SigningKeyFetchError as exc:
            state.error = str(exc)
            return f"tenant {state.name}: {exc}"
        state.keys = keys
        state.fetched_at = self._wall_clock()
        state.error = None
        return None

    async def _read_jwks(self, url: str) -> dict[str, RSAPublicKey]:
        return _parse_jwks(url, await self._get_json(url))

    async def _get_json(self, url: str) -> Any:
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._http().stream(
                    "GET", url, headers={"Accept": "application/json"}
                ) as response:
                    if response.status_code != 200:
                        raise SigningKeyFetchError(f"{url} answered {response.status_code}")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_DOCUMENT_BYTES:
                            raise SigningKeyFetchError(
                                f"{url}: the answer is larger than {MAX_DOCUMENT_BYTES} bytes"
                            )
        except TimeoutError:
            raise SigningKeyFetchError(f"{url}: no answer within {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise SigningKeyFetchError(_transport_problem(url, exc)) from None
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SigningKeyFetchError(f"{url}: the answer is not JSON") from None

    def _rebuild(self) -> None:
        """The kid index over every tenant's keys: a kid published by several tenants with the same
        key serves all of them; with a different key (never seen from Entra ID) the first tenant's wins."""
        found: dict[str, tuple[RSAPublicKey, set[str]]] = {}
        for state in self._tenants.values():
            for kid, key in state.keys.items():
                known = found.get(kid)
                if known is None:
                    found[kid] = (key, {state.name})
                elif known[0].public_numbers() == key.public_numbers():
                    known[1].add(state.name)
        self._by_kid = {kid: PublishedKey(key, frozenset(tenants)) for kid, (key, tenants) in found.items()}


def _transport_problem(url: str, exc: httpx.HTTPError) -> str:
    text = " ".join(str(exc).split())[:300] or type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (
            f"the TLS certificate of {url} is not trusted: {text} (set tls.ca_bundle to a PEM file with the "
            "CA that signed it)"
        )
    return f"cannot reach {url}: {type(exc).__name__}: {text}"


def _parse_discovery(url: str, data: Any) -> tuple[str, str | None]:
    if not isinstance(data, dict):
        raise SigningKeyFetchError(f"{url}: the answer is not an OpenID discovery document")
    jwks_uri = data.get("jwks_uri")
    if (
        not isinstance(jwks_uri, str)
        or urlsplit(jwks_uri).scheme != "https"
        or not urlsplit(jwks_uri).hostname
    ):
        raise SigningKeyFetchError(f"{url}: the discovery document has no https `jwks_uri`")
    issuer = data.get("issuer")
    return jwks_uri, issuer if isinstance(issuer, str) and issuer else None


def _parse_jwks(url: str, data: Any) -> dict[str, RSAPublicKey]:
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise SigningKeyFetchError(f"{url}: the answer is not a key set (no `keys` list)")
    keys: dict[str, RSAPublicKey] = {}
    for entry in entries:
        key = _rsa_signing_key(entry)
        if key is not None:
            keys[entry["kid"]] = key
    if not keys:
        raise SigningKeyFetchError(
            f"{url}: the key set holds no RSA signing key of {MIN_RSA_BITS} bits or more"
        )
    return keys


def _rsa_signing_key(entry: Any) -> RSAPublicKey | None:
    """The RSA public key of one JWKS entry meant for signatures, or None for anything else."""
    if not isinstance(entry, Mapping) or entry.get("kty") != "RSA" or entry.get("use", "sig") != "sig":
        return None
    if entry.get("alg", "RS256") != "RS256" or not isinstance(entry.get("kid"), str) or not entry["kid"]:
        return None
    try:
        # Only the public numbers: a key set that (wrongly) carries private parts must not make one.
        key = RSAAlgorithm.from_jwk({"kty": "RSA", "n": entry["n"], "e": entry["e"]})
    except (InvalidKeyError, KeyError, TypeError, ValueError):
        return None
    if not isinstance(key, RSAPublicKey) or key.key_size < MIN_RSA_BITS:
        return None
    return key
