"""A scriptable upstream for the proxy tests: raw ASGI, so it can misbehave in every way a real one does."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections import Counter
from typing import Any


class Upstream:
    """Accepts `Authorization: Bearer <k>` for k in `accepted_keys` (None: accepts anything)."""

    def __init__(self, accepted_keys: set[str] | None = None) -> None:
        self.accepted_keys = accepted_keys
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.hits: Counter[str] = Counter()
        self.fail_next: list[int] = []  # statuses to answer with before behaving normally
        self.release = asyncio.Event()

    def seen(self, path: str) -> int:
        with self.lock:
            return self.hits[path]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        path = scope["path"]
        request = {
            "method": scope["method"],
            "path": path,
            "raw_path": scope.get("raw_path", b"").decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": headers,
            "body_length": len(body),
            "body": body.decode("utf-8", "replace") if len(body) < 4096 else None,
        }
        with self.lock:
            self.requests.append(request)
            self.hits[path] += 1
        auth = dict(headers).get("authorization", "")
        if self.accepted_keys is not None and auth.removeprefix("Bearer ") not in self.accepted_keys:
            await _respond(
                send, 401, b'{"message": "Unauthorized"}', [(b"content-type", b"application/json")]
            )
            return
        with self.lock:
            status = self.fail_next.pop(0) if self.fail_next else None
        if status is not None:
            await _respond(send, status, b'{"message": "scripted failure"}', [(b"retry-after", b"0")])
            return

        if path.endswith("/echo") or path.endswith("/score"):
            # An Azure ML-shaped answer: a JSON string holding JSON.
            payload = json.dumps(json.dumps(request)).encode()
            await _respond(
                send, 200, payload, [(b"content-type", b"application/json"), (b"x-upstream", b"1")]
            )
        elif path.endswith("/chunks"):
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
            )
            await send({"type": "http.response.body", "body": b"first;", "more_body": True})
            await asyncio.wait_for(self.release.wait(), 10)
            await send({"type": "http.response.body", "body": b"second", "more_body": False})
        elif path.endswith("/gzip"):
            data = gzip.compress(b'"[\\"setosa\\"]"', mtime=0)
            await _respond(
                send, 200, data, [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
            )
        elif path.endswith("/hang"):
            await asyncio.sleep(30)
            await _respond(send, 200, b"late", [])
        elif path.endswith("/reset"):
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]}
            )
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise RuntimeError("connection reset by the test upstream")
        elif "/status/" in path:
            code = int(path.rsplit("/", 1)[1])
            if code in (204, 304):
                await send({"type": "http.response.start", "status": code, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            await _respond(
                send, code, f'{{"status": {code}}}'.encode(), [(b"content-type", b"application/json")]
            )
        elif path.endswith("/hop"):
            await _respond(
                send,
                200,
                b"ok",
                [
                    (b"connection", b"x-secret-hop"),
                    (b"x-secret-hop", b"1"),
                    (b"keep-alive", b"timeout=5"),
                    (b"x-end-to-end", b"kept"),
                ],
            )
        else:
            await _respond(send, 200, body or b"ok", [(b"content-type", b"application/octet-stream")])


async def _respond(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
