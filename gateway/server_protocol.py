"""The inbound HTTP/1.1 connection: uvicorn's httptools protocol with limits enforced while bytes arrive.

uvicorn parses with httptools (llhttp), which buffers an unfinished header name or value without limit
and knows no limit on the request target, the header count or the trailers. This subclass counts as the
parser reports and, for what the parser buffers silently, counts the raw bytes fed to it; the moment a
limit is crossed the client gets the gateway's JSON error with `Connection: close` and the connection is
closed. Whatever a client streams, a connection holds at most a limit plus one socket read.

It also times the request head (`server.header_timeout_s`, from the connection's opening or the end of
the previous answer), refuses what would desynchronise the parser from the client (any `Upgrade`, WebSocket
handshakes included, and `CONNECT`), never lets chunked trailers into the request headers, closes a
connection whose answer went out before its request body was read, and answers a bad request pipelined
behind good ones only after their answers.

A proxied request does not go through ASGI: once its head is complete it becomes an `Exchange`
(`gateway.exchange`) and the gateway app's `serve_exchange` runs on it in the connection's task (one per
connection, serving its proxied requests in turn), writing the answer straight to this connection. The
admin endpoints (and every request of an app that is not the gateway) keep uvicorn's ASGI request cycle;
both kinds share one pipeline, in order. A client that does not read its answers gets no further request
taken while the connection's write buffer is over its high-water mark. When the client goes away, or
reads none of the answer for `server.send_timeout_s`, the request in progress is told through its exchange
(`Exchange.client_gone`).
One timer per connection covers the wait for a request head and the keep-alive; a send timer exists only
while the client is not reading.

Pass `http_protocol(InboundLimits.from_config(server))` to uvicorn as `http=`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway import metrics
from gateway.errors import (
    ChunkExtensionTooLong,
    ClientFacingError,
    ClientTimeout,
    HeadersTooLarge,
    MalformedRequest,
    Overloaded,
    TrailersTooLarge,
    UpgradeNotSupported,
    UrlTooLong,
)
from gateway.exchange import CONNECTION_CLOSE, DISCONNECTED, SEND_TIMED_OUT, ConnectionMemo, Exchange
from gateway.headers import new_request_id
from gateway.responses import error_body, error_head

if TYPE_CHECKING:
    from asyncio import TimerHandle

    from gateway.config import ServerConfig

logger = logging.getLogger("gateway.server")

# After an error answer the gateway stops sending (FIN) but reads and discards what the client still
# sends for this long: closing with unread bytes would reset the connection and could destroy the answer
# before the client read it.
LINGER_S = 2.0

# Requests a connection may have waiting behind the one in progress. Everything parsed from one socket
# read is queued at once: without a bound, one read of tiny pipelined requests behind a slow one costs
# tens of MiB. More are answered 503 (after the queued ones) and the connection closed.
MAX_PIPELINED = 16

# Key of the server state (the lifespan scope's "state") holding server.send_timeout_s; the app sets it.
SEND_TIMEOUT_STATE = "gateway.send_timeout_s"
DEFAULT_SEND_TIMEOUT_S = 30.0

# Request headers `on_header` looks at more closely (lowered names).
_CHECKED_REQUEST_HEADERS = frozenset({b"connection", b"expect", b"host", b"transfer-encoding"})

# The name of every task serving a proxied request.
_EXCHANGE_TASK = "gateway-request"

# RFC 9112 3.2 / RFC 3986 3.2.2: uri-host [":" port]: an IP literal (IPv6, with a zone id or IPvFuture),
# or a reg-name / IPv4 address (empty too: a target URI without an authority), then the port's digits.
_HOST_FORM = re.compile(rb"(?:\[[A-Za-z0-9\-._~%!$&'()*+,;=:]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")

# Where the parser is in the current request.
_IDLE = 0  # between requests: nothing of the next one has arrived
_HEAD = 1  # request line and headers
_BODY = 2  # body, chunk framing and trailers


@dataclass(frozen=True)
class InboundLimits:
    max_url_bytes: int = 8 * 1024
    max_header_bytes: int = 32 * 1024
    max_header_count: int = 100
    max_trailer_bytes: int = 8 * 1024
    max_chunk_extension_bytes: int = 4 * 1024
    header_timeout_s: float = 10.0

    @classmethod
    def from_config(cls, server: ServerConfig) -> InboundLimits:
        return cls(
            max_url_bytes=server.max_url_bytes,
            max_header_bytes=server.max_header_bytes,
            max_header_count=server.max_header_count,
            max_trailer_bytes=server.max_trailer_bytes,
            max_chunk_extension_bytes=server.max_chunk_extension_bytes,
            header_timeout_s=server.header_timeout_s,
        )

    @property
    def max_head_bytes(self) -> int:
        """Raw bytes a request head may take: target, headers, and room for the method, the version and
        optional whitespace around header values (which the parser strips before the header counts)."""
        return self.max_url_bytes + self.max_header_bytes + 2 * self.max_header_count + 256


DEFAULT_LIMITS = InboundLimits()


def http_protocol(limits: InboundLimits) -> Callable[..., GatewayHttpToolsProtocol]:
    """What to pass to uvicorn as `http=`: builds the protocol of each connection with `limits`.
    A partial, not a subclass made on the fly, so that uvicorn can pickle it for worker processes."""
    return functools.partial(GatewayHttpToolsProtocol, limits=limits)


class _Refused(Exception):
    """Raised inside a parser callback: stops the parser, and the client gets `error`."""

    def __init__(self, error: ClientFacingError) -> None:
        super().__init__(error.code)
        self.error = error


def _answer(error: ClientFacingError, request_id: str) -> bytes:
    body = error_body(error.code, error.message, request_id)
    return error_head(error, request_id, body) + CONNECTION_CLOSE + b"\r\n" + body


class ExchangeServer(Protocol):
    """What the protocol needs of the gateway app to hand it requests directly (`gateway.app.GatewayApp`)."""

    asgi_paths: frozenset[str]  # paths that still go through ASGI (the admin endpoints)

    def serve_exchange(self, exchange: Exchange) -> Coroutine[Any, Any, None]: ...


def _exchange_server(app: Any) -> ExchangeServer | None:
    """The gateway app behind uvicorn's wrappers (its message logger at trace level), or None for any
    other ASGI app (the tests' upstreams), whose requests all go through ASGI."""
    for _ in range(4):
        if hasattr(app, "serve_exchange") and hasattr(app, "asgi_paths"):
            return app  # type: ignore[no-any-return]
        app = getattr(app, "app", None)
        if app is None:
            break
    return None


class GatewayHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, hardened (see the module docstring). A proxied request is handed to
    the gateway as an `Exchange` (no ASGI scope, no message dicts); the admin paths the app names, and
    every request of an app that is not the gateway, go through uvicorn's ASGI request cycle."""

    # The last request parsed: an exchange, or uvicorn's cycle of an ASGI request.
    cycle: Exchange | RequestResponseCycle  # type: ignore[assignment]

    def __init__(self, *args: Any, limits: InboundLimits = DEFAULT_LIMITS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._max_header_bytes = limits.max_header_bytes
        self._max_header_count = limits.max_header_count
        # server.max_connections is enforced here, when a connection opens; uvicorn's own check (at the
        # end of a request head) would keep every connection over it open and answer text/plain.
        self.max_connections = self.limit_concurrency
        self.limit_concurrency = None
        self._gateway = _exchange_server(self.app)
        self._asgi_paths: frozenset[str] = (
            self._gateway.asgi_paths if self._gateway is not None else frozenset()
        )
        self._phase = _IDLE
        self._url_bytes = 0
        self._header_bytes = 0
        self._host_count = 0
        self._valid_host: bytes | None = None  # the last Host value found valid on this connection
        self._connection_header = False  # the request being parsed has a Connection header
        self._trailer_bytes = 0
        self._head_raw = 0  # bytes fed while the head was incomplete (what the parser may buffer)
        self._framing_raw = 0  # bytes fed in the body phase that brought no body event
        self._begun_in_feed = 0
        self._body_event = False
        self._chunk_open = False  # a chunk header was parsed and neither data nor its end followed yet
        self._keep_alive_after_body = True
        # The request whose answer is being produced: not `self.cycle` (the last request parsed) when the
        # client pipelined another behind it.
        self._running: Exchange | RequestResponseCycle | None = None
        self._header_timer: TimerHandle | None = None
        self._head_wait_since: float | None = None  # loop time the wait for a request head began
        self._idle_limit_s = limits.header_timeout_s  # how long that wait may stay empty of bytes
        self._linger_timer: TimerHandle | None = None
        self._send_timer: TimerHandle | None = None
        self._gone_reason: str = DISCONNECTED
        self._refused = False  # an error was (or will be) answered: nothing more is parsed
        self._deferred: ClientFacingError | None = None  # answered once earlier answers are out
        # An answer ended with the write buffer over its high-water mark: the next request waits for the
        # client to read (`resume_writing`). A client that reads nothing holds what its socket buffers take
        # and one answer more, not every answer to everything it sends.
        self._next_waits_for_drain = False
        self._memo = ConnectionMemo()
        # The connection's task serving its proxied requests (`_serve_exchanges`), the future it waits on
        # between requests, and a request handed over while it still finishes the one before.
        self._worker: asyncio.Task[None] | None = None
        self._worker_waiting: asyncio.Future[Exchange | None] | None = None
        self._worker_next: Exchange | None = None
        self._closed = False

    # Connection life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            # Answered and closed at once (after LINGER_S at most), not counted as served: the
            # gateway's descriptors stay bounded whatever number of sockets a client opens.
            self.connections.discard(self)
            self._refuse(
                Overloaded(
                    f"the gateway is serving its limit of {self.max_connections} client connections "
                    "(server.max_connections); retry shortly",
                    retry_after=1,
                )
            )
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """The client is gone: the request in progress is told (see `gateway.exchange`); one queued behind
        it never starts."""
        self._stop_header_timer()
        for timer in (self._linger_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._linger_timer = self._send_timer = None
        self.connections.discard(self)
        self._closed = True
        waiting = self._worker_waiting
        if waiting is not None:  # the connection's task waits for a request that will not come
            self._worker_waiting = None
            waiting.set_result(None)
        self._worker_next = None  # a request queued behind the one in progress never starts
        running = self._running
        if running is not None and not running.response_complete:
            if isinstance(running, Exchange):
                running.client_gone(self._gone_reason)
            else:
                running.disconnected = True
                running.message_event.set()
        last = self.cycle
        if isinstance(last, RequestResponseCycle) and last is not running:
            last.disconnected = True
            last.message_event.set()
        if self.flow is not None:
            self.flow.resume_writing()
        if exc is None:
            self.transport.close()
        self.parser = None  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after an error answer, or waiting to give it: the rest is discarded
        phase_before = self._phase
        self._begun_in_feed = 0
        self._body_event = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(UpgradeNotSupported(_UPGRADE_MESSAGE))  # on_headers_complete refused it first
            return
        except httptools.HttpParserError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refused):
                self._refuse(refused.error)
            else:
                self._refuse(MalformedRequest(f"the request is not valid HTTP/1.1 ({exc}); fix the client"))
            return
        phase = self._phase
        if phase == _HEAD:
            # Count only bytes known to belong to this head: all of them if it began before this read
            # or began it; none if an earlier request ended in this read (undercounts by one read).
            if (phase_before == _HEAD and self._begun_in_feed == 0) or (
                phase_before == _IDLE and self._begun_in_feed == 1
            ):
                self._head_raw += len(data)
                if self._head_raw > self.limits.max_head_bytes:
                    self._refuse(self._headers_too_large())
        elif phase == _BODY:
            if phase_before != _BODY or self._body_event:
                self._framing_raw = 0
            else:
                # No body byte, chunk start or chunk end in this whole read: chunk extension or trailers.
                self._framing_raw += len(data)
                limits = self.limits
                if self._chunk_open:  # after the last chunk's header: trailers
                    if self._framing_raw > limits.max_trailer_bytes:
                        self._refuse(self._trailers_too_large())
                elif self._framing_raw > limits.max_chunk_extension_bytes:
                    self._refuse(
                        ChunkExtensionTooLong(
                            "a chunk extension is over the limit of "
                            f"{limits.max_chunk_extension_bytes} bytes (server.max_chunk_extension_bytes); "
                            "send chunks without extensions"
                        )
                    )

    def _should_upgrade(self) -> bool:
        """Never: a WebSocket handshake is refused like every other upgrade. Handed to the WebSocket
        library, a broken one got that library's text/plain 400, and a POST one no answer at all."""
        return False

    def shutdown(self) -> None:
        self._keep_alive_after_body = False
        super().shutdown()

    # Parser callbacks

    def on_message_begin(self) -> None:
        # Not uvicorn's: its ASGI scope is built only for a request that goes to ASGI.
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._phase = _HEAD
        self._begun_in_feed += 1
        self._url_bytes = self._header_bytes = self._trailer_bytes = 0
        self._host_count = 0
        self._connection_header = False
        self._head_raw = self._framing_raw = 0
        self._chunk_open = False

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > self.limits.max_url_bytes:
            raise _Refused(
                UrlTooLong(
                    f"the request target is over the limit of {self.limits.max_url_bytes} bytes "
                    "(server.max_url_bytes); send large data in the body"
                )
            )
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # Hot path (every header of every request): one sum for the byte count, one set look-up before
        # the three names that need a closer look, the limits read from the protocol itself.
        if self._phase == _BODY:
            # A trailer (httptools reports them like headers): counted, never added to the request.
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_bytes > self.limits.max_trailer_bytes:
                raise _Refused(self._trailers_too_large())
            return
        headers = self.headers  # the count: the headers taken so far (trailers are never added)
        header_bytes = self._header_bytes = self._header_bytes + len(name) + len(value) + 4  # ": ", CRLF
        if header_bytes > self._max_header_bytes or len(headers) >= self._max_header_count:
            raise _Refused(self._headers_too_large())
        name = name.lower()
        # As uvicorn's own `on_header` does: llhttp keeps trailing whitespace, which RFC 9110 5.5
        # excludes from the value (`x-gateway-key: KEY ` is the key KEY).
        value = value.rstrip(b" \t")
        if name in _CHECKED_REQUEST_HEADERS:
            if name == b"host":  # in every request: checked here, without a call
                self._host_count += 1
                if self._host_count > 1:  # RFC 9112 3.2: which host is meant is ambiguous
                    raise _Refused(MalformedRequest("the request has more than one Host header; send one"))
                if value != self._valid_host:  # a connection sends the same Host each time: checked once
                    if _HOST_FORM.fullmatch(value) is None:  # RFC 9112 3.2: invalid, 400
                        raise _Refused(
                            MalformedRequest(
                                "the Host header is not a host name or address with an optional port; "
                                "send the gateway's host[:port]"
                            )
                        )
                    self._valid_host = value
            else:
                self._check_header(name, value)
        headers.append((name, value))

    def _check_header(self, name: bytes, value: bytes) -> None:
        if name == b"connection":
            self._connection_header = True  # see on_headers_complete
        elif name == b"expect":
            if value.lower() == b"100-continue":
                self.expect_100_continue = True
        elif value.strip().lower() != b"chunked":  # transfer-encoding
            # The parser decodes the chunks and ignores any coding before them (`gzip, chunked`): the
            # upstream would get the body still coded, presented as plain.
            raise _Refused(
                MalformedRequest(
                    "the only transfer coding the gateway accepts is `Transfer-Encoding: chunked`; send "
                    "the body uncoded (or set Content-Encoding)"
                )
            )

    def on_headers_complete(self) -> None:
        self._head_wait_since = None  # the head arrived in time (`_end_head_wait`, inlined: hot path)
        parser = self.parser
        method = parser.get_method()
        if method == b"CONNECT" or parser.should_upgrade():
            # The parser would stop at the end of this head and take what follows (the body, or another
            # request) as a different protocol's bytes: never forward any of it.
            raise _Refused(UpgradeNotSupported(_UPGRADE_MESSAGE))
        if len(self.pipeline) >= MAX_PIPELINED:
            raise _Refused(
                Overloaded(
                    f"more than {MAX_PIPELINED} pipelined requests wait on this connection; wait for "
                    "answers before sending more requests",
                    retry_after=1,
                )
            )
        url = self.url
        parsed = httptools.parse_url(url)
        raw_path: bytes = parsed.path or b"/"  # none in `http://host:port`: its path is "/" (RFC 9112 3.2.2)
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        keep_alive = parser.should_keep_alive()
        if keep_alive and not self._connection_header:
            # llhttp keeps a request below HTTP/1.1 alive only when its Connection header says so: this
            # one is HTTP/1.1 or later. Hot path: get_http_version formats a string per request, and the
            # gateway only tells "1.0" from the rest.
            http_version = "1.1"
        else:
            http_version = parser.get_http_version()
            if http_version == "1.0":
                # RFC 9110 10.1.1: HTTP/1.0 knows no 1xx answer; its `Expect: 100-continue` is ignored.
                self.expect_100_continue = False
        if not self._host_count and http_version != "1.0":
            raise _Refused(
                MalformedRequest("an HTTP/1.1 request needs a Host header (RFC 9112 section 3.2); send one")
            )
        # Until the body has arrived, an answer closes the connection: its unread rest (or, after a
        # refused `Expect: 100-continue`, the client's next request) must not be parsed as a request.
        self._keep_alive_after_body = http_version != "1.0" and keep_alive
        # The head is taken: from here a refusal is this request's. Until here it is refused as a head
        # (`_refuse`: answered after the requests before it), never pinned on the request parsed before.
        self._phase = _BODY
        gateway = self._gateway
        if gateway is None or path in self._asgi_paths:
            self._start_asgi_cycle()
            return
        exchange = Exchange(
            method.decode("ascii"),
            path,
            raw_path,
            parsed.query or b"",
            self.headers,
            http_version,
            False,  # keep_alive: not before the body has arrived
            self.expect_100_continue,
            url[:1] != b"/" and url != b"*",  # absolute_form
            self.client,
            self.scheme or "http",
            self.transport,
            self.flow,
            self.on_response_complete,
            self._memo,
        )
        previous = self.cycle
        self.cycle = exchange
        if (previous is None or previous.response_complete) and not self._next_waits_for_drain:
            self._start(exchange, None)
        else:
            self.flow.pause_reading()
            self.pipeline.appendleft((exchange, None))  # type: ignore[arg-type]

    def _start_asgi_cycle(self) -> None:
        """uvicorn's request cycle (admin endpoints, and every request of an app that is not the gateway),
        with the scope uvicorn's `on_message_begin` would have built."""
        self.scope = {  # type: ignore[typeddict-item]
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }
        super().on_headers_complete()
        cycle = self.cycle
        if isinstance(cycle, RequestResponseCycle) and cycle.scope is self.scope:
            cycle.keep_alive = False  # until the body has arrived (see on_headers_complete)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if self._next_waits_for_drain:  # uvicorn starts it when the answer before is complete
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))
            return
        self._start(cycle, app)

    def _start(self, cycle: Exchange | RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        if isinstance(cycle, Exchange):
            # Handed to the connection's task: waiting for it, still finishing the request before (it
            # takes this one next), or none that can take it (the first request, or the task ended).
            worker = self._worker
            waiting = self._worker_waiting
            self._worker_waiting = None
            if waiting is not None and not waiting.done():
                waiting.set_result(cycle)
            elif waiting is None and worker is not None and not worker.done():
                self._worker_next = cycle
            else:
                worker = self._start_worker(cycle)
            cycle.task = worker
        else:
            super()._start_asgi_task(cycle, app)

    def _start_worker(self, exchange: Exchange) -> asyncio.Task[None]:
        # A Task made with a name of its own; the loop's create_task would have the Task format a
        # numbered name ("Task-123").
        worker = self._worker = asyncio.Task(
            self._serve_exchanges(exchange), loop=self.loop, name=_EXCHANGE_TASK
        )
        worker.add_done_callback(self._worker_done)
        self.tasks.add(worker)
        return worker

    async def _serve_exchanges(self, exchange: Exchange | None) -> None:
        """The connection's task: serves its proxied requests one after the other, as the protocol hands
        them over (`_start`), and ends with the connection. One task per connection, not per request: a
        Task costs an allocation, a registration in asyncio's set of all tasks and a done callback, and a
        keep-alive client sends request after request. A client gone cancels it (`Exchange.client_gone`)
        only while it serves that client's request, and the connection is closing then."""
        gateway = self._gateway
        assert gateway is not None
        while exchange is not None:
            await gateway.serve_exchange(exchange)
            exchange = self._worker_next
            if exchange is not None:
                self._worker_next = None
            elif self._closed:
                return
            else:
                waiting = self._worker_waiting = self.loop.create_future()
                exchange = await waiting

    def _worker_done(self, worker: asyncio.Task[None]) -> None:
        self.tasks.discard(worker)
        if not worker.cancelled() and worker.exception() is not None:
            # `Proxy.serve` answers every error of a request itself: this is a bug, not a request's failure.
            logger.error("the task serving a client connection failed", exc_info=worker.exception())
        if self._worker is not worker:
            return
        self._worker = None
        self._worker_waiting = None
        handed = self._worker_next
        if handed is not None and not self._closed:
            # It ended before taking the request handed to it (a cancellation that was not the client's,
            # or a failure `Proxy.serve` did not answer): a new task takes it, so it is not left unanswered.
            self._worker_next = None
            handed.task = self._start_worker(handed)

    def on_body(self, body: bytes) -> None:
        self._body_event = True
        self._chunk_open = False
        cycle = self.cycle
        if cycle.response_complete:
            return  # answered already (and the connection closes): the rest is not read
        if isinstance(cycle, Exchange):
            cycle.feed_body(body)
        else:
            cycle.body += body
            if len(cycle.body) > HIGH_WATER_LIMIT:
                self.flow.pause_reading()
            cycle.message_event.set()

    def on_chunk_header(self) -> None:
        self._body_event = True
        self._chunk_open = True

    def on_chunk_complete(self) -> None:
        self._body_event = True
        self._chunk_open = False

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        self._body_event = True
        cycle = self.cycle
        if not cycle.response_started:
            cycle.keep_alive = self._keep_alive_after_body
        if cycle.response_complete:
            return
        if isinstance(cycle, Exchange):
            cycle.feed_end()
        else:
            cycle.more_body = False
            cycle.message_event.set()

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return  # an ASGI cycle that was the connection's last closes it itself
        running = self._running
        if running is not None and not running.keep_alive:
            self._close_after_answer(running)
            return
        if self.flow.write_paused:
            # The client has not read what is written (it pipelines, or keeps sending on a keep-alive
            # connection, without reading): its next request waits until it does, so the answers it does
            # not read are not all forwarded and buffered. `server.send_timeout_s` ends the wait.
            self._next_waits_for_drain = True
            return
        self._next_request()

    def _next_request(self) -> None:
        """The answer before is out: resume reading, and start the next request (or arm the keep-alive)."""
        flow = self.flow
        if flow.read_paused:  # hot path: the call only when reading was paused
            flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start(cycle, app)
        elif self._deferred is not None:
            # Every answer before the refused request is out: now its error, then close.
            self._send_error_and_close(self._deferred)
        else:
            # The wait for the next request: timed by the one connection timer (keep-alive, then the
            # header timeout once its first bytes arrive), not by a timer per request.
            # (`_arm_header_timer`, inlined: hot path.)
            self._idle_limit_s = self.timeout_keep_alive
            self._head_wait_since = self.loop.time()
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(
                    min(self._idle_limit_s, self.limits.header_timeout_s), self._header_timeout
                )

    # The client stops reading: a timer only while the transport's write buffer is over its high-water
    # mark; a client that lets it stay there for server.send_timeout_s has its connection aborted.

    def pause_writing(self) -> None:
        self.flow.pause_writing()
        if self._send_timer is None:
            timeout = self.app_state.get(SEND_TIMEOUT_STATE, DEFAULT_SEND_TIMEOUT_S)
            self._send_timer = self.loop.call_later(timeout, self._send_timed_out, timeout)

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self._next_waits_for_drain:
            self._next_waits_for_drain = False
            if not self.transport.is_closing():
                self._next_request()

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

    # Refusals

    def _refuse(self, error: ClientFacingError) -> None:
        """Stop parsing; answer `error` once every earlier request on this connection has its answer."""
        if self._refused:
            return
        self._refused = True
        metrics.INBOUND_REFUSALS.labels(error.code).inc()
        self._end_head_wait()
        cycle = self.cycle
        # In the body phase `self.cycle` is the request being parsed.
        offending = cycle if self._phase == _BODY and cycle is not None else None
        if offending is not None:
            # The request whose body broke a limit: whoever serves it stops. Queued, it never starts.
            # Running, it gets the error now, or is cut off when its answer is out already; a proxied one
            # is recorded with the error's code (and status, under the request id of the answer).
            queued = [entry for entry in self.pipeline if entry[0] is offending]
            for entry in queued:
                self.pipeline.remove(entry)
            answer_now = not queued and not offending.response_started
            request_id = None
            if not isinstance(offending, Exchange):
                offending.disconnected = True
                offending.message_event.set()
            elif queued:
                offending.client_gone(DISCONNECTED)
            else:
                request_id = offending.request_id = offending.request_id or new_request_id()
                offending.refused(error.code, error.status if answer_now else None)
            if not queued:  # it is the one running: nothing before it waits for an answer
                if answer_now:
                    self._send_error_and_close(error, request_id)
                else:
                    self.transport.close()  # its answer is out (or half out): nothing more to say
                return
        elif not self.pipeline and (cycle is None or cycle.response_complete):
            self._send_error_and_close(error)
            return
        self._deferred = error
        self.flow.pause_reading()

    def _send_error_and_close(self, error: ClientFacingError, request_id: str | None = None) -> None:
        """Answer `error` (as request `request_id`, or a new id) and close the connection, lingering."""
        transport = self.transport
        if transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
        logger.info("connection from %s: answered %d %s and closed it", client, error.status, error.code)
        transport.write(_answer(error, request_id or new_request_id()))
        self._close_lingering()

    def _close_after_answer(self, exchange: Exchange | RequestResponseCycle) -> None:
        """The answer just written was the connection's last. Closed at once when the whole request had
        arrived; an answer given from the head while the body still arrives (404, 413, 429, 503 ...)
        lingers instead: closing with bytes unread makes the kernel reset the connection, and a client
        still uploading reads the reset, not the answer."""
        if not exchange.more_body:
            self.transport.close()
            return
        self._refused = True  # nothing more is parsed: the rest of the body, and whatever follows it
        self._close_lingering()

    def _close_lingering(self) -> None:
        """Half-close after what is written, then read and drop what the client still sends until it
        closes or LINGER_S passes."""
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
            self.flow.resume_reading()
            self._linger_timer = self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def _headers_too_large(self) -> HeadersTooLarge:
        limits = self.limits
        return HeadersTooLarge(
            f"the request head is over the limit of {limits.max_header_count} headers or "
            f"{limits.max_header_bytes} bytes of headers (server.max_header_count, server.max_header_bytes)"
        )

    def _trailers_too_large(self) -> TrailersTooLarge:
        return TrailersTooLarge(
            f"the request's trailers are over the limit of {self.limits.max_trailer_bytes} bytes "
            "(server.max_trailer_bytes); the gateway does not forward trailers, leave them out"
        )

    # Header timeout

    # One timer per connection, not one per request: arming only stamps the time the wait for a head
    # began, and the timer, when it fires, checks that stamp and re-arms itself for what is left.

    # While no byte of the next request has arrived the wait is limited by `_idle_limit_s` (the header
    # timeout on a new connection, the keep-alive timeout after an answer); once its first bytes arrive,
    # by the header timeout, counted from the same start.

    def _arm_header_timer(self) -> None:
        self._head_wait_since = self.loop.time()
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                min(self._idle_limit_s, self.limits.header_timeout_s), self._header_timeout
            )

    def _end_head_wait(self) -> None:
        self._head_wait_since = None

    def _stop_header_timer(self) -> None:
        self._head_wait_since = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        since = self._head_wait_since
        if since is None:
            return  # a head arrived in time; the next wait arms the timer again
        idle = self._phase == _IDLE
        left = since + (self._idle_limit_s if idle else self.limits.header_timeout_s) - self.loop.time()
        if left > 0:
            self._header_timer = self.loop.call_later(left, self._header_timeout)
            return
        if self._refused or self.transport.is_closing():
            return
        if idle:
            self.transport.close()  # nothing of a request arrived: nobody to answer
            return
        self._refuse(
            ClientTimeout(
                f"the request head did not arrive within {self.limits.header_timeout_s:g} s "
                "(server.header_timeout_s); send the request line and headers at once"
            )
        )


_UPGRADE_MESSAGE = (
    "protocol upgrades (Upgrade, h2c, CONNECT) are not supported: the gateway forwards plain HTTP/1.1 "
    "requests; send the request without `Connection: upgrade`"
)
