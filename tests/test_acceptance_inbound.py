"""Acceptance run on inbound hardening (issue 10), as the attacker outside the repository tries it:
raw sockets against a real `gateway serve` process, counting what reached the upstream and what each
client got."""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import ServerThread, free_socket, gateway_process
from test_inbound_attacks import Gateway, _error_code, _read_all, _responses
from test_inbound_lifecycle import RawUpstream, _access_lines, _config, _raw_client, _wait
from test_inbound_tls import Ca, _free_port, _request, _stop, _tls_client, _wait_listening
from test_inbound_tls import _serve as _serve_tls
from upstream import Upstream

from gateway.server_protocol import LINGER_S, MAX_PIPELINED

MAX_CONNECTIONS = 20
MIB = 1024 * 1024


@contextlib.contextmanager
def _serve(tmp: Path, server: dict[str, Any], route: dict[str, Any] | None = None) -> Iterator[Gateway]:
    upstream = Upstream(accepted_keys=None)
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    with ServerThread(upstream, lifespan="off") as up:
        config = {
            "server": {"host": "127.0.0.1", "port": port, "log_format": "text", **server},
            "routes": {
                "iris": {
                    "path": "/iris",
                    "upstream": up.url + "/api",
                    "auth": {"type": "none"},
                    **(route or {}),
                }
            },
        }
        with gateway_process(config, tmp) as (process, log_path):
            yield Gateway(process, port, upstream, log_path, up)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with _serve(
        tmp_path_factory.mktemp("acceptance-limited"),
        {"max_connections": MAX_CONNECTIONS, "header_timeout_s": 3.0},
    ) as gw:
        yield gw


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream()
    yield upstream
    upstream.stop()


def _open_fds(gw: Gateway) -> int:
    return len(list(Path(f"/proc/{gw.process.pid}/fd").iterdir()))


