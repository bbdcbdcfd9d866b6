"""Per-caller rate limits shared by every replica of the gateway, in Redis (`limits_store.redis`).

The scheme: the same GCRA as `gateway.ratelimit.LocalRateStore`, one Redis string per (quota, caller)
holding its theoretical arrival time in microseconds of Redis' own clock (`TIME`, so replicas with
skewed clocks agree), expiring when the bucket is full again (an idle caller costs no memory). One Lua
script decides every bucket of a request atomically, all or none, in one round trip: `EVALSHA` of the
script, loaded once with `SCRIPT LOAD`; after a Redis restart (`NOSCRIPT`) `EVAL` runs it and loads it
again. A refused request writes nothing.

When Redis is slow (no answer within `timeout_ms`) or down, the request is decided by a local store
whose rates are divided by `expected_replicas`, and so is every request after it until a background
probe (`PING` and `SCRIPT LOAD`, with backoff) succeeds: no request waits for Redis longer than
`timeout_ms`, and a dead Redis sees no reconnect per request. Both changes are logged once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import BlockingConnectionPool, Connection
from redis.exceptions import NoScriptError, RedisError

from gateway import metrics
from gateway.backoff import Backoff
from gateway.config import LiteralRef, RedisStoreConfig, check_redis_url
from gateway.credentials import BuildContext, resolve_secret
from gateway.errors import ConfigError
from gateway.ratelimit import LocalRateStore, RateDecision, RatePolicy
from gateway.redaction import redact
from gateway.secrets import LiteralSecret, Secret

logger = logging.getLogger("gateway.limits")
T = TypeVar("T")

# KEYS: one per bucket. ARGV: per bucket, its emission interval and tolerance (burst x interval), in us.
# Reply: {1 admitted | 0 refused, wait before a retry fits (us), then per bucket the time until it is
# full again (us)}.
GCRA_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tats = {}
local wait = 0
for i = 1, #KEYS do
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  tats[i] = tat
  local late = tat + tonumber(ARGV[2 * i - 1]) - tonumber(ARGV[2 * i]) - now
  if late > wait then wait = late end
end
local reply = {0, wait}
if wait > 0 then
  for i = 1, #KEYS do reply[2 + i] = tats[i] - now end
  return reply
end
reply[1] = 1
for i = 1, #KEYS do
  local ahead = tats[i] + tonumber(ARGV[2 * i - 1]) - now
  redis.call('SET', KEYS[i], string.format('%d', now + ahead), 'PX', math.ceil(ahead / 1000))
  reply[2 + i] = ahead
end
return reply
"""
GCRA_SHA = hashlib.sha1(GCRA_SCRIPT.encode()).hexdigest()

# Connections per gateway process: requests beyond it wait for one (within `timeout_ms`).
MAX_CONNECTIONS = 32


class _TlsConnection(Connection):
    """`rediss://` with the gateway's own TLS context (system CAs plus `tls.ca_bundle`, verified)."""

    def __init__(self, *, tls_context: ssl.SSLContext, **kwargs: Any) -> None:
        self._tls_context = tls_context
        super().__init__(**kwargs)

    def _connection_arguments(self) -> Mapping[str, Any]:
        arguments = dict(super()._connection_arguments())
        arguments["ssl"] = self._tls_context
        return arguments


