"""`max_concurrent: auto` (gateway/adaptive.py), driven by a fake clock: unit rules, then a discrete-event
simulation of fixed-capacity endpoints (429 beyond N in flight; or Azure ML's queue of N more, where the
latency climbs before the 429s come)."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import pytest

from gateway import metrics
from gateway.adaptive import AdaptiveLimit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limit(route: str, clock: Clock, **kw: int | float) -> AdaptiveLimit:
    options: dict[str, int | float] = {"min_limit": 1, "max_limit": 50} | kw
    return AdaptiveLimit(route, clock=clock, **options)  # type: ignore[arg-type]


def _gauge(metric: object, route: str) -> float:
    return metric.labels(route)._value.get()  # type: ignore[attr-defined, no-any-return]


def test_grows_one_per_round_trip_while_latency_stays_at_baseline_and_the_limit_is_in_use() -> None:
    clock = Clock()
    limit = _limit("a-grow", clock)
    for _ in range(200):
        limit.sample(0.100, 200, limit.epoch, in_flight=limit.limit)
        clock.now += 0.01
    # Additive increase: +1 per `limit` answers, so 200 answers take it to about 20.
    assert 18 <= limit.limit <= 21
    assert limit.baseline_s == pytest.approx(0.100)
    assert _gauge(metrics.ADMISSION_LIMIT, "a-grow") == limit.limit
    assert _gauge(metrics.ADMISSION_BASELINE, "a-grow") == pytest.approx(0.100)


def test_does_not_grow_a_limit_nobody_reaches() -> None:
    clock = Clock()
    limit = _limit("a-idle", clock, min_limit=4)
    for _ in range(500):
        limit.sample(0.1, 200, limit.epoch, in_flight=2)
    assert limit.limit == 4


def test_stops_at_max() -> None:
    clock = Clock()
    limit = _limit("a-max", clock, max_limit=6)
    for _ in range(500):
        limit.sample(0.1, 200, limit.epoch, in_flight=limit.limit)
    assert limit.limit == 6


@pytest.mark.parametrize("status", [429, 503, 408, 504])
def test_upstream_full_shrinks_once_per_congestion_event(status: int) -> None:
    clock = Clock()
    limit = _limit(f"a-drop-{status}", clock, min_limit=1)
    while limit.limit < 20:
        limit.sample(0.01, 200, limit.epoch, in_flight=limit.limit)
    epoch = limit.epoch
    for _ in range(15):  # one overshoot: many requests admitted at the same limit answer 429 together
        limit.sample(0.01, status, epoch, in_flight=20)
    assert limit.limit == 18  # 20 x 0.9, once
    limit.sample(0.01, status, limit.epoch, in_flight=18)  # admitted after the decrease: a new event
    assert limit.limit == 16
    assert limit.limit >= limit.min_limit


def test_errors_say_nothing_about_capacity() -> None:
    clock = Clock()
    limit = _limit("a-errors", clock, min_limit=5)
    for status in (400, 401, 404, 424, 500, 502):
        limit.sample(0.001, status, limit.epoch, in_flight=5)
    assert (limit.limit, limit.baseline_s) == (5, None)


def test_climbing_latency_shrinks_the_limit() -> None:
    clock = Clock()
    limit = _limit("a-latency", clock, min_limit=10)
    for _ in range(20):
        limit.sample(0.1, 200, limit.epoch, in_flight=10)
    grown = limit.limit
    for _ in range(60):  # the endpoint queues: each answer takes 3x as long, round trip after round trip
        limit.sample(0.3, 200, limit.epoch, in_flight=limit.limit)
    assert limit.limit < grown
    assert limit.limit >= 10 * 0.5


def test_one_slow_round_trip_is_not_a_trend() -> None:
    clock = Clock()
    limit = _limit("a-hiccup", clock, min_limit=8)
    for _ in range(16):
        limit.sample(0.1, 200, limit.epoch, in_flight=8)
    grown = limit.limit
    for latency in [0.3] * 8 + [0.1] * 16:  # the host stalled once: every answer of one round trip is late
        limit.sample(latency, 200, limit.epoch, in_flight=limit.limit)
    assert limit.limit >= grown


def test_after_a_decrease_it_holds_below_the_congestion_point_then_probes_again() -> None:
    clock = Clock()
    limit = _limit("a-hold", clock, min_limit=1, hold_s=10.0)
    while limit.limit < 9:
        limit.sample(0.1, 200, limit.epoch, in_flight=limit.limit)
    limit.sample(0.1, 429, limit.epoch, in_flight=9)  # capacity is 8
    assert limit.limit == 8
    for _ in range(500):  # well within hold_s: back up to 8 at most, never 9
        limit.sample(0.1, 200, limit.epoch, in_flight=limit.limit)
        clock.now += 0.001
    assert limit.limit == 8
    clock.now += 10.0
    for _ in range(10):  # once the hold is over it probes the old congestion point
        limit.sample(0.1, 200, limit.epoch, in_flight=limit.limit)
    assert limit.limit == 9


def test_baseline_is_measured_again_each_window() -> None:
    clock = Clock()
    limit = _limit("a-window", clock, min_limit=4, baseline_window_s=30.0)
    for _ in range(50):
        limit.sample(0.1, 200, limit.epoch, in_flight=1)
    assert limit.baseline_s == pytest.approx(0.1)
    # The model becomes slower for good (a new version): within a window or two the baseline follows,
    # instead of shrinking the limit forever.
    for _ in range(3):
        clock.now += 31.0
        for _ in range(50):
            limit.sample(0.25, 200, limit.epoch, in_flight=1)
    assert limit.baseline_s == pytest.approx(0.25, rel=0.05)
    assert _gauge(metrics.ADMISSION_BASELINE, "a-window") == pytest.approx(0.25, rel=0.05)


# ------------------------------------------------------------------------------ simulation


@dataclass(order=True)
class _Event:
    time: float
    seq: int
    kind: str = field(compare=False)
    payload: tuple[int, ...] = field(compare=False, default=())


@dataclass
class _Result:
    upstream_429: int = 0
    served: int = 0
    busy_time: float = 0.0
    duration: float = 0.0
    peak_upstream: int = 0
    limits: list[int] = field(default_factory=list)


def _simulate(
    capacity: int, *, queued_at_upstream: int, clients: int, duration: float, service_s: float = 0.1
) -> _Result:
    """Closed loop: `clients` callers, each sending its next request when the last one is answered,
    through the adaptive limit (waiting in the gateway's queue) to an endpoint that serves `capacity`
    at once, queues `queued_at_upstream` more and answers 429 beyond. A 429 releases the slot and the
    request queues again (the gateway's replay, simplified)."""
    clock = Clock()
    start = clock.now
    limit = AdaptiveLimit("sim", min_limit=1, max_limit=200, clock=clock)
    seq = itertools.count()
    events: list[_Event] = []
    result = _Result()
    waiting = clients  # requests queued in the gateway
    in_flight = 0
    serving = 0
    upstream_queue: list[tuple[float, int]] = []  # (admitted at, epoch)
    last = clock.now

    def push(delay: float, kind: str, *payload: int | float) -> None:
        heapq.heappush(events, _Event(clock.now + delay, next(seq), kind, tuple(payload)))  # type: ignore[arg-type]

    def admit() -> None:
        nonlocal waiting, in_flight, serving
        while waiting and in_flight < limit.limit:
            waiting -= 1
            in_flight += 1
            epoch = limit.epoch
            if serving < capacity:
                serving += 1
                push(service_s, "done", clock.now, epoch)
            elif len(upstream_queue) < queued_at_upstream:
                upstream_queue.append((clock.now, epoch))
            else:
                result.upstream_429 += 1
                push(0.002, "throttled", clock.now, epoch)

    admit()
    while events and clock.now - start < duration:
        event = heapq.heappop(events)
        result.busy_time += serving * (event.time - last)
        clock.now = last = event.time
        sent, epoch = event.payload
        if event.kind == "done":
            limit.sample(clock.now - sent, 200, int(epoch), in_flight)
            result.served += 1
            serving -= 1
            if upstream_queue:
                queued_sent, queued_epoch = upstream_queue.pop(0)
                serving += 1
                push(service_s, "done", queued_sent, queued_epoch)
        else:
            limit.sample(clock.now - sent, 429, int(epoch), in_flight)
        in_flight -= 1
        waiting += 1  # the caller's next request, or the throttled one again
        result.peak_upstream = max(result.peak_upstream, serving)
        result.limits.append(limit.limit)
        admit()
    result.duration = clock.now - start
    return result


@pytest.mark.parametrize("capacity", [1, 4, 8, 20])
def test_fixed_capacity_endpoint_is_held_near_capacity_with_rare_429s(capacity: int) -> None:
    result = _simulate(capacity, queued_at_upstream=0, clients=5 * capacity, duration=120.0)
    settled = result.limits[len(result.limits) // 4 :]
    # It probes one above capacity, then drops by a tenth and climbs back.
    assert int(0.9 * (capacity + 1)) <= min(settled) and max(settled) <= capacity + 1
    assert result.busy_time / result.duration >= 0.85 * capacity
    # One probe above capacity per hold_s (10 s), plus the first overshoot.
    assert result.upstream_429 <= 120 / 10 + 3


def test_endpoint_that_queues_before_it_throttles_gets_no_429_at_all() -> None:
    """Azure ML queues up to `max_concurrent_requests_per_instance x instances` more before it answers
    429: the latency climbs first, and that alone keeps the limit short of the 429s (a few requests
    wait in the endpoint's queue: latency is judged at the 75th percentile of a round trip)."""
    capacity = 8
    result = _simulate(capacity, queued_at_upstream=capacity, clients=5 * capacity, duration=120.0)
    assert result.upstream_429 == 0
    settled = result.limits[len(result.limits) // 4 :]
    assert capacity - 1 <= min(settled) and max(settled) <= 1.5 * capacity
    assert result.busy_time / result.duration >= 0.85 * capacity
