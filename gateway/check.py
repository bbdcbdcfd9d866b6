"""`gateway check`: everything a start-up needs, tried once, reported one line per route."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import msal

from gateway.assembly import Assembly
from gateway.azure_rest import origin_of
from gateway.config import (
    AmlTokenAuth,
    AuthConfig,
    CallerLimitsConfig,
    GatewayConfig,
    IdentityConfig,
    KeyAuth,
    RouteConfig,
)
from gateway.credentials.identity import DEFAULT_AUTHORITY_HOST, ENV_AUTHORITY_HOST, managed_identity_source
from gateway.egress import IMDS_ADDRESS, Egress, Proxy, open_connection
from gateway.errors import ConfigError, ConnectError, GatewayError
from gateway.keyvault import KeyVaults
from gateway.redaction import redact


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    proxy: Proxy | None


async def _reach(url: str, context: ssl.SSLContext, egress: Egress, limit_s: float = 5.0) -> str | None:
    """None when a connection to the origin opens (TCP and TLS, through the proxy's tunnel when the
    egress policy says so), else why not: for a tunnel, the proxy and its answer."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or ""
    target = _Target(host, parts.port or (443 if secure else 80), egress.proxy_for_url(url))
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await open_connection(
            loop, asyncio.Protocol, target, context if secure else None, limit_s
        )
    except TimeoutError:
        via = "" if target.proxy is None else f" through the egress proxy {target.proxy.address}"
        return f"no connection{via} within {limit_s:g} s"
    except ConnectError as exc:
        return str(exc)
    except (OSError, ssl.SSLError) as exc:
        return f"{type(exc).__name__}: {exc}"
    transport.abort()
    return None


def _auth_origins(auth: AuthConfig) -> list[tuple[str, str]]:
    """(what, origin URL) of the identity provider and ARM a route's credential talks to."""
    if isinstance(auth, KeyAuth):
        if auth.from_endpoint is None:
            return []
        identity: IdentityConfig | None = auth.identity or IdentityConfig.model_validate({})
    else:
        identity = getattr(auth, "identity", None)
    found: list[tuple[str, str]] = []
    if identity is not None:
        if identity.managed_identity is None:
            host = (
                identity.authority_host or os.environ.get(ENV_AUTHORITY_HOST) or DEFAULT_AUTHORITY_HOST
            ).strip()
            found.append(("Entra ID", origin_of(host if "://" in host else f"https://{host}")))
        elif managed_identity_source() is not msal.managed_identity.DEFAULT_TO_VM:
            found.append(("managed identity", origin_of(os.environ.get("IDENTITY_ENDPOINT", ""))))
        else:
            found.append(("managed identity (IMDS)", f"http://{IMDS_ADDRESS}"))
    arm_url = getattr(auth, "arm_url", None)
    if isinstance(auth, AmlTokenAuth) or (isinstance(auth, KeyAuth) and auth.from_endpoint is not None):
        found.append(("ARM", origin_of(str(arm_url))))
    return found


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
        # Everything as `gateway serve` builds it; a Key Vault secret that cannot be read is reported on
        # the row of the route that uses it.
        assembly = await Assembly.create(config, config_path, warn_literals=False)
    except ConfigError as exc:
        print(f"gateway: {exc}")
        return 2
    try:
        return await _check(config, config_path, assembly)
    finally:
        await assembly.close()


async def _check(config: GatewayConfig, config_path: str, assembly: Assembly) -> int:
    context = assembly.ssl_context
    egress = assembly.egress
    rows: list[tuple[str, ...]] = []
    healthy = True
    # Every origin the gateway will connect to, with who uses it; each is tried once.
    origins: dict[str, list[str]] = {}
    reached: dict[str, str | None] = {}

    identity_origins: set[str] = set()  # reached as the identity sources reach them

    def egress_of(origin: str) -> Egress:
        return egress.for_identity_endpoint() if origin in identity_origins else egress

    async def reach(url: str) -> str | None:
        origin = origin_of(url)
        if origin not in reached:
            reached[origin] = await _reach(origin, context, egress_of(origin))
        return reached[origin]

    for name, route in config.routes.items():
        single = config.model_copy(update={"routes": {name: route}})
        upstreams = [u.url for u in route.upstream_list()]
        for url in upstreams:
            origins.setdefault(origin_of(url), []).append(f"upstream of {name}")
        for what, url in _auth_origins(route.auth):
            origins.setdefault(url, []).append(f"{what} for {name}")
            if what == "managed identity":
                identity_origins.add(url)
        try:
            router = assembly.build_router(single)
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
        reachable = []
        for url in upstreams:
            unreachable = await reach(url)
            if unreachable is not None:
                healthy = False
            reachable.append("reachable" if unreachable is None else f"UNREACHABLE ({unreachable})")
        rows.append(
            (
                name,
                ", ".join(upstreams),
                route.auth.type,
                state,
                expiry,
                "; ".join(reachable),
                f"{detail} [{elapsed * 1000:.0f} ms]".strip(),
            )
        )
    entra = config.inbound.entra_id
    if entra is not None:
        origins.setdefault(origin_of(entra.authority), []).append("Entra ID signing keys (inbound.entra_id)")
    headers = ("ROUTE", "UPSTREAM", "AUTH", "CREDENTIAL", "EXPIRES IN", "UPSTREAM REACHABLE", "SOURCE")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:-1])]
    print("  ".join(h.ljust(w) for h, w in zip(headers[:-1], widths, strict=True)) + "  " + headers[-1])
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    print()
    healthy = await _check_limits(config, assembly) and healthy
    if entra is not None:
        healthy = await _check_callers(config, config_path, assembly) and healthy
        print()
    egress_rows = [("ORIGIN", "USED BY", "EGRESS", "CONNECTION")]
    for origin, users in origins.items():
        failure = await reach(origin)
        if failure is not None:
            healthy = False
        proxied = egress_of(origin).proxy_for_url(origin) is not None
        connection = (
            ("tunnel ok" if proxied and origin.startswith("https:") else "ok")
            if failure is None
            else f"FAILED ({failure})"
        )
        egress_rows.append((origin, ", ".join(users), egress_of(origin).describe(origin), connection))
    widths = [max(len(r[i]) for r in egress_rows) for i in range(3)]
    for row in egress_rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    assembly.commit(config)
    print_keyvault_secrets(assembly.vaults)
    print("all routes OK" if healthy else "some routes have problems (see above)")
    return 0 if healthy else 1


