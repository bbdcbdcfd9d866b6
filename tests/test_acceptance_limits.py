"""Admission control end to end (issue 17): the real gateway on loopback, real HTTP, raw sockets where
a client misbehaves, a real redis-server.

- a client burst of 5x an endpoint's capacity (the emulator answers 429 beyond `max_concurrent`): zero
  429s reach clients with a static limit and with `auto`; without a limit they do (the baseline);
- a concurrency slot is given back on every way a request ends, and thousands of mixed endings leave the
  in-flight and queue gauges at 0;
- refusals (`route_busy`, `rate_limited`) come before the body is read;
- per-caller rates: 429 with `Retry-After`, `RateLimit-Policy` and `RateLimit`; refused requests use no
  quota; callers have their own buckets; `limits.callers` overrides; `inbound.limits` spans the routes;
- two replicas share one quota in Redis; Redis killed, restarted or stalled never fails or holds a
  request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import re
import signal
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import HYGIENE, PRIMARY, key_route
from prometheus_client.parser import text_string_to_metric_families
from redis_server import RedisServer
from remote_emulator import RemoteEmulator, start_emulator, stop_emulator
from servers import ServerThread, free_socket, gateway_process
from upstream import Upstream

from gateway.app import GatewayApp
from gateway.concurrency import ConcurrencyLimit

KEY_ENV = "LIMITS_TEST_KEY"
ALICE_KEY = "alice-gateway-key-5f0c2a"
BOB_KEY = "bob-gateway-key-91d7e3"
for _value, _name in ((ALICE_KEY, "ALICE_KEY"), (BOB_KEY, "BOB_KEY")):
    HYGIENE.add_secret(_value, f"tests/test_acceptance_limits.py {_name}")


# --------------------------------------------------------------------------------------------- helpers
def _wait(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for: {what}"
        time.sleep(0.01)


def _metric(base_url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _raw(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(data)
    return sock


def _answer_head(sock: socket.socket) -> bytes:
    """The answer's bytes up to the end of its head (and whatever came with it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _limit_of(server: ServerThread, route: str = "iris") -> ConcurrencyLimit:
    app = server.app
    assert isinstance(app, GatewayApp)
    limit = app.router.by_name[route].concurrency
    assert limit is not None
    return limit


def _settled(server: ServerThread, route: str = "iris") -> None:
    """Every slot of the route is given back: the limit's own counts and the gauges at 0."""
    limit = _limit_of(server, route)
    _wait(lambda: (limit.in_flight, limit.queued) == (0, 0), 20, f"route {route} back to 0 in flight")
    assert _metric(server.url, "gateway_admission_in_flight", route=route) == 0
    assert _metric(server.url, "gateway_admission_queued", route=route) == 0
    assert _metric(server.url, "gateway_in_flight_requests", route=route) == 0


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest.fixture(autouse=True)
def _no_client_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    """Thousands of requests here: httpx's line per request would crowd the session's secret-hygiene
    record (tests/conftest.py), which has room for 64 MB; the gateway's own lines stay."""
    caplog.set_level(logging.WARNING, logger="httpx")


# A gateway under sustained load in these tests writes no access lines (same reason); the tests that read
# access lines keep them.
QUIET = {"access_log": False}


