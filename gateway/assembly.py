"""The one factory: everything a configuration needs, built in one place with one set of settings.

Per process, from the configuration it started with: TLS trust (`tls.ca_bundle`), the egress policy
(with `egress.proxy_auth`), the Azure REST helper, the token cache, Key Vault (its identity, the secrets
and a poll loop per vault), the MSAL identities and the upstream client. Per configuration (start-up
and every reload): its secrets, credentials and router, built with those. `gateway serve` (the app and
its TLS listener), a reload, `gateway check` and `gateway rotate` all build through an `Assembly`;
nothing else makes a `BuildContext`, a credential or a secret source.

Building a configuration is two steps. `prepare` reads, with `await`, every Key Vault secret it names
that is not held yet (concurrently, each read bounded by `keyvault.timeout_s`); then `build_router`
builds without any network I/O, so a reload never blocks the event loop, and a secret that could not be
read rejects the configuration with a ConfigError naming the vault, the secret and where it is used.
`commit` then makes exactly the secrets of the running configuration the polled ones.

Callers (`inbound`, `routes.NAME.callers`): `prepare_callers` reads Entra ID's signing keys when
`inbound.entra_id` is new or changed (a failure is a ConfigError naming the URL; unchanged settings keep
the running keys), `build_inbound` makes the inbound stage without I/O, `build_router` gives each route
its access rules, and `commit` makes the prepared keys the running ones (refreshed in the background
once the assembly is started; keys a reload replaced stop refreshing).

Admission (`routes.NAME.limits`, `inbound.limits`, `limits_store`): `build_router` gives each route its
concurrency limit and its per-caller rate check. The rate counters live in one store per process, built
for `limits_store` and kept across reloads that leave `limits_store` as it was (quotas carry on); a
route's concurrency limit is kept across a reload that leaves its `max_concurrent`, `min`, `max`, `queue`
and `queue_timeout_s` (and, for `auto`, `max_connections`) as they were, so requests in flight and the
adaptive limit's learning carry on too. The store starts with the assembly and is closed with it (a
reload that changes `limits_store` closes the old one once the new configuration runs).

Upstream connection pools (`routes.NAME.max_connections`): one per route and upstream origin, so each
route's limit holds for its own requests even when routes share an origin. A reload keeps a route's pool
(and its open connections) when the route still reaches that origin with the same `max_connections`; the
pools it does not keep are retired once the new configuration runs (`retire_pools`).

Settings only a restart changes (`tls`, `egress`, `server`, `keyvault` but its interval) are those the
assembly was made with: a reloaded configuration is read with them (`_effective`), so the certificate
of the listener and the proxy's credentials stay polled whatever the reloaded file says.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel

from gateway.adaptive import AdaptiveLimit
from gateway.azure_rest import AzureRest, Pause
from gateway.caller_tokens import CallerTokenValidator
from gateway.callers import CallerFactory, RouteAccess
from gateway.client import Origin, UpstreamClient
from gateway.concurrency import ConcurrencyLimit
from gateway.config import (
    EntraIdConfig,
    GatewayConfig,
    IdentityConfig,
    KeyVaultRef,
    LimitsStoreConfig,
    RouteConfig,
    SecretSpec,
)
from gateway.credentials import BuildContext, Credential, build_credential, resolve_secret
from gateway.credentials.identity import MsalSource, resolve_identity
from gateway.credentials.key import KeyCredential
from gateway.credentials.probe import KeyProbe, probe_url_for
from gateway.egress import build_egress
from gateway.errors import ConfigError
from gateway.inbound import Inbound, needs_inbound
from gateway.keyvault import KeyVaultClient, KeyVaults
from gateway.ratelimit import RateLimits, RateStore, build_rate_store
from gateway.retry import ReplayPolicy
from gateway.routing import Route, Router
from gateway.secrets import Secret
from gateway.signing_keys import EntraSigningKeys
from gateway.tls import client_context
from gateway.tokens import TokenCache
from gateway.upstreams import Upstream

logger = logging.getLogger("gateway.config")

T = TypeVar("T")
CredentialKey = tuple[str, object]
PoolKey = tuple[str, str, int]  # route, scheme://host:port, max_connections
ConcurrencyKey = tuple[object, ...]


def keyvault_refs(config: GatewayConfig) -> Iterator[tuple[str, KeyVaultRef]]:
    """Every `{keyvault: ...}` secret of `config` with its key path (e.g. `routes.iris.auth.primary`)."""

    def walk(value: Any, path: str) -> Iterator[tuple[str, KeyVaultRef]]:
        if isinstance(value, KeyVaultRef):
            yield path, value
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                yield from walk(getattr(value, name), f"{path}.{name}" if path else name)
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from walk(item, f"{path}.{key}")
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                yield from walk(item, f"{path}.{index}")

    yield from walk(config, "")


def credential_key(name: str, route: RouteConfig) -> CredentialKey:
    # Config models are frozen and hashable; SecretStr hashes by value, so a changed secret is a new key.
    return (name, route.auth)


def concurrency_key(route: RouteConfig) -> ConcurrencyKey | None:
    """What a route's concurrency limit is made of (None: the route has none); a reload that keeps it
    keeps the running limit."""
    limits = route.limits
    if limits.max_concurrent is None:
        return None
    if limits.max_concurrent == "auto":
        bounds: tuple[object, ...] = (limits.min or 1, limits.max or route.max_connections)
    else:
        bounds = (limits.max_concurrent,)
    return (limits.max_concurrent, *bounds, limits.queue, limits.queue_timeout_s)


def build_concurrency(name: str, key: ConcurrencyKey, route: RouteConfig) -> ConcurrencyLimit:
    limits = route.limits
    limit: int | AdaptiveLimit
    if limits.max_concurrent == "auto":
        _, low, high, *_ = key
        assert isinstance(low, int) and isinstance(high, int)
        limit = AdaptiveLimit(name, min_limit=low, max_limit=high)
    else:
        assert isinstance(limits.max_concurrent, int)
        limit = limits.max_concurrent
    return ConcurrencyLimit(name, limit=limit, queue=limits.queue, queue_timeout_s=limits.queue_timeout_s)


class Assembly:
    """The process's shared parts for one set of settings, and the factory of configurations built on
    them. Make one with `create` (in a running loop) or `create_now` (synchronous start-up code)."""

    def __init__(
        self,
        config: GatewayConfig,
        source: str,
        *,
        warn_literals: bool = True,
        tokens: TokenCache | None = None,
        pause: Pause = asyncio.sleep,
    ) -> None:
        self.source = source
        self.started = config  # restart-only settings come from here
        self.ssl_context = client_context(config.tls.ca_bundle)
        self.egress = build_egress(config.egress, source)
        self.rest = AzureRest(self.ssl_context, self.egress, pause=pause)
        self.vaults = KeyVaults(config.keyvault, source, self._keyvault_client)
        self.ctx = BuildContext(
            ssl_context=self.ssl_context,
            egress=self.egress,
            rest=self.rest,
            tokens=TokenCache() if tokens is None else tokens,
            vaults=self.vaults,
            source=source,
            warn_literals=warn_literals,
        )
        self._client: UpstreamClient | None = None
        # Entra ID's signing keys: those of the running configuration, and those `prepare_callers` read
        # for the configuration being built (the same object when `inbound.entra_id` is unchanged).
        self.signing_keys: EntraSigningKeys | None = None
        self._prepared_keys: EntraSigningKeys | None = None
        # The per-caller rate counters of the running configuration (None until one limits a caller),
        # and the store `build_router` made for a configuration not committed yet.
        self.rate_store: RateStore | None = None
        self._store_config: LimitsStoreConfig | None = None
        self._prepared_store: tuple[LimitsStoreConfig | None, RateStore] | None = None
        self._started = False
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ making one
    @classmethod
    async def create(
        cls,
        config: GatewayConfig,
        source: str,
        *,
        only: Callable[[str], bool] | None = None,
        callers: bool = False,
        **options: Any,
    ) -> Assembly:
        """An assembly for `config` with its Key Vault secrets read (those whose key path `only` accepts)
        and `egress.proxy_auth` in place; with `callers`, Entra ID's signing keys read too (see
        `prepare_callers`). ConfigError if the settings are unusable."""
        assembly = cls(config, source, **options)
        proxy_auth = config.egress.proxy_auth
        # Key Vault is reached with the proxy's credentials, unless they are in Key Vault themselves: then
        # they are read without (list the vault in no_proxy, or let the proxy pass it unauthenticated).
        if proxy_auth is not None and not isinstance(proxy_auth, KeyVaultRef):
            assembly._authenticate_egress(proxy_auth)
        await assembly.prepare(config, only=only)
        if isinstance(proxy_auth, KeyVaultRef):
            assembly._authenticate_egress(proxy_auth)
        if callers:
            await assembly.prepare_callers(config)
        return assembly

    @classmethod
    def create_now(cls, config: GatewayConfig, source: str, **options: Any) -> Assembly:
        """`create` from synchronous code at start-up, before anything is served, with the signing keys of
        `inbound.entra_id` read (the app's constructor:
        `gateway serve` builds it before its loop runs, a uvicorn worker inside its loop before it serves).
        Never used for a reload, which awaits `prepare` on the serving loop."""

        async def create() -> Assembly:
            assembly = await cls.create(config, source, callers=True, **options)
            await assembly.rest.close()  # its client belongs to this short-lived loop
            return assembly

        return _run_to_completion(create())

    def _authenticate_egress(self, spec: SecretSpec) -> None:
        secret = self.secret(spec, "egress.proxy_auth", header=True)
        self.egress.authenticate(secret, f"{self.source}: egress.proxy_auth")

    def _effective(self, config: GatewayConfig) -> GatewayConfig:
        """`config` as the running process applies it: restart-only sections as they were at start-up."""
        started = self.started
        return config.model_copy(
            update={
                "server": started.server,
                "tls": started.tls,
                "egress": started.egress,
                "keyvault": started.keyvault.model_copy(
                    update={"refresh_every_s": config.keyvault.refresh_every_s}
                ),
            }
        )

    def _keyvault_client(self) -> KeyVaultClient:
        config = self.started.keyvault
        identity = resolve_identity(
            "<keyvault>",
            config.identity or IdentityConfig.model_validate({}),
            self.ctx,
            where="keyvault.identity",
        )
        token = self.ctx.tokens.entry(identity, config.scope)
        token.register(self.vaults, "keyvault", "keyvault")  # token log lines and metrics say what it is for
        return KeyVaultClient(config, token, self.rest)

    # ------------------------------------------------------------------ building a configuration
    async def prepare(self, config: GatewayConfig, *, only: Callable[[str], bool] | None = None) -> None:
        """Read the Key Vault secrets `config` names and the process does not hold yet (awaited,
        concurrently). A secret that cannot be read is reported by the build, where it is used."""
        refs = []
        for path, ref in keyvault_refs(self._effective(config)):
            if path.startswith("keyvault."):
                raise ConfigError(
                    f"{self.source}: {path}: the identity that reads Key Vault cannot come from it"
                )
            if only is None or only(path):
                refs.append(ref)
        await self.vaults.load(refs)

    async def prepare_callers(self, config: GatewayConfig) -> None:
        """Read Entra ID's signing keys for `config.inbound.entra_id` unless the running configuration
        reads them from the same authority and tenants (its keys, kept fresh, serve on). ConfigError naming
        the URL of a read that failed; the running configuration's keys are left as they are."""
        entra = config.inbound.entra_id
        running = self.signing_keys
        if entra is None:
            self._prepared_keys = None
        elif running is not None and _key_source(running.config) == _key_source(entra):
            self._prepared_keys = running
        else:
            keys = EntraSigningKeys(entra, self.rest.http, source=self.source)
            await keys.start()
            self._prepared_keys = keys

    def build_inbound(self, config: GatewayConfig) -> Inbound | None:
        """The inbound stage of `config` (None when it has none: every caller is `anonymous`), without I/O:
        `prepare_callers` read the signing keys."""
        if not needs_inbound(config):
            return None
        callers = CallerFactory(config)
        entra = config.inbound.entra_id
        tokens = None
        if entra is not None:
            keys = self._prepared_keys
            if keys is None or _key_source(keys.config) != _key_source(entra):
                raise RuntimeError("prepare_callers must read the signing keys before build_inbound")
            tokens = CallerTokenValidator(entra, keys, callers)
        return Inbound(config, callers, tokens)

    def secret(self, spec: SecretSpec, where: str, *, header: bool = False) -> Secret:
        """The secret `spec` names (a Key Vault one must have been read by `prepare`)."""
        return resolve_secret(spec, where, self.ctx, header=header)

    def credential(self, route: str, config: RouteConfig) -> Credential:
        return build_credential(route, config.auth, self.ctx)

    def identity(self, route: str, config: IdentityConfig | None) -> MsalSource:
        return resolve_identity(route, config or IdentityConfig.model_validate({}), self.ctx)

    def keyvault_client(self) -> KeyVaultClient:
        return self.vaults.client()

    @property
    def client(self) -> UpstreamClient:
        """The upstream client: the same TLS trust and egress policy."""
        if self._client is None:
            self._client = UpstreamClient(self.ssl_context, self.egress)
        return self._client

    def rate_limits(self, config: GatewayConfig) -> RateLimits | None:
        """The per-caller quotas of `config` over the process's store (None when no caller is limited):
        the running store when `limits_store` is unchanged, else one made for it (running once
        `commit(config)` runs)."""
        inbound = config.inbound.limits
        if not (inbound.limits_callers or any(r.limits.limits_callers for r in config.routes.values())):
            return None
        wanted = config.limits_store
        store = self.rate_store
        if store is None or wanted != self._store_config:
            prepared = self._prepared_store
            if prepared is not None and prepared[0] == wanted:
                store = prepared[1]
            else:
                store = build_rate_store(wanted, self.ctx)
                self._prepared_store = (wanted, store)
        return RateLimits(store, inbound)

    def build_router(self, config: GatewayConfig, running: Router | None = None) -> Router:
        """Routes with their credentials and admission, without network I/O (`prepare` read the Key
        Vault secrets). From the `running` router, credentials whose auth config is unchanged and
        concurrency limits whose settings are unchanged are reused as they are."""
        reuse: dict[CredentialKey, Credential] = {}
        limits_in_use: dict[tuple[str, ConcurrencyKey], ConcurrencyLimit] = {}
        pools: dict[PoolKey, Origin] = {}
        if running is not None:
            for old in running.routes:
                reuse[old.credential_key] = old.credential
                for upstream in old.upstreams:
                    pools[old.name, upstream.origin, upstream.pool.max_connections] = upstream.pool
                if old.concurrency is not None and old.concurrency_key is not None:
                    limits_in_use[old.name, old.concurrency_key] = old.concurrency
        self._prepared_store = None
        rates = self.rate_limits(config)
        routes: list[Route] = []
        for name, rc in config.routes.items():
            key = credential_key(name, rc)
            credential = reuse.get(key) or self.credential(name, rc)
            if isinstance(credential, KeyCredential):
                # Set on reused credentials too: the upstream may have changed while the auth did not.
                preferred = min(rc.upstream_list(), key=lambda u: u.priority).url
                credential.probe = KeyProbe(
                    probe_url_for(preferred, getattr(rc.auth, "probe_path", None)),
                    ssl_context=self.ssl_context,
                    egress=self.egress,
                    rejection_statuses=credential.rejection_statuses,
                )
            headers: list[tuple[bytes, bytes | Secret]] = []
            for header, spec in rc.headers.items():
                value: bytes | Secret = (
                    spec.encode("latin-1")
                    if isinstance(spec, str)
                    else self.secret(spec, f"routes.{name}.headers.{header}", header=True)
                )
                headers.append((header.encode("latin-1"), value))
            limit_key = concurrency_key(rc)
            concurrency = None
            if limit_key is not None:
                concurrency = limits_in_use.get((name, limit_key)) or build_concurrency(name, limit_key, rc)
            routes.append(
                Route(
                    name=name,
                    prefix=rc.path,
                    upstreams=[
                        Upstream(
                            u.url,
                            self._pool(pools, name, u.url, rc.max_connections),
                            priority=u.priority,
                            weight=u.weight,
                        )
                        for u in rc.upstream_list()
                    ],
                    credential=credential,
                    headers=headers,
                    timeout_s=rc.timeout_s,
                    connect_timeout_s=rc.connect_timeout_s,
                    read_timeout_s=rc.read_timeout_s or rc.timeout_s,
                    write_timeout_s=rc.write_timeout_s,
                    pool_timeout_s=rc.pool_timeout_s,
                    max_body_bytes=config.max_body_bytes(rc),
                    replay_buffer_bytes=config.replay_buffer_bytes(rc),
                    replay=ReplayPolicy.from_config(rc.retry),
                    outlier_failures=rc.outlier.consecutive_failures,
                    ejection_s=rc.outlier.ejection_s,
                    probe_timeout_s=rc.outlier.probe_timeout_s,
                    credential_key=key,
                    access=None if rc.callers is None else RouteAccess(name, rc.callers),
                    rate_limit=None if rates is None else rates.route(name, rc.limits),
                    concurrency=concurrency,
                    concurrency_key=limit_key,
                )
            )
        return Router(routes)

    def _pool(self, pools: dict[PoolKey, Origin], route: str, url: str, max_connections: int) -> Origin:
        """Route `route`'s pool for `url`'s origin: the running one when the limit is unchanged, else a
        new one (upstreams of one route on one origin share it: the route's limit counts them together)."""
        parts = urlsplit(url)
        key = (route, f"{parts.scheme}://{parts.netloc}", max_connections)
        pool = pools.get(key)
        if pool is None:
            pool = pools[key] = self.client.origin(url, max_connections=max_connections)
        return pool

    def retire_pools(self, old: Router, new: Router) -> None:
        """`new` runs instead of `old`: the pools of `old` that `new` does not use are retired (their idle
        connections closed now, their busy ones when their requests are done)."""
        kept = {id(upstream.pool) for route in new.routes for upstream in route.upstreams}
        for route in old.routes:
            for upstream in route.upstreams:
                if id(upstream.pool) not in kept:
                    self.client.retire(upstream.pool)

    def commit(self, config: GatewayConfig) -> None:
        """`config` is the running one: its Key Vault settings apply, its secrets are the polled ones
        (new ones start being polled, those it no longer names stop)."""
        uses: dict[tuple[str, str], list[str]] = {}
        for path, ref in keyvault_refs(self._effective(config)):
            uses.setdefault((ref.keyvault.vault, ref.keyvault.secret), []).append(path)
        self.vaults.configure(config.keyvault)
        self.vaults.commit(uses)
        self._commit_signing_keys()
        self._commit_rate_store()

    def _commit_rate_store(self) -> None:
        """The store `build_router` made is the running one; the store it replaces is closed."""
        prepared, self._prepared_store = self._prepared_store, None
        if prepared is None or prepared[1] is self.rate_store:
            return
        old = self.rate_store
        self._store_config, self.rate_store = prepared
        if self._started:
            self._background(self.rate_store.start())
        if old is not None:
            # Requests admitted through it have had their answer from it: nothing waits on it any more.
            self._background(old.aclose())

    def _commit_signing_keys(self) -> None:
        """The prepared signing keys are the running ones; keys they replace stop being refreshed."""
        keys, old = self._prepared_keys, self.signing_keys
        if keys is old:
            return
        self.signing_keys = keys
        if keys is not None:
            self.rest.acquire(keys)  # the client for Azure stays open while the keys are read with it
            if self._started:
                keys.start_refreshing()
        if old is not None:
            old.stop()
            self._background(self.rest.release(old))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        """Background work of the shared parts (Key Vault polls, the signing keys' refresh). Needs the
        serving loop."""
        self._started = True
        self.vaults.start()
        if self.signing_keys is not None:
            self.signing_keys.start_refreshing()
        if self.rate_store is not None:
            self._background(self.rate_store.start())

    async def close(self) -> None:
        keys, self.signing_keys = self.signing_keys, None
        if keys is not None:
            await keys.aclose()
            await self.rest.release(keys)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        store, self.rate_store = self.rate_store, None
        if store is not None:
            await store.aclose()
        await self.vaults.stop()
        if self._client is not None:
            await self._client.close()
        await self.rest.close()


def _key_source(config: EntraIdConfig) -> tuple[str, tuple[str, ...]]:
    """What decides which signing keys are read: the authority and the tenants (not the audiences or the
    clock skew, which a reload changes without reading the keys again)."""
    return config.authority, config.tenants()


def _run_to_completion(call: Coroutine[Any, Any, T]) -> T:
    """Run `call` on an event loop of its own: this thread's when none runs here, else a helper thread's
    (a uvicorn worker builds its app inside its loop, before it serves anything)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(call)
    outcome: list[tuple[bool, Any]] = []

    def target() -> None:
        try:
            outcome.append((True, asyncio.run(call)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name="gateway-start-up", daemon=True)
    thread.start()
    thread.join()
    ok, result = outcome[0]
    if not ok:
        raise result
    return result  # type: ignore[no-any-return]
