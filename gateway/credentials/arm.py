"""Azure Resource Manager calls on an online endpoint (`token`, `listKeys`) with a management token.

One `httpx.AsyncClient` per process (shared through `BuildContext.shared`), built by
`Egress.httpx_async_client`: the gateway's TLS context and egress policy, never CA variables from the
environment. A 401 from ARM makes the management token be fetched again once (through the token cache,
single flight); other failures become `TokenFetchError`s that say what to fix.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from gateway.config import EndpointRef
from gateway.credentials import BuildContext
from gateway.credentials.base import Grant
from gateway.credentials.identity import transport_error
from gateway.egress import Egress
from gateway.errors import ConfigError, CredentialUnavailable
from gateway.tokens import TokenEntry, TokenFetchError

ARM_SCOPE = "https://management.azure.com/.default"
ARM_TIMEOUT_S = 30.0
_SHARED_ARM = "arm_client"
# Actions the endpoint's identity needs, by ARM operation (for the 403 hint).
_PERMISSIONS = {
    "token": "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/token/action",
    "listKeys": "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/listKeys/action",
}


def arm_scope(arm_url: str) -> str:
    """The management audience: the sovereign clouds' `management.*` hosts are their own audience;
    anything else (a private stand-in) is taken to accept the public cloud's."""
    host = urlsplit(arm_url).hostname or ""
    if host.startswith("management.") and host != "management.azure.com":
        return f"https://{host}/.default"
    return ARM_SCOPE


def check_arm_url(arm_url: str, where: str, ctx: BuildContext) -> str:
    parts = urlsplit(arm_url)
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(
            f"{ctx.source}: {where}: must be an https:// URL such as https://management.azure.com "
            f"(it receives a management token); got {arm_url!r}"
        )
    return arm_url.rstrip("/")


def endpoint_url(arm_url: str, endpoint: EndpointRef, action: str, api_version: str) -> str:
    path = "/".join(
        [
            "subscriptions",
            quote(endpoint.subscription_id, safe=""),
            "resourceGroups",
            quote(endpoint.resource_group, safe=""),
            "providers/Microsoft.MachineLearningServices/workspaces",
            quote(endpoint.workspace, safe=""),
            "onlineEndpoints",
            quote(endpoint.name, safe=""),
            action,
        ]
    )
    return f"{arm_url}/{path}?api-version={quote(api_version, safe='')}"


class ArmClient:
    """POSTs to ARM. The httpx client is opened on first use in the running loop and closed when the
    last user releases it."""

    def __init__(self, ssl_context: ssl.SSLContext, egress: Egress, timeout_s: float = ARM_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._ssl_context = ssl_context
        self._egress = egress
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._users: set[int] = set()

    def acquire(self, owner: object) -> None:
        self._users.add(id(owner))

    async def release(self, owner: object) -> None:
        self._users.discard(id(owner))
        if not self._users and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def http_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # An AsyncClient's pool belongs to one event loop (tests and `gateway check` run several).
            self._client = self._egress.httpx_async_client(
                self._ssl_context, httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s))
            )
            self._loop = loop
        return self._client

    async def post(self, url: str, management: TokenEntry, *, action: str) -> dict[str, Any]:
        """POST `url` with the management token; the JSON object answered, or TokenFetchError."""
        origin_url = origin_of(url)
        grant: Grant | None = management.peek()
        if grant is None:
            try:
                grant = await management.get()
            except CredentialUnavailable as exc:
                raise TokenFetchError(
                    f"no management token for ARM: {exc.message}", retry_after=exc.retry_after
                ) from None
        for attempt in (1, 2):
            assert grant.header is not None
            try:
                response = await self.http_client().post(
                    url, headers={"Authorization": grant.header, "Accept": "application/json"}
                )
            except httpx.TimeoutException:
                raise TokenFetchError(
                    f"ARM {action}: {origin_url} did not answer within {self.timeout_s:g} s",
                    hint="check network access to the ARM endpoint",
                ) from None
            except httpx.HTTPError as exc:
                raise transport_error(f"ARM ({origin_url})", exc) from None
            if response.status_code == 401 and attempt == 1:
                replacement = await management.reject(grant, verdict=False)
                if replacement is not None:
                    grant = replacement
                    continue
            break
        if response.status_code != 200:
            raise _arm_error(action, response, management)
        management.accept(grant)
        try:
            data = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):
            raise TokenFetchError(f"ARM {action}: the answer is not a JSON object")
        return data


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of a URL: what messages name (never a path, a query or credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def azure_error(response: httpx.Response) -> tuple[str, str]:
    """(code, message) of an Azure REST error body `{"error": {"code", "message"}}`; empty when absent."""
    try:
        error = response.json().get("error") or {}
        return str(error.get("code") or ""), str(error.get("message") or "")
    except (ValueError, AttributeError):
        return "", ""


def _arm_error(action: str, response: httpx.Response, management: TokenEntry) -> TokenFetchError:
    status = response.status_code
    code, message = azure_error(response)
    what = (
        f"ARM {action} answered {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    )
    identity = management.source.description
    retry_after: float | None = None
    hint = ""
    if status == 429 or status >= 500:
        value = response.headers.get("retry-after")
        try:
            retry_after = float(value) if value is not None else None
        except ValueError:
            retry_after = None
        hint = "Azure Resource Manager is throttling or failing; the gateway keeps retrying"
    elif status == 401:
        hint = f"ARM does not accept the management token of {identity}: check its tenant"
    elif status == 403:
        permission = _PERMISSIONS.get(action, f"the {action} action")
        hint = (
            f"grant {identity} a role with {permission} on the endpoint "
            "(e.g. AzureML Data Scientist, or a custom role)"
        )
    elif status == 404:
        hint = "check the endpoint reference (subscription_id, resource_group, workspace, name) and arm_url"
    return TokenFetchError(what, retry_after=retry_after, hint=hint)


def shared_arm_client(ctx: BuildContext) -> ArmClient:
    if _SHARED_ARM not in ctx.shared:
        ctx.shared[_SHARED_ARM] = ArmClient(ctx.ssl_context, ctx.egress)
    client: ArmClient = ctx.shared[_SHARED_ARM]
    return client
