"""The "naive" baseline: a credential-injecting forwarder as a user would first write it.

Starlette + one shared ``httpx.AsyncClient``: read the body, ``await client.post(...)``,
return ``Response(content, status, headers)``. No streaming, no tuning. Run it with::

    NAIVE_UPSTREAM_URL=http://127.0.0.1:8001/score NAIVE_API_KEY=secret \
        python -m uvicorn naive_proxy:app --app-dir bench --port 8002 --workers 1
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

UPSTREAM_URL = os.environ.get("NAIVE_UPSTREAM_URL", "http://127.0.0.1:8001/score")
API_KEY = os.environ.get("NAIVE_API_KEY", "")

client: httpx.AsyncClient | None = None


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global client
    client = httpx.AsyncClient(timeout=60.0)
    try:
        yield
    finally:
        await client.aclose()


async def score(request: Request) -> Response:
    assert client is not None
    body = await request.body()
    upstream = await client.post(
        UPSTREAM_URL,
        content=body,
        headers={
            "Content-Type": request.headers.get("content-type", "application/json"),
            "Authorization": f"Bearer {API_KEY}",
        },
    )
    headers = {"content-type": upstream.headers.get("content-type", "application/json")}
    for name in ("x-bench-auth", "x-ms-request-id"):
        if name in upstream.headers:
            headers[name] = upstream.headers[name]
    return Response(content=upstream.content, status_code=upstream.status_code, headers=headers)


async def healthz(request: Request) -> Response:
    return Response("ok", media_type="text/plain")


app = Starlette(
    routes=[Route("/score", score, methods=["POST"]), Route("/healthz", healthz)],
    lifespan=lifespan,
)