@pytest.fixture
def upstream_key(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv(KEY_ENV, PRIMARY)
    return {"primary": {"env": KEY_ENV}}


# ------------------------------------------------------------------------ a. a burst at 5x capacity
CAPACITY = 4
CLIENTS = 5 * CAPACITY
REQUESTS_PER_CLIENT = 10
SERVICE_S = 0.05
CLIENT_DEADLINE_S = 10.0
BODY = b'{"data": [[5.1, 3.5, 1.4, 0.2]]}'


@dataclass
class Burst:
    mode: str
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    durations: list[float] = field(default_factory=list)
    upstream: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        durations = sorted(self.durations) or [0.0]
        return (
            f"{self.mode:>6}: client statuses {dict(sorted(self.statuses.items()))} "
            f"codes {dict(self.codes)}, client time median {statistics.median(durations) * 1000:.0f} ms "
            f"p95 {durations[int(0.95 * (len(durations) - 1))] * 1000:.0f} ms "
            f"max {durations[-1] * 1000:.0f} ms; "
            f"upstream peak in flight {self.upstream.get('peak_in_flight')} (capacity {CAPACITY}), mean "
            f"{self.upstream.get('mean_in_flight', 0):.2f}, throttled {self.upstream.get('throttled')}"
        )


@pytest.fixture(scope="module")
def emulator() -> Iterator[RemoteEmulator]:
    remote = start_emulator(capacity=CAPACITY, score_delay_s=SERVICE_S)
    HYGIENE.add_secret(remote.key, "the emulator's primary key")
    try:
        yield remote
    finally:
        stop_emulator(remote)


def _burst_config(port: int, emulator: RemoteEmulator, limits: dict[str, Any]) -> dict[str, Any]:
    route: dict[str, Any] = {
        "path": "/iris",
        "upstream": emulator.scoring_uri,
        "auth": {"type": "key", "primary": {"env": KEY_ENV}},
        "timeout_s": CLIENT_DEADLINE_S,
        "retry": {"deadline_s": CLIENT_DEADLINE_S},
    }
    if limits:
        route["limits"] = limits
    return {"server": {"host": "127.0.0.1", "port": port, "log_format": "text"}, "routes": {"iris": route}}


async def _drive_burst(url: str, result: Burst) -> None:
    async def client(http: httpx.AsyncClient) -> None:
        for _ in range(REQUESTS_PER_CLIENT):
            started = time.perf_counter()
            response = await http.post(url, content=BODY, headers={"content-type": "application/json"})
            result.durations.append(time.perf_counter() - started)
            result.statuses[response.status_code] += 1
            if response.status_code != 200:
                try:
                    result.codes[response.json()["error"]["code"]] += 1
                except Exception:
                    result.codes["upstream"] += 1

    limits = httpx.Limits(max_connections=CLIENTS + 5)
    async with httpx.AsyncClient(timeout=CLIENT_DEADLINE_S + 5, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))


def _burst(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    emulator: RemoteEmulator,
    mode: str,
    limits: dict[str, Any],
) -> Burst:
    monkeypatch.setenv(KEY_ENV, emulator.key)
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    result = Burst(mode)
    with gateway_process(_burst_config(port, emulator, limits), tmp_path):
        emulator.admin("reset-counters", {})
        asyncio.run(_drive_burst(f"http://127.0.0.1:{port}/iris", result))
        result.upstream = emulator.deployment()
        if limits:
            assert _metric(f"http://127.0.0.1:{port}", "gateway_admission_in_flight", route="iris") == 0
    print(result.summary())
    return result


@pytest.mark.parametrize(
    ("mode", "limits"),
    [
        ("static", {"max_concurrent": CAPACITY, "queue": 10 * CLIENTS, "queue_timeout_s": CLIENT_DEADLINE_S}),
        (
            "auto",
            {"max_concurrent": "auto", "min": 1, "max": 64, "queue": 10 * CLIENTS, "queue_timeout_s": 9},
        ),
    ],
)
def test_a_burst_of_five_times_capacity_gives_clients_no_429(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    emulator: RemoteEmulator,
    mode: str,
    limits: dict[str, Any],
) -> None:
    result = _burst(tmp_path, monkeypatch, emulator, mode, limits)
    total = CLIENTS * REQUESTS_PER_CLIENT
    assert result.statuses == {200: total}, result.summary()
    assert result.upstream["peak_in_flight"] <= CAPACITY, result.summary()
    assert result.upstream["served"] == total, result.summary()
    # The endpoint is kept busy, not starved (generous: the exact figure is in the summary).
    assert result.upstream["mean_in_flight"] >= 0.5 * CAPACITY, result.summary()
    if mode == "static":
        assert result.upstream["throttled"] == 0, result.summary()
    else:
        # `auto` learns the capacity by overshooting it now and then; the gateway replays those 429s.
        assert result.upstream["throttled"] <= 0.1 * total, result.summary()


def test_without_a_limit_the_same_burst_reaches_clients_as_429(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emulator: RemoteEmulator
) -> None:
    """The baseline: the test above could not fail if the endpoint never throttled."""
    result = _burst(tmp_path, monkeypatch, emulator, "none", {})
    assert result.statuses[429] > 0, result.summary()
    assert result.upstream["throttled"] > 0.25 * CLIENTS * REQUESTS_PER_CLIENT, result.summary()


