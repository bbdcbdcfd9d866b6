"""Who the gateway is to Microsoft Entra ID: an `IdentityConfig` resolved into an MSAL application.

Unset fields fall back to the variables azure-identity reads (AZURE_TENANT_ID, AZURE_CLIENT_ID,
AZURE_CLIENT_SECRET, AZURE_CLIENT_CERTIFICATE_PATH, AZURE_FEDERATED_TOKEN_FILE, AZURE_AUTHORITY_HOST), so
an AKS workload-identity pod needs no identity settings at all.

One MSAL application per identity per process: routes with the same identity share it through
`BuildContext.shared`. It is built lazily in a worker thread (its constructor fetches the tenant's OpenID
configuration) and rebuilt when a rotated secret or certificate file changes. MSAL's own token cache is
switched off (`NoTokenCache`): `gateway.tokens` is the only cache, so every call MSAL makes here goes to
the network. That is what a forced refresh after an upstream 401 needs, and MSAL offers no other way for
client credentials short of a claims challenge.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import logging
import math
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msal
from msal.exceptions import MsalServiceError

from gateway.azure_rest import clean_message, transport_problem
from gateway.blocking import BlockingPool
from gateway.config import IdentityConfig, ManagedIdentityRef
from gateway.credentials import BuildContext, resolve_secret
from gateway.egress import Egress
from gateway.errors import ConfigError, SecretError
from gateway.msal_http import MsalHttpClient
from gateway.secrets import EnvSecret, FileSecret, Secret
from gateway.tokens import AccessToken, TokenFetchError, TokenSource

logger = logging.getLogger("gateway.identity")

ENV_TENANT_ID = "AZURE_TENANT_ID"
ENV_CLIENT_ID = "AZURE_CLIENT_ID"
ENV_CLIENT_SECRET = "AZURE_CLIENT_SECRET"
ENV_CERTIFICATE_PATH = "AZURE_CLIENT_CERTIFICATE_PATH"
ENV_CERTIFICATE_PASSWORD = "AZURE_CLIENT_CERTIFICATE_PASSWORD"
ENV_FEDERATED_TOKEN_FILE = "AZURE_FEDERATED_TOKEN_FILE"
ENV_AUTHORITY_HOST = "AZURE_AUTHORITY_HOST"
DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"

_SHARED_IDENTITIES = "identities"
_SHARED_POOL = "identity_pool"
_MULTI_TENANT = frozenset({"common", "organizations", "consumers"})
_PRIVATE_KEY = re.compile(r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----", re.S)
_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


class NoTokenCache(msal.TokenCache):  # type: ignore[misc]
    """MSAL's token cache, switched off: nothing is stored, so nothing is ever served from it."""

    def add(self, event: dict[str, Any], now: float | None = None) -> None:
        return None


def short_id(value: str) -> str:
    """The first characters of a tenant or client id: enough to recognise it in a log line."""
    return value if len(value) <= 4 else f"{value[:4]}…"


def _secret_id(secret: Secret) -> str:
    # Two literal secrets share the source "literal"; tell them apart by a digest that stays in memory.
    if secret.source == "literal":
        return "literal#" + hashlib.sha256(secret.value.encode()).hexdigest()[:16]
    return secret.source


# ---------------------------------------------------------------------------------------- credentials
class ClientCredential(abc.ABC):
    """What MSAL gets as `client_credential`, read again before each token request."""

    kind: str
    source: str  # where it comes from, safe to log
    identity: str  # distinguishes credentials of one client in the identity key

    @abc.abstractmethod
    def material(self) -> str | dict[str, Any]: ...

    def version(self) -> object:
        """Changes when the material changes (a rotated file), which rebuilds the MSAL application."""
        return None


class SecretCredential(ClientCredential):
    kind = "client_secret"

    def __init__(self, secret: Secret) -> None:
        self.secret = secret
        self.source = secret.source
        self.identity = f"secret|{_secret_id(secret)}"

    def material(self) -> str:
        return self.secret.value

    def version(self) -> object:
        return self.secret.value


