"""The route concurrency limit (gateway/concurrency.py): slots, FIFO queue, refusals, and a slot given back
on every way out, cancellation at each await included."""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway import metrics
from gateway.adaptive import AdaptiveLimit
from gateway.concurrency import ConcurrencyLimit
from gateway.errors import RouteBusy


def _value(metric: object, *labels: str) -> float:
    return metric.labels(*labels)._value.get()  # type: ignore[attr-defined, no-any-return]


def _refusals(route: str, caller: str = "other") -> float:
    return _value(metrics.ADMISSION_REFUSALS, route, "route_busy", caller)


def _settled(limit: ConcurrencyLimit) -> None:
    assert (limit.in_flight, limit.queued) == (0, 0)
    metrics.flush_in_flight()
    assert _value(metrics.ADMISSION_IN_FLIGHT, limit.route) == 0
    assert _value(metrics.ADMISSION_QUEUED, limit.route) == 0


async def _until(condition: object, timeout_s: float = 10.0) -> None:
    """Let the loop run until `condition()` holds (positive evidence, generous bound)."""

    async def poll() -> None:
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110 - state changes on the loop
            await asyncio.sleep(0)

    await asyncio.wait_for(poll(), timeout_s)


async def _hold(limit: ConcurrencyLimit, entered: asyncio.Event, leave: asyncio.Event, **kw: object) -> None:
    async with limit.slot(**kw):  # type: ignore[arg-type]
        entered.set()
        await leave.wait()


def test_full_limit_without_queue_refuses_at_once_with_route_busy() -> None:
    async def main() -> None:
        limit = ConcurrencyLimit("c-full", limit=2, queue=0, queue_timeout_s=1.0)
        before = _refusals("c-full", "app:a")
        async with limit.slot(), limit.slot():
            assert limit.in_flight == 2
            metrics.flush_in_flight()
            assert _value(metrics.ADMISSION_IN_FLIGHT, "c-full") == 2
            with pytest.raises(RouteBusy) as refused:
                async with limit.slot(caller="app:a"):
                    pytest.fail("a third request got a slot")
        error = refused.value
        assert (error.status, error.code, error.retry_after) == (503, "route_busy", 1.0)
        assert "c-full" in error.message and "Retry-After" in error.message
        assert _refusals("c-full", "app:a") == before + 1
        assert _value(metrics.ADMISSION_LIMIT, "c-full") == 2
        _settled(limit)

    asyncio.run(main())


def test_gauges_sum_the_limits_of_one_route_while_a_reload_drains() -> None:
    async def main() -> None:
        old = ConcurrencyLimit("c-reload", limit=2, queue=0, queue_timeout_s=1)
        draining = await old.slot().__aenter__()
        new = ConcurrencyLimit("c-reload", limit=2, queue=0, queue_timeout_s=1)
        async with new.slot(), new.slot():
            metrics.flush_in_flight()
            assert _value(metrics.ADMISSION_IN_FLIGHT, "c-reload") == 3
        await draining.__aexit__(None, None, None)
        _settled(old)
        _settled(new)

    asyncio.run(main())


def test_queue_is_first_come_first_served_and_newcomers_wait_behind() -> None:
    async def main() -> None:
        limit = ConcurrencyLimit("c-fifo", limit=1, queue=5, queue_timeout_s=30)
        order: list[str] = []
        release = {name: asyncio.Event() for name in ("w1", "w2", "w3", "late")}

        async def request(name: str) -> None:
            async with limit.slot():
                order.append(name)
                await release[name].wait()

        holder = await limit.slot().__aenter__()
        tasks = {}
        for name in ("w1", "w2", "w3"):
            tasks[name] = asyncio.create_task(request(name))
            await _until(lambda: limit.queued == len(tasks))
        metrics.flush_in_flight()
        assert _value(metrics.ADMISSION_QUEUED, "c-fifo") == 3
        assert _value(metrics.ADMISSION_IN_FLIGHT, "c-fifo") == 1
        await holder.__aexit__(None, None, None)  # the slot goes to w1, not to whoever comes next
        tasks["late"] = asyncio.create_task(request("late"))
        for name in ("w1", "w2", "w3", "late"):
            await _until(lambda: name in order)  # noqa: B023
            assert limit.in_flight == 1
            release[name].set()
        await asyncio.gather(*tasks.values())
        assert order == ["w1", "w2", "w3", "late"]
        _settled(limit)

    asyncio.run(main())


def test_wait_ends_at_queue_timeout_with_route_busy() -> None:
    async def main() -> None:
        limit = ConcurrencyLimit("c-timeout", limit=1, queue=1, queue_timeout_s=0.01)
        entered, leave = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(_hold(limit, entered, leave))
        await entered.wait()
        before = metrics.ADMISSION_WAIT.labels("c-timeout")._sum.get()  # type: ignore[attr-defined]
        with pytest.raises(RouteBusy, match=r"no free slot within 0\.01 s"):
            async with limit.slot():
                pytest.fail("got a slot that was never freed")
        assert metrics.ADMISSION_WAIT.labels("c-timeout")._sum.get() > before  # type: ignore[attr-defined]
        leave.set()
        await holder
        _settled(limit)

    asyncio.run(main())


