"""The tightest aiohttp-based forwarder we can write: an upper bound for a gateway built on aiohttp.

It exists to decide issue 9's question "would a mature client do?": if the gateway, with its own
HTTP/1.1 client, does not beat this per core by more than 15%, an aiohttp-based gateway would be
preferred. So it does strictly less than the gateway (no routing, no config, no metrics, no access
log, no retry policy, no timeouts per phase) and everything aiohttp offers to go fast:

- raw ASGI (no framework) under uvicorn with the gateway's own uvicorn settings (uvloop, httptools,
  no server/date headers, no access log);
- one ``aiohttp.ClientSession`` for the process: ``TCPConnector`` with a keep-alive pool,
  ``DummyCookieJar`` (no cookie handling), ``auto_decompress=False``, no automatic User-Agent /
  Accept / Accept-Encoding headers, a fixed ``read_bufsize``, the upstream URL parsed once;
- the request body passed as bytes when it arrived in one piece (else streamed through), the
  response streamed back chunk by chunk as aiohttp reads it;
- the same header work as the gateway: hop-by-hop headers and the client's Authorization, Host and
  Content-Length dropped, ``Authorization: Bearer <key>`` added.

Run::

    AIOHTTP_UPSTREAM_URL=http://127.0.0.1:8001/score AIOHTTP_API_KEY=secret AIOHTTP_PORT=8003 \
        python bench/aiohttp_proxy.py
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import uvicorn
from yarl import URL

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

UPSTREAM_URL = URL(os.environ.get("AIOHTTP_UPSTREAM_URL", "http://127.0.0.1:8001/score"), encoded=True)
AUTHORIZATION = "Bearer " + os.environ.get("AIOHTTP_API_KEY", "")

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_REQUEST_DROPPED = _HOP_BY_HOP | {b"authorization", b"host", b"content-length", b"expect"}

session: aiohttp.ClientSession | None = None


def _new_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=256,
        limit_per_host=0,
        keepalive_timeout=60.0,
        use_dns_cache=True,
        ttl_dns_cache=None,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        read_bufsize=65536,
        timeout=aiohttp.ClientTimeout(total=60.0),
        raise_for_status=False,
    )


async def _lifespan(receive: Receive, send: Send) -> None:
    global session
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            session = _new_session()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if session is not None:
                await session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _rest_of_body(first: bytes, receive: Receive) -> AsyncIterator[bytes]:
    if first:
        yield first
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    if scope["path"] == "/healthz":
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})
        return
    assert session is not None
    headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in scope["headers"]
        if name not in _REQUEST_DROPPED
    ]
    headers.append(("Authorization", AUTHORIZATION))
    first = await receive()
    data: bytes | AsyncIterator[bytes] = first.get("body", b"")
    if first.get("more_body", False):
        content_length = next((v for n, v in scope["headers"] if n == b"content-length"), None)
        if content_length is not None:
            headers.append(("Content-Length", content_length.decode("latin-1")))
        data = _rest_of_body(first.get("body", b""), receive)
    async with session.request(
        scope["method"], UPSTREAM_URL, data=data, headers=headers, allow_redirects=False, compress=None
    ) as upstream:
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status,
                "headers": [(n, v) for n, v in upstream.raw_headers if n.lower() not in _HOP_BY_HOP],
            }
        )
        content = upstream.content
        chunk = await content.readany()
        while not content.at_eof():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            chunk = await content.readany()
        await send({"type": "http.response.body", "body": chunk})


if __name__ == "__main__":
    # The gateway's own uvicorn settings (gateway/cli.py `serve`), minus its custom protocol class.
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(os.environ["AIOHTTP_PORT"]),
        loop="uvloop",
        http="httptools",
        lifespan="on",
        server_header=False,
        date_header=False,
        access_log=False,
        log_config=None,
        log_level="warning",
        timeout_keep_alive=5,
        proxy_headers=False,
    )
