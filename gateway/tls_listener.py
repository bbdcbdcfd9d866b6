"""The TLS listener: a client connection counts from its TCP accept, and unfinished handshakes are bounded.

Given `ssl=`, uvloop creates a connection's application protocol at the accept but calls its
`connection_made` only once the TLS handshake is done, and never calls `connection_lost` when the
handshake fails or times out. A limit enforced there (`server.max_connections`) does not see a
connection still in its handshake: 400 sockets that never sent a ClientHello held 415 descriptors for
the whole handshake timeout (legitimate clients were reset once the descriptor limit was reached), and
3,000 of them took 160 MiB that the allocator kept after they were gone.

So the listener is created without `ssl=`, and each accepted connection gets uvloop's own SSLProtocol
(the same C code that reads, decrypts and writes, at the same cost per byte), subclassed to report its
TCP connection's start and end and its handshake's end to the worker's `HandshakeGate`:

- every connection counts against `server.max_connections` from its accept to its close;
- at most `server.tls.max_handshakes` handshakes are unfinished at once;
- a connection over either limit takes the place of the oldest unfinished handshake (a client that
  completes its handshake in time is served whatever a flood of idle sockets does); when no handshake is
  unfinished, the new connection is closed at once: there is no TLS session yet to answer 503 in.

A handshake is timed by `server.header_timeout_s`, like the request head that follows it. When a flood
is over (`FLOOD_QUIET_S` without a dropped or refused connection), the heap is trimmed once: bounded,
3,000 idle handshakes still churn through 256 KiB of read buffer and an SSL object each, and glibc
would keep those pages.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import ssl
from collections.abc import Callable
from typing import Any, Protocol, cast

import uvloop
import uvloop.loop

from gateway import metrics

logger = logging.getLogger("gateway.server")

# The C class uvloop wraps every TLS connection in; its stubs do not declare it.
_SSLProtocol: Any = getattr(uvloop.loop, "SSLProtocol")  # noqa: B009

# Refusal codes in gateway_inbound_refusals_total.
HANDSHAKE_DROPPED = "tls_handshake_dropped"
OVERLOADED = "overloaded"

# A flood (connections dropped or refused by the gate) has ended once none came for this long. Then the
# heap memory its thousands of short-lived connections went through is handed back to the system:
# glibc keeps freed pages in the middle of its heap, and repeated floods ratcheted the resident size up.
FLOOD_QUIET_S = 5.0


def _heap_trimmer() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


_MALLOC_TRIM = _heap_trimmer()


class HandshakeGate:
    """One worker's count of its TLS client connections (`open`) and of those still in their handshake
    (`pending`, oldest first). Used only from the event loop's thread."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, max_connections: int | None, max_handshakes: int
    ) -> None:
        self.loop = loop
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self.open = 0
        self.pending: dict[_GatedTlsProtocol, None] = {}
        self._flood_seen_at: float | None = None  # loop time of the last drop or refusal of this flood
        self._flood_timer: asyncio.TimerHandle | None = None

    def admit(self, connection: _GatedTlsProtocol) -> bool:
        """Count a connection just accepted; False when it must be closed unserved."""
        if len(self.pending) >= self.max_handshakes:
            self._drop_oldest_handshake("server.tls.max_handshakes")
        if self.max_connections is not None and self.open >= self.max_connections:
            if not self.pending:
                metrics.INBOUND_REFUSALS.labels(OVERLOADED).inc()
                self._flood()
                return False
            self._drop_oldest_handshake("server.max_connections")
        self.open += 1
        self.pending[connection] = None
        connection.counted = True
        return True

    def handshake_done(self, connection: _GatedTlsProtocol) -> None:
        self.pending.pop(connection, None)

    def release(self, connection: _GatedTlsProtocol) -> None:
        if connection.counted:
            connection.counted = False
            self.open -= 1
            self.pending.pop(connection, None)

    def _drop_oldest_handshake(self, limit: str) -> None:
        oldest = next(iter(self.pending))
        self.release(oldest)
        oldest.abort()
        metrics.INBOUND_REFUSALS.labels(HANDSHAKE_DROPPED).inc()
        if self._flood_timer is None:
            # Once per flood: it repeats this thousands of times; the counter tells how many.
            logger.warning(
                "TLS: dropped the oldest unfinished handshake to make room for a new connection (%s); "
                "idle or slow handshakes arrive faster than they finish (logged once per flood; "
                'gateway_inbound_refusals_total{code="tls_handshake_dropped"} counts them)',
                limit,
            )
        self._flood()

    def _flood(self) -> None:
        self._flood_seen_at = self.loop.time()
        if self._flood_timer is None:
            self._flood_timer = self.loop.call_later(FLOOD_QUIET_S, self._flood_over)

    def _flood_over(self) -> None:
        assert self._flood_seen_at is not None
        left = self._flood_seen_at + FLOOD_QUIET_S - self.loop.time()
        if left > 0:
            self._flood_timer = self.loop.call_later(left, self._flood_over)
            return
        self._flood_timer = None
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)


