"""`auth.type: key` with `from_endpoint`: the endpoint's keys, fetched with ARM `listKeys`.

The two keys fill the slots of an ordinary `KeyCredential` (so failover works as for literal keys) and
are fetched again every `refresh_every_s`. When the upstream rejects both held keys, the credential's
`refetch` hook fetches them at once (single flight, at most once per `REFETCH_MIN_INTERVAL_S`) and the
proxy replays the request with the new key: a key regenerated in Azure reaches the gateway without a
failed request. Until the first fetch succeeds, requests wait for it (or get 503 while it backs off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import time
from typing import TypeGuard

from gateway import metrics
from gateway.backoff import Backoff
from gateway.config import IdentityConfig, KeyAuth
from gateway.credentials import BuildContext
from gateway.credentials.arm import ArmClient, arm_scope, check_arm_url, endpoint_url, shared_arm_client
from gateway.credentials.base import Credential, CredentialStatus, Grant
from gateway.credentials.identity import resolve_identity
from gateway.credentials.key import KeyCredential, KeySlot
from gateway.credentials.token import shared_token_cache
from gateway.errors import CredentialUnavailable, SecretError
from gateway.redaction import redact
from gateway.secrets import ManagedSecret
from gateway.tokens import TokenEntry, TokenFetchError

logger = logging.getLogger("gateway.credentials")

REFETCH_MIN_INTERVAL_S = 5.0
_SHARED_KEYS = "control_plane_keys"
_BAD_KEY = re.compile(r"[\x00-\x1f\x7f]")


class ControlPlaneKeys:
    """The primary and secondary key of one endpoint, kept fresh in the background."""

    def __init__(
        self,
        *,
        key: str,
        arm: ArmClient,
        url: str,
        endpoint: str,
        management: TokenEntry,
        refresh_every_s: float,
        registry: dict[str, ControlPlaneKeys] | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.key = key
        self.arm = arm
        self.url = url
        self.endpoint = endpoint
        self.management = management
        self.refresh_every_s = refresh_every_s
        self.description = f"listKeys of endpoint {endpoint} as {management.source.description}"
        self.primary = ManagedSecret(f"listKeys:{endpoint}:primary")
        self.secondary = ManagedSecret(f"listKeys:{endpoint}:secondary")
        self.deadline_s = management.source.deadline_s + 2 * arm.timeout_s + 1.0
        self.last_error: str | None = None
        self.last_hint = ""
        self.retry_at = 0.0
        self.fetched_at: float | None = None
        self.next_refresh = 0.0
        self.backoff = backoff or Backoff()
        self._registry = registry
        self._forced_at = -math.inf
        self._inflight: asyncio.Task[bool] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._users: dict[int, str] = {}  # owner id -> route
        self._active: set[int] = set()

    @property
    def loaded(self) -> bool:
        return self.primary.loaded and self.secondary.loaded

    @property
    def routes(self) -> str:
        return ", ".join(sorted(set(self._users.values()))) or "-"

    # ------------------------------------------------------------------ for the credential
    async def load(self) -> None:
        """Wait until keys are held: share the fetch in flight or start one; CredentialUnavailable if not."""
        if self.loaded:
            return
        task = self._inflight
        if task is None:
            wait = self.retry_at - time.monotonic()
            if wait > 0:
                raise self._unavailable(wait)
            task = self._start_fetch()
        try:
            await asyncio.shield(task)
        except TokenFetchError:
            raise self._unavailable(self.retry_at - time.monotonic()) from None

    async def refetch(self) -> bool:
        """KeyCredential's hook when every held key was rejected: True if the keys changed."""
        task = self._inflight
        if task is None:
            now = time.monotonic()
            if now - self._forced_at < REFETCH_MIN_INTERVAL_S:
                return False
            self._forced_at = now
            logger.warning(
                "route %s: the upstream rejected every held key of endpoint %s; fetching them again",
                self.routes,
                self.endpoint,
            )
            task = self._start_fetch()
        try:
            return await asyncio.shield(task)
        except TokenFetchError:
            return False

    def register(self, owner: object, route: str) -> None:
        self._users[id(owner)] = route

    def attach(self, owner: object, route: str) -> None:
        self.register(owner, route)
        self._active.add(id(owner))
        if self._refresher is None or self._refresher.done():
            self._wake = asyncio.Event()
            self._refresher = asyncio.get_running_loop().create_task(
                self._refresh_forever(), name=f"listKeys refresh {self.endpoint}"
            )

    async def detach(self, owner: object) -> None:
        self._users.pop(id(owner), None)
        self._active.discard(id(owner))
        if self._active:
            return
        task, self._refresher = self._refresher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not self._users and self._registry is not None and self._registry.get(self.key) is self:
            del self._registry[self.key]  # a later build starts afresh, with the cache's current entries

    # ------------------------------------------------------------------ fetching
    def _start_fetch(self) -> asyncio.Task[bool]:
        task = asyncio.get_running_loop().create_task(self._fetch())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._inflight = task
        return task

    async def _fetch(self) -> bool:
        try:
            try:
                data = await asyncio.wait_for(
                    self.arm.post(self.url, self.management, action="listKeys"), self.deadline_s
                )
            except TokenFetchError:
                raise
            except TimeoutError:
                raise TokenFetchError(f"ARM listKeys: no answer within {self.deadline_s:g} s") from None
            except Exception as exc:  # a surprise is a failed fetch, not a dead refresher
                raise TokenFetchError(f"ARM listKeys: unexpected {type(exc).__name__}: {exc}") from exc
            primary, secondary = data.get("primaryKey"), data.get("secondaryKey")
            if not _usable_key(primary) or not _usable_key(secondary):
                raise TokenFetchError("ARM listKeys: the answer lacks a usable primaryKey or secondaryKey")
        except TokenFetchError as exc:
            self._failed(exc)
            raise
        finally:
            self._inflight = None
        first = not self.loaded
        changed = self.primary.set(primary)
        changed = self.secondary.set(secondary) or changed
        self._succeeded(first, changed)
        return changed

    def _succeeded(self, first: bool, changed: bool) -> None:
        now = time.monotonic()
        recovered = self.last_error is not None
        self.fetched_at = now
        # Jitter only ever makes it earlier: the configured interval is a promise.
        self.next_refresh = now + self.refresh_every_s * random.uniform(0.9, 1.0)
        self.last_error = None
        self.last_hint = ""
        self.retry_at = 0.0
        self.backoff.reset()
        self._count("ok")
        if first:
            logger.info("route %s: fetched the keys of endpoint %s", self.routes, self.endpoint)
        elif changed:
            logger.warning(
                "route %s: the keys of endpoint %s changed in the control plane; using the new ones",
                self.routes,
                self.endpoint,
            )
        elif recovered:
            logger.warning(
                "route %s: fetching the keys of endpoint %s works again", self.routes, self.endpoint
            )
        self._poke()

    def _failed(self, error: TokenFetchError) -> None:
        delay = self.backoff.next_delay(error.retry_after)
        self.retry_at = time.monotonic() + delay
        self.last_error = redact(error.message)
        self.last_hint = error.hint
        self._count("error")
        hint = f" ({error.hint})" if error.hint else ""
        if self.loaded:
            logger.warning(
                "route %s: cannot refresh the keys of endpoint %s (%s): %s%s; keeping the keys held; "
                "next attempt in %.1f s",
                self.routes,
                self.endpoint,
                self.description,
                self.last_error,
                hint,
                delay,
            )
        else:
            logger.error(
                "route %s: cannot fetch the keys of endpoint %s (%s): %s%s; requests get 503 "
                "credential_unavailable until they are fetched; next attempt in %.1f s",
                self.routes,
                self.endpoint,
                self.description,
                self.last_error,
                hint,
                delay,
            )
        self._poke()

    def _count(self, result: str) -> None:
        for route in set(self._users.values()):
            metrics.CREDENTIAL_REFRESHES.labels(route, "key", result).inc()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _due(self) -> float:
        if self.retry_at:
            return self.retry_at
        return self.next_refresh if self.loaded else 0.0

    async def _refresh_forever(self) -> None:
        while True:
            try:
                delay = self._due() - time.monotonic()
                if delay > 0:
                    wake = self._wake
                    assert wake is not None
                    wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), delay)
                    continue
                task = self._inflight or self._start_fetch()
                with contextlib.suppress(TokenFetchError):
                    await asyncio.shield(task)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the refresher die
                logger.exception("route %s: listKeys refresher failed; continuing", self.routes)
                await asyncio.sleep(1.0)

    def _unavailable(self, wait_s: float) -> CredentialUnavailable:
        retry_after = max(1, math.ceil(wait_s))
        problem = self.detail() or "not fetched yet"
        return CredentialUnavailable(
            f"no keys for endpoint {self.endpoint} ({self.description}): {problem}; retry in {retry_after} s",
            retry_after=retry_after,
        )

    def detail(self) -> str | None:
        if self.last_error is None:
            return None
        return f"{self.last_error} ({self.last_hint})" if self.last_hint else self.last_error


