"""Forwarding through the real gateway under uvicorn to a real upstream, both on loopback."""

from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import PRIMARY, SECONDARY, key_route
from servers import KeptAlive, request_bytes

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


def _env_keys(monkeypatch: pytest.MonkeyPatch, primary: str = PRIMARY, secondary: str = SECONDARY) -> dict:
    monkeypatch.setenv("TEST_PRIMARY", primary)
    monkeypatch.setenv("TEST_SECONDARY", secondary)
    return {"primary": {"env": "TEST_PRIMARY"}, "secondary": {"env": "TEST_SECONDARY"}}


def _echo(response: httpx.Response) -> dict:
    return json.loads(response.json())


def test_forwards_path_query_headers_and_body(upstream, gateway_factory, monkeypatch):
    _app, server = upstream
    route = key_route(server.url + "/api", **_env_keys(monkeypatch))
    route["headers"] = {"azureml-model-deployment": "blue"}
    gw = gateway_factory({"routes": {"iris": route}})
    body = json.dumps({"data": [[0.1, 2.3, 4.1, 2.0], [0.2, 1.8, 3.9, 2.1]]})
    response = httpx.post(
        gw.url + "/iris/v1/echo?verbose=1&x=%20y",
        content=body,
        headers={
            "Content-Type": "application/json",
            "Authorization": "Bearer client-should-not-pass",
            "x-ms-client-request-id": "client-123",
            "X-Custom": "kept",
            "azureml-model-deployment": "green",
        },
    )
    assert response.status_code == 200
    seen = _echo(response)
    headers = dict(seen["headers"])
    assert seen["method"] == "POST"
    assert seen["raw_path"] == "/api/v1/echo"
    assert seen["query"] == "verbose=1&x=%20y"
    assert seen["body"] == body
    assert headers["authorization"] == f"Bearer {PRIMARY}"
    assert headers["host"] == server.url.removeprefix("http://")
    assert headers["x-ms-client-request-id"] == "client-123"
    assert headers["x-custom"] == "kept"
    assert headers["azureml-model-deployment"] == "blue"  # the route's header wins
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == gw.url.removeprefix("http://")
    assert headers["x-request-id"] == response.headers["x-request-id"]
    assert len(response.headers["x-request-id"]) >= 16
    assert response.headers["x-upstream"] == "1"


def test_x_forwarded_for_from_the_client_is_extended_not_replaced(upstream, gateway_factory, monkeypatch):
    """A client behind another proxy sends its chain; the gateway appends the address it saw (what
    proxies do: the upstream keeps the whole path a request took)."""
    _, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    response = httpx.post(
        gw.url + "/iris/echo", content=b"{}", headers={"X-Forwarded-For": "10.1.2.3, 10.0.0.9"}
    )
    assert response.status_code == 200
    assert dict(_echo(response)["headers"])["x-forwarded-for"] == "10.1.2.3, 10.0.0.9, 127.0.0.1"


