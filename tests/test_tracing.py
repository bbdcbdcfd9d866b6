"""OpenTelemetry tracing through the real gateway on loopback: spans continue the client's W3C trace,
the upstream is handed the gateway's span as its parent, and no secret ends up in a span."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import PRIMARY, key_route
from servers import ServerThread

from gateway.app import GatewayApp
from gateway.config import parse_config
from gateway.errors import ConfigError

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

ROOT = Path(__file__).resolve().parent.parent
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
OTEL = {"otel": {"enabled": True, "service_name": "gw-under-test"}}


@pytest.fixture
def traced(
    upstream: Any, gateway_factory: Callable[..., ServerThread], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ServerThread, ServerThread, InMemorySpanExporter]]:
    """A traced gateway (exporter `none`) with an in-memory exporter added to its own provider."""
    _, server = upstream
    monkeypatch.setenv("TRACE_PRIMARY", PRIMARY)
    config = {
        "telemetry": OTEL,
        "routes": {
            "iris": key_route(server.url, primary={"env": "TRACE_PRIMARY"}),
            "down": {"path": "/down", "upstream": "http://127.0.0.1:1", "auth": {"type": "none"}},
        },
    }
    config["routes"]["down"]["retry"] = {"attempts": 1}
    gw = gateway_factory(config)
    exporter = InMemorySpanExporter()
    assert gw.app.tracing is not None and gw.app.tracing.provider is not None
    gw.app.tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield gw, server, exporter


def _one_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    # The span ends right after the response's last byte is sent: the client may be a moment ahead.
    deadline = time.monotonic() + 5
    while not exporter.get_finished_spans() and time.monotonic() < deadline:
        time.sleep(0.01)
    (span,) = exporter.get_finished_spans()
    return span


def _upstream_headers(response: httpx.Response) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = json.loads(response.json())["headers"]
    return headers


def test_span_continues_the_client_trace_and_parents_the_upstream(traced: Any) -> None:
    gw, server, exporter = traced
    response = httpx.post(
        gw.url + "/iris/echo?token=query-secret-value",
        content=b"{}",
        headers={
            "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
            "tracestate": "congo=t61rcWkgMzE",
            "x-api-key": "client-header-secret",
            "Authorization": "Bearer client-authorization-secret",
        },
    )
    assert response.status_code == 200
    span = _one_span(exporter)
    context = span.get_span_context()
    assert span.kind is SpanKind.SERVER
    assert span.name == "POST iris"
    assert format(context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
    assert span.parent.is_remote
    assert span.resource.attributes["service.name"] == "gw-under-test"
    assert dict(span.attributes or {}) == {
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "gateway.route": "iris",
        "gateway.upstream": server.url,
        "gateway.upstream.status_code": 200,
        "gateway.attempts": 1,
        "gateway.caller": "anonymous",
    }
    assert span.status.status_code is StatusCode.UNSET

    # The upstream sees the gateway's span as the parent, once, with the client's tracestate kept.
    sent = _upstream_headers(response)
    assert [v for n, v in sent if n == "traceparent"] == [f"00-{TRACE_ID}-{context.span_id:016x}-01"]
    assert [v for n, v in sent if n == "tracestate"] == ["congo=t61rcWkgMzE"]

    exported = json.dumps(
        {
            "name": span.name,
            "attributes": dict(span.attributes or {}),
            "events": [e.name for e in span.events],
        }
    )
    for secret in (PRIMARY, "query-secret-value", "client-header-secret", "client-authorization-secret"):
        assert secret not in exported
    assert "/echo" not in exported and "token=" not in exported


def test_without_a_traceparent_the_span_starts_a_trace(traced: Any) -> None:
    gw, _, exporter = traced
    response = httpx.get(gw.url + "/iris/echo", headers={"traceparent": "00-not-a-valid-traceparent-01"})
    assert response.status_code == 200
    span = _one_span(exporter)
    assert span.parent is None
    context = span.get_span_context()
    (traceparent,) = [v for n, v in _upstream_headers(response) if n == "traceparent"]
    assert traceparent == f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    assert context.trace_flags.sampled


@pytest.mark.parametrize(
    ("path", "status", "code", "route"),
    [
        ("/down/score", 502, "upstream_unreachable", "down"),
        ("/nowhere", 404, "route_not_found", None),
    ],
)
def test_gateway_errors_become_the_span_status(
    traced: Any, path: str, status: int, code: str, route: str | None
) -> None:
    gw, _, exporter = traced
    response = httpx.post(gw.url + path, content=b"{}")
    assert response.status_code == status and response.json()["error"]["code"] == code
    span = _one_span(exporter)
    assert span.status.status_code is StatusCode.ERROR and span.status.description == code
    attributes = dict(span.attributes or {})
    assert attributes["error.type"] == code
    assert attributes["http.response.status_code"] == status
    assert attributes.get("gateway.route") == route
    if route == "down":
        assert attributes["gateway.upstream"] == "http://127.0.0.1:1"
        assert attributes["gateway.attempts"] == 1


def test_an_upstream_5xx_is_an_error_span(traced: Any) -> None:
    gw, _, exporter = traced
    assert httpx.get(gw.url + "/iris/status/500").status_code == 500
    span = _one_span(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "500"


def _config(otel: dict[str, Any]) -> Any:
    return parse_config(
        {
            "telemetry": {"otel": otel},
            "routes": {"a": {"path": "/a", "upstream": "http://127.0.0.1:1", "auth": {"type": "none"}}},
        },
        "test.yaml",
    )


def test_missing_packages_are_configuration_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ConfigError, match=r"test\.yaml: telemetry\.otel\.exporter: `otlp` needs the package"):
        GatewayApp(_config({"enabled": True, "exporter": "otlp"}), config_path="test.yaml")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(
        ConfigError, match=r"telemetry\.otel\.enabled: the OpenTelemetry SDK is not installed"
    ):
        GatewayApp(_config({"enabled": True}))
    GatewayApp(_config({"enabled": False, "exporter": "otlp"}))  # off: nothing is imported or checked


def test_otlp_endpoint_only_with_the_otlp_exporter() -> None:
    with pytest.raises(ConfigError, match="only used with `exporter: otlp`"):
        _config({"enabled": True, "otlp_endpoint": "http://collector:4318/v1/traces"})
    with pytest.raises(ConfigError, match="otlp_endpoint must be an absolute http"):
        _config({"enabled": True, "exporter": "otlp", "otlp_endpoint": "collector:4318"})


def test_disabled_tracing_never_imports_opentelemetry() -> None:
    """A gateway with tracing off serves a request carrying a traceparent without importing the SDK."""
    script = textwrap.dedent(
        """
        import socket, sys
        sys.path.insert(0, "tests")
        from servers import ServerThread
        from gateway.app import GatewayApp
        from gateway.config import parse_config

        config = parse_config({"routes": {"a": {"path": "/a", "upstream": "http://127.0.0.1:1",
                               "auth": {"type": "none"}, "retry": {"attempts": 1}}}})
        with ServerThread(GatewayApp(config)) as gateway:
            with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as conn:
                conn.sendall(b"GET /a/x HTTP/1.1\\r\\nHost: t\\r\\ntraceparent: 00-" + b"1" * 32 + b"-"
                             + b"2" * 16 + b"-01\\r\\nConnection: close\\r\\n\\r\\n")
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 502 "), answer
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_reload_keeps_the_running_tracing(traced: Any, caplog: pytest.LogCaptureFixture) -> None:
    gw, _, exporter = traced
    app: GatewayApp = gw.app
    tracing = app.tracing
    changed = app.config.model_copy(update={"telemetry": _config({"enabled": False}).telemetry})
    gw.call(app.reload(changed))
    assert app.tracing is tracing
    assert "telemetry settings changed: they take effect at the next restart" in caplog.text
    assert httpx.get(gw.url + "/iris/echo").status_code == 200
    assert _one_span(exporter).name == "GET iris"
