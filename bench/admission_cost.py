"""CPU cost of one admission decision, for issue 17's hot-path budget (a route with a local limit may cost
at most 5% more CPU per request; with Redis, one round trip).

    python bench/admission_cost.py [--decisions 200000]

Measures this process's CPU time per decision, user and system (the kernel's share of a socket send),
the event loop's own work included, minus an empty loop of the same shape:
- a concurrency slot (fixed limit, never full): `async with limit.slot()`;
- the same with `max_concurrent: auto`, one `observe()` per request;
- a local per-caller rate (two quotas, gateway-wide and the route's, always admitted);
- the same decided in Redis (a redis-server started here on loopback, if installed): CPU of this
  process only, plus the wall time per round trip.
Small and quick (a few seconds); not part of bench/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable

from gateway.adaptive import AdaptiveLimit
from gateway.concurrency import ConcurrencyLimit
from gateway.config import CallerLimitsConfig
from gateway.ratelimit import LocalRateStore, RateLimits, RateStore
from gateway.ratelimit_redis import RedisRateStore
from gateway.secrets import LiteralSecret
from gateway.tls import client_context

RATES = CallerLimitsConfig.model_validate({"per_caller": {"requests_per_s": 1e9, "burst": 1_000_000}})


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def _per_decision(step: Callable[[int], Awaitable[None]], decisions: int) -> tuple[float, float, float]:
    """(user CPU, system CPU, wall) seconds per decision."""
    for index in range(min(decisions // 10, 2000)):  # warm up
        await step(index)
    (user, system), wall = _cpu(), time.perf_counter()
    for index in range(decisions):
        await step(index)
    (user_after, system_after), wall_after = _cpu(), time.perf_counter()
    return (
        (user_after - user) / decisions,
        (system_after - system) / decisions,
        (wall_after - wall) / decisions,
    )


async def _nothing(index: int) -> None:
    return None


def _slot_step(limit: ConcurrencyLimit, observe: bool) -> Callable[[int], Awaitable[None]]:
    async def step(index: int) -> None:
        async with limit.slot(30.0, "other") as slot:
            if observe:
                slot.observe(0.05, 200)

    return step


def _rate_step(store: RateStore) -> Callable[[int], Awaitable[None]]:
    route = RateLimits(store, RATES).route("iris", RATES)
    assert route is not None

    async def step(index: int) -> None:
        await route.admit(f"app:{index % 1000}", "other")

    return step


def _start_redis() -> tuple[subprocess.Popen[bytes], int, str] | None:
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    if binary is None:
        return None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    directory = tempfile.mkdtemp(prefix="admission-cost-redis-")
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port, directory
        except OSError:
            time.sleep(0.05)
    process.kill()
    return None


async def main(decisions: int) -> None:
    base, _, _ = await _per_decision(_nothing, decisions)
    rows: list[tuple[str, float, float, float | None]] = []

    fixed = ConcurrencyLimit("cost-fixed", limit=64, queue=0, queue_timeout_s=1)
    user, system, _ = await _per_decision(_slot_step(fixed, observe=False), decisions)
    rows.append(("concurrency slot, fixed limit", user - base, system, None))

    adaptive = AdaptiveLimit("cost-auto", min_limit=64, max_limit=64)
    auto = ConcurrencyLimit("cost-auto", limit=adaptive, queue=0, queue_timeout_s=1)
    user, system, _ = await _per_decision(_slot_step(auto, observe=True), decisions)
    rows.append(("concurrency slot, auto, one observe()", user - base, system, None))

    user, system, _ = await _per_decision(_rate_step(LocalRateStore()), decisions)
    rows.append(("per-caller rate, local (2 quotas)", user - base, system, None))

    started = _start_redis()
    if started is None:
        print("redis-server not found: the Redis row is skipped")
    else:
        process, port, directory = started
        store = RedisRateStore(
            LiteralSecret(f"redis://127.0.0.1:{port}/0"),
            tls_context=client_context(),
            key_prefix="cost:",
            timeout_s=1.0,
            expected_replicas=1,
        )
        try:
            await store.start()
            redis_decisions = max(1000, decisions // 20)
            user, system, wall = await _per_decision(_rate_step(store), redis_decisions)
            assert not store.falling_back
            rows.append(("per-caller rate, Redis (2 quotas, 1 round trip)", user - base, system, wall))
        finally:
            await store.aclose()
            process.kill()
            process.wait()
            shutil.rmtree(directory, ignore_errors=True)

    print(f"empty loop step: {base * 1e6:.2f} us user CPU (subtracted below)")
    for name, user, system, wall in rows:
        extra = f", {wall * 1e6:.0f} us wall per round trip" if wall is not None else ""
        print(f"{name:<48} {user * 1e6:7.2f} us user + {system * 1e6:6.2f} us system CPU per decision{extra}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=200_000)
    asyncio.run(main(parser.parse_args().decisions))
