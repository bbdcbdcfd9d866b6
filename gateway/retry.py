"""The replay policy: whether a failed upstream attempt is sent again, after how long, and the route's
retry budget. Built once per route at start-up; per request it is a few comparisons.

What is replayed by default, and why (Azure ML's semantics, see docs/troubleshooting.md):

- a connection failure before any byte of the request was sent (`request_sent` False): the upstream
  cannot have executed it (`retry.on_connection_errors`, default on);
- 502, 503 and 429 (`retry.on_statuses`), 429 and 503 honouring Retry-After up to `retry_after_cap_s`;
- nothing else once the request was sent: a timeout, 504 or 408 means the model may still be working on
  it, and a replay doubles the load on a model that is already too slow (`retry.on_timeouts` opts in);
  a connection lost after sending may have been executed (`retry.on_connection_lost` opts in);
- never 424: the model itself failed, and it fails again (`RetryConfig` refuses it in `on_statuses`).

Every replay also needs attempts left (`retry.attempts`), room before `retry.deadline_s`, and a token from
the route's `RetryBudget`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

from gateway.errors import (
    ClientFacingError,
    Overloaded,
    PoolTimeout,
    ProtocolError,
    ProxyRefused,
    TransportError,
    TransportTimeout,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)

if TYPE_CHECKING:
    from gateway.config import RetryConfig

# Statuses that mean "the model may still be working on it": replayed only with `retry.on_timeouts`.
TIMEOUT_STATUSES = frozenset({408, 504})
# Credential replays (another key, a fresh token) per request, besides `retry.attempts`.
MAX_CREDENTIAL_REPLAYS = 2
# A replay is started only if at least this much of `retry.deadline_s` is left for it.
MIN_ATTEMPT_S = 0.05
# Retry-After sent with 503 overloaded when the gateway's own connection pool is exhausted.
POOL_RETRY_AFTER_S = 1.0


class RetryBudget:
    """Finagle's retry budget: within any `WINDOW_S` seconds, retries stay below
    `min_retries_per_s * WINDOW_S` (the floor: a quiet route always retries its occasional failure) plus
    `ratio` of the requests (the percentage: an outage is not amplified beyond it).

    A ring of one-second slots with running totals: a request or a retry is an index and an addition,
    moving the window clears at most `WINDOW_S` slots. Constant time, nothing allocated per request.
    """

    WINDOW_S = 10

    __slots__ = (
        "_clock",
        "_next_second",
        "_ratio",
        "_requests",
        "_reserve",
        "_retries",
        "_second",
        "_slot",
        "_total_requests",
        "_total_retries",
    )

    def __init__(
        self, min_retries_per_s: float, ratio: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._ratio = ratio
        self._reserve = min_retries_per_s * self.WINDOW_S
        self._requests = [0] * self.WINDOW_S
        self._retries = [0] * self.WINDOW_S
        self._total_requests = 0
        self._total_retries = 0
        self._second = int(clock())
        self._next_second = float(self._second + 1)
        self._slot = self._second % self.WINDOW_S

    def deposit(self) -> None:
        """Count one request."""
        now = self._clock()
        if now >= self._next_second:
            self._move_to(int(now))
        self._requests[self._slot] += 1
        self._total_requests += 1

    def try_withdraw(self) -> bool:
        """Spend one retry if the budget allows it."""
        now = self._clock()
        if now >= self._next_second:
            self._move_to(int(now))
        if self._total_retries >= self._reserve + self._ratio * self._total_requests:
            return False
        self._retries[self._slot] += 1
        self._total_retries += 1
        return True

    def _move_to(self, second: int) -> None:
        """Clear the slots of the seconds that passed (all of them after a long quiet spell)."""
        window = self.WINDOW_S
        for passed in range(self._second + 1, self._second + 1 + min(second - self._second, window)):
            slot = passed % window
            self._total_requests -= self._requests[slot]
            self._total_retries -= self._retries[slot]
            self._requests[slot] = 0
            self._retries[slot] = 0
        self._second = second
        self._next_second = float(second + 1)
        self._slot = second % window


class TransportFailure:
    """What a failed attempt means: the client's error, whether the policy lets it be replayed, and
    whether it counts against the upstream's health (outlier detection)."""

    __slots__ = ("error", "replayable", "upstream_fault")

    def __init__(self, error: ClientFacingError, *, replayable: bool, upstream_fault: bool) -> None:
        self.error = error
        self.replayable = replayable
        self.upstream_fault = upstream_fault


