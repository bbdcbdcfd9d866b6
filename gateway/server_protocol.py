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

Pass `http_protocol(InboundLimits.from_config(server))` to uvicorn as `http=`.
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httptools

from gateway import metrics
from gateway.client_watch import WatchedHttpToolsProtocol
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
from gateway.headers import new_request_id
from gateway.proxy import ABSOLUTE_FORM
from gateway.responses import error_body

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


def _answer(error: ClientFacingError) -> bytes:
    request_id = new_request_id()
    body = error_body(error.code, error.message, request_id)
    status = error.status
    retry_after = (
        b"" if error.retry_after is None else b"retry-after: %d\r\n" % max(1, math.ceil(error.retry_after))
    )
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode()),
            b"content-type: application/json\r\n",
            retry_after,
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: " + request_id.encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        )
    )


class GatewayHttpToolsProtocol(WatchedHttpToolsProtocol):
    """uvicorn's httptools protocol, hardened (see the module docstring). A request target in absolute
    form (`GET http://host/path`), which uvicorn would reduce to its path, is marked in the scope so the
    proxy refuses it (400 bad_request_path)."""

    def __init__(self, *args: Any, limits: InboundLimits = DEFAULT_LIMITS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        # server.max_connections is enforced here, when a connection opens; uvicorn's own check (at the
        # end of a request head) would keep every connection over it open and answer text/plain.
        self.max_connections = self.limit_concurrency
        self.limit_concurrency = None
        self._phase = _IDLE
        self._url_bytes = 0
        self._header_bytes = 0
        self._header_count = 0
        self._host_count = 0
        self._trailer_bytes = 0
        self._head_raw = 0  # bytes fed while the head was incomplete (what the parser may buffer)
        self._framing_raw = 0  # bytes fed in the body phase that brought no body event
        self._begun_in_feed = 0
        self._body_event = False
        self._chunk_open = False  # a chunk header was parsed and neither data nor its end followed yet
        self._keep_alive_after_body = True
        self._header_timer: TimerHandle | None = None
        self._head_wait_since: float | None = None  # loop time the wait for a request head began
        self._linger_timer: TimerHandle | None = None
        self._refused = False  # an error was (or will be) answered: nothing more is parsed
        self._deferred: ClientFacingError | None = None  # answered once earlier answers are out

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
        self._stop_header_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after an error answer, or waiting to give it: the rest is discarded
        self._unset_keepalive_if_required()
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
        super().on_message_begin()
        self._phase = _HEAD
        self._begun_in_feed += 1
        self._url_bytes = self._header_bytes = self._header_count = self._trailer_bytes = 0
        self._host_count = 0
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
        size = len(name) + len(value) + 4  # ": " and CRLF, as gateway.headers counts
        if self._phase == _BODY:
            # A trailer (httptools reports them like headers): counted, never added to the request.
            self._trailer_bytes += size
            if self._trailer_bytes > self.limits.max_trailer_bytes:
                raise _Refused(self._trailers_too_large())
            return
        self._header_count += 1
        self._header_bytes += size
        if (
            self._header_count > self.limits.max_header_count
            or self._header_bytes > self.limits.max_header_bytes
        ):
            raise _Refused(self._headers_too_large())
        name = name.lower()
        # As uvicorn's own `on_header` does: llhttp keeps trailing whitespace, which RFC 9110 5.5
        # excludes from the value (`x-gateway-key: KEY ` is the key KEY).
        value = value.rstrip(b" \t")
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        elif name == b"host":
            self._host_count += 1
            if self._host_count > 1:  # RFC 9112 3.2: which host is meant is ambiguous
                raise _Refused(MalformedRequest("the request has more than one Host header; send one"))
        elif name == b"transfer-encoding" and value.strip().lower() != b"chunked":
            # The parser decodes the chunks and ignores any coding before them (`gzip, chunked`): the
            # upstream would get the body still coded, presented as plain.
            raise _Refused(
                MalformedRequest(
                    "the only transfer coding the gateway accepts is `Transfer-Encoding: chunked`; send "
                    "the body uncoded (or set Content-Encoding)"
                )
            )
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._end_head_wait()
        self._phase = _BODY
        parser = self.parser
        if parser.get_method() == b"CONNECT" or parser.should_upgrade():
            # The parser would stop at the end of this head and take what follows (the body, or another
            # request) as a different protocol's bytes: never forward any of it.
            raise _Refused(UpgradeNotSupported(_UPGRADE_MESSAGE))
        if self.url[:1] != b"/" and self.url != b"*":
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[ABSOLUTE_FORM] = {}
        if len(self.pipeline) >= MAX_PIPELINED:
            raise _Refused(
                Overloaded(
                    f"more than {MAX_PIPELINED} pipelined requests wait on this connection; wait for "
                    "answers before sending more requests",
                    retry_after=1,
                )
            )
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            # Until the body has arrived, an answer closes the connection: its unread rest (or, after a
            # refused `Expect: 100-continue`, the client's next request) must not be parsed as a request.
            self._keep_alive_after_body = cycle.keep_alive
            cycle.keep_alive = False

    def on_body(self, body: bytes) -> None:
        self._body_event = True
        self._chunk_open = False
        super().on_body(body)

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
        if cycle is not None and cycle.scope is self.scope and not cycle.response_started:
            cycle.keep_alive = self._keep_alive_after_body
        super().on_message_complete()

    def on_response_complete(self) -> None:
        started_next = bool(self.pipeline)
        super().on_response_complete()
        if self.transport.is_closing() or started_next:
            return
        if self._deferred is not None:
            # Every answer before the refused request is out: now its error, then close.
            self._unset_keepalive_if_required()
            self._send_error_and_close(self._deferred)
        else:
            self._arm_header_timer()

    # Refusals

    def _refuse(self, error: ClientFacingError) -> None:
        """Stop parsing; answer `error` once every earlier request on this connection has its answer."""
        if self._refused:
            return
        self._refused = True
        metrics.INBOUND_REFUSALS.labels(error.code).inc()
        self._end_head_wait()
        cycle = self.cycle
        offending = (
            cycle if self._phase == _BODY and cycle is not None and cycle.scope is self.scope else None
        )
        if offending is not None:
            # The request whose body broke a limit: its application call sees a disconnect.
            offending.disconnected = True
            offending.message_event.set()
            queued = [entry for entry in self.pipeline if entry[0] is offending]
            for entry in queued:
                self.pipeline.remove(entry)
            if not queued:  # it is the one running: nothing before it waits for an answer
                if offending.response_started:
                    self.transport.close()  # its answer is out (or half out): nothing more to say
                else:
                    self._send_error_and_close(error)
                return
        elif not self.pipeline and (cycle is None or cycle.response_complete):
            self._send_error_and_close(error)
            return
        self._deferred = error
        self.flow.pause_reading()

    def _send_error_and_close(self, error: ClientFacingError) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
        logger.info("connection from %s: answered %d %s and closed it", client, error.status, error.code)
        transport.write(_answer(error))
        if transport.can_write_eof():
            transport.write_eof()
            self.flow.resume_reading()  # read and discard until the client closes or LINGER_S passes
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

    def _arm_header_timer(self) -> None:
        self._head_wait_since = self.loop.time()
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

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
        left = since + self.limits.header_timeout_s - self.loop.time()
        if left > 0:
            self._header_timer = self.loop.call_later(left, self._header_timeout)
            return
        if self._refused or self.transport.is_closing():
            return
        if self._phase == _IDLE:
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