def test_connections_over_max_connections_get_json_503_and_are_closed_at_once(limited):
    baseline = _open_fds(limited)
    idle = [socket.create_connection(("127.0.0.1", limited.port), timeout=5) for _ in range(200)]
    try:
        # Connections beyond the limit get a JSON 503 and are closed (after LINGER_S at most, if the
        # client does not close first): the gateway's descriptors stay bounded.
        ((status, headers, body),) = _responses(_read_all(idle[-1], LINGER_S + 2))
        assert status == 503 and _error_code(body) == "overloaded"
        # The refused ones are closed within LINGER_S: wait for the count to come down (generous
        # timeout: a loaded machine is slow to close 180 sockets), not for a fixed time.
        deadline = time.monotonic() + LINGER_S + 20
        while _open_fds(limited) >= baseline + MAX_CONNECTIONS + 10:
            assert time.monotonic() < deadline, f"{_open_fds(limited)} descriptors open, {baseline} before"
            time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", limited.port), timeout=5) as sock:
            sock.sendall(b"GET /iris/echo HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = _read_all(sock, 3.0)
        ((status, headers, body),) = _responses(answer)
        assert status == 503 and headers["content-type"] == "application/json", answer
        assert _error_code(body) == "overloaded"
        assert headers["connection"] == "close" and headers["retry-after"] and headers["x-request-id"]
    finally:
        for sock in idle:
            sock.close()
    # Once the gateway has seen the closes, connections are served again (positive evidence, polled).
    deadline = time.monotonic() + 20
    while httpx.get(limited.url + "/healthz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not serve again after the clients closed"
        time.sleep(0.1)
    assert limited.upstream_paths() == []


def test_a_client_hanging_up_with_a_pipelined_request_cancels_the_running_one(
    raw_upstream: RawUpstream,
    gateway_factory: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvicorn marks only the last request parsed as disconnected; the one running is the first."""
    caplog.set_level(logging.INFO, logger="gateway")
    server = gateway_factory(_config(raw_upstream.url, limits={"max_concurrent": 1}))
    client = _raw_client(
        server.port,
        b"GET /big/slow HTTP/1.1\r\nHost: gw\r\nx-request-id: gone-p\r\n\r\n"
        b"GET /big/ok HTTP/1.1\r\nHost: gw\r\nx-request-id: queued-p\r\n\r\n",
    )
    _wait(lambda: raw_upstream.count(raw_upstream.started, "/slow") == 1, 10, "the upstream has it")
    client.close()
    _wait(lambda: raw_upstream.count(raw_upstream.closed, "/slow") == 1, 10, "the upstream sees EOF")
    assert httpx.get(server.url + "/big/ok", timeout=10).status_code == 200  # the slot is free
    _wait(lambda: any("gone-p" in line for line in _access_lines(caplog)), 10, "the access line")
    (line,) = [line for line in _access_lines(caplog) if "gone-p" in line]
    assert "error=client_disconnected" in line and "status=499" in line
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "no internal error"
    assert raw_upstream.count(raw_upstream.started, "/ok") == 1  # only the request sent after


def test_tls_connections_that_never_finish_the_handshake_are_closed_after_header_timeout(
    upstream: Any, tmp_path: Path
) -> None:
    _, upstream_server = upstream
    ca = Ca("acceptance server CA")
    cert, key = ca.issue("localhost", server=True)
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(cert)
    key_file.write_bytes(key)
    port = _free_port()
    tls = {"cert": {"file": str(cert_file)}, "key": {"file": str(key_file)}}
    server = {"host": "127.0.0.1", "port": port, "tls": tls, "header_timeout_s": 1.0}
    process = _serve_tls(tmp_path, upstream_server.url, server)
    client = _tls_client(ca, tmp_path)

    def connect() -> ssl.SSLSocket:
        return client.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost"
        )

    silent: list[socket.socket] = []
    try:
        _wait_listening(connect, process)
        silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        silent[0].sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, never finished
        started = time.monotonic()
        answers = [_read_all(sock, 8.0) for sock in silent]
        assert time.monotonic() - started < 8.0, "the handshakes were not timed"
        assert all(answer in (b"<EOF>", b"") for answer in answers), answers
        with connect() as sock:  # the listener still serves
            assert _request(sock, "/healthz").startswith(b"HTTP/1.1 200")
    finally:
        for sock in silent:
            sock.close()
        _stop(process)


@pytest.fixture(scope="module")
def slow_route(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with _serve(tmp_path_factory.mktemp("acceptance-slow"), {}, {"timeout_s": 2.0}) as gw:
        yield gw


def test_pipelined_requests_behind_a_slow_one_keep_memory_bounded(slow_route):
    """Every request parsed from one socket read is queued; thousands of tiny pipelined requests behind
    a slow one cost tens of MiB per connection unless the queue is bounded."""
    tiny = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    base = slow_route.rss_bytes()
    clients = []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", slow_route.port), timeout=10)
            sock.sendall(b"GET /iris/hang HTTP/1.1\r\nHost: x\r\n\r\n" + tiny * 60_000)  # 2 MiB
            clients.append(sock)
        time.sleep(0.5)
        growth = slow_route.rss_bytes() - base
        assert growth < 20 * MIB, f"RSS grew by {growth / MIB:.1f} MiB"
        # What was queued is answered in order after the slow one (504 from the route's timeout), then
        # the connection closes with a JSON 503.
        responses = _responses(_read_all(clients[0], 10.0))
        statuses = [r[0] for r in responses]
        assert statuses[0] == 504 and set(statuses[1:-1]) == {200} and statuses[-1] == 503, statuses[:5]
        # Every request the queue took is answered: the refusal is the next one's, not the last queued.
        assert len(statuses) == 1 + MAX_PIPELINED + 1, statuses
        assert _error_code(responses[-1][2]) == "overloaded"
        assert responses[-1][1]["connection"] == "close"
    finally:
        for sock in clients:
            sock.close()


def test_a_transfer_coding_other_than_chunked_is_refused_not_dropped(slow_route):
    """`Transfer-Encoding: gzip, chunked`: the parser decodes the chunks and forgets the gzip; the
    upstream would get a compressed body presented as plain JSON."""
    body = gzip.compress(b'{"data": [[1, 2, 3, 4]]}')
    with socket.create_connection(("127.0.0.1", slow_route.port), timeout=10) as sock:
        sock.sendall(
            b"POST /iris/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            + b"%x\r\n" % len(body)
            + body
            + b"\r\n0\r\n\r\n"
        )
        answer = _read_all(sock, 5.0)
    ((status, headers, body),) = _responses(answer)
    assert status == 400 and _error_code(body) == "malformed_request", answer[:300]
    assert headers["connection"] == "close"
    assert "/api/echo" not in slow_route.upstream_paths()


def test_a_refused_websocket_handshake_carries_a_request_id(slow_route):
    with socket.create_connection(("127.0.0.1", slow_route.port), timeout=10) as sock:
        sock.sendall(
            b"GET /iris/x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        answer = _read_all(sock, 5.0)
    ((status, headers, body),) = _responses(answer)
    assert status == 400 and headers["content-type"] == "application/json"
    request_id = json.loads(body)["error"]["request_id"]
    assert request_id and headers["x-request-id"] == request_id


@pytest.mark.parametrize(
    "head",
    [
        b"GET /iris/x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",
        b"POST /iris/x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Content-Length: 38\r\n\r\n"
        b"GET /iris/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["no-key", "post-with-body"],
)
def test_a_broken_websocket_handshake_gets_the_gateways_json_400(slow_route, head):
    """The WebSocket library answered a bad handshake with its own text/plain 400, and held a POST one
    open without an answer."""
    with socket.create_connection(("127.0.0.1", slow_route.port), timeout=10) as sock:
        sock.sendall(head)
        answer = _read_all(sock, 5.0)
    ((status, headers, body),) = _responses(answer)
    assert status == 400 and headers["content-type"] == "application/json", answer[:300]
    assert _error_code(body) and headers["connection"] == "close" and answer.endswith(b"<EOF>")
    assert "/api/smuggled" not in slow_route.upstream_paths()


def test_two_host_headers_are_refused(slow_route):
    """RFC 9112 3.2: a request with more than one Host is answered 400; forwarded, the upstream saw
    the last one as X-Forwarded-Host while anything reading the first saw another host."""
    with socket.create_connection(("127.0.0.1", slow_route.port), timeout=10) as sock:
        sock.sendall(b"GET /iris/two-hosts HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n")
        answer = _read_all(sock, 5.0)
    ((status, headers, body),) = _responses(answer)
    assert status == 400 and _error_code(body) == "malformed_request", answer[:300]
    assert headers["connection"] == "close"
    assert "/api/two-hosts" not in slow_route.upstream_paths()