class CertificateCredential(ClientCredential):
    """A private key and its certificate: MSAL signs assertions with PS256 and sends the x5c chain."""

    kind = "certificate"

    def __init__(self, private_key: Secret, certificate: Secret, passphrase: str | None = None) -> None:
        self.private_key = private_key
        self.certificate = certificate
        self.passphrase = passphrase
        self.source = certificate.source
        self.identity = f"cert|{_secret_id(private_key)}|{_secret_id(certificate)}"

    def material(self) -> dict[str, Any]:
        material: dict[str, Any] = {
            "private_key": self.private_key.value,
            "public_certificate": self.certificate.value,
        }
        if self.passphrase:
            material["passphrase"] = self.passphrase
        return material

    def version(self) -> object:
        return (self.private_key.value, self.certificate.value)


class PemFileCertificate(ClientCredential):
    """AZURE_CLIENT_CERTIFICATE_PATH: one PEM file holding the private key and the certificate."""

    kind = "certificate"

    def __init__(self, file: FileSecret, passphrase: str | None = None) -> None:
        self.file = file
        self.passphrase = passphrase
        self.source = file.source
        self.identity = f"pem|{file.source}"
        split_pem(file.value)  # fail at start-up, not at the first request

    def material(self) -> dict[str, Any]:
        private_key, certificate = split_pem(self.file.value)
        material: dict[str, Any] = {"private_key": private_key, "public_certificate": certificate}
        if self.passphrase:
            material["passphrase"] = self.passphrase
        return material

    def version(self) -> object:
        return self.file.value


class FederatedTokenFile(ClientCredential):
    """A workload-identity token file (AKS projects and rotates it); read afresh for every request."""

    kind = "federated_token_file"

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.source = f"file:{path}"
        self.identity = f"federated|{path}"

    def _read(self) -> str:
        assertion = self.path.read_text(encoding="utf-8").strip()
        if not assertion:
            raise OSError(f"the federated token file {self.path} is empty")
        return assertion

    def material(self) -> dict[str, Any]:
        return {"client_assertion": self._read}


def split_pem(text: str) -> tuple[str, str]:
    """(private key PEM, certificate PEM) from a file holding both; SecretError if either is missing."""
    key = _PRIVATE_KEY.search(text)
    certificates = _CERTIFICATE.findall(text)
    if key is None:
        raise SecretError("the PEM file holds no private key")
    if not certificates:
        raise SecretError("the PEM file holds no certificate")
    return key.group(0), "\n".join(certificates)


