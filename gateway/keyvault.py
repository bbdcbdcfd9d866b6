"""`{keyvault: {vault: URL, secret: NAME}}`: secrets read from Azure Key Vault and polled for new versions.

Every secret of one vault shares one poll loop, which sends one `GET {vault}/secrets/{name}` per secret
every `keyvault.refresh_every_s`; a new version is in use within one interval, without a restart. The
token (for `keyvault.scope`, from `keyvault.identity`) comes from the gateway's one token cache; the
HTTP client is the one the ARM calls use (`ArmClient`), so TLS and proxy settings are the same.

A secret is loaded once while the configuration is built (a missing secret is a ConfigError that names
the vault and the secret). Afterwards a failed poll keeps the last good value, is logged once (and its
recovery once), shows in `/readyz` under `keyvault` and in `gateway_keyvault_secret_stale`. When the
upstream rejects every key of a route whose keys come from here, `refetcher` polls them at once.
Values are registered with `gateway.redaction` and never leave this module except through `.value`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import httpx

from gateway import metrics, redaction
from gateway.config import IdentityConfig, KeyVaultConfig, KeyVaultRef, LiteralRef
from gateway.credentials import BuildContext
from gateway.credentials.arm import ArmClient, azure_error, shared_arm_client
from gateway.credentials.base import Grant
from gateway.credentials.identity import resolve_identity, transport_error
from gateway.credentials.token import shared_token_cache
from gateway.errors import ConfigError, CredentialUnavailable, SecretError
from gateway.secrets import Secret, check_header_value
from gateway.tokens import TokenEntry

logger = logging.getLogger("gateway.keyvault")

_SHARED = "keyvault"
# After every key of a route was rejected, its Key Vault secrets are polled at once, at most this often.
REFETCH_MIN_INTERVAL_S = 1.0
# A Key Vault secret value is at most 25 KB.
MAX_VALUE_CHARS = 25 * 1024
T = TypeVar("T")


class KeyVaultError(Exception):
    """A Key Vault request failed. `message` names vault and secret, never a value."""

    def __init__(self, message: str, *, hint: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.status = status

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


@dataclass(frozen=True)
class SecretVersion:
    value: str
    version: str
    created: float | None  # wall-clock seconds

    def __repr__(self) -> str:
        return f"SecretVersion(version={self.version!r})"


# ---------------------------------------------------------------------------------------- the REST calls
class KeyVaultClient:
    """GET and PUT of secrets with a bearer token from the token cache; one retry with a new token on 401."""

    def __init__(self, config: KeyVaultConfig, token: TokenEntry, arm: ArmClient) -> None:
        self.config = config
        self.token = token
        self.arm = arm

    def _url(self, vault: str, name: str) -> str:
        return f"{vault}/secrets/{quote(name, safe='')}?api-version={quote(self.config.api_version, safe='')}"

    async def get(self, vault: str, name: str) -> SecretVersion:
        return await self._call("GET", vault, name, None)

    async def put(self, vault: str, name: str, value: str) -> SecretVersion:
        """Create a new version of `name` holding `value`."""
        return await self._call("PUT", vault, name, {"value": value})

    async def _call(self, method: str, vault: str, name: str, body: dict[str, Any] | None) -> SecretVersion:
        where = f"Key Vault {vault}: secret {name}"
        try:
            grant: Grant = self.token.peek() or await self.token.get()
        except CredentialUnavailable as exc:
            raise KeyVaultError(f"{where}: no token for {self.token.scope}: {exc.message}") from None
        http = self.arm.http_client()  # the process's one httpx client for Azure APIs (TLS, proxy)
        for attempt in (1, 2):
            assert grant.header is not None
            try:
                response = await asyncio.wait_for(
                    http.request(
                        method,
                        self._url(vault, name),
                        headers={"Authorization": grant.header, "Accept": "application/json"},
                        json=body,
                    ),
                    self.config.timeout_s,
                )
            except (TimeoutError, httpx.TimeoutException):
                raise KeyVaultError(
                    f"{where}: no answer within {self.config.timeout_s:g} s",
                    hint="check network access to the vault",
                ) from None
            except httpx.HTTPError as exc:
                problem = transport_error(f"the vault {vault}", exc)
                raise KeyVaultError(f"{where}: {problem.message}", hint=problem.hint) from None
            if response.status_code == 401 and attempt == 1:
                replacement = await self.token.reject(grant, verdict=False)
                if replacement is not None:
                    grant = replacement
                    continue
            break
        if response.status_code != 200:
            raise _error(where, method, response, self.token)
        return _parse(where, response)


def _parse(where: str, response: httpx.Response) -> SecretVersion:
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("value"), str):
        raise KeyVaultError(f"{where}: the answer is not a secret bundle (no `value`)")
    value: str = data["value"]
    redaction.register(value)
    if not value:
        raise KeyVaultError(f"{where}: the latest version is empty")
    if len(value) > MAX_VALUE_CHARS:
        raise KeyVaultError(f"{where}: the value is longer than Key Vault allows")
    version = str(data.get("id") or "").rstrip("/").rsplit("/", 1)[-1]
    attributes = data.get("attributes")
    created = attributes.get("created") if isinstance(attributes, dict) else None
    return SecretVersion(
        value=value,
        version=version,
        created=float(created)
        if isinstance(created, int | float) and not isinstance(created, bool)
        else None,
    )


def _error(where: str, method: str, response: httpx.Response, token: TokenEntry) -> KeyVaultError:
    status = response.status_code
    code, message = azure_error(response)
    inner = ""
    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
        inner = str(response.json()["error"]["innererror"]["code"])
    what = f"{where}: {method} answered {status}" + (f" {inner or code}" if inner or code else "")
    if message:
        what += f": {redaction.redact(message)}"
    identity = token.source.description
    hint = ""
    if status == 404:
        hint = "check the vault URL and the secret name, and that the secret has an enabled version"
    elif status == 403:
        role = "Key Vault Secrets Officer" if method == "PUT" else "Key Vault Secrets User"
        hint = f"grant {identity} the {role} role on the vault (or an access policy allowing it)"
    elif status == 401:
        hint = f"the vault does not accept the token of {identity}: check keyvault.scope and the tenant"
    elif status == 429 or status >= 500:
        hint = "Key Vault is throttling or failing; the gateway keeps the last value and polls again"
    return KeyVaultError(what, hint=hint, status=status)


# ---------------------------------------------------------------------------------------- secrets
class KeyVaultSecret(Secret):
    """The latest version of one Key Vault secret; `value` is the last one fetched successfully."""

    def __init__(self, owner: Vault, name: str, first: SecretVersion) -> None:
        super().__init__(f"keyvault:{owner.url}/secrets/{name}")
        self.owner = owner
        self.vault = owner.url
        self.name = name
        self.uses: list[str] = []  # where the configuration uses it, e.g. routes.iris.auth.primary
        self.header = False
        self._value = first.value
        self.version_id = first.version
        self.since = first.created or time.time()
        self.checked_at = time.time()
        self.error: str | None = None
        self.failures = 0  # consecutive failed reads

    @property
    def value(self) -> str:
        return self._value

    def store(self, fetched: SecretVersion) -> bool:
        """Keep a newly fetched version; True when the value changed."""
        self.checked_at = time.time()
        if self.header:
            check_header_value(fetched.value, f"{self.source} version {fetched.version}")
        if fetched.value == self._value:
            self.version_id = fetched.version
            return False
        self._value = fetched.value
        self.version_id = fetched.version
        self._changed(fetched.created)
        return True

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "vault": self.vault,
            "secret": self.name,
            "version": self.version_id,
            "age_s": round(max(0.0, time.time() - self.since), 1),
            "checked_s_ago": round(max(0.0, time.time() - self.checked_at), 1),
            "used_by": list(self.uses),
            "ok": self.error is None,
        }
        if self.error is not None:
            data["error"] = self.error
            data["failed_reads"] = self.failures
        return data


class Vault:
    """One vault's secrets and the poll loop they share."""

    def __init__(self, url: str, refresh_every_s: float, client: KeyVaultClient) -> None:
        self.url = url
        self.label = urlsplit(url).netloc
        self.refresh_every_s = refresh_every_s
        self.client = client
        self.secrets: dict[str, KeyVaultSecret] = {}
        self._task: asyncio.Task[None] | None = None
        self._refetch: asyncio.Task[bool] | None = None
        self._refetched_at = -math.inf

    # ------------------------------------------------------------------ polling
    async def poll(self, names: Sequence[str] | None = None) -> bool:
        """One request per secret; True when any value changed. Failures keep the last value."""
        chosen = [self.secrets[n] for n in (names or list(self.secrets)) if n in self.secrets]
        results = await asyncio.gather(*(self._poll_one(s) for s in chosen))
        return any(results)

    async def _poll_one(self, secret: KeyVaultSecret) -> bool:
        try:
            fetched = await self.client.get(self.url, secret.name)
            changed = secret.store(fetched)
        except (KeyVaultError, SecretError) as exc:
            self._failed(secret, str(exc))
            return False
        except Exception as exc:  # a library surprise must not end the poll loop
            self._failed(secret, f"unexpected {type(exc).__name__}: {redaction.redact(str(exc))}")
            return False
        metrics.KEYVAULT_POLLS.labels(self.label, secret.name, "ok").inc()
        metrics.KEYVAULT_SECRET_STALE.labels(self.label, secret.name).set(0)
        if secret.error is not None:
            secret.error = None
            secret.failures = 0
            logger.warning("Key Vault %s: reading secret %s works again", self.url, secret.name)
        if changed:
            logger.warning(
                "Key Vault %s: secret %s has a new version %s (used by %s); using it",
                self.url,
                secret.name,
                secret.version_id,
                ", ".join(secret.uses) or "-",
            )
        return changed

    def _failed(self, secret: KeyVaultSecret, problem: str) -> None:
        metrics.KEYVAULT_POLLS.labels(self.label, secret.name, "error").inc()
        metrics.KEYVAULT_SECRET_STALE.labels(self.label, secret.name).set(1)
        secret.failures += 1
        if secret.error is None:  # once per outage, not once per poll
            logger.warning(
                "Key Vault %s: cannot read secret %s: %s; keeping version %s until a poll succeeds",
                self.url,
                secret.name,
                problem,
                secret.version_id,
            )
        secret.error = problem

    async def refetch(self, names: Sequence[str]) -> bool:
        """Poll `names` now (single flight, at most once per REFETCH_MIN_INTERVAL_S): True if changed."""
        if self._refetch is not None:
            return await asyncio.shield(self._refetch)
        if time.monotonic() - self._refetched_at < REFETCH_MIN_INTERVAL_S:
            return False
        self._refetched_at = time.monotonic()
        logger.warning(
            "Key Vault %s: the upstream rejected every key; reading %s again now", self.url, ", ".join(names)
        )
        self._refetch = asyncio.get_running_loop().create_task(self.poll(names))
        try:
            return await asyncio.shield(self._refetch)
        finally:
            self._refetch = None

    async def _poll_forever(self) -> None:
        due = time.monotonic() + self.refresh_every_s
        while True:
            # A fixed schedule: a slow poll does not push the next one later.
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            due = max(due + self.refresh_every_s, time.monotonic())
            try:
                await self.poll()
            except Exception:
                logger.exception("Key Vault %s: the poll loop failed; continuing", self.url)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self.client.arm.acquire(self)
            self._task = asyncio.get_running_loop().create_task(
                self._poll_forever(), name=f"keyvault poll {self.url}"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.client.arm.release(self)

    def __repr__(self) -> str:
        return f"Vault(url={self.url!r}, secrets={sorted(self.secrets)!r})"


class KeyVaults:
    """Every vault the configuration uses, shared through `BuildContext.shared`."""

    def __init__(self, ctx: BuildContext, config: KeyVaultConfig) -> None:
        self.ctx = ctx
        self.config = config
        self.vaults: dict[str, Vault] = {}
        self._client: KeyVaultClient | None = None
        self._resolving_identity = False

    def client(self) -> KeyVaultClient:
        if self._client is None:
            if self._resolving_identity:
                raise ConfigError(
                    f"{self.ctx.source}: keyvault.identity: its own credentials cannot come from Key Vault"
                )
            self._resolving_identity = True
            config = self.config.identity or IdentityConfig.model_validate({})
            if self.ctx.warn_literals and isinstance(config.client_secret, LiteralRef):
                logger.warning(
                    "%s: keyvault.identity.client_secret is a literal secret in the config file; prefer "
                    "{env: NAME} or {file: PATH}",
                    self.ctx.source,
                )
            # Warned above with the right key path; the shared clients and identities are the same.
            quiet = BuildContext(
                ssl_context=self.ctx.ssl_context,
                source=self.ctx.source,
                warn_literals=False,
                shared=self.ctx.shared,
            )
            try:
                identity = resolve_identity("<keyvault>", config, quiet)
            except ConfigError as exc:
                where = str(exc).replace("routes.<keyvault>.auth.identity", "keyvault.identity")
                raise ConfigError(where) from None
            finally:
                self._resolving_identity = False
            token = shared_token_cache(self.ctx).entry(identity, self.config.scope)
            token.register(self, "keyvault", "keyvault")  # token log lines and metrics say what it is for
            self._client = KeyVaultClient(self.config, token, shared_arm_client(self.ctx))
        return self._client

    def vault(self, url: str) -> Vault:
        vault = self.vaults.get(url)
        if vault is None:
            vault = self.vaults[url] = Vault(url, self.config.refresh_every_s, self.client())
        return vault

    def secret(self, ref: KeyVaultRef, where: str, *, header: bool) -> KeyVaultSecret:
        url, name = ref.keyvault.vault, ref.keyvault.secret
        vault = self.vault(url)
        secret = vault.secrets.get(name)
        if secret is None:
            try:
                first = run_blocking(self._load(vault, name))
            except KeyVaultError as exc:
                raise ConfigError(f"{self.ctx.source}: {where}: {exc}") from None
            secret = KeyVaultSecret(vault, name, first)
            vault.secrets[name] = secret
        if header:
            try:
                check_header_value(secret.value, secret.source)
            except SecretError as exc:
                raise ConfigError(f"{self.ctx.source}: {where}: {exc}") from None
            secret.header = True
        if where not in secret.uses:
            secret.uses.append(where)
        return secret

    async def _load(self, vault: Vault, name: str) -> SecretVersion:
        # Built outside the running loop (see run_blocking): a client of its own, closed afterwards.
        arm = ArmClient(self.ctx.ssl_context, self.ctx.egress, timeout_s=vault.client.config.timeout_s)
        client = KeyVaultClient(vault.client.config, vault.client.token, arm)
        arm.acquire(self)
        try:
            return await client.get(vault.url, name)
        finally:
            await arm.release(self)

    # ------------------------------------------------------------------ lifecycle and status
    def start(self) -> None:
        for vault in self.vaults.values():
            vault.start()

    async def stop(self) -> None:
        for vault in self.vaults.values():
            await vault.stop()

    def status(self) -> list[dict[str, Any]]:
        return [s.status() for v in self.vaults.values() for s in v.secrets.values()]


def run_blocking(call: Coroutine[Any, Any, T]) -> T:
    """Run `call` to completion on an event loop of its own in a helper thread: configuration is built
    synchronously, before the server's loop runs (`serve`) or inside it (`check`, reload)."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append((True, asyncio.run(call)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name="keyvault-load", daemon=True)
    thread.start()
    thread.join()
    ok, result = outcome[0]
    if not ok:
        raise result
    return result  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------- entry points
def configure(ctx: BuildContext, config: KeyVaultConfig) -> KeyVaults:
    """The process's Key Vault access for `config`; a reload with other settings keeps the loaded secrets
    and applies the new interval (identity changes need a restart)."""
    vaults: KeyVaults | None = ctx.shared.get(_SHARED)
    if vaults is None:
        vaults = ctx.shared[_SHARED] = KeyVaults(ctx, config)
    elif vaults.config != config:
        if vaults.config.model_copy(update={"refresh_every_s": config.refresh_every_s}) != config:
            logger.warning("keyvault settings other than refresh_every_s take effect at the next restart")
        for vault in vaults.vaults.values():
            vault.refresh_every_s = config.refresh_every_s
        vaults.config = vaults.config.model_copy(update={"refresh_every_s": config.refresh_every_s})
    return vaults


def shared_vaults(ctx: BuildContext) -> KeyVaults | None:
    vaults: KeyVaults | None = ctx.shared.get(_SHARED)
    return vaults


def resolve(ref: KeyVaultRef, where: str, ctx: BuildContext, *, header: bool = False) -> KeyVaultSecret:
    """The secret `ref` names, loaded now (ConfigError naming vault and secret if that fails)."""
    vaults = ctx.shared.get(_SHARED)
    if vaults is None:
        vaults = configure(
            ctx, KeyVaultConfig.model_validate({})
        )  # built without a whole configuration (tests, tools)
    return vaults.secret(ref, where, header=header)


def refetcher(secrets: Sequence[Secret]) -> Callable[[], Awaitable[bool]] | None:
    """For a key credential: poll its Key Vault secrets at once when every key was rejected."""
    by_vault: dict[int, tuple[Vault, list[str]]] = {}
    for secret in secrets:
        if isinstance(secret, KeyVaultSecret):
            by_vault.setdefault(id(secret.owner), (secret.owner, []))[1].append(secret.name)
    if not by_vault:
        return None
    vaults = list(by_vault.values())

    async def refetch() -> bool:
        changed = False
        for vault, names in vaults:
            changed = await vault.refetch(names) or changed
        return changed

    return refetch


def print_keyvault_secrets(ctx: BuildContext) -> None:
    """`gateway check`: each Key Vault secret the configuration uses, with version and age, never a value."""
    vaults = shared_vaults(ctx)
    if vaults is None or not vaults.vaults:
        return
    print("KEY VAULT SECRET  VERSION  CREATED  AGE  USED BY")
    for vault in vaults.vaults.values():
        for secret in vault.secrets.values():
            print(
                f"{vault.url}/secrets/{secret.name}  {secret.version_id}  {created_text(secret.since)}  "
                f"{format_age(secret.since)}  {', '.join(secret.uses)}"
            )


def format_age(since: float) -> str:
    """A creation time as an age for people: `3 d`, `5 h`, `12 min`."""
    seconds = max(0.0, time.time() - since)
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def created_text(since: float) -> str:
    return dt.datetime.fromtimestamp(since, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
