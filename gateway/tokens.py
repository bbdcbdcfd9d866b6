"""The one cache of access tokens: Entra ID tokens for every identity and scope, and Azure ML endpoint tokens.

Hot path: `TokenCache.lookup()` is one look-up in a `cachetools.TLRUCache` whose items expire at the
token's expiry minus a small skew margin. No lock, no thread hop, no I/O; an expired token is never
returned (the cache compares the expiry on every read).

Everything else happens off the request path, per (identity, scope) entry:

- a background task refreshes the token before it expires: at the provider's hint (`refresh_in`,
  `refreshAfterTimeUtc`) or at two thirds of its lifetime, with jitter, and never later than
  `REFRESH_MARGIN_S` (or a sixth of the lifetime for short tokens) before expiry;
- one fetch at a time (single flight): concurrent requests on a cold entry share one `asyncio.Task`;
- failures back off with full jitter (1 s to 60 s), honour Retry-After and never stop the task; the
  cached token is served until it expires, then `get()` raises `CredentialUnavailable` (503);
- whatever a provider answers, two fetches of one entry start at least `min_interval_s` (1 s) apart,
  and a token whose expiry or refresh hint is not a finite time in range is refused with a message: a
  provider that answers `nan` cannot turn the refresher into a busy loop;
- `reject()` (the upstream refused the token) marks it suspect and fetches a new one; the suspect token
  stays in use until a different one has been obtained (with Entra ID down, requests keep the token rather
  than getting 503). The forced fetch is always allowed when the refused token had been accepted since it
  was fetched (a real revocation); for a token refused before ever being accepted, at most once per
  `FORCED_REFRESH_INTERVAL_S`, so a misconfigured upstream cannot turn every request into a token request.
  Refusals in `reject_after` distinct requests within `reject_window_s` with no acceptance in between
  declare the entry's tokens rejected (the route is not ready) until one is accepted or
  `VERDICT_RECHECK_S` pass (see `gateway.credentials.base`).

The refresher, single flight, backoff and forced-fetch limit live in `RefreshingEntry`, which the endpoint
keys of `auth.type: key` with `from_endpoint` (`gateway.credentials.control_plane`) share.

Times are `time.monotonic()` inside (immune to clock steps); `AccessToken` carries wall-clock times
because that is what providers send.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cachetools import TLRUCache

from gateway import metrics
from gateway.backoff import Backoff
from gateway.credentials.base import Credential, Grant, Suspicion, replay
from gateway.errors import CredentialUnavailable
from gateway.redaction import redact

logger = logging.getLogger("gateway.tokens")

# Refresh no later than this before expiry; for short tokens, this fraction of the lifetime instead.
REFRESH_MARGIN_S = 300.0
REFRESH_MARGIN_FRACTION = 1 / 6
# Stop serving a token this long before its expiry: the request still has to reach the upstream, and
# clocks differ a little. For short tokens, this fraction of the lifetime instead.
EXPIRY_SKEW_S = 10.0
EXPIRY_SKEW_FRACTION = 0.05
# Refresh times are spread by up to this fraction of the lifetime (at most JITTER_MAX_S), so that
# gateway processes started together do not all refresh at the same instant.
JITTER_FRACTION = 0.05
JITTER_MAX_S = 30.0
# After an upstream 401 on a token never accepted, at most one forced refresh per entry in this interval.
FORCED_REFRESH_INTERVAL_S = 5.0
# A token declared rejected makes the route not ready for at most this long without a new refusal, so a
# pod taken out of its Service gets traffic again to find out (keys have `recheck_after_s`).
VERDICT_RECHECK_S = 300.0
# How often "the upstream rejects fresh tokens too" is logged per entry.
_REJECTION_LOG_INTERVAL_S = 60.0
# Two fetches of one entry start at least this far apart, whatever the provider answered (TokenCache
# takes another value for tests of backoff schedules).
MIN_FETCH_INTERVAL_S = 1.0
# A token said to live longer than this is refused: no provider issues one, and the schedule would overflow.
MAX_TOKEN_LIFETIME_S = 366 * 86400.0

CacheKey = tuple[str, str]  # (token source key, scope)
_T = TypeVar("_T")  # what a successful fetch of a RefreshingEntry returns
_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A token as a provider issued it. Times are wall-clock (Unix) seconds."""

    value: str = field(repr=False)
    expires_at: float
    refresh_after: float | None = None  # the provider's hint, if it gave one


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class TokenGrant(Grant):
    """A cached token's grant; `serve_until` (monotonic) is when the cache stops handing it out."""

    serve_until: float = 0.0


