"""One proxied request on one client connection, as the proxy sees it: what the server protocol parsed,
the body as it arrives, the answer written straight to the connection, and what the request in progress
is told when its client is gone.

No ASGI here: the server protocol (`gateway.server_protocol`) builds an `Exchange` when a request head is
complete and starts `Proxy.serve` on it; the proxy writes the answer's head and a body that is already
complete in one `transport.write`, and streams the rest under the connection's flow control.

The client-gone contract lives here, in one place. The protocol calls `client_gone(reason)` when the
connection is lost before the answer is complete, or when the client read none of the answer for
`server.send_timeout_s` (the protocol's send timer aborts the connection). `client_gone` records the
reason and cancels the task serving the exchange; the cancellation runs the proxy's `finally` blocks on the
way out (the upstream attempt is aborted, never pooled; the admission slot is released), and `Proxy.serve`
records the request as 499 with `gone` as its error code. (The task is the connection's, which serves its
requests in turn: a client gone ends the connection too, so no later request of it runs in that task.)
"""

from __future__ import annotations

import asyncio
import http
from typing import TYPE_CHECKING, Any, Final

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

if TYPE_CHECKING:
    from uvicorn.protocols.http.flow_control import FlowControl

    from gateway.callers import Caller

# Why a client is gone (the error code of its access line).
DISCONNECTED: Final = "client_disconnected"
SEND_TIMED_OUT: Final = "client_send_timeout"

STATUS_LINES = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, _phrase.encode())
    for code in range(100, 600)
    for _phrase in [http.HTTPStatus(code).phrase if code in http.HTTPStatus._value2member_map_ else ""]
}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CONNECTION_CLOSE = b"connection: close\r\n"


class ClientGone(Exception):
    """The client went away (or stopped reading) while the proxy waited for its body or wrote to it."""


class ConnectionMemo:
    """What a client connection's requests share: the caller token its last request proved and what it
    proved (`gateway.inbound`). A keep-alive client sends the same token with request after request for
    as long as it lasts (an hour from Entra ID); its next request on this connection is recognised by
    comparing the bytes, without hashing the token for the validator's cache. Lives and dies with the
    connection, as the request's own headers do."""

    __slots__ = ("caller", "token", "valid_until", "validator")

    def __init__(self) -> None:
        self.token: bytes | None = None
        self.caller: Caller | None = None
        self.valid_until = 0.0  # the validator's clock
        self.validator: object = None  # the one that proved it: a reload that replaces it forgets the token