def test_request_deadline_bounds_the_wait() -> None:
    async def main() -> None:
        limit = ConcurrencyLimit("c-deadline", limit=1, queue=4, queue_timeout_s=3600)
        entered, leave = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(_hold(limit, entered, leave))
        await entered.wait()
        with pytest.raises(RouteBusy, match="retry after"):  # no time left: refused without queueing
            async with limit.slot(remaining_s=0.0):
                pass
        # The request's deadline, not the hour of queue_timeout_s, ends the wait.
        with pytest.raises(RouteBusy, match=r"no free slot within 0\.02 s"):
            await asyncio.wait_for(limit.slot(remaining_s=0.02).__aenter__(), 30)
        leave.set()
        await holder
        _settled(limit)

    asyncio.run(main())


@pytest.mark.parametrize("exit_kind", ["error", "cancel", "timeout"])
def test_slot_is_released_on_every_exit(exit_kind: str) -> None:
    async def main() -> None:
        limit = ConcurrencyLimit(f"c-exit-{exit_kind}", limit=1, queue=0, queue_timeout_s=1)
        inside = asyncio.Event()

        async def request() -> None:
            async with limit.slot():
                inside.set()
                if exit_kind == "error":
                    raise ValueError("upstream failed")
                await asyncio.sleep(3600)

        if exit_kind == "timeout":
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(request(), 0.01)
        else:
            task = asyncio.create_task(request())
            await inside.wait()
            if exit_kind == "cancel":
                task.cancel()
            with pytest.raises(ValueError if exit_kind == "error" else asyncio.CancelledError):
                await task
        _settled(limit)
        async with limit.slot():  # the slot is really back
            assert limit.in_flight == 1

    asyncio.run(main())


def test_cancelled_waiter_leaves_the_queue_and_never_takes_a_slot() -> None:
    async def main() -> None:
        limit = ConcurrencyLimit("c-cancel-wait", limit=1, queue=2, queue_timeout_s=3600)
        entered, leave = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(_hold(limit, entered, leave))
        await entered.wait()
        took = []

        async def waiter() -> None:
            async with limit.slot():
                took.append(True)

        task = asyncio.create_task(waiter())
        await _until(lambda: limit.queued == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (limit.in_flight, limit.queued) == (1, 0)
        leave.set()
        await holder
        assert took == []
        _settled(limit)

    asyncio.run(main())


def test_waiter_cancelled_in_the_instant_it_is_handed_a_slot_passes_it_on() -> None:
    async def main() -> None:
        limit = ConcurrencyLimit("c-handoff", limit=1, queue=2, queue_timeout_s=3600)
        holder = await limit.slot().__aenter__()
        got: list[str] = []

        async def waiter(name: str) -> None:
            async with limit.slot():
                got.append(name)
                await asyncio.sleep(3600)

        first = asyncio.create_task(waiter("first"))
        second = asyncio.create_task(waiter("second"))
        await _until(lambda: limit.queued == 2)
        # In one step: the holder leaves (its slot is handed to `first`) and `first` is cancelled
        # before it could run: the slot must reach `second`, not vanish with `first`.
        await holder.__aexit__(None, None, None)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await _until(lambda: "second" in got)
        assert got == ["second"] and limit.in_flight == 1
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        _settled(limit)

    asyncio.run(main())


def test_a_higher_adaptive_limit_admits_waiters_at_once() -> None:
    async def main() -> None:
        adaptive = AdaptiveLimit("c-grow", min_limit=1, max_limit=4, clock=lambda: 0.0, min_batch=1)
        limit = ConcurrencyLimit("c-grow", limit=adaptive, queue=4, queue_timeout_s=3600)
        holder = await limit.slot().__aenter__()
        waiters = [asyncio.create_task(limit.slot().__aenter__()) for _ in range(2)]
        await _until(lambda: limit.queued == 2)
        holder.observe(0.1, 200)  # the first answer sets the baseline; the limit is in use: it grows
        assert limit.limit == 2
        slots = [await waiters[0]]
        assert (limit.in_flight, limit.queued) == (2, 1)
        for slot in [holder, *slots]:
            await slot.__aexit__(None, None, None)
        for slot in [await waiters[1]]:
            await slot.__aexit__(None, None, None)
        _settled(limit)

    asyncio.run(main())


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "auto"])
def test_thousands_of_mixed_exits_leave_no_slot_behind(adaptive: bool) -> None:
    """Successes, errors, queue timeouts, deadlines, and cancellation at every await (while queued,
    while holding, right after being handed a slot): afterwards nothing is in flight or queued, and the
    limit was never exceeded."""
    rng = random.Random(17)
    route = f"c-leak-{adaptive}"

    async def main() -> None:
        control = AdaptiveLimit(route, min_limit=2, max_limit=12, clock=lambda: 0.0) if adaptive else 8
        limit = ConcurrencyLimit(route, limit=control, queue=32, queue_timeout_s=0.01)
        inside = 0
        peak_excess = 0
        outcomes: dict[str, int] = {}

        async def request(kind: str, steps: int) -> None:
            nonlocal inside, peak_excess
            remaining = 0.001 if kind == "deadline" else None
            async with limit.slot(remaining_s=remaining) as slot:
                inside += 1
                peak_excess = max(peak_excess, inside - limit.limit) if not adaptive else peak_excess
                try:
                    for _ in range(steps):
                        await asyncio.sleep(0)
                    if kind == "error":
                        raise ValueError("boom")
                    slot.observe(rng.choice([0.01, 0.01, 0.02, 0.5]), rng.choice([200] * 8 + [429, 503, 500]))
                finally:
                    inside -= 1

        tasks: list[asyncio.Task[None]] = []
        for _ in range(4000):
            kind = rng.choice(["ok", "ok", "error", "cancel", "deadline", "slow"])
            steps = rng.randrange(0, 6) if kind != "slow" else 40
            task = asyncio.create_task(request(kind, steps))
            tasks.append(task)
            if kind == "cancel":
                # Cancel after a random number of loop turns: before it queues, while queued, just
                # after a slot was handed over, or while it holds one.
                asyncio.get_running_loop().call_soon(_cancel_later, task, rng.randrange(0, 8))
            if rng.random() < 0.7:
                await asyncio.sleep(0)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            name = "ok" if result is None else type(result).__name__
            outcomes[name] = outcomes.get(name, 0) + 1
        assert set(outcomes) <= {"ok", "ValueError", "CancelledError", "RouteBusy"}
        assert all(outcomes.get(k, 0) > 30 for k in ("ok", "ValueError", "CancelledError", "RouteBusy"))
        assert peak_excess == 0
        _settled(limit)

    asyncio.run(main())


