"""A client burst of 5x an endpoint's capacity, through the route concurrency limit straight to the
emulated Azure ML endpoint (429 beyond `max_concurrent` in flight), over real HTTP. The emulator runs in
a process of its own, so the driver's work does not slow the endpoint down (a GIL shared with it would
show up as latency the adaptive limit reacts to).

The building blocks alone, without the gateway around them (tests/test_acceptance_limits.py runs the
same burst through the real gateway): this driver does what the admission stage and the replay policy
do per request: hold a slot for the whole request, feed each upstream answer to the limit, replay an
upstream 429 after a short backoff (at most 3 attempts, like `retry.attempts`). With
`max_concurrent: auto` or a fixed limit at capacity no client sees a 429; without a limit the same burst
gets many.

`python tests/test_admission_burst.py` prints the numbers of the three runs.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from remote_emulator import RemoteEmulator, start_emulator, stop_emulator

from gateway.adaptive import AdaptiveLimit
from gateway.concurrency import ConcurrencyLimit
from gateway.errors import RouteBusy

CAPACITY = 4
CLIENTS = 5 * CAPACITY
REQUESTS_PER_CLIENT = 15
SERVICE_S = 0.05
DEADLINE_S = 10.0
ATTEMPTS = 3
BODY = b'{"data": [[5.1, 3.5, 1.4, 0.2]]}'


@dataclass
class BurstResult:
    mode: str
    client_statuses: dict[int, int] = field(default_factory=dict)
    waits: list[float] = field(default_factory=list)
    upstream_429: int = 0
    mean_upstream_in_flight: float = 0.0
    peak_upstream_in_flight: int = 0
    final_limit: int | None = None
    seconds: float = 0.0

    @property
    def client_429(self) -> int:
        return self.client_statuses.get(429, 0)

    def summary(self) -> str:
        waits = sorted(self.waits) or [0.0]
        p95 = waits[int(0.95 * (len(waits) - 1))]
        return (
            f"{self.mode:>6}: client statuses {dict(sorted(self.client_statuses.items()))}, "
            f"upstream 429s {self.upstream_429}, upstream in flight mean {self.mean_upstream_in_flight:.2f} "
            f"peak {self.peak_upstream_in_flight} (capacity {CAPACITY}), client wait for a slot "
            f"median {statistics.median(waits) * 1000:.0f} ms p95 {p95 * 1000:.0f} ms "
            f"max {waits[-1] * 1000:.0f} ms, "
            f"final limit {self.final_limit}, {self.seconds:.1f} s"
        )


async def burst(emulator: RemoteEmulator, mode: str) -> BurstResult:
    """`mode`: "auto" (adaptive, 1..64), "static" (fixed at CAPACITY) or "none" (no limit)."""
    result = BurstResult(mode)
    limit: ConcurrencyLimit | None = None
    if mode == "auto":
        adaptive = AdaptiveLimit(f"burst-{mode}", min_limit=1, max_limit=64)
        limit = ConcurrencyLimit(f"burst-{mode}", limit=adaptive, queue=CLIENTS, queue_timeout_s=DEADLINE_S)
    elif mode == "static":
        limit = ConcurrencyLimit(f"burst-{mode}", limit=CAPACITY, queue=CLIENTS, queue_timeout_s=DEADLINE_S)
    headers = {"authorization": f"Bearer {emulator.key}", "content-type": "application/json"}
    rng = random.Random(5)
    emulator.admin("reset-counters", {})

    async def attempts(client: httpx.AsyncClient, slot: object | None) -> int:
        status = 0
        for attempt in range(ATTEMPTS):
            sent = time.perf_counter()
            response = await client.post(emulator.scoring_uri, content=BODY, headers=headers)
            status = response.status_code
            if slot is not None:
                slot.observe(time.perf_counter() - sent, status)  # type: ignore[attr-defined]
            if status != 429 or attempt == ATTEMPTS - 1:
                break
            await asyncio.sleep(rng.uniform(0, 0.05 * 2**attempt))  # the replay policy's full jitter
        return status

    async def request(client: httpx.AsyncClient) -> int:
        if limit is None:
            return await attempts(client, None)
        arrived = time.perf_counter()
        try:
            async with limit.slot(remaining_s=DEADLINE_S) as slot:
                result.waits.append(time.perf_counter() - arrived)
                return await attempts(client, slot)
        except RouteBusy:
            return 503

    async def caller(client: httpx.AsyncClient) -> None:
        for _ in range(REQUESTS_PER_CLIENT):
            status = await request(client)
            result.client_statuses[status] = result.client_statuses.get(status, 0) + 1

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=CLIENTS + 10)) as client:
        await asyncio.gather(*(caller(client) for _ in range(CLIENTS)))
    result.seconds = time.perf_counter() - started
    view = emulator.deployment()
    result.upstream_429 = int(view["throttled"])
    result.mean_upstream_in_flight = float(view["mean_in_flight"])
    result.peak_upstream_in_flight = int(view["peak_in_flight"])
    if limit is not None:
        result.final_limit = limit.limit
        assert (limit.in_flight, limit.queued) == (0, 0)
    return result


@pytest.fixture(scope="module")
def emulator() -> Iterator[RemoteEmulator]:
    remote = start_emulator(capacity=CAPACITY, score_delay_s=SERVICE_S)
    try:
        yield remote
    finally:
        stop_emulator(remote)


@pytest.mark.parametrize("mode", ["auto", "static"])
def test_burst_of_five_times_capacity_gives_clients_no_429(emulator: RemoteEmulator, mode: str) -> None:
    result = asyncio.run(burst(emulator, mode))
    print(result.summary())
    total = CLIENTS * REQUESTS_PER_CLIENT
    assert result.client_statuses == {200: total}, result.summary()
    assert result.peak_upstream_in_flight <= CAPACITY
    # The endpoint stays busy: generous bounds, the exact figures are in the summary.
    assert result.mean_upstream_in_flight >= 0.5 * CAPACITY, result.summary()
    if mode == "auto":
        assert CAPACITY - 1 <= (result.final_limit or 0) <= CAPACITY + 1, result.summary()
        assert result.upstream_429 <= 0.1 * total, result.summary()
    else:
        assert result.upstream_429 == 0


def test_without_a_limit_the_same_burst_gets_429s(emulator: RemoteEmulator) -> None:
    """The baseline: the test above would pass without the limit if the emulator never throttled."""
    result = asyncio.run(burst(emulator, "none"))
    print(result.summary())
    assert result.upstream_429 > 0.25 * CLIENTS * REQUESTS_PER_CLIENT
    assert result.client_429 > 0


if __name__ == "__main__":
    remote = start_emulator(capacity=CAPACITY, score_delay_s=SERVICE_S)
    try:
        for run_mode in ("none", "static", "auto"):
            print(asyncio.run(burst(remote, run_mode)).summary())
    finally:
        stop_emulator(remote)
