"""Forwarding: one request in, one or more upstream attempts out, the answer streamed back untouched.

Raw ASGI on purpose: this is the hot path, and framework request/response objects cost more than
everything else the gateway does per request. Headers stay bytes from the client's socket to the
upstream's; the request head is assembled once per attempt and written with the body in one call
by `gateway.client` (see bench/ for why not aiohttp or httpx).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from gateway.client import UpstreamClient, UpstreamResponse, encode_chunked
from gateway.client_watch import CLIENT_GONE, CLIENT_TASK, DISCONNECTED
from gateway.credentials.base import Grant
from gateway.errors import (
    BadRequestPath,
    BodyTooLarge,
    ClientFacingError,
    ClientTimeout,
    CredentialUnavailable,
    InternalError,
    Overloaded,
    RouteNotFound,
    TransportError,
    TransportTimeout,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.failure_log import FailureLog
from gateway.headers import InboundHeaders, new_request_id, read_request_headers, response_headers
from gateway.paths import check_path
from gateway.responses import send_error
from gateway.routing import Route, Router
from gateway.telemetry import RequestRecord, Telemetry
from gateway.upstreams import Upstream

if TYPE_CHECKING:
    from gateway.tracing import Tracing

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

logger = logging.getLogger("gateway.proxy")

# Scope extension set by `gateway.server_protocol.GatewayHttpToolsProtocol` for a request whose target was in
# absolute form: uvicorn's httptools protocol otherwise keeps only the target's path.
ABSOLUTE_FORM = "gateway.absolute_form"

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_FORWARDED_PROTO = {scheme: b"X-Forwarded-Proto: %s\r\n" % scheme.encode() for scheme in ("http", "https")}


# An answer without Content-Length for an HTTP/1.0 client is collected to learn its length, up to this.
HTTP10_ANSWER_BYTES = 16 * 1024 * 1024


class ClientDisconnected(Exception):
    pass


class _UpstreamAborted(Exception):
    """The upstream's answer broke off after the client had received part of it."""


class _BodyLimit(Exception):
    """Raised inside a streamed request body when it grows past `max_body_bytes`."""


