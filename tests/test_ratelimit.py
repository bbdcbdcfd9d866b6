"""Per-caller rate limits in one process (gateway/ratelimit.py): GCRA with a fake clock, overrides by
caller name, the gateway-wide quota with the route's, the IETF header fields, bounded memory."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway import metrics
from gateway.config import CallerLimitsConfig
from gateway.errors import RateLimited
from gateway.ratelimit import LocalRateStore, RateLimits, RatePolicy
from gateway.responses import error_head, send_error


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def _limits(**config: Any) -> CallerLimitsConfig:
    return CallerLimitsConfig.model_validate(config)


def _admit(quota: Any, caller: str, label: str = "other") -> bool:
    # The local store decides without suspending: the coroutine ends at its first step.
    try:
        quota.admit(caller, label).send(None)
    except StopIteration:
        return True
    except RateLimited:
        return False
    raise AssertionError("the local store suspended")


def _route(clock: Clock, route: str = "r", inbound: dict[str, Any] | None = None, **limits: Any) -> Any:
    quotas = RateLimits(LocalRateStore(clock=clock), _limits(**(inbound or {})))
    return quotas.route(route, _limits(**limits))


def test_burst_then_the_rate_and_a_retry_after_that_fits() -> None:
    clock = Clock()
    quota = _route(clock, per_caller={"requests_per_s": 2, "burst": 3})
    assert [_admit(quota, "app:a") for _ in range(4)] == [True, True, True, False]
    with pytest.raises(RateLimited) as refused:
        asyncio.run(quota.admit("app:a", "other"))
    assert refused.value.retry_after == pytest.approx(0.5)
    clock.now += 0.49
    assert not _admit(quota, "app:a")
    clock.now += 0.01
    assert _admit(quota, "app:a") and not _admit(quota, "app:a")


def test_refused_requests_consume_no_quota() -> None:
    clock = Clock()
    quota = _route(clock, per_caller={"requests_per_s": 1, "burst": 2})
    assert _admit(quota, "key:k") and _admit(quota, "key:k")
    for _ in range(1000):
        assert not _admit(quota, "key:k")
        clock.now += 0.0005  # half a second of hammering in all
    clock.now += 0.5
    assert _admit(quota, "key:k"), "the refused requests used up quota"
    assert not _admit(quota, "key:k")


def test_sustained_rate_is_burst_plus_rate_times_time() -> None:
    clock = Clock()
    quota = _route(clock, per_caller={"requests_per_s": 10, "burst": 5})
    admitted = 0
    for _ in range(10_000):  # 10 s, one attempt per millisecond
        admitted += _admit(quota, "cert:c")
        clock.now += 0.001
    assert admitted in (104, 105, 106)


def test_each_caller_has_its_own_quota_and_named_callers_their_own_rate() -> None:
    clock = Clock()
    quota = _route(
        clock,
        per_caller={"requests_per_s": 1, "burst": 1},
        callers={
            "app:batch": {"requests_per_s": 1, "burst": 3},
            "10.0.0.9": {"requests_per_s": 1, "burst": 2},
        },
    )
    assert [_admit(quota, "app:web") for _ in range(2)] == [True, False]
    assert [_admit(quota, "app:other") for _ in range(2)] == [True, False]
    assert [_admit(quota, "app:batch") for _ in range(4)] == [True, True, True, False]
    assert [_admit(quota, "10.0.0.9") for _ in range(3)] == [True, True, False]


def test_only_named_callers_are_limited_without_per_caller() -> None:
    clock = Clock()
    quota = _route(clock, callers={"app:noisy": {"requests_per_s": 1, "burst": 1}})
    assert [_admit(quota, "app:noisy") for _ in range(2)] == [True, False]
    assert all(_admit(quota, "app:quiet") for _ in range(100))
    assert asyncio.run(quota.admit("app:quiet", "other")) is None


def test_no_quota_means_no_check() -> None:
    quotas = RateLimits(LocalRateStore(), _limits())
    assert quotas.route("r", _limits()) is None


def test_gateway_wide_and_route_quotas_are_decided_together() -> None:
    """A request refused by either quota consumes neither: the route refusing must not eat the caller's
    gateway-wide quota, and the other way round."""
    clock = Clock()
    quotas = RateLimits(LocalRateStore(clock=clock), _limits(per_caller={"requests_per_s": 1, "burst": 3}))
    narrow = quotas.route("narrow", _limits(per_caller={"requests_per_s": 1, "burst": 1}))
    wide = quotas.route("wide", _limits())
    assert _admit(narrow, "app:a")
    for _ in range(50):
        assert not _admit(narrow, "app:a")  # the route's quota refuses
    # The gateway-wide quota still has its two other requests, on any route.
    assert [_admit(wide, "app:a") for _ in range(3)] == [True, True, False]
    clock.now += 1.0  # one more request in each bucket: the one admitted counts against both
    assert _admit(narrow, "app:a")
    assert not _admit(wide, "app:a")


def test_refusal_is_429_rate_limited_with_the_ietf_fields_and_is_counted() -> None:
    clock = Clock()
    quotas = RateLimits(
        LocalRateStore(clock=clock), _limits(per_caller={"requests_per_s": 100, "burst": 100})
    )
    quota = quotas.route("iris", _limits(per_caller={"requests_per_s": 10, "burst": 20}))
    for _ in range(20):
        asyncio.run(quota.admit("app:a", "app:a"))
    before = metrics.ADMISSION_REFUSALS.labels("iris", "rate_limited", "app:a")._value.get()  # type: ignore[attr-defined]
    with pytest.raises(RateLimited) as refused:
        asyncio.run(quota.admit("app:a", "app:a"))
    error = refused.value
    assert (error.status, error.code) == (429, "rate_limited")
    assert error.retry_after == pytest.approx(0.1)
    assert "routes.iris: 10/s, burst 20" in error.message and "inbound" not in error.message
    headers = dict(error.headers)
    assert headers[b"ratelimit-policy"] == b'"inbound";q=100;w=1, "routes.iris";q=20;w=2'
    assert headers[b"ratelimit"] == b'"inbound";r=80;t=1, "routes.iris";r=0;t=1'
    after = metrics.ADMISSION_REFUSALS.labels("iris", "rate_limited", "app:a")._value.get()  # type: ignore[attr-defined]
    assert after == before + 1

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    head = error_head(error, "req-1", b"{}")
    assert head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b"\r\nretry-after: 1\r\n" in head
    assert b'\r\nratelimit: "inbound";r=80;t=1, "routes.iris";r=0;t=1\r\n' in head
    assert b'\r\nratelimit-policy: "inbound";q=100;w=1, "routes.iris";q=20;w=2\r\n' in head

    asyncio.run(send_error(send, error, "req-1"))
    response = dict(sent[0]["headers"])
    assert sent[0]["status"] == 429
    assert response[b"retry-after"] == b"1"
    assert response[b"ratelimit"] == b'"inbound";r=80;t=1, "routes.iris";r=0;t=1'
    assert json.loads(sent[1]["body"])["error"]["code"] == "rate_limited"


def test_admitted_request_can_carry_the_fields_too() -> None:
    clock = Clock()
    quota = _route(clock, route="iris", per_caller={"requests_per_s": 0.5, "burst": 4})
    grant = asyncio.run(quota.admit("app:a", "other"))
    headers = dict(grant.headers())
    assert headers[b"ratelimit-policy"] == b'"routes.iris";q=4;w=8'
    assert headers[b"ratelimit"] == b'"routes.iris";r=3;t=2'


@pytest.mark.parametrize(
    ("rate", "burst", "item"),
    [(10, 20, '"p";q=20;w=2'), (100, 1, '"p";q=100;w=1'), (0.5, 1, '"p";q=1;w=2'), (3, 5, '"p";q=6;w=2')],
)
def test_policy_item_states_the_long_run_rate_in_whole_seconds(rate: float, burst: int, item: str) -> None:
    assert RatePolicy("p", rate, burst).item == item


def test_divided_rate_for_the_fallback() -> None:
    policy = RatePolicy("p", 30, 10)
    third = policy.divided(3)
    assert (third.requests_per_s, third.burst) == (10, 3)
    assert policy.divided(3) is third and policy.divided(1) is policy
    assert policy.divided(50).burst == 1


def test_memory_stays_bounded_with_many_distinct_callers() -> None:
    clock = Clock()
    store = LocalRateStore(clock=clock, max_keys=1000)
    policy = RatePolicy("p", 100, 5)  # a caller's bucket is full again 10 ms after its request
    for index in range(50_000):
        assert store.decide([(f"p:10.{index}", policy)]).allowed
        clock.now += 0.0001
        assert len(store) <= 1000
    # Idle callers are forgotten as they become full again, not only at the cap.
    assert len(store) <= 150
    clock.now += 1.0
    for index in range(10):
        store.decide([(f"p:late{index}", policy)])
    assert len(store) <= 150


def test_admit_now_decides_as_admit_does_without_a_coroutine() -> None:
    """The request path's way in for a store in this process: the same decisions and the same refusal."""
    clock = Clock()
    quota = _route(clock, route="iris", per_caller={"requests_per_s": 1, "burst": 2})
    assert quota.decides_now
    quota.admit_now("app:a", "other")
    quota.admit_now("app:a", "other")
    with pytest.raises(RateLimited) as refused:
        quota.admit_now("app:a", "other")
    assert dict(refused.value.headers)[b"ratelimit"] == b'"routes.iris";r=0;t=1'
    assert not _admit(quota, "app:a"), "admit and admit_now count in the same buckets"
    clock.now += 1.0
    quota.admit_now("app:a", "other")  # the refusals took nothing
    unlimited = _route(clock, route="iris", callers={"app:b": {"requests_per_s": 1}})
    for _ in range(10):
        unlimited.admit_now("app:other", "other")  # no quota applies to this caller


def test_a_route_remembers_a_bounded_number_of_callers_buckets() -> None:
    from gateway.ratelimit import KNOWN_CALLERS

    clock = Clock()
    quota = _route(clock, route="iris", per_caller={"requests_per_s": 1, "burst": 1})
    for index in range(3 * KNOWN_CALLERS):
        quota.admit_now(f"10.0.{index // 256}.{index % 256}", "other")
        assert len(quota._known) <= KNOWN_CALLERS
    with pytest.raises(RateLimited):  # forgetting a caller's buckets never forgets its count
        quota.admit_now("10.0.0.0", "other")