def test_request_id_is_passed_on_and_returned(upstream, gateway_factory, monkeypatch):
    _, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    response = httpx.post(gw.url + "/iris/echo", content=b"{}", headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert dict(_echo(response)["headers"])["x-request-id"] == "abc-123"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_all_methods(upstream, gateway_factory, monkeypatch, method):
    _, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    response = httpx.request(method, gw.url + "/iris/echo", content=b"x" if method != "GET" else None)
    assert response.status_code == 200
    assert _echo(response)["method"] == method


def test_body_passes_byte_for_byte_even_compressed(upstream, gateway_factory, monkeypatch):
    _, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    with httpx.Client() as client:
        request = client.build_request("GET", gw.url + "/iris/gzip", headers={"Accept-Encoding": "identity"})
        response = client.send(request, stream=True)
        raw = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip"
    assert gzip.decompress(raw) == b'"[\\"setosa\\"]"'
    # Azure ML's JSON-string-holding-JSON is not re-encoded.
    plain = httpx.post(gw.url + "/iris/score", content=b"{}")
    assert plain.content.startswith(b'"{')


def test_hop_by_hop_headers_dropped_both_ways(upstream, gateway_factory, monkeypatch):
    _app, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    response = httpx.get(
        gw.url + "/iris/echo",
        headers={
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "TE": "trailers",
            "Upgrade": "h2c",
            "Proxy-Authorization": "Basic Zm9v",
        },
    )
    sent = {name for name, _ in _echo(response)["headers"]}
    assert not sent & {"x-drop-me", "te", "upgrade", "proxy-authorization"}
    response = httpx.get(gw.url + "/iris/hop")
    assert "x-secret-hop" not in response.headers
    assert "keep-alive" not in response.headers
    assert response.headers["x-end-to-end"] == "kept"


def test_streams_first_bytes_before_upstream_finishes(upstream, gateway_factory, monkeypatch):
    app, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    with httpx.stream("GET", gw.url + "/iris/chunks", timeout=10) as response:
        chunks = response.iter_raw()
        first = next(chunks)
        assert first == b"first;"  # arrived while the upstream still waits for `release`
        assert server.loop is not None
        server.loop.call_soon_threadsafe(app.release.set)
        rest = b"".join(chunks)
    assert rest == b"second"


def test_large_request_body_is_streamed_not_buffered(upstream, gateway_factory, monkeypatch):
    _app, server = upstream
    route = key_route(server.url, **_env_keys(monkeypatch))
    route["replay_buffer_bytes"] = 1024
    gw = gateway_factory({"routes": {"iris": route}})

    def body():
        for _ in range(64):
            yield b"x" * 16384

    response = httpx.post(gw.url + "/iris/echo", content=body())
    assert response.status_code == 200
    assert _echo(response)["body_length"] == 64 * 16384


def _access_line(caplog: pytest.LogCaptureFixture, request_id: str) -> str:
    """The access line of `request_id`, once written (after the answer is out and the request ended)."""
    deadline = time.monotonic() + 20
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
        found = [line for line in lines if line.startswith(f"{request_id} ")]
        if found:
            (line,) = found
            return line
        assert time.monotonic() < deadline, f"no access line for {request_id}: {lines}"
        time.sleep(0.01)


@pytest.mark.parametrize("framing", ["content-length", "chunked", "whole"])
def test_bytes_in_counts_a_streamed_request_body(upstream, gateway_factory, monkeypatch, caplog, framing):
    """A body over the route's replay buffer is streamed to the upstream as it is read: the access line's
    bytes_in counts every body byte read from the client, as it does for a body kept whole."""
    _app, server = upstream
    route = key_route(server.url, **_env_keys(monkeypatch))
    route["replay_buffer_bytes"] = 1024
    gw = gateway_factory({"routes": {"iris": route}})
    caplog.set_level(logging.INFO, logger="gateway.access")
    size = 3 * 1024 * 1024 if framing != "whole" else 1000

    def pieces():
        for _ in range(size // 16384):
            yield b"x" * 16384

    content = pieces() if framing == "chunked" else b"x" * size
    request_id = f"bytes-in-{framing}"
    response = httpx.post(gw.url + "/iris/echo", content=content, headers={"x-request-id": request_id})
    assert response.status_code == 200
    assert _echo(response)["body_length"] == size
    line = _access_line(caplog, request_id)
    assert f" bytes_in={size} bytes_out={len(response.content)}" in line, line


def test_body_too_large(upstream, gateway_factory, monkeypatch):
    app, server = upstream
    route = key_route(server.url, **_env_keys(monkeypatch))
    route["max_body_bytes"] = 1000
    gw = gateway_factory({"routes": {"iris": route}})
    response = httpx.post(gw.url + "/iris/echo", content=b"x" * 1001)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"

    def chunked():
        for _ in range(10):
            yield b"y" * 200

    response = httpx.post(gw.url + "/iris/echo", content=chunked())
    assert response.status_code == 413
    assert app.seen("/echo") == 0


def test_route_not_found_and_segment_boundary(upstream, gateway_factory, monkeypatch):
    _, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    for path in ("/irises", "/other", "/"):
        response = httpx.get(gw.url + path)
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["code"] == "route_not_found"
        assert error["request_id"] == response.headers["x-request-id"]
    assert httpx.get(gw.url + "/iris").status_code == 200


def test_failover_to_secondary_and_stays(upstream, gateway_factory, monkeypatch, caplog):
    app, server = upstream
    app.accepted_keys = {SECONDARY}
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    response = httpx.post(gw.url + "/iris/echo", content=b'{"data": []}')
    assert response.status_code == 200
    assert dict(_echo(response)["headers"])["authorization"] == f"Bearer {SECONDARY}"
    before = len(app.requests)
    for _ in range(3):
        assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 200
    assert len(app.requests) == before + 3  # the secondary is now active: no more double sends
    ready = httpx.get(gw.url + "/readyz").json()["routes"][0]
    assert ready["active_slot"] == "secondary"
    switches = [r for r in caplog.records if "switched to the secondary key" in r.getMessage()]
    assert len(switches) == 1
    assert all(PRIMARY not in r.getMessage() and SECONDARY not in r.getMessage() for r in caplog.records)


def test_both_keys_rejected_passes_upstream_answer_and_turns_unready(upstream, gateway_factory, monkeypatch):
    app, server = upstream
    app.accepted_keys = {"something-else-entirely"}
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    response = httpx.post(gw.url + "/iris/echo", content=b"{}")
    assert response.status_code == 401
    assert response.json() == {"message": "Unauthorized"}
    # One refused request could be the client's doing: declared only after `reject_after` (3) requests.
    assert httpx.get(gw.url + "/readyz").status_code == 200
    for _ in range(2):
        assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 401
    ready = httpx.get(gw.url + "/readyz")
    assert ready.status_code == 503
    assert ready.json()["routes"][0]["state"] == "rejected"
    assert PRIMARY not in ready.text and SECONDARY not in ready.text


def test_rotated_key_file_is_used_without_restart(upstream, gateway_factory, tmp_path: Path):
    app, server = upstream
    key_file = tmp_path / "primary"
    key_file.write_text(PRIMARY + "\n")
    app.accepted_keys = {PRIMARY}
    gw = gateway_factory(
        {"routes": {"iris": key_route(server.url, primary={"file": str(key_file)}, recheck_after_s=600)}}
    )
    assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 200
    rotated = "rotated-key-abcdefghijklmnop"
    app.accepted_keys = {rotated}
    assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 401  # not rotated yet
    # Kubernetes style: write a new file and swap it in with a rename.
    new = tmp_path / "primary.new"
    new.write_text(rotated + "\n")
    new.replace(key_file)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        response = httpx.post(gw.url + "/iris/echo", content=b"{}")
        if response.status_code == 200:
            break
        time.sleep(0.2)
    assert response.status_code == 200
    assert dict(_echo(response)["headers"])["authorization"] == f"Bearer {rotated}"
    assert httpx.get(gw.url + "/readyz").status_code == 200


def test_upstream_unreachable(gateway_factory, monkeypatch):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now
    gw = gateway_factory(
        {"routes": {"iris": key_route(f"http://127.0.0.1:{port}", **_env_keys(monkeypatch))}}
    )
    response = httpx.post(gw.url + "/iris/score", content=b"{}")
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"


def test_upstream_timeout(upstream, gateway_factory, monkeypatch):
    _, server = upstream
    route = key_route(server.url, **_env_keys(monkeypatch))
    route["timeout_s"] = 0.5
    route["retry"] = {"attempts": 1}
    gw = gateway_factory({"routes": {"iris": route}})
    response = httpx.get(gw.url + "/iris/hang", timeout=10)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


def test_retries_503_for_replayable_bodies(upstream, gateway_factory, monkeypatch):
    app, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    httpx.get(gw.url + "/iris/echo")  # fills the retry budget's request count
    app.fail_next = [503]
    response = httpx.post(gw.url + "/iris/echo", content=b'{"data": []}')
    assert response.status_code == 200
    assert app.seen("/echo") == 3


def test_upstream_reset_mid_response_closes_client_connection(upstream, gateway_factory, monkeypatch):
    _, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    with pytest.raises(httpx.HTTPError):
        httpx.get(gw.url + "/iris/reset", timeout=5).read()
    assert httpx.get(gw.url + "/healthz").status_code == 200


def test_load_shedding_answers_route_busy(upstream, gateway_factory, monkeypatch):
    app, server = upstream
    route = key_route(server.url, **_env_keys(monkeypatch))
    route.update(limits={"max_concurrent": 1, "queue": 1, "queue_timeout_s": 0.2})
    gw = gateway_factory({"routes": {"iris": route}})
    holder = threading.Thread(target=lambda: httpx.get(gw.url + "/iris/chunks", timeout=10).read())
    holder.start()
    deadline = time.monotonic() + 5
    while app.seen("/chunks") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    response = httpx.get(gw.url + "/iris/echo")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "route_busy"
    assert response.headers["retry-after"] == "1"
    assert app.seen("/echo") == 0
    assert server.loop is not None
    server.loop.call_soon_threadsafe(app.release.set)
    holder.join(10)
    assert httpx.get(gw.url + "/iris/echo").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/iris/../admin",
        "/iris/%2e%2e/x",
        "/iris/%2E%2E/admin",
        # Upper case and double-encoded: `%2E` only once the upstream decodes it, `..` twice.
        "/iris/%252E%252E/admin",
        "/iris/a%2fb",
        "/iris/a%5cb",
        "/iris/a%00b",
        "/iris/.",
        "/iris/a\\b",
    ],
)
def test_paths_that_leave_their_route_are_refused(upstream, gateway_factory, monkeypatch, path):
    app, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0]
    assert b" 400 " in status_line, answer
    assert b"bad_request_path" in answer
    assert len(app.requests) == 0


