"""What happens to a finished request: one access log line and its metrics."""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import time
from typing import TYPE_CHECKING, Any

from gateway import metrics
from gateway.callers import ANONYMOUS, Caller
from gateway.logs import sole_handler

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from gateway.upstreams import Upstream

access_logger = logging.getLogger("gateway.access")
ACCESS_FORMAT = (
    "%s %s route=%s caller=%s status=%s upstream_status=%s duration_ms=%.1f attempts=%d "
    "credential=%s bytes_in=%d bytes_out=%d%s"
)


class RequestRecord:
    __slots__ = (
        "attempts",
        "bytes_in",
        "bytes_out",
        "caller",
        "credential",
        "credential_replays",
        "error",
        "headers_at",
        "method",
        "request_id",
        "response_started",
        "retries",
        "route",
        "span",
        "started",
        "status",
        "upstream",
        "upstream_errors",
        "upstream_status",
    )

    def __init__(self, method: str, started: float) -> None:
        self.method = method
        self.started = started
        self.request_id: str | None = None
        # Who calls (`gateway.inbound`): later stages key on it (`caller.id`; anonymous ones by address).
        self.caller: Caller = ANONYMOUS
        self.route: str | None = None
        self.status = 0
        self.upstream_status: int | None = None
        self.upstream: Upstream | None = None
        self.attempts = 0
        self.retries = 0
        self.credential_replays = 0
        self.upstream_errors = 0
        self.credential: str | None = None
        self.error: str | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.response_started = False
        self.headers_at = started  # when the upstream's response headers arrived
        self.span: Span | None = None  # set by gateway.tracing when tracing is enabled


class _RouteCounts:
    """One route's counts since the last flush, keyed by status code: counting a request is an int-keyed
    increment, not a tuple built, hashed and looked up per metric."""

    __slots__ = ("by_label", "latency", "replays", "retries", "upstream")

    def __init__(self) -> None:
        # caller label -> requests without a gateway error, per status the client got
        self.by_label: dict[str, collections.Counter[int]] = {}
        self.upstream: collections.Counter[int] = collections.Counter()  # answers, per upstream status
        # per bucket of UPSTREAM_LATENCY, then the sum of the observations
        self.latency = [0.0] * (len(_LATENCY_BOUNDS) + 2)
        self.retries = 0
        self.replays = 0


class Telemetry:
    """Counts each finished request in plain ints, without a lock or a label look-up, and adds them to
    the Prometheus metrics in `flush()`: before every scrape (`GatewayApp`'s /metrics), and at most a
    second after a request while requests are served (other workers' counts, in multiprocess mode)."""

    FLUSH_AFTER_S = 1.0

    def __init__(self, *, access_log: bool = True) -> None:
        self.access_log = access_log
        self._routes: dict[str, _RouteCounts] = {}
        # Requests the gateway answered with an error: (route, status, error code, caller label) -> requests
        self._errors: collections.Counter[tuple[str, int, str, str]] = collections.Counter()
        self._flush_timer: asyncio.TimerHandle | None = None

    def request_done(self, record: RequestRecord) -> None:
        # Hot path: a dict look-up per route and int-keyed counts; the clock is read only for the access line.
        route = record.route or ""
        counts = self._routes.get(route)
        if counts is None:
            counts = self._routes[route] = _RouteCounts()
        caller = record.caller
        status = record.status
        if record.error is None:
            per_status = counts.by_label.get(caller.label)
            if per_status is None:
                per_status = counts.by_label[caller.label] = collections.Counter()
            per_status[status] += 1
        else:
            self._errors[route, status, record.error or "", caller.label] += 1
        upstream_status = record.upstream_status
        if upstream_status is not None:
            counts.upstream[upstream_status] += 1
            waited = record.headers_at - record.started
            latency = counts.latency
            latency[bisect.bisect_left(_LATENCY_BOUNDS, waited)] += 1
            latency[-1] += waited
        if record.retries:
            counts.retries += record.retries
        if record.credential_replays:
            counts.replays += record.credential_replays
        if self._flush_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
            else:
                self._flush_timer = loop.call_later(self.FLUSH_AFTER_S, self.flush)
        if self.access_log and access_logger.isEnabledFor(logging.INFO):
            self._access_line(record, route)

    @staticmethod
    def _access_line(record: RequestRecord, route: str) -> None:
        duration = time.perf_counter() - record.started
        args = (
            record.request_id or "-",
            record.method,
            route or "-",
            record.caller.id,
            record.status,
            record.upstream_status if record.upstream_status is not None else "-",
            duration * 1000,
            record.attempts,
            record.credential or "-",
            record.bytes_in,
            record.bytes_out,
            f" error={record.error}" if record.error else "",
        )
        handler = sole_handler(access_logger, logging.INFO)
        if handler is None:
            access_logger.info(ACCESS_FORMAT, *args, extra=_access_extra(record, route, duration))
        else:
            # Nothing but the gateway's own handler would see the record: its line, without the record
            # and the library's handler chain.
            extra = _access_extra(record, route, duration) if handler.wants_extra else None
            handler.write_message(
                time.time(),
                logging.getLevelName(logging.INFO),
                access_logger.name,
                ACCESS_FORMAT % args,
                extra,
            )

    def flush(self) -> None:
        """Add the counts since the last flush to the Prometheus metrics (and the in-flight gauges)."""
        timer = self._flush_timer
        if timer is not None:
            timer.cancel()
            self._flush_timer = None
        routes, self._routes = self._routes, {}
        for route, counts in routes.items():
            for label, per_status in counts.by_label.items():
                for status, count in per_status.items():
                    metrics.REQUESTS.labels(route, metrics.status_label(status), "", label).inc(count)
            for status, count in counts.upstream.items():
                metrics.UPSTREAM_RESPONSES.labels(route, metrics.status_label(status)).inc(count)
            latency = counts.latency
            if any(latency[:-1]):
                histogram = metrics.UPSTREAM_LATENCY.labels(route)
                # prometheus_client has no "observe n times": its per-bucket values (not cumulative) and
                # its sum take the batch, as `observe()` would have added them one by one.
                for bucket, observed in enumerate(latency[:-1]):
                    if observed:
                        histogram._buckets[bucket].inc(observed)
                histogram._sum.inc(latency[-1])
            if counts.retries:
                metrics.RETRIES.labels(route).inc(counts.retries)
            if counts.replays:
                metrics.CREDENTIAL_REPLAYS.labels(route).inc(counts.replays)
        errors, self._errors = self._errors, collections.Counter()
        for (route, status, error, caller), count in errors.items():
            metrics.REQUESTS.labels(route, metrics.status_label(status), error, caller).inc(count)
        metrics.flush_in_flight()


# The histogram's finite upper bounds; an observation above all of them goes to the +Inf bucket.
_LATENCY_BOUNDS: tuple[float, ...] = tuple(
    bound for bound in metrics.UPSTREAM_LATENCY._upper_bounds if bound != float("inf")
)


def _access_extra(record: RequestRecord, route: str, duration: float) -> dict[str, Any]:
    """The access line's fields, as JSON lines show them and handlers other than the gateway's see them."""
    return {
        "request_id": record.request_id,
        "route": route or None,
        "caller": record.caller.id,
        "method": record.method,
        "status": record.status,
        "upstream_status": record.upstream_status,
        "duration_ms": round(duration * 1000, 2),
        "attempts": record.attempts,
        "credential": record.credential,
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
        "error_code": record.error,
    }