# ---------------------------------------------------------------------------------------- MSAL sources
class MsalSource(TokenSource):
    """A token source backed by one MSAL object, called in a worker thread of the shared pool."""

    def __init__(
        self,
        *,
        key: str,
        description: str,
        client_id: str | None,
        ssl_context: ssl.SSLContext,
        timeout_s: float,
        pool: BlockingPool,
        endpoint: str,
        egress: Egress,
    ) -> None:
        self.key = key
        self.description = description
        self.client_id = client_id
        self.timeout_s = timeout_s
        # A cold application makes two calls (OpenID configuration, then the token) plus some slack.
        self.deadline_s = 2 * timeout_s + 1.0
        self.endpoint = endpoint  # for error messages: where the identity provider is
        self._ssl_context = ssl_context
        self._egress = egress
        self._pool = pool
        self._lock = threading.Lock()
        self._http: MsalHttpClient | None = None
        # MSAL's HTTP memory (discovery answers, throttling after 429/5xx), kept across rebuilds.
        self._http_cache: dict[str, Any] = {}

    async def fetch(self, scope: str) -> AccessToken:
        return await self._pool.run(functools.partial(self._acquire, scope), self.deadline_s)

    def _client(self) -> MsalHttpClient:
        with self._lock:
            if self._http is None:
                self._http = MsalHttpClient(self._ssl_context, self.timeout_s, self._http_egress())
            return self._http

    def _http_egress(self) -> Egress:
        return self._egress

    @abc.abstractmethod
    def _call(self, http: MsalHttpClient, scope: str) -> dict[str, Any] | None:
        """The blocking MSAL call."""

    def _acquire(self, scope: str) -> AccessToken:
        started = time.time()
        http = self._client()
        http.reset_retry_after()
        try:
            result = self._call(http, scope)
        except MsalServiceError as exc:
            # MSAL raises on a 5xx (also when it replays one it is still throttling).
            raise TokenFetchError(
                f"{self.endpoint} failed: {exc}",
                retry_after=http.retry_after(),
                hint="the identity provider is failing; the gateway keeps retrying",
            ) from None
        except httpx.TimeoutException:
            raise TokenFetchError(
                f"{self.endpoint} did not answer within {self.timeout_s:g} s",
                hint="check network access to it, or raise identity.timeout_s",
            ) from None
        except httpx.HTTPError as exc:
            raise transport_error(self.endpoint, exc) from None
        except (ValueError, OSError) as exc:
            # ValueError: OpenID discovery refused the tenant, or an unusable key; OSError: a token file.
            raise TokenFetchError(
                _one_line(str(exc)),
                hint="check tenant_id, authority_host and the credential files",
            ) from None
        return self._token(result, started, http.retry_after())

    def _token(self, result: dict[str, Any] | None, started: float, retry_after: float | None) -> AccessToken:
        if result and result.get("access_token"):
            expires_in = _number(result.get("expires_in"))
            if expires_in is None:
                raise TokenFetchError(
                    f"{self.endpoint} issued a token without a finite expires_in "
                    f"({clean_message(repr(result.get('expires_in')), 40)})"
                )
            refresh_on = result.get("refresh_on")
            return AccessToken(
                value=str(result["access_token"]),
                expires_at=started + expires_in,
                refresh_after=_number(refresh_on) if refresh_on else None,
            )
        raise self._error(result or {}, retry_after)

    def _error(self, result: dict[str, Any], retry_after: float | None) -> TokenFetchError:
        error = str(result.get("error") or "no_token")
        description = _one_line(str(result.get("error_description") or "no access_token in the answer"))
        # Entra ID descriptions end with trace/correlation ids and a timestamp; keep the trace id only.
        description = description.split(" Trace ID:")[0]
        trace = f" (trace id {result['trace_id']})" if result.get("trace_id") else ""
        return TokenFetchError(
            f"{error}: {description}{trace}",
            retry_after=retry_after if retry_after is not None else _number(result.get("retry_after")),
            hint=self._hint(error),
        )

    def _hint(self, error: str) -> str:
        return _ERROR_HINTS.get(error, "")

    def close(self) -> None:
        # Called from the event loop: never wait for the lock, which a worker holds during discovery.
        # A worker still using the old client fails and its fetch is retried; MSAL objects built on a
        # closed client are rebuilt (they remember which client they were built with).
        http, self._http = self._http, None
        self._forget()
        if http is not None:
            http.close()

    def _forget(self) -> None:
        """Drop the MSAL object; the next call builds a new one."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r})"


class ConfidentialIdentity(MsalSource):
    """An app registration: client secret, certificate or federated (workload identity) assertion."""

    def __init__(
        self,
        *,
        authority: str,
        tenant_id: str,
        client_id: str,
        credential: ClientCredential,
        **kwargs: Any,
    ) -> None:
        super().__init__(client_id=client_id, endpoint=authority, **kwargs)
        self.authority = authority
        self.tenant_id = tenant_id
        self.credential = credential
        self._app: msal.ConfidentialClientApplication | None = None
        self._built_version: object = None
        self._built_on: MsalHttpClient | None = None

    def _application(self, http: MsalHttpClient) -> msal.ConfidentialClientApplication:
        with self._lock:
            version = self.credential.version()
            if self._app is None or version != self._built_version or self._built_on is not http:
                rebuilt = self._app is not None
                previous = self._built_version
                assert self.client_id is not None
                self._app = msal.ConfidentialClientApplication(
                    self.client_id,
                    client_credential=self.credential.material(),
                    authority=self.authority,
                    http_client=http,
                    # Always off: for hosts MSAL knows it is skipped anyway, for any other host it would
                    # call login.microsoftonline.com, and after an error it looks up authority aliases.
                    instance_discovery=False,
                    token_cache=NoTokenCache(),
                    http_cache=self._http_cache,
                )
                self._built_version = version
                self._built_on = http
                if rebuilt and version != previous:
                    logger.warning(
                        "the %s of client %s changed (%s); using the new one",
                        self.credential.kind,
                        short_id(self.client_id),
                        self.credential.source,
                    )
            return self._app

    def _call(self, http: MsalHttpClient, scope: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self._application(http).acquire_token_for_client([scope])
        return result

    def _forget(self) -> None:
        self._app = None

    def _hint(self, error: str) -> str:
        client = short_id(self.client_id or "")
        if error == "invalid_client":
            return (
                f"check the {self.credential.kind} ({self.credential.source}) of client {client}: it must be "
                "current on the app registration"
            )
        if error == "unauthorized_client":
            return f"check tenant_id and client_id: client {client} is not registered in that tenant"
        return super()._hint(error)


class ManagedIdentitySource(MsalSource):
    """A managed identity: IMDS on VMs and AKS, or the App Service identity endpoint (MSAL picks by env)."""

    def __init__(self, *, identity: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(endpoint="the managed identity endpoint", **kwargs)
        self.identity = identity
        self._msal_client: msal.ManagedIdentityClient | None = None
        self._built_on: MsalHttpClient | None = None

    def _http_egress(self) -> Egress:
        # The instance metadata service (or the node's stand-in for it) answers only this host, so MSAL
        # reaches it directly; another identity endpoint (App Service, Container Apps, Arc, Service
        # Fabric) follows the egress policy, except on a loopback or link-local address.
        if managed_identity_source() is msal.managed_identity.DEFAULT_TO_VM:
            return Egress.direct()
        return self._egress.for_identity_endpoint()

    def _call(self, http: MsalHttpClient, scope: str) -> dict[str, Any] | None:
        with self._lock:
            if self._msal_client is None or self._built_on is not http:
                self._msal_client = msal.ManagedIdentityClient(
                    self.identity, http_client=http, token_cache=NoTokenCache(), http_cache=self._http_cache
                )
                self._built_on = http
            client = self._msal_client
        try:
            result: dict[str, Any] | None = client.acquire_token_for_client(resource=scope_resource(scope))
        except ValueError as exc:
            # MSAL int()s the endpoint's `expires_in` ("nan", "inf", "1e308" raise) and json-parses its
            # answer; either way the answer is the endpoint's fault, not the tenant's or a file's.
            what = (
                "is not JSON" if isinstance(exc, json.JSONDecodeError) else "has no whole-number expires_in"
            )
            raise TokenFetchError(
                f"{self.endpoint} answered a token that {what} ({clean_message(str(exc), 120)})",
                hint="the managed identity endpoint is misbehaving; the gateway keeps retrying",
            ) from None
        return result

    def _forget(self) -> None:
        self._msal_client = None

    def _hint(self, error: str) -> str:
        if error == "temporarily_unavailable":
            return super()._hint(error)
        # MSAL reports most App Service failures as invalid_scope, whatever the cause: stay general.
        return "check that this host has the managed identity assigned and may get tokens for the scope"


_ERROR_HINTS = {
    "invalid_resource": "check auth.scope: the resource is not known in the tenant",
    "invalid_scope": "check auth.scope: client credentials need a resource's `/.default` scope",
    "temporarily_unavailable": "the identity provider is throttling or failing; the gateway keeps retrying",
}


def managed_identity_source() -> object:
    """MSAL's choice of managed identity flavour from the environment (IMDS is `DEFAULT_TO_VM`)."""
    return msal.managed_identity.get_managed_identity_source()


