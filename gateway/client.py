"""The upstream HTTP/1.1 client: pooled keep-alive connections on asyncio protocols, parsed by httptools.

Why not aiohttp or httpx: on this hot path a general-purpose client's per-request machinery (request
objects, URL parsing, cookie jars, tracing hooks, timeout contexts) cost more than the proxying itself;
bench/ measures the difference. This client does only what a reverse proxy needs: send a request
head and body already in wire form, hand back status, raw headers and a flow-controlled body stream,
and keep connections alive. Everything per origin (Host header, TLS settings) is prepared once.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

from gateway import egress
from gateway.errors import ConnectError, ConnectionLost, ProtocolError, TransportTimeout

_HIGH_WATER = 256 * 1024  # pause reading from the upstream while this much body waits for the client
_LOW_WATER = 64 * 1024


class Origin:
    """One scheme://host:port with its connection pool."""

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

    def __repr__(self) -> str:
        return f"Origin({self.scheme}://{self.host}:{self.port})"


class UpstreamResponse:
    """Status and raw headers at once; the body as a stream that must be consumed or closed."""

    __slots__ = ("_chunks", "_conn", "_eof", "_error", "_size", "_waiter", "headers", "keep_alive", "status")

    def __init__(
        self, conn: _Connection, status: int, headers: list[tuple[bytes, bytes]], keep_alive: bool
    ) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers
        self.keep_alive = keep_alive
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # fed by the connection
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER and self._conn is not None:
            self._conn.pause_reading()
        self._wake()

    def _feed_eof(self) -> None:
        self._eof = True
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
        if self._eof and not self._chunks and self.keep_alive and self._error is None:
            conn.finish()
        else:
            conn.abort()


