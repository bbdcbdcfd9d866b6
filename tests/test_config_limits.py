"""`routes.NAME.limits`, `inbound.limits` and `limits_store` in the configuration (gateway/config.py)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import LiteralRef, parse_config
from gateway.errors import ConfigError


def _config(route: dict[str, Any] | None = None, **top: Any) -> Any:
    base = {"path": "/iris", "upstream": "https://iris.example", "auth": {"type": "none"}}
    return parse_config({"routes": {"iris": base | (route or {})}, **top})


def _error(route: dict[str, Any] | None = None, **top: Any) -> str:
    with pytest.raises(ConfigError) as error:
        _config(route, **top)
    return str(error.value)


def test_the_replaced_keys_say_what_to_write_instead() -> None:
    message = _error({"max_concurrent_requests": 32, "queue_timeout_s": 0.5})
    assert "routes.iris" in message
    assert "write `limits: {max_concurrent: 32, queue: 32, queue_timeout_s: 0.5}` instead" in message
    assert "limits:" in _error({"queue_timeout_s": 2})


def test_limits_default_to_none() -> None:
    limits = _config().routes["iris"].limits
    assert (limits.max_concurrent, limits.queue, limits.per_caller, limits.callers) == (None, 0, None, {})
    assert not limits.limits_callers


def test_fixed_and_auto_limits() -> None:
    fixed = _config({"limits": {"max_concurrent": 8, "queue": 16, "queue_timeout_s": 2}}).routes["iris"]
    assert (fixed.limits.max_concurrent, fixed.limits.queue, fixed.limits.queue_timeout_s) == (8, 16, 2)
    auto = _config({"limits": {"max_concurrent": "auto", "min": 2, "max": 40}}).routes["iris"].limits
    assert (auto.max_concurrent, auto.min, auto.max) == ("auto", 2, 40)


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"max_concurrent": 0}, "at least 1"),
        ({"max_concurrent": -3}, "at least 1"),
        ({"max_concurrent": 2.5}, "a number of requests or `auto`"),
        ({"max_concurrent": "many"}, "a number of requests or `auto`"),
        ({"max_concurrent": True}, "a number of requests or `auto`"),
        ({"max_concurrent": 4, "min": 2}, "`min` and `max` bound `max_concurrent: auto`"),
        ({"max_concurrent": "auto", "min": 9, "max": 3}, "`min` (9) is above `max` (3)"),
        ({"queue": 5}, "need `max_concurrent`"),
        ({"max_concurrent": 4, "queue_timeout_s": 3}, "needs `queue` above 0"),
        ({"max_concurrent": 4, "queue": 2, "queue_timeout_s": 0}, "greater than 0"),
        ({"max_concurrent": 400}, "`max_connections` is 256"),
        ({"max_concurrent": "auto", "max": 300}, "`max_connections` is 256"),
        ({"per_caller": {"requests_per_s": 0}}, "greater than 0"),
        ({"per_caller": {"requests_per_s": 5, "burst": 0}}, "greater than or equal to 1"),
        ({"per_caller": {"burst": 5}}, "required key is missing"),
        ({"callers": {"": {"requests_per_s": 1}}}, "not a caller name"),
        ({"max_inflight": 3}, "unknown key"),
    ],
)
def test_bad_limits_are_config_errors(limits: dict[str, Any], expected: str) -> None:
    message = _error({"limits": limits})
    assert "routes.iris.limits" in message or "routes.iris" in message
    assert expected in message, message


def test_per_caller_rates_and_overrides() -> None:
    limits = (
        _config(
            {
                "limits": {
                    "per_caller": {"requests_per_s": 2.5},
                    "callers": {
                        "app:batch": {"requests_per_s": 100, "burst": 300},
                        "10.0.0.7": {"requests_per_s": 1},
                    },
                }
            }
        )
        .routes["iris"]
        .limits
    )
    assert limits.per_caller is not None and limits.per_caller.burst_requests == 3  # one second's worth
    assert limits.callers["app:batch"].burst_requests == 300
    assert limits.limits_callers


def test_gateway_wide_limits_take_only_caller_rates() -> None:
    config = _config(inbound={"limits": {"per_caller": {"requests_per_s": 50, "burst": 100}}})
    assert config.inbound.limits.per_caller is not None
    assert "unknown key" in _error(inbound={"limits": {"max_concurrent": 5}})


def test_limits_store_redis() -> None:
    store = _config(
        limits_store={"redis": {"url": {"env": "REDIS_URL"}, "expected_replicas": 3}}
    ).limits_store
    assert store is not None
    assert (store.redis.key_prefix, store.redis.timeout_ms, store.redis.expected_replicas) == (
        "scoring-gateway:",
        50,
        3,
    )
    literal = _config(
        limits_store={"redis": {"url": "rediss://:pw-123456789@redis:6380/2", "expected_replicas": 1}}
    ).limits_store
    assert literal is not None and isinstance(literal.redis.url, LiteralRef)
    assert "pw-123456789" not in repr(literal) and "pw-123456789" not in str(literal.model_dump())


@pytest.mark.parametrize(
    ("redis", "expected"),
    [
        ({"url": "redis://redis:6379"}, "expected_replicas: required key is missing"),
        ({"url": "http://redis:6379", "expected_replicas": 2}, "must be redis://"),
        ({"url": "redis://:hunter2-xyz@redis:99999", "expected_replicas": 2}, "malformed"),
        ({"url": "redis://redis/abc", "expected_replicas": 2}, "database number"),
        ({"url": "redis://redis?ssl=true", "expected_replicas": 2}, "query parameters"),
        ({"url": "redis://redis", "expected_replicas": 0}, "greater than or equal to 1"),
        ({"url": "redis://redis", "expected_replicas": 2, "timeout_ms": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_limits_store_is_a_config_error_that_never_quotes_the_url(
    redis: dict[str, Any], expected: str
) -> None:
    message = _error(limits_store={"redis": redis})
    assert expected in message, message
    assert "hunter2" not in message
