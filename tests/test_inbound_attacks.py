"""Inbound hardening, as an attacker tries it: raw sockets against a real `gateway serve` process.

Limits hold while the bytes arrive (memory stays bounded whatever a client streams), a connection that
never completes its request head is closed after `server.header_timeout_s`, requests that would
desynchronise the parser (Upgrade, CONNECT, trailers, 100-continue, pipelining) are refused or kept
apart, and client-controlled values cannot forge fields in the text access log.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from servers import ServerThread, free_socket, gateway_process
from upstream import Upstream

HEADER_TIMEOUT_S = 1.0
MAX_BODY_BYTES = 4096
MIB = 1024 * 1024


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    port: int
    upstream: Upstream
    log_path: Path
    upstream_server: ServerThread

    def release_chunks(self) -> None:
        """Let the upstream's `/chunks` answer, held after its first chunk, finish."""
        loop = self.upstream_server.loop
        assert loop is not None
        loop.call_soon_threadsafe(self.upstream.release.set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def upstream_paths(self) -> list[str]:
        with self.upstream.lock:
            return [r["path"] for r in self.upstream.requests]

    def clear(self) -> None:
        with self.upstream.lock:
            self.upstream.requests.clear()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("inbound-attacks")
    upstream = Upstream(accepted_keys=None)
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    with ServerThread(upstream, lifespan="off") as up:
        config = {
            "server": {
                "host": "127.0.0.1",
                "port": port,
                "log_format": "text",
                "header_timeout_s": HEADER_TIMEOUT_S,
                "client_body_timeout_s": 1.0,
                "body_timeout_s": 2.0,
                "max_body_bytes": MAX_BODY_BYTES,
            },
            "routes": {"iris": {"path": "/iris", "upstream": up.url + "/api", "auth": {"type": "none"}}},
        }
        with gateway_process(config, tmp) as (process, log_path):
            yield Gateway(process, port, upstream, log_path, up)


def _connect(gw: Gateway, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)


def _read_all(sock: socket.socket, limit_s: float = 5.0) -> bytes:
    """Everything the gateway sends until it closes the connection (or `limit_s` passes)."""
    data = b""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            return data + b"<EOF>"
        data += chunk
    return data


def _responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of Content-Length framed HTTP/1.1 answers."""
    out = []
    rest = data.removesuffix(b"<EOF>")
    while rest.startswith(b"HTTP/1.1 "):
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode("latin-1")
        length = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:length]))
        rest = rest[length:]
    return out


def _error_code(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert error["message"]
    return str(error["code"])


def _healthz_latency(gw: Gateway) -> float:
    started = time.monotonic()
    assert httpx.get(gw.url + "/healthz", timeout=10).status_code == 200
    return time.monotonic() - started


def _stream_head(gw: Gateway, first: bytes, filler: bytes, total: int) -> tuple[bytes, int, int]:
    """Send `first`, then `filler` again and again (up to `total` bytes) until the gateway answers or
    closes. Returns (answer, bytes sent, the gateway's highest RSS growth seen)."""
    base = gw.rss_bytes()
    growth = 0
    sent = 0
    next_check = 0
    answer = b""
    with _connect(gw) as sock:
        sock.sendall(first)
        sock.setblocking(False)
        while sent < total:
            try:
                sent += sock.send(filler)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                chunk = sock.recv(65536)
                answer += chunk
                if not chunk or answer.count(b"\r\n\r\n"):
                    break
            except BlockingIOError:
                pass
            except ConnectionResetError:
                break
            if sent >= next_check:
                next_check += 4 * MIB
                growth = max(growth, gw.rss_bytes() - base)
                if growth > 30 * MIB:
                    break  # the unchanged gateway would grow to gigabytes: no need to watch it
        growth = max(growth, gw.rss_bytes() - base)
        if not answer.count(b"\r\n\r\n"):
            sock.setblocking(True)
            answer += _read_all(sock, 3.0)
    return answer, sent, growth


# ---------------------------------------------------------------------------------------------------- 1


def test_200_mib_of_header_lines_keep_memory_bounded(gateway):
    filler = b"".join(b"x-filler-%05d: %s\r\n" % (i, b"v" * 40) for i in range(1000))
    answer, sent, growth = _stream_head(gateway, b"GET /iris/echo HTTP/1.1\r\nHost: x\r\n", filler, 200 * MIB)
    assert growth < 30 * MIB, f"RSS grew by {growth / MIB:.1f} MiB after {sent / MIB:.1f} MiB of headers"
    ((status, headers, body),) = _responses(answer)
    assert status == 431 and _error_code(body) == "headers_too_large"
    assert headers["connection"] == "close"
    assert sent < 50 * MIB, "the gateway kept reading long after the limit"
    assert gateway.upstream_paths() == []


def test_endless_header_value_gets_431_at_once_and_healthz_stays_fast(gateway):
    results: dict[str, tuple[bytes, int, int]] = {}
    thread = threading.Thread(
        target=lambda: results.setdefault(
            "r", _stream_head(gateway, b"GET /iris/echo HTTP/1.1\r\nx-endless: ", b"v" * 65536, 200 * MIB)
        )
    )
    thread.start()
    latencies = [_healthz_latency(gateway) for _ in range(5)]
    thread.join(60)
    answer, sent, growth = results["r"]
    assert growth < 30 * MIB, f"RSS grew by {growth / MIB:.1f} MiB after {sent / MIB:.1f} MiB"
    ((status, headers, body),) = _responses(answer)
    assert status == 431 and _error_code(body) == "headers_too_large"
    assert headers["connection"] == "close"
    assert max(latencies) < 2.0, latencies  # generous: the machine is shared


def test_endless_url_gets_414_at_once(gateway):
    answer, sent, growth = _stream_head(gateway, b"GET /iris/", b"a" * 65536, 200 * MIB)
    assert growth < 30 * MIB, f"RSS grew by {growth / MIB:.1f} MiB after {sent / MIB:.1f} MiB"
    ((status, headers, body),) = _responses(answer)
    assert status == 414 and _error_code(body) == "url_too_long"
    assert headers["connection"] == "close"
    assert _healthz_latency(gateway) < 2.0
    assert gateway.upstream_paths() == []
    # Refused before any route: no access line, but operators can count attacks by code.
    metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
    assert 'gateway_inbound_refusals_total{code="url_too_long"} 1.0' in metrics


def test_endless_trailer_and_chunk_extension_are_refused(gateway):
    head = b"POST /iris/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer, sent, growth = _stream_head(gateway, head + b"1;ext=", b"e" * 65536, 200 * MIB)
    assert growth < 30 * MIB and sent < 50 * MIB
    ((status, _, body),) = _responses(answer)
    assert status == 400 and _error_code(body) == "chunk_extension_too_long"

    answer, sent, growth = _stream_head(
        gateway, head + b"1\r\nx\r\n0\r\nx-trailer: ", b"t" * 65536, 200 * MIB
    )
    assert growth < 30 * MIB and sent < 50 * MIB
    ((status, _, body),) = _responses(answer)
    assert status == 431 and _error_code(body) == "trailers_too_large"
    assert gateway.upstream_paths() == []


# ---------------------------------------------------------------------------------------------------- 2


def test_idle_and_slow_connections_are_closed_after_header_timeout(gateway):
    idle = [_connect(gateway) for _ in range(50)]
    partial_line = _connect(gateway)
    partial_line.sendall(b"GET /iris/ec")
    trickle = _connect(gateway)
    stop = threading.Event()

    def one_byte_at_a_time() -> None:
        for byte in b"GET /iris/echo HTTP/1.1\r\nHost: x\r\nx-slow: " + b"s" * 1000:
            if stop.wait(0.2):
                return
            try:
                trickle.send(bytes([byte]))
            except OSError:
                return

    sender = threading.Thread(target=one_byte_at_a_time)
    sender.start()
    try:
        started = time.monotonic()
        answers = [_read_all(s, HEADER_TIMEOUT_S + 6) for s in (*idle, partial_line, trickle)]
        took = time.monotonic() - started
    finally:
        stop.set()
        sender.join()
        for s in (*idle, partial_line, trickle):
            s.close()
    assert took < HEADER_TIMEOUT_S + 6
    for answer in answers[:50]:
        assert answer == b"<EOF>", answer[:200]  # nothing was sent: closed without an answer
    for answer in answers[50:]:
        ((status, headers, body),) = _responses(answer)
        assert status == 408 and _error_code(body) == "client_timeout"
        assert headers["connection"] == "close" and answer.endswith(b"<EOF>")
    assert gateway.upstream_paths() == []


def test_header_timeout_counts_from_the_end_of_the_previous_answer(gateway):
    with _connect(gateway) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(HEADER_TIMEOUT_S * 0.6)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # a keep-alive connection works
        time.sleep(HEADER_TIMEOUT_S * 0.6)
        sock.sendall(b"GET /iris/echo HTTP/1.1\r\n")  # ...but its next head must come in time
        started = time.monotonic()
        answer = _read_all(sock, HEADER_TIMEOUT_S + 5)
        took = time.monotonic() - started
    statuses = [r[0] for r in _responses(answer)]
    assert statuses == [200, 200, 408], answer[:600]
    assert answer.endswith(b"<EOF>") and took < HEADER_TIMEOUT_S + 4


def test_stalled_body_gets_408_and_the_connection_closes(gateway):
    with _connect(gateway) as sock:
        sock.sendall(b"POST /iris/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        answer = _read_all(sock, 6)
    ((status, headers, body),) = _responses(answer)
    assert status == 408 and _error_code(body) == "client_timeout"
    assert headers["connection"] == "close" and answer.endswith(b"<EOF>")


def test_slow_body_gets_408_after_body_timeout(gateway):
    # Each byte comes well within client_body_timeout_s, but the whole body takes longer than
    # server.body_timeout_s.
    with _connect(gateway) as sock:
        sock.sendall(b"POST /iris/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        started = time.monotonic()
        answer = b""
        sock.settimeout(0.3)
        for _ in range(60):
            try:
                sock.send(b"x")
                chunk = sock.recv(65536)
                answer += chunk
                if not chunk or b"\r\n\r\n" in answer:
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        answer += _read_all(sock, 3)
    took = time.monotonic() - started
    ((status, _, body),) = _responses(answer)
    assert status == 408 and _error_code(body) == "client_timeout"
    # Which timer fired, in the gateway's words (a loaded machine stretches elapsed-time windows).
    assert b"server.body_timeout_s" in body, body
    assert took > 1.5, took
    assert gateway.upstream_paths() == []


# ---------------------------------------------------------------------------------------------------- 4

SMUGGLED = b"GET /iris/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "head",
    [
        b"POST /iris/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n",
        b"POST /iris/echo HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: foo/2\r\n",
        b"CONNECT /iris/echo HTTP/1.1\r\nHost: x\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n",
    ],
    ids=["upgrade-h2c", "upgrade-other", "connect-path", "connect-authority"],
)
def test_upgrade_and_connect_are_refused_and_nothing_after_them_is_forwarded(gateway, head):
    gateway.clear()
    with _connect(gateway) as sock:
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED)
        time.sleep(0.2)
        try:
            sock.sendall(SMUGGLED)  # the body "arriving later"
        except OSError:
            pass
        answer = _read_all(sock)
    ((status, headers, body),) = _responses(answer)
    assert status == 400 and _error_code(body) == "upgrade_not_supported"
    assert headers["connection"] == "close" and answer.endswith(b"<EOF>")
    time.sleep(0.2)
    assert gateway.upstream_paths() == []


def test_trailers_never_become_headers(gateway):
    gateway.clear()
    with _connect(gateway) as sock:
        sock.sendall(
            b"POST /iris/echo HTTP/1.1\r\nHost: good.example\r\nx-request-id: real-id\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"2\r\n{}\r\n0\r\nHost: evil.example\r\nx-request-id: forged-id\r\nx-trailer: t\r\n\r\n"
        )
        answer = _read_all(sock)
    ((status, headers, _),) = _responses(answer)
    assert status == 200
    assert headers["x-request-id"] == "real-id"
    (seen,) = gateway.upstream.requests
    values = dict(seen["headers"])
    assert values["x-request-id"] == "real-id"
    assert values["x-forwarded-host"] == "good.example"
    assert "x-trailer" not in values
    assert "evil.example" not in json.dumps(seen) and "forged-id" not in json.dumps(seen)


def test_413_after_expect_continue_closes_and_swallows_no_request(gateway):
    gateway.clear()
    with _connect(gateway) as sock:
        sock.sendall(
            b"POST /iris/echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES * 10)
        )
        time.sleep(0.3)
        # No body (no 100 Continue came): a client that goes on with its next request.
        try:
            sock.sendall(SMUGGLED)
        except OSError:
            pass
        answer = _read_all(sock)
    responses = _responses(answer)
    assert [r[0] for r in responses] == [413], answer[:500]
    assert _error_code(responses[0][2]) == "body_too_large"
    assert responses[0][1]["connection"] == "close" and answer.endswith(b"<EOF>")
    assert gateway.upstream_paths() == []


def test_413_reaches_a_client_that_goes_on_uploading(gateway):
    # The gateway answers from Content-Length without reading the body. Closing at once while the body
    # still arrives would reset the connection, and the client would read a reset instead of the 413.
    for _ in range(2):
        with _connect(gateway) as sock:
            sock.sendall(b"POST /iris/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (50 * MIB))
            try:
                for _ in range(16 * 16):  # 16 MiB, without reading: a client that uploads first
                    sock.sendall(b"b" * 65536)
            except OSError:
                pass
            answer = _read_all(sock)
        ((status, headers, body),) = _responses(answer)
        assert status == 413 and _error_code(body) == "body_too_large"
        assert headers["connection"] == "close"


def test_error_before_the_body_was_read_closes_the_connection(gateway):
    with _connect(gateway) as sock:
        # 404 before the body was read: the rest of the body must not be parsed as a request.
        sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        answer = _read_all(sock)
    ((status, headers, _),) = _responses(answer)
    assert status == 404 and headers["connection"] == "close" and answer.endswith(b"<EOF>")


@pytest.mark.parametrize("path", ["/nowhere", "/iris/echo"], ids=["route_not_found", "body_too_large"])
def test_an_answer_given_before_the_body_reaches_a_client_still_uploading(gateway, path):
    """404 (no route) and 413 (Content-Length over the route's limit) are answered from the head, while
    the client still sends its body: the gateway drains it and closes gracefully, so the client reads the
    answer (it used to close at once, and the unread body made the kernel reset the connection: the
    client's upload failed with a broken pipe or a reset, the answer unread)."""
    for _ in range(3):
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        try:
            connection.request(
                "POST", path, body=b"x" * (8 * MIB), headers={"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            status, body = response.status, response.read()
        finally:
            connection.close()
        assert status == (404 if path == "/nowhere" else 413)
        assert _error_code(body) == ("route_not_found" if path == "/nowhere" else "body_too_large")


def test_the_gateways_own_answer_to_head_has_no_body(gateway):
    """RFC 9110 9.3.2: an answer to HEAD carries no content. The keep-alive connection's next answer must
    start where the client expects it (a body after the 404 head was read as the next status line)."""
    with _connect(gateway) as sock:
        sock.sendall(b"HEAD /nowhere HTTP/1.1\r\nHost: x\r\n\r\nGET /iris/one HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _read_all(sock, 1.0)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 "), answer[:300]
    assert rest.startswith(b"HTTP/1.1 200 "), answer[:500]


def test_an_http_1_0_request_with_expect_gets_no_100_continue(gateway):
    """RFC 9110 10.1.1: a server ignores `Expect: 100-continue` from HTTP/1.0, which knows no 1xx."""
    with _connect(gateway) as sock:
        sock.sendall(
            b"POST /iris/echo HTTP/1.0\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
        )
        time.sleep(0.3)
        sock.sendall(b"{}")
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert b"100 Continue" not in answer


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /iris/one HTTP/1.1\r\n", 400),  # RFC 9112 3.2: an HTTP/1.1 request without Host
        (b"GET /iris/one HTTP/1.1\r\nHost: a b/c\r\n", 400),  # not host[:port]
        (b"GET /iris/one HTTP/1.1\r\nHost: x:80x\r\n", 400),
        (b"GET /iris/one HTTP/1.0\r\n", 200),  # HTTP/1.0 need not send one
        (b"GET /iris/one HTTP/1.1\r\nHost: [::1]:8080\r\n", 200),
        (b"GET /iris/one HTTP/1.1\r\nHost: [fe80::1%25eth0]:8080\r\n", 200),  # RFC 6874 zone id
        (b"GET /iris/one HTTP/1.1\r\nHost: scoring.example:443\r\n", 200),
        (b"GET /iris/one HTTP/1.1\r\nHost:\r\n", 200),  # empty: allowed (a URI without authority)
    ],
    ids=["missing", "space-slash", "bad-port", "http-1.0-without", "ipv6", "ipv6-zone", "name-port", "empty"],
)
def test_a_request_without_a_valid_host_is_refused(gateway, head, status):
    gateway.clear()
    with _connect(gateway) as sock:
        sock.sendall(head + b"Connection: close\r\n\r\n")
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:300]
    if status == 400:
        ((_, _, body),) = _responses(answer)
        assert _error_code(body) == "malformed_request" and "Host" in json.loads(body)["error"]["message"]
        assert gateway.upstream_paths() == []


@pytest.mark.parametrize(
    ("target", "words"),
    [
        (b"http://x/iris/one", "absolute-form"),
        (
            b"http://x:8080",
            "absolute-form",
        ),  # no path: it used to be "not valid HTTP/1.1 (User callback error)"
        (b"*", "asterisk-form"),
    ],
    ids=["absolute", "absolute-without-path", "asterisk"],
)
def test_request_targets_other_than_a_path_are_refused_by_name(gateway, target, words):
    gateway.clear()
    with _connect(gateway) as sock:
        sock.sendall(b"OPTIONS %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target)
        answer = _read_all(sock)
    ((status, _, body),) = _responses(answer)
    assert status == 400 and _error_code(body) == "bad_request_path"
    assert words in json.loads(body)["error"]["message"]
    assert gateway.upstream_paths() == []


def test_malformed_request_pipelined_behind_a_valid_one_keeps_the_valid_answer(gateway):
    gateway.clear()
    with _connect(gateway) as sock:
        sock.sendall(
            b"GET /iris/echo HTTP/1.1\r\nHost: x\r\n\r\nGET /iris/x\x01y HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        answer = _read_all(sock)
    responses = _responses(answer)
    assert [r[0] for r in responses] == [200, 400], answer[:500]
    assert _error_code(responses[1][2]) == "malformed_request"
    assert responses[1][1]["connection"] == "close" and answer.endswith(b"<EOF>")
    assert gateway.upstream_paths() == ["/api/echo"]


@pytest.mark.parametrize(
    "refused",
    [
        b"CONNECT /iris/x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /iris/x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    ],
    ids=["connect", "upgrade"],
)
def test_a_refused_upgrade_pipelined_behind_requests_leaves_their_answers_alone(gateway, refused):
    """The refusal is the refused request's: the two before it are answered, then the 400, then the close
    (it was pinned on the request parsed before it, whose answer was dropped)."""
    gateway.clear()
    with _connect(gateway) as sock:
        sock.sendall(
            b"GET /iris/one HTTP/1.1\r\nHost: x\r\n\r\nGET /iris/two HTTP/1.1\r\nHost: x\r\n\r\n" + refused
        )
        answer = _read_all(sock)
    responses = _responses(answer)
    assert [r[0] for r in responses] == [200, 200, 400], answer[:500]
    assert _error_code(responses[2][2]) == "upgrade_not_supported"
    assert responses[2][1]["connection"] == "close" and answer.endswith(b"<EOF>")
    assert gateway.upstream_paths() == ["/api/one", "/api/two"]


def test_an_upgrade_after_a_finished_request_is_answered_400_not_dropped(gateway):
    with _connect(gateway) as sock:
        sock.sendall(b"GET /iris/one HTTP/1.1\r\nHost: x\r\n\r\n")
        ((status, _, _),) = _responses(_read_all(sock, 0.5))
        assert status == 200
        sock.sendall(b"GET /iris/x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
        answer = _read_all(sock)
    ((status, headers, body),) = _responses(answer)
    assert status == 400 and _error_code(body) == "upgrade_not_supported"
    assert headers["connection"] == "close" and answer.endswith(b"<EOF>")


def test_an_upgrade_sent_while_a_request_is_in_flight_does_not_kill_it(gateway):
    """Request A waits on its upstream when B asks for an upgrade: A is answered in full under its own
    id and logged 200; B gets the 400 after it (it was A that got the 400, under A's id, its upstream
    attempt aborted, and B left no trace)."""
    gateway.upstream.release.clear()
    with _connect(gateway) as sock:
        sock.sendall(b"GET /iris/chunks HTTP/1.1\r\nHost: x\r\nx-request-id: request-A\r\n\r\n")
        first = _read_all(sock, 1.0)
        assert b"first;" in first, first
        sock.sendall(
            b"GET /iris/x HTTP/1.1\r\nHost: x\r\nx-request-id: request-B\r\nConnection: Upgrade\r\n"
            b"Upgrade: h2c\r\n\r\n"
        )
        time.sleep(0.3)
        gateway.release_chunks()
        answer = first + _read_all(sock)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"x-request-id: request-A" in head, answer[:500]
    assert b"first;" in rest and b"second" in rest
    refusal = rest[rest.index(b"HTTP/1.1 400 ") :]
    ((_, headers, body),) = _responses(refusal)
    assert _error_code(body) == "upgrade_not_supported" and headers["x-request-id"] != "request-A"
    time.sleep(0.3)
    access = [line for line in gateway.log().splitlines() if "request-A" in line and "route=" in line]
    assert len(access) == 1 and "status=200" in access[0], access


def test_pipelined_requests_are_all_answered_in_order(gateway):
    gateway.clear()
    with _connect(gateway) as sock:
        sock.sendall(
            b"GET /iris/one HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /iris/two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /iris/three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        answer = _read_all(sock)
    responses = _responses(answer)
    assert [(r[0], r[2]) for r in responses] == [(200, b"ok"), (200, b"abc"), (200, b"ok")], answer[:500]
    assert gateway.upstream_paths() == ["/api/one", "/api/two", "/api/three"]


def test_a_body_refused_while_its_request_is_served_is_logged_as_the_answer_the_client_got(gateway):
    """A chunked body that breaks its framing after the proxy took the request: the gateway answers 400
    malformed_request and closes. The access line says that answer, under the request id the client got
    (x-request-id and the error body). It used to say 499 client_disconnected, under another id."""
    gateway.clear()
    with _connect(gateway) as sock:
        sock.sendall(b"POST /iris/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n")
        time.sleep(0.2)  # the proxy takes it meanwhile and waits for the rest of its body (body timeout 1 s)
        sock.sendall(b"zz\r\nnot a chunk\r\n")
        answer = _read_all(sock)
    [(status, headers, body)] = _responses(answer)
    assert status == 400 and _error_code(body) == "malformed_request"
    request_id = headers["x-request-id"]
    assert json.loads(body)["error"]["request_id"] == request_id
    deadline = time.monotonic() + 5
    while f"gateway.access: {request_id} " not in gateway.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = [line for line in gateway.log().splitlines() if f"gateway.access: {request_id} " in line]
    assert " status=400 " in line and line.endswith(" error=malformed_request"), line
    assert "status=499" not in gateway.log()


# ---------------------------------------------------------------------------------------------------- 8


def test_forged_request_id_cannot_add_fields_to_the_text_access_log(gateway):
    forged = "abc status=200 route=admin\r\n2026-01-01T00:00:00.000Z INFO gateway.access: x"
    with _connect(gateway) as sock:
        sock.sendall(
            b"GET /iris/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nx-request-id: "
            + forged.replace("\r\n", " ").encode()
            + b'"\\\r\n\r\n'
        )
        answer = _read_all(sock)
    assert _responses(answer)[0][0] == 200
    # A request id outside Azure ML's form (letters, digits, '-', '_') is replaced by the gateway's own,
    # so the forged text never reaches the access line; the formatter escapes line breaks anywhere.
    deadline = time.monotonic() + 5
    while "gateway.access" not in gateway.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in gateway.log().splitlines() if "gateway.access" in line]
    assert lines, gateway.log()
    for line in lines:
        assert "route=admin" not in line and "abc" not in line, line
        assert line.count(" status=") == 1 and line.count(" route=") == 1, line


def test_debug_logging_never_prints_header_values(tmp_path):
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    secret_value = "header-value-that-must-not-be-logged-1234"
    upstream = Upstream(accepted_keys=None)
    with ServerThread(upstream, lifespan="off") as up:
        config = {
            "server": {"host": "127.0.0.1", "port": port, "log_level": "debug"},
            "routes": {"iris": {"path": "/iris", "upstream": up.url, "auth": {"type": "none"}}},
        }
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {**os.environ}
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                assert process.poll() is None
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.05)
                assert time.monotonic() < deadline
            headers = {"x-gateway-key": secret_value, "authorization": f"Bearer {secret_value}"}
            httpx.get(f"http://127.0.0.1:{port}/iris/echo", headers=headers)
            # A WebSocket handshake: the WebSocket library logs every request header at debug.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as ws:
                ws.sendall(
                    b"GET /iris/x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                    b"x-gateway-key: " + secret_value.encode() + b"\r\n\r\n"
                )
                _read_all(ws, 3)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as bad:
                bad.sendall(
                    b"GET /iris/x HTTP/1.1\r\nx-gateway-key: " + secret_value.encode() + b"\r\n\x01\r\n\r\n"
                )
                _read_all(bad, 3)
        finally:
            process.terminate()
            out, err = process.communicate(timeout=15)
    text = (out + err).decode(errors="replace")
    assert "gateway.access" in text  # the requests were served and logged
    assert secret_value not in text, text[-3000:]


def test_text_log_lines_cannot_be_split_or_given_fields():
    import io
    import logging

    from gateway.logs import TextFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    record = logging.LogRecord(
        "gateway.test", logging.INFO, __file__, 1, "no route for %s", ("/a\nINFO x\r\x1b[2J\u2028\x85",), None
    )
    handler.emit(record)
    (line,) = stream.getvalue().splitlines()
    assert line.endswith("no route for /a\\nINFO x\\r\\x1b[2J\\u2028\\x85"), line
