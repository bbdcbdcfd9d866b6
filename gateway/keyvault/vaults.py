"""The Key Vault secrets the configuration uses, and the poll loop of each vault.

Every secret of one vault shares one poll loop, which sends one `GET {vault}/secrets/{name}` per secret
every `keyvault.refresh_every_s`; a new version is in use within one interval, without a restart.

A configuration's secrets are read before it is built (`KeyVaults.load`, awaited: a reload never blocks
the event loop), then handed out while it is built (`secret`), then `commit` makes exactly the secrets
the running configuration uses the polled ones: new ones start being polled, those a reload removed
stop. A secret that cannot be read is a ConfigError naming the vault, the secret and where it is used.

Afterwards a failed poll (the vault unreachable, the current version disabled, a value that is empty,
too large, or not fit for a header) keeps the last good value, is logged once (and its recovery once),
shows in `/readyz` under `keyvault` and in `gateway_keyvault_secret_stale`. A value is registered with
`gateway.redaction` only once it passed every check, and never leaves this module except through
`.value`. When the upstream rejects every key of a route whose keys come from here, `refetcher` reads
them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from gateway import metrics, redaction
from gateway.config import KeyVaultConfig, KeyVaultRef
from gateway.errors import ConfigError, SecretError
from gateway.keyvault.client import KeyVaultClient, KeyVaultError, SecretVersion
from gateway.secrets import Secret, check_header_value

logger = logging.getLogger("gateway.keyvault")

# After every key of a route was rejected, its Key Vault secrets are read at once, at most this often.
REFETCH_MIN_INTERVAL_S = 1.0

SecretKey = tuple[str, str]  # (vault URL, secret name)


class KeyVaultSecret(Secret):
    """The current version of one Key Vault secret; `value` is the last one that passed every check."""

    def __init__(self, owner: Vault, name: str, first: SecretVersion, *, header: bool) -> None:
        super().__init__(f"keyvault:{owner.url}/secrets/{name}")
        self.owner = owner
        self.vault = owner.url
        self.name = name
        self.uses: list[str] = []  # where the configuration uses it, e.g. routes.iris.auth.primary
        self.header = header
        self._check(first)
        redaction.register(first.value)
        self._value = first.value
        self.version_id = first.version
        self.since = first.created or time.time()
        self.checked_at = time.time()
        self.error: str | None = None
        self.failures = 0  # consecutive failed reads

    @property
    def value(self) -> str:
        return self._value

    def _check(self, fetched: SecretVersion) -> None:
        if self.header:
            check_header_value(fetched.value, f"{self.source} version {fetched.version}")

    def require_header(self) -> None:
        """From now on the value goes into a header: check the held one now, and every new one."""
        if not self.header:
            check_header_value(self._value, f"{self.source} version {self.version_id}")
            self.header = True

    def store(self, fetched: SecretVersion) -> bool:
        """Keep a newly fetched version once it passed the checks (SecretError otherwise, and the last
        good value stays); True when the value changed."""
        self.checked_at = time.time()
        self._check(fetched)
        if fetched.value == self._value:
            self.version_id = fetched.version
            return False
        redaction.register(fetched.value)
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
    """One vault's polled secrets and the poll loop they share."""

    def __init__(self, url: str, refresh_every_s: float, client: KeyVaultClient) -> None:
        self.url = url
        self.label = urlsplit(url).netloc
        self.refresh_every_s = refresh_every_s
        self.client = client
        self.secrets: dict[str, KeyVaultSecret] = {}
        # Monotonic: Key Vault answered a read with 429 or 5xx and Retry-After (clamped by azure_rest):
        # no secret of this vault is read before then. Its limits are per vault, so a pause asked for
        # in the answer about one secret holds for the others too.
        self.retry_at = 0.0
        self._task: asyncio.Task[None] | None = None
        # Re-reads after a rejection, one in flight per set of secrets (a route's keys), each rate-limited.
        self._refetches: dict[frozenset[str], asyncio.Task[bool]] = {}
        self._refetched_at: dict[frozenset[str], float] = {}

    # ------------------------------------------------------------------ polling
    async def poll(self, names: Sequence[str] | None = None) -> bool:
        """One request per secret; True when any value changed. Failures keep the last value. Nothing is
        sent while the vault asked for a pause (`retry_at`)."""
        if self.retry_at > time.monotonic():
            return False
        chosen = [s for n in (names or list(self.secrets)) if (s := self.secrets.get(n)) is not None]
        results = await asyncio.gather(*(self._poll_one(s) for s in chosen))
        return any(results)

    async def _poll_one(self, secret: KeyVaultSecret) -> bool:
        try:
            fetched = await self.client.get(self.url, secret.name)
            changed = secret.store(fetched)
        except KeyVaultError as exc:
            if exc.retry_after is not None:  # Key Vault asked for a pause (clamped to at most 60 s)
                self.retry_at = max(self.retry_at, time.monotonic() + exc.retry_after)
            self._failed(secret, str(exc))
            return False
        except SecretError as exc:
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
        """Read `names` now: True if a value changed. Single flight per set of names (a route's keys), and
        at most once per REFETCH_MIN_INTERVAL_S per set: another route's re-read of other secrets of the
        same vault neither answers for this one nor delays it."""
        key = frozenset(names)
        task = self._refetches.get(key)
        if task is not None:
            return await asyncio.shield(task)
        if time.monotonic() - self._refetched_at.get(key, -math.inf) < REFETCH_MIN_INTERVAL_S:
            return False
        self._refetched_at[key] = time.monotonic()
        logger.warning(
            "Key Vault %s: the upstream rejected every key; reading %s again now", self.url, ", ".join(names)
        )
        task = self._refetches[key] = asyncio.get_running_loop().create_task(self.poll(names))
        try:
            return await asyncio.shield(task)
        finally:
            if self._refetches.get(key) is task:
                del self._refetches[key]

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

    @property
    def polling(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if not self.polling:
            self.client.rest.acquire(self)
            self._task = asyncio.get_running_loop().create_task(
                self._poll_forever(), name=f"keyvault poll {self.url}"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.client.rest.release(self)

    def __repr__(self) -> str:
        return f"Vault(url={self.url!r}, secrets={sorted(self.secrets)!r})"


class KeyVaults:
    """Every vault and Key Vault secret of the process; one per assembly (`gateway.assembly`)."""

    def __init__(
        self, config: KeyVaultConfig, source: str, make_client: Callable[[], KeyVaultClient]
    ) -> None:
        self.config = config
        self.source = source
        self.vaults: dict[str, Vault] = {}
        self._make_client = make_client
        self._client: KeyVaultClient | None = None
        self._read: dict[SecretKey, SecretVersion] = {}  # read by `load`, not built yet
        self._failed: dict[SecretKey, KeyVaultError] = {}  # failed in the last `load`
        self._built: dict[SecretKey, KeyVaultSecret] = {}  # built since the last commit
        self._running = False
        self._stopping: set[asyncio.Task[None]] = set()

    def client(self) -> KeyVaultClient:
        """The REST client, with `keyvault.identity`'s token (ConfigError for an unusable identity)."""
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _vault(self, url: str) -> Vault:
        vault = self.vaults.get(url)
        if vault is None:
            vault = self.vaults[url] = Vault(url, self.config.refresh_every_s, self.client())
        return vault

    def _held(self, key: SecretKey) -> KeyVaultSecret | None:
        vault = self.vaults.get(key[0])
        return None if vault is None else vault.secrets.get(key[1])

    # ------------------------------------------------------------------ building a configuration
    async def load(self, refs: Iterable[KeyVaultRef]) -> None:
        """Read, concurrently, every secret of `refs` not held yet; each read is bounded by
        `keyvault.timeout_s`. Failures are reported by `secret` (where the configuration uses it)."""
        self._read.clear()
        self._failed.clear()
        self._built.clear()
        wanted = {(r.keyvault.vault, r.keyvault.secret) for r in refs}
        missing = sorted(key for key in wanted if self._held(key) is None)
        if not missing:
            return
        client = self.client()
        client.rest.acquire(self)
        try:
            outcomes = await asyncio.gather(
                *(client.get(vault, name) for vault, name in missing), return_exceptions=True
            )
        finally:
            await client.rest.release(self)
        for key, outcome in zip(missing, outcomes, strict=True):
            if isinstance(outcome, SecretVersion):
                self._read[key] = outcome
            elif isinstance(outcome, KeyVaultError):
                self._failed[key] = outcome
            elif isinstance(outcome, BaseException):
                raise outcome

    def secret(self, ref: KeyVaultRef, where: str, *, header: bool) -> KeyVaultSecret:
        """The secret `ref` names, as read by `load` (no I/O). ConfigError naming `where` when it could
        not be read or its value does not fit where it is used."""
        key = (ref.keyvault.vault, ref.keyvault.secret)
        secret = self._held(key) or self._built.get(key)
        try:
            if secret is None:
                read = self._read.get(key)
                if read is None:
                    failure = self._failed.get(key)
                    if failure is None:
                        raise KeyVaultError(
                            f"Key Vault {key[0]}: secret {key[1]} was not read before the configuration "
                            "was built"
                        )
                    raise failure
                secret = KeyVaultSecret(self._vault(key[0]), key[1], read, header=header)
                self._built[key] = secret
            elif header:
                secret.require_header()
        except (KeyVaultError, SecretError) as exc:
            raise ConfigError(f"{self.source}: {where}: {exc}") from None
        return secret

    def commit(self, uses: dict[SecretKey, list[str]]) -> None:
        """The running configuration uses exactly `uses` (secret -> where): poll those, stop polling the
        rest (a vault left without secrets stops its loop). A secret read but not built yet (the TLS
        listener's, built once the server starts) is held from here."""
        for key, read in self._read.items():
            if key in uses and key not in self._built and self._held(key) is None:
                self._built[key] = KeyVaultSecret(self._vault(key[0]), key[1], read, header=False)
        for key, secret in self._built.items():
            if key in uses and self._held(key) is None:
                secret.owner.secrets[key[1]] = secret
        self._built.clear()
        self._read.clear()
        self._failed.clear()
        for url, vault in list(self.vaults.items()):
            for name, secret in list(vault.secrets.items()):
                if (url, name) in uses:
                    secret.uses = list(uses[(url, name)])
                    continue
                del vault.secrets[name]
                metrics.KEYVAULT_SECRET_STALE.labels(vault.label, name).set(0)
                logger.warning(
                    "Key Vault %s: secret %s is no longer used; it is not read any more", url, name
                )
            if not vault.secrets:
                del self.vaults[url]
                if vault.polling:  # only while running, so within the serving loop
                    task = asyncio.get_running_loop().create_task(vault.stop())
                    self._stopping.add(task)
                    task.add_done_callback(self._stopping.discard)
            elif self._running:
                vault.start()

    def configure(self, config: KeyVaultConfig) -> None:
        """Apply the settings of a reloaded configuration: the poll interval; the rest needs a restart."""
        if config == self.config:
            return
        if self.config.model_copy(update={"refresh_every_s": config.refresh_every_s}) != config:
            logger.warning("keyvault settings other than refresh_every_s take effect at the next restart")
        self.config = self.config.model_copy(update={"refresh_every_s": config.refresh_every_s})
        for vault in self.vaults.values():
            vault.refresh_every_s = config.refresh_every_s

    # ------------------------------------------------------------------ lifecycle and status
    def start(self) -> None:
        self._running = True
        for vault in self.vaults.values():
            vault.start()

    async def stop(self) -> None:
        self._running = False
        for vault in self.vaults.values():
            await vault.stop()
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    def secrets(self) -> list[KeyVaultSecret]:
        return [s for v in self.vaults.values() for s in v.secrets.values()]

    def status(self) -> list[dict[str, Any]]:
        return [s.status() for s in self.secrets()]


def refetcher(secrets: Sequence[Secret]) -> Callable[[], Awaitable[bool]] | None:
    """For a key credential: read its Key Vault secrets at once when every key was rejected."""
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