class TokenFetchError(Exception):
    """A token could not be obtained. `message` is safe to log (no secret); `hint` says what to do."""

    def __init__(self, message: str, *, retry_after: float | None = None, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.hint = hint


class TokenSource(abc.ABC):
    """Something that issues tokens for scopes: an Entra ID identity (via MSAL), or the ARM `token` call."""

    key: str  # identifies the source within the process; equal keys share cache entries
    description: str  # for status and logs, e.g. "client_secret env:X for client 1111… tenant 72f9…"
    deadline_s: float  # the longest one `fetch` may take

    @abc.abstractmethod
    async def fetch(self, scope: str) -> AccessToken:
        """Obtain a new token (never a cached one). Raises TokenFetchError."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients; the source may be used again afterwards and then reopens them."""


def refresh_delay(lifetime_s: float, hint_s: float | None, rng: random.Random) -> float:
    """Seconds after issue at which a token valid for `lifetime_s` is refreshed."""
    latest = lifetime_s - min(REFRESH_MARGIN_S, lifetime_s * REFRESH_MARGIN_FRACTION)
    jitter = min(JITTER_MAX_S, lifetime_s * JITTER_FRACTION)
    if hint_s is not None and hint_s > 0:
        when = hint_s + rng.uniform(0.0, jitter)  # never before the provider asked
    else:
        when = lifetime_s * 2 / 3 + rng.uniform(-jitter, jitter)
    return max(0.0, min(when, latest))


def serve_margin(lifetime_s: float) -> float:
    return min(EXPIRY_SKEW_S, lifetime_s * EXPIRY_SKEW_FRACTION)


def _serve_until(key: CacheKey, grant: TokenGrant, now: float) -> float:
    return grant.serve_until


async def within_deadline(
    call: Awaitable[_R], deadline_s: float, *, awaited: str, prefix: str = "", hint: str = ""
) -> _R:
    """`call`, where a timeout or an unexpected exception becomes a TokenFetchError: a library surprise is
    then a failed fetch (backed off and retried), not a dead refresher."""
    try:
        return await asyncio.wait_for(call, deadline_s)
    except TokenFetchError:
        raise
    except TimeoutError:
        raise TokenFetchError(f"{prefix}no {awaited} within {deadline_s:g} s", hint=hint) from None
    except Exception as exc:
        raise TokenFetchError(f"{prefix}unexpected {type(exc).__name__}: {exc}") from exc


class RefreshingEntry(abc.ABC, Generic[_T]):
    """Something fetched off the request path and kept fresh in the background: a token, an endpoint's keys.

    Owns what is the same for every kind: the owners (credentials of routes, which name the routes in logs
    and metrics) and the refresher task the started ones keep alive, one fetch at a time (single flight),
    backoff honouring Retry-After after a failure, and forced fetches at most once per interval. A
    subclass says what a fetch does and stores, when the next one is due, what it logs and what the last
    owner's `detach` removes.
    """

    def __init__(self, *, name: str, backoff: Backoff, min_interval_s: float = MIN_FETCH_INTERVAL_S) -> None:
        self.last_error: str | None = None  # redacted, so status and logs may show it
        self.last_hint = ""
        self.retry_at = 0.0  # monotonic; non-zero while backing off after a failed fetch
        self.backoff = backoff
        self.min_interval_s = min_interval_s
        self._name = name  # of the refresher task, for debugging
        self._forced_at = -math.inf
        self._fetch_started = -math.inf  # monotonic
        self._inflight: asyncio.Task[_T] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._users: dict[int, tuple[str, str]] = {}  # owner id -> (route, kind)
        self._owners: dict[int, Credential] = {}  # whose gauges follow this entry's state
        self._active: set[int] = set()  # owners that started, i.e. want background refresh

    # ------------------------------------------------------------------ for subclasses
    @abc.abstractmethod
    async def _fetch_once(self) -> _T:
        """Fetch and store; raise TokenFetchError (the base records the failure and backs off)."""

    @abc.abstractmethod
    def _next_refresh(self) -> float:
        """When the next scheduled fetch is due (monotonic), when not backing off; 0 for now."""

    @abc.abstractmethod
    def _log_failed(self, delay: float, hint: str) -> None:
        """Log the failure in `last_error`; the next attempt is in `delay` s."""

    @abc.abstractmethod
    def _log_refresher_failed(self) -> None:
        """Log the exception being handled, a bug in the refresher."""

    @abc.abstractmethod
    def _missing(self) -> str:
        """What the 503 says is missing and why (without the retry time)."""

    @abc.abstractmethod
    def _unused(self) -> None:
        """The last owner is gone: forget this entry, so a later build starts afresh."""

    # ------------------------------------------------------------------ owners and the refresher
    def register(self, owner: object, route: str, kind: str) -> None:
        """`owner`, a credential of `route`, uses this entry: logs and metrics name the route."""
        self._users[id(owner)] = (route, kind)
        if isinstance(owner, Credential):
            self._owners[id(owner)] = owner

    def attach(self, owner: object, route: str, kind: str) -> None:
        """Refresh in the background on behalf of `owner` (a started credential). Needs a running loop."""
        self.register(owner, route, kind)
        self._active.add(id(owner))
        if self._refresher is None or self._refresher.done():
            self._wake = asyncio.Event()
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever(), name=self._name)

    async def detach(self, owner: object) -> None:
        """`owner` is closed; the last started one stops the refresher, the last one drops the entry."""
        self._users.pop(id(owner), None)
        self._owners.pop(id(owner), None)
        self._active.discard(id(owner))
        if self._active:
            return
        task, self._refresher = self._refresher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not self._users:
            self._unused()

    @property
    def routes(self) -> str:
        return ", ".join(sorted({route for route, _ in self._users.values()})) or "-"

    async def _refresh_forever(self) -> None:
        while True:
            try:
                # Never two fetches closer than the floor, whatever `_due` says (a provider's nonsense
                # times, a token that is refused at once).
                due = max(self._due(), self._fetch_started + self.min_interval_s)
                delay = due - time.monotonic()
                if delay > 0:
                    wake = self._wake
                    assert wake is not None
                    wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), delay)
                    continue
                task = self._inflight or self._start_fetch()
                with contextlib.suppress(TokenFetchError):
                    await asyncio.shield(task)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end refreshing for the life of the process
                self._log_refresher_failed()
                await asyncio.sleep(1.0)

    def _due(self) -> float:
        """When the refresher should fetch next (monotonic)."""
        if self.retry_at:
            return self.retry_at  # backing off after a failure
        return self._next_refresh()

    def _publish(self) -> None:
        """The state changed: update the owners' credential gauges now, not at the next scrape."""
        for owner in list(self._owners.values()):
            owner.publish()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------ fetching
    async def _fetch_shared(self) -> _T:
        """Share the fetch in flight or start one; CredentialUnavailable if it fails, and at once while
        backing off, so a down provider is not called once per request."""
        task = self._inflight
        if task is None:
            wait = self.retry_at - time.monotonic()
            if wait > 0:
                raise self._unavailable(wait)
            task = self._start_fetch()
        try:
            return await asyncio.shield(task)
        except TokenFetchError:
            raise self._unavailable(self.retry_at - time.monotonic()) from None

    async def _fetch_forced(
        self,
        interval_s: float,
        starting: Callable[[], None],
        too_soon: Callable[[float], None] | None = None,
    ) -> _T | None:
        """The result of the fetch in flight, or of a new one unless one was forced less than `interval_s`
        ago (then `too_soon(now)`), so a misconfigured upstream cannot turn every request into a fetch.
        `starting` runs just before a forced fetch starts. None if no fetch succeeds."""
        task = self._inflight
        if task is None:
            now = time.monotonic()
            if now - self._forced_at < interval_s:
                if too_soon is not None:
                    too_soon(now)
                return None
            self._forced_at = now
            starting()
            task = self._start_fetch()
        try:
            return await asyncio.shield(task)
        except TokenFetchError:
            return None

    def _start_fetch(self) -> asyncio.Task[_T]:
        self._fetch_started = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._fetch())
        # Every outcome is recorded by _fetch; this only keeps asyncio from reporting it as unretrieved.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._inflight = task
        return task

    async def _fetch(self) -> _T:
        try:
            return await self._fetch_once()
        except TokenFetchError as exc:
            self._failed(exc)
            raise
        finally:
            self._inflight = None

    def _succeeded(self) -> bool:
        """Clear the failure state after a fetch stored its result; True if the previous fetch had failed."""
        recovered = self.last_error is not None
        self.last_error = None
        self.last_hint = ""
        self.retry_at = 0.0
        self.backoff.reset()
        self._count("ok")
        self._poke()
        self._publish()
        return recovered

    def _failed(self, error: TokenFetchError) -> None:
        delay = max(self.backoff.next_delay(error.retry_after), self.min_interval_s)
        self.retry_at = time.monotonic() + delay
        self.last_error = redact(error.message)
        self.last_hint = error.hint
        self._count("error")
        self._log_failed(delay, f" ({error.hint})" if error.hint else "")
        self._poke()
        self._publish()

    def _count(self, result: str) -> None:
        for route, kind in set(self._users.values()):
            metrics.CREDENTIAL_REFRESHES.labels(route, kind, result).inc()

    def _unavailable(self, wait_s: float) -> CredentialUnavailable:
        retry_after = max(1, math.ceil(wait_s))
        return CredentialUnavailable(f"{self._missing()}; retry in {retry_after} s", retry_after=retry_after)

    def detail(self) -> str | None:
        """The last failure and its hint, or None."""
        if self.last_error is None:
            return None
        return f"{self.last_error} ({self.last_hint})" if self.last_hint else self.last_error