def _rates(limits: CallerLimitsConfig) -> list[str]:
    parts = []
    if limits.per_caller is not None:
        rate = limits.per_caller
        parts.append(f"per caller {rate.requests_per_s:g}/s burst {rate.burst_requests}")
    for caller, rate in limits.callers.items():
        parts.append(f"{caller} {rate.requests_per_s:g}/s burst {rate.burst_requests}")
    return parts


def _concurrency(route: RouteConfig) -> list[str]:
    limits = route.limits
    if limits.max_concurrent is None:
        return []
    if limits.max_concurrent == "auto":
        limit = f"max_concurrent auto, {limits.min or 1} to {limits.max or route.max_connections}"
    else:
        limit = f"max_concurrent {limits.max_concurrent}"
    queue = f"queue {limits.queue} for {limits.queue_timeout_s:g} s" if limits.queue else "no queue"
    return [limit, queue]


async def _check_limits(config: GatewayConfig, assembly: Assembly) -> bool:
    """Each route's admission limits, and the rate store answering (Redis reached within `timeout_ms`).
    Nothing printed when nothing is limited."""
    lines = []
    if config.inbound.limits.limits_callers:
        lines.append(f"LIMITS  inbound (every route): {'; '.join(_rates(config.inbound.limits))}")
    for name, route in config.routes.items():
        parts = _concurrency(route) + _rates(route.limits)
        if parts:
            lines.append(f"LIMITS  {name}: {'; '.join(parts)}")
    if not lines:
        return True
    for line in lines:
        print(line)
    healthy = True
    rates = assembly.rate_limits(config)
    if rates is not None:
        store = rates.store
        await store.start()
        status = store.status()
        if status["store"] == "local":
            print("LIMITS STORE  this process (limits_store unset): each replica counts alone")
        elif status["state"] == "shared":
            print(f"LIMITS STORE  Redis at {status['target']}: answers, quotas shared by the replicas")
        else:
            healthy = False
            print(
                f"LIMITS STORE  Redis at {status['target']}: FAILED ({status['reason']}); the gateway would "
                f"decide locally, divided by expected_replicas={status['expected_replicas']}"
            )
    print()
    return healthy


async def _check_callers(config: GatewayConfig, config_path: str, assembly: Assembly) -> bool:
    """`inbound.entra_id`: its discovery documents and signing keys read as `gateway serve` reads them at
    start-up, and the issuers whose tokens are accepted."""
    try:
        await assembly.prepare_callers(config)
    except ConfigError as exc:
        print(f"CALLERS  inbound.entra_id  FAILED: {str(exc).replace(f'{config_path}: ', '')}")
        return False
    inbound = assembly.build_inbound(config)
    assert inbound is not None and inbound.tokens is not None
    tokens = inbound.tokens
    status = tokens.signing_keys.status()
    print(f"CALLERS  inbound.entra_id  audiences {', '.join(tokens.config.audiences)}")
    for tenant, state in status["tenants"].items():
        print(f"  tenant {tenant}: {len(state['kids'])} signing keys from {state['jwks_uri']}")
    print("  accepted issuers (token `iss`, for the tenant in its `tid`):")
    for issuer, tenant in sorted(tokens.issuers().items()):
        print(f"    {issuer}  tenant {tenant}")
    return True


def print_keyvault_secrets(vaults: KeyVaults) -> None:
    """Each Key Vault secret the configuration uses, with version and age, never a value."""
    secrets = vaults.secrets()
    if not secrets:
        return
    print("KEY VAULT SECRET  VERSION  CREATED  AGE  USED BY")
    for secret in secrets:
        print(
            f"{secret.vault}/secrets/{secret.name}  {secret.version_id}  {created_text(secret.since)}  "
            f"{format_age(secret.since)}  {', '.join(secret.uses)}"
        )


def format_age(since: float) -> str:
    """A creation time as an age for people: `3 d`, `5 h`, `12 min`."""
    seconds = max(0.0, time.time() - since)
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def created_text(since: float) -> str:
    return dt.datetime.fromtimestamp(since, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
