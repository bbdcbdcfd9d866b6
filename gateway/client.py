"""The upstream HTTP/1.1 client: pooled keep-alive connections on asyncio protocols, parsed by httptools.

Why not aiohttp or httpx: on this hot path a general-purpose client's per-request machinery (request
objects, URL parsing, cookie jars, tracing hooks, timeout contexts) cost more than the proxying itself;
bench/ measures the difference. This client does only what a reverse proxy needs: send a request
head and body already in wire form, hand back status, raw headers and a flow-controlled body stream,
and keep connections alive. Everything per origin (Host header, TLS settings) is prepared once.

A pool (`Origin`) belongs to one route's upstream origin: routes that reach the same scheme://host:port
each have their own, so each route's `max_connections` and `pool_timeout_s` hold for its own requests
(a shared pool would need one limit for all of them). A reload builds new pools for routes whose limit
changed or that are gone, and retires the old ones (`retire`): their idle connections are closed and
their busy ones closed when their answer is done.

Each connection follows one exchange at a time through an explicit state machine, with h11's and
httpcore's discipline:

    IDLE -> SENDING -> AWAITING_HEAD -> RECEIVING_BODY -> DONE -> IDLE (pooled again) ... -> CLOSED

- Bytes that arrive while no request is outstanding (IDLE, DONE) are never parsed as an answer: the
  connection is closed (an unsolicited `408` on an idle keep-alive connection, a HEAD answer's body).
- A connection is checked for liveness at every hand-off (idle pick and waiter), including a poll of
  its socket, so a connection the upstream closed is never written to; a closing one is never pooled.
- The one resend rule: a request is sent again by the client itself only when no byte of it reached
  the socket. Every other failure raises with `request_sent=True` and the route's retry policy decides.
- A final answer that arrives while the request body is still being sent stops the sending and goes to
  the caller at once; the connection is then not reused.
- Every timer fails its own request directly (it does not wait for `connection_lost`). One timer per
  connection covers `timeout_s` (the whole attempt) and `read_timeout_s` (the longest silence of the
  upstream while its answer is awaited): it checks the exchange's deadline and a last-activity stamp
  when it fires and re-arms, instead of being re-armed on every chunk. It outlives the exchange that
  armed it: the next exchange on the connection re-arms it only when its first check falls earlier
  (a timer that fires early just re-arms; one that fires between exchanges ends). `write_timeout_s` is
  armed only while a write is stalled.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import select
import socket
import ssl
import time
import weakref
from collections.abc import AsyncIterator
from typing import Final, NoReturn
from urllib.parse import urlsplit

import httptools

from gateway import egress
from gateway.errors import (
    ConnectError,
    ConnectionLost,
    PoolTimeout,
    ProtocolError,
    TransportError,
    TransportTimeout,
)

logger = logging.getLogger("gateway.client")

_HIGH_WATER = 256 * 1024  # pause reading from the upstream while this much body waits for the client
_LOW_WATER = 64 * 1024
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
# The settings an attempt's own time limit comes from, as errors name them.
TIMEOUT_S: Final = "timeout_s"
DEADLINE_S: Final = "retry.deadline_s"
MAX_RESPONSE_HEADERS = 100
# Timers may fire a hair early (the loop's clock resolution): a deadline this close counts as reached.
_EPSILON = 0.001

# Connection states. Plain ints: compared on every callback of the hot path.
IDLE: Final = 0  # pooled or just opened; no request outstanding: any byte from the upstream is an error
SENDING: Final = 1  # the request is being written (an early answer may already have arrived)
AWAITING_HEAD: Final = 2  # the request is written; the answer's head is awaited
RECEIVING_BODY: Final = 3  # the head was handed to the caller; the body is arriving
DONE: Final = 4  # the answer is complete; waiting for the caller to release the connection
CLOSED: Final = 5

# OpenSSL verification results worth their own explanation (X509_V_ERR_*).
_UNKNOWN_CA = frozenset({2, 18, 19, 20, 21})
_NAME_MISMATCH = frozenset({62, 64})
_EXPIRED = 10
_NOT_YET_VALID = 9


class _StopParsing(Exception):
    """Raised inside a parser callback once the exchange has failed: nothing after it is parsed."""


class Origin:
    """One scheme://host:port as one route reaches it: its connection pool."""

    def __init__(
        self,
        url: str,
        ssl_context: ssl.SSLContext | None,
        *,
        max_connections: int = 256,
        keepalive_s: float = 30.0,
        proxy: egress.Proxy | None = None,
    ) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl_context if parts.scheme == "https" else None
        default_port = (parts.scheme == "https" and self.port == 443) or (
            parts.scheme == "http" and self.port == 80
        )
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if default_port else f"{host}:{self.port}").encode("idna")
        self.name = f"{host}:{self.port}"
        # The egress proxy, chosen at start-up. An http origin behind one gets its requests in absolute
        # form: `forward_prefix` is what goes before the path (None: origin form, the usual case).
        self.proxy = proxy
        self.forward_prefix = (
            b"http://" + self.host_header if proxy is not None and self.scheme == "http" else None
        )
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self.idle: collections.deque[_Connection] = collections.deque()
        self.open = 0
        self.waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        # True once a reload replaced the pool: no connection of it is pooled again.
        self.retired = False
        # The certificate the origin presented when the gateway last refused it (see _certificate_problem).
        self.presented: tuple[float, _Presented | None] | None = None

    def __repr__(self) -> str:
        return f"Origin({self.scheme}://{self.host}:{self.port})"


