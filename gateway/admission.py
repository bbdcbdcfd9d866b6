"""Admission, a stage of the request path (docs: /work/shared/design/request-path.md, stage 5): may this
request take one of its route's concurrency slots now, wait for one in a bounded queue, or is it refused
with 503 `overloaded`. Decided before a byte of the body is read.

One `Admission` per route, built with the route. The proxy holds a slot in one try/finally:

    if not admission.try_enter():
        await admission.enter()
    try:
        ...  # credential, body, attempts, answer
    finally:
        admission.leave()

A route without `max_concurrent_requests` admits everything at once and costs one attribute test.
"""

from __future__ import annotations

import asyncio
import collections

from gateway.errors import Overloaded


class Admission:
    """A route's concurrency slots and the queue of requests waiting for one. A slot given back goes to
    the longest waiter directly, so a newcomer never overtakes the queue."""

    __slots__ = ("_free", "_queue", "max_concurrent", "queue_timeout_s", "route")

    def __init__(self, route: str, max_concurrent: int | None, queue_timeout_s: float) -> None:
        self.route = route
        self.max_concurrent = max_concurrent
        self.queue_timeout_s = queue_timeout_s
        self._free = max_concurrent  # None: no limit
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiters(self) -> int:
        return len(self._queue)

    @property
    def max_queue(self) -> int:
        """Requests that may wait for a slot: as many as the route runs at once."""
        return self.max_concurrent or 0

    def try_enter(self) -> bool:
        """Take a slot without waiting: True when admitted (always, on a route without a limit)."""
        free = self._free
        if free is None:
            return True
        if free > 0 and not self._queue:
            self._free = free - 1
            return True
        return False

    async def enter(self) -> None:
        """Wait in the route's queue for a slot, or raise Overloaded (503) when the queue is full or the
        wait outlasts `queue_timeout_s`. Call only after `try_enter()` returned False."""
        if self.queue_timeout_s <= 0 or len(self._queue) >= self.max_queue:
            raise Overloaded(
                f"route {self.route} is at its limit of {self.max_concurrent} requests in flight "
                f"with {len(self._queue)} waiting; retry shortly",
                retry_after=1,
            )
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(slot)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await slot
        except TimeoutError:
            if slot.done() and not slot.cancelled():
                return  # handed a slot just as the wait ran out: it is ours
            raise Overloaded(
                f"route {self.route} stayed at its limit of {self.max_concurrent} requests in flight for "
                f"{self.queue_timeout_s:g} s; retry shortly",
                retry_after=1,
            ) from None
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self.leave()  # handed a slot, then cancelled before using it: pass it on
            raise
        finally:
            if not slot.done():
                slot.cancel()
            try:
                self._queue.remove(slot)
            except ValueError:
                pass  # handed over: leave() took it off the queue

    def leave(self) -> None:
        """Give the slot back: to the longest waiter, else to the free count."""
        if self._free is None:
            return
        queue = self._queue
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1
