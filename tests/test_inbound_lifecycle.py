"""A client connection's life through the real gateway, with raw sockets on both sides: clients that never
read or hang up, unexpected failures, and reloads that would weaken the running listener."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import PRIMARY
from servers import ServerThread

from gateway.app import GatewayApp
from gateway.config import parse_config
from gateway.credentials.base import NoCredential
from gateway.errors import ConfigError, SecretError

BIG_BODY = 64 * 1024 * 1024  # far beyond every socket buffer between the upstream and a non-reading client
WHOLE_BODY = 60_000  # one loopback segment: it arrives whole, and the gateway writes it with the head at once


class RawUpstream:
    """A raw-socket upstream that records, per request path, when the gateway closed its connection.

    `/slow`: reads the request, never answers, waits for the gateway to close the connection.
    `/big`: answers with BIG_BODY bytes, written as fast as the gateway reads them.
    `/stream`: a chunked answer that trickles for 30 s, like an LLM generating tokens.
    `/whole`: answers WHOLE_BODY bytes, head and body in one write (the gateway reads the answer at once).
    anything else: a small 200.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.started: list[str] = []
        self.closed: list[str] = []
        self.threads: list[threading.Thread] = []
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn:
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    head += data
                path = head.split(b" ", 2)[1].decode()
                with self.lock:
                    self.started.append(path)
                try:
                    if path.endswith("/slow"):
                        while conn.recv(65536):
                            pass
                        raise ConnectionResetError  # EOF: the gateway closed it
                    if path.endswith("/stream"):
                        # A streaming generation: a chunk every 50 ms for up to 30 s.
                        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                        for _ in range(600):
                            conn.sendall(b"6\r\ntoken \r\n")
                            time.sleep(0.05)
                        conn.sendall(b"0\r\n\r\n")
                        continue
                    if path.endswith("/big"):
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG_BODY)
                        block = b"x" * 65536
                        for _ in range(BIG_BODY // len(block)):
                            conn.sendall(block)
                        continue
                    if path.endswith("/whole"):
                        conn.sendall(
                            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % WHOLE_BODY + b"w" * WHOLE_BODY
                        )
                        continue
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                except OSError:
                    with self.lock:
                        self.closed.append(path)
                    return

    def count(self, which: list[str], suffix: str) -> int:
        with self.lock:
            return sum(1 for path in which if path.endswith(suffix))

    def stop(self) -> None:
        self.stopping = True
        self.listener.close()


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream()
    yield upstream
    upstream.stop()


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


def _raw_client(port: int, request: bytes, *, small_buffer: bool = False) -> socket.socket:
    sock = socket.socket()
    if small_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


def _config(upstream_url: str, *, server: dict[str, Any] | None = None, **route: Any) -> dict[str, Any]:
    return {
        "server": server or {},
        "routes": {
            "big": {
                "path": "/big",
                "upstream": upstream_url,
                "auth": {"type": "none"},
                "retry": {"attempts": 1},
                **route,
            }
        },
    }


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.access"]


def test_clients_that_never_read_do_not_hold_the_concurrency_slots(
    raw_upstream: RawUpstream,
    gateway_factory: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    server = gateway_factory(
        _config(raw_upstream.url, server={"send_timeout_s": 1.0}, limits={"max_concurrent": 2})
    )
    stalled = [
        _raw_client(server.port, b"GET /big/big HTTP/1.1\r\nHost: gw\r\n\r\n", small_buffer=True)
        for _ in range(2)
    ]
    try:
        _wait(lambda: raw_upstream.count(raw_upstream.started, "/big") == 2, 10, "both reach the upstream")
        # The two clients stay connected and never read: after send_timeout_s (1 s) both are cut off,
        # their upstream connections aborted and their slots free for a third client.
        deadline = time.monotonic() + 20
        status = 0
        while time.monotonic() < deadline:
            status = httpx.get(server.url + "/big/ok", timeout=10).status_code
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200
        _wait(lambda: raw_upstream.count(raw_upstream.closed, "/big") == 2, 20, "both upstreams are aborted")
        timed_out = [line for line in _access_lines(caplog) if "error=client_send_timeout" in line]
        assert len(timed_out) == 2 and all("status=499" in line for line in timed_out)
    finally:
        for sock in stalled:
            sock.close()


def test_a_client_that_reads_no_answer_gets_no_more_of_its_requests_forwarded(
    raw_upstream: RawUpstream, gateway_factory: Callable[..., ServerThread]
) -> None:
    """A keep-alive client that sends request after request and reads none of the answers: once the
    connection's write buffer is over its high-water mark the gateway takes no further request of it
    (reading stays paused) until the client reads. Each answer used to be forwarded and buffered in full:
    one such connection grew the gateway by 36 MiB a second, until server.send_timeout_s. Nothing is lost
    or answered out of turn: once the client reads, every answer arrives whole and in order."""
    server = gateway_factory(_config(raw_upstream.url))
    sent = 0
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        sock.connect(("127.0.0.1", server.port))
        sock.settimeout(10)
        # One request at a time, the next once the upstream has the one before: none piles up unread (a
        # read of more than MAX_PIPELINED requests is refused on its own account).
        while sent < 200:
            sock.sendall(b"GET /big/whole HTTP/1.1\r\nHost: gw\r\n\r\n")
            sent += 1
            deadline = time.monotonic() + 2.0
            while raw_upstream.count(raw_upstream.started, "/whole") < sent and time.monotonic() < deadline:
                time.sleep(0.002)
            if raw_upstream.count(raw_upstream.started, "/whole") < sent:
                break  # the gateway takes no more of this client's requests
        forwarded = raw_upstream.count(raw_upstream.started, "/whole")
        sock.sendall(b"GET /big/last HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(1 << 20):
            answer += chunk
    # The kernel's socket buffers on loopback (about 3 MiB here) take answers before the gateway sees
    # the client is not reading; the unchanged gateway forwarded all 200.
    assert forwarded <= 120, f"{forwarded} requests forwarded while the client read nothing"
    whole = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % WHOLE_BODY
    assert answer.count(whole) == sent and answer.count(b"HTTP/1.1 ") == sent + 1
    assert answer.count(b"w" * WHOLE_BODY) == sent and answer.endswith(b"\r\n\r\nok")
    assert raw_upstream.count(raw_upstream.started, "/last") == 1


def test_a_client_hanging_up_cancels_the_upstream_request_and_frees_its_slot(
    raw_upstream: RawUpstream,
    gateway_factory: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    server = gateway_factory(_config(raw_upstream.url, limits={"max_concurrent": 1}))
    client = _raw_client(server.port, b"GET /big/slow HTTP/1.1\r\nHost: gw\r\nx-request-id: gone-1\r\n\r\n")
    _wait(lambda: raw_upstream.count(raw_upstream.started, "/slow") == 1, 10, "the upstream has it")
    client.close()
    # The gateway aborts the upstream connection (the upstream reads EOF) and frees the only slot.
    _wait(lambda: raw_upstream.count(raw_upstream.closed, "/slow") == 1, 10, "the upstream sees EOF")
    assert httpx.get(server.url + "/big/ok", timeout=10).status_code == 200
    _wait(lambda: any("gone-1" in line for line in _access_lines(caplog)), 10, "the access line")
    (line,) = [line for line in _access_lines(caplog) if "gone-1" in line]
    assert "error=client_disconnected" in line and "status=200" not in line
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'error_code="client_disconnected",route="big"' in metrics


def test_a_busy_route_refuses_before_reading_the_body(
    raw_upstream: RawUpstream, gateway_factory: Callable[..., ServerThread]
) -> None:
    """Admission comes before the body: with the route's only slot taken, a request whose body has not
    been sent yet gets 503 route_busy at once, without waiting for (or costing) its upload."""
    server = gateway_factory(
        _config(
            raw_upstream.url,
            server={"client_body_timeout_s": 120},
            limits={"max_concurrent": 1},
        )
    )
    holder = _raw_client(server.port, b"GET /big/slow HTTP/1.1\r\nHost: gw\r\n\r\n")
    try:
        _wait(lambda: raw_upstream.count(raw_upstream.started, "/slow") == 1, 10, "the slot is taken")
        waiting = _raw_client(
            server.port, b"POST /big/ok HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n"
        )
        try:
            waiting.settimeout(30)  # far below client_body_timeout_s: the answer must not wait for the body
            answer = waiting.recv(65536)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b'"route_busy"' in answer and b"retry-after: 1" in answer.lower()
        finally:
            waiting.close()
    finally:
        holder.close()


def test_a_client_hanging_up_mid_stream_stops_the_upstream_generation(
    raw_upstream: RawUpstream,
    gateway_factory: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    server = gateway_factory(_config(raw_upstream.url))
    client = _raw_client(server.port, b"GET /big/stream HTTP/1.1\r\nHost: gw\r\nx-request-id: gone-2\r\n\r\n")
    client.settimeout(10)
    received = b""
    while b"token" not in received:
        received += client.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    client.close()
    _wait(lambda: raw_upstream.count(raw_upstream.closed, "/stream") == 1, 10, "the upstream stops streaming")
    _wait(lambda: any("gone-2" in line for line in _access_lines(caplog)), 10, "the access line")
    (line,) = [line for line in _access_lines(caplog) if "gone-2" in line]
    assert "error=client_disconnected" in line and "status=499" in line


@pytest.mark.parametrize("path", ["/big/big", "/big/stream"], ids=["content-length", "chunked"])
def test_a_client_leaving_mid_answer_is_logged_with_the_body_bytes_it_was_sent(
    raw_upstream: RawUpstream,
    gateway_factory: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    """The client reads the head and part of the body, then hangs up: its access line (499) counts the body
    bytes the gateway wrote to it until then, at least those the client received, never the whole body."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    server = gateway_factory(_config(raw_upstream.url))
    request_id = f"partial-{path.rsplit('/', 1)[1]}"
    client = _raw_client(
        server.port, f"GET {path} HTTP/1.1\r\nHost: gw\r\nx-request-id: {request_id}\r\n\r\n".encode()
    )
    client.settimeout(10)
    received = b""
    while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < 200:
        received += client.recv(65536)
    client.close()
    head, body = received.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    # What the client got of the body itself (the chunked answer's framing left out).
    got = body.count(b"token ") * len(b"token ") if path.endswith("/stream") else len(body)
    _wait(lambda: any(request_id in line for line in _access_lines(caplog)), 10, "the access line")
    (line,) = [line for line in _access_lines(caplog) if request_id in line]
    assert "status=499" in line and "error=client_disconnected" in line, line
    bytes_out = int(line.split(" bytes_out=", 1)[1].split(" ", 1)[0])
    assert got <= bytes_out < BIG_BODY, (got, line)


def test_a_body_refused_after_its_answer_started_is_logged_with_the_refusal(
    raw_upstream: RawUpstream,
    gateway_factory: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A chunked body streamed to the upstream, which answers before it ends; then the client breaks the
    chunk framing. The answer is cut off (the connection closed), and the access line keeps the answer's
    status with the refusal's code, not a 499 client_disconnected: the client did not go away."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    server = gateway_factory(_config(raw_upstream.url, replay_buffer_bytes=0))
    client = _raw_client(
        server.port,
        b"POST /big/stream HTTP/1.1\r\nHost: gw\r\nx-request-id: refused-1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n",
    )
    client.settimeout(10)
    received = b""
    while b"token" not in received:
        received += client.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    client.sendall(b"zz\r\nnot a chunk\r\n")
    while chunk := client.recv(65536):  # until the gateway closes the connection
        received += chunk
    client.close()
    assert not received.endswith(b"0\r\n\r\n")  # cut off, not completed
    _wait(lambda: any("refused-1" in line for line in _access_lines(caplog)), 10, "the access line")
    (line,) = [line for line in _access_lines(caplog) if "refused-1" in line]
    assert " status=200 upstream_status=200 " in line and line.endswith(" error=malformed_request"), line


def test_a_key_file_with_a_byte_order_mark_is_refused_at_load(
    tmp_path: Path, raw_upstream: RawUpstream
) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"\xef\xbb\xbf" + PRIMARY.encode() + b"\n")
    config = _config(raw_upstream.url)
    config["routes"]["big"]["auth"] = {"type": "key", "primary": {"file": str(key)}}
    with pytest.raises((ConfigError, SecretError), match="byte-order mark"):
        GatewayApp(parse_config(config))


class _Broken(NoCredential):
    """A credential with a bug: what any unexpected exception on the request path looks like."""

    def grant_nowait(self) -> Any:
        raise RuntimeError("a bug in a credential")


def test_an_unexpected_exception_is_a_json_500_with_the_request_id(
    raw_upstream: RawUpstream,
    gateway_factory: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    server = gateway_factory(_config(raw_upstream.url))
    route = server.app.router.routes[0]
    route.credential = _Broken(route.name)
    client = _raw_client(server.port, b"GET /big/ok HTTP/1.1\r\nHost: gw\r\nx-request-id: bug-1\r\n\r\n")
    client.settimeout(10)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += client.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(
        next(v for k, _, v in (h.partition(b": ") for h in head.split(b"\r\n")) if k == b"content-length")
    )
    while len(body) < length:
        body += client.recv(65536)
    client.close()
    assert head.startswith(b"HTTP/1.1 500 ")
    assert b"content-type: application/json" in head and b"x-request-id: bug-1" in head
    error = json.loads(body)["error"]
    assert error["code"] == "internal_error" and error["request_id"] == "bug-1"
    assert "a bug in a credential" not in error["message"]  # internals stay in the log
    _wait(lambda: any("bug-1" in line for line in _access_lines(caplog)), 10, "the access line")
    (line,) = [line for line in _access_lines(caplog) if "bug-1" in line]
    assert "status=500" in line and "error=internal_error" in line
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert (
        'gateway_requests_total{caller="anonymous",error_code="internal_error",route="big",status="500"}'
        in metrics
    )


def _write(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config))


def test_a_reload_that_removes_inbound_protection_from_a_public_listener_is_refused(
    raw_upstream: RawUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    protected = _config(raw_upstream.url)
    protected["server"]["host"] = "0.0.0.0"
    protected["inbound"] = {"allow_cidrs": ["127.0.0.1/32"]}
    path = tmp_path / "gateway.yaml"
    _write(path, protected)
    gateway = GatewayApp(parse_config(protected), config_path=str(path))
    with ServerThread(gateway) as server:
        assert httpx.get(server.url + "/big/ok", timeout=10).status_code == 200
        open_config = {**protected, "inbound": {}}
        _write(path, open_config)
        assert server.call(gateway.reload_from_file()) is False
        assert gateway.guard is not None and gateway.config.inbound.allow_cidrs == ["127.0.0.1/32"]
        refusals = [r for r in caplog.records if r.levelno >= logging.ERROR and "reload" in r.getMessage()]
        assert refusals and "inbound" in refusals[-1].getMessage()
        # The same file with protection kept (and a harmless change) is accepted.
        _write(path, {**protected, "routes": {"big": {**protected["routes"]["big"], "timeout_s": 7}}})
        assert server.call(gateway.reload_from_file()) is True


def test_a_reload_that_changes_restart_only_settings_names_them(
    raw_upstream: RawUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(raw_upstream.url)
    path = tmp_path / "gateway.yaml"
    _write(path, config)
    gateway = GatewayApp(parse_config(config), config_path=str(path))
    with ServerThread(gateway) as server:
        changed = {**config, "server": {"port": 9999, "max_header_count": 50, "send_timeout_s": 5}}
        _write(path, changed)
        assert server.call(gateway.reload_from_file()) is True
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        restart = [m for m in warnings if "restart" in m]
        assert restart and "server.port" in restart[-1] and "server.max_header_count" in restart[-1]
        assert httpx.get(server.url + "/big/ok", timeout=10).status_code == 200


def test_one_header_value_check_for_keys_tokens_and_rotations(tmp_path: Path, monkeypatch: Any) -> None:
    from gateway import secrets
    from gateway.credentials.base import Grant
    from gateway.secrets import EnvSecret, FileSecret

    monkeypatch.setattr(secrets, "CHECK_INTERVAL_S", 0.0)
    key = tmp_path / "key"
    key.write_text(PRIMARY + "\n")
    secret = FileSecret(key, header=True)
    # A rotation to a file saved with a BOM (or with a non-latin-1 character) keeps the last good key.
    key.write_bytes(b"\xef\xbb\xbf" + PRIMARY.encode() + b"\n")
    assert secret.value == PRIMARY and secret.error is not None and "byte-order mark" in secret.error
    key.write_text("key-\u20ac-0123456789\n")
    assert secret.value == PRIMARY and secret.error is not None and "latin-1" in secret.error
    monkeypatch.setenv("GW_BOM_KEY", "\ufeff" + PRIMARY)
    with pytest.raises(SecretError, match="byte-order mark"):
        EnvSecret("GW_BOM_KEY", header=True)
    # Tokens go through the same check: a token the gateway could not send is refused when it arrives.
    for bad in ("Bearer \ufeffabc", "Bearer abc ", "Bearer a\x01b", "Bearer \u20ac"):
        with pytest.raises(ValueError):
            Grant(header=bad, slot="token")
    assert Grant(header="Bearer abc.def", slot="token").header_line == b"Authorization: Bearer abc.def\r\n"


class _BrokenStatus(NoCredential):
    def status(self) -> Any:
        raise RuntimeError("a bug in a readiness report")


def test_the_server_error_guard_covers_the_admin_endpoints(
    raw_upstream: RawUpstream, gateway_factory: Callable[..., ServerThread]
) -> None:
    server = gateway_factory(_config(raw_upstream.url))
    route = server.app.router.routes[0]
    route.credential = _BrokenStatus(route.name)
    response = httpx.get(server.url + "/readyz", timeout=10)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "internal_error"
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]
    assert httpx.get(server.url + "/big/ok", timeout=10).status_code == 200  # requests still served


def test_a_reload_keeps_the_command_line_overrides(
    raw_upstream: RawUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # `gateway serve --host 127.0.0.1` over a file that says 0.0.0.0 without protection: the running
    # listener is loopback, so the file reloads, and no restart warning names the overridden host.
    config = _config(raw_upstream.url, server={"host": "0.0.0.0"})
    path = tmp_path / "gateway.yaml"
    _write(path, config)
    overrides = {"host": "127.0.0.1"}
    gateway = GatewayApp(
        parse_config({**config, "server": overrides}), config_path=str(path), server_overrides=overrides
    )
    with ServerThread(gateway) as server:
        assert server.call(gateway.reload_from_file()) is True
        assert not [r for r in caplog.records if "need a restart" in r.getMessage()]