class UpstreamResponse:
    """Status and raw headers at once; the body as a stream that must be consumed or closed."""

    __slots__ = ("_chunks", "_conn", "_eof", "_error", "_size", "_waiter", "headers", "status")

    def __init__(self, conn: _Connection, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # fed by the connection
    # Hot path: `_feed` and `_feed_eof` call `_wake` only when someone waits.
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER and self._conn is not None:
            self._conn.pause_reading()
        if self._waiter is not None:
            self._wake()

    def _feed_eof(self) -> None:
        self._eof = True
        if self._waiter is not None:
            self._wake()

    def _fail(self, error: BaseException) -> None:
        if not self._eof:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    @property
    def ready(self) -> bool:
        """`next_chunk()` would return (or raise) without waiting."""
        return bool(self._chunks) or self._eof or self._error is not None

    def take_complete_body(self) -> bytes | None:
        """The whole body when all of it has arrived, else None (and nothing is taken): the usual small
        answer is read in one call, without a wait."""
        if not self._eof:
            return None
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        return data

    async def next_chunk(self) -> bytes:
        """The next piece of body, or b"" at the end. Raises ConnectionLost/TransportTimeout on failure."""
        while not self._chunks:
            if self._eof:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._size < _LOW_WATER and self._conn is not None:
            self._conn.resume_reading()
        return chunk

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.next_chunk():
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks()])

    def release(self) -> None:
        """Give the connection back: to the pool when the body was read to the end, else closed."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if self._eof and not self._chunks and self._error is None:
            conn.finish()
        else:
            conn.abort()


class _Connection(asyncio.Protocol):
    def __init__(self, origin: Origin, client: UpstreamClient) -> None:
        self.origin = origin
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.poller: select.poll | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.state = IDLE
        self.reused = False
        self.idle_since = 0.0
        self.response: UpstreamResponse | None = None
        self.head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self.request_sent = False
        self.received_any = False
        self.head_request = False
        self.reusable = True  # False once anything makes the next exchange on it unsafe
        # Bytes received while the answer's head is incomplete: an endless header line grows inside
        # httptools, out of sight of the callbacks, so the limit is enforced on what arrives.
        self.head_bytes = 0
        # The same for trailer lines: from a chunk-size line until the chunk's data shows it was not
        # the last chunk, bytes are counted (see `on_chunk_header`).
        self.counting_trailers = False
        self.trailer_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0  # loop time `timer` fires at
        self.deadline = 0.0
        self.total_timeout = 0.0
        self.total_timer = TIMEOUT_S  # the setting total_timeout comes from (see UpstreamClient.request)
        self.read_timeout = 0.0
        self.last_activity = 0.0
        self.write_timeout = 0.0
        self.write_timer: asyncio.TimerHandle | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._reading_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.writing_paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.poller = select.poll()
            self.poller.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == IDLE or state == DONE or state == CLOSED:
            # Nothing was asked: an unsolicited answer (a 408 before closing) or bytes past the answer.
            self._close_unsolicited()
            return
        self.received_any = True
        self.last_activity = self.loop.time()
        if self.response is None:
            self.head_bytes += len(data)
        elif self.counting_trailers:
            self.trailer_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.state == DONE:
                self.reusable = (
                    False  # garbage after a complete answer: the answer stands, not the connection
                )
            elif self.state != CLOSED:  # else a callback failed the exchange already
                self._protocol_error(f"invalid HTTP response from {self.origin.name}: {exc}")
            return
        if self.response is None:
            if self.head_bytes > MAX_RESPONSE_HEAD_BYTES:
                self._protocol_error(self._head_limit_message())
        elif self.counting_trailers and self.trailer_bytes > MAX_RESPONSE_HEAD_BYTES:
            self._protocol_error(
                f"the trailers of {self.origin.name}'s chunked answer break the limit of "
                f"{MAX_RESPONSE_HEAD_BYTES} bytes"
            )

    def eof_received(self) -> bool | None:
        response = self.response
        if self.state == RECEIVING_BODY and response is not None and _close_delimited(response.headers):
            # A body without Content-Length or chunking ends at the upstream's clean end of stream.
            self.reusable = False
            self._message_done()
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        self.state = CLOSED
        self._cancel_timers()
        if state != IDLE and state != DONE and state != CLOSED:
            reset = isinstance(exc, ConnectionResetError)
            self._fail(
                ConnectionLost(
                    f"the upstream {self.origin.name} "
                    + ("reset the connection" if reset else "closed the connection")
                    + (f" ({type(exc).__name__})" if exc is not None and not reset else "")
                    + (" before answering" if not self.received_any else " mid-answer"),
                    request_sent=self.request_sent,
                    reused=self.reused,
                    received_any=self.received_any,
                    cause="reset" if reset else "closed",
                )
            )
        # Break the protocol <-> parser and connection <-> response cycles now, so their buffers are
        # freed by reference counting instead of waiting for the garbage collector.
        self.parser = _DEAD_PARSER
        self.response = None
        self.head_waiter = None
        self._headers = []
        self.client._forget(self)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_drain()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        if len(headers) > MAX_RESPONSE_HEADERS:
            self._protocol_error(self._head_limit_message())
            raise _StopParsing
        if len(name) == 17 and name.lower() == b"transfer-encoding" and value.lower() != b"chunked":
            # Transfer-Encoding is hop by hop, so it is not passed on: a body in any other coding
            # (gzip, or close-delimited behind one) would reach the client altered without a word.
            self._protocol_error(
                f"the upstream {self.origin.name} sent Transfer-Encoding: "
                f"{value.decode('latin-1', 'replace')[:100]!r}; only chunked is supported"
            )
            raise _StopParsing

    def on_headers_complete(self) -> None:
        if self.state == DONE:
            # A second answer in the same read as the first one: nothing asked for it.
            self.reusable = False
            raise _StopParsing
        status = self.parser.get_status_code()
        if status < 200:
            if status < 100:
                self._invalid_status(status)  # not an interim answer: never wait for a final one after it
            if status == 101:
                logger.warning(
                    "upstream %s answered 101 Switching Protocols; the gateway does not forward protocol "
                    "upgrades: answering 502 upstream_protocol_error",
                    self.origin.name,
                )
                self._protocol_error(
                    f"the upstream {self.origin.name} answered 101 Switching Protocols; protocol upgrades "
                    "are not forwarded"
                )
                raise _StopParsing  # what follows is not HTTP
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._headers = []
            return
        if status > 599:
            self._invalid_status(status)  # a client of the gateway could not tell what it means
        headers = self._headers
        if self.head_bytes > MAX_RESPONSE_HEAD_BYTES and _head_size(headers) > MAX_RESPONSE_HEAD_BYTES:
            # Only a large read can hide a large head (the common small answer skips the sum).
            self._protocol_error(self._head_limit_message())
            raise _StopParsing
        if not self.parser.should_keep_alive():
            self.reusable = False
        response = UpstreamResponse(self, status, headers)
        self._headers = []
        self.response = response
        if self.state == AWAITING_HEAD:
            self.state = RECEIVING_BODY
        waiter = self.head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        if self._drain_waiter is not None:
            self._wake_drain()  # an answer during the upload: stop sending (see `UpstreamClient.request`)
        if self.head_request:
            # httptools cannot be told that an answer to HEAD has no body: end it here and parse what
            # comes next with a fresh parser (bytes that still reach this one are unsolicited).
            self.parser = httptools.HttpResponseParser(self)
            self._message_done()

    def on_chunk_header(self) -> None:
        # After the last chunk's size line come trailer lines, which httptools accumulates out of
        # sight of the callbacks until each line ends: count what arrives until this chunk's data
        # (`on_body`) shows that it was not the last chunk. (After the last one the answer is done and
        # `begin` resets the count.)
        self.counting_trailers = True
        self.trailer_bytes = 0

    def on_body(self, body: bytes) -> None:
        self.counting_trailers = False
        response = self.response
        if response is None or self.state == DONE:
            self._close_unsolicited()
            return
        response._feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is not None and self.state != DONE:
            # `_message_done`, inlined (hot path)
            self.state = DONE  # the connection's timer stays armed for the next exchange (see `begin`)
            response._feed_eof()

    # the exchange
    def begin(
        self,
        now: float,
        head_request: bool,
        deadline: float,
        total_timeout: float,
        read_timeout: float,
        write_timeout: float,
    ) -> asyncio.Future[UpstreamResponse]:
        self.state = SENDING
        self.head_request = head_request
        if self._headers:
            self._headers = []  # trailers of the previous chunked answer: not this answer's headers
        self.head_bytes = 0
        self.counting_trailers = False
        self.deadline = deadline
        self.total_timeout = total_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.last_activity = now
        waiter = self.head_waiter = self.loop.create_future()
        first_check = now + read_timeout
        if deadline < first_check:
            first_check = deadline
        # Hot path: the connection's timer, still armed by an earlier exchange, is kept when it fires no
        # later than this exchange's first check (it re-arms itself then); a timer per request cost an
        # allocation and two timer-heap updates.
        timer = self.timer
        if timer is None or first_check < self.timer_at:
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(first_check, self._on_timer)
            self.timer_at = first_check
        return waiter

    def sent(self, complete: bool, took_time: bool) -> None:
        """The request is written (`complete`), or abandoned because the answer came first."""
        if not complete:
            self.reusable = False  # the upstream would take the rest of the body for the next request
        if self.state == SENDING:
            if self.response is None:
                self.state = AWAITING_HEAD
                if took_time:
                    self.last_activity = self.loop.time()  # the upstream's silence counts from here
            else:
                self.state = RECEIVING_BODY

    def _message_done(self) -> None:
        response = self.response
        assert response is not None
        self.state = DONE  # the connection's timer stays armed for the next exchange (see `begin`)
        response._feed_eof()

    def _on_timer(self) -> None:
        self.timer = None
        state = self.state
        if state == IDLE or state == DONE or state == CLOSED:
            return
        now = self.loop.time()
        if now >= self.deadline - _EPSILON:
            self._time_out(
                f"the upstream {self.origin.name} did not complete its answer within "
                f"{self.total_timeout:g} s ({self.total_timer})",
                _total_phase(self.total_timer),
            )
            return
        if state == SENDING or self._reading_paused:
            self.last_activity = now  # waiting on our side, not on the upstream's
        elif now - self.last_activity >= self.read_timeout - _EPSILON:
            where = "before its answer's head" if self.response is None else "in the middle of its answer"
            self._time_out(
                f"the upstream {self.origin.name} sent nothing for {self.read_timeout:g} s {where} "
                "(read_timeout_s)",
                "read",
            )
            return
        self.timer_at = min(self.deadline, self.last_activity + self.read_timeout)
        self.timer = self.loop.call_at(self.timer_at, self._on_timer)

    def _on_write_timer(self) -> None:
        self.write_timer = None
        if self.state == SENDING and self.writing_paused:
            self._time_out(
                f"the upstream {self.origin.name} stopped reading the request for {self.write_timeout:g} s "
                "(write_timeout_s)",
                "write",
            )

    def _time_out(self, message: str, phase: str) -> None:
        self._fail(TransportTimeout(message, phase=phase, request_sent=True))
        self.abort()

    def _protocol_error(self, message: str) -> None:
        self._fail(ProtocolError(message, request_sent=True))
        self.abort()

    def _invalid_status(self, status: int) -> NoReturn:
        """RFC 9110 15: a status code outside 100..599 is invalid (httptools parses any three digits)."""
        self._protocol_error(
            f"the upstream {self.origin.name} answered with the status {status:03d}, outside 100..599: "
            "not a valid HTTP status"
        )
        raise _StopParsing

    def _head_limit_message(self) -> str:
        return (
            f"the answer head of {self.origin.name} breaks the limits of {MAX_RESPONSE_HEAD_BYTES} bytes "
            f"and {MAX_RESPONSE_HEADERS} header lines"
        )

    def _close_unsolicited(self) -> None:
        self.reusable = False
        if self.state == IDLE:
            self.abort()  # pooled: nobody to tell, the next request takes another connection
        # DONE: the caller still reads the buffered answer; `release()` closes the connection.

    def _fail(self, error: TransportError) -> None:
        waiter = self.head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        elif self.response is not None:
            self.response._fail(error)
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_exception(error)

    def _cancel_timers(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None

    def _wake_drain(self) -> None:
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and self.state != CLOSED:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and self.state != CLOSED:
            self._reading_paused = False
            self.transport.resume_reading()

    async def drain(self) -> None:
        """Wait while the upstream is not reading what we write, at most `write_timeout` per stall."""
        if self.state != SENDING or self.response is not None:
            return
        self._drain_waiter = self.loop.create_future()
        self.write_timer = self.loop.call_later(self.write_timeout, self._on_write_timer)
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None
            if self.write_timer is not None:
                self.write_timer.cancel()
                self.write_timer = None

    def alive(self, now: float) -> bool:
        """Safe to send a request on: idle, open, within keep-alive, and nothing unread on its socket
        (an unread close or unsolicited answer that the event loop has not processed yet)."""
        transport = self.transport
        return (
            self.state == IDLE
            and transport is not None
            and not transport.is_closing()
            and now - self.idle_since < self.origin.keepalive_s
            and not (self.poller is not None and self.poller.poll(0))
        )

    def finish(self) -> None:
        """The caller read the whole answer: back to the pool when the exchange allows it."""
        transport = self.transport
        if (
            self.state != DONE
            or not self.reusable
            or transport is None
            or transport.is_closing()
            # The answer came before the upstream read all of the request: the rest would be taken
            # for the next request on this connection.
            or transport.get_write_buffer_size()
        ):
            self.abort()
            return
        self.state = IDLE
        self.response = None
        self.head_waiter = None
        self.head_request = False
        self.request_sent = False
        self.received_any = False
        if self._reading_paused:  # hot path: the call only when reading was paused
            self.resume_reading()
        self.client._release(self)

    def abort(self) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._cancel_timers()
        if self.transport is not None:
            self.transport.abort()


class _NoParser:
    """Stands in for the parser of a closed connection (no data arrives after `connection_lost`)."""

    def feed_data(self, data: bytes) -> None:
        raise httptools.HttpParserError("the connection is closed")

    def get_status_code(self) -> int:
        return 0

    def should_keep_alive(self) -> bool:
        return False


_DEAD_PARSER: httptools.HttpResponseParser = _NoParser()  # type: ignore[assignment]


class UpstreamClient:
    """One per process. Pools are created when a configuration is built (`origin()`), one per route and
    upstream origin, and reused for every request of that configuration (and of a reload that keeps them)."""

    def __init__(
        self, ssl_context: ssl.SSLContext | None, egress_policy: egress.Egress | None = None
    ) -> None:
        self.ssl_context = ssl_context
        self.egress = egress_policy or egress.Egress.direct()
        # Every pool still in use (by a route, or by a connection of a retired pool): `close` closes
        # their idle connections. Weak: the pools of a configuration that was built and never ran go away.
        self._pools: weakref.WeakSet[Origin] = weakref.WeakSet()
        self._closed = False

    def origin(self, url: str, *, max_connections: int = 256) -> Origin:
        """A new pool of at most `max_connections` connections to `url`'s origin, for one route."""
        parts = urlsplit(url)
        origin = Origin(
            url,
            self.ssl_context,
            max_connections=max_connections,
            proxy=self.egress.proxy_for(parts.scheme, parts.hostname or ""),
        )
        self._pools.add(origin)
        return origin

    @staticmethod
    def retire(origin: Origin) -> None:
        """A reload replaced `origin`: its idle connections are closed now, its busy ones once their
        answer is done (requests in flight finish on it; none is pooled again)."""
        origin.retired = True
        while origin.idle:
            origin.idle.pop().abort()

    async def _connect(
        self, origin: Origin, limit_s: float, timer: str, phase: str = "connect"
    ) -> _Connection:
        """A new connection within `limit_s` (TCP, the egress proxy's CONNECT, TLS); a TransportTimeout
        names the wait as `limit_s` seconds of `timer`, in `phase`."""
        loop = asyncio.get_running_loop()
        try:
            _, conn = await egress.open_connection(
                loop, lambda: _Connection(origin, self), origin, origin.ssl, limit_s
            )
        except TimeoutError as exc:
            via = f" through the egress proxy {origin.proxy.address}" if origin.proxy is not None else ""
            raise TransportTimeout(
                f"no connection to {origin.name}{via} within {limit_s:g} s ({timer}): "
                f"{exc or 'the connection'} did not complete",
                phase=phase,
                request_sent=False,
            ) from None
        except ssl.SSLCertVerificationError as exc:
            cause, message = await _certificate_problem(origin, exc, limit_s)
            raise ConnectError(message, cause=cause) from None
        except ssl.SSLError as exc:
            raise ConnectError(
                f"TLS handshake with {origin.name} failed: {exc.reason or exc}", cause="tls_handshake"
            ) from None
        except OSError as exc:
            raise ConnectError(
                f"cannot connect to {origin.name}: {exc.strerror or exc}", cause=_connect_cause(exc)
            ) from None
        return conn

    @staticmethod
    def _idle_connection(origin: Origin) -> _Connection | None:
        """The most recently pooled connection that is still alive (the dead ones met are closed)."""
        idle = origin.idle
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.alive(now):
                conn.reused = True
                return conn
            conn.abort()
        return None

    async def _acquire(
        self,
        origin: Origin,
        pool_timeout: float,
        connect_timeout: float,
        total_timeout: float,
        total_timer: str = TIMEOUT_S,
    ) -> _Connection:
        """A live connection: an idle one, one handed over by a finishing request, or a new one.

        Liveness is checked at every hand-off, right before the caller writes (no await in between),
        so a connection found closed here is replaced before a byte of the request was sent. Neither
        wait outlasts the attempt's `total_timeout`."""
        waited_until = 0.0
        while True:
            conn = self._idle_connection(origin)
            if conn is not None:
                return conn
            if origin.open < origin.max_connections:
                origin.open += 1
                try:
                    if connect_timeout <= total_timeout:
                        return await self._connect(origin, connect_timeout, "connect_timeout_s")
                    return await self._connect(
                        origin,
                        total_timeout,
                        _shorter(connect_timeout, "connect", total_timer),
                        "connect" if total_timer == TIMEOUT_S else "deadline",
                    )
                except BaseException:
                    origin.open -= 1
                    self._wake_waiter(origin)
                    raise
            loop = asyncio.get_running_loop()
            if pool_timeout <= total_timeout:
                limit, timer = pool_timeout, "pool_timeout_s"
            else:
                limit, timer = total_timeout, _shorter(pool_timeout, "pool", total_timer)
            if not waited_until:
                waited_until = loop.time() + limit
            handed = await self._wait_for_connection(origin, waited_until - loop.time(), limit, timer)
            if handed is not None:
                if handed.alive(time.monotonic()):
                    handed.reused = True
                    return handed
                handed.abort()  # closed meanwhile: its slot comes free; look again

    async def _wait_for_connection(
        self, origin: Origin, left: float, limit: float, timer: str
    ) -> _Connection | None:
        """A connection (or a free slot: None) handed over within `left`; PoolTimeout names the wait as
        `limit` seconds of `timer`."""
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        origin.waiters.append(waiter)
        try:
            async with asyncio.timeout(max(left, 0.0)):
                return await waiter
        except TimeoutError:
            if not waiter.done() or waiter.cancelled():
                waiter.cancel()
                raise PoolTimeout(
                    f"all {origin.max_connections} connections to {origin.name} stayed busy for "
                    f"{limit:g} s ({timer})"
                ) from None
            # Handed a connection (or a free slot) just as the wait ran out: take it, never leak it.
            return waiter.result()
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                handed = waiter.result()
                if handed is not None:
                    handed.reused = True
                    self._release(handed)  # pass it on to the next waiter or the pool
                else:
                    self._wake_waiter(origin)
            else:
                waiter.cancel()
            raise

    def _release(self, conn: _Connection) -> None:
        origin = conn.origin
        if conn.state != IDLE or conn.transport is None or conn.transport.is_closing():
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        while origin.waiters:
            waiter = origin.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)  # the waiter checks it is still alive when it resumes
                return
        if origin.retired:
            conn.abort()
            return
        origin.idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        """A connection closed: free its slot (idle ones are dropped lazily by `_acquire`)."""
        origin = conn.origin
        origin.open -= 1
        self._wake_waiter(origin)

    @staticmethod
    def _wake_waiter(origin: Origin) -> None:
        while origin.waiters:
            waiter = origin.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # None: open a new connection yourself
                return

    async def request(
        self,
        origin: Origin,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        head_request: bool = False,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        write_timeout: float = 30.0,
        pool_timeout: float = 5.0,
        total_timeout: float = 60.0,
        total_timer: str = TIMEOUT_S,
    ) -> UpstreamResponse:
        """Send `head` (request line and headers, ending in a blank line) and `body`; return the response
        once its headers arrived. Never sends the request twice: a failure after its first byte reached
        the socket raises with `request_sent=True` (the caller's retry policy decides). `total_timer`
        names the setting `total_timeout` comes from, in the errors (`TIMEOUT_S`, or `DEADLINE_S` when
        the request's deadline left the attempt less).

        The proxy passes every argument by position (keyword arguments cost a dict per request)."""
        if origin.forward_prefix is not None:
            # An http origin behind the egress proxy: the request line in absolute form.
            assert origin.proxy is not None
            head = egress.absolute_form(head, origin.forward_prefix, origin.proxy)
        # Hot path: a live idle connection is taken without a coroutine, and its loop's clock read
        # without `asyncio.get_running_loop()` (a getpid system call per call); `_acquire` when there
        # is none.
        conn = self._idle_connection(origin)
        if conn is None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + total_timeout
            conn = await self._acquire(origin, pool_timeout, connect_timeout, total_timeout, total_timer)
            now = loop.time()
        else:
            now = conn.loop.time()
            deadline = now + total_timeout
        transport = conn.transport
        assert transport is not None
        if now >= deadline:
            # The wait for a connection used the whole attempt: give it back unused.
            self._release(conn)
            raise TransportTimeout(
                f"no time left to send the request to {origin.name} within {total_timeout:g} s "
                f"({total_timer})",
                phase=_total_phase(total_timer),
                request_sent=False,
            )
        waiter = conn.begin(now, head_request, deadline, total_timeout, read_timeout, write_timeout)
        conn.total_timer = total_timer
        conn.request_sent = True
        try:
            if body is None or isinstance(body, bytes):
                transport.write(head + body if body else head)
                if conn.writing_paused:
                    await conn.drain()
                    conn.sent(True, True)
                else:
                    conn.sent(True, False)
            else:
                transport.write(head)
                conn.sent(await _send_stream(conn, transport, body, waiter), True)
            return await waiter
        except BaseException:
            conn.abort()
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # retrieved: the error that matters is the one propagating
            # The error's traceback holds this frame: without these locals it holds no connection
            # (error -> traceback -> frame -> waiter -> error would wait for the garbage collector).
            del conn, transport, waiter
            raise

    async def close(self) -> None:
        self._closed = True
        for origin in list(self._pools):
            while origin.idle:
                origin.idle.pop().abort()