def _usable_key(value: object) -> TypeGuard[str]:
    # Keys go into an Authorization header: no line breaks, NUL or surrounding space.
    return isinstance(value, str) and bool(value) and value == value.strip() and not _BAD_KEY.search(value)


class ControlPlaneKeyCredential(KeyCredential):
    """A KeyCredential whose slots are filled from the control plane."""

    def __init__(
        self, route: str, keys: ControlPlaneKeys, *, arm: ArmClient, recheck_after_s: float = 300.0
    ) -> None:
        super().__init__(
            route,
            [KeySlot("primary", keys.primary), KeySlot("secondary", keys.secondary)],
            recheck_after_s=recheck_after_s,
            refetch=keys.refetch,
            source=keys.description,
        )
        self.keys = keys
        self.arm = arm
        keys.register(self, route)
        keys.management.register(self, route, self.kind)

    def grant_nowait(self) -> Grant | None:  # type: ignore[override]
        try:
            return super().grant_nowait()
        except SecretError:  # nothing fetched yet
            return None

    async def grant(self) -> Grant:
        grant = self.grant_nowait()
        if grant is None:
            await self.keys.load()
            grant = super().grant_nowait()
        return grant

    async def start(self) -> None:
        self.arm.acquire(self)
        self.keys.management.attach(self, self.route, self.kind)
        self.keys.attach(self, self.route)

    async def close(self) -> None:
        await self.keys.detach(self)
        await self.keys.management.detach(self)
        await self.arm.release(self)

    def status(self) -> CredentialStatus:
        keys = self.keys
        if not keys.loaded:
            return CredentialStatus(
                kind=self.kind,
                ready=False,
                state="unavailable" if keys.last_error else "pending",
                source=keys.description,
                detail=keys.detail(),
            )
        status = super().status()
        detail = keys.detail()
        if detail:
            status.detail = f"refreshing the keys fails: {detail}"
        if keys.fetched_at is not None:
            status.extra["keys_fetched_s_ago"] = round(time.monotonic() - keys.fetched_at, 1)
        return status

    async def check(self) -> CredentialStatus:
        await self.grant()
        return self.status()


def build_control_plane_keys(route: str, auth: KeyAuth, ctx: BuildContext) -> Credential:
    assert auth.from_endpoint is not None
    where = f"routes.{route}.auth"
    arm_url = check_arm_url(auth.arm_url, f"{where}.arm_url", ctx)
    identity = resolve_identity(route, auth.identity or IdentityConfig.model_validate({}), ctx)
    management = shared_token_cache(ctx).entry(identity, arm_scope(arm_url))
    arm = shared_arm_client(ctx)
    url = endpoint_url(arm_url, auth.from_endpoint, "listKeys", auth.api_version)
    registry: dict[str, ControlPlaneKeys] = ctx.shared.setdefault(_SHARED_KEYS, {})
    key = f"{url}|{identity.key}"
    keys = registry.get(key)
    if keys is None:
        keys = registry[key] = ControlPlaneKeys(
            key=key,
            arm=arm,
            url=url,
            endpoint=auth.from_endpoint.name,
            management=management,
            refresh_every_s=auth.refresh_every_s,
            registry=registry,
        )
    return ControlPlaneKeyCredential(route, keys, arm=arm, recheck_after_s=auth.recheck_after_s)