def test_headers_too_large(upstream, gateway_factory, monkeypatch):
    _, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    headers = {f"x-h{i}": "v" for i in range(150)}
    response = httpx.get(gw.url + "/iris/echo", headers=headers)
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "headers_too_large"


def test_inbound_api_key(upstream, gateway_factory, monkeypatch):
    import hashlib

    _, server = upstream
    digest = hashlib.sha256(b"client-key-123456").hexdigest()
    gw = gateway_factory(
        {
            "inbound": {"api_keys": [{"name": "app", "sha256": digest}]},
            "routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))},
        }
    )
    assert httpx.get(gw.url + "/iris/echo").status_code == 401
    assert httpx.get(gw.url + "/iris/echo", headers={"x-gateway-key": "wrong"}).json()["error"]["code"] == (
        "client_unauthenticated"
    )
    response = httpx.get(gw.url + "/iris/echo", headers={"x-gateway-key": "client-key-123456"})
    assert response.status_code == 200
    assert "x-gateway-key" not in dict(_echo(response)["headers"])
    assert httpx.get(gw.url + "/healthz").status_code == 200


def test_inbound_cidr(upstream, gateway_factory, monkeypatch):
    _, server = upstream
    gw = gateway_factory(
        {
            "inbound": {"allow_cidrs": ["10.0.0.0/8"]},
            "routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))},
        }
    )
    response = httpx.get(gw.url + "/iris/echo")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "client_not_allowed"


