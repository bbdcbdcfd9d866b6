"""Per-caller request rates (`inbound.limits`, `routes.NAME.limits.per_caller` and `callers`).

One algorithm everywhere, GCRA (the generic cell rate algorithm: a token bucket kept as one number per
caller, its "theoretical arrival time"): a caller may send `burst` requests at once and `requests_per_s`
after that. A request is admitted when every quota that applies to it (the gateway-wide one and the
route's) has room, and then counts against all of them; a refused request counts against none.

The counters live in a store: `LocalRateStore` (this process; memory bounded, idle callers forgotten)
or `gateway.ratelimit_redis.RedisRateStore` (shared by every replica, with a local fallback). Built once:

    store = build_rate_store(config.limits_store, ctx)          # kept across reloads if unchanged
    quotas = RateLimits(store, config.inbound.limits)
    route_quota = quotas.route("iris", route_config.limits)      # None: nothing limits this route
    grant = await route_quota.admit(caller_key, caller_label)    # raises RateLimited (429)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from gateway import metrics
from gateway.config import CallerLimitsConfig, LimitsStoreConfig, RatePolicyConfig
from gateway.errors import RateLimited

if TYPE_CHECKING:
    from gateway.credentials import BuildContext

# The IETF header fields, as in draft-ietf-httpapi-ratelimit-headers-10 (September 2025), sections 3-4:
#   RateLimit-Policy: "routes.iris";q=20;w=2     (quota q per window w seconds; a Structured Field List)
#   RateLimit: "routes.iris";r=0;t=1             (r: remaining quota units; t: seconds until more)
POLICY_HEADER = b"ratelimit-policy"
STATE_HEADER = b"ratelimit"
# Callers whose buckets a route remembers (beyond it, it forgets them all and starts again).
KNOWN_CALLERS = 4096
# Sums of float intervals drift by a few ulps; a request this early counts as on time.
_EPSILON_S = 1e-9


class RatePolicy:
    """One rate, ready for the hot path: GCRA's emission interval and tolerance, and its header item.

    `name` identifies the quota in the `RateLimit-Policy` and `RateLimit` fields and in store keys:
    `inbound` or `routes.<route>`."""

    __slots__ = (
        "_divided",
        "burst",
        "early_s",
        "interval_s",
        "item",
        "name",
        "redis_args",
        "requests_per_s",
        "tolerance_s",
    )

    def __init__(self, name: str, requests_per_s: float, burst: int) -> None:
        if not (requests_per_s > 0 and math.isfinite(requests_per_s)) or burst < 1:
            raise ValueError("a rate needs requests_per_s > 0 and burst >= 1")
        self.name = name
        self.requests_per_s = requests_per_s
        self.burst = burst
        self.interval_s = 1.0 / requests_per_s
        self.tolerance_s = burst * self.interval_s
        # How far ahead of now a caller's theoretical arrival time may run: the hot path's one number.
        self.early_s = self.tolerance_s - self.interval_s
        # The Redis script counts whole microseconds (Lua numbers are doubles: exact to 2**53).
        interval_us = max(1, round(1e6 / requests_per_s))
        self.redis_args = (str(interval_us), str(interval_us * burst))
        # The draft's window is whole seconds: the time a full burst takes to come back, and the
        # quota of that window never below the long-run rate.
        window = max(1, math.ceil(burst / requests_per_s))
        quota = max(burst, math.floor(requests_per_s * window))
        self.item = f'"{name}";q={quota};w={window}'
        self._divided: dict[int, RatePolicy] = {}

    @classmethod
    def of(cls, name: str, config: RatePolicyConfig) -> RatePolicy:
        return cls(name, config.requests_per_s, config.burst_requests)

    def divided(self, parts: int) -> RatePolicy:
        """This rate shared by `parts` processes that cannot see each other (Redis unreachable)."""
        if parts <= 1:
            return self
        policy = self._divided.get(parts)
        if policy is None:
            policy = RatePolicy(self.name, self.requests_per_s / parts, max(1, self.burst // parts))
            self._divided[parts] = policy
        return policy

    def __repr__(self) -> str:
        return f"RatePolicy({self.item})"


@dataclass(slots=True)
class RateDecision:
    """A store's answer for the buckets of one request, in their order. `retry_after_s` is 0 when
    allowed, else the time until every bucket has room; `reset_s` and `remaining` are per bucket: seconds
    until the bucket is full again, and requests left at once (None: not counted by the store, see
    `RateGrant.remaining`, since an admitted request rarely needs it)."""

    allowed: bool
    retry_after_s: float
    reset_s: list[float]
    remaining: list[int] | None = None


class RateStore(Protocol):
    async def acquire(self, buckets: Sequence[tuple[str, RatePolicy]]) -> RateDecision:
        """Admit one request against every (key, policy) bucket, all or none."""
        ...

    def status(self) -> dict[str, object]:
        """For `/readyz` details."""
        ...

    async def start(self) -> None:
        """Get ready on the serving event loop (optional: the first decision does it otherwise)."""
        ...

    async def aclose(self) -> None: ...


class LocalRateStore:
    """GCRA in this process. Memory stays bounded with many distinct callers: a caller whose bucket is
    full again is forgotten (it is the same as never seen), checked a few keys per new caller from the
    longest-idle end, and beyond `max_keys` the longest-idle callers are forgotten early (they get a
    fresh bucket: more lenient, never stricter)."""

    def __init__(self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_keys = max_keys
        self._clock = clock
        # key -> theoretical arrival time; ordered from least to most recently admitted.
        self._tats: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._tats)

    def decide(self, buckets: Sequence[tuple[str, RatePolicy]]) -> RateDecision:
        now = self._clock()
        wait = self.count(buckets, now)
        return RateDecision(not wait, wait, self.reset_s(buckets, now))

    def count(self, buckets: Sequence[tuple[str, RatePolicy]], now: float | None = None) -> float:
        """The decision alone, for the request path: 0.0 when the request was counted in every bucket,
        else the time before a retry fits (and nothing was counted)."""
        if now is None:
            now = self._clock()
        tats = self._tats
        if len(buckets) == 1:  # the usual case, one quota: no loops, no list
            key, policy = buckets[0]
            held = tats.get(key)
            start = now if held is None or held < now else held
            late = start - now - policy.early_s
            if late > _EPSILON_S:
                return late
            if held is None:
                tats[key] = start + policy.interval_s
                self._forget_idle(now)
            else:
                del tats[key]  # re-inserted last: the dict stays ordered by last admission
                tats[key] = start + policy.interval_s
            return 0.0
        wait = 0.0
        for key, policy in buckets:
            tat = tats.get(key, now)
            late = (tat if tat > now else now) + policy.interval_s - policy.tolerance_s - now
            if late > wait:
                wait = late
        if wait > _EPSILON_S:
            return wait
        new_caller = False
        for key, policy in buckets:
            held = tats.pop(key, None)  # re-inserted last: the dict stays ordered by last admission
            if held is None:
                new_caller = True
                held = now
            tats[key] = (held if held > now else now) + policy.interval_s
        if new_caller:  # only a new key grows the dict: forgetting keeps pace with new callers
            self._forget_idle(now)
        return 0.0

    def reset_s(self, buckets: Sequence[tuple[str, RatePolicy]], now: float | None = None) -> list[float]:
        """Per bucket, the time until it is full again."""
        if now is None:
            now = self._clock()
        tats = self._tats
        return [max(0.0, tats.get(key, now) - now) for key, _ in buckets]

    async def acquire(self, buckets: Sequence[tuple[str, RatePolicy]]) -> RateDecision:
        return self.decide(buckets)

    def _forget_idle(self, now: float) -> None:
        tats = self._tats
        for _ in range(2):  # amortised: two checks per admission keep pace with one new key per admission
            oldest = next(iter(tats), None)
            if oldest is None or tats[oldest] > now:
                break
            del tats[oldest]
        while len(tats) > self.max_keys:
            del tats[next(iter(tats))]

    def status(self) -> dict[str, object]:
        return {"store": "local", "callers_tracked": len(self._tats)}

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        self._tats.clear()


class CallerQuotas:
    """One config block's per-caller rates (`inbound.limits` or `routes.NAME.limits`)."""

    def __init__(self, name: str, config: CallerLimitsConfig) -> None:
        self.name = name
        self.prefix = name + ":"  # of store keys, "<quota name>:<caller key>": quota names hold no ':'
        self.default = None if config.per_caller is None else RatePolicy.of(name, config.per_caller)
        self.overrides = {caller: RatePolicy.of(name, rate) for caller, rate in config.callers.items()}