# ------------------------------------------------------------------ b. the slot comes back, always
@pytest.fixture
def limited(
    upstream: tuple[Upstream, ServerThread],
    gateway_factory: Callable[..., ServerThread],
    upstream_key: dict[str, Any],
) -> tuple[Upstream, ServerThread]:
    """A gateway whose route `iris` runs one request at a time with one waiting (for up to 10 s)."""
    app, server = upstream
    route = key_route(server.url, **upstream_key)
    route.update(
        timeout_s=0.5,
        retry={"attempts": 1},
        limits={"max_concurrent": 1, "queue": 1, "queue_timeout_s": 10},
    )
    dead = key_route(f"http://127.0.0.1:{_closed_port()}", **upstream_key)
    dead.update(path="/dead", retry={"attempts": 1}, limits={"max_concurrent": 1})
    gw = gateway_factory(
        {"server": {"client_body_timeout_s": 120}, "routes": {"iris": route, "dead": dead}},
        timeout_graceful_shutdown=1,
    )
    return app, gw


def _closed_port() -> int:
    sock = free_socket()
    port = int(sock.getsockname()[1])
    sock.close()
    return port


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/iris/echo", 200),  # success
        ("/iris/status/500", 500),  # the upstream's error, passed on
        ("/dead/echo", 502),  # the upstream unreachable
        ("/iris/hang", 504),  # the upstream too slow: timeout_s
        ("/iris/reset", None),  # the upstream broke off mid-answer: the client's connection is cut
    ],
)
def test_the_slot_is_given_back_after_every_answer(
    limited: tuple[Upstream, ServerThread], path: str, status: int | None
) -> None:
    _, gw = limited
    route = path.split("/")[1]
    try:
        answer = httpx.get(gw.url + path, timeout=10)
        answer.read()
        got: int | None = answer.status_code
    except httpx.HTTPError:
        got = None
    assert got == status
    _settled(gw, route)
    # Not leaked: the only slot serves the next request at once.
    if route == "iris":
        assert httpx.get(gw.url + "/iris/echo", timeout=10).status_code == 200


def test_a_client_gone_mid_upstream_gives_the_slot_back(limited: tuple[Upstream, ServerThread]) -> None:
    app, gw = limited
    client = _raw(gw.port, b"GET /iris/chunks HTTP/1.1\r\nHost: gw\r\n\r\n")
    _wait(lambda: app.seen("/chunks") == 1, 10, "the request reaches the upstream")
    client.close()
    _settled(gw)
    assert httpx.get(gw.url + "/iris/echo", timeout=10).status_code == 200


def test_a_client_gone_mid_queue_gives_its_place_back(limited: tuple[Upstream, ServerThread]) -> None:
    app, gw = limited
    limit = _limit_of(gw)
    holder = _raw(gw.port, b"GET /iris/chunks HTTP/1.1\r\nHost: gw\r\n\r\n")
    _wait(lambda: app.seen("/chunks") == 1, 10, "the holder reaches the upstream")
    queued = _raw(gw.port, b"GET /iris/echo HTTP/1.1\r\nHost: gw\r\n\r\n")
    _wait(lambda: limit.queued == 1, 10, "the second request waits in the queue")
    queued.close()
    _wait(lambda: limit.queued == 0, 10, "its place in the queue is given back")
    assert limit.in_flight == 1  # the holder's, still
    holder.close()
    _settled(gw)
    assert app.seen("/echo") == 0, "a request whose client left while it queued never reached the upstream"
    assert httpx.get(gw.url + "/iris/echo", timeout=10).status_code == 200


def test_a_shutdown_cancels_requests_in_flight_and_queued_and_gives_their_slots_back(
    limited: tuple[Upstream, ServerThread],
) -> None:
    app, gw = limited
    limit = _limit_of(gw)
    holder = _raw(gw.port, b"GET /iris/chunks HTTP/1.1\r\nHost: gw\r\n\r\n")
    _wait(lambda: app.seen("/chunks") == 1, 10, "the holder reaches the upstream")
    queued = _raw(gw.port, b"GET /iris/echo HTTP/1.1\r\nHost: gw\r\n\r\n")
    _wait(lambda: limit.queued == 1, 10, "the second request waits in the queue")
    try:
        gw.stop()  # the tasks of both are cancelled by the server, not by their clients
        assert (limit.in_flight, limit.queued) == (0, 0)
    finally:
        holder.close()
        queued.close()