class _GatedTlsProtocol(_SSLProtocol):  # type: ignore[misc]
    """uvloop's SSLProtocol for one accepted connection, reporting to the gate. The TCP transport calls
    `connection_made`/`connection_lost`; the handshake's end (success or failure) resolves `waiter`."""

    __slots__ = ("counted", "gate", "tcp")

    def __init__(
        self,
        gate: HandshakeGate,
        loop: asyncio.AbstractEventLoop,
        app_protocol: asyncio.BaseProtocol,
        context: ssl.SSLContext,
        handshake_timeout_s: float,
    ) -> None:
        waiter = loop.create_future()
        super().__init__(
            loop,
            app_protocol,
            context,
            waiter,
            server_side=True,
            ssl_handshake_timeout=handshake_timeout_s,
        )
        self.gate = gate
        self.counted = False
        self.tcp: asyncio.Transport | None = None
        waiter.add_done_callback(self._handshake_done)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tcp = tcp = cast(asyncio.Transport, transport)  # uvloop's TCPTransport
        if not self.gate.admit(self):
            tcp.abort()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.gate.release(self)
        self.tcp = None
        super().connection_lost(exc)

    def abort(self) -> None:
        if self.tcp is not None:
            self.tcp.abort()

    def _handshake_done(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.cancelled():
            waiter.exception()  # retrieved: a failed handshake is the client's problem, not logged
        self.gate.handshake_done(self)


class TlsContexts(Protocol):
    """Where each accepted connection gets its SSLContext (`gateway.server_tls.ServerTls`): chosen at the
    accept, because OpenSSL resumes sessions from the context a connection was created with."""

    def for_new_connection(self) -> ssl.SSLContext: ...


class TlsListenerLoop(uvloop.Loop):
    """uvloop whose TLS servers count connections from their accept (see the module docstring). uvicorn
    calls `create_server(factory, sock=..., ssl=config.ssl)` for each listening socket of a worker, with
    `ssl` the `TlsContexts`; every listener of the worker shares one gate, as they share
    `server.max_connections`."""

    def __init__(
        self, *, max_connections: int | None, max_handshakes: int, handshake_timeout_s: float
    ) -> None:
        super().__init__()
        self.gate = HandshakeGate(self, max_connections=max_connections, max_handshakes=max_handshakes)
        self.handshake_timeout_s = handshake_timeout_s

    async def create_server(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], *args: Any, **kwargs: Any
    ) -> asyncio.Server:
        tls: TlsContexts | None = kwargs.pop("ssl", None)
        if tls is None:
            return await super().create_server(protocol_factory, *args, **kwargs)  # type: ignore[return-value]
        gate, timeout, context_for_new_connection = (
            self.gate,
            self.handshake_timeout_s,
            tls.for_new_connection,
        )

        def accepted() -> _GatedTlsProtocol:
            return _GatedTlsProtocol(gate, self, protocol_factory(), context_for_new_connection(), timeout)

        return await super().create_server(accepted, *args, **kwargs)  # type: ignore[return-value]
