"""Forwarding: one request in, one or more upstream attempts out, the answer streamed back untouched.

The request path is a short chain of stages, each configured per route at build time and each answering
the client with a `ClientFacingError` when it refuses (see `Proxy.serve`):

    1. inbound      (`gateway.inbound`)   who may use the gateway, who calls    403/401
    2. router       (`gateway.routing`)   which route, path rules               404/400
    3. route access (`gateway.callers`)   may this caller use this route        403 caller_not_allowed
    4. admission    (`gateway.ratelimit`) the caller's quotas                   429 rate_limited
                    (`gateway.concurrency`) a route slot now, queued, or not    503 route_busy
    5. credential   (`gateway.credentials`) the grant, within the deadline      503 credential_unavailable
    6. replay policy + client (`_attempts`, `gateway.retry`, `gateway.client`)  the answer, or 502/504

Everything up to the credential happens before a byte of the body is read. What a stage takes it gives back
on every exit path (one try/finally each: the concurrency slot is acquired just before the one that covers
the rest of the request, so a route without limits pays an attribute test and nothing else). The outcome
of every stage goes into the request's `RequestRecord`, from which the access line, the metrics and the
span are written once, at the end.

No ASGI on this path: the server protocol hands over an `Exchange` (`gateway.exchange`) and the answer is
written to the client connection directly, its head and a body that is already complete in one write.
Headers stay bytes from the client's socket to the upstream's; the request head is assembled once per
attempt and written with the body in one call by `gateway.client` (see bench/ for why not aiohttp or
httpx).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from gateway.client import DEADLINE_S, TIMEOUT_S, UpstreamClient, UpstreamResponse, encode_chunked
from gateway.concurrency import Slot
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
    UnknownSigningKey,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.exchange import STATUS_LINES, ClientGone, Exchange
from gateway.failure_log import FailureLog
from gateway.headers import InboundHeaders, new_request_id, read_request_headers, response_header_lines
from gateway.responses import error_body, error_head
from gateway.retry import MIN_ATTEMPT_S
from gateway.routing import DEPLOYMENT_HEADER, Route, Router
from gateway.telemetry import RequestRecord, Telemetry
from gateway.upstreams import Upstream

if TYPE_CHECKING:
    from gateway.inbound import Inbound
    from gateway.secrets import Secret
    from gateway.tracing import Tracing

logger = logging.getLogger("gateway.proxy")

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_FORWARDED_PROTO = {scheme: b"X-Forwarded-Proto: %s\r\n" % scheme.encode() for scheme in ("http", "https")}
_LAST_CHUNK = b"0\r\n\r\n"
# Recorded, never sent: the gateway shut down (server.grace_period_s ended) before the answer was complete.
SHUTTING_DOWN = "shutting_down"
# The phases of a TransportTimeout of the attempt's own limit: timeout_s, or what retry.deadline_s left.
_ATTEMPT_LIMIT_PHASES = frozenset({"total", "deadline"})


# An answer without Content-Length for an HTTP/1.0 client is collected to learn its length, up to this;
# all such answers being collected at once hold at most HTTP10_COLLECTED_BYTES (a few HTTP/1.0 clients
# must not hold the memory of many).
HTTP10_ANSWER_BYTES = 16 * 1024 * 1024
HTTP10_COLLECTED_BYTES = 4 * HTTP10_ANSWER_BYTES


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
        self._http10_collected = 0  # bytes held by `_answer_with_length` in all requests together

    async def serve(self, exchange: Exchange, guard: Inbound | None, router: Router) -> None:
        """The task of one proxied request: the chain of stages, the answer, and one record of it.
        Every error is answered here (the request id is known); the task never raises, except a
        cancellation that is not the client's (a shutdown)."""
        record = RequestRecord(exchange.method, time.perf_counter())
        try:
            # 1. inbound: which clients may use the gateway's credentials at all, and who calls
            if guard is not None:
                try:
                    try:
                        record.caller = guard.identify(exchange)
                    except UnknownSigningKey:  # a token naming a key not held: read the keys, try again
                        record.caller = await guard.authenticate(exchange)
                except ClientFacingError:
                    record.request_id = new_request_id()  # refused before the client's headers count
                    raise
            inbound = read_request_headers(exchange.headers)
            record.request_id = exchange.request_id = inbound.request_id or new_request_id()
            if self.tracing is not None:
                self.tracing.begin(record, inbound)  # the span is ended by the telemetry's request_done
            # 2. router
            route = _route(exchange, router)
            record.route = route.name
            # 3. route access: whether this caller may use this route (`routes.NAME.callers`)
            access = route.access
            if access is not None:
                access.check(record.caller)
            await self._forward(exchange, route, inbound, record)
        except ClientFacingError as exc:
            record.error = exc.code
            record.status = exc.status
            _answer_error(exchange, exc, record)
        except ClientGone:
            _record_stopped(record, exchange)
        except _UpstreamAborted:
            pass  # logged where it happened; the record keeps the upstream's status
        except asyncio.CancelledError:
            gone = exchange.gone
            if gone is None:
                # A shutdown, not the client: let it through. The `finally` cuts the connection; the record
                # says so (503 when no answer had started: a failure of the gateway's, not an answer).
                record.error = SHUTTING_DOWN
                if not exchange.response_started:
                    record.status = 503
                raise
            # The client went away (or the server protocol answered the request itself): the finally
            # blocks on the way here aborted the upstream attempt and released the slot; what is left is
            # to record it.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            _record_stopped(record, exchange)
        except Exception:
            # The server-error guard of proxied requests, which know their request id and route.
            record.status = 500
            record.error = InternalError.code
            if record.request_id is None:
                record.request_id = new_request_id()
            logger.exception("request %s: unexpected error; answered 500 internal_error", record.request_id)
            _answer_error(exchange, InternalError(), record)
        finally:
            if not exchange.response_complete and exchange.gone is None:
                exchange.cut_off()  # never leave the client waiting for an answer nobody writes
            self.telemetry.request_done(record)

    async def _forward(
        self, exchange: Exchange, route: Route, inbound: InboundHeaders, record: RequestRecord
    ) -> None:
        if inbound.content_length is not None and inbound.content_length > route.max_body_bytes:
            raise BodyTooLarge(
                f"the request body is {inbound.content_length} bytes; route {route.name} accepts at most "
                f"{route.max_body_bytes}"
            )
        # 4. admission: the caller's quotas (a refusal uses none), then a slot of the route, held until the
        # answer is out; the slot is given back in the `finally` below, however the request ends.
        rate_limit = route.rate_limit
        if rate_limit is not None:
            caller = record.caller
            # An anonymous caller is counted by its client address (the connection's peer).
            client = exchange.client
            quota_key = caller.quota_key or (client[0] if client else "unknown")
            if rate_limit.decides_now:
                rate_limit.admit_now(quota_key, caller.label)
            else:
                await rate_limit.admit(quota_key, caller.label)
        slot: Slot | None = None
        observer: Slot | None = None  # the slot, when its limit learns from upstream answers (`auto`)
        concurrency = route.concurrency
        if concurrency is not None:
            slot = concurrency.slot_now(record.caller.label)
            if slot is None:  # wait in the queue, until the request's deadline at most
                deadline_s = route.replay.deadline_s or route.timeout_s
                slot = concurrency.slot(
                    record.started + deadline_s - time.perf_counter(), record.caller.label
                )
                await slot.acquire()
            if concurrency.adaptive is not None:
                observer = slot
        in_flight = route.in_flight
        in_flight.value += 1
        try:
            # 5. credential: without one the answer is 503 at once, before the body is read
            grant = route.credential.grant_nowait() or await _wait_for_grant(route, record)
            record.credential = grant.slot
            body, stream = await _read_body(
                exchange, route, record, self.client_body_timeout_s, self.body_timeout_s
            )
            common, stream = _forwarded_headers(exchange, route, inbound, record, body, stream)
            target = route.forward_path(exchange.path, exchange.raw_path)
            query = exchange.query
            if query:
                target = b"%b?%b" % (target, query)
            # 6. replay policy and client: the answer to pass on
            response = await self._attempts(route, record, common, target, body, stream, grant, observer)
            try:
                await self._answer(exchange, response, record, route)
            finally:
                response.release()
            # The answer arrived whole: only now is it the upstream's success (see `Balancer.answered`).
            upstream = record.upstream
            if upstream is not None and (upstream.consecutive_failures or upstream.ejected_until):
                route.balancer.completed(upstream, response.status)
        finally:
            route.balancer.release(record)  # a probe this request still holds ends with it, whatever ended it
            in_flight.value -= 1
            if slot is not None:
                slot.release()

    async def _attempts(
        self,
        route: Route,
        record: RequestRecord,
        common: list[bytes],
        target: bytes,
        body: bytes | None,
        stream: AsyncIterator[bytes] | None,
        grant: Grant,
        observer: Slot | None,
    ) -> UpstreamResponse:
        """Attempts until one answer is passed on; `route.replay` decides every replay. Each upstream
        answer's status and latency go to `observer` (the slot of a `max_concurrent: auto` route)."""
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
            if deadline is None:
                attempt_timeout, timer = route.timeout_s, TIMEOUT_S
            else:
                left = deadline - time.perf_counter()
                if left < MIN_ATTEMPT_S:
                    raise _deadline_passed(route, record)
                attempt_timeout, timer = (
                    (left, DEADLINE_S) if left < route.timeout_s else (route.timeout_s, TIMEOUT_S)
                )
            upstream = route.single_upstream or balancer.pick(tried, record)
            record.attempts += 1
            # One join per attempt: the request line, Host, the common lines' pieces, the credential.
            head = b"".join(
                [
                    method,
                    b" ",
                    upstream.path_bytes if target[:1] == b"/" or upstream.path_bytes else b"/",
                    target,
                    b" HTTP/1.1\r\nHost: ",
                    upstream.host_bytes,
                    b"\r\n",
                    *common,
                    b"" if grant.header_line is None else grant.header_line,
                    b"\r\n",
                ]
            )
            sent = time.perf_counter() if observer is not None else 0.0
            try:
                response = await request(  # by position: see UpstreamClient.request
                    upstream.pool,
                    head,
                    body if stream is None else stream,
                    head_request,
                    route.connect_timeout_s,
                    route.read_timeout_s,
                    route.write_timeout_s,
                    route.pool_timeout_s,
                    attempt_timeout,
                    timer,
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
                if observer is not None:
                    observer.observe(time.perf_counter() - sent, status)
                balancer.answered(upstream, status, record)
                replacement: Grant | None = None
                wait: float | None = None
                if status in credential.rejection_statuses:
                    # The key's verdict is waited for until the request's deadline at most.
                    replacement = await credential.rejected(
                        grant, record.started + route.timeout_s if deadline is None else deadline
                    )
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
                broken = await _discard(response)
                if broken is None:
                    balancer.completed(upstream, status)  # a refusal, read and dropped: the upstream answered
                else:
                    _broke_off(route, upstream, record, broken)
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
            if observer is not None:  # `auto` lowered its limit: this replay waits for room under it
                await observer.requeue(None if deadline is None else deadline - time.perf_counter())
            await asyncio.sleep(wait)

    async def _answer(
        self, exchange: Exchange, response: UpstreamResponse, record: RequestRecord, route: Route
    ) -> None:
        """The upstream's answer to the client: head and a body that has already arrived whole in one
        write; otherwise the head at once and the body streamed as it comes. An answer that breaks off
        mid-body counts against the upstream (`_broke_off`)."""
        request_id = record.request_id
        assert request_id is not None
        status = response.status
        bodyless_status = status == 204 or status == 304
        # Hot path: the head as a list of pieces, joined once with the body by `Exchange.start`.
        head = [STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        length = response_header_lines(response.headers, head, bodyless_status=bodyless_status)
        head += (b"x-request-id: ", request_id.encode("latin-1"), b"\r\n")
        record.status = status
        if bodyless_status or exchange.method == "HEAD":
            exchange.start(head)
            record.response_started = True
            exchange.end()
            return
        body = response.take_complete_body()
        if body is not None:  # the whole answer has arrived (the usual case): one write, no wait
            if length is None:
                head.append(b"content-length: %d\r\n" % len(body))
            exchange.start(head, body)
            record.response_started = True
            record.bytes_out = len(body)
            exchange.end()
            return
        first = b""
        if response.ready:  # what already arrived: sent with the head
            try:
                first = await response.next_chunk()
            except TransportError as exc:
                _broke_off(route, record.upstream, record, exc)
                self._start_stream(exchange, head, length, b"", record)
                raise _aborted(exchange, record, 0, exc) from None
        if length is None and exchange.http_version == "1.0":
            await self._answer_with_length(exchange, response, head, first, record, route)
            return
        chunked = self._start_stream(exchange, head, length, first, record)
        sent = len(first)  # body bytes written to the client: its access line says so however this ends
        try:
            while True:
                chunk = await response.next_chunk()
                if not chunk:
                    break
                await exchange.send(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                sent += len(chunk)
        except TransportError as exc:
            _broke_off(route, record.upstream, record, exc)
            raise _aborted(exchange, record, sent, exc) from None
        finally:
            record.bytes_out = sent  # the client left, the gateway shut down: what it was sent until then
        exchange.end(_LAST_CHUNK if chunked else b"")

    @staticmethod
    def _start_stream(
        exchange: Exchange, head: list[bytes], length: int | None, first: bytes, record: RequestRecord
    ) -> bool:
        """Write the head of an answer whose body follows in pieces; True when it is sent chunked (its
        length is unknown)."""
        chunked = length is None
        if chunked:
            head.append(b"transfer-encoding: chunked\r\n")
            first = b"%x\r\n%b\r\n" % (len(first), first) if first else b""
        exchange.start(head, first)
        record.response_started = True
        return chunked

    async def _answer_with_length(
        self,
        exchange: Exchange,
        response: UpstreamResponse,
        head: list[bytes],
        first: bytes,
        record: RequestRecord,
        route: Route,
    ) -> None:
        """For an HTTP/1.0 client, which cannot read chunked framing: the whole answer, collected up to
        `HTTP10_ANSWER_BYTES`, then sent with its Content-Length."""
        chunks: list[bytes] = []
        held = 0  # what this answer counts in `_http10_collected`
        try:
            chunk = first or await self._next_http10_chunk(response, record, route)
            while chunk:
                if held + len(chunk) > HTTP10_ANSWER_BYTES:
                    raise UpstreamProtocolError(
                        f"the upstream's answer has no Content-Length and is over {HTTP10_ANSWER_BYTES} "
                        "bytes, more than the gateway collects for an HTTP/1.0 client; send the request as "
                        "HTTP/1.1"
                    )
                self._hold_http10(chunk, record)
                held += len(chunk)
                chunks.append(chunk)
                chunk = await self._next_http10_chunk(response, record, route)
            body = b"".join(chunks)
            chunks.clear()  # joined: the answer is held once
            head.append(b"content-length: %d\r\n" % len(body))
            exchange.start(head, body)
            record.response_started = True
            record.bytes_out = len(body)
            del body
            # Still counted while it waits in the connection's write buffer: until the client has read it
            # down to the buffer's high-water mark (a client that reads nothing: server.send_timeout_s).
            await exchange.send(b"")
        finally:
            self._http10_collected -= held
        exchange.end()

    def _hold_http10(self, chunk: bytes, record: RequestRecord) -> None:
        """Count `chunk` as collected for an HTTP/1.0 client, or refuse the request when the answers being
        collected would hold more than HTTP10_COLLECTED_BYTES."""
        if self._http10_collected + len(chunk) > HTTP10_COLLECTED_BYTES:
            raise Overloaded(
                f"route {record.route}: answers for HTTP/1.0 clients are collected whole to learn their "
                f"length, and those in progress hold the gateway's limit of {HTTP10_COLLECTED_BYTES} bytes; "
                "retry shortly, or send the request as HTTP/1.1 (its answer streams)",
                retry_after=1,
            )
        self._http10_collected += len(chunk)

    @staticmethod
    async def _next_http10_chunk(response: UpstreamResponse, record: RequestRecord, route: Route) -> bytes:
        """The next piece of an answer being collected (b"" at its end); a broken upstream connection is
        the client's 502 or 504 (nothing of the answer was sent yet)."""
        try:
            return await response.next_chunk()
        except TransportError as exc:
            _broke_off(route, record.upstream, record, exc)
            logger.warning(
                "request %s: route %s: the upstream connection failed mid-response (%s)",
                record.request_id,
                record.route,
                exc,
            )
            # The client's answer names the failure class only (the detail is the line above).
            error = UpstreamTimeout if isinstance(exc, TransportTimeout) else UpstreamUnreachable
            raise error(f"route {record.route}: {exc.summary}") from None


def _deadline_passed(route: Route, record: RequestRecord) -> UpstreamTimeout:
    """The request's deadline left no time for an attempt (its body arrived slowly, or it waited for a
    credential, a slot or a Retry-After): nothing is sent, and no upstream is blamed."""
    where = "before it was sent to the upstream" if not record.attempts else "before it could be replayed"
    return UpstreamTimeout(
        f"route {route.name}: the request's retry.deadline_s ({route.replay.deadline_s:g} s) ran out {where} "
        "(receiving its body or waiting took it); nothing more was sent"
    )


def _record_stopped(record: RequestRecord, exchange: Exchange) -> None:
    """A request whose serving stopped early (`Exchange.gone`): its client went away, or the server
    protocol refused it (and answered it, under the exchange's request id)."""
    record.error = exchange.gone
    if exchange.gone_status is not None:
        record.status = exchange.gone_status
    if record.request_id is None:
        record.request_id = exchange.request_id  # refused before the proxy had read its headers


def _route(exchange: Exchange, router: Router) -> Route:
    """Stage 2: the route for the request's path, after the path rules (`gateway.paths`)."""
    if exchange.method == "TRACE":
        # An upstream that honours TRACE echoes the request, the gateway's credential included.
        raise BadRequestPath("TRACE is not supported: it would echo the gateway's credential back")
    path = exchange.path
    if path == "*" and not exchange.absolute_form:
        raise BadRequestPath(
            "asterisk-form request targets (OPTIONS *) are not supported: the gateway answers requests for "
            "a route's path only"
        )
    if path[:1] != "/" or exchange.absolute_form:
        raise BadRequestPath(
            "absolute-form request targets (GET http://host/path) are not supported: this is not "
            "a forward proxy; send the path only"
        )
    route = router.resolve(path, exchange.raw_path)
    if route is None:
        raise RouteNotFound(f"no route matches {_printable(path)}; see GET /readyz for the routes")
    return route


def _forwarded_headers(
    exchange: Exchange,
    route: Route,
    inbound: InboundHeaders,
    record: RequestRecord,
    body: bytes | None,
    stream: AsyncIterator[bytes] | None,
) -> tuple[list[bytes], AsyncIterator[bytes] | None]:
    """The header lines every attempt sends (all but Host and the credential's) in pieces, and the body
    stream framed for the upstream."""
    request_id = record.request_id
    assert request_id is not None
    client = exchange.client
    client_ip = client[0].encode("latin-1") if client else b"unknown"
    header_names = route.header_names
    static_lines = route.static_header_lines
    secret_headers = route.secret_headers
    access = route.access
    if access is not None and access.may_pin_deployment(record.caller):
        header_names, static_lines, secret_headers = _deployment_chosen(route, inbound)
    # Hot path: flat pieces (name, ": ", value, CRLF), joined once per attempt with the request line.
    lines: list[bytes] = []
    for name, value in inbound.forwarded:
        if name not in header_names:
            lines += (name, b": ", value, b"\r\n")
    if inbound.xff:
        lines += (b"X-Forwarded-For: ", inbound.xff, b", ", client_ip, b"\r\n")
    else:
        lines += (b"X-Forwarded-For: ", client_ip, b"\r\n")
    lines.append(_FORWARDED_PROTO.get(exchange.scheme, _FORWARDED_PROTO["http"]))
    if inbound.host:
        lines += (b"X-Forwarded-Host: ", inbound.host, b"\r\n")
    request_id_bytes = request_id.encode("latin-1")
    lines += (b"x-request-id: ", request_id_bytes, b"\r\n")
    if not inbound.client_request_id:
        # Azure ML logs it as the client's request id: its request logs and ours join on one id.
        lines += (b"x-ms-client-request-id: ", request_id_bytes, b"\r\n")
    lines.append(static_lines)
    for name, secret in secret_headers:
        lines += (name, b": ", secret.value.encode("latin-1"), b"\r\n")
    if stream is not None:
        if inbound.content_length is not None:
            lines.append(b"Content-Length: %d\r\n" % inbound.content_length)
        else:
            lines.append(b"Transfer-Encoding: chunked\r\n")
            stream = encode_chunked(stream)
    elif body or record.method in _BODY_METHODS:
        lines.append(b"Content-Length: %d\r\n" % len(body or b""))
    return lines, stream


def _deployment_chosen(
    route: Route, inbound: InboundHeaders
) -> tuple[frozenset[bytes], bytes, tuple[tuple[bytes, Secret], ...]]:
    """For a caller the route lets choose its deployment: the client's `azureml-model-deployment` header
    is forwarded, and when it sent one, it replaces the route's own. (Header names to drop, the route's
    fixed lines, its secret-backed headers.)"""
    if not any(name == DEPLOYMENT_HEADER for name, _ in inbound.forwarded):
        return route.header_names, route.static_header_lines, route.secret_headers
    static_lines = b"".join(
        name + b": " + value + b"\r\n"
        for name, value in route.headers
        if isinstance(value, bytes) and name.lower() != DEPLOYMENT_HEADER
    )
    secret_headers = tuple(
        (name, value) for name, value in route.secret_headers if name.lower() != DEPLOYMENT_HEADER
    )
    return route.header_names - {DEPLOYMENT_HEADER}, static_lines, secret_headers


def _answer_error(exchange: Exchange, error: ClientFacingError, record: RequestRecord) -> None:
    """The gateway's own error answer; once the upstream's answer has started, the connection is cut
    instead (the client sees a truncated answer)."""
    if exchange.response_started:
        logger.warning(
            "request %s: %s after the response had started; the client connection was closed "
            "and the client sees a truncated answer",
            record.request_id,
            error.code,
        )
        exchange.cut_off()
        return
    request_id = record.request_id or new_request_id()
    body = error_body(error.code, error.message, request_id)
    exchange.answer(error_head(error, request_id, body), body)


def _broke_off(route: Route, upstream: Upstream | None, record: RequestRecord, exc: TransportError) -> None:
    """The upstream's answer broke off mid-body (its connection was reset or closed, it went silent for
    read_timeout_s, its framing broke): a failure of the upstream's, counted as one before its head is
    (outlier detection, the verdict of a probe). Not `timeout_s` running out mid-body: a client that
    reads slowly holds the answer back as much as a slow upstream, and is no reason to eject it; nor is
    what `retry.deadline_s` left the attempt running out. (The client leaving is no TransportError: it
    never gets here.)"""
    if isinstance(exc, TransportTimeout) and exc.phase in _ATTEMPT_LIMIT_PHASES:
        return
    if upstream is not None:
        route.balancer.failed(upstream, record)
        record.upstream_errors += 1


def _aborted(exchange: Exchange, record: RequestRecord, sent: int, exc: TransportError) -> _UpstreamAborted:
    record.bytes_out = sent
    record.error = "upstream_aborted"
    logger.warning(
        "request %s: route %s: the upstream connection failed mid-response (%s); "
        "closing the client connection",
        record.request_id,
        record.route,
        exc,
    )
    exchange.cut_off()
    return _UpstreamAborted()


def _body_too_large(route: Route) -> BodyTooLarge:
    return BodyTooLarge(
        f"the request body is over route {route.name}'s limit of {route.max_body_bytes} bytes"
    )


async def _read_body(
    exchange: Exchange, route: Route, record: RequestRecord, idle_timeout_s: float, body_timeout_s: float
) -> tuple[bytes | None, AsyncIterator[bytes] | None]:
    """The whole body when it fits the replay buffer; otherwise a stream that is sent once.

    Every wait for the client is timed: the first body bytes and every later pause get `idle_timeout_s`
    (server.client_body_timeout_s), the whole body `body_timeout_s` (server.body_timeout_s). A body that
    came with the head (the usual case) is taken without a timer. `record.bytes_in` counts the body bytes
    taken from the client so far, whatever ends the reading (a stream's as it is sent)."""
    limit = route.max_body_bytes
    body = exchange.take_complete_body()
    if body is not None:  # hot path: all of it came with the head
        record.bytes_in = len(body)
        if len(body) > limit:
            raise _body_too_large(route)
        return body, None
    if exchange.body_waiting():
        chunk, more = exchange.take_body()
        record.bytes_in = len(chunk)
        if len(chunk) > limit:
            raise _body_too_large(route)
        if not more:
            return chunk, None
        chunks, size = [chunk], len(chunk)
    else:
        chunks, size = [], 0
    replay_limit = route.replay_buffer_bytes
    deadline = asyncio.get_running_loop().time() + body_timeout_s
    while size <= replay_limit:
        chunk, more = await _next_body(exchange, idle_timeout_s, deadline, body_timeout_s)
        size += len(chunk)
        record.bytes_in = size
        if size > limit:
            raise _body_too_large(route)
        chunks.append(chunk)
        if not more:
            return b"".join(chunks), None
    return None, _stream_rest(chunks, exchange, record, limit, idle_timeout_s, deadline, body_timeout_s)


async def _next_body(
    exchange: Exchange, idle_timeout_s: float, deadline: float, body_timeout_s: float
) -> tuple[bytes, bool]:
    if not exchange.body_waiting():
        left = deadline - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(min(idle_timeout_s, left)):
                await exchange.wait_body()
        except TimeoutError:
            if left <= idle_timeout_s:
                raise ClientTimeout(
                    f"the request body took longer than {body_timeout_s:g} s (server.body_timeout_s); "
                    "send it faster or make it smaller"
                ) from None
            raise ClientTimeout(
                f"the client sent no request body bytes for {idle_timeout_s:g} s "
                "(server.client_body_timeout_s); send the body without pauses"
            ) from None
    return exchange.take_body()


async def _stream_rest(
    head: list[bytes],
    exchange: Exchange,
    record: RequestRecord,
    limit: int,
    idle_timeout_s: float,
    deadline: float,
    body_timeout_s: float,
) -> AsyncIterator[bytes]:
    """The rest of a body over the replay buffer: the chunks read so far (`head`, already counted in
    `record.bytes_in`), then each chunk read from the client, counted as it comes."""
    for chunk in head:
        if chunk:
            yield chunk
    head.clear()
    while True:
        chunk, more = await _next_body(exchange, idle_timeout_s, deadline, body_timeout_s)
        size = record.bytes_in = record.bytes_in + len(chunk)
        if size > limit:
            raise _BodyLimit
        if chunk:
            yield chunk
        if not more:
            return


# A refusal that is replayed (a retryable status, a refused credential) has its body read and dropped up
# to this many bytes, so that its connection can go back to the pool. Azure ML's refusals are JSON of well
# under 1 KiB; past the bound the connection is closed instead (`release` closes one whose answer was not
# read to its end): the replay's new connection costs a handshake, where reading on would cost whatever
# the upstream chose to send (an endless body: until timeout_s). Nothing is kept, so the memory a refusal
# holds is the client's read buffer (paused past its high-water mark), whatever the body's size.
DISCARD_BYTES = 64 * 1024


async def _discard(response: UpstreamResponse) -> TransportError | None:
    """Drop a refusal's body before the replay: read to its end when that is within `DISCARD_BYTES` (the
    connection is pooled again), else stop reading and close the connection. Returns the error that broke
    the body off, if one did (the upstream's failure, as mid-body in an answer passed on)."""
    try:
        # The usual small refusal arrived whole with its head: taken without a wait.
        if response.take_complete_body() is None:
            dropped = 0
            while dropped <= DISCARD_BYTES:
                chunk = await response.next_chunk()
                if not chunk:
                    break
                dropped += len(chunk)
    except TransportError as exc:
        return exc
    finally:
        response.release()
    return None


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


def _printable(path: str) -> str:
    text = path if len(path) <= 200 else path[:200] + "..."
    return "".join(c if c.isprintable() else "?" for c in text)