def test_thousands_of_mixed_endings_leave_nothing_held(
    upstream: tuple[Upstream, ServerThread],
    gateway_factory: Callable[..., ServerThread],
    upstream_key: dict[str, Any],
) -> None:
    """Answers, upstream errors, timeouts, broken upstream connections, clients leaving while queued or
    while the upstream works, refusals: the in-flight and queue gauges end at 0."""
    _, server = upstream
    route = key_route(server.url, **upstream_key)
    route.update(
        timeout_s=0.1,
        retry={"attempts": 2, "backoff_base_s": 0.001},
        limits={"max_concurrent": 4, "queue": 8, "queue_timeout_s": 0.05},
    )
    gw = gateway_factory({"server": QUIET, "routes": {"iris": route}})
    rng = random.Random(17)
    kinds = (
        ["/iris/ok"] * 60
        + ["/iris/status/500"] * 8
        + ["/iris/status/503"] * 4
        + ["/iris/hang"] * 2
        + ["/iris/reset"] * 5
        + ["leave"] * 21
    )
    total = 2000
    plan = [(rng.choice(kinds), rng.uniform(0, 0.03)) for _ in range(total)]
    statuses: Counter[str] = Counter()

    async def one(path: str, linger_s: float) -> None:
        target = "/iris/ok" if path == "leave" else path
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            if path == "leave":
                await asyncio.sleep(linger_s)  # queued, or at the upstream, or answered already
                statuses["left"] += 1
                return
            head = await reader.readline()
            statuses[head.split(b" ")[1].decode() if head else "cut"] += 1
            await reader.read()
        except OSError:
            statuses["cut"] += 1
        finally:
            writer.close()

    async def drive() -> None:
        queue = list(plan)

        async def worker() -> None:
            while queue:
                await one(*queue.pop())

        await asyncio.gather(*(worker() for _ in range(16)))

    asyncio.run(drive())
    _settled(gw)
    print(dict(statuses))
    assert sum(statuses.values()) == total
    # Every kind of ending happened (or the test proves less than it says).
    assert statuses["200"] and statuses["500"] and statuses["504"] and statuses["503"] and statuses["left"]
    for code in ("route_busy", "client_disconnected", "upstream_timeout"):
        assert _metric(gw.url, "gateway_requests_total", route="iris", error_code=code) > 0, code


# --------------------------------------------------------------------- c. refused before the body
@pytest.mark.parametrize("refusal", ["route_busy", "rate_limited"])
def test_a_refusal_comes_before_the_body_is_read(
    upstream: tuple[Upstream, ServerThread],
    gateway_factory: Callable[..., ServerThread],
    upstream_key: dict[str, Any],
    refusal: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 1 MB upload announced without `Expect`, its body never sent: the refusal arrives at once (the
    gateway would wait `client_body_timeout_s` for the body), the upstream never hears of it, and the
    operator reads it in the access line."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    app, server = upstream
    route = key_route(server.url, **upstream_key)
    if refusal == "route_busy":
        route["limits"] = {"max_concurrent": 1}
    else:
        route["limits"] = {"per_caller": {"requests_per_s": 0.01, "burst": 1}}
    gw = gateway_factory({"server": {"client_body_timeout_s": 120}, "routes": {"iris": route}})
    holder = None
    if refusal == "route_busy":
        holder = _raw(gw.port, b"GET /iris/chunks HTTP/1.1\r\nHost: gw\r\n\r\n")
        _wait(lambda: app.seen("/chunks") == 1, 10, "the only slot is taken")
    else:
        assert httpx.get(gw.url + "/iris/echo", timeout=10).status_code == 200  # the only token
    before = app.seen("/echo")
    upload = _raw(gw.port, b"POST /iris/echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 1048576\r\n\r\n")
    try:
        upload.settimeout(30)  # far below client_body_timeout_s
        answer = _answer_head(upload)
    finally:
        upload.close()
        if holder is not None:
            holder.close()
    status = b"503" if refusal == "route_busy" else b"429"
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer
    assert f'"{refusal}"'.encode() in answer and b"retry-after: " in answer.lower()
    assert app.seen("/echo") == before

    def refusal_lines() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "gateway.access" and f"error={refusal}" in r.getMessage()
        ]

    _wait(lambda: len(refusal_lines()) == 1, 10, "the refusal's access line")
    assert f"status={status.decode()}" in refusal_lines()[0]


