"""Conformance of the upstream client (gateway/client.py) against upstreams that misbehave on purpose.

Each test runs a raw-socket upstream (an asyncio server on its own thread and loop, port 0 on
127.0.0.1) scripted to do one unusual but legal (or common) thing, and drives `UpstreamClient`
directly on another loop, or a running gateway where the client-facing answer matters. The upstream
counts what it accepted and what it read in full, so "executed once" is checked where it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop

from gateway.client import UpstreamClient, UpstreamResponse
from gateway.errors import ConnectError, ConnectionLost, PoolTimeout, ProtocolError, TransportTimeout

Handler = Callable[["Peer"], Awaitable[None]]

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


# ------------------------------------------------------------------------------------ raw upstream
class Peer:
    """One accepted connection of the raw upstream, with helpers to read requests and misbehave."""

    def __init__(
        self, upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.upstream = upstream
        self.reader = reader
        self.writer = writer
        self.index = upstream.accepted

    async def read_request(self) -> tuple[bytes, bytes] | None:
        """(head, body) of the next request, read in full (and counted), or None at end of stream."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lowered = head.lower()
        body = b""
        if b"transfer-encoding: chunked" in lowered:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            body = b"".join(parts)
        elif b"content-length:" in lowered:
            length = int(lowered.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            body = await self.reader.readexactly(length)
        self.upstream.count_request(head)
        return head, body

    async def read_head(self) -> bytes:
        return await self.reader.readuntil(b"\r\n\r\n")

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


class RawUpstream:
    """An asyncio server on its own thread; `handler(peer)` runs for every accepted connection."""

    def __init__(
        self, handler: Handler, *, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None
    ):
        self.handler = handler
        self.host = host
        self.ssl_context = ssl_context
        self.accepted = 0
        self.requests: list[bytes] = []  # the heads of requests read in full, i.e. executed
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0
        self.stop_event: asyncio.Event | None = None

    def count_request(self, head: bytes) -> None:
        with self.lock:
            self.requests.append(head)

    def executions(self, marker: bytes) -> int:
        with self.lock:
            return sum(1 for head in self.requests if marker in head)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self.stop_event = asyncio.Event()
        server = await asyncio.start_server(self._accept, self.host, 0, ssl=self.ssl_context)
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        await self.stop_event.wait()
        server.close()
        for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
            task.cancel()
        await asyncio.sleep(0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.accepted += 1
        peer = Peer(self, reader, writer)
        # Cancelled at shutdown too: the upstream's own ending is no concern of the client under test.
        with contextlib.suppress(BaseException):
            await self.handler(peer)
        with contextlib.suppress(Exception):
            writer.close()

    def __enter__(self) -> RawUpstream:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.stop_event is not None
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)


def run(coroutine_factory: Callable[[], Awaitable[Any]], loop: str = "uvloop", timeout: float = 20) -> Any:
    """Run a client-side coroutine on a fresh loop (uvloop like the gateway, or plain asyncio)."""
    event_loop = LOOPS[loop]()
    try:
        return event_loop.run_until_complete(asyncio.wait_for(coroutine_factory(), timeout))
    finally:
        event_loop.close()


def get(path: str = "/x", extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: upstream\r\n" + extra + b"\r\n"


def post_head(path: str, length: int | None) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return b"POST " + path.encode() + b" HTTP/1.1\r\nHost: upstream\r\n" + framing + b"\r\n\r\n"


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
FAST = {"connect_timeout": 2.0, "read_timeout": 5.0, "total_timeout": 10.0}


async def read_all(response: UpstreamResponse) -> bytes:
    try:
        return await response.read()
    finally:
        response.release()


async def body_stream(total: int, piece: int = 64 * 1024) -> AsyncIterator[bytes]:
    block = b"x" * piece
    sent = 0
    while sent < total:
        yield block
        sent += piece
        await asyncio.sleep(0)


def chunked(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        async for chunk in stream:
            yield b"%x\r\n%b\r\n" % (len(chunk), chunk)
        yield b"0\r\n\r\n"

    return gen()


def new_client(url: str, *, max_connections: int = 8, ssl_context: ssl.SSLContext | None = None):
    client = UpstreamClient(ssl_context)
    return client, client.origin(url, max_connections=max_connections)


# ----------------------------------------------------------------------- framing: close-delimited
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_close_delimited_body_is_delivered_whole(version, loop):
    """No Content-Length, no chunking: the body ends at the upstream's clean end of stream."""
    body = bytes(range(256)) * 4096  # 1 MiB

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/" + version + b" 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for at in range(0, len(body), 100_000):
            await peer.send(body[at : at + 100_000])
        peer.close()

    async def main() -> bytes:
        client, origin = new_client(upstream.url)
        response = await client.request(origin, get(), None, **FAST)
        return await read_all(response)

    with RawUpstream(handler) as upstream:
        assert run(main, loop) == body


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_close_delimited_body_over_tls_is_delivered_whole(tmp_path, loop):
    from gateway.tls import client_context

    body = b"tls-body" * 50_000
    ca_file, server = _pki(tmp_path)

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\n" + body)
        peer.close()  # close_notify, then FIN

    async def main() -> bytes:
        client, origin = new_client(upstream.url, ssl_context=client_context(str(ca_file)))
        return await read_all(await client.request(origin, get(), None, **FAST))

    with RawUpstream(handler, ssl_context=server) as upstream:
        assert run(main, loop) == body


def test_reset_mid_close_delimited_body_is_an_error():
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\n" + b"y" * 50_000)
        await asyncio.sleep(0.1)
        peer.reset()

    async def main() -> None:
        client, origin = new_client(upstream.url)
        response = await client.request(origin, get(), None, **FAST)
        with pytest.raises(ConnectionLost):
            await read_all(response)

    with RawUpstream(handler) as upstream:
        run(main)


def test_close_delimited_body_through_the_gateway(gateway_factory):
    body = b"0123456789" * 100_000

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
        peer.close()

    with RawUpstream(handler) as upstream:
        gw = gateway_factory({"routes": {"open": open_route(upstream.url)}})
        response = httpx.get(gw.url + "/open/x", timeout=10)
        assert response.status_code == 200
        assert response.content == body


def open_route(url: str, **extra: Any) -> dict[str, Any]:
    return {"path": "/open", "upstream": url, "auth": {"type": "none"}, **extra}


# ------------------------------------------------------------------------------- one resend rule
def test_post_read_in_full_then_upstream_dies_is_executed_once():
    """The upstream read the whole POST (on a reused connection) and died before answering: the
    client must not send it again by itself; the error says the request was sent."""

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(OK)  # the first request is answered: the connection goes back to the pool
        await peer.read_request()  # the second is read in full (executed) ...
        peer.close()  # ... and the upstream dies before answering

    async def main() -> ConnectionLost:
        client, origin = new_client(upstream.url)
        assert await read_all(await client.request(origin, get(), None, **FAST)) == b"ok"
        with pytest.raises(ConnectionLost) as caught:
            await client.request(origin, post_head("/score", 2), b"{}", **FAST)
        return caught.value

    with RawUpstream(handler) as upstream:
        error = run(main)
        assert upstream.executions(b"POST /score") == 1
        assert error.request_sent is True


def test_post_executed_then_upstream_dies_through_the_gateway_with_one_attempt(gateway_factory):
    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            if peer.upstream.executions(b"POST") >= 2:
                peer.close()  # executes the second POST and dies without answering
                return
            await peer.send(OK)

    with RawUpstream(handler) as upstream:
        gw = gateway_factory({"routes": {"open": open_route(upstream.url, retry={"attempts": 1})}})
        with httpx.Client(timeout=10) as http:
            assert http.post(gw.url + "/open/score", content=b"{}").status_code == 200
            failed = http.post(gw.url + "/open/score", content=b"{}")
        assert failed.status_code == 502
        assert upstream.executions(b"POST") == 2  # one for each client request, never a hidden third


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("body_kind", ["bytes", "stream"])
def test_stale_pooled_connection_is_replaced_before_anything_is_written(body_kind, loop):
    """The upstream closed an idle pooled connection and the loop has not noticed yet: the request goes
    out on a fresh connection, once, transparently."""

    close_now = threading.Event()
    closed = threading.Event()

    async def handler(peer: Peer) -> None:
        if peer.index == 1:
            await peer.read_request()
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
            await asyncio.get_running_loop().run_in_executor(None, close_now.wait, 5)
            peer.close()
            await peer.writer.wait_closed()
            closed.set()  # the upstream's keep-alive timeout
            return
        while await peer.read_request() is not None:
            await peer.send(OK)

    async def main() -> bytes:
        client, origin = new_client(upstream.url)
        assert await read_all(await client.request(origin, get(), None, **FAST)) == b"ok"
        close_now.set()
        # Blocks the loop: the FIN reaches the kernel but the client's loop does not see it.
        assert closed.wait(10)
        time.sleep(0.05)  # noqa: ASYNC251
        body: bytes | AsyncIterator[bytes] = b"{}" if body_kind == "bytes" else body_stream(3, 1)
        head = post_head("/score", 2 if body_kind == "bytes" else 3)
        return await read_all(await client.request(origin, head, body, **FAST))

    with RawUpstream(handler) as upstream:
        assert run(main, loop) == b"ok"
        assert upstream.accepted == 2
        assert upstream.executions(b"POST /score") == 1


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_waiter_handed_a_connection_that_closed_meanwhile_never_hangs(loop):
    """Pool of one: request B waits for A's connection; the upstream closes it just as A hands it over.
    B is served on a new connection (or fails fast), never left pending."""

    reset_now = threading.Event()
    reset_done = threading.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if peer.index == 1:
            await asyncio.get_running_loop().run_in_executor(None, reset_now.wait, 5)
            peer.reset()
            reset_done.set()
            return
        while await peer.read_request() is not None:
            await peer.send(OK)

    async def main() -> bytes:
        client, origin = new_client(upstream.url, max_connections=1)
        first = await client.request(origin, get("/a"), None, **FAST)
        second = asyncio.create_task(client.request(origin, post_head("/b", 3), body_stream(3, 1), **FAST))
        await asyncio.sleep(0.05)  # B is queued for the only connection
        assert await first.read() == b"ok"
        reset_now.set()
        # Blocks the loop: the reset reaches the kernel while A still holds the connection.
        assert reset_done.wait(10)
        time.sleep(0.05)  # noqa: ASYNC251
        first.release()  # A hands the connection to B
        response = await asyncio.wait_for(second, 5)
        return await read_all(response)

    with RawUpstream(handler) as upstream:
        assert run(main, loop) == b"ok"
        assert upstream.accepted == 2
        assert upstream.executions(b"POST /b") == 1


# --------------------------------------------------------------------- early answer, idle bytes
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_final_answer_during_a_large_streaming_upload_is_returned_at_once(loop):
    """A 401 while 48 MiB are still being sent: the client stops sending and returns the 401 promptly."""

    async def handler(peer: Peer) -> None:
        await peer.read_head()
        await peer.send(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 12\r\n\r\nunauthorized")
        await asyncio.sleep(10)  # and reads nothing more

    async def main() -> tuple[int, bytes, float]:
        client, origin = new_client(upstream.url)
        started = time.monotonic()
        response = await client.request(
            origin, post_head("/score", 48 << 20), body_stream(48 << 20), **{**FAST, "total_timeout": 5.0}
        )
        body = await read_all(response)
        return response.status, body, time.monotonic() - started

    with RawUpstream(handler) as upstream:
        status, body, elapsed = run(main, loop, timeout=8)
        assert (status, body) == (401, b"unauthorized")
        assert elapsed < 4.5  # not waited out to total_timeout (5 s); generous for a loaded machine
        # The connection was abandoned mid-body: never pooled again.


def test_unsolicited_408_on_an_idle_connection_closes_it():
    async def handler(peer: Peer) -> None:
        if peer.index == 1:
            await peer.read_request()
            await peer.send(OK)
            await asyncio.sleep(0.1)
            await peer.send(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
            await asyncio.sleep(10)  # a server that timed the connection out ignores what follows
            return
        while await peer.read_request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")

    async def main() -> tuple[int, bytes]:
        client, origin = new_client(upstream.url)
        assert await read_all(await client.request(origin, get(), None, **FAST)) == b"ok"
        await asyncio.sleep(0.4)
        response = await client.request(origin, get(), None, **{**FAST, "read_timeout": 2.0})
        return response.status, await read_all(response)

    with RawUpstream(handler) as upstream:
        assert run(main) == (200, b"second")
        assert upstream.accepted == 2


# ------------------------------------------------------------------------------ 1xx, 101, HEAD
def test_interim_answers_are_skipped():
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)

    async def main() -> tuple[int, bytes]:
        client, origin = new_client(upstream.url)
        response = await client.request(origin, post_head("/s", 2), b"{}", **FAST)
        return response.status, await read_all(response)

    with RawUpstream(handler) as upstream:
        assert run(main) == (200, b"ok")


def test_101_switching_protocols_is_a_protocol_error(caplog):
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            b"\x81\x05hello"
        )
        await asyncio.sleep(5)

    async def main() -> None:
        client, origin = new_client(upstream.url)
        started = time.monotonic()
        with pytest.raises(ProtocolError, match="101"):
            await client.request(origin, get(), None, **FAST)
        assert time.monotonic() - started < 4.5  # not at read_timeout (5 s): refused on sight
        await asyncio.sleep(0.1)  # let any stray callback log

    with RawUpstream(handler) as upstream, caplog.at_level(logging.DEBUG):
        run(main)
    tracebacks = [r for r in caplog.records if r.exc_info or "Fatal error" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
    assert len([r for r in caplog.records if "101" in r.getMessage()]) == 1


def test_101_through_the_gateway_is_a_502_without_a_traceback(gateway_factory, caplog):
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
        await asyncio.sleep(5)

    with RawUpstream(handler) as upstream, caplog.at_level(logging.INFO):
        gw = gateway_factory({"routes": {"open": open_route(upstream.url, retry={"attempts": 1})}})
        response = httpx.get(gw.url + "/open/x", timeout=10)
    assert response.status_code == 502
    assert not [r for r in caplog.records if r.exc_info or "Fatal error" in r.getMessage()]


def _answer_bad_status(status: bytes) -> Handler:
    """Answers `GET /bad` with `status` (a well-formed head and body otherwise), everything else with OK."""

    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            if request[0].startswith(b"GET /bad "):
                await peer.send(b"HTTP/1.1 %b Odd\r\nContent-Length: 2\r\n\r\nok" % status)
            else:
                await peer.send(OK)

    return handler


@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"999"])
def test_a_status_outside_100_to_599_is_a_protocol_error(status):
    """RFC 9110 15: a status outside 100..599 is invalid. Below 100 it is not an interim answer (the
    client would wait for a final one until read_timeout_s), above 599 it is not passed on: a protocol
    error on sight, naming the status, and the connection is not used again."""

    async def main() -> tuple[ProtocolError, int]:
        client, origin = new_client(upstream.url)
        with pytest.raises(ProtocolError) as caught:
            await client.request(origin, get("/bad"), None, **FAST)  # unfixed, 000 and 099 time out
        response = await client.request(origin, get("/good"), None, **FAST)
        assert await read_all(response) == b"ok"
        return caught.value, response.status

    with RawUpstream(_answer_bad_status(status)) as upstream:
        error, status_after = run(main)
        assert status_after == 200
        assert upstream.accepted == 2  # the connection of the invalid answer was closed
    assert f"status {status.decode()}, outside 100..599" in str(error), str(error)
    assert error.request_sent is True


@pytest.mark.parametrize("status", [b"099", b"600"])
def test_a_status_outside_100_to_599_through_the_gateway_is_a_502(gateway_factory, status):
    with RawUpstream(_answer_bad_status(status)) as upstream:
        gw = gateway_factory(
            {"routes": {"open": open_route(upstream.url, retry={"attempts": 1}, timeout_s=5)}}
        )
        response = httpx.get(gw.url + "/open/bad", timeout=30)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_protocol_error"


def test_head_204_and_304_keep_the_connection_reusable():
    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            line = request[0].split(b"\r\n", 1)[0]
            if line.startswith(b"HEAD"):
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            elif b"/204" in line:
                await peer.send(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif b"/304" in line:
                await peer.send(b'HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: "v"\r\n\r\n')
            elif b"/chunked-head" in line:
                await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            else:
                await peer.send(OK)

    async def main() -> list[tuple[int, bytes]]:
        client, origin = new_client(upstream.url)
        seen = []
        for _ in range(3):
            for head, is_head in (
                (b"HEAD /x HTTP/1.1\r\nHost: u\r\n\r\n", True),
                (get("/204"), False),
                (get("/304"), False),
                (b"HEAD /chunked-head HTTP/1.1\r\nHost: u\r\n\r\n", True),
                (get("/plain"), False),
            ):
                response = await client.request(origin, head, None, head_request=is_head, **FAST)
                seen.append((response.status, await read_all(response)))
        return seen

    with RawUpstream(handler) as upstream:
        seen = run(main)
        assert seen == [(200, b""), (204, b""), (304, b""), (200, b""), (200, b"ok")] * 3
        assert upstream.accepted == 1


# -------------------------------------------------------------------------------- head limits
def _vm_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("shape", ["many_headers", "one_long_header"])
def test_endless_response_headers_are_a_protocol_error_with_bounded_memory(shape):
    cap = 32 << 20  # the upstream gives up after this much, so a broken client cannot eat the machine

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        if shape == "many_headers":
            await peer.send(b"HTTP/1.1 200 OK\r\n")
            line = b"X-Filler: " + b"f" * 1000 + b"\r\n"
            block = line * 64
        else:
            await peer.send(b"HTTP/1.1 200 OK\r\nX-Long: ")
            block = b"v" * 65536
        sent = 0
        while sent < cap:
            await peer.send(block)
            sent += len(block)
        await asyncio.sleep(10)

    async def main() -> float:
        client, origin = new_client(upstream.url)
        started = time.monotonic()
        with pytest.raises(ProtocolError):
            await client.request(origin, get(), None, **{**FAST, "read_timeout": 4.0, "total_timeout": 4.0})
        return time.monotonic() - started

    with RawUpstream(handler) as upstream:
        before = _vm_rss_kib()
        elapsed = run(main)
        grown = _vm_rss_kib() - before
    assert elapsed < 3.5  # cut at the head limit, not at read/total timeout (4 s)
    assert grown < 24 * 1024, f"RSS grew by {grown} KiB"


def test_more_than_100_response_headers_is_a_protocol_error():
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
        await peer.send(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nok")

    async def main() -> None:
        client, origin = new_client(upstream.url)
        with pytest.raises(ProtocolError, match="100"):
            await client.request(origin, get(), None, **FAST)

    with RawUpstream(handler) as upstream:
        run(main)


def test_a_head_of_64_kib_or_less_is_accepted():
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 600) for i in range(90))
        await peer.send(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nok")

    async def main() -> bytes:
        client, origin = new_client(upstream.url)
        response = await client.request(origin, get(), None, **FAST)
        assert len(response.headers) == 91
        return await read_all(response)

    with RawUpstream(handler) as upstream:
        assert run(main) == b"ok"


# ----------------------------------------------------------------------------------- timeouts
def test_read_timeout_is_reset_by_progress():
    """A body trickling for longer than read_timeout_s in total, never silent for that long: delivered."""

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n")
        for byte in b"abcdefghijkl":
            await asyncio.sleep(0.2)
            await peer.send(bytes([byte]))

    async def main() -> bytes:
        client, origin = new_client(upstream.url)
        response = await client.request(
            origin, get(), None, connect_timeout=2, read_timeout=1.0, total_timeout=10
        )
        return await read_all(response)

    with RawUpstream(handler) as upstream:
        assert run(main) == b"abcdefghijkl"


@pytest.mark.parametrize("where", ["head", "body"])
def test_read_timeout_fires_on_silence(where):
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        if where == "body":
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await asyncio.sleep(10)

    async def main() -> tuple[TransportTimeout, float]:
        client, origin = new_client(upstream.url)
        started = time.monotonic()
        with pytest.raises(TransportTimeout) as caught:
            response = await client.request(
                origin, get(), None, connect_timeout=2, read_timeout=0.5, total_timeout=10
            )
            await read_all(response)
        return caught.value, time.monotonic() - started

    with RawUpstream(handler) as upstream:
        error, elapsed = run(main)
    assert error.phase == "read"
    assert error.request_sent is True
    assert "read_timeout_s" in str(error)  # which timer fired: not total_timeout (10 s)
    assert elapsed > 0.4  # not before its time (a bound load cannot break)


def test_a_reused_connection_times_out_by_its_own_exchange():
    """The connection's one timer, armed by an exchange with long timeouts, still fires for the next
    exchange's shorter read_timeout_s."""

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(OK)
        await peer.read_request()
        await asyncio.sleep(30)  # the second request is never answered

    async def main() -> TransportTimeout:
        client, origin = new_client(upstream.url)
        response = await client.request(
            origin, get(), None, connect_timeout=2, read_timeout=60, total_timeout=60
        )
        assert await read_all(response) == b"ok"
        with pytest.raises(TransportTimeout) as caught:
            await client.request(origin, get(), None, connect_timeout=2, read_timeout=0.5, total_timeout=60)
        return caught.value

    with RawUpstream(handler) as upstream:
        error = run(main)
        assert upstream.accepted == 1  # one connection, reused
    assert error.phase == "read"
    assert "read_timeout_s" in str(error)


def test_a_short_timer_left_by_the_previous_exchange_does_not_cut_the_next_one():
    """The timer an exchange with short timeouts left armed fires during the next exchange: it re-arms for
    that exchange's own (longer) limits instead of failing it."""

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(OK)
        await peer.read_request()
        await asyncio.sleep(1.0)  # longer than the first exchange's limits, well within the second's
        await peer.send(OK)

    async def main() -> bytes:
        client, origin = new_client(upstream.url)
        response = await client.request(
            origin, get(), None, connect_timeout=2, read_timeout=0.3, total_timeout=0.4
        )
        assert await read_all(response) == b"ok"
        response = await client.request(
            origin, get(), None, connect_timeout=2, read_timeout=10, total_timeout=15
        )
        return await read_all(response)

    with RawUpstream(handler) as upstream:
        assert run(main) == b"ok"
        assert upstream.accepted == 1


def test_total_timeout_bounds_a_trickling_answer():
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            await asyncio.sleep(0.1)
            await peer.send(b"x")

    async def main() -> TransportTimeout:
        client, origin = new_client(upstream.url)
        with pytest.raises(TransportTimeout) as caught:
            response = await client.request(
                origin, get(), None, connect_timeout=2, read_timeout=1, total_timeout=0.8
            )
            await read_all(response)
        return caught.value

    with RawUpstream(handler) as upstream:
        error = run(main)
    assert error.phase == "total"
    assert "timeout_s" in str(error)


@pytest.mark.parametrize("body_kind", ["bytes", "stream"])
def test_write_timeout_fires_when_the_upstream_stops_reading(body_kind):
    size = 32 << 20

    async def handler(peer: Peer) -> None:
        await peer.read_head()
        await asyncio.sleep(10)  # reads nothing more, answers nothing

    async def main() -> tuple[TransportTimeout, float]:
        client, origin = new_client(upstream.url)
        body: bytes | AsyncIterator[bytes] = b"x" * size if body_kind == "bytes" else body_stream(size)
        started = time.monotonic()
        with pytest.raises(TransportTimeout) as caught:
            await client.request(
                origin,
                post_head("/score", size),
                body,
                connect_timeout=2,
                read_timeout=30,
                write_timeout=0.5,
                total_timeout=30,
            )
        return caught.value, time.monotonic() - started

    with RawUpstream(handler) as upstream:
        error, elapsed = run(main)
    assert error.phase == "write"
    assert "write_timeout_s" in str(error)  # which timer fired: not read or total (30 s)
    assert elapsed > 0.4


def test_pool_timeout_when_every_connection_stays_busy():
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await asyncio.sleep(5)

    async def main() -> tuple[PoolTimeout, float]:
        client, origin = new_client(upstream.url, max_connections=1)
        busy = asyncio.create_task(client.request(origin, get(), None, **FAST))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(PoolTimeout) as caught:
            await client.request(origin, get(), None, pool_timeout=0.3, **FAST)
        elapsed = time.monotonic() - started
        busy.cancel()
        with contextlib.suppress(BaseException):
            await busy
        return caught.value, elapsed

    with RawUpstream(handler) as upstream:
        error, elapsed = run(main)
    assert error.request_sent is False
    assert "pool_timeout_s" in str(error)  # which timer fired
    assert elapsed > 0.25


def test_a_pool_wait_ended_by_a_shorter_timeout_s_names_timeout_s_and_pool_timeout_s():
    """The attempt's timeout_s (0.3 s) ends the wait for a busy pool before pool_timeout_s (5 s): the
    error names the timer that fired with its value, and the one that did not."""

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await asyncio.sleep(5)

    async def main() -> PoolTimeout:
        client, origin = new_client(upstream.url, max_connections=1)
        busy = asyncio.create_task(client.request(origin, get(), None, **FAST))
        await asyncio.sleep(0.1)
        with pytest.raises(PoolTimeout) as caught:
            await client.request(
                origin,
                get(),
                None,
                connect_timeout=2.0,
                read_timeout=5.0,
                pool_timeout=5.0,
                total_timeout=0.3,
            )
        busy.cancel()
        with contextlib.suppress(BaseException):
            await busy
        return caught.value

    with RawUpstream(handler) as upstream:
        error = run(main)
    assert "stayed busy for 0.3 s (timeout_s, shorter than pool_timeout_s 5 s)" in str(error), error


def test_connect_timeout_has_its_own_phase():
    # A listener whose backlog is full never completes the handshake of the next connection.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(listener.getsockname())
            fillers.append(filler)
        time.sleep(0.1)

        async def main() -> TransportTimeout:
            client, origin = new_client(f"http://127.0.0.1:{listener.getsockname()[1]}")
            with pytest.raises(TransportTimeout) as caught:
                await client.request(
                    origin, get(), None, connect_timeout=0.3, read_timeout=5, total_timeout=5
                )
            return caught.value

        error = run(main)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert error.phase == "connect"
    assert error.request_sent is False
    assert "connect_timeout_s" in str(error)


# ---------------------------------------------------------------------------------------- TLS
def _pki(
    tmp: Path, *, hosts: tuple[str, ...] = ("127.0.0.1",), expired: bool = False, ca: str = "conformance CA"
) -> tuple[Path, ssl.SSLContext]:
    """A CA file and a server context whose certificate covers `hosts` (or has expired)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    not_after = now - dt.timedelta(days=1) if expired else now + dt.timedelta(days=30)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=10))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "server-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp / "server.pem", tmp / "server-key.pem")
    return ca_file, server


async def _answer_all(peer: Peer) -> None:
    while await peer.read_request() is not None:
        await peer.send(OK)


def _tls_error(url: str, client_context: ssl.SSLContext) -> ConnectError:
    async def main() -> ConnectError:
        client, origin = new_client(url, ssl_context=client_context)
        with pytest.raises(ConnectError) as caught:
            await client.request(origin, get(), None, **FAST)
        return caught.value

    return run(main)


def test_tls_with_the_right_ca_works(tmp_path):
    from gateway.tls import client_context

    ca_file, server = _pki(tmp_path)
    with RawUpstream(_answer_all, ssl_context=server) as upstream:

        async def main() -> bytes:
            client, origin = new_client(upstream.url, ssl_context=client_context(str(ca_file)))
            return await read_all(await client.request(origin, get(), None, **FAST))

        assert run(main) == b"ok"


def test_tls_unknown_ca_says_to_set_the_ca_bundle(tmp_path):
    from gateway.tls import client_context

    _, server = _pki(tmp_path)
    with RawUpstream(_answer_all, ssl_context=server) as upstream:
        error = _tls_error(upstream.url, client_context())
    message = str(error)
    assert f"127.0.0.1:{upstream.port}" in message
    assert "tls.ca_bundle" in message
    assert error.request_sent is False


def test_tls_hostname_mismatch_is_named(tmp_path):
    from gateway.tls import client_context

    ca_file, server = _pki(tmp_path, hosts=("scoring.example",))
    with RawUpstream(_answer_all, ssl_context=server) as upstream:
        error = _tls_error(upstream.url, client_context(str(ca_file)))
    message = str(error)
    assert f"127.0.0.1:{upstream.port}" in message
    assert "not valid for" in message and "127.0.0.1" in message
    assert "tls.ca_bundle" not in message


def test_tls_expired_certificate_is_named(tmp_path):
    from gateway.tls import client_context

    ca_file, server = _pki(tmp_path, expired=True)
    with RawUpstream(_answer_all, ssl_context=server) as upstream:
        error = _tls_error(upstream.url, client_context(str(ca_file)))
    message = str(error)
    assert f"127.0.0.1:{upstream.port}" in message
    assert "expired" in message


# --------------------------------------------------------------------------- the pool, at load
def test_pool_reuses_connections_across_many_requests():
    async def main() -> int:
        client, origin = new_client(upstream.url, max_connections=4)

        async def one(i: int) -> bytes:
            body = b'{"i": %d}' % i
            return await read_all(await client.request(origin, post_head("/echo", len(body)), body, **FAST))

        results = await asyncio.gather(*(one(i) for i in range(200)))
        assert all(r == b"ok" for r in results)
        return len(results)

    with RawUpstream(_answer_all) as upstream:
        assert run(main) == 200
        assert upstream.accepted <= 4
        assert upstream.executions(b"POST /echo") == 200


def test_final_answer_during_a_large_upload_through_the_gateway(gateway_factory):
    """A client streams 48 MiB through the gateway; the upstream refuses after the head: the refusal
    reaches the client within seconds, not after the route's timeout (or later)."""

    async def handler(peer: Peer) -> None:
        await peer.read_head()
        await peer.send(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 12\r\n\r\nunauthorized")
        await asyncio.sleep(15)

    size = 48 << 20
    with RawUpstream(handler) as upstream:
        gw = gateway_factory({"routes": {"open": open_route(upstream.url, timeout_s=5, max_body_bytes=size)}})
        sock = socket.create_connection(("127.0.0.1", gw.port))
        sock.settimeout(10)
        started = time.monotonic()
        sock.sendall(b"POST /open/score HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % size)

        def upload() -> None:
            block = b"z" * (256 * 1024)
            with contextlib.suppress(OSError):
                for _ in range(size // len(block)):
                    sock.sendall(block)

        uploader = threading.Thread(target=upload, daemon=True)
        uploader.start()
        answer = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        elapsed = time.monotonic() - started
        sock.close()
        uploader.join(10)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert elapsed < 4.0


def test_a_closed_connection_is_freed_without_the_garbage_collector():
    """Connection, parser and the half-parsed head go away by reference counting once the connection
    closed (no protocol <-> parser <-> response cycle keeps them)."""
    import gc
    import weakref

    from gateway import client as client_module

    made: list[weakref.ref[Any]] = []
    original = client_module._Connection.connection_made

    def connection_made(self: Any, transport: Any) -> None:
        made.append(weakref.ref(self))
        original(self, transport)

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"f" * 2000 + b"\r\n" * 1)
        await peer.send(b"".join(b"X-F%d: %s\r\n" % (i, b"g" * 1000) for i in range(80)))
        await asyncio.sleep(5)

    async def main() -> None:
        client, origin = new_client(upstream.url)
        try:
            await client.request(origin, get(), None, **FAST)
        except ProtocolError:
            pass  # (no `pytest.raises` here: its record of the error would keep this frame alive)
        else:
            raise AssertionError("no ProtocolError")
        for _ in range(5):
            await asyncio.sleep(0.05)  # connection_lost runs on a later loop iteration

    client_module._Connection.connection_made = connection_made  # type: ignore[method-assign]
    gc.disable()
    try:
        with RawUpstream(handler) as upstream:
            run(main)
        alive = [ref for ref in made if ref() is not None]
    finally:
        gc.enable()
        client_module._Connection.connection_made = original  # type: ignore[method-assign]
    assert made and not alive, [type(ref()).__name__ for ref in alive]


def test_connect_error_says_nothing_was_sent():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()

    async def main() -> ConnectError:
        client, origin = new_client(f"http://127.0.0.1:{port}")
        with pytest.raises(ConnectError) as caught:
            await client.request(origin, get(), None, **FAST)
        return caught.value

    error = run(main)
    assert error.request_sent is False
    assert f"127.0.0.1:{port}" in str(error)


@pytest.mark.parametrize("case", ["bytes_after_the_body", "body_after_a_head_answer"])
def test_bytes_past_the_answer_are_not_taken_for_the_next_answer(case):
    """Whatever follows a complete answer is not the answer to the next request: the answer is
    delivered, the connection closed, and the next request gets a fresh connection."""

    async def handler(peer: Peer) -> None:
        first = peer.index == 1
        while await peer.read_request() is not None:
            if first and case == "bytes_after_the_body":
                await peer.send(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
            elif first:
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
            else:
                await peer.send(OK)
            first = False

    async def main() -> list[tuple[int, bytes]]:
        client, origin = new_client(upstream.url)
        is_head = case == "body_after_a_head_answer"
        head = b"HEAD /x HTTP/1.1\r\nHost: u\r\n\r\n" if is_head else get()
        first = await client.request(origin, head, None, head_request=is_head, **FAST)
        seen = [(first.status, await read_all(first))]
        await asyncio.sleep(0.2)  # whatever follows arrives while the connection is pooled
        second = await client.request(origin, get("/next"), None, **FAST)
        seen.append((second.status, await read_all(second)))
        return seen

    with RawUpstream(handler) as upstream:
        expected_first = (200, b"") if case == "body_after_a_head_answer" else (200, b"ok")
        assert run(main) == [expected_first, (200, b"ok")]
        assert upstream.accepted == 2


def test_trailers_of_a_chunked_answer_do_not_leak_into_the_next_answer():
    async def handler(peer: Peer) -> None:
        first = True
        while await peer.read_request() is not None:
            if first:
                await peer.send(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
                    b"2\r\nok\r\n0\r\nX-Checksum: abc\r\n\r\n"
                )
            else:
                await peer.send(OK)
            first = False

    async def main() -> list[list[tuple[bytes, bytes]]]:
        client, origin = new_client(upstream.url)
        seen = []
        for _ in range(2):
            response = await client.request(origin, get(), None, **FAST)
            assert await read_all(response) == b"ok"
            seen.append(response.headers)
        return seen

    with RawUpstream(handler) as upstream:
        _, second = run(main)
        assert upstream.accepted == 1
    assert second == [(b"Content-Length", b"2")]
