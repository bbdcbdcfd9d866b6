"""The one small interface every credential kind implements.

The proxy asks for a `Grant` (the Authorization header value to send) on every request, tells the
credential when the upstream rejected or accepted it, and reads `status()` for readiness, metrics
and `gateway check`. `grant_nowait()` must be cheap: no lock, no I/O, no coroutine.

A rejection fails the request over at once (`rejected()` returns the grant to replay with), but one
401 says little: a client can provoke it (a payload the endpoint's WAF or `score.py` refuses). A key or
token is *declared* rejected (readiness, error log, metric) only after rejections in `reject_after`
distinct requests within `reject_window_s` with no acceptance in between (`Suspicion`), and, for a key,
only if the gateway's own probe with it is not accepted (`gateway.credentials.probe`). Distinct
requests are told apart by the grant: the replacement `rejected()` returns carries the slots already
refused within its request (`Grant.tried`), and the proxy passes it back unchanged.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from gateway import metrics
from gateway.errors import SecretError
from gateway.secrets import check_header_value


@dataclass(frozen=True, slots=True, eq=False)
class Grant:
    """What to send upstream: `header` is the full Authorization value, or None for open upstreams."""

    header: str | None
    slot: str  # "primary", "secondary", "token", "none": safe to log and to use as a metric label
    expires_at: float | None = None  # wall-clock seconds, for tokens
    # Slots already refused within the request this grant replays (set by `replay`, empty otherwise):
    # a rejection counts once per request, however often the request is replayed.
    tried: frozenset[str] = frozenset()
    # The whole header line as the upstream client writes it, encoded once per grant, not per request.
    header_line: bytes | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.header is not None:
            try:
                check_header_value(self.header, "the credential")
            except SecretError as exc:
                raise ValueError(str(exc)) from None
            object.__setattr__(
                self, "header_line", b"Authorization: " + self.header.encode("latin-1") + b"\r\n"
            )

    def __repr__(self) -> str:
        return f"Grant(slot={self.slot!r})"


T = TypeVar("T")


class DeadlinePassed(Exception):
    """The request's deadline came while `rejected()` waited for a verdict: the request gets the refusal."""


async def by_deadline(until: float | None, awaitable: Awaitable[T]) -> T:
    """`await awaitable` until the request's deadline `until` (on `time.perf_counter()`) at most; raises
    DeadlinePassed past it. What it waits for (a probe, a token or key fetch) is shielded by its owner and
    goes on for the requests that follow."""
    try:
        async with asyncio.timeout(None if until is None else until - time.perf_counter()) as window:
            return await awaitable
    except TimeoutError:
        if not window.expired():
            raise  # the awaited thing's own timeout, not the request's deadline
        raise DeadlinePassed from None


def replay(grant: Grant, tried: frozenset[str]) -> Grant:
    """`grant` for a replay within the request that already saw `tried` refused (a copy: cached grants are
    shared by every request). Only on the rejection path, never per request."""
    return dataclasses.replace(grant, tried=tried)


@dataclass(frozen=True, slots=True)
class RejectionPolicy:
    """Which upstream statuses mean "credential refused", and when refusals declare it rejected."""

    statuses: frozenset[int] = frozenset({401})
    reject_after: int = 3  # distinct requests...
    window_s: float = 60.0  # ...within this many seconds, with no acceptance in between

    @classmethod
    def of(cls, auth: Any) -> RejectionPolicy:
        """The policy an auth config block (`reject_statuses`, `reject_after`, `reject_window_s`) sets."""
        return cls(frozenset(auth.reject_statuses), auth.reject_after, auth.reject_window_s)


DEFAULT_REJECTION = RejectionPolicy()


