"""The gateway's own answers: a JSON error body with a stable code, and small JSON documents."""

from __future__ import annotations

import http
import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gateway.errors import ClientFacingError
from gateway.redaction import redact

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def error_body(code: str, message: str, request_id: str | None) -> bytes:
    return json.dumps(
        {"error": {"code": code, "message": redact(message), "request_id": request_id}}
    ).encode()


async def send_json(
    send: Send, status: int, payload: Any, *, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload, indent=None).encode()
    await send_bytes(send, status, body, b"application/json", headers=headers)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    out = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if headers:
        out.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def error_head(error: ClientFacingError, request_id: str, body: bytes) -> bytes:
    """The status line and headers (without the blank line) of the gateway's error answer in wire form,
    for the server protocol and the proxy, which write to the connection themselves."""
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
            b"x-request-id: " + request_id.encode("latin-1") + b"\r\n",
            *[name + b": " + value + b"\r\n" for name, value in error.headers],
        )
    )


async def send_error(send: Send, error: ClientFacingError, request_id: str | None) -> None:
    headers: list[tuple[bytes, bytes]] = []
    if request_id:
        headers.append((b"x-request-id", request_id.encode("latin-1")))
    if error.retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(error.retry_after))).encode()))
    headers.extend(error.headers)
    body = error_body(error.code, error.message, request_id)
    await send_bytes(send, error.status, body, b"application/json", headers=headers)
