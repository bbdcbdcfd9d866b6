"""Azure Resource Manager on an online endpoint (`token`, `listKeys`, `regenerateKeys`): its URLs, its
audience, and the POST the credentials make with a management token.

Requests go through the one Azure REST helper (`gateway.azure_rest`): TLS trust and egress policy of the
configuration, one new token on a 401, ARM's error body as a short message. Failures become
`TokenFetchError`s that say what to fix.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

from gateway.azure_rest import AzureError, AzureRest
from gateway.config import EndpointRef
from gateway.credentials import BuildContext
from gateway.errors import ConfigError
from gateway.tokens import TokenEntry, TokenFetchError

ARM_SCOPE = "https://management.azure.com/.default"
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


async def arm_post(rest: AzureRest, url: str, management: TokenEntry, *, action: str) -> dict[str, Any]:
    """POST `url` with the management token; the JSON object answered, or TokenFetchError saying what
    to fix (with ARM's Retry-After, clamped, when it throttles or fails)."""
    what = f"ARM {action}"
    try:
        answer = await rest.call("POST", url, token=management, what=what)
    except AzureError as exc:
        raise TokenFetchError(exc.message, retry_after=exc.retry_after, hint=exc.hint) from None
    if answer.status != 200:
        error = rest.failure(answer, what, hint=_hint(action, answer.status, management))
        raise TokenFetchError(error.message, retry_after=error.retry_after, hint=error.hint)
    data = answer.json()
    if not isinstance(data, dict):
        raise TokenFetchError(f"{what}: the answer is not a JSON object")
    return data


def _hint(action: str, status: int, management: TokenEntry) -> str:
    identity = management.source.description
    if status == 429 or status >= 500:
        return "Azure Resource Manager is throttling or failing; the gateway keeps retrying"
    if status == 401:
        return f"ARM does not accept the management token of {identity}: check its tenant"
    if status == 403:
        permission = _PERMISSIONS.get(action, f"the {action} action")
        return (
            f"grant {identity} a role with {permission} on the endpoint "
            "(e.g. AzureML Data Scientist, or a custom role)"
        )
    if status == 404:
        return "check the endpoint reference (subscription_id, resource_group, workspace, name) and arm_url"
    return ""
