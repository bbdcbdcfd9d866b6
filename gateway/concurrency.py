"""A route's concurrency limit: in-flight slots and a bounded first-come-first-served queue
(`routes.NAME.limits.max_concurrent`, `queue`, `queue_timeout_s`).

    async with route_limit.slot(remaining_s, caller_label) as slot:   # RouteBusy when refused
        ...                                                           # the upstream attempts
        slot.observe(latency_s, status)                               # per answer, for `auto`

or, where one `try/finally` already covers the request (the proxy), `await slot.acquire()` before it and
`slot.release()` in its `finally`.

The slot is given back on every way out of the `async with`: an answer, an error, a timeout, a client
that went away, a cancelled task. A request cancelled while it waits never takes a slot: a slot handed to
it in the same instant goes on to the next waiter. A slot that comes free goes to the longest waiter
first, never to a newcomer: newcomers queue behind waiters.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from types import TracebackType

from gateway import metrics
from gateway.adaptive import AdaptiveLimit
from gateway.errors import RouteBusy

_new_object = object.__new__

# Retry-After of a `route_busy` answer: a slot frees up as soon as one upstream answer ends.
RETRY_AFTER_S = 1.0


class ConcurrencyLimit:
    """`limit` requests in flight at once, at most `queue` more waiting, each for at most `queue_timeout_s`.

    `limit` is a fixed number, or an `AdaptiveLimit` whose current value is followed (fed by
    `Slot.observe`). One per route, built at start-up; used on the event loop's thread only."""

    def __init__(self, route: str, *, limit: int | AdaptiveLimit, queue: int, queue_timeout_s: float) -> None:
        self.route = route
        self.adaptive = limit if isinstance(limit, AdaptiveLimit) else None
        self.limit: int = limit.limit if isinstance(limit, AdaptiveLimit) else limit
        if self.limit < 1 or queue < 0:
            raise ValueError("a concurrency limit needs limit >= 1 and queue >= 0")
        self.max_queue = queue
        self.queue_timeout_s = queue_timeout_s
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._wait_histogram = metrics.ADMISSION_WAIT.labels(route)
        # `in_flight` and `queued` are plain ints on the hot path, published with the in-flight gauges.
        metrics.track_admission(self)
        if self.adaptive is None:
            metrics.ADMISSION_LIMIT.labels(route).set(self.limit)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def slot_now(self, caller: str = "other") -> Slot | None:
        """A slot taken at once, held (give it back with `release()`), when one is free and nobody
        waits; else None, and the request waits with `slot()`. The request path's fast way in."""
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            # Made without calling `Slot.__init__`: a Python frame less per request on a limited route.
            slot = _new_object(Slot)
            slot._limit = self
            slot._remaining_s = None
            slot._caller = caller
            slot._held = True
            adaptive = self.adaptive
            slot.epoch = adaptive.epoch if adaptive is not None else 0
            return slot
        return None

    def slot(self, remaining_s: float | None = None, caller: str = "other") -> Slot:
        """A slot to hold in `async with`. `remaining_s`: time left before the request's deadline, which
        bounds the wait like `queue_timeout_s` does; `caller`: the bounded caller label of refusals."""
        return Slot(self, remaining_s, caller)

    async def _wait(self, remaining_s: float | None, caller: str, *, first: bool = False) -> None:
        """Queue for a slot; return holding one, or raise RouteBusy. `first`: at the head of the queue
        (a request admitted before, giving its slot back to replay; it takes no place in the queue)."""
        wait_s = self.queue_timeout_s if remaining_s is None else min(self.queue_timeout_s, remaining_s)
        waiters = self._waiters
        if (len(waiters) >= self.max_queue and not first) or wait_s <= 0:
            raise self._refuse(
                f"route {self.route} has {self.in_flight} requests in flight (its limit is {self.limit}) "
                f"and {len(waiters)} waiting (its queue holds {self.max_queue}); retry after the Retry-After "
                "delay",
                caller,
            )
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        if first:
            waiters.appendleft(waiter)
        else:
            waiters.append(waiter)
        expiry = loop.call_later(wait_s, self._expire, waiter)
        started = time.perf_counter()
        try:
            granted = await waiter
        except BaseException:
            # Cancelled (the client went away, the server stops): never keep a slot nobody will use.
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self._release()
            else:
                self._forget(waiter)
            raise
        finally:
            expiry.cancel()
        self._wait_histogram.observe(time.perf_counter() - started)
        if not granted:
            raise self._refuse(
                f"route {self.route} had no free slot within {wait_s:g} s ({self.limit} requests in flight "
                "at once); retry after the Retry-After delay",
                caller,
            )

    def _refuse(self, message: str, caller: str) -> RouteBusy:
        metrics.ADMISSION_REFUSALS.labels(self.route, "route_busy", caller).inc()
        return RouteBusy(message, retry_after=RETRY_AFTER_S)

    def _expire(self, waiter: asyncio.Future[bool]) -> None:
        if not waiter.done():
            self._forget(waiter)
            waiter.set_result(False)

    def _forget(self, waiter: asyncio.Future[bool]) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass  # handed a slot: _release() took it off the queue

    def _release(self) -> None:
        """Give a slot back: to the longest waiter if the limit allows, else to the pool."""
        if self.in_flight <= self.limit:
            waiters = self._waiters
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(True)  # the slot changes hands: in_flight stays
                    return
        self.in_flight -= 1

    def _follow_limit(self) -> None:
        """After a sample: take the adaptive limit's new value; a higher one admits waiters at once."""
        assert self.adaptive is not None
        self.limit = limit = self.adaptive.limit
        waiters = self._waiters
        while waiters and self.in_flight < limit:
            waiter = waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(True)


