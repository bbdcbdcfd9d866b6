"""`auth.type: aml_token`: an Azure ML endpoint token from ARM's `.../onlineEndpoints/{name}/token` action.

The call needs a management token of the route's identity; both tokens live in the one token cache, so
the endpoint token is refreshed at ARM's `refreshAfterTimeUtc` and the management token on its own
schedule, each with single flight and backoff.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from gateway.azure_rest import AzureRest, clean_message
from gateway.config import AmlTokenAuth
from gateway.credentials import BuildContext
from gateway.credentials.arm import arm_post, arm_scope, check_arm_url, endpoint_url
from gateway.credentials.base import DEFAULT_REJECTION, Credential, RejectionPolicy
from gateway.credentials.identity import resolve_identity
from gateway.credentials.token import TokenCredential
from gateway.tokens import AccessToken, TokenEntry, TokenFetchError, TokenSource

AML_SCOPE = "aml_token"  # the cache key's scope part for endpoint tokens


class AmlTokenSource(TokenSource):
    """Endpoint tokens of one online endpoint, obtained with one identity's management token."""

    def __init__(self, *, arm: AzureRest, url: str, endpoint: str, management: TokenEntry) -> None:
        self.arm = arm
        self.url = url
        self.endpoint = endpoint
        self.management = management
        self.key = f"aml|{url}|{management.source.key}"
        self.description = f"ARM token action of endpoint {endpoint} as {management.source.description}"
        # The management token may have to be fetched first, and a 401 from ARM costs one more round.
        self.deadline_s = management.source.deadline_s + 2 * arm.timeout_s + 1.0

    async def fetch(self, scope: str) -> AccessToken:
        data = await arm_post(self.arm, self.url, self.management, action="token")
        token = data.get("accessToken")
        if not isinstance(token, str) or not token:
            raise TokenFetchError("ARM token: the answer has no accessToken")
        expires_at = _unix_seconds(data, "expiryTimeUtc")
        if expires_at is None:
            raise TokenFetchError("ARM token: the answer has no expiryTimeUtc")
        return AccessToken(
            value=token, expires_at=expires_at, refresh_after=_unix_seconds(data, "refreshAfterTimeUtc")
        )


def _unix_seconds(data: dict[str, Any], name: str) -> float | None:
    """ARM sends Unix seconds; a numeric string or an ISO 8601 time is accepted as well. None when
    absent; TokenFetchError for anything that is not a finite time (`nan`, `inf`, garbage)."""
    value = data.get(name)
    if value is None or value == "":
        return None
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                seconds = None
            else:
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=dt.UTC)
                seconds = parsed.timestamp()
    if seconds is None or not math.isfinite(seconds):
        raise TokenFetchError(f"ARM token: {name} {clean_message(repr(value), 60)} is not a finite Unix time")
    return seconds


class AmlTokenCredential(TokenCredential):
    kind = "aml_token"

    def __init__(
        self,
        route: str,
        entry: TokenEntry,
        *,
        source: str,
        management: TokenEntry,
        arm: AzureRest,
        rejection: RejectionPolicy = DEFAULT_REJECTION,
    ) -> None:
        super().__init__(route, entry, source=source, dependencies=[management], rejection=rejection)
        self.arm = arm

    async def start(self) -> None:
        self.arm.acquire(self)
        await super().start()

    async def close(self) -> None:
        await super().close()
        await self.arm.release(self)


def build_aml_credential(route: str, auth: AmlTokenAuth, ctx: BuildContext) -> Credential:
    arm_url = check_arm_url(auth.arm_url, f"routes.{route}.auth.arm_url", ctx)
    identity = resolve_identity(route, auth.identity, ctx)
    cache = ctx.tokens
    arm = ctx.rest
    management = cache.entry(identity, arm_scope(arm_url))
    url = endpoint_url(arm_url, auth.endpoint, "token", auth.api_version)
    # Routes on the same endpoint and identity get the same cache entry (and so the source made first).
    source = AmlTokenSource(arm=arm, url=url, endpoint=auth.endpoint.name, management=management)
    entry = cache.entry(source, AML_SCOPE)
    return AmlTokenCredential(
        route,
        entry,
        source=f"ARM token for endpoint {auth.endpoint.name} as {identity.description}",
        management=management,
        arm=arm,
        rejection=RejectionPolicy.of(auth),
    )
