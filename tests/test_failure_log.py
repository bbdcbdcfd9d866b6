"""Every failed upstream attempt explained in the operator's log (issue 15), and nothing of it in the
client's answer (issue 19).

Real failing upstreams on loopback: TLS servers with a certificate from an unknown CA, for another name,
expired; a listener that never completes a TLS handshake, one whose full accept queue never completes
the TCP connection; an upstream that stops reading the request, one that resets the connection, a
closed port, one whose slow answer holds the only pooled connection; and a real forward proxy
(proxy.py) that wants credentials (407), forbids the destination (403), cannot reach it (502), or is
not running. After each failure the gateway's log is read for the route, the request id, the origin,
the attempt, the cause and the proxy; the access line keeps its stable `error=` code; the client's body
names the failure class and the route only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure_env import wait_for
from cryptography import x509
from proxy_policy import REASON
from servers import FullBacklog, ServerThread
from test_client_conformance import OK, Peer, RawUpstream, _pki
from test_egress import ForwardProxy

from gateway.app import GatewayApp
from gateway.client import Origin
from gateway.config import parse_config
from gateway.errors import ConnectError, ProxyRefused, TransportTimeout
from gateway.failure_log import FailureLog
from gateway.logs import RedactingFilter, TextFormatter

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

PROXY_USER = "gateway"
PROXY_PASSWORD = "failure-log-proxy-pass-3c9a71"
WRONG_PASSWORD = "failure-log-wrong-pass-81d2e4"


def _lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    """The records of `logger` as `gateway serve` writes them (redacted, one line each)."""
    formatter, redacting = TextFormatter(), RedactingFilter()
    lines = []
    for record in caplog.records:
        if record.name == logger:
            redacting.filter(record)
            lines.append(formatter.format(record))
    return lines


def _failure_line(caplog: pytest.LogCaptureFixture, request_id: str) -> str:
    lines = [line for line in _lines(caplog, "gateway.failures") if f"request {request_id}:" in line]
    assert len(lines) == 1, _lines(caplog, "gateway.failures")
    assert " WARNING gateway.failures: " in lines[0]
    return lines[0]


def _access_line(caplog: pytest.LogCaptureFixture, request_id: str) -> str:
    (line,) = [line for line in _lines(caplog, "gateway.access") if f" {request_id} " in f" {line} "]
    return line


def _score(gw: ServerThread, route: str, request_id: str) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/{route}/score", json={"data": [[1]]}, headers={"x-request-id": request_id}, timeout=30
    )


def _client_sees_class_and_route_only(response: httpx.Response, route: str, *hidden: str) -> dict[str, Any]:
    error = response.json()["error"]
    assert error["message"].startswith(f"route {route}: "), error
    for detail in ("127.0.0.1", "localhost", *hidden):
        assert detail not in response.text, (detail, response.text)
    return error


# ------------------------------------------------------------------------------ direct upstreams
async def _stop_reading(peer: Peer) -> None:
    await peer.read_head()
    await asyncio.sleep(60)  # reads nothing more: the gateway's writes stall


async def _reset_after_reading(peer: Peer) -> None:
    await peer.read_request()
    peer.reset()


async def _never_answer(peer: Peer) -> None:
    await peer.read_request()
    await asyncio.sleep(60)  # the head never comes: read_timeout_s


async def _dribble(peer: Peer) -> None:
    await peer.read_request()
    await peer.send(b"HTTP/1.1 200 OK\r\n")
    for _ in range(600):  # a header byte every 0.1 s: never idle for read_timeout_s, no head within timeout_s
        await peer.send(b"x")
        await asyncio.sleep(0.1)


async def _answer_all(peer: Peer) -> None:
    while await peer.read_request() is not None:
        await peer.send(OK)


class Failing:
    """One failing upstream per kind, and a gateway with one route to each."""

    def __init__(self, tmp: Path) -> None:
        self.stack = contextlib.ExitStack()
        # The `pool` route's upstream holds every request until `release` is set.
        self.release = threading.Event()
        self.stack.callback(self.release.set)
        trusted_a, name_server = _pki(
            _dir(tmp, "name"), hosts=("scoring.example", "*.scoring.example"), ca="name CA"
        )
        trusted_b, expired_server = _pki(_dir(tmp, "expired"), expired=True, ca="expiry CA")
        _, unknown_server = _pki(_dir(tmp, "unknown"), ca="unknown CA")
        self.expired_on = x509.load_pem_x509_certificate(
            (tmp / "expired" / "server.pem").read_bytes()
        ).not_valid_after_utc
        bundle = tmp / "bundle.pem"
        bundle.write_bytes(trusted_a.read_bytes() + trusted_b.read_bytes())
        self.servers = {
            "unknown-ca": self._raw(_answer_all, unknown_server),
            "wrong-name": self._raw(_answer_all, name_server),
            "expired": self._raw(_answer_all, expired_server),
            "write-stall": self._raw(_stop_reading),
            "reset": self._raw(_reset_after_reading),
            "silent": self._raw(_never_answer),
            "dribble": self._raw(_dribble),
            "pool": self._raw(self._hold),
        }
        # A listener that never accepts: TCP connects (the backlog), the TLS handshake never starts.
        self.stalled = self.stack.enter_context(socket.create_server(("127.0.0.1", 0), backlog=64))
        # A listener whose accept queue is full: the TCP connection itself never completes.
        backlog = FullBacklog()
        self.stack.callback(backlog.close)
        closed = socket.create_server(("127.0.0.1", 0))
        self.closed_port = closed.getsockname()[1]
        closed.close()
        urls = {name: server.url for name, server in self.servers.items()}
        urls["stalled-tls"] = f"https://127.0.0.1:{self.stalled.getsockname()[1]}"
        urls["stalled-tcp"] = f"http://127.0.0.1:{backlog.port}"
        # The same origins again, for routes whose timeout_s is shorter than the timer that would fire.
        urls["stalled-tcp-short"] = urls["stalled-tcp"]
        urls["refused"] = f"http://127.0.0.1:{self.closed_port}"
        self.urls = urls
        routes = {
            name: {
                "path": f"/{name}",
                "upstream": url,
                "auth": {"type": "none"},
                "retry": {"attempts": 1},
                "connect_timeout_s": 0.5,
                "write_timeout_s": 0.5,
                "read_timeout_s": 0.5,
                "timeout_s": 1.0,
                "max_body_bytes": 64 << 20,
            }
            for name, url in urls.items()
        }
        # One pooled connection, held by a slow answer: the next request waits pool_timeout_s for it (the
        # other timers are long, so that only that one can fire).
        routes["pool"].update(max_connections=1, pool_timeout_s=0.5, read_timeout_s=30, timeout_s=30)
        # The attempt's timeout_s ends the wait for a connection before connect_timeout_s (5 s): the line
        # names the timer that fired. (The same for a pool wait: a route's pool is its own, so only the
        # client can be put in that spot; see test_client_conformance.py.)
        routes["stalled-tcp-short"].update(connect_timeout_s=5.0, timeout_s=0.5)
        config = {"tls": {"ca_bundle": str(bundle)}, "routes": routes}
        self.gateway = ServerThread(GatewayApp(parse_config(config)))
        self.stack.enter_context(self.gateway)

    async def _hold(self, peer: Peer) -> None:
        while await peer.read_request() is not None:
            await asyncio.to_thread(self.release.wait, 60)
            await peer.send(OK)

    def _raw(self, handler: Any, ssl_context: Any = None) -> RawUpstream:
        return self.stack.enter_context(RawUpstream(handler, ssl_context=ssl_context))

    def origin(self, name: str) -> str:
        return self.urls[name].split("://", 1)[1]


def _dir(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Failing]:
    setup = Failing(tmp_path_factory.mktemp("failing"))
    with setup.stack:
        yield setup


CASES = {
    # route: (status, code, cause, what the line says besides)
    "unknown-ca": (
        502,
        "upstream_unreachable",
        "tls_unknown_ca",
        ["tls.ca_bundle", "issued by CN=unknown CA"],
    ),
    "wrong-name": (
        502,
        "upstream_unreachable",
        "tls_name_mismatch",
        ["not valid for the name 127.0.0.1", "it holds DNS:scoring.example, DNS:*.scoring.example"],
    ),
    "expired": (502, "upstream_unreachable", "tls_expired", ["expired on "]),
    "stalled-tls": (
        504,
        "upstream_timeout",
        "connect_timeout",
        ["within 0.5 s (connect_timeout_s)", "the TLS handshake with 127.0.0.1:"],
    ),
    "stalled-tcp": (
        504,
        "upstream_timeout",
        "connect_timeout",
        ["within 0.5 s (connect_timeout_s)", "the TCP connection to 127.0.0.1:"],
    ),
    "stalled-tcp-short": (
        504,
        "upstream_timeout",
        "connect_timeout",
        ["within 0.5 s (timeout_s, shorter than connect_timeout_s 5 s)", "the TCP connection to 127.0.0.1:"],
    ),
    "refused": (502, "upstream_unreachable", "refused", ["cannot connect to", "refused"]),
    "reset": (502, "upstream_unreachable", "reset", ["reset the connection"]),
    "silent": (504, "upstream_timeout", "read_timeout", ["sent nothing for 0.5 s", "(read_timeout_s)"]),
    "dribble": (504, "upstream_timeout", "total_timeout", ["within 1 s (timeout_s)"]),
}


@pytest.mark.parametrize("route", sorted(CASES))
def test_a_failed_attempt_is_explained_in_one_warning_and_not_to_the_client(
    route: str, failing: Failing, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    status, code, cause, says = CASES[route]
    request_id = f"failure-{route}"
    response = _score(failing.gateway, route, request_id)
    assert response.status_code == status, response.text
    error = _client_sees_class_and_route_only(response, route, str(failing.urls[route].rsplit(":", 1)[1]))
    assert error["code"] == code

    line = _failure_line(caplog, request_id)
    origin = failing.origin(route)
    assert f"route {route}: request {request_id}: attempt 1 to {origin} failed ({cause}): " in line, line
    for text in says:
        assert text in line, (text, line)
    assert line.endswith(f"; answering {status} {code}"), line
    assert "via the egress proxy" not in line
    if route == "expired":
        assert failing.expired_on.strftime("%Y-%m-%d") in line
    assert f"error={code}" in _access_line(caplog, request_id)


def test_a_request_that_waited_for_a_busy_pool_names_pool_timeout_s_and_its_value(
    failing: Failing, caplog: pytest.LogCaptureFixture
) -> None:
    """`max_connections: 1`, its connection held by a slow answer: the next request waits
    `pool_timeout_s` for it, then gets 503 `overloaded`. The log line names the route, the origin, the
    timer and its value, and that the gateway answered 503; the client's body none of the detail."""
    caplog.set_level(logging.INFO, logger="gateway")
    upstream = failing.servers["pool"]
    holder: list[httpx.Response] = []
    first = threading.Thread(
        target=lambda: holder.append(_score(failing.gateway, "pool", "failure-pool-held"))
    )
    first.start()
    try:
        deadline = time.monotonic() + 10
        while not upstream.requests:  # the first request holds the only connection
            assert time.monotonic() < deadline, "the first request never reached the upstream"
            time.sleep(0.01)
        request_id = "failure-pool"
        response = _score(failing.gateway, "pool", request_id)
    finally:
        failing.release.set()
        first.join(30)
    assert response.status_code == 503, response.text
    error = _client_sees_class_and_route_only(response, "pool", str(failing.urls["pool"].rsplit(":", 1)[1]))
    assert error["code"] == "overloaded" and "0.5" not in error["message"], error

    line = _failure_line(caplog, request_id)
    origin = failing.origin("pool")
    assert f"route pool: request {request_id}: attempt 1 to {origin} failed (pool_timeout): " in line, line
    assert f"all 1 connections to {origin} stayed busy for 0.5 s (pool_timeout_s)" in line, line
    assert line.endswith("; answering 503 overloaded"), line
    assert "error=overloaded" in _access_line(caplog, request_id)
    # The request that held the connection was served: the pool was busy, the upstream is fine.
    assert [r.status_code for r in holder] == [200]
    assert not _lines_about(caplog, "failure-pool-held")