class _Connection(asyncio.Protocol):
    def __init__(self, origin: Origin, client: UpstreamClient) -> None:
        self.origin = origin
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reused = False
        self.idle_since = 0.0
        self.closed = False
        self.response: UpstreamResponse | None = None
        self.head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self.received_any = False
        self.head_request = False
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out: str | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._reading_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"invalid HTTP response from the upstream: {exc}"))
            self.abort()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self.timed_out is not None:
            error: BaseException = TransportTimeout(self.timed_out)
        else:
            error = ConnectionLost(
                "the upstream closed the connection"
                + (f" ({type(exc).__name__})" if exc is not None else ""),
                reused=self.reused,
                received_any=self.received_any,
            )
        self._fail(error)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(error)
        self.client._forget(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        self._cancel_timer()  # the first-byte deadline is met; `request()` arms the total one
        keep_alive = self.parser.should_keep_alive() and not self.head_request
        response = UpstreamResponse(self, status, self._headers, keep_alive)
        self.response = response
        waiter = self.head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        if self.head_request or status in (204, 304):
            # httptools cannot be told a response to HEAD has no body; end it here and never reuse.
            response._feed_eof()

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.response is not None and self.parser.get_status_code() >= 200:
            self.response._feed_eof()
            self._cancel_timer()

    # helpers
    def _fail(self, error: BaseException) -> None:
        waiter = self.head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self.response is not None:
            self.response._fail(error)

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def start_timer(self, delay: float, reason: str, limit: float) -> None:
        self._cancel_timer()
        self.timer = self.loop.call_later(delay, self._on_timeout, reason, limit)

    def _on_timeout(self, reason: str, limit: float) -> None:
        self.timer = None
        self.timed_out = reason % limit
        self.abort()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    async def drain(self) -> None:
        if self._writing_paused and not self.closed:
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def usable(self, now: float) -> bool:
        return (
            not self.closed
            and self.transport is not None
            and not self.transport.is_closing()
            and (now - self.idle_since < self.origin.keepalive_s)
        )

    def finish(self) -> None:
        """The exchange ended cleanly: back to the pool."""
        self._cancel_timer()
        self.response = None
        self.head_waiter = None
        self.head_request = False
        self.received_any = False
        self.resume_reading()
        self.client._release(self)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True


class UpstreamClient:
    """One per process. Origins are created at start-up (`origin()`) and reused for every request."""

    def __init__(
        self, ssl_context: ssl.SSLContext | None, egress_policy: egress.Egress | None = None
    ) -> None:
        self.ssl_context = ssl_context
        self.egress = egress_policy or egress.Egress.direct()
        self._origins: dict[str, Origin] = {}
        self._closed = False

    def origin(self, url: str, *, max_connections: int = 256) -> Origin:
        parts = urlsplit(url)
        key = f"{parts.scheme}://{parts.netloc}"
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = Origin(
                url,
                self.ssl_context,
                max_connections=max_connections,
                proxy=self.egress.proxy_for(parts.scheme, parts.hostname or ""),
            )
        else:
            origin.max_connections = max(origin.max_connections, max_connections)
        return origin

    async def _connect(self, origin: Origin, limit_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await egress.open_connection(
                loop, lambda: _Connection(origin, self), origin, origin.ssl, limit_s
            )
        except TimeoutError:
            raise ConnectError(f"no connection to {origin.host}:{origin.port} within {limit_s:g} s") from None
        except ssl.SSLError as exc:
            raise ConnectError(
                f"TLS handshake with {origin.host}:{origin.port} failed: {exc.reason}"
            ) from None
        except OSError as exc:
            raise ConnectError(
                f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}"
            ) from None
        return conn

    async def _acquire(self, origin: Origin, connect_timeout: float) -> _Connection:
        now = time.monotonic()
        idle = origin.idle
        while idle:
            conn = idle.pop()
            if conn.usable(now):
                conn.reused = True
                return conn
            conn.abort()
        if origin.open >= origin.max_connections:
            waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            origin.waiters.append(waiter)
            try:
                async with asyncio.timeout(connect_timeout):
                    handed = await waiter
            except TimeoutError:
                if not waiter.done() or waiter.cancelled():
                    waiter.cancel()
                    raise ConnectError(
                        f"all {origin.max_connections} connections to {origin.host}:{origin.port} stayed "
                        f"busy for {connect_timeout:g} s"
                    ) from None
                # Handed a connection (or a free slot) just as the wait ran out: take it, never leak it.
                handed = waiter.result()
            if handed is not None:
                handed.reused = True
                return handed
        origin.open += 1
        try:
            return await self._connect(origin, connect_timeout)
        except BaseException:
            origin.open -= 1
            self._wake_waiter(origin)
            raise

    def _release(self, conn: _Connection) -> None:
        origin = conn.origin
        if conn.closed:
            return
        while origin.waiters:
            waiter = origin.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = time.monotonic()
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
        *,
        head_request: bool = False,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        total_timeout: float = 60.0,
    ) -> UpstreamResponse:
        """Send `head` (request line and headers, ending in a blank line) and `body`; return the response
        once its headers arrived. A bytes body is retried once on a fresh connection when a pooled one
        turns out to be closed by the upstream before it answered."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        if origin.forward_prefix is not None:
            assert origin.proxy is not None
            head = egress.absolute_form(head, origin.forward_prefix, origin.proxy)
        first_byte = min(read_timeout, total_timeout)
        for attempt in (1, 2):
            conn = await self._acquire(origin, connect_timeout)
            conn.head_request = head_request
            conn.head_waiter = loop.create_future()
            conn.start_timer(first_byte - (loop.time() - started), "no answer within %g s", first_byte)
            try:
                transport = conn.transport
                assert transport is not None
                if body is None or isinstance(body, bytes):
                    transport.write(head + body if body else head)
                else:
                    transport.write(head)
                    async for chunk in body:
                        if conn.closed:
                            break
                        transport.write(chunk)
                        await conn.drain()
                response = await conn.head_waiter
            except ConnectionLost as exc:
                conn.abort()
                if (
                    attempt == 1
                    and exc.reused
                    and not exc.received_any
                    and not (body is not None and not isinstance(body, bytes))
                ):
                    continue
                raise
            except BaseException:
                conn.abort()
                raise
            if not response.at_eof:
                # From here the total timeout covers the rest of the body.
                remaining = total_timeout - (loop.time() - started)
                conn.start_timer(remaining, "the answer took longer than %g s", total_timeout)
            return response
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closed = True
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.pop().abort()


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