class Exchange:
    """A parsed request and its answer on the connection. The protocol feeds the body (`feed_body`,
    `feed_end`) and reports the client gone (`client_gone`); the proxy reads the body (`body_waiting`,
    `take_body`, `wait_body`) and answers (`answer`, or `start` then `send` and `end`)."""

    __slots__ = (
        "_body",
        "_body_size",
        "_expect_continue",
        "_flow",
        "_on_complete",
        "_waiter",
        "absolute_form",
        "client",
        "gone",
        "gone_status",
        "headers",
        "http_version",
        "keep_alive",
        "memo",
        "method",
        "more_body",
        "path",
        "query",
        "raw_path",
        "request_id",
        "response_complete",
        "response_started",
        "scheme",
        "task",
        "transport",
    )

    # Positional (the protocol's one call): keyword arguments would cost a dict per request.
    def __init__(
        self,
        method: str,
        path: str,
        raw_path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        http_version: str,
        keep_alive: bool,
        expect_continue: bool,
        absolute_form: bool,
        client: tuple[str, int] | None,
        scheme: str,
        transport: asyncio.Transport,
        flow: FlowControl,
        on_complete: Any,
        memo: ConnectionMemo,
    ) -> None:
        self.method = method
        self.path = path
        self.raw_path = raw_path
        self.query = query
        self.headers = headers  # names lowered, values as received
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.absolute_form = absolute_form  # the target was `http://host/path`, not a path
        self.client = client
        self.scheme = scheme
        self.transport = transport
        self._flow = flow
        self._on_complete = on_complete  # the protocol's: start the next pipelined request, re-arm timers
        self.memo = memo
        self._expect_continue = expect_continue
        self._body: list[bytes] = []
        self._body_size = 0
        self.more_body = True
        self._waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.request_id: str | None = None  # the proxy's, once it has one: the id of every answer to it
        # Why serving it stopped early (the error code of its access line), and the status recorded with it
        # (None: the status of the answer that had started).
        self.gone: str | None = None
        self.gone_status: int | None = 499  # client closed request (nginx's): the client went away
        self.response_started = False
        self.response_complete = False

    # Fed by the server protocol

    def feed_body(self, data: bytes) -> None:
        self._body.append(data)
        self._body_size += len(data)
        if self._body_size > HIGH_WATER_LIMIT:
            self._flow.pause_reading()  # resumed when the proxy takes it
        if self._waiter is not None:  # hot path: no call when nobody waits (the body came with the head)
            self._wake()

    def feed_end(self) -> None:
        self.more_body = False
        if self._waiter is not None:
            self._wake()

    def client_gone(self, reason: str) -> None:
        """The client is gone (`reason`): the task serving this exchange is cancelled, and so is every
        wait on the upstream it is in."""
        self._stop(reason, 499)

    def refused(self, code: str, status: int | None) -> None:
        """The server protocol refused this request while it was served (its body broke the framing or a
        limit): it answers `status` with `code` itself, or, with the answer already started (`status`
        None), cuts it off. Serving it stops as for a gone client; it is recorded with that code."""
        self._stop(code, status)

    def _stop(self, reason: str, status: int | None) -> None:
        if self.response_complete or self.gone is not None:
            return
        self.gone = reason
        self.gone_status = status
        self._wake()
        task = self.task
        if task is not None and not task.done():
            task.cancel()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # The body, read by the proxy

    def body_waiting(self) -> bool:
        """True when `take_body` has something to say at once: body bytes, the body's end or a gone client."""
        return bool(self._body) or not self.more_body or self.gone is not None

    def take_body(self) -> tuple[bytes, bool]:
        """The body bytes that arrived so far and whether more follow; raises ClientGone."""
        if self.gone is not None:
            raise ClientGone(self.gone)
        body = self._body
        if len(body) == 1:
            data = body[0]
        else:
            data = b"".join(body)
        self._body = []
        self._body_size = 0
        self._flow.resume_reading()
        return data, self.more_body

    def take_complete_body(self) -> bytes | None:
        """The whole body when all of it has arrived (and the client is still there), else None (and
        nothing is taken): the usual small request is read in one call."""
        if self.more_body or self.gone is not None:
            return None
        body = self._body
        if len(body) == 1:
            data = body[0]
            self._body = []
            self._body_size = 0
        elif body:
            data = b"".join(body)
            self._body = []
            self._body_size = 0
        else:
            data = b""
        if self._flow.read_paused:  # hot path: the call only when reading was paused
            self._flow.resume_reading()
        return data

    async def wait_body(self) -> None:
        """Until `body_waiting()`. The first wait answers `Expect: 100-continue`."""
        if self._expect_continue:
            self._expect_continue = False
            if not self.transport.is_closing():
                self.transport.write(CONTINUE)
        self._flow.resume_reading()
        while not self.body_waiting():
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    # The answer, written by the proxy

    def answer(self, head: bytes, body: bytes) -> None:
        """A complete answer of the gateway's own: `head` is the status line and headers without the
        blank line; written with `body` in one write (without it to HEAD, RFC 9110 9.3.2: the head says
        what a GET would get, and a keep-alive client reads its next answer right after it)."""
        self.start([head], b"" if self.method == "HEAD" else body)
        self.end()

    def start(self, head: list[bytes], body: bytes = b"") -> None:
        """The head of the upstream's answer (the pieces of its status line and headers, without the
        blank line) and the first body bytes, already framed: joined once and written at once."""
        self.response_started = True
        self._expect_continue = False  # answered before the body was asked for: no 100 Continue
        if not self.keep_alive:
            head.append(CONNECTION_CLOSE)
        head.append(b"\r\n")
        if body:
            head.append(body)
        self.transport.write(b"".join(head))

    async def send(self, data: bytes) -> None:
        """More of the answer's body (framed by the caller), after waiting while the client reads slowly."""
        if self._flow.write_paused:
            await self._flow.drain()
        if self.gone is not None:
            raise ClientGone(self.gone)
        self.transport.write(data)

    def end(self, data: bytes = b"") -> None:
        """The answer is complete (`data`: its last bytes, e.g. the last chunk). The protocol goes on with
        the connection: the next request, or, when this answer was its last (`keep_alive` false), the
        close."""
        if data:
            self.transport.write(data)
        self.response_complete = True
        self._on_complete()

    def cut_off(self) -> None:
        """The answer cannot be completed (the upstream broke off): close the connection, so the client
        sees it cut short rather than waiting for the rest."""
        self.response_complete = True
        self.transport.close()
