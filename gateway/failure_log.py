"""The operator's log line for a failed upstream attempt: why it failed, once per route and cause, then
a count.

The access line keeps its stable `error=` code; the client's 502/504 names the failure class only. This
line carries the detail an on-call engineer needs: the route, the request id, the origin (`host:port`),
the attempt number, the cause (the TLS verdict with what the certificate holds, which timeout and its
value, refused, reset, the egress proxy and its answer, or that it could not be reached) and what the
gateway did next. The detail comes from the transport error's message, which never holds a header.

An outage fails every request the same way: the first failure of a route, origin and cause is logged at
once; the next ones within `interval_s` are counted, and at the end of the interval the count is logged
in a line of its own, so an outage that stopped still says how many failures it had. The clock and the
timer are injectable so the rule can be tested without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.client import Origin
from gateway.errors import ProxyRefused, TransportError

logger = logging.getLogger("gateway.failures")

INTERVAL_S = 10.0
# Keys come from the config (route, origin) times a fixed set of causes; this only bounds what reloads
# that rename routes leave behind.
_MAX_KEYS = 4096

_Key = tuple[str, str, str, int]


class _Seen:
    __slots__ = ("last_request_id", "logged_at", "suppressed")

    def __init__(self, logged_at: float) -> None:
        self.logged_at = logged_at
        self.suppressed = 0
        self.last_request_id: str | None = None


def _call_later(delay_s: float, callback: Callable[[], None]) -> None:
    asyncio.get_running_loop().call_later(delay_s, callback)


class FailureLog:
    def __init__(
        self,
        *,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        call_later: Callable[[float, Callable[[], None]], None] = _call_later,
    ) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._call_later = call_later
        self._seen: dict[_Key, _Seen] = {}

    def attempt_failed(
        self,
        *,
        route: str,
        request_id: str | None,
        origin: Origin,
        attempt: int,
        error: TransportError,
        outcome: str,
    ) -> None:
        """Log (or count) one failed attempt; `outcome` says what the gateway did next."""
        proxy_status = error.status if isinstance(error, ProxyRefused) else 0
        key = (route, origin.name, error.cause, proxy_status)
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen.logged_at < self.interval_s:
            if not seen.suppressed:  # the first one counted: the count is logged when the interval ends
                self._call_later(seen.logged_at + self.interval_s - now, lambda: self._log_count(key, seen))
            seen.suppressed += 1
            seen.last_request_id = request_id
            return
        repeated = ""
        if seen is not None and seen.suppressed:
            repeated = (
                f" ({seen.suppressed} more failure(s) like it in the {now - seen.logged_at:.0f} s since "
                "the last such line were not logged)"
            )
        if seen is None and len(self._seen) >= _MAX_KEYS:
            self._seen.clear()
        self._seen[key] = _Seen(now)
        proxy = origin.proxy
        via = f" via the egress proxy {proxy.address}" if proxy is not None else ""
        logger.warning(
            "route %s: request %s: attempt %d to %s%s failed (%s): %s; %s%s",
            route,
            request_id or "-",
            attempt,
            origin.name,
            via,
            error.cause,
            error,
            outcome,
            repeated,
            extra={
                "route": route,
                "request_id": request_id,
                "origin": origin.name,
                "attempt": attempt,
                "cause": error.cause,
                "proxy": proxy.address if proxy is not None else None,
                "proxy_status": proxy_status or None,
                "suppressed": seen.suppressed if seen is not None else 0,
            },
        )

    def _log_count(self, key: _Key, seen: _Seen) -> None:
        """The interval of a logged failure is over: say how many like it were only counted. A failure
        logged since (with the count) or a cleared table leaves nothing to say."""
        if self._seen.get(key) is not seen or not seen.suppressed:
            return
        route, origin, cause, proxy_status = key
        now = self._clock()
        logger.warning(
            "route %s: %d more attempt(s) to %s failed (%s) in the %.0f s since the last such line; the "
            "last was request %s",
            route,
            seen.suppressed,
            origin,
            cause,
            now - seen.logged_at,
            seen.last_request_id or "-",
            extra={
                "route": route,
                "request_id": seen.last_request_id,
                "origin": origin,
                "cause": cause,
                "proxy_status": proxy_status or None,
                "suppressed": seen.suppressed,
            },
        )
        seen.logged_at = now
        seen.suppressed = 0