class TokenEntry(RefreshingEntry[TokenGrant]):
    """The token of one (source, scope), its background refresh and its failure state."""

    def __init__(self, cache: TokenCache, source: TokenSource, scope: str) -> None:
        super().__init__(
            name=f"token refresh {scope}",
            backoff=Backoff(cache.backoff_base_s, cache.backoff_cap_s, cache.rng),
            min_interval_s=cache.min_interval_s,
        )
        self.cache = cache
        self.source = source
        self.scope = scope
        self.key: CacheKey = (source.key, scope)
        self.grant: TokenGrant | None = None
        self.expires_mono = 0.0
        self.refresh_mono = 0.0
        self._rejection_logged_at = -math.inf
        # Routes sharing a token share its verdict; TokenCredential sets the policy of the latest route.
        self.suspicion = Suspicion()
        self.accepted_current = False  # the held token was accepted since it was fetched
        self.suspect = False  # the held token was refused since it was fetched or last accepted
        # The held token once accepted and not refused since: TokenCredential.accepted's fast path.
        self.settled: TokenGrant | None = None

    # ------------------------------------------------------------------ request path
    def peek(self) -> TokenGrant | None:
        """The cached token if it is still valid, else None. Cheap: call it on every request."""
        return self.cache.lookup(self.key)

    async def get(self) -> TokenGrant:
        """A valid token, fetched now if needed (shared with concurrent callers).

        Raises CredentialUnavailable when none can be had; while a failed fetch is backing off it does
        so at once, so a down identity provider is not called once per request.
        """
        grant = self.peek()
        if grant is not None:
            return grant
        return await self._fetch_shared()

    async def reject(self, rejected: Grant, *, verdict: bool = True) -> Grant | None:
        """The upstream refused `rejected`: return a different valid token to replay with, or None. The
        refused token stays in the cache (suspect) until a different one has been obtained. `verdict`:
        count the refusal towards declaring the route's token rejected (not for a management token
        refused by ARM, which says nothing about the scoring credential)."""
        now = time.monotonic()
        current = self.grant
        held = current is not None and current.header == rejected.header
        tried = rejected.tried
        if verdict and "token" not in tried:
            tried = tried | {"token"}
            # One count per request, and only for the token held when no new one is being fetched: a
            # burst of refusals of a revoked token while its replacement is on the way is one event.
            self._count_rejection(now, verdict=self._inflight is None and (held or current is None))
        if current is not None and not held:
            fresh = self.peek()  # another request (or the refresher) already replaced it
            if fresh is not None:
                return replay(fresh, tried)
        if held:
            self.suspect = True
            self.settled = None
        if self._inflight is None and self.retry_at > now:
            return None  # backing off after a failed fetch: a down provider is not called per request
        # A token the upstream had accepted and now refuses was revoked: always worth a new one. One
        # never accepted may simply not be allowed: at most one new token per interval.
        interval = 0.0 if held and self.accepted_current else FORCED_REFRESH_INTERVAL_S
        fresh = await self._fetch_forced(interval, self._log_refetch, self._log_rejected_again)
        if fresh is None or fresh.header == rejected.header:
            return None
        return replay(fresh, tried)

    def accept(self, accepted: Grant) -> None:
        """The upstream accepted `accepted` (TokenCredential.accepted's slow path)."""
        current = self.grant
        if current is not None and accepted.header == current.header:
            self.accepted_current = True
            self.suspect = False
            self.settled = current
        if self.suspicion.accepted():
            logger.warning(
                "route %s: the upstream accepts the token for %s again; the route is ready",
                self.routes,
                self.scope,
            )
            self._publish()

    def declared(self) -> bool:
        """Declared rejected: refused in `reject_after` distinct requests in a row, recently."""
        declared_at = self.suspicion.declared_at
        return declared_at is not None and time.monotonic() - declared_at < VERDICT_RECHECK_S

    def _count_rejection(self, now: float, *, verdict: bool) -> None:
        for route, _kind in set(self._users.values()):
            metrics.CREDENTIAL_REJECTIONS.labels(route, "token").inc()
        if not verdict:
            return
        if not self.suspicion.rejected(now):
            if self.suspicion.declared_at is not None:
                self._publish()  # still refused: declared anew (readiness may have come back meanwhile)
            return
        policy = self.suspicion.policy
        logger.error(
            "route %s: the upstream refused the token for %s in %d requests within %s s with no "
            "acceptance in between (%s); the route is not ready. Check the identity's role assignment "
            "on the endpoint and that the scope is the endpoint's audience",
            self.routes,
            self.scope,
            policy.reject_after,
            f"{policy.window_s:g}",
            self.source.description,
        )
        self._publish()

    def _log_refetch(self) -> None:
        logger.warning(
            "route %s: the upstream rejected the token for %s (%s); fetching a new one",
            self.routes,
            self.scope,
            self.source.description,
        )

    # ------------------------------------------------------------------ the refresher's hooks
    def _next_refresh(self) -> float:
        return 0.0 if self.grant is None else self.refresh_mono  # nothing to serve: now

    def _unused(self) -> None:
        self.cache.remove(self)

    def _log_refresher_failed(self) -> None:
        logger.exception("route %s: token refresher for %s failed; continuing", self.routes, self.scope)

    # ------------------------------------------------------------------ fetching
    async def _fetch_once(self) -> TokenGrant:
        started_mono = time.monotonic()
        started_wall = time.time()
        token = await within_deadline(
            self.source.fetch(self.scope),
            self.source.deadline_s,
            awaited="token",
            hint="check that the identity provider is reachable from this host",
        )
        return self._store(token, started_mono, started_wall)

    def _store(self, token: AccessToken, started_mono: float, started_wall: float) -> TokenGrant:
        # Lifetimes are measured from when we asked: that errs towards refreshing early.
        lifetime = token.expires_at - started_wall
        if not math.isfinite(lifetime):
            raise TokenFetchError(
                f"the provider issued a token whose expiry is not a finite time ({lifetime})"
            )
        if lifetime <= 1.0:
            raise TokenFetchError(f"the provider issued a token that expires in {lifetime:.0f} s")
        if lifetime > MAX_TOKEN_LIFETIME_S:
            raise TokenFetchError(
                f"the provider issued a token said to expire in {lifetime:.4g} s, more than any token lives"
            )
        hint = None
        if token.refresh_after is not None:
            if not math.isfinite(token.refresh_after):
                raise TokenFetchError(
                    f"the provider's refresh time for the token is not a finite time ({token.refresh_after})"
                )
            hint = token.refresh_after - started_wall  # outside (0, lifetime): ignored by refresh_delay
        expires_mono = started_mono + lifetime
        try:
            grant = TokenGrant(
                header=f"Bearer {token.value}",
                slot="token",
                expires_at=token.expires_at,
                serve_until=expires_mono - serve_margin(lifetime),
            )
        except ValueError:  # a line break or NUL in the token: it cannot go into a header
            raise TokenFetchError("the provider issued a token that is not a valid header value") from None
        self.grant = grant
        self.accepted_current = False
        self.suspect = False
        self.settled = None
        self.expires_mono = expires_mono
        self.refresh_mono = started_mono + refresh_delay(lifetime, hint, self.cache.rng)
        self.cache.valid[self.key] = grant
        if self._succeeded():
            logger.warning(
                "route %s: obtained a token for %s again (%s); it expires in %.0f s",
                self.routes,
                self.scope,
                self.source.description,
                lifetime,
            )
        else:
            logger.debug("route %s: new token for %s, expires in %.0f s", self.routes, self.scope, lifetime)
        return grant

    def _log_failed(self, delay: float, hint: str) -> None:
        if self.peek() is not None:
            logger.warning(
                "route %s: cannot refresh the token for %s (%s): %s%s; still using the cached token, "
                "which expires in %.0f s; next attempt in %.1f s",
                self.routes,
                self.scope,
                self.source.description,
                self.last_error,
                hint,
                max(0.0, self.expires_mono - time.monotonic()),
                delay,
            )
        else:
            logger.error(
                "route %s: no token for %s (%s): %s%s; requests get 503 credential_unavailable until one "
                "is obtained; next attempt in %.1f s",
                self.routes,
                self.scope,
                self.source.description,
                self.last_error,
                hint,
                delay,
            )

    def _log_rejected_again(self, now: float) -> None:
        if now - self._rejection_logged_at < _REJECTION_LOG_INTERVAL_S:
            return
        self._rejection_logged_at = now
        logger.error(
            "route %s: the upstream also rejects the token for %s obtained moments ago (%s): the identity "
            "is probably not allowed to call it. Check its role assignment on the endpoint and that the "
            "scope is the endpoint's audience",
            self.routes,
            self.scope,
            self.source.description,
        )

    def _missing(self) -> str:
        problem = self.last_error or "no token obtained yet"
        if self.last_error and self.last_hint:
            problem = f"{problem} ({self.last_hint})"
        return f"no valid token for {self.scope} ({self.source.description}): {problem}"

    # ------------------------------------------------------------------ status
    def expires_in(self) -> float | None:
        """Seconds until the held token expires: None without one, 0 once it has expired."""
        if self.grant is None:
            return None
        return max(self.expires_mono - time.monotonic(), 0.0)

    def state(self) -> str:
        """rejected (declared: refused in repeated requests); valid; refreshing (still valid, but refreshing
        it fails); expired (and no new one yet); unavailable (none obtained, the last attempt failed);
        pending (none obtained yet)."""
        if self.declared():
            return "rejected"
        if self.peek() is not None:
            return "refreshing" if self.last_error is not None else "valid"
        if self.grant is not None:
            return "expired"
        if self.last_error is not None:
            return "unavailable"
        return "pending"

    def __repr__(self) -> str:
        return f"TokenEntry(scope={self.scope!r}, source={self.source.description!r})"


class TokenCache:
    """Every token the process holds, keyed by (source key, scope). One per process (BuildContext.shared)."""

    def __init__(
        self,
        *,
        maxsize: int = 1024,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        rng: random.Random | None = None,
        min_interval_s: float = MIN_FETCH_INTERVAL_S,
    ) -> None:
        self.valid: TLRUCache[CacheKey, TokenGrant] = TLRUCache(maxsize, ttu=_serve_until)
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.min_interval_s = min_interval_s
        self.rng = rng or random.Random()
        self._entries: dict[CacheKey, TokenEntry] = {}

    def lookup(self, key: CacheKey) -> TokenGrant | None:
        """The hot path. `TLRUCache.__getitem__` checks the expiry; its `get()` costs five times as much
        (it freezes the timer and looks the key up twice)."""
        try:
            return self.valid[key]
        except KeyError:
            return None

    def entry(self, source: TokenSource, scope: str) -> TokenEntry:
        key = (source.key, scope)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = TokenEntry(self, source, scope)
        return entry

    def remove(self, entry: TokenEntry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            self.valid.pop(entry.key, None)
        if not any(e.source is entry.source for e in self._entries.values()):
            entry.source.close()

    def __len__(self) -> int:
        return len(self._entries)