class RateLimits:
    """The gateway's per-caller quotas over one store: `inbound.limits` for every route, and each route's."""

    def __init__(self, store: RateStore, inbound: CallerLimitsConfig) -> None:
        self.store = store
        self.inbound = CallerQuotas("inbound", inbound) if inbound.limits_callers else None

    def route(self, route: str, limits: CallerLimitsConfig) -> RouteRateLimit | None:
        """The check for one route, or None when no quota applies to it (then there is nothing to call)."""
        own = CallerQuotas(f"routes.{route}", limits) if limits.limits_callers else None
        quotas = tuple(q for q in (self.inbound, own) if q is not None)
        return RouteRateLimit(route, self.store, quotas) if quotas else None


class RouteRateLimit:
    """The quotas one route's requests are checked against, in one store call per request."""

    def __init__(self, route: str, store: RateStore, quotas: tuple[CallerQuotas, ...]) -> None:
        self.route = route
        self.store = store
        self.quotas = quotas
        # A store in this process decides at once: no coroutine to await (`admit_now`).
        self._local = store if isinstance(store, LocalRateStore) else None
        self.decides_now = self._local is not None
        self._single = quotas[0] if len(quotas) == 1 else None
        # caller key -> its buckets (they never change for a route): a dict look-up per request.
        self._known: dict[str, list[tuple[str, RatePolicy]]] = {}

    async def admit(self, caller_key: str, caller_label: str) -> RateGrant | None:
        """Count one request of the caller `caller_key` (its name, or the client address of an anonymous
        caller). Raises RateLimited; returns None when no quota applies to this caller.
        `caller_label`: the bounded metric label of the caller (a configured name, else `other`)."""
        buckets = self._known.get(caller_key) or self._buckets(caller_key)
        if not buckets:
            return None
        local = self._local
        decision = local.decide(buckets) if local is not None else await self.store.acquire(buckets)
        grant = RateGrant(buckets, decision)
        if not decision.allowed:
            raise self._refusal(grant, caller_label)
        return grant

    def admit_now(self, caller_key: str, caller_label: str) -> None:
        """`admit` when `decides_now`, for the request path: no coroutine, nothing made for an admitted
        request."""
        buckets = self._known.get(caller_key) or self._buckets(caller_key)
        if buckets:
            local: LocalRateStore = self._local  # type: ignore[assignment]  # set whenever `decides_now`
            wait = local.count(buckets)
            if wait:
                decision = RateDecision(False, wait, local.reset_s(buckets))
                raise self._refusal(RateGrant(buckets, decision), caller_label)

    def _buckets(self, caller_key: str) -> list[tuple[str, RatePolicy]]:
        single = self._single
        if single is not None:  # the usual case: one quota, the route's or the gateway-wide one
            policy = single.overrides.get(caller_key, single.default)
            buckets = [] if policy is None else [(single.prefix + caller_key, policy)]
        else:
            buckets = []
            for quota in self.quotas:
                policy = quota.overrides.get(caller_key, quota.default)
                if policy is not None:
                    buckets.append((quota.prefix + caller_key, policy))
        known = self._known
        if len(known) >= KNOWN_CALLERS:
            known.clear()  # many distinct callers (anonymous addresses): start again, still correct
        known[caller_key] = buckets
        return buckets

    def _refusal(self, grant: RateGrant, caller_label: str) -> RateLimited:
        metrics.ADMISSION_REFUSALS.labels(self.route, "rate_limited", caller_label).inc()
        used_up = [bucket for bucket, left in zip(grant.buckets, grant.remaining(), strict=True) if not left]
        return RateLimited(
            f"the caller's request rate on route {self.route} is used up ({_rates(used_up)}); retry "
            "after the Retry-After delay",
            retry_after=grant.decision.retry_after_s,
            headers=grant.headers(),
        )


