"""Key Vault's secrets REST API: read the current version, write a new one, change a version's tags.

Every request goes through the one Azure REST helper (`gateway.azure_rest`) with a token for
`keyvault.scope`. A value is checked (a string, not empty, at most `MAX_VALUE_CHARS`) before anything
else touches it: nothing here registers it for redaction or keeps it; the caller does, once it passed
its own checks (`gateway.keyvault.vaults`). Errors name the vault and the secret, never a value.

Key Vault serves the current (newest) version of a secret. When that version is disabled it answers
403 `Forbidden` with the inner error `SecretDisabled`, and does not fall back to an older version: the
error says which version it is and what to do (enable it, or set a new version).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from gateway.azure_rest import AzureAnswer, AzureError, AzureRest, clean_message
from gateway.config import KeyVaultConfig
from gateway.tokens import TokenEntry

# Key Vault's largest secret value (25 KB).
MAX_VALUE_CHARS = 25 * 1024


class KeyVaultError(AzureError):
    """A Key Vault request failed, or its answer is not a usable secret. Names vault and secret."""


@dataclass(frozen=True)
class SecretVersion:
    """One version of a secret; `value` is empty for answers that carry none (tag updates)."""

    value: str = field(repr=False)
    version: str
    created: float | None  # wall-clock seconds
    tags: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"SecretVersion(version={self.version!r})"


class KeyVaultClient:
    """GET, PUT and PATCH of secrets with a bearer token from the token cache."""

    def __init__(self, config: KeyVaultConfig, token: TokenEntry, rest: AzureRest) -> None:
        self.config = config
        self.token = token
        self.rest = rest

    def _url(self, vault: str, name: str, version: str = "") -> str:
        path = f"{vault}/secrets/{quote(name, safe='')}" + (f"/{quote(version, safe='')}" if version else "")
        return f"{path}?api-version={quote(self.config.api_version, safe='')}"

    async def get(self, vault: str, name: str) -> SecretVersion:
        """The current version, its value checked (KeyVaultError otherwise)."""
        where = f"Key Vault {vault}: secret {name}"
        answer = await self._call("GET", self._url(vault, name), where)
        if answer.status == 403 and answer.error()[1] == "SecretDisabled":
            raise await self._disabled(vault, name, where)
        if answer.status != 200:
            raise self._failure(answer, where, "GET")
        return _bundle(where, answer, with_value=True)

    async def put(
        self, vault: str, name: str, value: str, *, tags: dict[str, str] | None = None
    ) -> SecretVersion:
        """Create a new version of `name` holding `value` (it becomes the current version)."""
        where = f"Key Vault {vault}: secret {name}"
        body: dict[str, Any] = {"value": value}
        if tags:
            body["tags"] = tags
        answer = await self._call("PUT", self._url(vault, name), where, body)
        if answer.status != 200:
            raise self._failure(answer, where, "PUT")
        return _bundle(where, answer, with_value=False)

    async def set_tags(self, vault: str, name: str, version: str, tags: dict[str, str]) -> SecretVersion:
        """Replace the tags of one version (Key Vault's UpdateSecret); the answer carries no value."""
        where = f"Key Vault {vault}: secret {name} version {version}"
        answer = await self._call("PATCH", self._url(vault, name, version), where, {"tags": tags})
        if answer.status != 200:
            raise self._failure(answer, where, "PATCH")
        return _bundle(where, answer, with_value=False)

    async def _call(
        self, method: str, url: str, where: str, body: dict[str, Any] | None = None
    ) -> AzureAnswer:
        try:
            return await self.rest.call(
                method, url, token=self.token, what=where, body=body, timeout_s=self.config.timeout_s
            )
        except AzureError as exc:
            raise KeyVaultError(exc.message, hint=exc.hint, retry_after=exc.retry_after) from None

    async def _disabled(self, vault: str, name: str, where: str) -> KeyVaultError:
        """403 SecretDisabled for the current version: name that version (a listing of the versions'
        metadata, never their values; left out if the listing fails)."""
        version = ""
        try:
            listing = await self._call("GET", self._url(vault, name, "versions"), where)
        except KeyVaultError:
            listing = None
        if listing is not None and listing.status == 200:
            items = [i for i in listing.json_object().get("value") or [] if isinstance(i, dict)]

            def created(item: dict[str, Any]) -> float:
                attributes = item.get("attributes")
                value = attributes.get("created") if isinstance(attributes, dict) else None
                return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

            if items:
                newest = max(items, key=created)  # the current version is the newest
                version = clean_message(str(newest.get("id") or "").rstrip("/").rsplit("/", 1)[-1], 100)
        which = f"version {version}" if version else "version"
        return KeyVaultError(
            f"{where}: its current {which} is disabled (403 Forbidden, SecretDisabled); Key Vault serves "
            "no older version in its place",
            hint="enable it or set a new version with the value to use",
            status=403,
            code="SecretDisabled",
        )

    def _failure(self, answer: AzureAnswer, where: str, method: str) -> KeyVaultError:
        error = self.rest.failure(answer, f"{where}: {method}", hint=self._hint(answer.status, method))
        return KeyVaultError(
            error.message,
            hint=error.hint,
            status=error.status,
            code=error.code,
            retry_after=error.retry_after,
        )

    def _hint(self, status: int, method: str) -> str:
        identity = self.token.source.description
        if status == 404:
            return "check the vault URL and the secret name"
        if status == 403:
            role = "Key Vault Secrets Officer" if method in ("PUT", "PATCH") else "Key Vault Secrets User"
            return f"grant {identity} the {role} role on the vault (or an access policy allowing it)"
        if status == 401:
            return f"the vault does not accept the token of {identity}: check keyvault.scope and the tenant"
        if status == 429 or status >= 500:
            return "Key Vault is throttling or failing; the gateway keeps the last value and polls again"
        return ""


def _bundle(where: str, answer: AzureAnswer, *, with_value: bool) -> SecretVersion:
    """The secret bundle answered. With `with_value`, the value is checked first: a string, not empty, at
    most MAX_VALUE_CHARS; nothing else has seen it yet."""
    data = answer.json_object()
    version = clean_message(str(data.get("id") or "").rstrip("/").rsplit("/", 1)[-1], 100)
    value = data.get("value")
    if with_value:
        if not isinstance(value, str):
            raise KeyVaultError(f"{where}: the answer is not a secret bundle (no `value`)")
        if not value:
            raise KeyVaultError(f"{where}: version {version} is empty", hint="set a new version with a value")
        if len(value) > MAX_VALUE_CHARS:
            raise KeyVaultError(
                f"{where}: version {version} holds {len(value)} characters, more than the 25 KB a Key Vault "
                "value can have; refused",
                hint="set a new version with the right value",
            )
    elif not isinstance(data.get("id"), str):
        raise KeyVaultError(f"{where}: the answer is not a secret bundle (no `id`)")
    attributes = data.get("attributes")
    created = attributes.get("created") if isinstance(attributes, dict) else None
    if not isinstance(created, int | float) or isinstance(created, bool) or not math.isfinite(created):
        created = None
    tags = data.get("tags")
    return SecretVersion(
        value=value if with_value and isinstance(value, str) else "",
        version=version,
        created=None if created is None else float(created),
        tags={str(k): str(v) for k, v in tags.items()} if isinstance(tags, dict) else {},
    )
