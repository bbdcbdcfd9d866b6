"""Per-caller rate limits shared through a real redis-server (gateway/ratelimit_redis.py): one quota across
replicas, refused requests free, NOSCRIPT after a restart, Redis killed and restarted mid-run, a slow or
stalled Redis never holding a decision, no reconnect per request, passwords from secrets, rediss://."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer, require_redis_server

from gateway import metrics
from gateway.assembly import Assembly
from gateway.backoff import Backoff
from gateway.config import CallerLimitsConfig, parse_config
from gateway.credentials import BuildContext
from gateway.emulator.tls import generate_tls
from gateway.errors import ConfigError, RateLimited
from gateway.ratelimit import RateLimits, RatePolicy, build_rate_store
from gateway.ratelimit_redis import GCRA_SHA, RedisRateStore
from gateway.secrets import LiteralSecret
from gateway.tls import client_context

LOGGER = "gateway.limits"


def _store(url: str, *, timeout_ms: int = 200, replicas: int = 2, **kw: Any) -> RedisRateStore:
    options: dict[str, Any] = {
        "tls_context": client_context(),
        "key_prefix": "test:",
        "timeout_s": timeout_ms / 1000,
        "expected_replicas": replicas,
        "probe_backoff": Backoff(base_s=0.05, cap_s=0.2),
    } | kw
    return RedisRateStore(LiteralSecret(url), **options)


def _fallback_gauge() -> float:
    return metrics.LIMITS_STORE_FALLBACK._value.get()  # type: ignore[attr-defined, no-any-return]


async def _until(condition: Any, timeout_s: float = 30.0) -> None:
    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 - changed by the store's own tasks and by Redis
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout_s)


def test_decisions_are_made_in_redis_with_expiring_keys(redis: RedisServer) -> None:
    async def main() -> None:
        store = _store(redis.url)
        await store.start()
        assert redis.command("SCRIPT", "EXISTS", GCRA_SHA) == b"*1\r\n:1\r\n"
        policy = RatePolicy("routes.iris", 10, 3)
        decisions = [await store.acquire([("routes.iris:app:a", policy)]) for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert [d.remaining for d in decisions] == [[2], [1], [0], [0]]
        assert decisions[3].retry_after_s == pytest.approx(0.1, abs=0.02)
        ttl = int(redis.command("PTTL", "test:routes.iris:app:a").strip(b":\r\n"))
        assert 0 < ttl <= 300  # gone once the bucket is full again: idle callers cost no memory
        assert store.status() | {"since": None} == {
            "store": "redis",
            "target": f"127.0.0.1:{redis.port}/0",
            "state": "shared",
            "since": None,
            "reason": None,
            "expected_replicas": 2,
        }
        await store.aclose()

    asyncio.run(main())


def test_a_decision_is_one_round_trip_whatever_its_quotas_and_outcome(redis: RedisServer) -> None:
    """Issue 17: with Redis, admission costs at most one round trip. Redis' own command counters say how
    many commands 40 decisions (two quotas each, admitted and refused) sent: one EVALSHA each, nothing
    else (no EVAL, SCRIPT, PING or reconnect per request)."""

    async def main() -> None:
        store = _store(redis.url)
        await store.start()
        assert redis.command("CONFIG", "RESETSTAT") == b"+OK\r\n"
        gateway_wide, route = RatePolicy("inbound", 10, 5), RatePolicy("routes.iris", 10, 3)
        decisions = [
            await store.acquire([("inbound:app:a", gateway_wide), ("routes.iris:app:a", route)])
            for _ in range(40)
        ]
        assert any(d.allowed for d in decisions) and not all(d.allowed for d in decisions)
        await store.aclose()

    asyncio.run(main())
    stats = redis.command("INFO", "commandstats").decode()
    calls = {
        line.split(":", 1)[0].removeprefix("cmdstat_"): int(line.split("calls=", 1)[1].split(",", 1)[0])
        for line in stats.splitlines()
        if line.startswith("cmdstat_")
    }
    del calls["config|resetstat"]
    # Commands the script runs inside Redis are counted too: TIME once, GET per quota, SET per admitted one.
    inside = {name: calls.pop(name) for name in ("time", "get", "set") if name in calls}
    assert calls == {"evalsha": 40}, calls
    assert inside["time"] == 40 and inside["get"] == 80, inside


def test_two_replicas_hold_one_quota_within_ten_percent(redis: RedisServer) -> None:
    """Two stores (two replicas) hammer the same caller's quota: together they admit what one quota
    allows over the elapsed time (measured on Redis' clock), not twice as much."""
    rate, burst = 50.0, 10

    async def main() -> tuple[int, float]:
        stores = [_store(redis.url), _store(redis.url)]
        policy = RatePolicy("inbound", rate, burst)
        admitted = 0

        async def replica(store: RedisRateStore) -> None:
            nonlocal admitted
            # For a while, not a number of requests: a fast machine must still test a rate.
            ends = time.monotonic() + 1.5
            while time.monotonic() < ends:
                decision = await store.acquire([("inbound:key:batch", policy)])
                admitted += decision.allowed

        started = _redis_time(redis)
        await asyncio.gather(*(replica(store) for store in stores for _ in range(4)))
        elapsed = _redis_time(redis) - started
        for store in stores:
            assert not store.falling_back
            await store.aclose()
        return admitted, elapsed

    admitted, elapsed = asyncio.run(main())
    allowed = burst + rate * elapsed
    assert elapsed > 1.0, "the replicas finished too fast to test a rate"
    assert 0.9 * allowed <= admitted <= 1.1 * allowed, (admitted, allowed, elapsed)


def _redis_time(redis: RedisServer) -> float:
    lines = redis.command("TIME").split(b"\r\n")
    return int(lines[2]) + int(lines[4]) / 1e6


def test_refused_requests_consume_no_shared_quota(redis: RedisServer) -> None:
    async def main() -> None:
        store = _store(redis.url)
        quotas = RateLimits(store, CallerLimitsConfig())
        route = quotas.route(
            "iris", CallerLimitsConfig.model_validate({"per_caller": {"requests_per_s": 2, "burst": 2}})
        )
        assert route is not None
        await route.admit("app:a", "other")
        await route.admit("app:a", "other")
        retry_after = 0.0
        for _ in range(300):
            with pytest.raises(RateLimited) as refused:
                await route.admit("app:a", "other")
            retry_after = refused.value.retry_after or 0.0
        assert retry_after <= 0.5  # 300 refusals later, still half a second (one request at 2/s)
        await asyncio.sleep(retry_after + 0.05)
        await route.admit("app:a", "other")  # admitted: the refusals took nothing
        await store.aclose()

    asyncio.run(main())


def test_script_flushed_or_lost_in_a_restart_is_loaded_again(redis: RedisServer) -> None:
    async def main() -> None:
        store = _store(redis.url)
        await store.start()
        redis.command("SCRIPT", "FLUSH")
        decision = await store.acquire([("inbound:app:a", RatePolicy("inbound", 1, 1))])
        assert decision.allowed and not store.falling_back
        assert redis.command("SCRIPT", "EXISTS", GCRA_SHA) == b"*1\r\n:1\r\n"
        await store.aclose()

    asyncio.run(main())


def test_redis_killed_and_restarted_mid_run(redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """Decisions go on while Redis is dead (locally, at the divided rate), the change is logged once each
    way, shown in the status and the metric, and the store comes back by itself once Redis is back."""
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        store = _store(redis.url, replicas=4)
        await store.start()
        policy = RatePolicy("inbound", 50, 1000)  # each request keeps the key 20 ms longer
        decided = 0
        stop = asyncio.Event()

        async def traffic() -> None:
            nonlocal decided
            while not stop.is_set():
                await asyncio.wait_for(store.acquire([("inbound:app:a", policy)]), 10)
                decided += 1
                await asyncio.sleep(0.001)

        runner = asyncio.create_task(traffic())
        await _until(lambda: decided > 20)
        redis.kill()
        await _until(lambda: store.falling_back)
        assert _fallback_gauge() == 1
        status = store.status()
        assert status["state"] == "fallback" and status["reason"]
        at_kill = decided
        await _until(lambda: decided > at_kill + 50)  # requests keep being decided
        # Divided by expected_replicas: a fresh caller gets a quarter of the burst.
        fresh = [await store.acquire([("inbound:app:fresh", policy)]) for _ in range(251)]
        assert sum(d.allowed for d in fresh) == 250
        redis.start()  # same port, empty: no script, no keys
        await _until(lambda: not store.falling_back)
        assert _fallback_gauge() == 0 and store.status()["state"] == "shared"
        at_recovery = decided
        await _until(lambda: decided > at_recovery + 20)
        stop.set()
        await runner
        assert redis.command("EXISTS", "test:inbound:app:a") == b":1\r\n"  # counted in Redis again
        await store.aclose()

    asyncio.run(main())
    lines = [r for r in caplog.records if r.name == LOGGER]
    assert [r.levelname for r in lines] == ["WARNING", "INFO"], [r.getMessage() for r in lines]
    assert "did not answer" in lines[0].getMessage() and "expected_replicas=4" in lines[0].getMessage()
    assert "answers again" in lines[1].getMessage()


def test_slow_redis_never_holds_a_decision(redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """Redis busy for 5 s (`DEBUG SLEEP`): every decision comes back, from the local fallback, while Redis
    is still asleep; then the store recovers."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    asleep = threading.Event()
    awake = threading.Event()

    def sleep_redis() -> None:
        asleep.set()
        redis.command("DEBUG", "SLEEP", "5", timeout=30)  # answers after its 5 s: not the default 5 s wait
        awake.set()

    async def main() -> None:
        store = _store(redis.url, timeout_ms=100)
        await store.start()
        policy = RatePolicy("inbound", 100, 100)
        sleeper = threading.Thread(target=sleep_redis)
        sleeper.start()
        asleep.wait(5)
        await asyncio.sleep(0.2)  # let DEBUG SLEEP reach Redis
        decisions = await asyncio.gather(*(store.acquire([(f"inbound:app:{n}", policy)]) for n in range(50)))
        assert not awake.is_set(), "the decisions waited for Redis"
        assert all(d.allowed for d in decisions)
        assert store.falling_back and store.status()["reason"] == "no answer within 100 ms"
        await asyncio.get_running_loop().run_in_executor(None, sleeper.join)
        assert awake.is_set(), "Redis never answered DEBUG SLEEP"
        await _until(lambda: not store.falling_back)
        await store.aclose()

    asyncio.run(main())


def test_stalled_connection_never_holds_a_decision() -> None:
    """A Redis address that accepts connections and never answers (a stalled proxy, a half-dead node)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes handshakes; nothing ever reads or answers

        async def main() -> None:
            store = _store(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", timeout_ms=50)
            policy = RatePolicy("inbound", 10, 5)
            first = await asyncio.wait_for(store.acquire([("inbound:app:a", policy)]), 5)
            assert first.allowed and store.falling_back
            assert store.status()["reason"] == "no answer within 50 ms"
            await store.aclose()

        asyncio.run(main())


def test_redis_down_means_no_reconnect_per_request() -> None:
    """A Redis that drops every connection: hundreds of requests, a handful of connection attempts (the
    first request and the backed-off probes)."""
    accepted = 0
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(0.05)
        stop = threading.Event()

        def drop_all() -> None:
            nonlocal accepted
            while not stop.is_set():
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    continue
                accepted += 1
                connection.close()

        dropper = threading.Thread(target=drop_all)
        dropper.start()

        async def main() -> None:
            store = _store(
                f"redis://127.0.0.1:{listener.getsockname()[1]}/0",
                probe_backoff=Backoff(base_s=0.5, cap_s=0.5),
            )
            policy = RatePolicy("inbound", 1000, 1000)
            for _ in range(500):
                assert (await store.acquire([("inbound:app:a", policy)])).allowed
                await asyncio.sleep(0.001)
            assert store.falling_back
            await store.aclose()

        try:
            asyncio.run(main())
        finally:
            stop.set()
            dropper.join()
    assert 1 <= accepted <= 6, accepted


def _context() -> BuildContext:
    """What the assembly hands every builder (here without Key Vault)."""
    return Assembly(_config("redis://127.0.0.1:9/0"), "test.yaml").ctx


def _config(url: Any, **redis: Any) -> Any:
    return parse_config(
        {
            "limits_store": {"redis": {"url": url, "expected_replicas": 3, **redis}},
            "routes": {"r": {"path": "/r", "upstream": "http://127.0.0.1:9", "auth": {"type": "none"}}},
        }
    )


def test_password_from_a_secret_never_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    require_redis_server()
    password = "redis-pass-" + "x7Kq29vLm"
    caplog.set_level(logging.INFO)
    with RedisServer(tmp_path / "redis", extra=("--requirepass", password)) as server:
        monkeypatch.setenv("LIMITS_REDIS_URL", f"redis://:{password}@127.0.0.1:{server.port}/0")
        monkeypatch.setenv("LIMITS_REDIS_WRONG", f"redis://:wrong-{password}@127.0.0.1:{server.port}/0")

        async def main() -> None:
            ctx = _context()
            good = build_rate_store(_config({"env": "LIMITS_REDIS_URL"}).limits_store, ctx)
            assert isinstance(good, RedisRateStore)
            assert (await good.acquire([("inbound:a", RatePolicy("inbound", 1, 1))])).allowed
            assert not good.falling_back
            wrong = build_rate_store(_config({"env": "LIMITS_REDIS_WRONG"}).limits_store, ctx)
            assert isinstance(wrong, RedisRateStore)
            await wrong.acquire([("inbound:a", RatePolicy("inbound", 1, 1))])
            assert wrong.falling_back
            shown = f"{good.status()} {wrong.status()} {good!r} {wrong!r} {good.target}"
            assert password not in shown and "AuthenticationError" in str(wrong.status()["reason"])
            for store in (good, wrong):
                await store.aclose()

        asyncio.run(main())
    assert password not in caplog.text


def test_literal_url_warns_only_when_it_holds_a_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    ctx = _context()

    async def main() -> None:
        plain = build_rate_store(_config("redis://127.0.0.1:9/0").limits_store, ctx)
        assert "literal secret" not in caplog.text
        secret = build_rate_store(_config("redis://:pw-1234567890@127.0.0.1:9/0").limits_store, ctx)
        assert "limits_store.redis.url is a literal secret" in caplog.text
        for store in (plain, secret):
            await store.aclose()

    asyncio.run(main())


def test_bad_url_from_the_environment_is_a_config_error_that_does_not_quote_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LIMITS_REDIS_URL", "http://user:hunter2-secret@redis:6379")
    with pytest.raises(ConfigError) as error:
        build_rate_store(_config({"env": "LIMITS_REDIS_URL"}).limits_store, _context())
    assert "limits_store.redis.url" in str(error.value) and "hunter2" not in str(error.value)


def test_rediss_uses_the_gateways_trust(tmp_path: Path) -> None:
    require_redis_server()
    files = generate_tls(tmp_path / "tls")
    tls = (
        "--tls-cert-file", str(files.server_cert),
        "--tls-key-file", str(files.server_key),
        "--tls-ca-cert-file", str(files.ca_cert),
        "--tls-auth-clients", "no",
    )  # fmt: skip
    with RedisServer(tmp_path / "redis", extra=tls, tls=True) as server:

        async def main() -> None:
            policy = RatePolicy("inbound", 1, 1)
            trusted = _store(server.url, tls_context=client_context(str(files.ca_cert)))
            assert (await trusted.acquire([("inbound:a", policy)])).allowed
            assert not trusted.falling_back
            untrusted = _store(server.url, tls_context=client_context())
            await untrusted.acquire([("inbound:a", policy)])
            assert untrusted.falling_back
            assert "certificate" in str(untrusted.status()["reason"]).lower()
            for store in (trusted, untrusted):
                await store.aclose()

        asyncio.run(main())