def _lines_about(caplog: pytest.LogCaptureFixture, request_id: str) -> list[str]:
    return [line for line in _lines(caplog, "gateway.failures") if f"request {request_id}:" in line]


def test_a_write_stall_names_write_timeout_s_and_its_value(
    failing: Failing, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    request_id = "failure-write-stall"
    answer: list[bytes] = []

    def upload() -> None:
        size = 32 << 20
        with socket.create_connection(("127.0.0.1", failing.gateway.port), timeout=30) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(
                    b"POST /write-stall/score HTTP/1.1\r\nHost: x\r\nx-request-id: %b\r\n"
                    b"Content-Length: %d\r\n\r\n" % (request_id.encode(), size)
                )
                block = b"x" * (1 << 20)
                for _ in range(size >> 20):
                    sock.sendall(block)
            with contextlib.suppress(OSError):
                answer.append(sock.recv(65536))

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    thread.join(60)
    line = _failure_line(caplog, request_id)
    origin = failing.origin("write-stall")
    assert f"route write-stall: request {request_id}: attempt 1 to {origin} failed (write_timeout): " in line
    assert "stopped reading the request for 0.5 s (write_timeout_s)" in line
    assert "error=upstream_timeout" in _access_line(caplog, request_id)
    if answer and answer[0]:
        assert b"127.0.0.1" not in answer[0]


# ------------------------------------------------------------------------------ through an egress proxy
@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForwardProxy]:
    proxy = ForwardProxy(tmp_path_factory.mktemp("auth-proxy"), f"{PROXY_USER}:{PROXY_PASSWORD}")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def policy_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForwardProxy]:
    proxy = ForwardProxy(tmp_path_factory.mktemp("policy-proxy"), plugin="proxy_policy.ForbidEverything")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def open_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForwardProxy]:
    proxy = ForwardProxy(tmp_path_factory.mktemp("open-proxy"))
    yield proxy
    proxy.stop()


