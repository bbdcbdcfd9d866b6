"""A few threads for blocking library calls (MSAL has no async API), awaited with a deadline."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class BlockingPool:
    """A small dedicated executor: identity calls never queue behind unrelated work in the loop's default
    executor, and a hung call cannot starve the event loop. Threads start on first use."""

    def __init__(self, max_workers: int = 4, name: str = "gateway-identity") -> None:
        self.max_workers = max_workers
        self.name = name
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def _get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix=self.name)
            return self._executor

    async def run(self, call: Callable[[], T], timeout_s: float) -> T:
        """Run `call` in a worker thread; TimeoutError after `timeout_s`.

        A timed-out call keeps its thread until its own (HTTP) timeout ends it: threads cannot be killed,
        which is why every blocking call made here must have a timeout of its own.
        """
        future = asyncio.get_running_loop().run_in_executor(self._get(), call)
        return await asyncio.wait_for(future, timeout_s)

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