class Proxy:
    def __init__(
        self,
        *,
        client: UpstreamClient,
        telemetry: Telemetry,
        client_body_timeout_s: float = 30.0,
        body_timeout_s: float = 120.0,
        tracing: Tracing | None = None,
    ) -> None:
        self.client = client
        self.telemetry = telemetry
        self.client_body_timeout_s = client_body_timeout_s
        self.body_timeout_s = body_timeout_s
        self.tracing = tracing
        self.failures = FailureLog()

    async def refuse(self, scope: Scope, send: Send, error: ClientFacingError) -> None:
        """Answer with the gateway's own error before any routing (inbound protection)."""
        record = RequestRecord(method=scope["method"], started=time.perf_counter())
        record.request_id = new_request_id()
        record.status = error.status
        record.error = error.code
        await send_error(send, error, record.request_id)
        self.telemetry.request_done(record)

    async def handle(self, scope: Scope, receive: Receive, send: Send, router: Router) -> None:
        record = RequestRecord(method=scope["method"], started=time.perf_counter())
        # The server protocol cancels this task if the client goes away (see gateway.client_watch).
        scope[CLIENT_TASK] = asyncio.current_task()
        try:
            inbound = read_request_headers(scope["headers"])
            record.request_id = inbound.request_id or new_request_id()
            if self.tracing is not None:
                self.tracing.begin(record, inbound)  # the span is ended by the telemetry's request_done
            if record.method == "TRACE":
                # An upstream that honours TRACE echoes the request, the gateway's credential included.
                raise BadRequestPath("TRACE is not supported: it would echo the gateway's credential back")
            path: str = scope["path"]
            if path[:1] != "/" or ABSOLUTE_FORM in scope.get("extensions", ()):
                raise BadRequestPath(
                    "absolute-form request targets (GET http://host/path) are not supported: this is not "
                    "a forward proxy; send the path only"
                )
            raw_path: bytes | None = scope.get("raw_path")
            check_path(path, raw_path)
            route = router.match(path)
            if route is None:
                raise RouteNotFound(f"no route matches {_printable(path)}; see GET /readyz for the routes")
            record.route = route.name
            await self._forward(scope, receive, send, route, inbound, path, raw_path, record)
        except ClientFacingError as exc:
            record.error = exc.code
            record.status = exc.status
            if not record.response_started:
                await send_error(send, exc, record.request_id)
            else:
                logger.warning(
                    "request %s: %s after the response had started; the client connection was closed "
                    "and the client sees a truncated answer",
                    record.request_id,
                    exc.code,
                )
        except ClientDisconnected:
            record.status = 499
            record.error = DISCONNECTED
        except _UpstreamAborted:
            pass  # logged where it happened; the record keeps the upstream's status
        except asyncio.CancelledError:
            gone = scope.get(CLIENT_GONE)
            if gone is None:
                raise  # a shutdown, not the client: let it through
            # The client went away: the finally blocks on the way here aborted the upstream attempt
            # and released the slot; what is left is to record it.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            record.status = 499
            record.error = gone
        except Exception:
            # The server-error guard of proxied requests, which know their request id and route.
            record.status = 500
            record.error = InternalError.code
            if record.request_id is None:
                record.request_id = new_request_id()
            logger.exception("request %s: unexpected error; answered 500 internal_error", record.request_id)
            if not record.response_started:
                await send_error(send, InternalError(), record.request_id)
            # else: returning mid-answer makes uvicorn close the connection; the client sees it cut short.
        finally:
            self.telemetry.request_done(record)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: Route,
        inbound: InboundHeaders,
        path: str,
        raw_path: bytes | None,
        record: RequestRecord,
    ) -> None:
        if inbound.content_length is not None and inbound.content_length > route.max_body_bytes:
            raise BodyTooLarge(
                f"the request body is {inbound.content_length} bytes; route {route.name} accepts at most "
                f"{route.max_body_bytes}"
            )
        # Before the body is read: without a credential the answer is 503 at once, whatever the body.
        grant = route.credential.grant_nowait() or await _wait_for_grant(route, record)
        record.credential = grant.slot
        body, stream = await _read_body(receive, route, self.client_body_timeout_s, self.body_timeout_s)
        record.bytes_in = len(body) if body is not None else 0

        request_id = record.request_id
        assert request_id is not None
        client = scope.get("client")
        client_ip = client[0].encode("latin-1") if client else b"unknown"
        lines = [
            name + b": " + value + b"\r\n"
            for name, value in inbound.forwarded
            if name not in route.header_names
        ]
        lines.append(
            b"X-Forwarded-For: " + (inbound.xff + b", " + client_ip if inbound.xff else client_ip) + b"\r\n"
        )
        lines.append(_FORWARDED_PROTO.get(scope.get("scheme", "http"), _FORWARDED_PROTO["http"]))
        if inbound.host:
            lines.append(b"X-Forwarded-Host: " + inbound.host + b"\r\n")
        request_id_bytes = request_id.encode("latin-1")
        lines.append(b"x-request-id: " + request_id_bytes + b"\r\n")
        if not inbound.client_request_id:
            # Azure ML logs it as the client's request id: its request logs and ours join on one id.
            lines.append(b"x-ms-client-request-id: " + request_id_bytes + b"\r\n")
        lines.append(route.static_header_lines)
        for name, secret in route.secret_headers:
            lines.append(name + b": " + secret.value.encode("latin-1") + b"\r\n")
        if stream is not None:
            if inbound.content_length is not None:
                lines.append(b"Content-Length: %d\r\n" % inbound.content_length)
            else:
                lines.append(b"Transfer-Encoding: chunked\r\n")
                stream = encode_chunked(stream)
        elif body or record.method in _BODY_METHODS:
            lines.append(b"Content-Length: %d\r\n" % len(body or b""))
        common = b"".join(lines)
        query = scope.get("query_string")
        target = route.forward_path(path, raw_path) + (b"?" + query if query else b"")

        if route.semaphore is not None:
            await _acquire_slot(route)
        route.in_flight.inc()
        try:
            response = await self._attempts(route, record, common, target, body, stream, grant)
            try:
                if scope.get("http_version") == "1.0" and _needs_length(response, record.method):
                    await self._send_with_length(response, send, record)
                else:
                    await self._stream_response(response, send, record)
            finally:
                response.release()
        finally:
            route.balancer.release(record)  # a probe this request still holds ends with it, whatever ended it
            route.in_flight.dec()
            if route.semaphore is not None:
                route.semaphore.release()

    async def _attempts(
        self,
        route: Route,
        record: RequestRecord,
        common: bytes,
        target: bytes,
        body: bytes | None,
        stream: AsyncIterator[bytes] | None,
        grant: Grant,
    ) -> UpstreamResponse:
        """Attempts until one answer is passed on; `route.replay` decides every replay."""
        policy = route.replay
        balancer = route.balancer
        credential = route.credential
        replayable = stream is None
        deadline = record.started + policy.deadline_s if policy.deadline_s else None
        tried: tuple[Upstream, ...] = ()
        policy.budget.deposit()
        method = record.method.encode("latin-1")
        head_request = record.method == "HEAD"
        request = self.client.request
        while True:
            upstream = route.single_upstream or balancer.pick(tried, record)
            record.attempts += 1
            head = b"".join(
                (
                    method,
                    b" ",
                    upstream.path_bytes if target[:1] == b"/" or upstream.path_bytes else b"/",
                    target,
                    b" HTTP/1.1\r\nHost: ",
                    upstream.host_bytes,
                    b"\r\n",
                    common,
                    b"" if grant.header_line is None else grant.header_line,
                    b"\r\n",
                )
            )
            try:
                response = await request(
                    upstream.pool,
                    head,
                    body if stream is None else stream,
                    head_request=head_request,
                    connect_timeout=route.connect_timeout_s,
                    read_timeout=route.read_timeout_s,
                    write_timeout=route.write_timeout_s,
                    pool_timeout=route.pool_timeout_s,
                    total_timeout=policy.attempt_timeout(route.timeout_s, deadline),
                )
            except _BodyLimit:
                raise _body_too_large(route) from None
            except TransportError as exc:
                failure = policy.transport_failure(exc, route.name)
                if failure.upstream_fault:
                    balancer.failed(upstream, record)
                    record.upstream_errors += 1
                delay = policy.backoff(record.retries + 1)
                replay = failure.replayable and policy.allows(replayable, record.attempts, delay, deadline)
                self.failures.attempt_failed(
                    route=route.name,
                    request_id=record.request_id,
                    origin=upstream.pool,
                    attempt=record.attempts,
                    error=exc,
                    outcome="replaying"
                    if replay
                    else f"answering {failure.error.status} {failure.error.code}",
                )
                if replay:
                    tried = (*tried, upstream)
                    record.retries += 1
                    await asyncio.sleep(delay)
                    continue
                record.upstream = upstream  # the one that failed, for the span and the record's readers
                raise failure.error from None

            # From here the answer is owned by this frame until it is discarded (before a replay) or
            # returned (the caller streams and releases it): whatever ends the request at an await in
            # between (the client left during a credential re-check, a cancellation, an exception),
            # the `except` gives the connection back. Waits that follow a discard hold nothing.
            try:
                status = response.status
                balancer.answered(upstream, status, record)
                replacement: Grant | None = None
                wait: float | None = None
                if status in credential.rejection_statuses:
                    replacement = await credential.rejected(grant)
                    if replacement is not None and not policy.allows_credential_replay(
                        replayable, record.credential_replays, deadline
                    ):
                        replacement = None
                else:
                    credential.accepted(grant)
                    if status in policy.statuses:
                        wait = policy.status_delay(response.headers, record.retries + 1)
                        if wait is not None and not policy.allows(
                            replayable, record.attempts, wait, deadline
                        ):
                            wait = None
                if replacement is None and wait is None:
                    record.upstream_status = status
                    record.upstream = upstream
                    record.headers_at = time.perf_counter()
                    return response
                await _discard(response)
            except BaseException:
                response.release()
                raise
            if replacement is not None:
                record.credential_replays += 1
                grant = replacement
                record.credential = grant.slot
                continue
            assert wait is not None
            tried = (*tried, upstream)
            record.retries += 1
            await asyncio.sleep(wait)

    async def _send_with_length(self, response: UpstreamResponse, send: Send, record: RequestRecord) -> None:
        """The whole answer, collected up to `HTTP10_ANSWER_BYTES`, then sent with its Content-Length."""
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = await response.next_chunk()
            except TransportError as exc:
                logger.warning(
                    "request %s: route %s: the upstream connection failed mid-response (%s)",
                    record.request_id,
                    record.route,
                    exc,
                )
                # The client's answer names the failure class only (the detail is the line above).
                error = UpstreamTimeout if isinstance(exc, TransportTimeout) else UpstreamUnreachable
                raise error(f"route {record.route}: {exc.summary}") from None
            if not chunk:
                break
            size += len(chunk)
            if size > HTTP10_ANSWER_BYTES:
                raise UpstreamProtocolError(
                    f"the upstream's answer has no Content-Length and is over {HTTP10_ANSWER_BYTES} bytes, "
                    "more than the gateway collects for an HTTP/1.0 client; send the request as HTTP/1.1"
                )
            chunks.append(chunk)
        body = b"".join(chunks)
        request_id = record.request_id
        assert request_id is not None
        headers = response_headers(response.headers, request_id.encode("latin-1"))
        headers.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        record.response_started = True
        record.status = response.status
        record.bytes_out = len(body)
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream_response(self, response: UpstreamResponse, send: Send, record: RequestRecord) -> None:
        request_id = record.request_id
        assert request_id is not None
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": _bodyless(
                    response.status, response_headers(response.headers, request_id.encode("latin-1"))
                ),
            }
        )
        record.response_started = True
        record.status = response.status
        sent = 0
        try:
            while True:
                chunk = await response.next_chunk()
                if not chunk:
                    break
                sent += len(chunk)
                if response.at_eof:
                    record.bytes_out = sent
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except TransportError as exc:
            record.bytes_out = sent
            record.error = "upstream_aborted"
            logger.warning(
                "request %s: route %s: the upstream connection failed mid-response (%s); "
                "closing the client connection",
                request_id,
                record.route,
                exc,
            )
            raise _UpstreamAborted from None
        record.bytes_out = sent
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _needs_length(response: UpstreamResponse, method: str) -> bool:
    """An answer with a body but no Content-Length, for an HTTP/1.0 client: uvicorn would send it
    chunked, which such a client cannot read (it would take the chunk framing for body bytes)."""
    if method == "HEAD" or response.status == 204 or response.status == 304:
        return False
    return not any(name.lower() == b"content-length" for name, _ in response.headers)