def _remaining(buckets: Sequence[tuple[str, RatePolicy]], aheads: list[float]) -> list[int]:
    """Requests each bucket takes at once, `aheads` seconds before it is full again."""
    return [
        max(0, int((policy.tolerance_s - ahead) / policy.interval_s + _EPSILON_S))
        for (_, policy), ahead in zip(buckets, aheads, strict=True)
    ]


def _rates(buckets: Sequence[tuple[str, RatePolicy]]) -> str:
    return "; ".join(f"{p.name}: {p.requests_per_s:g}/s, burst {p.burst}" for _, p in buckets)


@dataclass(slots=True)
class RateGrant:
    """An admission (or a refusal) and what the header fields say about it."""

    buckets: list[tuple[str, RatePolicy]]
    decision: RateDecision

    def remaining(self) -> list[int]:
        """Per bucket, requests left at once."""
        remaining = self.decision.remaining
        return _remaining(self.buckets, self.decision.reset_s) if remaining is None else remaining

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """`RateLimit-Policy` and `RateLimit` for the answer (a refusal carries them; an admitted
        request may)."""
        decision = self.decision
        remaining = self.remaining()
        policies = ", ".join(policy.item for _, policy in self.buckets)
        states = ", ".join(
            f'"{policy.name}";r={remaining[index]};'
            f"t={math.ceil(_next_unit_s(policy, decision.reset_s[index]) - _EPSILON_S)}"
            for index, (_, policy) in enumerate(self.buckets)
        )
        return ((POLICY_HEADER, policies.encode("ascii")), (STATE_HEADER, states.encode("ascii")))


def _next_unit_s(policy: RatePolicy, until_full_s: float) -> float:
    """Seconds until the bucket holds one more request than now (0 when it is full): the `t` of the draft.
    For a bucket that refused, that is the wait before a retry fits."""
    if until_full_s <= 0:
        return 0.0
    room = policy.tolerance_s - until_full_s
    return (math.floor(room / policy.interval_s + _EPSILON_S) + 1) * policy.interval_s - room


def build_rate_store(config: LimitsStoreConfig | None, ctx: BuildContext) -> RateStore:
    """The store `limits_store` names: Redis (shared by the replicas) or this process."""
    if config is None:
        return LocalRateStore()
    from gateway.ratelimit_redis import build_redis_store

    return build_redis_store(config.redis, ctx)