# ------------------------------------------------------------------------ d. per-caller rate limits
def _callers_config(upstream_url: str, key: dict[str, Any], **extra: Any) -> dict[str, Any]:
    route = key_route(upstream_url, **key)
    route["limits"] = {
        "per_caller": {"requests_per_s": 10, "burst": 2},
        "callers": {"key:bob": {"requests_per_s": 10, "burst": 5}},
    }
    config: dict[str, Any] = {
        "inbound": {
            "api_keys": [
                {"name": "alice", "sha256": _sha256(ALICE_KEY)},
                {"name": "bob", "sha256": _sha256(BOB_KEY)},
            ]
        },
        "routes": {"iris": route},
    }
    config.update(extra)
    return config


ALICE = {"x-gateway-key": ALICE_KEY}
BOB = {"x-gateway-key": BOB_KEY}


def test_a_caller_over_its_rate_gets_429_with_the_ratelimit_headers(
    upstream: tuple[Upstream, ServerThread],
    gateway_factory: Callable[..., ServerThread],
    upstream_key: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    app, server = upstream
    gw = gateway_factory(_callers_config(server.url, upstream_key))
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        assert [http.get("/iris/echo", headers=ALICE).status_code for _ in range(2)] == [200, 200]
        refused = http.get("/iris/echo", headers=ALICE)
        # Bob has his own bucket, and a bigger one (`limits.callers`): Alice's refusal is not his.
        assert [http.get("/iris/echo", headers=BOB).status_code for _ in range(5)] == [200] * 5
        assert http.get("/iris/echo", headers=BOB).status_code == 429
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    assert re.fullmatch(r'"routes\.iris";q=\d+;w=\d+', refused.headers["ratelimit-policy"])
    assert re.fullmatch(r'"routes\.iris";r=0;t=[1-9]\d*', refused.headers["ratelimit"])
    assert app.seen("/echo") == 7
    (line,) = [
        r.getMessage()
        for r in caplog.records
        if r.name == "gateway.access" and "status=429" in r.getMessage() and "key:alice" in r.getMessage()
    ]
    assert "error=rate_limited" in line
    assert _metric(gw.url, "gateway_requests_total", error_code="rate_limited", caller="key:alice") == 1
    assert (
        _metric(
            gw.url, "gateway_admission_refusals_total", route="iris", reason="rate_limited", caller="key:bob"
        )
        == 1
    )


def test_refused_requests_use_no_quota(
    upstream: tuple[Upstream, ServerThread],
    gateway_factory: Callable[..., ServerThread],
    upstream_key: dict[str, Any],
) -> None:
    """A caller hammering while refused still gets each new token on schedule: it is admitted as often
    as its rate allows, not less (refusals would otherwise push its next token further away)."""
    _, server = upstream
    gw = gateway_factory(_callers_config(server.url, upstream_key, server=QUIET))
    admitted = refused = 0
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            status = http.get("/iris/ok", headers=ALICE).status_code
            admitted += status == 200
            refused += status == 429
        elapsed = time.monotonic() - started
        allowed = 2 + 10 * elapsed  # burst + rate x time
        assert refused > 5 * admitted, "the caller did not hammer"
        assert 0.8 * allowed - 1 <= admitted <= allowed + 1, (admitted, allowed)
        # Waiting Retry-After is enough.
        answer = http.get("/iris/echo", headers=ALICE)
        if answer.status_code == 429:
            time.sleep(float(answer.headers["retry-after"]))
            assert http.get("/iris/echo", headers=ALICE).status_code == 200


def test_inbound_limits_count_a_caller_across_routes(
    upstream: tuple[Upstream, ServerThread],
    gateway_factory: Callable[..., ServerThread],
    upstream_key: dict[str, Any],
) -> None:
    _, server = upstream
    config = _callers_config(server.url, upstream_key)
    config["routes"]["iris"].pop("limits")
    config["routes"]["other"] = {**key_route(server.url, **upstream_key), "path": "/other"}
    config["inbound"]["limits"] = {"per_caller": {"requests_per_s": 0.01, "burst": 3}}
    gw = gateway_factory(config)
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        statuses = [
            http.get(path, headers=ALICE).status_code for path in ("/iris/echo", "/other/echo", "/iris/echo")
        ]
        assert statuses == [200, 200, 200]
        refused = http.get("/other/echo", headers=ALICE)
        assert refused.status_code == 429
        assert refused.headers["ratelimit-policy"].startswith('"inbound";')
        assert http.get("/other/echo", headers=BOB).status_code == 200


# ---------------------------------------------------------------- e. two replicas, one Redis
def _redis_config(
    upstream_url: str,
    key: dict[str, Any],
    redis: RedisServer,
    *,
    rate: float,
    burst: int,
    timeout_ms: int = 50,
) -> dict[str, Any]:
    route = key_route(upstream_url, **key)
    route["limits"] = {"per_caller": {"requests_per_s": rate, "burst": burst}}
    return {
        "server": QUIET,
        "routes": {"iris": route},
        "limits_store": {
            "redis": {
                "url": redis.url,
                "key_prefix": "acceptance:",
                "timeout_ms": timeout_ms,
                "expected_replicas": 2,
            }
        },
    }


def _store_state(gw: ServerThread) -> str:
    return str(httpx.get(gw.url + "/readyz", timeout=10).json()["limits_store"]["state"])


def test_two_replicas_hold_one_per_caller_quota_within_ten_percent(
    upstream: tuple[Upstream, ServerThread],
    gateway_factory: Callable[..., ServerThread],
    upstream_key: dict[str, Any],
    redis: RedisServer,
) -> None:
    _, server = upstream
    rate, burst = 20.0, 5
    config = _redis_config(server.url, upstream_key, redis, rate=rate, burst=burst)
    replicas = [gateway_factory(config), gateway_factory(config)]
    assert [_store_state(gw) for gw in replicas] == ["shared", "shared"]
    admitted = Counter[int]()
    lock = threading.Lock()
    started = time.monotonic()
    ends = started + 2.0

    def hammer(gw: ServerThread) -> None:
        with httpx.Client(base_url=gw.url, timeout=10) as http:
            while time.monotonic() < ends:
                status = http.get("/iris/ok").status_code  # the same anonymous caller: 127.0.0.1
                with lock:
                    admitted[status] += 1

    threads = [threading.Thread(target=hammer, args=(gw,)) for gw in replicas for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    elapsed = time.monotonic() - started
    allowed = burst + rate * elapsed
    assert set(admitted) == {200, 429}, admitted
    assert 0.9 * allowed <= admitted[200] <= 1.1 * allowed, (admitted, allowed)
    assert [_store_state(gw) for gw in replicas] == ["shared", "shared"]


def test_redis_killed_and_restarted_mid_run(
    upstream: tuple[Upstream, ServerThread],
    gateway_factory: Callable[..., ServerThread],
    upstream_key: dict[str, Any],
    redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.limits")
    _, server = upstream
    # A slow rate with a burst the test never uses up: every request is admitted, and each keeps the
    # caller's key in Redis for a second (a fast rate would let it expire within a millisecond).
    gw = gateway_factory(_redis_config(server.url, upstream_key, redis, rate=1, burst=100_000))
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=gw.url, timeout=10) as http:
            while not stop.is_set():
                statuses[http.get("/iris/ok").status_code] += 1
                time.sleep(0.002)  # steady, not flat out: the outage is what is tested

    driver = threading.Thread(target=load)
    driver.start()
    try:
        _wait(lambda: statuses[200] >= 20, 20, "requests through Redis")
        assert redis.command("EXISTS", "acceptance:routes.iris:127.0.0.1") == b":1\r\n"
        redis.kill()
        _wait(lambda: _store_state(gw) == "fallback", 20, "the fallback in /readyz")
        assert _metric(gw.url, "gateway_limits_store_fallback") == 1
        served = statuses[200]
        _wait(lambda: statuses[200] >= served + 50, 20, "requests while Redis is down")
        redis.start()  # the same port, empty
        _wait(lambda: _store_state(gw) == "shared", 30, "recovered by itself")
        served = statuses[200]
        _wait(lambda: statuses[200] >= served + 20, 20, "requests through Redis again")
    finally:
        stop.set()
        driver.join(30)
    assert set(statuses) == {200}, statuses  # never a failed request
    assert _metric(gw.url, "gateway_limits_store_fallback") == 0
    assert redis.command("EXISTS", "acceptance:routes.iris:127.0.0.1") == b":1\r\n"
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.limits"]
    assert len([m for m in messages if "did not answer" in m]) == 1, messages
    assert len([m for m in messages if "are shared again" in m]) == 1, messages


def test_a_stalled_redis_never_holds_a_request_beyond_timeout_ms(
    upstream: tuple[Upstream, ServerThread],
    gateway_factory: Callable[..., ServerThread],
    upstream_key: dict[str, Any],
    redis: RedisServer,
) -> None:
    _, server = upstream
    gw = gateway_factory(
        _redis_config(server.url, upstream_key, redis, rate=1000, burst=1000, timeout_ms=100)
    )
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        assert http.get("/iris/echo").status_code == 200
        assert redis.process is not None
        os.kill(redis.process.pid, signal.SIGSTOP)  # alive, connected, silent
        try:
            durations = []
            for _ in range(20):
                started = time.monotonic()
                assert http.get("/iris/echo").status_code == 200
                durations.append(time.monotonic() - started)
            assert _store_state(gw) == "fallback"
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)
        # Loose: 100 ms for Redis plus generous slack for a loaded machine; never the seconds a wait
        # for a stalled Redis would take.
        assert max(durations) < 0.1 + 1.5, durations
        _wait(lambda: _store_state(gw) == "shared", 30, "recovered once Redis answers again")


# ------------------------------------------------------------------------------------------ reload
def test_a_reload_keeps_unchanged_limits_and_the_store(
    upstream: tuple[Upstream, ServerThread],
    gateway_factory: Callable[..., ServerThread],
    upstream_key: dict[str, Any],
    redis: RedisServer,
) -> None:
    """The rate store is the process's (kept while `limits_store` is unchanged: quotas carry on); a
    route's concurrency limit is kept while its settings are, with the requests it holds."""
    from gateway.config import parse_config

    app, server = upstream
    config = _redis_config(server.url, upstream_key, redis, rate=0.01, burst=1)
    config["routes"]["iris"]["limits"].update(max_concurrent=1, queue=1)
    gw = gateway_factory(config)
    gateway = gw.app
    assert isinstance(gateway, GatewayApp)
    store, limit = gateway.assembly.rate_store, _limit_of(gw)
    holder = _raw(gw.port, b"GET /iris/chunks HTTP/1.1\r\nHost: gw\r\n\r\n")  # uses the only token
    _wait(lambda: app.seen("/chunks") == 1, 10, "the holder holds the slot")

    gw.call(gateway.reload(parse_config(config)))
    assert gateway.assembly.rate_store is store and _limit_of(gw) is limit
    assert limit.in_flight == 1  # the holder's slot, counted by the limit the new routes use
    assert httpx.get(gw.url + "/iris/echo", timeout=10).status_code == 429  # the quota carried on

    changed = {**config, "routes": {"iris": {**config["routes"]["iris"], "limits": {"max_concurrent": 2}}}}
    changed["limits_store"] = {"redis": {**config["limits_store"]["redis"], "key_prefix": "other:"}}
    changed["inbound"] = {"limits": {"per_caller": {"requests_per_s": 100}}}
    gw.call(gateway.reload(parse_config(changed)))
    new_store = gateway.assembly.rate_store
    assert new_store is not store and _limit_of(gw) is not limit and _limit_of(gw).limit == 2
    assert new_store is not None and new_store.status()["state"] == "shared"
    holder.close()
    _wait(lambda: limit.in_flight == 0, 10, "the old limit's slot given back by its request")
    _settled(gw)


# ---------------------------------------------------------------------------------- gateway check
def test_check_prints_each_routes_limits_and_the_store(
    upstream: tuple[Upstream, ServerThread],
    redis: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import subprocess
    import sys

    import yaml

    _, server = upstream
    config = _redis_config(server.url, {"primary": {"env": KEY_ENV}}, redis, rate=10, burst=20)
    config["routes"]["iris"]["limits"].update(max_concurrent="auto", min=2, max=16, queue=8)
    config["inbound"] = {"limits": {"callers": {"10.1.2.3": {"requests_per_s": 1}}}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv(KEY_ENV, PRIMARY)

    def check() -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "gateway.cli", "check", "--config", str(path)]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    result = check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LIMITS  inbound (every route): 10.1.2.3 1/s burst 1" in result.stdout
    assert (
        "LIMITS  iris: max_concurrent auto, 2 to 16; queue 8 for 1 s; per caller 10/s burst 20"
        in result.stdout
    )
    assert f"LIMITS STORE  Redis at 127.0.0.1:{redis.port}/0: answers" in result.stdout
    redis.kill()
    result = check()
    assert result.returncode == 1
    assert f"LIMITS STORE  Redis at 127.0.0.1:{redis.port}/0: FAILED" in result.stdout