async def _send_stream(
    conn: _Connection,
    transport: asyncio.Transport,
    body: AsyncIterator[bytes],
    waiter: asyncio.Future[UpstreamResponse],
) -> bool:
    """Write a streamed body: True once all of it is written, False when the answer (or a failure)
    came first. The wait for the client's next chunk is raced against the answer, so a client that
    pauses its upload never holds back an answer that has already arrived."""
    chunks = aiter(body)
    while True:
        reading = asyncio.ensure_future(anext(chunks, None))
        try:
            if not reading.done():
                await asyncio.wait((reading, waiter), return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                return False
            chunk = reading.result()
        finally:
            reading.cancel()  # no-op when done; else the body is abandoned: stop waiting for it
        if chunk is None:
            return True
        if conn.state != SENDING or waiter.done():
            return False  # answered (or failed) already: stop sending
        transport.write(chunk)
        if conn.writing_paused:
            await conn.drain()


def _close_delimited(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, _ in headers:
        lowered = name.lower()
        if lowered == b"content-length" or lowered == b"transfer-encoding":
            return False
    return True


def _head_size(headers: list[tuple[bytes, bytes]]) -> int:
    return sum(len(name) + len(value) + 4 for name, value in headers)


def _shorter(value: float, kind: str, total_timer: str) -> str:
    """The timer that ended a wait for a connection when the attempt's own limit (`total_timer`) came
    before the wait's timer (`connect` or `pool`), as the operator's log line names it."""
    return f"{total_timer}, shorter than {kind}_timeout_s {value:g} s"


def _total_phase(total_timer: str) -> str:
    """The phase of a TransportTimeout of the attempt's own limit: `total` (timeout_s), or `deadline`
    when the request's retry.deadline_s left the attempt less than timeout_s (the cause then names it)."""
    return "total" if total_timer == TIMEOUT_S else "deadline"


def _connect_cause(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
        return "reset"
    return "unreachable"


async def _certificate_problem(
    origin: Origin, exc: ssl.SSLCertVerificationError, limit_s: float
) -> tuple[str, str]:
    """The cause and the operator's message for a certificate the gateway refused, with what the
    certificate holds (its names, its validity, its issuer) when it can be read."""
    code = exc.verify_code
    detail = (exc.verify_message or exc.reason or str(exc)).rstrip(".")
    seen = await _presented_certificate(origin, limit_s)
    if code in _UNKNOWN_CA:
        issuer = f"; issued by {seen.issuer}" if seen is not None else ""
        return "tls_unknown_ca", (
            f"the TLS certificate of {origin.name} is not signed by a CA the gateway trusts "
            f"({detail}{issuer}); if the upstream uses a private CA, put that CA in a PEM file and name it "
            "in tls.ca_bundle"
        )
    if code in _NAME_MISMATCH:
        holds = f"; it holds {seen.names}" if seen is not None else ""
        return "tls_name_mismatch", (
            f"the TLS certificate of {origin.name} is not valid for the name {origin.host} "
            f"({detail}{holds}); use the host name the certificate was issued for in the upstream URL"
        )
    if code == _EXPIRED:
        when = f" on {seen.not_after}" if seen is not None else ""
        return "tls_expired", (
            f"the TLS certificate of {origin.name} expired{when} ({detail}); the upstream must renew it"
        )
    if code == _NOT_YET_VALID:
        when = f" before {seen.not_before}" if seen is not None else ""
        return "tls_not_yet_valid", (
            f"the TLS certificate of {origin.name} is not valid{when} ({detail}); check the clocks of the "
            "gateway and the upstream"
        )
    return "tls_rejected", f"the TLS certificate of {origin.name} was rejected: {detail}"


class _Presented:
    """What a certificate says about itself, for a log line."""

    def __init__(self, names: str, issuer: str, not_before: str, not_after: str) -> None:
        self.names = names
        self.issuer = issuer
        self.not_before = not_before
        self.not_after = not_after


_PRESENTED_TTL_S = 60.0


async def _presented_certificate(origin: Origin, limit_s: float) -> _Presented | None:
    """The certificate `origin` presents, read on a second connection (through the same egress) that
    verifies nothing and sends nothing: a refused handshake leaves the certificate out of reach.
    Remembered per origin for a minute, so an outage does not double every failed connection."""
    now = time.monotonic()
    known = origin.presented
    if known is not None and known[0] > now:
        return known[1]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    found: _Presented | None = None
    try:
        transport, _ = await egress.open_connection(
            asyncio.get_running_loop(), asyncio.Protocol, origin, context, limit_s
        )
    except (OSError, ssl.SSLError, TimeoutError, TransportError):
        transport = None
    if transport is not None:
        try:
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            found = _describe(der) if der else None
        finally:
            transport.abort()
    origin.presented = (now + _PRESENTED_TTL_S, found)
    return found


def _describe(der: bytes) -> _Presented | None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_der_x509_certificate(der)
        try:
            alternative = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [f"DNS:{n}" for n in alternative.get_values_for_type(x509.DNSName)]
            names += [f"IP:{a}" for a in alternative.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            names = [f"CN={a.value!s}" for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    except ValueError:
        return None
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return _Presented(
        names=shown or "no names",
        issuer=cert.issuer.rfc4514_string()[:200],
        not_before=cert.not_valid_before_utc.strftime("%Y-%m-%d %H:%M:%S UTC"),
        not_after=cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC"),
    )


def build_head(method: bytes, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def encode_chunked(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async def chunks() -> AsyncIterator[bytes]:
        async for chunk in stream:
            if chunk:
                yield b"%x\r\n%b\r\n" % (len(chunk), chunk)
        yield b"0\r\n\r\n"

    return chunks()