def test_open_route_drops_client_authorization(upstream, gateway_factory):
    app, server = upstream
    app.accepted_keys = None
    gw = gateway_factory(
        {"routes": {"open": {"path": "/open", "upstream": server.url, "auth": {"type": "none"}}}}
    )
    response = httpx.get(gw.url + "/open/echo", headers={"Authorization": "Bearer client"})
    assert "authorization" not in dict(_echo(response)["headers"])


def test_stalled_request_body_gets_408(upstream, gateway_factory, monkeypatch):
    app, server = upstream
    gw = gateway_factory(
        {
            "server": {"client_body_timeout_s": 0.5},
            "routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))},
        }
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"POST /iris/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        answer = sock.recv(65536)
    assert b" 408 " in answer.split(b"\r\n", 1)[0]
    assert b"client_timeout" in answer
    assert app.seen("/echo") == 0


def test_a_keep_alive_connection_is_served_by_one_task_that_ends_with_it(
    upstream, gateway_factory, monkeypatch
):
    """Proxied requests of one connection share one task (a task per request cost a fifth of the gateway's
    own work per request); it ends when the connection does, so a shutdown does not wait for it, and
    every connection gets its own."""
    _app, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})

    async def serving() -> set:
        return {task for task in gw.server.server_state.tasks if task.get_name() == "gateway-request"}

    request = request_bytes("/iris/echo")
    seen: list[set] = []
    connection = KeptAlive(gw.port)
    try:
        for _ in range(3):
            connection.send(request)
            assert connection.answer().status == 200
            seen.append(gw.call(serving()))
        connection.send(request * 2)  # pipelined: the second is handed over while the first finishes
        assert [connection.answer().status for _ in range(2)] == [200, 200]
        seen.append(gw.call(serving()))
    finally:
        connection.close()
    assert len(seen[0]) == 1 and all(tasks == seen[0] for tasks in seen), seen
    deadline = time.monotonic() + 5
    while gw.call(serving()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not gw.call(serving()), "the connection closed, and its task still waits for a request"
    connection = KeptAlive(gw.port)
    try:
        assert connection.post("/iris/echo", {}).status == 200
        assert gw.call(serving()).isdisjoint(seen[0])
    finally:
        connection.close()


def test_a_request_handed_to_a_connection_task_that_then_fails_is_still_answered(
    upstream, gateway_factory, monkeypatch, caplog
):
    """Two pipelined requests: the second is handed to the connection's task while it still finishes the
    first. If that task then fails (a bug outside `Proxy.serve`'s own error handling, planted here), the
    second is served by a new task instead of waiting forever; the failure is logged as one."""
    _app, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    app = gw.app
    serve = app.serve_exchange

    async def failing_after(exchange):
        await serve(exchange)
        if exchange.path == "/iris/explode":
            raise RuntimeError("planted after the answer")

    monkeypatch.setattr(app, "serve_exchange", failing_after)
    caplog.set_level(logging.ERROR, logger="gateway.server")
    connection = KeptAlive(gw.port)
    try:
        connection.send(request_bytes("/iris/explode") + request_bytes("/iris/echo"))
        assert [connection.answer().status for _ in range(2)] == [200, 200]
    finally:
        connection.close()
    assert any(
        # The traceback: as the record came, or as the gateway's redacting filter left it (its summary)
        r.getMessage() == "the task serving a client connection failed" and (r.exc_info or r.exc_text)
        for r in caplog.records
    )


def test_upstream_connection_pool_is_bounded_and_reused(upstream, gateway_factory, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    _app, server = upstream
    route = key_route(server.url, **_env_keys(monkeypatch))
    route["max_connections"] = 2
    gw = gateway_factory({"routes": {"iris": route}})

    def call(_: int) -> int:
        return httpx.post(gw.url + "/iris/echo", content=b"{}", timeout=10).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(call, range(64)))
    assert statuses == [200] * 64
    assert len(server.server.server_state.connections) <= 2


def test_trace_context_reaches_the_upstream_unchanged_when_tracing_is_off(
    upstream, gateway_factory, monkeypatch
):
    _, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    tracestate = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    response = httpx.post(
        gw.url + "/iris/echo", content=b"{}", headers={"traceparent": traceparent, "tracestate": tracestate}
    )
    assert response.status_code == 200
    sent = _echo(response)["headers"]
    assert [v for n, v in sent if n == "traceparent"] == [traceparent]
    assert [v for n, v in sent if n == "tracestate"] == [tracestate]


def test_head_and_no_content_answers(upstream, gateway_factory, monkeypatch):
    _, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))}})
    with httpx.Client() as client:
        for _ in range(3):  # a HEAD answer must not leave the pooled connection out of step
            head = client.head(gw.url + "/iris/echo")
            assert head.status_code == 200
            assert head.content == b""
            assert int(head.headers["content-length"]) > 0
            assert client.get(gw.url + "/iris/status/204").status_code == 204
            not_modified = client.get(gw.url + "/iris/status/304")
            assert not_modified.status_code == 304 and not_modified.content == b""
            assert client.post(gw.url + "/iris/echo", content=b"{}").status_code == 200


