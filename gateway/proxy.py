"""Forwarding: one request in, one or more upstream attempts out, the answer streamed back untouched.

Raw ASGI on purpose: this is the hot path, and framework request/response objects cost more than
everything else the gateway does per request. The upstream client is one pooled aiohttp session
per process (measured several times faster than httpx as a proxy's client; see bench/).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
from yarl import URL

from gateway.credentials.base import Grant
from gateway.errors import (
    BadRequestPath,
    BodyTooLarge,
    ClientFacingError,
    Overloaded,
    RouteNotFound,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.headers import new_request_id, read_request_headers, response_headers
from gateway.responses import send_error
from gateway.routing import Route, Router, Upstream, check_path
from gateway.telemetry import RequestRecord, Telemetry

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

logger = logging.getLogger("gateway.proxy")

# The client's own Accept-Encoding and Content-Type pass through; aiohttp must not invent them.
_SKIP_AUTO_HEADERS = ("Accept-Encoding", "User-Agent", "Content-Type")
_MAX_CREDENTIAL_REPLAYS = 2


class ClientDisconnected(Exception):
    pass


class _BodyLimit(Exception):
    """Raised inside a streamed request body when it grows past `max_body_bytes`."""


def create_upstream_session(ssl_context: Any, *, connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=connections,
        limit_per_host=0,
        ssl=ssl_context,
        ttl_dns_cache=300,
        keepalive_timeout=30,
        enable_cleanup_closed=True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # bodies pass through byte for byte, compressed or not
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
        trust_env=False,
        raise_for_status=False,
    )


class Proxy:
    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        telemetry: Telemetry,
        max_header_bytes: int,
        max_header_count: int,
    ) -> None:
        self.session = session
        self.telemetry = telemetry
        self.max_header_bytes = max_header_bytes
        self.max_header_count = max_header_count

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
        try:
            inbound = read_request_headers(scope["headers"], self.max_header_bytes, self.max_header_count)
            record.request_id = inbound.request_id or new_request_id()
            if record.method == "CONNECT":
                raise BadRequestPath("CONNECT is not supported: this is not a forward proxy")
            path: str = scope["path"]
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
                logger.warning("request %s: %s after the response started", record.request_id, exc.code)
        except ClientDisconnected:
            record.status = 499
            record.error = "client_disconnected"
        finally:
            self.telemetry.request_done(record)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: Route,
        inbound: Any,
        path: str,
        raw_path: bytes | None,
        record: RequestRecord,
    ) -> None:
        if inbound.content_length is not None and inbound.content_length > route.max_body_bytes:
            raise BodyTooLarge(
                f"the request body is {inbound.content_length} bytes; route {route.name} accepts at most "
                f"{route.max_body_bytes}"
            )
        body, stream = await _read_body(receive, route)
        record.bytes_in = len(body) if body is not None else 0
        replayable = stream is None

        request_id = record.request_id
        assert request_id is not None
        client = scope.get("client")
        client_ip = client[0] if client else "unknown"
        headers = inbound.forwarded
        if route.header_names:
            headers = [(n, v) for n, v in headers if n.lower() not in route.header_names]
        headers.append(("X-Forwarded-For", f"{inbound.xff}, {client_ip}" if inbound.xff else client_ip))
        headers.append(("X-Forwarded-Proto", scope.get("scheme", "http")))
        if inbound.host:
            headers.append(("X-Forwarded-Host", inbound.host))
        headers.append(("x-request-id", request_id))
        for name, value in route.headers:
            headers.append((name, value if isinstance(value, str) else value.value))
        if stream is not None and inbound.content_length is not None:
            headers.append(("Content-Length", str(inbound.content_length)))
        query = scope.get("query_string")
        suffix = route.forward_path(path, raw_path) + ("?" + query.decode("latin-1") if query else "")

        credential = route.credential
        grant = credential.grant_nowait() or await credential.grant()
        record.credential = grant.slot

        if route.semaphore is not None:
            await _acquire_slot(route)
        route.in_flight.inc()
        try:
            response = await self._attempts(route, record, headers, body, stream, replayable, suffix, grant)
            try:
                await self._stream_response(response, send, record)
            finally:
                response.release()
        finally:
            route.in_flight.dec()
            if route.semaphore is not None:
                route.semaphore.release()

    async def _attempts(
        self,
        route: Route,
        record: RequestRecord,
        headers: list[tuple[str, str]],
        body: bytes | None,
        stream: AsyncIterator[bytes] | None,
        replayable: bool,
        suffix: str,
        grant: Grant,
    ) -> aiohttp.ClientResponse:
        credential = route.credential
        deadline = record.started + route.deadline_s if route.deadline_s else None
        tried: tuple[Upstream, ...] = ()
        credential_replays = 0
        route.count_request()
        session = self.session
        while True:
            upstream = route.single_upstream or route.pick_upstream(tried)
            record.attempts += 1
            attempt_headers = headers if grant.header is None else [*headers, ("Authorization", grant.header)]
            failure: ClientFacingError | None = None
            try:
                response = await session.request(
                    record.method,
                    URL(upstream.url + suffix, encoded=True),
                    headers=attempt_headers,
                    data=body if stream is None else stream,
                    timeout=route.timeout,
                    allow_redirects=False,
                )
            except _BodyLimit:
                raise _body_too_large(route) from None
            except (TimeoutError, aiohttp.ServerTimeoutError):
                failure = UpstreamTimeout(
                    f"route {route.name}: the upstream did not answer within {route.timeout.total:g} s"
                )
            except (aiohttp.ClientError, OSError) as exc:
                cause = exc.__cause__
                if isinstance(cause, _BodyLimit):
                    raise _body_too_large(route) from None
                failure = UpstreamUnreachable(
                    f"route {route.name}: cannot reach the upstream {upstream.origin} ({type(exc).__name__})"
                )
            if failure is not None:
                route.record_failure(upstream)
                record.upstream_errors += 1
                if (
                    replayable
                    and route.retry_on_connection_errors
                    and record.attempts < route.retry_attempts
                    and _before_deadline(deadline, 0.0)
                    and route.allow_retry()
                ):
                    tried = (*tried, upstream)
                    record.retries += 1
                    await asyncio.sleep(_backoff(route, record.retries))
                    continue
                raise failure

            status = response.status
            if status in credential.rejection_statuses:
                replacement = await credential.rejected(grant)
                if replacement is not None and replayable and credential_replays < _MAX_CREDENTIAL_REPLAYS:
                    await _discard(response)
                    credential_replays += 1
                    record.credential_replays += 1
                    grant = replacement
                    record.credential = grant.slot
                    continue
            else:
                credential.accepted(grant)
                if (
                    status in route.retry_statuses
                    and replayable
                    and record.attempts < route.retry_attempts
                    and route.allow_retry()
                ):
                    delay = _retry_delay(route, response, record.retries + 1)
                    if delay is not None and _before_deadline(deadline, delay):
                        if status >= 500:
                            route.record_failure(upstream)
                        await _discard(response)
                        tried = (*tried, upstream)
                        record.retries += 1
                        await asyncio.sleep(delay)
                        continue
            if status >= 500 and status != 501:
                route.record_failure(upstream)
            else:
                route.record_success(upstream)
            record.upstream_status = status
            record.upstream = upstream
            return response

    async def _stream_response(
        self, response: aiohttp.ClientResponse, send: Send, record: RequestRecord
    ) -> None:
        request_id = record.request_id
        assert request_id is not None
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": response_headers(response.raw_headers, request_id.encode("latin-1")),
            }
        )
        record.response_started = True
        record.status = response.status
        content = response.content
        sent = 0
        try:
            async for chunk in content.iter_any():
                sent += len(chunk)
                if content.at_eof():
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    record.bytes_out = sent
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            record.bytes_out = sent
            record.error = "upstream_aborted"
            logger.warning(
                "request %s: route %s: the upstream connection failed mid-response (%s); "
                "closing the client connection",
                request_id,
                record.route,
                type(exc).__name__,
            )
            response.close()
            raise ClientDisconnected from None
        record.bytes_out = sent
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _body_too_large(route: Route) -> BodyTooLarge:
    return BodyTooLarge(
        f"the request body is over route {route.name}'s limit of {route.max_body_bytes} bytes"
    )


async def _read_body(receive: Receive, route: Route) -> tuple[bytes | None, AsyncIterator[bytes] | None]:
    """The whole body when it fits the replay buffer; otherwise a stream that is sent once."""
    chunks: list[bytes] = []
    size = 0
    limit = route.max_body_bytes
    replay_limit = route.replay_buffer_bytes
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the request body is over route {route.name}'s limit of {limit} bytes")
        if not message.get("more_body", False):
            if not chunks:
                return chunk, None
            chunks.append(chunk)
            return b"".join(chunks), None
        chunks.append(chunk)
        if size > replay_limit:
            return None, _stream_rest(chunks, size, receive, limit)


async def _stream_rest(head: list[bytes], size: int, receive: Receive, limit: int) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    head.clear()
    while True:
        message = await receive()
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


async def _discard(response: aiohttp.ClientResponse) -> None:
    """Read a small refusal to the end so its connection goes back to the pool."""
    try:
        await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError):
        response.close()
    finally:
        response.release()


def _backoff(route: Route, retry: int) -> float:
    ceiling = min(route.backoff_max_s, route.backoff_base_s * (2 ** (retry - 1)))
    return random.uniform(0, ceiling)  # full jitter


def _retry_delay(route: Route, response: aiohttp.ClientResponse, retry: int) -> float | None:
    """Seconds to wait before the next attempt, or None when Retry-After asks for more than we wait."""
    value = response.headers.get("Retry-After")
    if value:
        try:
            seconds = float(value)
        except ValueError:
            seconds = route.retry_after_cap_s + 1  # an HTTP date: far enough away to pass it on
        if seconds > route.retry_after_cap_s:
            return None
        return max(seconds, 0.0)
    return _backoff(route, retry)


def _before_deadline(deadline: float | None, delay: float) -> bool:
    return deadline is None or time.perf_counter() + delay < deadline


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