def transport_error(endpoint: str, exc: httpx.HTTPError) -> TokenFetchError:
    message, hint = transport_problem(endpoint, exc)
    return TokenFetchError(message, hint=hint)


def scope_resource(scope: str) -> str:
    """Managed identity endpoints take a resource, i.e. the scope without `/.default`."""
    return scope.removesuffix("/.default")


def _one_line(text: str) -> str:
    """An identity provider's message as the gateway shows it (short, one line, no control characters)."""
    return clean_message(text)


def _number(value: Any) -> float | None:
    """A finite number from an answer, else None."""
    try:
        number = float(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


# ---------------------------------------------------------------------------------------- resolution
def resolve_identity(
    route: str, config: IdentityConfig, ctx: BuildContext, *, where: str | None = None
) -> MsalSource:
    """The token source for `config`, shared with every other route that resolves to the same identity.
    `where` is the identity's key path in the configuration (default: the route's `auth.identity`)."""
    where = where or f"routes.{route}.auth.identity"

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{ctx.source}: {where}: {problem}")

    if _SHARED_POOL not in ctx.shared:
        ctx.shared[_SHARED_POOL] = BlockingPool()
    pool: BlockingPool = ctx.shared[_SHARED_POOL]
    identities: dict[str, MsalSource] = ctx.shared.setdefault(_SHARED_IDENTITIES, {})

    if config.managed_identity is not None:
        identity, key, description = _managed_identity(config.managed_identity)
        source = identities.get(key)
        if source is None:
            source = identities[key] = ManagedIdentitySource(
                identity=identity,
                key=key,
                description=description,
                client_id=getattr(config.managed_identity, "client_id", None),
                ssl_context=ctx.ssl_context,
                egress=ctx.egress,
                timeout_s=config.timeout_s,
                pool=pool,
            )
        return source

    tenant_id = config.tenant_id or os.environ.get(ENV_TENANT_ID, "").strip()
    client_id = config.client_id or os.environ.get(ENV_CLIENT_ID, "").strip()
    if not tenant_id:
        raise fail(f"no tenant: set tenant_id (the directory id) or the {ENV_TENANT_ID} environment variable")
    if tenant_id.lower() in _MULTI_TENANT:
        raise fail(f"tenant_id {tenant_id!r} is not a tenant: use your directory (tenant) id or domain")
    if not client_id:
        raise fail(
            f"no client id: set client_id (the app registration's application id) or the {ENV_CLIENT_ID} "
            "environment variable, or use managed_identity"
        )
    credential = _client_credential(config, where, ctx)
    if credential is None:
        raise fail(
            "no credential: set one of client_secret, certificate, federated_token_file or managed_identity, "
            f"or the environment variable {ENV_CLIENT_SECRET}, {ENV_CERTIFICATE_PATH} or "
            f"{ENV_FEDERATED_TOKEN_FILE}"
        )
    host = _authority_host(config.authority_host or os.environ.get(ENV_AUTHORITY_HOST), fail)
    authority = f"{host}/{tenant_id}"
    key = f"entra|{authority.lower()}|{client_id.lower()}|{credential.identity}"
    source = identities.get(key)
    if source is None:
        at = "" if host == DEFAULT_AUTHORITY_HOST else f" at {urlsplit(host).netloc}"
        description = (
            f"{credential.kind} {credential.source} for client {short_id(client_id)} "
            f"tenant {short_id(tenant_id)}{at}"
        )
        source = identities[key] = ConfidentialIdentity(
            authority=authority,
            tenant_id=tenant_id,
            client_id=client_id,
            credential=credential,
            key=key,
            description=description,
            ssl_context=ctx.ssl_context,
            egress=ctx.egress,
            timeout_s=config.timeout_s,
            pool=pool,
        )
    return source


def _managed_identity(config: str | ManagedIdentityRef) -> tuple[dict[str, Any], str, str]:
    """(MSAL's identity object, identity key, description)."""
    if isinstance(config, ManagedIdentityRef):
        if config.client_id is not None:
            identity = msal.UserAssignedManagedIdentity(client_id=config.client_id)
            description = f"managed identity (client {short_id(config.client_id)})"
            return identity, f"mi|client|{config.client_id.lower()}", description
        assert config.resource_id is not None
        name = config.resource_id.rstrip("/").rsplit("/", 1)[-1]
        identity = msal.UserAssignedManagedIdentity(resource_id=config.resource_id)
        return identity, f"mi|resource|{config.resource_id.lower()}", f"managed identity ({name})"
    return msal.SystemAssignedManagedIdentity(), "mi|system", "managed identity (system)"


def _client_credential(config: IdentityConfig, where: str, ctx: BuildContext) -> ClientCredential | None:
    if config.client_secret is not None:
        return SecretCredential(resolve_secret(config.client_secret, f"{where}.client_secret", ctx))
    if config.certificate is not None:
        key = resolve_secret(config.certificate.private_key, f"{where}.certificate.private_key", ctx)
        cert = resolve_secret(config.certificate.certificate, f"{where}.certificate.certificate", ctx)
        if "PRIVATE KEY-----" not in key.value:
            raise ConfigError(f"{ctx.source}: {where}.certificate.private_key: not a PEM private key")
        if "-----BEGIN CERTIFICATE-----" not in cert.value:
            raise ConfigError(f"{ctx.source}: {where}.certificate.certificate: not a PEM certificate")
        return CertificateCredential(key, cert)
    if config.federated_token_file is not None:
        return _federated(config.federated_token_file, f"{where}.federated_token_file", ctx)
    # Environment fallbacks, in azure-identity's order.
    if os.environ.get(ENV_CLIENT_SECRET, "").strip():
        return SecretCredential(EnvSecret(ENV_CLIENT_SECRET))
    path = os.environ.get(ENV_CERTIFICATE_PATH, "").strip()
    if path:
        try:
            file = FileSecret(path, strip=False)
            return PemFileCertificate(file, os.environ.get(ENV_CERTIFICATE_PASSWORD) or None)
        except SecretError as exc:
            raise ConfigError(f"{ctx.source}: {where}: {ENV_CERTIFICATE_PATH}: {exc}") from None
    path = os.environ.get(ENV_FEDERATED_TOKEN_FILE, "").strip()
    if path:
        return _federated(path, ENV_FEDERATED_TOKEN_FILE, ctx, where)
    return None


def _federated(path: str, what: str, ctx: BuildContext, where: str | None = None) -> FederatedTokenFile:
    location = f"{where}: {what}" if where else what
    if not os.path.isfile(path):
        raise ConfigError(f"{ctx.source}: {location}: the token file {path} does not exist")
    return FederatedTokenFile(path)


def _authority_host(value: str | None, fail: Callable[[str], ConfigError]) -> str:
    host = (value or DEFAULT_AUTHORITY_HOST).strip().rstrip("/")
    if "://" not in host:
        host = f"https://{host}"
    parts = urlsplit(host)
    if parts.scheme != "https" or not parts.hostname:
        raise fail(f"authority_host must be an https:// URL (MSAL refuses anything else), got {value!r}")
    if parts.path or parts.query:
        raise fail(
            f"authority_host is a host such as {DEFAULT_AUTHORITY_HOST}, without a path; got {value!r}"
        )
    return f"https://{parts.netloc}"