def _connection_options(url: str, tls_context: ssl.SSLContext) -> tuple[str, dict[str, Any]]:
    """(what to call the server in logs, the pool's connection options). The name never holds the
    password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or 6379
    database = int(parts.path.strip("/") or 0)
    options: dict[str, Any] = {"host": host, "port": port, "db": database}
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password:
        options["password"] = unquote(parts.password)
    if parts.scheme == "rediss":
        options["connection_class"] = _TlsConnection
        options["tls_context"] = tls_context
    # Never the URL itself, not even without a password: a URL from a secret source is redacted as a
    # whole wherever it appears, which would blank out the one thing the log line is about.
    shown_host = f"[{host}]" if ":" in host else host
    tls = " (TLS)" if parts.scheme == "rediss" else ""
    return f"{shown_host}:{port}/{database}{tls}", options


class RedisRateStore:
    """The `RateStore` of `limits_store.redis`. Create and use it on the event loop that serves requests;
    `start()` loads the script (optional: the first request loads it otherwise), `aclose()` ends it."""

    def __init__(
        self,
        url: Secret,
        *,
        tls_context: ssl.SSLContext,
        key_prefix: str,
        timeout_s: float,
        expected_replicas: int,
        probe_backoff: Backoff | None = None,
    ) -> None:
        self._url = url
        self._tls_context = tls_context
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.expected_replicas = expected_replicas
        self._backoff = probe_backoff or Backoff(base_s=0.25, cap_s=5.0)
        self._fallback = LocalRateStore()
        self.falling_back = False
        self._since = time.time()
        self._reason: str | None = None
        self._probe: asyncio.Task[None] | None = None
        self._closed = False
        self._url_value = url.value
        self.target, self._client = self._connect(self._url_value)
        metrics.LIMITS_STORE_FALLBACK.set(0)

    def _connect(self, url: str) -> tuple[str, Redis]:
        target, options = _connection_options(url, self._tls_context)
        # No retries inside redis-py (connections from a pool of our own have none): a failure falls back
        # at once and the probe alone reconnects. RESP2: any Redis speaks it, and redis-py parses it with
        # about a third less CPU than RESP3 (~105 against ~150 us per EVALSHA here).
        pool = BlockingConnectionPool(max_connections=MAX_CONNECTIONS, timeout=None, protocol=2, **options)
        return target, Redis(connection_pool=pool)

    async def start(self) -> None:
        """Load the script now, so the first requests need no `EVAL`; a failure starts the fallback."""
        try:
            await _within(self._client.script_load(GCRA_SCRIPT), self.timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            self._fall_back(exc)

    async def acquire(self, buckets: Sequence[tuple[str, RatePolicy]]) -> RateDecision:
        if self.falling_back:
            return self._decide_locally(buckets)
        prefix = self.key_prefix
        keys = [prefix + key for key, _ in buckets]
        arguments: list[str] = []
        for _, policy in buckets:
            arguments.extend(policy.redis_args)
        try:
            reply = await _within(self._run(keys, arguments), self.timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            self._fall_back(exc)
            return self._decide_locally(buckets)
        return _decision(reply, buckets)

    async def _run(self, keys: list[str], arguments: list[str]) -> Any:
        client = self._client
        try:
            return await client.evalsha(GCRA_SHA, len(keys), *keys, *arguments)
        except NoScriptError:  # a restarted (or flushed) Redis: run it whole, which loads it again
            return await client.eval(GCRA_SCRIPT, len(keys), *keys, *arguments)

    def _decide_locally(self, buckets: Sequence[tuple[str, RatePolicy]]) -> RateDecision:
        parts = self.expected_replicas
        return self._fallback.decide([(key, policy.divided(parts)) for key, policy in buckets])

    def _fall_back(self, error: BaseException) -> None:
        self._reason = _describe(error, self.timeout_s)
        if self.falling_back or self._closed:
            return
        self.falling_back = True
        self._since = time.time()
        metrics.LIMITS_STORE_FALLBACK.set(1)
        logger.warning(
            "limits store: Redis at %s did not answer (%s); per-caller limits are decided in this process, "
            "divided by expected_replicas=%d, until it answers again",
            self.target,
            self._reason,
            self.expected_replicas,
        )
        self._probe = asyncio.get_running_loop().create_task(self._recover(), name="limits-store-probe")

    async def _recover(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._backoff.next_delay())
            url = self._url.value  # a rotated password (a file or Key Vault secret) is used from now on
            if url != self._url_value:
                await self._client.aclose()
                self._url_value = url
                self.target, self._client = self._connect(url)
            try:
                await _within(self._check(), self.timeout_s)
            except Exception as exc:  # whatever it is, the probe carries on
                self._reason = _describe(exc, self.timeout_s)
                continue
            fell_back_at = self._since
            self.falling_back = False
            self._since = time.time()
            self._reason = None
            self._backoff.reset()
            self._fallback = LocalRateStore()
            metrics.LIMITS_STORE_FALLBACK.set(0)
            logger.info(
                "limits store: Redis at %s answers again; per-caller limits are shared again (after %.0f s)",
                self.target,
                self._since - fell_back_at,
            )
            return

    async def _check(self) -> None:
        await self._client.ping()
        await self._client.script_load(GCRA_SCRIPT)

    def status(self) -> dict[str, object]:
        return {
            "store": "redis",
            "target": self.target,
            "state": "fallback" if self.falling_back else "shared",
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._since)),
            "reason": self._reason,
            "expected_replicas": self.expected_replicas,
        }

    async def aclose(self) -> None:
        self._closed = True
        probe = self._probe
        if probe is not None and not probe.done():
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
        await self._client.aclose()


async def _within(call: Awaitable[T], timeout_s: float) -> T:
    """`call`'s result, or TimeoutError once `timeout_s` has passed, without waiting for it to unwind:
    redis-py may take its time over a cancelled command (a connection handshake under way), and that
    time must not be the request's. `call` runs as a task of its own, cancelled when abandoned."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(call)
    task.add_done_callback(_retrieve)
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    task.add_done_callback(wake)
    timer = loop.call_later(timeout_s, wake)
    try:
        await waiter
    except BaseException:
        task.cancel()
        raise
    finally:
        timer.cancel()
    if not task.done():
        task.remove_done_callback(wake)
        task.cancel()
        raise TimeoutError
    return task.result()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """An abandoned call's late failure is expected, not "never retrieved"."""
    if not task.cancelled():
        task.exception()


def _decision(reply: Any, buckets: Sequence[tuple[str, RatePolicy]]) -> RateDecision:
    admitted, wait_us, *ahead_us = reply
    remaining: list[int] = []
    reset: list[float] = []
    for (_, policy), ahead in zip(buckets, ahead_us, strict=True):
        interval_us, tolerance_us = int(policy.redis_args[0]), int(policy.redis_args[1])
        remaining.append(max(0, (tolerance_us - int(ahead)) // interval_us))
        reset.append(max(0, int(ahead)) / 1e6)
    return RateDecision(bool(admitted), int(wait_us) / 1e6, reset, remaining)


def _describe(error: BaseException, timeout_s: float) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer within {timeout_s * 1000:g} ms"
    text = redact(str(error)) or type(error).__name__
    return f"{type(error).__name__}: {text[:200]}"


def build_redis_store(config: RedisStoreConfig, ctx: BuildContext) -> RedisRateStore:
    where = "limits_store.redis.url"
    spec = config.url
    if isinstance(spec, LiteralRef) and urlsplit(spec.value.get_secret_value()).password is None:
        url: Secret = LiteralSecret(spec.value.get_secret_value())  # no password: nothing to warn about
    else:
        url = resolve_secret(spec, where, ctx)
    try:
        check_redis_url(url.value)
    except ValueError as exc:
        raise ConfigError(f"{ctx.source}: {where}: {exc}") from None
    return RedisRateStore(
        url,
        tls_context=ctx.ssl_context,
        key_prefix=config.key_prefix,
        timeout_s=config.timeout_ms / 1000,
        expected_replicas=config.expected_replicas,
    )
