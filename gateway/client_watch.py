"""What the server protocol tells the request in progress about its client: the client went away, or
stopped reading the answer for `server.send_timeout_s`.

uvicorn marks a disconnected request but nobody awaits that mark while the proxy waits for the
upstream. Instead of a watcher task per request, the proxy leaves its own task in the scope
(`CLIENT_TASK`); the protocol cancels that task when the connection is lost before the answer was
complete, after setting `CLIENT_GONE` to the reason. The cancellation runs the proxy's `finally`
blocks: the upstream connection is aborted (never pooled) and the route's concurrency slot released.

The send timeout costs nothing while the client reads: a timer exists only while the transport's
write buffer is over its high-water mark (uvicorn's `send` then waits for it to drain), and a client
that lets it stay there for `send_timeout_s` has its connection aborted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

logger = logging.getLogger("gateway.server")

# Scope keys: the task handling the request (set by the proxy), and why its client is gone (set here).
CLIENT_TASK = "gateway.client_task"
CLIENT_GONE = "gateway.client_gone"
# Key of the server state (the lifespan scope's "state") holding server.send_timeout_s; the app sets it.
SEND_TIMEOUT_STATE = "gateway.send_timeout_s"
DEFAULT_SEND_TIMEOUT_S = 30.0

DISCONNECTED = "client_disconnected"
SEND_TIMED_OUT = "client_send_timeout"


class WatchedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, telling the request's task when its client is gone."""

    _send_timer: asyncio.TimerHandle | None = None
    _gone_reason = DISCONNECTED
    # The request whose application call runs: not `self.cycle` (the last request parsed) when the
    # client pipelined another behind it.
    _running: RequestResponseCycle | None = None

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        cycle = self._running
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            # uvicorn marks only `self.cycle`; a queued request behind this one never starts.
            cycle.disconnected = True
            cycle.message_event.set()
            scope: dict[str, Any] = cycle.scope  # type: ignore[assignment]
            task: asyncio.Task[Any] | None = scope.pop(CLIENT_TASK, None)
            if task is not None and not task.done():
                scope[CLIENT_GONE] = self._gone_reason
                task.cancel()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            timeout = self.app_state.get(SEND_TIMEOUT_STATE, DEFAULT_SEND_TIMEOUT_S)
            self._send_timer = self.loop.call_later(timeout, self._send_timed_out, timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self, timeout: float) -> None:
        self._send_timer = None
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "on the unix socket"
        logger.warning(
            "client %s read nothing of the answer for %s s (server.send_timeout_s); closing its connection",
            client,
            f"{timeout:g}",
        )
        self._gone_reason = SEND_TIMED_OUT
        self.transport.abort()
