"""The stack floor: the least a uvloop + httptools forwarder does, to measure the gateway against.

One route prefix, the key injected, a keep-alive upstream pool, Content-Length and chunked framing both
ways, head and a body that arrived with it in one write. Protocol callbacks only: no task, no coroutine,
no limits, no timers, no metrics, no logging, no pipelining. What the gateway spends beyond this is what
its own work costs (bench/README.md: `floor`).

    FLOOR_UPSTREAM_URL=http://127.0.0.1:8001/score FLOOR_PREFIX=/score FLOOR_API_KEY=k FLOOR_PORT=8005 \
        python bench/floor_proxy.py
"""

from __future__ import annotations

import asyncio
import collections
import http
import os
from urllib.parse import urlsplit

import httptools
import uvloop

UPSTREAM = urlsplit(os.environ.get("FLOOR_UPSTREAM_URL", "http://127.0.0.1:8001/score"))
HOST, PORT = UPSTREAM.hostname or "127.0.0.1", UPSTREAM.port or 80
BASE = UPSTREAM.path.rstrip("/").encode()
PREFIX = os.environ.get("FLOOR_PREFIX", "/score").encode()
FIXED = b"Host: %s:%d\r\nAuthorization: Bearer %s\r\n" % (
    HOST.encode(),
    PORT,
    os.environ.get("FLOOR_API_KEY", "").encode(),
)
DROP = frozenset(
    b"connection keep-alive transfer-encoding content-length host authorization te upgrade".split()
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
HEALTHY = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{"status":"ok"}'
STATUS = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in http.HTTPStatus}
idle: collections.deque[Upstream] = collections.deque()


class Inbound(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
            )
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.lines, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in DROP:
            self.lines.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        path = httptools.parse_url(self.url).path
        if path == b"/healthz":
            self.transport.write(HEALTHY)
            return
        if not (path == PREFIX or path.startswith(PREFIX + b"/")):
            self.transport.write(NOT_FOUND)
            return
        body = b"".join(self.body)
        target = BASE + self.url[len(PREFIX) :]
        head = b"%s %s HTTP/1.1\r\n%s%scontent-length: %d\r\n\r\n" % (
            self.parser.get_method(),
            target or b"/",
            FIXED,
            b"".join(self.lines),
            len(body),
        )
        if idle:
            idle.pop().send(self, head + body)
        else:
            connecting = asyncio.ensure_future(
                asyncio.get_running_loop().create_connection(Upstream, HOST, PORT)
            )
            connecting.add_done_callback(lambda done: done.result()[1].send(self, head + body))


class Upstream(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.client: Inbound | None = None

    def send(self, client: Inbound, request: bytes) -> None:
        self.client, self.out, self.done = client, [], False
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if self.out and self.client is not None:
            self.client.transport.write(b"".join(self.out))  # head and body of one read: one write
            self.out = []
        if self.done:
            self.client = None
            if self.keep_alive:
                idle.append(self)
            else:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in idle:
            idle.remove(self)
        if self.client is not None:
            self.client.transport.abort()

    def on_message_begin(self) -> None:
        self.lines, self.chunked, self.done = [], True, False

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"content-length":
            self.chunked = False
        elif lowered in DROP:
            return
        self.lines.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        framing = b"transfer-encoding: chunked\r\n" if self.chunked else b""
        status = self.parser.get_status_code()
        line = STATUS.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status
        self.out.append(b"%s%s%s\r\n" % (line, b"".join(self.lines), framing))

    def on_body(self, body: bytes) -> None:
        self.out.append(b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body)

    def on_message_complete(self) -> None:
        if self.chunked:
            self.out.append(b"0\r\n\r\n")
        self.done = True
        self.keep_alive = self.parser.should_keep_alive()  # the parser forgets it once the feed returns


async def main() -> None:
    server = await asyncio.get_running_loop().create_server(
        Inbound, "127.0.0.1", int(os.environ.get("FLOOR_PORT", "8005")), backlog=4096
    )
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