class Suspicion:
    """Rejections of one credential across distinct requests; `rejected()` declares it after
    `reject_after` of them within `window_s`, and any acceptance forgets them."""

    __slots__ = ("_times", "declared_at", "policy")

    def __init__(self, policy: RejectionPolicy = DEFAULT_REJECTION) -> None:
        self.policy = policy
        self._times: deque[float] = deque(maxlen=policy.reject_after)
        self.declared_at: float | None = None  # monotonic, while declared rejected

    @property
    def suspect(self) -> bool:
        """Refused at least once since it was last accepted."""
        return bool(self._times) or self.declared_at is not None

    def rejected(self, now: float) -> bool:
        """Count one request's rejection (monotonic `now`); True when it declares the credential rejected."""
        if self.verdict_due(now):
            self.declared_at = now
            return True
        return False

    def verdict_due(self, now: float) -> bool:
        """Count one request's rejection; True when `reject_after` of them fell within `window_s` (the
        count starts again). The caller declares (`declared_at`) or clears (`accepted`) the credential,
        after a probe of its own where it has one. A declared credential's refusal renews the
        declaration instead of counting."""
        if self.declared_at is not None:
            self.declared_at = now  # still refused: the declaration is renewed, not repeated
            return False
        times = self._times
        times.append(now)
        if len(times) == times.maxlen and now - times[0] <= self.policy.window_s:
            times.clear()
            return True
        return False

    def accepted(self) -> bool:
        """Forget every rejection; True if the credential had been declared rejected."""
        declared = self.declared_at is not None
        self._times.clear()
        self.declared_at = None
        return declared


@dataclass(slots=True)
class CredentialStatus:
    kind: str
    ready: bool
    state: str  # "valid", "rejected", "unavailable", "refreshing", "pending", "open"
    active_slot: str | None = None
    source: str = ""
    expires_in_s: float | None = None
    expires_at: float | None = None  # wall-clock seconds, for tokens
    detail: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "auth_type": self.kind,
            "state": self.state,
            "ready": self.ready,
            "active_slot": self.active_slot,
            "source": self.source,
        }
        if self.expires_in_s is not None:
            data["expires_in_s"] = round(self.expires_in_s, 1)
        if self.detail:
            data["detail"] = self.detail
        data.update(self.extra)
        return data


class Credential(abc.ABC):
    kind: ClassVar[str]
    # Upstream statuses that mean "this credential was refused" (`auth.reject_statuses`).
    rejection_statuses: frozenset[int]

    def __init__(self, route: str, rejection: RejectionPolicy = DEFAULT_REJECTION) -> None:
        self.route = route
        self.rejection = rejection
        self.rejection_statuses = rejection.statuses

    @abc.abstractmethod
    def grant_nowait(self) -> Grant | None:
        """The grant to use now, or None when one must first be acquired with `grant()`."""

    async def grant(self) -> Grant:
        """Wait for a grant; raises CredentialUnavailable when none can be had."""
        grant = self.grant_nowait()
        assert grant is not None
        return grant

    async def rejected(self, grant: Grant, until: float | None = None) -> Grant | None:
        """The upstream refused `grant`. Return another one to replay the request with, or None. `until`
        is the request's deadline (on `time.perf_counter()`): a wait for a verdict ends there at most."""
        return None

    def accepted(self, grant: Grant) -> None:  # noqa: B027 - optional hook, a no-op by default
        """The upstream accepted `grant` (it answered something other than a rejection)."""

    @abc.abstractmethod
    def status(self) -> CredentialStatus: ...

    def publish(self) -> CredentialStatus:
        """Set the route's credential gauges from the current state; called whenever it changes (a
        verdict, a refresh, a failover) and on every scrape."""
        status = self.status()
        metrics.publish_credential(self.route, status)
        return status

    async def start(self) -> None:  # noqa: B027
        """Begin background work (refresh loops). Called once the event loop runs."""

    async def close(self) -> None:  # noqa: B027
        """Stop background work."""

    async def check(self) -> CredentialStatus:
        """Acquire the credential once, for `gateway check`."""
        await self.grant()
        return self.status()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(route={self.route!r})"


class NoCredential(Credential):
    """`auth.type: none`: the upstream is open; the client's own Authorization is still dropped."""

    kind = "none"
    _GRANT = Grant(header=None, slot="none")

    def __init__(self, route: str) -> None:
        super().__init__(route, RejectionPolicy(statuses=frozenset()))

    def grant_nowait(self) -> Grant:
        return self._GRANT

    def status(self) -> CredentialStatus:
        return CredentialStatus(kind=self.kind, ready=True, state="open")
