"""What happens to a finished request: one access log line and its metrics."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from gateway import metrics

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from gateway.upstreams import Upstream

access_logger = logging.getLogger("gateway.access")


class RequestRecord:
    __slots__ = (
        "attempts",
        "bytes_in",
        "bytes_out",
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


class Telemetry:
    def __init__(self, *, access_log: bool = True) -> None:
        self.access_log = access_log
        # Bound metric children, created once per label set: labels() takes a lock and hashes.
        self._requests: dict[tuple[str, int, str], Any] = {}
        self._upstream: dict[tuple[str, int], Any] = {}
        self._latency: dict[str, Any] = {}

    def request_done(self, record: RequestRecord) -> None:
        duration = time.perf_counter() - record.started
        route = record.route or ""
        error = record.error or ""
        key = (route, record.status, error)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = metrics.REQUESTS.labels(
                route, metrics.status_label(record.status), error
            )
        counter.inc()
        upstream_status = record.upstream_status
        if upstream_status is not None:
            upstream_key = (route, upstream_status)
            counter = self._upstream.get(upstream_key)
            if counter is None:
                counter = self._upstream[upstream_key] = metrics.UPSTREAM_RESPONSES.labels(
                    route, metrics.status_label(upstream_status)
                )
            counter.inc()
            histogram = self._latency.get(route)
            if histogram is None:
                histogram = self._latency[route] = metrics.UPSTREAM_LATENCY.labels(route)
            histogram.observe(record.headers_at - record.started)
        if record.retries:
            metrics.RETRIES.labels(route).inc(record.retries)
        if record.credential_replays:
            metrics.CREDENTIAL_REPLAYS.labels(route).inc(record.credential_replays)
        if self.access_log and access_logger.isEnabledFor(logging.INFO):
            access_logger.info(
                "%s %s route=%s status=%s upstream_status=%s duration_ms=%.1f attempts=%d credential=%s "
                "bytes_in=%d bytes_out=%d%s",
                record.request_id or "-",
                record.method,
                route or "-",
                record.status,
                record.upstream_status if record.upstream_status is not None else "-",
                duration * 1000,
                record.attempts,
                record.credential or "-",
                record.bytes_in,
                record.bytes_out,
                f" error={record.error}" if record.error else "",
                extra={
                    "request_id": record.request_id,
                    "route": route or None,
                    "method": record.method,
                    "status": record.status,
                    "upstream_status": record.upstream_status,
                    "duration_ms": round(duration * 1000, 2),
                    "attempts": record.attempts,
                    "credential": record.credential,
                    "bytes_in": record.bytes_in,
                    "bytes_out": record.bytes_out,
                    "error_code": record.error,
                },
            )
