"""OpenTelemetry spans for proxied requests, when the optional `otel` extra is installed and configured.

Nothing in this module imports opentelemetry at import time: with `telemetry.otel.enabled: false` (the
default) the packages need not be installed and the proxy's whole cost is one `is None` check per request.

When enabled, each proxied request gets one SERVER span whose parent is the client's W3C `traceparent`
(if any), and the upstream receives the gateway span's own `traceparent`, so the upstream's span is its
child. Span attributes are chosen from what the gateway decided (route name, method, statuses, upstream
origin, attempts, error code): never a header value, the path or query string, or a credential.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from gateway.config import OtelConfig
from gateway.errors import ConfigError
from gateway.telemetry import RequestRecord, Telemetry

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from gateway.headers import InboundHeaders

_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
# Semantic conventions: other methods are reported as `_OTHER`, so a client cannot mint span names.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_OTLP_PACKAGE = "opentelemetry-exporter-otlp-proto-http"


class Tracing:
    """The tracer and the per-request hooks. Construct it to validate the set-up (a missing package is a
    ConfigError then); `start()` builds the provider, so a process that only validates starts no thread."""

    def __init__(self, config: OtelConfig, source: str = "<config>") -> None:
        self.config = config
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise ConfigError(
                f"{source}: telemetry.otel.enabled: the OpenTelemetry SDK is not installed ({exc}); "
                "install the gateway with its `otel` extra: pip install 'scoring-gateway[otel]'"
            ) from None
        self._trace = trace
        self._resource = Resource
        self._provider_class = TracerProvider
        self._batch = BatchSpanProcessor
        self._exporter_class: Any = None
        if config.exporter == "console":
            self._exporter_class = ConsoleSpanExporter
        elif config.exporter == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError as exc:
                raise ConfigError(
                    f"{source}: telemetry.otel.exporter: `otlp` needs the package {_OTLP_PACKAGE}, which is "
                    f"not installed ({exc}); pip install 'scoring-gateway[otlp]', or choose another exporter"
                ) from None
            self._exporter_class = OTLPSpanExporter
        self._propagator = TraceContextTextMapPropagator()
        self._server_kind = trace.SpanKind.SERVER
        self.provider: TracerProvider | None = None
        self._tracer: Tracer | None = None

    def start(self) -> None:
        if self.provider is not None:
            return
        # The gateway's own provider, not the global one: an embedding program's tracing is left alone.
        resource = self._resource.create({"service.name": self.config.service_name})
        provider = self._provider_class(resource=resource)
        if self._exporter_class is not None:
            options = {"endpoint": self.config.otlp_endpoint} if self.config.otlp_endpoint else {}
            # Batched: exporting happens on the processor's thread, never on the event loop.
            provider.add_span_processor(self._batch(self._exporter_class(**options)))
        self.provider = provider
        self._tracer = provider.get_tracer("gateway")

    async def shutdown(self) -> None:
        provider = self.provider
        if provider is not None:
            self.provider = None
            await asyncio.to_thread(provider.shutdown)  # flushes the batch: blocking network I/O

    def begin(self, record: RequestRecord, inbound: InboundHeaders) -> None:
        """Start the request's span and put its `traceparent` (and the client's `tracestate`) in place of
        the client's in the headers forwarded upstream."""
        tracer = self._tracer
        if tracer is None:
            return
        carrier: dict[str, str] = {}
        kept: list[tuple[bytes, bytes]] = []
        for name, value in inbound.forwarded:
            if name in _TRACE_HEADERS:
                carrier.setdefault(name.decode("latin-1"), value.decode("latin-1"))
            else:
                kept.append((name, value))
        method = record.method if record.method in _KNOWN_METHODS else "_OTHER"
        # An invalid or absent traceparent gives an empty context: the span starts a new trace.
        parent = self._propagator.extract(carrier) if carrier else None
        span = tracer.start_span(
            method if method != "_OTHER" else "HTTP",
            context=parent,
            kind=self._server_kind,
            attributes={"http.request.method": method},
            start_time=time.time_ns() - int((time.perf_counter() - record.started) * 1e9),
        )
        outgoing: dict[str, str] = {}
        self._propagator.inject(outgoing, context=self._trace.set_span_in_context(span))
        kept.extend((name.encode("latin-1"), value.encode("latin-1")) for name, value in outgoing.items())
        inbound.forwarded = kept
        record.span = span

    def end(self, record: RequestRecord, span: Span) -> None:
        attributes: dict[str, str | int] = {
            "gateway.attempts": record.attempts,
            "gateway.caller": record.caller.id,
        }
        if record.status:
            attributes["http.response.status_code"] = record.status
        if record.route is not None:
            attributes["gateway.route"] = record.route
            method = record.method if record.method in _KNOWN_METHODS else "HTTP"
            span.update_name(f"{method} {record.route}")
        if record.upstream is not None:
            attributes["gateway.upstream"] = record.upstream.origin
        if record.upstream_status is not None:
            attributes["gateway.upstream.status_code"] = record.upstream_status
        if record.retries:
            attributes["gateway.retries"] = record.retries
        if record.credential_replays:
            attributes["gateway.credential_replays"] = record.credential_replays
        error = record.error or (str(record.status) if record.status >= 500 else None)
        if error is not None:
            attributes["error.type"] = error
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        span.set_attributes(attributes)
        span.end()


class TracedTelemetry(Telemetry):
    """Telemetry that also ends the request's span: the proxy's `finally` already calls `request_done`,
    so ending spans here costs the untraced path nothing."""

    def __init__(self, tracing: Tracing, *, access_log: bool = True) -> None:
        super().__init__(access_log=access_log)
        self.tracing = tracing

    def request_done(self, record: RequestRecord) -> None:
        span = record.span
        if span is not None:
            record.span = None
            self.tracing.end(record, span)
        super().request_done(record)


def build_tracing(config: OtelConfig, source: str = "<config>") -> Tracing | None:
    """None when tracing is off, without importing opentelemetry."""
    return Tracing(config, source) if config.enabled else None
