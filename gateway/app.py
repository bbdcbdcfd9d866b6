"""The application: proxied requests handed over by the server protocol, admin endpoints (ASGI), start-up
and shutdown, and hot reload."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any

from gateway import logs, metrics
from gateway.assembly import Assembly
from gateway.config import (
    GatewayConfig,
    ServerConfig,
    default_config_path,
    load_config,
    with_server_overrides,
)
from gateway.credentials import Credential
from gateway.errors import ConfigError, InternalError
from gateway.exchange import Exchange
from gateway.headers import new_request_id
from gateway.inbound import inbound_problem
from gateway.proxy import Proxy
from gateway.responses import Send, error_body, send_bytes, send_error, send_json
from gateway.server_protocol import SEND_TIMEOUT_STATE
from gateway.server_tls import ServerTls
from gateway.telemetry import RequestRecord, Telemetry
from gateway.tracing import TracedTelemetry, build_tracing

logger = logging.getLogger("gateway")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

CONFIG_POLL_S = 2.0
# Server settings a reload applies; every other `server` field shapes the listener or objects built at
# start-up, and only a restart changes it.
_RELOADABLE_SERVER_FIELDS = frozenset(
    {"max_body_bytes", "replay_buffer_bytes", "send_timeout_s", "allow_unauthenticated_remote"}
)


async def _refuse_websocket(scope: Scope, receive: Receive, send: Send) -> None:
    """The gateway forwards plain HTTP only: a WebSocket upgrade gets a JSON 400 (uvicorn answered 500
    when the app ignored the scope), or a close (403 from uvicorn) without the denial extension."""
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        request_id = new_request_id()
        body = error_body(
            "bad_request_path",
            "WebSocket upgrades are not supported: the gateway forwards plain HTTP",
            request_id,
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
        ]
        await send({"type": "websocket.http.response.start", "status": 400, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


def _file_signature(path: str) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class GatewayApp:
    """The gateway: proxied requests come from the server protocol as exchanges (`serve_exchange`, no
    ASGI); the admin endpoints are raw ASGI, a dictionary look-up."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        config_path: str | None = None,
        server_overrides: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.server_overrides = server_overrides or {}
        # The listener as started: a reload checks the new config against it and never changes it.
        self.listener: ServerConfig = config.server
        self.config_path = config_path
        # TLS trust, egress, Key Vault, tokens, the upstream client: built once, here; Key Vault secrets are
        # read before anything serves (a reload reads its new ones with `await`, see `reload`).
        self.assembly = Assembly.create_now(config, config_path or "<config>")
        self.client = self.assembly.client
        self.router = self.assembly.build_router(config)
        # Stage 1: who may call, who calls (Entra ID's signing keys were read by `create_now`).
        self.guard = self.assembly.build_inbound(config)
        self.assembly.commit(config)
        self._server_tls: ServerTls | None = None
        # A missing OpenTelemetry package is a ConfigError here, before the server starts.
        self.tracing = build_tracing(config.telemetry.otel, self.assembly.source)
        self.running_telemetry = config.telemetry
        self.telemetry = (
            Telemetry(access_log=config.server.access_log)
            if self.tracing is None
            else TracedTelemetry(self.tracing, access_log=config.server.access_log)
        )
        self.proxy: Proxy | None = None
        self._admin: dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
        }
        # What the server protocol hands to ASGI; every other request is an exchange for the proxy.
        self.asgi_paths = frozenset(self._admin)
        self._reload_lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        self._config_signature: tuple[int, int, int] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # uvicorn's server state (the lifespan scope's "state"), which its protocols read.
        self._server_state: dict[str, Any] = {}

    @property
    def credentials(self) -> list[Credential]:
        return [r.credential for r in self.router.routes]

    def server_tls(self) -> ServerTls:
        """The TLS listener's context (`server.tls`), its certificate and key built by this app's assembly:
        from Key Vault they follow the vault's poll, from files the file. ConfigError if they do not load."""
        if self._server_tls is None:
            tls = self.listener.tls
            if tls is None:
                raise ConfigError("server.tls is not configured")
            self._server_tls = ServerTls(tls, self.assembly)
        return self._server_tls

    def serve_exchange(self, exchange: Exchange) -> Coroutine[Any, Any, None]:
        """The task of a proxied request, started by the server protocol: the proxy with the running
        config's stages (a reload swaps them; a request keeps those it started with)."""
        proxy = self.proxy
        assert proxy is not None, "the lifespan protocol must run before requests"
        return proxy.serve(exchange, self.guard, self.router)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                admin = self._admin.get(scope["path"])
                if admin is None:
                    # Proxied requests never come this way: the gateway's server protocol hands them to
                    # `serve_exchange`. Another ASGI server would get here.
                    raise RuntimeError(
                        "proxied requests need the gateway's server protocol (gateway.server_protocol); "
                        "run the gateway with `gateway serve`"
                    )
                await admin(scope, receive, send)
            except Exception:
                await self._internal_error(scope, send)
        elif scope["type"] == "lifespan":
            state = scope.get("state")
            if isinstance(state, dict):
                self._server_state = state
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await _refuse_websocket(scope, receive, send)

    async def _internal_error(self, scope: Scope, send: Send) -> None:
        """The server-error guard: any exception not answered yet becomes a JSON 500 `internal_error`
        with a request id, an access line and a metric, never uvicorn's text/plain 500."""
        record = RequestRecord(method=scope.get("method", "?"), started=time.perf_counter())
        record.request_id = new_request_id()
        record.status = 500
        record.error = InternalError.code
        logger.exception("request %s: unexpected error; answered 500 internal_error", record.request_id)
        try:
            await send_error(send, InternalError(), record.request_id)
        except Exception:
            pass  # the answer had started: uvicorn closes the connection, the client sees it cut short
        self.telemetry.request_done(record)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # surfaced by uvicorn as a failed start-up
                    logger.error("start-up failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        self._server_state[SEND_TIMEOUT_STATE] = self.config.server.send_timeout_s
        if self.tracing is not None:
            self.tracing.start()
        self.proxy = Proxy(
            client=self.client,
            telemetry=self.telemetry,
            client_body_timeout_s=self.config.server.client_body_timeout_s,
            body_timeout_s=self.config.server.body_timeout_s,
            tracing=self.tracing,
        )
        for credential in self.credentials:
            await credential.start()
            credential.publish()
        self.assembly.start()
        if self.config_path:
            self._config_signature = _file_signature(self.config_path)
            self._watch_task = asyncio.create_task(self._watch_config())
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (tests) or no SIGHUP on this platform
        # Its log lines (an access line per request) are written once per loop iteration from now on.
        logs.batch_lines(asyncio.get_running_loop())
        logger.info(
            "gateway ready: %s",
            ", ".join(
                f"{r.name} {r.prefix} -> {', '.join(u.origin for u in r.upstreams)} ({r.credential.kind})"
                for r in self.router.routes
            ),
        )

    def _on_sighup(self) -> None:
        logger.warning("SIGHUP received: reloading %s", self.config_path)
        self._background.add(task := asyncio.create_task(self.reload_from_file()))
        task.add_done_callback(self._background.discard)

    async def _watch_config(self) -> None:
        assert self.config_path is not None
        while True:
            await asyncio.sleep(CONFIG_POLL_S)
            signature = _file_signature(self.config_path)
            if signature is not None and signature != self._config_signature:
                self._config_signature = signature
                logger.warning("%s changed: reloading", self.config_path)
                await self.reload_from_file()

    async def shutdown(self) -> None:
        try:
            if self._watch_task is not None:
                self._watch_task.cancel()
            for credential in self.credentials:
                await credential.close()
            await self.assembly.close()
            if self.tracing is not None:
                await self.tracing.shutdown()
        finally:
            logs.unbatch_lines()

    async def reload(self, config: GatewayConfig) -> None:
        """Swap to a validated config; unchanged credentials keep their state and cached tokens.

        The new config passes the start-up checks, as written and against the running listener (which
        a reload cannot change), or it is refused with ConfigError and the running config stays. Its new
        Key Vault secrets are read with `await` (each within `keyvault.timeout_s`) while the running
        config serves; one that cannot be read refuses the reload."""
        listener = self.listener
        problem = inbound_problem(config) or inbound_problem(
            config.model_copy(
                update={
                    "server": listener.model_copy(
                        update={"allow_unauthenticated_remote": config.server.allow_unauthenticated_remote}
                    )
                }
            )
        )
        if problem:
            raise ConfigError(problem)
        async with self._reload_lock:
            old = self.router
            reuse = {r.credential_key: r.credential for r in old.routes}
            await self.assembly.prepare(config)  # new Key Vault secrets; the running config serves meanwhile
            await self.assembly.prepare_callers(config)  # signing keys, when inbound.entra_id changed
            # The same shared parts (MSAL applications, token cache, Azure REST client, the per-caller rate
            # counters) serve the new routes; unchanged credentials and concurrency limits carry on.
            router = self.assembly.build_router(config, old)
            guard = self.assembly.build_inbound(config)
            kept = {id(r.credential) for r in router.routes}
            for route in router.routes:
                if route.credential not in reuse.values():
                    await route.credential.start()
                    route.credential.publish()
            self.assembly.commit(config)  # its secrets are the polled ones, settings applied
            if config.telemetry != self.running_telemetry:
                # The tracer provider and its exporter thread are built once; swapping them under
                # requests in flight would split their spans between two providers.
                logger.warning("telemetry settings changed: they take effect at the next restart")
            if config.egress != self.assembly.started.egress:
                # Open connections and the clients' pools were made under the running policy.
                logger.warning("egress settings changed: they take effect at the next restart")
            if config.tls != self.assembly.started.tls:
                logger.warning("tls settings changed: they take effect at the next restart")
            restart = [
                f"server.{name}"
                for name in ServerConfig.model_fields
                if name not in _RELOADABLE_SERVER_FIELDS
                and getattr(config.server, name) != getattr(listener, name)
            ]
            if restart:
                logger.warning(
                    "settings that need a restart changed: %s; they keep their running values until the "
                    "next restart",
                    ", ".join(restart),
                )
            self.router = router  # atomic: requests in flight keep the Route objects they hold
            self.assembly.retire_pools(old, router)  # a changed max_connections applies from here
            self._server_state[SEND_TIMEOUT_STATE] = config.server.send_timeout_s
            self.guard = guard
            self.config = config
            for route in old.routes:
                if id(route.credential) not in kept:
                    await route.credential.close()
            metrics.RELOADS.labels("ok").inc()
            logger.warning("configuration reloaded: routes %s", ", ".join(r.name for r in router.routes))

    async def reload_from_file(self) -> bool:
        if not self.config_path:
            return False
        try:
            config = with_server_overrides(load_config(self.config_path), self.server_overrides)
            await self.reload(config)
            return True
        except Exception as exc:
            metrics.RELOADS.labels("rejected").inc()
            logger.error("configuration reload rejected, keeping the running config: %s", exc)
            return False

    # Admin endpoints

    async def _healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, b'{"status":"ok"}', b"application/json")

    def readiness(self) -> dict[str, Any]:
        """Every route's credential state; refreshes this process's credential gauges on the way (the
        credentials also set them whenever their state changes)."""
        routes = []
        for route in self.router.routes:
            status = route.credential.publish()
            routes.append({"name": route.name, "path": route.prefix, **status.as_dict()})
        report: dict[str, Any] = {"ready": all(r["ready"] for r in routes), "routes": routes}
        secrets = self.assembly.vaults.status()
        if secrets:
            report["keyvault"] = secrets  # a failed poll: the last good value is in use
        keys = self.assembly.signing_keys
        if keys is not None:
            # Stale keys still check tokens (the last good ones): a detail, not a reason to be unready.
            entra_id = keys.status()
            metrics.SIGNING_KEYS_STALE.set(1 if entra_id["stale"] else 0)
            report["entra_id"] = entra_id
            report["ready"] = report["ready"] and entra_id["ready"]
        store = self.assembly.rate_store
        if store is not None and any(route.rate_limit is not None for route in self.router.routes):
            # A Redis store falling back still decides every request (locally): a detail, not unready.
            report["limits_store"] = store.status()
        return report

    async def _readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        report = self.readiness()
        await send_json(send, 200 if report["ready"] else 503, report)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.readiness()
        self.telemetry.flush()  # the requests counted since the last flush
        body, content_type = metrics.render()
        await send_bytes(send, 200, body, content_type.encode())


def app_from_env() -> GatewayApp:
    """uvicorn factory for multi-worker mode: each worker process builds its own app."""
    logs.configure(os.environ.get("GATEWAY_LOG_LEVEL", "info"), os.environ.get("GATEWAY_LOG_FORMAT", "text"))
    path = default_config_path()
    return GatewayApp(load_config(path), config_path=path)
