"""`auth.type: key` with `from_endpoint`: the endpoint's keys, fetched with ARM `listKeys`.

The two keys fill the slots of an ordinary `KeyCredential` (so failover works as for literal keys) and
are fetched again every `refresh_every_s`. When the upstream rejects both held keys, the credential's
`refetch` hook fetches them at once (single flight, at most once per `REFETCH_MIN_INTERVAL_S`) and the
proxy replays the request with the new key: a key regenerated in Azure reaches the gateway without a
failed request. Until the first fetch succeeds, requests wait for it (or get 503 while it backs off).
"""

from __future__ import annotations

import logging
import random
import time
from typing import TypeGuard

from gateway.azure_rest import AzureRest
from gateway.backoff import Backoff
from gateway.config import IdentityConfig, KeyAuth
from gateway.credentials import BuildContext
from gateway.credentials.arm import arm_post, arm_scope, check_arm_url, endpoint_url
from gateway.credentials.base import DEFAULT_REJECTION, Credential, CredentialStatus, Grant, RejectionPolicy
from gateway.credentials.identity import resolve_identity
from gateway.credentials.key import KeyCredential, KeySlot
from gateway.errors import SecretError
from gateway.secrets import ManagedSecret, check_header_value
from gateway.tokens import RefreshingEntry, TokenEntry, TokenFetchError, within_deadline

logger = logging.getLogger("gateway.credentials")

REFETCH_MIN_INTERVAL_S = 5.0
_SHARED_KEYS = "control_plane_keys"


class ControlPlaneKeys(RefreshingEntry[bool]):
    """The primary and secondary key of one endpoint, kept fresh in the background. A fetch returns
    whether the keys changed."""

    def __init__(
        self,
        *,
        key: str,
        arm: AzureRest,
        url: str,
        endpoint: str,
        management: TokenEntry,
        refresh_every_s: float,
        registry: dict[str, ControlPlaneKeys] | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__(name=f"listKeys refresh {endpoint}", backoff=backoff or Backoff())
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
        self.fetched_at: float | None = None
        self.next_refresh = 0.0
        self._registry = registry

    @property
    def loaded(self) -> bool:
        return self.primary.loaded and self.secondary.loaded

    # ------------------------------------------------------------------ for the credential
    async def load(self) -> None:
        """Wait until keys are held: share the fetch in flight or start one; CredentialUnavailable if not."""
        if not self.loaded:
            await self._fetch_shared()

    async def refetch(self) -> bool:
        """KeyCredential's hook when every held key was rejected: True if the keys changed."""
        return await self._fetch_forced(REFETCH_MIN_INTERVAL_S, self._log_refetch) is True

    def _log_refetch(self) -> None:
        logger.warning(
            "route %s: the upstream rejected every held key of endpoint %s; fetching them again",
            self.routes,
            self.endpoint,
        )

    # ------------------------------------------------------------------ the refresher's hooks
    def _next_refresh(self) -> float:
        return self.next_refresh if self.loaded else 0.0

    def _unused(self) -> None:
        if self._registry is not None and self._registry.get(self.key) is self:
            del self._registry[self.key]  # a later build starts afresh, with the cache's current entries

    def _log_refresher_failed(self) -> None:
        logger.exception("route %s: listKeys refresher failed; continuing", self.routes)

    # ------------------------------------------------------------------ fetching
    async def _fetch_once(self) -> bool:
        data = await within_deadline(
            arm_post(self.arm, self.url, self.management, action="listKeys"),
            self.deadline_s,
            awaited="answer",
            prefix="ARM listKeys: ",
        )
        primary, secondary = data.get("primaryKey"), data.get("secondaryKey")
        if not _usable_key(primary) or not _usable_key(secondary):
            raise TokenFetchError("ARM listKeys: the answer lacks a usable primaryKey or secondaryKey")
        first = not self.loaded
        changed = self.primary.set(primary)
        changed = self.secondary.set(secondary) or changed
        now = time.monotonic()
        self.fetched_at = now
        # Jitter only ever makes it earlier: the configured interval is a promise.
        self.next_refresh = now + self.refresh_every_s * random.uniform(0.9, 1.0)
        recovered = self._succeeded()
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
        return changed

    def _log_failed(self, delay: float, hint: str) -> None:
        args = (self.routes, self.endpoint, self.description, self.last_error, hint, delay)
        if self.loaded:
            logger.warning(
                "route %s: cannot refresh the keys of endpoint %s (%s): %s%s; keeping the keys held; "
                "next attempt in %.1f s",
                *args,
            )
        else:
            logger.error(
                "route %s: cannot fetch the keys of endpoint %s (%s): %s%s; requests get 503 "
                "credential_unavailable until they are fetched; next attempt in %.1f s",
                *args,
            )

    def _missing(self) -> str:
        problem = self.detail() or "not fetched yet"
        return f"no keys for endpoint {self.endpoint} ({self.description}): {problem}"


def _usable_key(value: object) -> TypeGuard[str]:
    if not isinstance(value, str) or not value:
        return False
    try:
        check_header_value(value, "the key")  # keys go into an Authorization header
    except SecretError:
        return False
    return True


class ControlPlaneKeyCredential(KeyCredential):
    """A KeyCredential whose slots are filled from the control plane."""

    def __init__(
        self,
        route: str,
        keys: ControlPlaneKeys,
        *,
        arm: AzureRest,
        recheck_after_s: float = 300.0,
        rejection: RejectionPolicy = DEFAULT_REJECTION,
    ) -> None:
        super().__init__(
            route,
            [KeySlot("primary", keys.primary), KeySlot("secondary", keys.secondary)],
            recheck_after_s=recheck_after_s,
            refetch=keys.refetch,
            source=keys.description,
            rejection=rejection,
        )
        self.keys = keys
        self.arm = arm
        keys.register(self, route, self.kind)
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
        self.keys.attach(self, self.route, self.kind)

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
    management = ctx.tokens.entry(identity, arm_scope(arm_url))
    arm = ctx.rest
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
    return ControlPlaneKeyCredential(
        route, keys, arm=arm, recheck_after_s=auth.recheck_after_s, rejection=RejectionPolicy.of(auth)
    )