def test_not_modified_with_content_length_from_a_raw_upstream(gateway_factory, caplog):
    """A 304 may carry the Content-Length of the representation (RFC 9110 8.6) but no body."""
    import asyncio

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b'HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: "v1"\r\n\r\n')
            await writer.drain()

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        gw = gateway_factory(
            {
                "routes": {
                    "open": {
                        "path": "/open",
                        "upstream": f"http://127.0.0.1:{port}",
                        "auth": {"type": "none"},
                    }
                }
            }
        )
        with httpx.Client() as client:
            for _ in range(3):
                response = client.get(gw.url + "/open/x", headers={"If-None-Match": '"v1"'}, timeout=5)
                assert response.status_code == 304
                assert response.headers["etag"] == '"v1"'
        # Without care the ASGI server waits for 1234 body bytes and fails the exchange.
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def _raw_exchange(port: int, head: bytes, *, wait_for: bytes = b"\r\n\r\n", body: bytes = b"") -> bytes:
    """Send `head` on a raw socket and read until `wait_for` arrived (or 10 s); with `body`, then send it
    and read on until the next answer's head is complete."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while wait_for not in answer:
            data = sock.recv(65536)
            if not data:
                return answer
            answer += data
        if body:
            sock.sendall(body)
            seen = answer.index(wait_for) + len(wait_for)
            while answer.count(b"\r\n\r\n", seen) < 2:  # the 100's blank line, then the answer's
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        return answer


def test_header_values_lose_trailing_whitespace_as_rfc_9110_says(upstream, gateway_factory, monkeypatch):
    """llhttp keeps a header value's trailing spaces and tabs (optional whitespace, not part of the
    value): an API key or `Expect: 100-continue` followed by a space must work as without it."""
    import hashlib

    _, server = upstream
    gw = gateway_factory(
        {
            "inbound": {
                "api_keys": [{"name": "app", "sha256": hashlib.sha256(b"client-key-123456").hexdigest()}]
            },
            "routes": {"iris": key_route(server.url, **_env_keys(monkeypatch))},
        }
    )
    answer = _raw_exchange(
        gw.port, b"GET /iris/echo HTTP/1.1\r\nHost: x\r\nx-gateway-key: client-key-123456 \t\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]

    # The client waits for 100 Continue before it sends its body (up to the socket's 10 s timeout).
    answer = _raw_exchange(
        gw.port,
        b"POST /iris/echo HTTP/1.1\r\nHost: x\r\nx-gateway-key: client-key-123456\r\n"
        b"Expect: 100-continue \r\nContent-Length: 2\r\n\r\n",
        wait_for=b"100 Continue",
        body=b"{}",
    )
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n"), answer[:300]
    assert b"HTTP/1.1 200" in answer, answer[:500]
