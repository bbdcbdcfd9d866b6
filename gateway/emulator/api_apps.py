"""App registrations that expose an API (the gateway's own, for caller tokens), and app role assignments.

In Entra ID an API is an app registration with an application ID URI (e.g. `api://scoring-gateway`)
and app roles (e.g. `Scoring.Invoke`); an administrator assigns a role to a client's service principal
(a client app or a managed identity), and tokens that client gets for the API carry the role in `roles`.
Which token version the API gets is the API's own manifest setting `accessTokenAcceptedVersion`
(null or 1: v1 tokens, `iss` = `https://sts.windows.net/{tid}/`, `aud` = the identifier the client asked
for; 2: v2 tokens, `iss` = `{authority}/{tid}/v2.0`, `aud` = the API's client id), whichever token
endpoint the client used. Thread-safe.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = ["ApiApp", "ApiApps", "TokenVersion"]

TokenVersion = Literal[1, 2]


@dataclass(frozen=True)
class ApiApp:
    tenant_id: str
    client_id: str
    identifier_uri: str | None
    app_roles: frozenset[str]
    access_token_version: TokenVersion = 1

    def identifiers(self) -> tuple[str, ...]:
        """What a client may name the API by in `scope` (`<identifier>/.default`) or IMDS's `resource`."""
        return (self.client_id,) if self.identifier_uri is None else (self.identifier_uri, self.client_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "client_id": self.client_id,
            "identifier_uri": self.identifier_uri,
            "app_roles": sorted(self.app_roles),
            "access_token_version": self.access_token_version,
        }


def _key(identifier: str) -> str:
    return identifier.rstrip("/").lower()


class ApiApps:
    """The APIs Entra ID knows, and which roles of each are assigned to which client (by client id)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._apis: dict[str, ApiApp] = {}  # client id -> app
        self._assignments: dict[tuple[str, str], set[str]] = {}  # (api client id, client id) -> roles

    def add(
        self,
        tenant_id: str,
        *,
        identifier_uri: str | None = None,
        client_id: str | None = None,
        app_roles: tuple[str, ...] | list[str] = (),
        access_token_version: TokenVersion | None = None,
    ) -> ApiApp:
        """Register (or replace) an API. `access_token_version` None is Entra's null: v1 tokens."""
        if access_token_version not in (None, 1, 2):
            raise ValueError("access_token_version must be 1, 2 or null")
        if identifier_uri is not None and not identifier_uri.strip():
            raise ValueError("identifier_uri must not be empty")
        api = ApiApp(
            tenant_id=tenant_id,
            client_id=(client_id or str(uuid.uuid4())).lower(),
            identifier_uri=identifier_uri.rstrip("/") if identifier_uri else None,
            app_roles=frozenset(app_roles),
            access_token_version=access_token_version or 1,
        )
        with self._lock:
            self._apis[api.client_id] = api
        return api

    def find(self, identifier: str) -> ApiApp | None:
        """The API a scope's resource (application ID URI or client id) names, or None."""
        wanted = _key(identifier)
        with self._lock:
            apis = list(self._apis.values())
        return next((api for api in apis if wanted in {_key(i) for i in api.identifiers()}), None)

    def set_token_version(self, api_client_id: str, version: TokenVersion | None) -> ApiApp:
        if version not in (None, 1, 2):
            raise ValueError("access_token_version must be 1, 2 or null")
        with self._lock:
            api = self._apis.get(api_client_id.lower())
            if api is None:
                raise ValueError(f"no API with client id {api_client_id!r}")
            api = self._apis[api.client_id] = replace(api, access_token_version=version or 1)
        return api

    def assign(self, api_client_id: str, client_id: str, role: str) -> None:
        """Assign the API's app role `role` to the client (app or managed identity) `client_id`."""
        with self._lock:
            api = self._apis.get(api_client_id.lower())
            if api is None:
                raise ValueError(f"no API with client id {api_client_id!r}")
            if role not in api.app_roles:
                raise ValueError(f"the API defines no app role {role!r} (roles: {sorted(api.app_roles)})")
            self._assignments.setdefault((api.client_id, client_id.lower()), set()).add(role)

    def unassign(self, api_client_id: str, client_id: str, role: str) -> None:
        with self._lock:
            self._assignments.get((api_client_id.lower(), client_id.lower()), set()).discard(role)

    def roles(self, api: ApiApp, client_id: str) -> list[str]:
        with self._lock:
            return sorted(self._assignments.get((api.client_id, client_id.lower()), ()))

    def all(self) -> list[ApiApp]:
        with self._lock:
            return list(self._apis.values())