class ReplayPolicy:
    """One route's `retry:` section, prepared for the request path."""

    __slots__ = (
        "attempts",
        "backoff_base_s",
        "backoff_max_s",
        "budget",
        "deadline_s",
        "on_connection_errors",
        "on_connection_lost",
        "on_timeouts",
        "retry_after_cap_s",
        "statuses",
    )

    def __init__(
        self,
        *,
        attempts: int = 3,
        statuses: Iterable[int] = (429, 502, 503),
        on_connection_errors: bool = True,
        on_timeouts: bool = False,
        on_connection_lost: bool = False,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 2.0,
        retry_after_cap_s: float = 5.0,
        deadline_s: float | None = None,
        min_retries_per_s: float = 10.0,
        budget_ratio: float = 0.2,
    ) -> None:
        self.attempts = attempts
        # `on_timeouts` covers the timeout statuses too: one switch for "the model may still be working".
        self.statuses = frozenset(statuses) | (TIMEOUT_STATUSES if on_timeouts else frozenset())
        self.on_connection_errors = on_connection_errors
        self.on_timeouts = on_timeouts
        self.on_connection_lost = on_connection_lost
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_cap_s = retry_after_cap_s
        self.deadline_s = deadline_s
        self.budget = RetryBudget(min_retries_per_s, budget_ratio)

    @classmethod
    def from_config(cls, config: RetryConfig) -> ReplayPolicy:
        return cls(
            attempts=config.attempts,
            statuses=config.on_statuses,
            on_connection_errors=config.on_connection_errors,
            on_timeouts=config.on_timeouts,
            on_connection_lost=config.on_connection_lost,
            backoff_base_s=config.backoff_base_s,
            backoff_max_s=config.backoff_max_s,
            retry_after_cap_s=config.retry_after_cap_s,
            deadline_s=config.deadline_s,
            min_retries_per_s=config.min_retries_per_s,
            budget_ratio=config.budget_ratio,
        )

    # ------------------------------------------------------------------ deciding
    def transport_failure(self, exc: TransportError, route: str) -> TransportFailure:
        """Map the client's exception to the answer the client gets and to what the policy allows. The
        answer names the route and the failure class (`exc.summary`), never a host, a port or an egress
        proxy's answer: those go to the operator's log line (gateway.failure_log)."""
        see_log = "; the gateway's log has the details under this request id"
        if isinstance(exc, PoolTimeout):
            # The gateway is the bottleneck, not the upstream: shed the load, never retry, never eject.
            return TransportFailure(
                Overloaded(f"route {route}: {exc.summary}; retry shortly", retry_after=POOL_RETRY_AFTER_S),
                replayable=False,
                upstream_fault=False,
            )
        if isinstance(exc, ProxyRefused) and exc.proxy_policy:
            # The egress proxy's credentials or policy: refused again on replay, and no upstream's fault.
            return TransportFailure(
                UpstreamUnreachable(f"route {route}: {exc.summary}{see_log}"),
                replayable=False,
                upstream_fault=False,
            )
        error: ClientFacingError
        if isinstance(exc, TransportTimeout):
            error = UpstreamTimeout(f"route {route}: {exc.summary}{see_log}")
            before_sending = exc.phase == "connect" or not exc.request_sent
            allowed = self.on_connection_errors if before_sending else self.on_timeouts
        elif isinstance(exc, ProtocolError):
            error = UpstreamProtocolError(f"route {route}: {exc.summary}{see_log}")
            allowed = self.on_connection_errors if not exc.request_sent else self.on_connection_lost
        else:
            error = UpstreamUnreachable(f"route {route}: {exc.summary}{see_log}")
            allowed = self.on_connection_errors if not exc.request_sent else self.on_connection_lost
        return TransportFailure(error, replayable=allowed, upstream_fault=True)

    def allows(self, body_replayable: bool, attempts: int, delay: float, deadline: float | None) -> bool:
        """The checks every replay passes: the body can be sent again, attempts are left, the deadline
        leaves room for the wait and one more attempt, and the budget has a retry (checked last: it
        spends it)."""
        return (
            body_replayable
            and attempts < self.attempts
            and (deadline is None or time.perf_counter() + delay + MIN_ATTEMPT_S < deadline)
            and self.budget.try_withdraw()
        )

    def allows_credential_replay(self, body_replayable: bool, replays: int, deadline: float | None) -> bool:
        """Another key or a fresh token: bounded by its own count and the deadline, not the budget (the
        upstream is healthy; the credential was refused)."""
        return (
            body_replayable
            and replays < MAX_CREDENTIAL_REPLAYS
            and (deadline is None or time.perf_counter() + MIN_ATTEMPT_S < deadline)
        )

    # ------------------------------------------------------------------ timing
    def backoff(self, retry: int) -> float:
        """Exponential backoff with full jitter for the `retry`-th retry."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2 ** (retry - 1)))
        return random.uniform(0, ceiling)

    def status_delay(self, headers: Iterable[tuple[bytes, bytes]], retry: int) -> float | None:
        """Seconds to wait before replaying after a retryable status, or None when its Retry-After
        (seconds, or an HTTP-date: until then) asks for longer than the gateway waits itself, or is
        neither (the client gets the answer and its Retry-After)."""
        value = None
        for name, header_value in headers:
            if name.lower() == b"retry-after":
                value = header_value
                break
        if not value:
            return self.backoff(retry)
        try:
            seconds = float(value)
        except ValueError:
            until = seconds_until(value)
            if until is None:
                # Neither delay-seconds nor an HTTP-date: the client gets the answer and its Retry-After,
                # unretried (the gateway cannot tell how long the upstream asked it to wait).
                return None
            seconds = until
        if not seconds <= self.retry_after_cap_s:  # also NaN, which compares false with everything
            return None
        return max(seconds, 0.0)


def seconds_until(http_date: bytes) -> float | None:
    """Seconds from now to a Retry-After given as an HTTP-date (RFC 9110 5.6.7: IMF-fixdate, or the
    obsolete RFC 850 and asctime forms; negative when it is past), or None when the text is no date."""
    try:
        when = parsedate_to_datetime(http_date.decode("latin-1"))
    except (ValueError, TypeError, IndexError, OverflowError):  # what the parser raises on odd text
        return None
    if when.tzinfo is None:  # asctime names no zone: HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - time.time()
