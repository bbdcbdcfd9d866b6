"""`gateway check`: everything a start-up needs, tried once, reported one line per route."""

from __future__ import annotations

import asyncio
import ssl
import time
from urllib.parse import urlsplit

from gateway.app import build_router
from gateway.client import UpstreamClient
from gateway.config import GatewayConfig
from gateway.credentials import BuildContext
from gateway.errors import ConfigError, GatewayError
from gateway.keyvault import print_keyvault_secrets
from gateway.redaction import redact
from gateway.tls import client_context


async def _reach(url: str, context: ssl.SSLContext, limit_s: float = 5.0) -> str | None:
    """None when a TCP (and TLS) connection to the upstream opens, else why not."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, port, ssl=context if secure else None), limit_s
        )
    except TimeoutError:
        return f"no connection within {limit_s:g} s"
    except (OSError, ssl.SSLError) as exc:
        return f"{type(exc).__name__}: {exc}"
    writer.close()
    try:
        await writer.wait_closed()
    except (OSError, ssl.SSLError):
        pass
    return None


def _format_expiry(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


async def run_check(config: GatewayConfig, config_path: str) -> int:
    try:
        context = client_context(config.tls.ca_bundle)
    except ConfigError as exc:
        print(f"gateway: {exc}")
        return 2
    ctx = BuildContext(ssl_context=context, source=config_path, warn_literals=False)
    rows: list[tuple[str, ...]] = []
    healthy = True
    for name, route in config.routes.items():
        single = config.model_copy(update={"routes": {name: route}})
        upstreams = [u.url for u in route.upstream_list()]
        try:
            router = build_router(single, ctx, UpstreamClient(context))
        except ConfigError as exc:
            healthy = False
            problem = str(exc).replace(f"{config_path}: ", "")
            rows.append((name, upstreams[0], route.auth.type, "MISSING", "-", "not checked", problem))
            continue
        credential = router.routes[0].credential
        started = time.monotonic()
        state, expiry, detail = "ok", "-", ""
        try:
            await credential.start()
            status = await asyncio.wait_for(credential.check(), 60)
            state = status.state
            expiry = _format_expiry(status.expires_in_s)
            detail = status.source
            if not status.ready:
                healthy = False
                detail = status.detail or detail
        except (GatewayError, TimeoutError, OSError) as exc:
            healthy = False
            state = "FAILED"
            detail = redact(str(exc) or type(exc).__name__)
        finally:
            await credential.close()
        elapsed = time.monotonic() - started
        reach = []
        for url in upstreams:
            unreachable = await _reach(url, context)
            if unreachable is not None:
                healthy = False
            reach.append("reachable" if unreachable is None else f"UNREACHABLE ({unreachable})")
        rows.append(
            (
                name,
                ", ".join(upstreams),
                route.auth.type,
                state,
                expiry,
                "; ".join(reach),
                f"{detail} [{elapsed * 1000:.0f} ms]".strip(),
            )
        )
    headers = ("ROUTE", "UPSTREAM", "AUTH", "CREDENTIAL", "EXPIRES IN", "UPSTREAM REACHABLE", "SOURCE")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:-1])]
    print("  ".join(h.ljust(w) for h, w in zip(headers[:-1], widths, strict=True)) + "  " + headers[-1])
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    print_keyvault_secrets(ctx)
    print("all routes OK" if healthy else "some routes have problems (see above)")
    return 0 if healthy else 1