def _proxied_gateway(gateway_factory: Any, proxy_port: int, **egress: Any) -> tuple[ServerThread, str]:
    closed = socket.create_server(("127.0.0.1", 0))
    origin = f"localhost:{closed.getsockname()[1]}"
    closed.close()
    route = {
        "path": "/proxied",
        "upstream": f"https://{origin}",
        "auth": {"type": "none"},
        "retry": {"attempts": 1},
    }
    config = {"egress": {"proxy": f"http://127.0.0.1:{proxy_port}", **egress}, "routes": {"proxied": route}}
    return gateway_factory(config), origin


@pytest.mark.parametrize("case", ["407", "407-wrong-credentials", "403", "502", "stopped"])
def test_an_egress_proxy_failure_names_the_proxy_and_its_answer_in_the_log_only(
    case: str,
    request: pytest.FixtureRequest,
    gateway_factory: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    egress: dict[str, Any] = {}
    if case.startswith("407"):
        proxy_port = request.getfixturevalue("auth_proxy").port
        if case == "407-wrong-credentials":
            monkeypatch.setenv("FAILURE_LOG_PROXY_AUTH", f"{PROXY_USER}:{WRONG_PASSWORD}")
            egress["proxy_auth"] = {"env": "FAILURE_LOG_PROXY_AUTH"}
    elif case == "403":
        proxy_port = request.getfixturevalue("policy_proxy").port
    elif case == "502":
        proxy_port = request.getfixturevalue("open_proxy").port
    else:
        stopped = socket.create_server(("127.0.0.1", 0))
        proxy_port = stopped.getsockname()[1]
        stopped.close()
    gw, origin = _proxied_gateway(gateway_factory, proxy_port, **egress)
    request_id = f"failure-proxy-{case}"
    response = _score(gw, "proxied", request_id)
    assert response.status_code == 502, response.text
    error = _client_sees_class_and_route_only(
        response, "proxied", str(proxy_port), REASON.decode(), "Proxy Authentication", "egress.proxy_auth"
    )
    assert error["code"] == "upstream_unreachable"

    line = _failure_line(caplog, request_id)
    proxy = f"127.0.0.1:{proxy_port}"
    head = f"route proxied: request {request_id}: attempt 1 to {origin} via the egress proxy {proxy} failed "
    assert line.startswith(line[: line.index("route proxied")]) and head in line, line
    if case == "stopped":
        assert "(proxy_unreachable): cannot connect to the egress proxy" in line, line
    else:
        status = case[:3]
        assert f"(proxy_refused): the egress proxy {proxy} refused the tunnel to {origin}: {status} " in line
        hint = {
            "407": "set egress.proxy_auth",
            "407-wrong-credentials": "the proxy refused egress.proxy_auth",
            "403": "the proxy's policy forbids this destination",
            "502": "the proxy could not reach the upstream",
        }[case]
        assert hint in line, line
    assert PROXY_PASSWORD not in line and WRONG_PASSWORD not in line
    assert "error=upstream_unreachable" in _access_line(caplog, request_id)


# ------------------------------------------------------------------------------ the rate limit
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_route_and_cause_then_a_count_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """An outage fails every request alike: the first failure is logged, the next ones within the
    interval are counted, and the first after it is logged with that count. Routes, origins, causes and
    proxy statuses are counted apart."""
    caplog.set_level(logging.WARNING, logger="gateway.failures")
    clock = Clock()
    timers: list[tuple[float, Callable[[], None]]] = []
    log = FailureLog(interval_s=10.0, clock=clock, call_later=lambda delay, fn: timers.append((delay, fn)))
    origin = Origin("https://scoring.example:443", None)
    refused = ConnectError("cannot connect to scoring.example:443: Connection refused", cause="refused")

    def fail(route: str = "iris", error: Exception = refused, request: str = "r") -> None:
        log.attempt_failed(
            route=route, request_id=request, origin=origin, attempt=1, error=error, outcome="answering 502"
        )  # type: ignore[arg-type]

    fail(request="first")
    for i in range(500):
        clock.now += 0.01
        fail(request=f"flood-{i}")
    fail(route="other")  # another route: its own first line
    fail(error=TransportTimeout("no connection (connect_timeout_s)", phase="connect"))  # another cause
    fail(error=ProxyRefused("refused: 407", status=407))
    fail(error=ProxyRefused("refused: 403", status=403))  # another proxy answer
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5, lines
    assert "request first:" in lines[0] and "not logged" not in lines[0]

    clock.now += 10.0  # the interval is over: the next failure is logged with the count
    fail(request="after")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6
    assert "request after:" in lines[-1]
    assert "(500 more failure(s) like it in the 15 s since the last such line were not logged)" in lines[-1]
    assert caplog.records[-1].suppressed == 500  # type: ignore[attr-defined]

    clock.now += 10.0  # a quiet interval: the next failure is logged alone
    fail(request="later")
    assert len(caplog.records) == 7 and "not logged" not in caplog.records[-1].getMessage()
    # The count's own line was due at the end of the first interval, but a failure logged since carried
    # the count: the timer finds nothing left to say.
    assert timers and timers[0][0] == pytest.approx(10.0 - 0.01)
    for _, fire in timers:
        fire()
    assert len(caplog.records) == 7


def test_an_outage_that_stopped_still_logs_its_count_when_the_interval_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The count is not held back until a failure after the interval: when the outage stops within it,
    a line of its own at the interval's end says how many failures were only counted."""
    caplog.set_level(logging.WARNING, logger="gateway.failures")
    clock = Clock()
    timers: list[tuple[float, Callable[[], None]]] = []
    log = FailureLog(interval_s=10.0, clock=clock, call_later=lambda delay, fn: timers.append((delay, fn)))
    origin = Origin("https://scoring.example:443", None)
    reset = ConnectError("connection to scoring.example:443 reset", cause="reset")
    for i in range(4):
        log.attempt_failed(
            route="iris", request_id=f"r{i}", origin=origin, attempt=1, error=reset, outcome="answering 502"
        )  # type: ignore[arg-type]
        clock.now += 1.0
    assert len(caplog.records) == 1 and len(timers) == 1  # one timer per interval, not one per failure
    delay, fire = timers[0]
    assert delay == pytest.approx(9.0)
    clock.now = 1010.0
    fire()
    assert len(caplog.records) == 2
    line = caplog.records[-1]
    assert line.getMessage() == (
        "route iris: 3 more attempt(s) to scoring.example:443 failed (reset) in the 10 s since the last "
        "such line; the last was request r3"
    )
    assert line.suppressed == 3 and line.levelno == logging.WARNING  # type: ignore[attr-defined]
    fire()  # nothing more to say
    assert len(caplog.records) == 2
    # The next failure starts a new interval from the count's line.
    clock.now += 1.0
    log.attempt_failed(
        route="iris", request_id="r9", origin=origin, attempt=1, error=reset, outcome="answering 502"
    )  # type: ignore[arg-type]
    assert len(caplog.records) == 2 and len(timers) == 2


def test_the_count_line_is_written_by_the_event_loop_without_another_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The default timer is the running loop's: nothing but time passing writes the count."""
    caplog.set_level(logging.WARNING, logger="gateway.failures")

    async def outage_then_quiet() -> None:
        log = FailureLog(interval_s=0.2)
        origin = Origin("https://scoring.example:443", None)
        reset = ConnectError("connection to scoring.example:443 reset", cause="reset")
        for i in range(3):
            log.attempt_failed(
                route="iris",
                request_id=f"r{i}",
                origin=origin,
                attempt=1,
                error=reset,
                outcome="answering 502",
            )  # type: ignore[arg-type]
        assert len(caplog.records) == 1
        assert await wait_for(lambda: len(caplog.records) >= 2, within=10)

    asyncio.run(outage_then_quiet())
    assert "2 more attempt(s)" in caplog.records[-1].getMessage()


def test_the_json_line_has_the_fields_as_keys(caplog: pytest.LogCaptureFixture) -> None:
    import json

    from gateway import egress
    from gateway.logs import JsonFormatter

    caplog.set_level(logging.WARNING, logger="gateway.failures")
    origin = Origin("https://scoring.example:443", None, proxy=egress.Proxy("10.0.0.5", 3128))
    error = ProxyRefused("the egress proxy 10.0.0.5:3128 refused the tunnel: 407", status=407)
    FailureLog().attempt_failed(
        route="iris", request_id="abc", origin=origin, attempt=2, error=error, outcome="answering 502"
    )
    data = json.loads(JsonFormatter().format(caplog.records[-1]))
    assert data["level"] == "warning" and data["logger"] == "gateway.failures"
    assert (data["route"], data["request_id"], data["origin"], data["attempt"]) == (
        "iris",
        "abc",
        "scoring.example:443",
        2,
    )
    assert (data["cause"], data["proxy"], data["proxy_status"]) == ("proxy_refused", "10.0.0.5:3128", 407)