def _bodyless(status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """204 and 304 answers have no body; a Content-Length on them (allowed on a 304, where it describes
    the representation) would make the ASGI server wait for body bytes that never come."""
    if status != 204 and status != 304:
        return headers
    return [(n, v) for n, v in headers if n.lower() != b"content-length"]


def _body_too_large(route: Route) -> BodyTooLarge:
    return BodyTooLarge(
        f"the request body is over route {route.name}'s limit of {route.max_body_bytes} bytes"
    )


async def _read_body(
    receive: Receive, route: Route, idle_timeout_s: float, body_timeout_s: float
) -> tuple[bytes | None, AsyncIterator[bytes] | None]:
    """The whole body when it fits the replay buffer; otherwise a stream that is sent once.

    Every wait for the client is timed: the first body bytes and every later pause get `idle_timeout_s`
    (server.client_body_timeout_s), the whole body `body_timeout_s` (server.body_timeout_s)."""
    chunks: list[bytes] = []
    size = 0
    limit = route.max_body_bytes
    replay_limit = route.replay_buffer_bytes
    deadline = asyncio.get_running_loop().time() + body_timeout_s
    while True:
        message = await _receive_within(receive, idle_timeout_s, deadline, body_timeout_s)
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _body_too_large(route)
        if not message.get("more_body", False):
            if not chunks:
                return chunk, None
            chunks.append(chunk)
            return b"".join(chunks), None
        chunks.append(chunk)
        if size > replay_limit:
            return None, _stream_rest(chunks, size, receive, limit, idle_timeout_s, deadline, body_timeout_s)


async def _receive_within(
    receive: Receive, idle_timeout_s: float, deadline: float, body_timeout_s: float
) -> Message:
    if _message_waiting(receive):
        return await receive()  # the body came with the head (the usual case): nothing to wait for
    left = deadline - asyncio.get_running_loop().time()
    try:
        async with asyncio.timeout(min(idle_timeout_s, left)):
            return await receive()
    except TimeoutError:
        if left <= idle_timeout_s:
            raise ClientTimeout(
                f"the request body took longer than {body_timeout_s:g} s (server.body_timeout_s); "
                "send it faster or make it smaller"
            ) from None
        raise ClientTimeout(
            f"the client sent no request body bytes for {idle_timeout_s:g} s (server.client_body_timeout_s); "
            "send the body without pauses"
        ) from None


def _message_waiting(receive: Receive) -> bool:
    """True when the server already holds the next message, so `receive()` returns at once and needs no
    timer. `receive` is the bound `receive` of uvicorn's request cycle, whose `message_event` is set
    while body bytes (or the end of the body, or a disconnect) wait to be read."""
    event = getattr(getattr(receive, "__self__", None), "message_event", None)
    return event is not None and event.is_set()


async def _stream_rest(
    head: list[bytes],
    size: int,
    receive: Receive,
    limit: int,
    idle_timeout_s: float,
    deadline: float,
    body_timeout_s: float,
) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    head.clear()
    while True:
        message = await _receive_within(receive, idle_timeout_s, deadline, body_timeout_s)
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyLimit
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _discard(response: UpstreamResponse) -> None:
    """Read a small refusal to the end so its connection goes back to the pool."""
    try:
        await response.read()
    except TransportError:
        pass
    finally:
        response.release()


async def _wait_for_grant(route: Route, record: RequestRecord) -> Grant:
    """The credential is not at hand (a token or keys still being fetched): wait no longer than the
    route's deadline (`retry.deadline_s`, else `timeout_s`), and before the request body is read."""
    limit = route.replay.deadline_s or route.timeout_s
    try:
        async with asyncio.timeout(max(record.started + limit - time.perf_counter(), 0.0)):
            return await route.credential.grant()
    except TimeoutError:
        raise CredentialUnavailable(
            f"route {route.name}: no credential could be had within the route's deadline of {limit:g} s "
            "(it is still being obtained); retry shortly",
            retry_after=1,
        ) from None


async def _acquire_slot(route: Route) -> None:
    semaphore = route.semaphore
    assert semaphore is not None
    if not semaphore.locked():
        await semaphore.acquire()
        return
    if route.queue_timeout_s <= 0 or route.waiters >= route.max_queue:
        raise Overloaded(
            f"route {route.name} is at its limit of {route.max_concurrent} requests in flight "
            f"with {route.waiters} waiting; retry shortly",
            retry_after=1,
        )
    route.waiters += 1
    try:
        await asyncio.wait_for(semaphore.acquire(), route.queue_timeout_s)
    except TimeoutError:
        raise Overloaded(
            f"route {route.name} stayed at its limit of {route.max_concurrent} requests in flight for "
            f"{route.queue_timeout_s:g} s; retry shortly",
            retry_after=1,
        ) from None
    finally:
        route.waiters -= 1


def _printable(path: str) -> str:
    text = path if len(path) <= 200 else path[:200] + "..."
    return "".join(c if c.isprintable() else "?" for c in text)
