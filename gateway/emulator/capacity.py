"""How many scoring requests each emulated deployment serves at once, as Azure ML does.

An Azure ML online deployment runs at most `instances x max_concurrent_requests_per_instance` requests at
once; its front end queues some more and answers 429 beyond (Azure queues up to that number again, i.e.
`2 x max_concurrent_requests_per_instance x instances` pending in all). Here a deployment gets
`max_concurrent` (served at once) and `max_queued` (waiting for one of those, first come first served;
default 0, so the 429 comes as soon as `max_concurrent` are in flight). A deployment without a setting
has no limit. Counters: the peak in flight, requests served and throttled, and the time integral of the
number in flight, from which tests read the mean concurrency the endpoint saw.

Handlers run on the emulator's event loop; tests read and change settings from their own thread, so the
numbers sit behind a lock and waiters are woken on the loop they wait on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Deployment:
    max_concurrent: int
    max_queued: int
    in_flight: int = 0
    peak_in_flight: int = 0
    served: int = 0
    throttled: int = 0
    busy_seconds: float = 0.0  # integral of in_flight over time
    since: float = field(default_factory=time.monotonic)
    changed_at: float = field(default_factory=time.monotonic)
    waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = field(default_factory=deque)
    handed: set[asyncio.Future[None]] = field(default_factory=set)  # given a place, not yet resumed

    def account(self, now: float) -> None:
        self.busy_seconds += self.in_flight * (now - self.changed_at)
        self.changed_at = now


class Throttled(Exception):
    """The deployment is full: answer 429."""


class DeploymentCapacity:
    """The concurrency limits and counters of every emulated deployment."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deployments: dict[str, _Deployment] = {}

    def set(self, deployment: str, max_concurrent: int | None, max_queued: int = 0) -> None:
        """Serve at most `max_concurrent` requests of `deployment` at once (None: no limit), queue
        `max_queued` more, answer 429 beyond. Counters of the deployment start again."""
        if max_concurrent is not None and (max_concurrent < 1 or max_queued < 0):
            raise ValueError("max_concurrent must be at least 1 and max_queued at least 0")
        with self._lock:
            if max_concurrent is None:
                self._deployments.pop(deployment, None)
            else:
                self._deployments[deployment] = _Deployment(max_concurrent, max_queued)

    @asynccontextmanager
    async def slot(self, deployment: str) -> AsyncIterator[None]:
        """Hold one of the deployment's places while the model runs; raises Throttled when none is left."""
        with self._lock:
            state = self._deployments.get(deployment)
            waiter: asyncio.Future[None] | None = None
            if state is not None:
                if state.in_flight < state.max_concurrent and not state.waiters:
                    self._enter(state)
                elif len(state.waiters) < state.max_queued:
                    waiter = asyncio.get_running_loop().create_future()
                    state.waiters.append((asyncio.get_running_loop(), waiter))
                else:
                    state.throttled += 1
                    raise Throttled
        if state is None:
            yield
            return
        if waiter is not None:
            try:
                await waiter  # the place is handed over by the request that leaves
            except BaseException:
                with self._lock:
                    if waiter in state.handed:  # given a place in the same instant: pass it on
                        state.handed.discard(waiter)
                        self._leave(state)
                    else:
                        state.waiters = deque(w for w in state.waiters if w[1] is not waiter)
                raise
            with self._lock:
                state.handed.discard(waiter)
        try:
            yield
        finally:
            with self._lock:
                state.served += 1
                self._leave(state)

    def _enter(self, state: _Deployment) -> None:
        state.account(time.monotonic())
        state.in_flight += 1
        state.peak_in_flight = max(state.peak_in_flight, state.in_flight)

    def _leave(self, state: _Deployment) -> None:
        state.account(time.monotonic())
        state.in_flight -= 1
        while state.waiters:
            loop, waiter = state.waiters.popleft()
            if not waiter.done():
                self._enter(state)
                state.handed.add(waiter)
                loop.call_soon_threadsafe(_hand_over, waiter)
                return

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per deployment: settings, in flight now, peak, served, throttled, and `mean_in_flight` since its
        setting (or the last `reset_counters`)."""
        now = time.monotonic()
        with self._lock:
            view = {}
            for name, state in self._deployments.items():
                state.account(now)
                elapsed = now - state.since
                view[name] = {
                    "max_concurrent": state.max_concurrent,
                    "max_queued": state.max_queued,
                    "in_flight": state.in_flight,
                    "queued": len(state.waiters),
                    "peak_in_flight": state.peak_in_flight,
                    "served": state.served,
                    "throttled": state.throttled,
                    "mean_in_flight": state.busy_seconds / elapsed if elapsed > 0 else 0.0,
                }
            return view

    def reset_counters(self) -> None:
        with self._lock:
            now = time.monotonic()
            for state in self._deployments.values():
                state.peak_in_flight = state.in_flight
                state.served = state.throttled = 0
                state.busy_seconds = 0.0
                state.since = state.changed_at = now


def _hand_over(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