class Slot:
    """One request's hold on a route's concurrency: enter to acquire (or get RouteBusy), leave to release."""

    __slots__ = ("_caller", "_held", "_limit", "_remaining_s", "epoch")

    def __init__(self, limit: ConcurrencyLimit, remaining_s: float | None, caller: str) -> None:
        self._limit = limit
        self._remaining_s = remaining_s
        self._caller = caller
        self._held = False
        self.epoch = 0

    async def acquire(self) -> Slot:
        """Take a slot, waiting in the queue if need be; RouteBusy when refused. Nothing is held when it
        raises (a refusal, a cancellation). Pair with `release()` in a `finally` that covers every await
        after it, or use the slot in `async with`, which does both."""
        limit = self._limit
        if limit.in_flight < limit.limit and not limit._waiters:
            limit.in_flight += 1
        else:
            await limit._wait(self._remaining_s, self._caller)
        self._held = True
        adaptive = limit.adaptive
        if adaptive is not None:
            self.epoch = adaptive.epoch
        return self

    def release(self) -> None:
        """Give the slot back (once; a second call does nothing). The common case, nobody waiting, is
        written out here rather than in a second call: it runs once per request on a limited route."""
        if self._held:
            self._held = False
            limit = self._limit
            if limit._waiters:
                limit._release()
            else:
                limit.in_flight -= 1

    async def __aenter__(self) -> Slot:
        return await self.acquire()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()

    async def requeue(self, remaining_s: float | None) -> None:
        """Before a replay of an answer that said the upstream is full: when the limit has come down below
        the requests in flight (`auto` after a 429), give this slot back and wait at the head of the queue
        for the next one, so the replay is not sent into the same congestion. RouteBusy when none comes
        within `queue_timeout_s` or `remaining_s` (holding nothing then)."""
        limit = self._limit
        if not self._held or limit.in_flight <= limit.limit:
            return
        self._held = False
        limit._release()
        await limit._wait(remaining_s, self._caller, first=True)
        self._held = True
        adaptive = limit.adaptive
        if adaptive is not None:
            self.epoch = adaptive.epoch

    def observe(self, latency_s: float, status: int) -> None:
        """One upstream answer to this request: its status after `latency_s` from sending the request to
        receiving the response head. Only `max_concurrent: auto` uses it; call it for every attempt that
        got an answer (a 429 included), not for connection failures or the gateway's own errors."""
        limit = self._limit
        adaptive = limit.adaptive
        if adaptive is not None and self._held:
            adaptive.sample(latency_s, status, self.epoch, limit.in_flight)
            if adaptive.limit != limit.limit:
                limit._follow_limit()