def _cancel_later(task: asyncio.Task[None], turns: int) -> None:
    if turns == 0:
        task.cancel()
    else:
        asyncio.get_running_loop().call_soon(_cancel_later, task, turns - 1)


def test_slot_now_takes_a_free_slot_or_says_to_wait() -> None:
    """The request path's fast way in: a slot at once when one is free and nobody waits, else None (the
    request then queues with `slot()`, behind the waiters)."""

    async def main() -> None:
        limit = ConcurrencyLimit("slot-now", limit=1, queue=1, queue_timeout_s=5)
        first = limit.slot_now()
        assert first is not None and limit.in_flight == 1
        assert limit.slot_now() is None
        waiter = asyncio.ensure_future(limit.slot().acquire())
        await asyncio.sleep(0)
        first.release()
        first.release()  # once only
        second = await waiter
        assert (limit.in_flight, limit.queued) == (1, 0)
        second.release()
        assert (limit.in_flight, limit.queued) == (0, 0)
        adaptive = AdaptiveLimit("slot-now-auto", min_limit=2, max_limit=4)
        auto = ConcurrencyLimit("slot-now-auto", limit=adaptive, queue=0, queue_timeout_s=1)
        held = auto.slot_now()
        assert held is not None and held.epoch == adaptive.epoch
        held.observe(0.01, 429)  # a held slot feeds the limit
        assert adaptive.epoch == 1
        held.release()
        assert auto.in_flight == 0

    asyncio.run(main())


def test_a_replay_after_the_limit_came_down_waits_for_room_first() -> None:
    """`auto` after a 429: the requests in flight are more than the new limit; the one about to replay
    gives its slot back and waits at the head of the queue, so the replay does not meet the same full
    endpoint. Nothing is held if that wait is refused."""

    async def main() -> None:
        adaptive = AdaptiveLimit("requeue", min_limit=1, max_limit=8)
        adaptive.limit = 2
        limit = ConcurrencyLimit("requeue", limit=adaptive, queue=4, queue_timeout_s=5)
        first, second = limit.slot_now(), limit.slot_now()
        assert first is not None and second is not None
        newcomer = asyncio.ensure_future(limit.slot().acquire())
        await asyncio.sleep(0)
        limit.limit = 1  # as `_follow_limit` sets it after a decrease
        replay = asyncio.ensure_future(first.requeue(5.0))
        await asyncio.sleep(0)
        assert (limit.in_flight, limit.queued) == (1, 2)  # gave its slot back, waits ahead of the newcomer
        second.release()
        await replay
        assert not newcomer.done() and limit.in_flight == 1
        first.release()
        (await newcomer).release()
        assert (limit.in_flight, limit.queued) == (0, 0)
        # A refused wait holds nothing.
        short = ConcurrencyLimit("requeue-short", limit=2, queue=0, queue_timeout_s=0.01)
        a, b = short.slot_now(), short.slot_now()
        assert a is not None and b is not None
        short.limit = 1
        with pytest.raises(RouteBusy):
            await a.requeue(None)
        a.release()  # a no-op: it holds nothing
        b.release()
        assert (short.in_flight, short.queued) == (0, 0)

    asyncio.run(main())
