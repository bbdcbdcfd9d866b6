"""Failure semantics of forwarding (issue 11): what is replayed, how often, within which deadline.

Real gateway under uvicorn, real upstreams on loopback that count what they executed, raw sockets for
clients that misbehave, real MSAL against the emulator for the credential wait.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from azure_env import (
    clean_emulator_fixture,  # noqa: F401 - fixture
    emulator_fixture,  # noqa: F401 - fixture
    identity,
    register_app,
)
from conftest import PRIMARY, SECONDARY
from servers import ServerThread
from test_client_conformance import Peer, RawUpstream

from gateway.config import parse_config
from gateway.emulator.server import EmulatorServer
from gateway.errors import (
    ConfigError,
    ConnectError,
    ConnectionLost,
    Overloaded,
    PoolTimeout,
    ProtocolError,
    TransportTimeout,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.retry import ReplayPolicy, RetryBudget

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

AZURE_ML_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")


class Scripted:
    """An upstream that answers from a script (status, headers, delay) and counts what it received.

    Every request that reached it counts as executed: a scoring model runs once the request arrived,
    whether or not its answer gets back."""

    def __init__(self, name: str = "upstream") -> None:
        self.name = name
        self.lock = threading.Lock()
        self.script: list[tuple[int, list[tuple[bytes, bytes]], float]] = []
        self.received = 0
        self.began = 0  # requests whose head arrived (their body may still be streaming)
        self.headers: list[dict[str, str]] = []

    def then(self, status: int, headers: list[tuple[bytes, bytes]] | None = None, delay: float = 0.0) -> None:
        with self.lock:
            self.script.append((status, headers or [], delay))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        with self.lock:
            self.began += 1
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            if not message.get("more_body"):
                break
        with self.lock:
            self.received += 1
            self.headers.append({k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]})
            status, headers, delay = self.script.pop(0) if self.script else (200, [], 0.0)
        if delay:
            await asyncio.sleep(delay)
        body = b'{"upstream": "%s", "status": %d}' % (self.name.encode(), status)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def scripted() -> Any:
    app = Scripted()
    with ServerThread(app, lifespan="off") as server:
        yield app, server


def open_route(url: str, **options: Any) -> dict[str, Any]:
    return {"path": "/iris", "upstream": url, "auth": {"type": "none"}, **options}


def access_line(caplog: pytest.LogCaptureFixture, request_id: str, within: float = 20) -> logging.LogRecord:
    """The gateway's access line for `request_id`, once written (after the request is over: its last
    attempt, its answer and its clean-up)."""
    deadline = time.monotonic() + within
    while True:
        for record in caplog.records:
            if record.name == "gateway.access" and getattr(record, "request_id", None) == request_id:
                return record
        assert time.monotonic() < deadline, f"no access line for request {request_id} within {within} s"
        time.sleep(0.01)


def primary_upstream(gw: ServerThread) -> Any:
    """The gateway's own record of the route's first upstream (its ejection and probe, on this
    process's monotonic clock: the gateway runs in-process)."""
    return gw.app.router.by_name["iris"].balancer.upstreams[0]


def wait_past(instant: float, within: float = 30) -> None:
    """Until `time.monotonic()` is past `instant`, a time the gateway set on the same clock."""
    assert instant - time.monotonic() < within, "the gateway's deadline is further away than expected"
    while time.monotonic() <= instant:
        time.sleep(0.01)


def wait_until(predicate: Any, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"not true within {within} s"
        time.sleep(0.01)


# ----------------------------------------------------------------------------------- replay defaults


def test_sparse_failures_are_each_retried(scripted, gateway_factory):
    """A quiet sidecar: a 502 once, a 503 twice, a 429 with Retry-After: 1, a moment apart. The budget's
    floor lets every one be retried; the client sees only answers."""
    app, server = scripted
    gw = gateway_factory({"routes": {"sparse": open_route(server.url)}})
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        retries_before = _retries(client, "sparse")
        app.then(502)
        assert client.post("/iris/score", content=b"{}").status_code == 200
        assert app.received == 2
        time.sleep(0.5)
        app.then(503)
        app.then(503)
        assert client.post("/iris/score", content=b"{}").status_code == 200
        assert app.received == 5
        time.sleep(0.5)
        app.then(429, [(b"retry-after", b"1")])
        started = time.monotonic()
        assert client.post("/iris/score", content=b"{}").status_code == 200
        assert time.monotonic() - started >= 0.9, "Retry-After: 1 was not honoured"
        assert app.received == 7
        assert _retries(client, "sparse") == retries_before + 4  # every retry is counted


def _http_date(seconds_from_now: float, form: str = "IMF-fixdate") -> bytes:
    """An HTTP-date (RFC 9110 5.6.7) in one of its three forms, all GMT (whole seconds: truncated)."""
    when = datetime.fromtimestamp(time.time() + seconds_from_now, UTC)
    text = {
        "IMF-fixdate": f"{when:%a, %d %b %Y %H:%M:%S} GMT",
        "rfc850": f"{when:%A, %d-%b-%y %H:%M:%S} GMT",
        "asctime": f"{when:%a %b} {when.day:2d} {when:%H:%M:%S %Y}",  # the day padded with a space
    }[form]
    return text.encode()


@pytest.mark.parametrize("form", ["IMF-fixdate", "rfc850", "asctime"])
def test_retry_after_as_an_http_date_is_waited_until_that_date(form):
    """RFC 9110 10.2.3: Retry-After is delay-seconds or an HTTP-date. A date within retry_after_cap_s is
    waited for (until the date: dates are whole seconds, so up to a second less than asked), a past
    date is no wait; either way under the same cap as the seconds form."""
    policy = ReplayPolicy(retry_after_cap_s=5)
    ahead = policy.status_delay([(b"Retry-After", _http_date(3, form))], 1)
    assert ahead is not None and 1.0 < ahead <= 3.0, ahead
    assert policy.status_delay([(b"retry-after", _http_date(-100, form))], 1) == 0.0
    assert policy.status_delay([(b"retry-after", _http_date(60, form))], 1) is None  # past the cap


@pytest.mark.parametrize(
    "value",
    [b"Tomorrow", b"Fri, 32 Foo 2024 00:00:00 GMT", b"Sun, 06 Nov 1994 25:49:37 GMT", b"Sun, 06 Nov 99999 "],
)
def test_retry_after_neither_seconds_nor_an_http_date_is_passed_on(value):
    assert ReplayPolicy().status_delay([(b"retry-after", value)], 1) is None


@pytest.mark.parametrize(
    ("status", "seconds_from_now"),
    [pytest.param(503, 1, id="503-a-second-ahead"), pytest.param(429, -100, id="429-long-past")],
)
def test_retry_after_as_an_http_date_is_honoured_through_the_gateway(
    scripted, gateway_factory, caplog, status, seconds_from_now
):
    """A 503 whose Retry-After is a date a second ahead (or a 429 whose date is past) was passed straight
    to the client, while `Retry-After: 1` was waited out and retried."""
    app, server = scripted
    gw = gateway_factory({"routes": {"dates": open_route(server.url)}})
    caplog.set_level(logging.INFO, logger="gateway.access")
    app.then(status, [(b"retry-after", _http_date(seconds_from_now))])
    request_id = f"retry-after-date-{status}"
    response = httpx.post(
        gw.url + "/iris/score", content=b"{}", headers={"x-request-id": request_id}, timeout=30
    )
    assert response.status_code == 200, response.text
    assert app.received == 2
    line = access_line(caplog, request_id).getMessage()
    assert " status=200 upstream_status=200 " in line and " attempts=2 " in line, line


def _retries(client: httpx.Client, route: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'gateway_upstream_retries_total{{route="{route}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_timeout_on_a_post_is_not_replayed_by_default(scripted, gateway_factory, caplog):
    """Azure ML answers at request_timeout_ms while the model keeps working: replaying would double the
    load on a model that is already too slow. One execution, 504 to the client."""
    app, server = scripted
    gw = gateway_factory({"routes": {"iris": open_route(server.url, timeout_s=0.3)}})
    app.then(200, delay=1.0)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        response = httpx.post(gw.url + "/iris/score", content=b"{}", timeout=10)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        # The access line is written once the request is over (no replay can follow it): positive
        # evidence, instead of sleeping for as long as a replay might take to arrive.
        line = access_line(caplog, response.headers["x-request-id"])
    assert line.attempts == 1  # type: ignore[attr-defined]
    assert app.received == 1


def test_timeout_is_replayed_with_on_timeouts(scripted, gateway_factory):
    app, server = scripted
    route = open_route(server.url, timeout_s=0.3, retry={"on_timeouts": True})
    gw = gateway_factory({"routes": {"iris": route}})
    app.then(200, delay=1.0)
    response = httpx.post(gw.url + "/iris/score", content=b"{}", timeout=10)
    assert response.status_code == 200
    assert app.received == 2


def test_504_and_408_are_not_replayed_by_default(scripted, gateway_factory):
    app, server = scripted
    gw = gateway_factory({"routes": {"iris": open_route(server.url)}})
    for status in (504, 408):
        before = app.received
        app.then(status)
        response = httpx.post(gw.url + "/iris/score", content=b"{}", timeout=10)
        assert response.status_code == status
        assert app.received == before + 1, f"a {status} on a POST was replayed"


def test_504_and_408_are_replayed_with_on_timeouts(scripted, gateway_factory):
    app, server = scripted
    gw = gateway_factory({"routes": {"iris": open_route(server.url, retry={"on_timeouts": True})}})
    for status in (504, 408):
        before = app.received
        app.then(status)
        response = httpx.post(gw.url + "/iris/score", content=b"{}", timeout=10)
        assert response.status_code == 200
        assert app.received == before + 2


def test_424_is_never_replayed_and_model_error_headers_reach_the_client(scripted, gateway_factory):
    app, server = scripted
    gw = gateway_factory({"routes": {"iris": open_route(server.url, retry={"on_timeouts": True})}})
    app.then(
        424,
        [
            (b"ms-azureml-model-error-statuscode", b"500"),
            (b"ms-azureml-model-error-reason", b"model_error"),
        ],
    )
    response = httpx.post(gw.url + "/iris/score", content=b"{}", timeout=10)
    assert response.status_code == 424
    assert response.headers["ms-azureml-model-error-statuscode"] == "500"
    assert response.headers["ms-azureml-model-error-reason"] == "model_error"
    assert app.received == 1


def test_424_in_on_statuses_is_refused():
    with pytest.raises(ConfigError) as raised:
        parse_config({"routes": {"iris": open_route("http://u", retry={"on_statuses": [424, 503]})}})
    assert "424" in str(raised.value)


@pytest.mark.parametrize(
    ("retry", "says"),
    [
        ({"on_statuses": [503, 504]}, "504 and 408 are replayed by retry.on_timeouts"),
        ({"on_statuses": [408]}, "504 and 408 are replayed by retry.on_timeouts"),
        ({"on_statuses": [200, 503]}, "200 is not an error status"),
        ({"on_statuses": [302]}, "302 is not an error status"),
        ({"on_statuses": [99]}, "99 is not an error status"),
        ({"on_statuses": [600]}, "600 is not an error status"),
    ],
)
def test_on_statuses_takes_only_error_statuses_and_timeouts_only_with_on_timeouts(retry, says):
    """A replayed 2xx would execute a request twice that succeeded; a replayed 504 or 408 (the model may
    still be working on it) is the choice `on_timeouts` makes, explicitly."""
    with pytest.raises(ConfigError) as raised:
        parse_config({"routes": {"iris": open_route("http://u", retry=retry)}})
    assert says in str(raised.value) and "routes.iris.retry" in str(raised.value), raised.value
    assert "on_statuses" in str(raised.value)
    # With the switch set, naming them as well is consistent.
    config = parse_config(
        {
            "routes": {
                "iris": open_route("http://u", retry={"on_statuses": [503, 504, 408], "on_timeouts": True})
            }
        }
    )
    assert {408, 504} <= ReplayPolicy.from_config(config.routes["iris"].retry).statuses


def test_default_retry_statuses():
    config = parse_config({"routes": {"iris": open_route("http://u")}})
    retry = config.routes["iris"].retry
    assert sorted(retry.on_statuses) == [429, 502, 503]
    assert retry.on_timeouts is False and retry.min_retries_per_s == 10


class CuttingUpstream:
    """A raw-socket upstream that reads each request whole, counts it, and closes the connection
    without answering: the request was sent and may have been executed."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if data:
                    self.received += 1

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("opt_in", [False, True])
def test_connection_lost_after_sending_is_replayed_only_with_the_opt_in(gateway_factory, opt_in):
    upstream = CuttingUpstream()
    try:
        route = open_route(upstream.url, retry={"on_connection_lost": True} if opt_in else {})
        gw = gateway_factory({"routes": {"iris": route}})
        response = httpx.post(gw.url + "/iris/score", content=b"{}", timeout=10)
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "upstream_unreachable"
        assert upstream.received == (3 if opt_in else 1)
    finally:
        upstream.close()


# --------------------------------------------------------------------- a refusal with a large body

REFUSAL_BODY = 64 << 20  # far beyond every socket buffer between the upstream and the gateway


class LargeRefusal:
    """A raw upstream that refuses (the requests `refuses` picks) with `head` and a REFUSAL_BODY-byte body
    written as fast as the gateway reads it, and answers everything else with a small 200. `outcomes`
    says, per refusal, whether its body was written whole or the write broke off (the gateway closed the
    connection), and after how many body bytes."""

    def __init__(self, head: bytes, refuses: Callable[[bytes], bool]) -> None:
        self.head = head
        self.refuses = refuses
        self.lock = threading.Lock()
        self.outcomes: list[tuple[str, int]] = []

    async def __call__(self, peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            if not self.refuses(request[0]):
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nreplayed")
                continue
            await peer.send(self.head + b"Content-Length: %d\r\n\r\n" % REFUSAL_BODY)
            block = b"r" * (64 * 1024)
            sent = 0
            try:
                while sent < REFUSAL_BODY:
                    await peer.send(block)
                    sent += len(block)
            except ConnectionError:
                with self.lock:
                    self.outcomes.append(("broken off", sent))
                return
            with self.lock:
                self.outcomes.append(("written whole", sent))

    def outcome(self) -> tuple[str, int]:
        wait_until(lambda: bool(self.outcomes))
        with self.lock:
            return self.outcomes[0]


def _first_request(head: bytes, seen: list[bytes]) -> bool:
    seen.append(head)
    return len(seen) == 1


@pytest.mark.parametrize(
    "refusal",
    [
        pytest.param(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\n", id="503-retry-after-0"),
        pytest.param(b"HTTP/1.1 401 Unauthorized\r\n", id="401-key-failover"),
    ],
)
def test_a_refusal_with_a_large_body_is_not_read_whole_before_the_replay(
    gateway_factory, monkeypatch, caplog, refusal
):
    """A retryable refusal (503 with Retry-After: 0) or a refused key (401, replayed with the secondary)
    comes with a 64 MiB body: the gateway drops a small bounded part of it and closes that connection
    instead of reading (and holding) the rest, and the replay, on a new connection, answers the client.
    Evidence from the upstream's side: the refusal's write broke off before its end."""
    seen: list[bytes] = []
    if refusal.startswith(b"HTTP/1.1 401"):
        monkeypatch.setenv("TEST_PRIMARY", PRIMARY)
        monkeypatch.setenv("TEST_SECONDARY", SECONDARY)
        auth = {"type": "key", "primary": {"env": "TEST_PRIMARY"}, "secondary": {"env": "TEST_SECONDARY"}}
        upstream_app = LargeRefusal(refusal, lambda head: PRIMARY.encode() in head)
    else:
        auth = {"type": "none"}
        upstream_app = LargeRefusal(refusal, lambda head: _first_request(head, seen))
    caplog.set_level(logging.INFO, logger="gateway.access")
    with RawUpstream(upstream_app) as upstream:
        gw = gateway_factory({"routes": {"iris": {"path": "/iris", "upstream": upstream.url, "auth": auth}}})
        response = httpx.post(
            gw.url + "/iris/score", content=b"{}", headers={"x-request-id": "large-refusal"}, timeout=30
        )
        assert response.status_code == 200, response.text
        assert response.content == b"replayed"
        how, sent = upstream_app.outcome()
        assert how == "broken off" and sent < REFUSAL_BODY, (how, sent)
        assert upstream.accepted == 2  # the refusal's connection was closed, not pooled for the replay
    line = access_line(caplog, "large-refusal").getMessage()
    assert " status=200 upstream_status=200 " in line and " attempts=2 " in line, line


# ----------------------------------------------------------------------------------- the retry budget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_floor_retries_a_quiet_routes_every_failure():
    clock = Clock()
    budget = RetryBudget(min_retries_per_s=10, ratio=0.2, clock=clock)
    for _ in range(50):  # one request every 3 s, each failing once
        budget.deposit()
        assert budget.try_withdraw()
        clock.now += 3.0


def test_budget_outage_is_not_amplified_beyond_floor_plus_ratio():
    clock = Clock()
    budget = RetryBudget(min_retries_per_s=10, ratio=0.2, clock=clock)
    requests = retries = 0
    seconds = 60
    for _ in range(seconds * 100):  # 100 requests per second, every one wanting 2 retries
        budget.deposit()
        requests += 1
        for _ in range(2):
            retries += budget.try_withdraw()
        clock.now += 0.01
    # The floor (10/s) and the ratio (20% of requests), plus one window's floor in reserve at the start.
    allowed = 10 * seconds + 0.2 * requests + 10 * RetryBudget.WINDOW_S
    assert retries <= allowed, (retries, allowed)
    assert retries >= 0.9 * (10 * seconds + 0.2 * requests)  # and it is not stingier than promised


def test_budget_burst_is_bounded_by_the_floors_reserve():
    clock = Clock()
    budget = RetryBudget(min_retries_per_s=10, ratio=0.0, clock=clock)
    assert sum(budget.try_withdraw() for _ in range(1000)) == 10 * RetryBudget.WINDOW_S
    clock.now += RetryBudget.WINDOW_S + 1  # the window moves on: the reserve is back
    assert budget.try_withdraw()


def test_budget_ratio_alone_without_floor():
    clock = Clock()
    budget = RetryBudget(min_retries_per_s=0, ratio=0.2, clock=clock)
    for _ in range(100):
        budget.deposit()
    assert sum(budget.try_withdraw() for _ in range(100)) == 20


def test_an_outage_through_the_proxy_is_held_to_the_retry_budget(scripted, gateway_factory):
    """Every answer is 503 (an outage): each request would be sent `attempts` (3) times, tripling the
    load on a failing upstream. Through the real proxy, the route's budget (a floor of 1 retry per
    window plus 10% of the requests) holds the retries to a few, and every one that happens is counted."""
    app, server = scripted
    for _ in range(200):
        app.then(503)
    retry = {"min_retries_per_s": 0.1, "budget_ratio": 0.1, "backoff_base_s": 0}
    gw = gateway_factory({"routes": {"outage": open_route(server.url, retry=retry)}})
    requests = 20
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        retries_before = _retries(client, "outage")
        statuses = [client.post("/iris/score", content=b"{}").status_code for _ in range(requests)]
        retries = _retries(client, "outage") - retries_before
    assert statuses == [503] * requests  # the upstream's own answer, passed on
    # Within one 10 s window the budget allows 1 + 0.1 * 20 = 3 retries (the ratio's share needs every
    # request counted: 1 without); a slow machine spreading the requests over two windows gets one more
    # floor. Without the budget: 2 retries each, 40.
    assert 3 <= app.received - requests <= 5, f"{app.received} upstream executions for {requests} requests"
    assert retries == app.received - requests


# ----------------------------------------------------------------------------------- transport errors


def _policy(**options: Any) -> ReplayPolicy:
    config = parse_config({"routes": {"iris": open_route("http://u", retry=options)}})
    return ReplayPolicy.from_config(config.routes["iris"].retry)


def test_transport_errors_map_to_client_errors_and_replay_kinds():
    policy = _policy()
    cases = [
        (PoolTimeout("pool busy"), Overloaded, False, False),
        (ProtocolError("bad status line"), UpstreamProtocolError, False, True),
        (TransportTimeout("slow", phase="read"), UpstreamTimeout, False, True),
        (TransportTimeout("no connect", phase="connect", request_sent=False), UpstreamTimeout, True, True),
        (ConnectError("refused"), UpstreamUnreachable, True, True),
        (ConnectionLost("closed", request_sent=False), UpstreamUnreachable, True, True),
        (ConnectionLost("closed"), UpstreamUnreachable, False, True),
    ]
    for exc, error_type, replayable, upstream_fault in cases:
        failure = policy.transport_failure(exc, "iris")
        assert isinstance(failure.error, error_type), exc
        assert failure.replayable is replayable, exc
        assert failure.upstream_fault is upstream_fault, exc
    assert policy.transport_failure(PoolTimeout("x"), "iris").error.retry_after


def test_opt_ins_make_sent_failures_replayable():
    policy = _policy(on_timeouts=True, on_connection_lost=True)
    assert policy.transport_failure(TransportTimeout("slow", phase="read"), "r").replayable
    assert policy.transport_failure(ConnectionLost("closed"), "r").replayable
    assert not policy.transport_failure(PoolTimeout("busy"), "r").replayable
    off = _policy(on_connection_errors=False)
    assert not off.transport_failure(ConnectError("refused"), "r").replayable
    assert 504 in policy.statuses and 408 in policy.statuses
    assert 504 not in _policy().statuses


# ----------------------------------------------------------------------------------- bounded waits


def _headers_only(port: int, path: str, timeout: float) -> tuple[bytes, float]:
    """Send a request head announcing a body, never the body; return what came back and how fast."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        started = time.monotonic()
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 64\r\n\r\n".encode()
        )
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or b"}" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except TimeoutError:
            pass
        return answer, time.monotonic() - started


def test_credential_wait_is_bounded_by_the_deadline_before_the_body_is_read(emulator: EmulatorServer):
    """A token fetch takes 2.5 s; the route's deadline is 1 s. The client gets 503
    credential_unavailable within the deadline, though it never sent its body."""
    app = register_app(emulator)
    emulator.state.set_fault("token", delay_s=2.5, count=1)
    config = {
        "tls": {"ca_bundle": str(emulator.ca_file)},
        "server": {"access_log": False},
        "routes": {
            "aad": {
                "path": "/aad",
                "upstream": emulator.http_url,
                "retry": {"deadline_s": 1.0},
                "auth": {"type": "aad_token", "identity": identity(emulator, app)},
            }
        },
    }
    from gateway.app import GatewayApp

    with ServerThread(GatewayApp(parse_config(config))) as gw:
        answer, _ = _headers_only(gw.port, "/aad/score", timeout=15)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"credential_unavailable" in answer
    assert b"retry-after" in answer.lower()
    # The deadline's timer cut the wait, not the fetch's end: its message says so, and a token fetched
    # in time would have sent the request on to wait for its body instead.
    assert b"within the route's deadline of 1 s" in answer


# ----------------------------------------------------------------------------------- outlier probes


def _probe_setup(gateway_factory: Any, primary: ServerThread, standby: ServerThread) -> ServerThread:
    route = {
        "path": "/iris",
        "upstreams": [{"url": primary.url, "priority": 0}, {"url": standby.url, "priority": 1}],
        "auth": {"type": "none"},
        "replay_buffer_bytes": 16,
        "max_body_bytes": 1000,
        "outlier": {"consecutive_failures": 1, "ejection_s": 0.3},
    }
    return gateway_factory({"routes": {"iris": route}})


def _interrupt_probe(port: int, how: str, request_id: str, probing: Any) -> bytes:
    """A chunked body bigger than the replay buffer, so the attempt starts while the body streams; then
    the client goes away (`disconnect`) or sends more than the route accepts (`body_limit`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /iris/score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            + f"x-request-id: {request_id}\r\n\r\n".encode()
            + b"20\r\n"
            + b"x" * 32
            + b"\r\n"
        )
        wait_until(probing)  # the gateway has started the (probe) attempt and is streaming the body
        if how == "disconnect":
            sock.shutdown(socket.SHUT_RDWR)
            return b""
        chunk = b"y" * 1500
        sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n0\r\n\r\n")
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except (TimeoutError, ConnectionResetError):
            pass
        return answer


@pytest.mark.parametrize("how", ["disconnect", "body_limit"])
def test_interrupted_probe_is_cleared_and_traffic_returns_to_the_primary(gateway_factory, how, caplog):
    primary_app, standby_app = Scripted("primary"), Scripted("standby")
    caplog.set_level(logging.INFO, logger="gateway.access")
    with (
        ServerThread(primary_app, lifespan="off") as primary,
        ServerThread(standby_app, lifespan="off") as standby,
    ):
        gw = _probe_setup(gateway_factory, primary, standby)
        upstream = primary_upstream(gw)
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            primary_app.then(502)  # ejects the primary; the retry goes to the standby
            response = client.post("/iris/score", content=b"{}")
            assert response.status_code == 200 and b"standby" in response.content
            assert upstream.ejected_until > 0
            wait_past(upstream.ejected_until)  # the ejection is over: the next request probes the primary
            began = primary_app.began
            request_id = f"probe-{how}"
            answer = _interrupt_probe(
                gw.port,
                how,
                request_id,
                lambda: upstream.probe_owner is not None and primary_app.began > began,
            )
            if how == "body_limit":
                assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
            access_line(caplog, request_id)  # the interrupted request is over, its clean-up done
            served = [client.post("/iris/score", content=b"{}").json()["upstream"] for _ in range(5)]
        assert served[-1] == "primary", (
            f"traffic stayed on the standby after the probe was interrupted: {served}"
        )


def test_probe_without_verdict_lapses_after_its_deadline(gateway_factory):
    """A probe whose request never ends (a slow model) stops blocking the primary after
    `outlier.probe_timeout_s`: the next request probes again."""
    primary_app, standby_app = Scripted("primary"), Scripted("standby")
    with (
        ServerThread(primary_app, lifespan="off") as primary,
        ServerThread(standby_app, lifespan="off") as standby,
    ):
        route = {
            "path": "/iris",
            "upstreams": [{"url": primary.url, "priority": 0}, {"url": standby.url, "priority": 1}],
            "auth": {"type": "none"},
            "outlier": {"consecutive_failures": 1, "ejection_s": 0.3, "probe_timeout_s": 0.5},
        }
        gw = gateway_factory({"routes": {"iris": route}})
        upstream = primary_upstream(gw)
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            primary_app.then(502)
            assert client.post("/iris/score", content=b"{}").json()["upstream"] == "standby"
            wait_past(upstream.ejected_until)  # the ejection is over: the next request probes
            primary_app.then(200, delay=3.0)  # the probe: slow, no verdict for 3 s
            began = primary_app.began
            slow = threading.Thread(target=lambda: client.post("/iris/score", content=b"{}"))
            slow.start()
            wait_until(lambda: upstream.probe_owner is not None and primary_app.began > began)
            wait_past(upstream.probe_until)  # past the probe's deadline, by the gateway's own clock
            assert upstream.probe_owner is not None  # still no verdict: only the deadline frees it
            assert client.post("/iris/score", content=b"{}").json()["upstream"] == "primary"
            slow.join(10)


# ----------------------------------------------------------------------------------- correlation


def test_client_request_id_set_when_absent_in_azure_ml_format(scripted, gateway_factory, caplog):
    app, server = scripted
    gw = gateway_factory({"routes": {"iris": open_route(server.url)}})
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        response = httpx.post(gw.url + "/iris/score", content=b"{}")
        access_line(caplog, response.headers["x-request-id"])  # written once the answer is sent
    sent = app.headers[-1]
    assert AZURE_ML_REQUEST_ID.fullmatch(sent["x-ms-client-request-id"]), sent["x-ms-client-request-id"]
    assert sent["x-ms-client-request-id"] == response.headers["x-request-id"] == sent["x-request-id"]
    logged = [r for r in caplog.records if r.name == "gateway.access"]
    assert [r.request_id for r in logged] == [sent["x-ms-client-request-id"]]  # type: ignore[attr-defined]


def test_client_request_id_kept_when_present(scripted, gateway_factory):
    app, server = scripted
    gw = gateway_factory({"routes": {"iris": open_route(server.url)}})
    httpx.post(gw.url + "/iris/score", content=b"{}", headers={"x-ms-client-request-id": "client-123"})
    assert app.headers[-1]["x-ms-client-request-id"] == "client-123"


def test_client_request_id_from_an_x_request_id_azure_ml_accepts(scripted, gateway_factory):
    """The client's x-request-id becomes the gateway's request id (and Azure ML's) when it fits Azure
    ML's format; otherwise the gateway uses its own, so the two logs still join."""
    app, server = scripted
    gw = gateway_factory({"routes": {"iris": open_route(server.url)}})
    response = httpx.post(gw.url + "/iris/score", content=b"{}", headers={"x-request-id": "abc_123-XYZ"})
    assert response.headers["x-request-id"] == "abc_123-XYZ"
    assert app.headers[-1]["x-ms-client-request-id"] == "abc_123-XYZ"
    for unfit in ("has space", "x" * 41, "dots.are.not.allowed"):
        response = httpx.post(gw.url + "/iris/score", content=b"{}", headers={"x-request-id": unfit})
        own = response.headers["x-request-id"]
        assert own != unfit and AZURE_ML_REQUEST_ID.fullmatch(own)
        assert app.headers[-1]["x-ms-client-request-id"] == own
