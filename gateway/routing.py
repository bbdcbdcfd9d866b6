"""Routes at run time: prefix matching, the path rules that keep a request inside its route, and
upstream selection with passive outlier detection. Everything here is prepared at start-up."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlsplit

from gateway import metrics
from gateway.client import Origin
from gateway.credentials.base import Credential
from gateway.errors import BadRequestPath
from gateway.secrets import Secret

logger = logging.getLogger("gateway.routing")

# Percent-encodings that could change how a path splits into segments after we forwarded it.
_DANGEROUS_ENCODINGS = (b"%2e", b"%2f", b"%5c", b"%00")
# How many rounds of decoding an upstream (or a chain of them) may apply: `%25%32%65` is `%2e` once
# decoded and `.` twice; three rounds cover every chain we know of.
_DECODE_ROUNDS = 3


class Upstream:
    """One upstream URL of a route and its passive health (consecutive failures, ejection)."""

    def __init__(self, url: str, pool: Origin, *, priority: int = 0, weight: int = 1) -> None:
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.pool = pool
        self.host_bytes = pool.host_header
        self.path_bytes = parts.path.encode("latin-1")
        self.priority = priority
        self.weight = weight
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.probing = False
        self.ejections = 0

    def available(self, now: float) -> bool:
        if self.ejected_until == 0.0:
            return True
        # After the cool-down one request probes the upstream; the rest wait for its verdict.
        return now >= self.ejected_until and not self.probing

    def __repr__(self) -> str:
        return f"Upstream(url={self.url!r})"


@dataclass(slots=True, eq=False)
class Route:
    name: str
    prefix: str
    upstreams: list[Upstream]
    credential: Credential
    headers: list[tuple[bytes, bytes | Secret]]
    timeout_s: float
    connect_timeout_s: float
    read_timeout_s: float
    max_body_bytes: int
    replay_buffer_bytes: int
    write_timeout_s: float = 30.0
    pool_timeout_s: float = 5.0
    retry_attempts: int = 3
    retry_statuses: frozenset[int] = frozenset({429, 502, 503, 504})
    retry_on_connection_errors: bool = True
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0
    retry_after_cap_s: float = 5.0
    budget_ratio: float = 0.2
    deadline_s: float | None = None
    outlier_failures: int = 5
    ejection_s: float = 30.0
    max_concurrent: int | None = None
    queue_timeout_s: float = 1.0
    credential_key: tuple[str, object] = ("", None)
    header_names: frozenset[bytes] = frozenset()
    # The route's fixed header lines, in wire form once; secret-backed ones are read per request.
    static_header_lines: bytes = b""
    secret_headers: tuple[tuple[bytes, Secret], ...] = ()
    prefix_bytes: bytes = b""
    semaphore: asyncio.Semaphore | None = None
    waiters: int = 0
    in_flight: Any = None  # the route's bound in-flight gauge
    # Retry budget: decaying counts of requests and retries.
    budget_requests: float = 0.0
    budget_retries: float = 0.0
    budget_stamp: float = 0.0
    _by_priority: list[list[Upstream]] = field(default_factory=list)

    @property
    def max_queue(self) -> int:
        return self.max_concurrent or 0

    def __post_init__(self) -> None:
        self.prefix_bytes = self.prefix.encode()
        self.header_names = frozenset(name.lower() for name, _ in self.headers)
        self.static_header_lines = b"".join(
            name + b": " + value + b"\r\n" for name, value in self.headers if isinstance(value, bytes)
        )
        self.secret_headers = tuple(
            (name, value) for name, value in self.headers if not isinstance(value, bytes)
        )
        if self.max_concurrent is not None:
            self.semaphore = asyncio.Semaphore(self.max_concurrent)
        self.in_flight = metrics.IN_FLIGHT.labels(self.name)
        groups: dict[int, list[Upstream]] = {}
        for upstream in self.upstreams:
            groups.setdefault(upstream.priority, []).append(upstream)
        self._by_priority = [groups[p] for p in sorted(groups)]

    @property
    def single_upstream(self) -> Upstream | None:
        return self.upstreams[0] if len(self.upstreams) == 1 else None

    def pick_upstream(self, tried: tuple[Upstream, ...] = ()) -> Upstream:
        """The preferred available upstream not yet tried by this request; an ejected one as a last resort."""
        now = time.monotonic()
        for group in self._by_priority:
            candidates = [u for u in group if u not in tried and u.available(now)]
            if candidates:
                chosen = candidates[0] if len(candidates) == 1 else _weighted(candidates)
                if chosen.ejected_until and now >= chosen.ejected_until:
                    chosen.probing = True
                return chosen
        fresh = [u for u in self.upstreams if u not in tried] or self.upstreams
        return min(fresh, key=lambda u: u.ejected_until)

    def record_success(self, upstream: Upstream) -> None:
        if upstream.consecutive_failures or upstream.ejected_until:
            if upstream.ejected_until:
                logger.warning("route %s: upstream %s is healthy again", self.name, upstream.origin)
            upstream.consecutive_failures = 0
            upstream.ejected_until = 0.0
            upstream.probing = False

    def record_failure(self, upstream: Upstream) -> bool:
        """Count a failure; return True when it ejected the upstream."""
        upstream.consecutive_failures += 1
        if upstream.probing or upstream.consecutive_failures >= self.outlier_failures:
            now = time.monotonic()
            # Requests that were already in flight keep failing after the ejection: that extends it,
            # but it is the same ejection (one count, one log line), not a new one per failure.
            already_ejected = upstream.ejected_until > now and not upstream.probing
            upstream.probing = False
            upstream.ejected_until = now + self.ejection_s
            if already_ejected:
                return False
            upstream.ejections += 1
            metrics.UPSTREAM_EJECTIONS.labels(self.name, upstream.origin).inc()
            if len(self.upstreams) > 1 or upstream.consecutive_failures == self.outlier_failures:
                logger.warning(
                    "route %s: upstream %s ejected for %.0f s after %d consecutive failures",
                    self.name,
                    upstream.origin,
                    self.ejection_s,
                    upstream.consecutive_failures,
                )
            return True
        return False

    def allow_retry(self) -> bool:
        """Retry budget: retries stay below `budget_ratio` of recent requests (10 s decay)."""
        self._decay()
        if self.budget_retries + 1 > max(self.budget_ratio * self.budget_requests, 1.0):
            return False
        self.budget_retries += 1
        return True

    def count_request(self) -> None:
        self._decay()
        self.budget_requests += 1

    def _decay(self) -> None:
        now = time.monotonic()
        elapsed = now - self.budget_stamp
        if elapsed >= 1.0:
            factor = 0.9**elapsed  # roughly a 10 s window
            self.budget_requests *= factor
            self.budget_retries *= factor
            self.budget_stamp = now

    def forward_path(self, path: str, raw_path: bytes | None) -> bytes:
        """The part of the request path after the route prefix, in its original encoding."""
        if raw_path is not None and raw_path.startswith(self.prefix_bytes):
            return raw_path[len(self.prefix_bytes) :]
        return quote(path[len(self.prefix) :], safe="/:@!$&'()*+,;=-._~").encode("latin-1")


def _weighted(candidates: list[Upstream]) -> Upstream:
    total = sum(u.weight for u in candidates)
    point = random.random() * total
    for upstream in candidates:
        point -= upstream.weight
        if point < 0:
            return upstream
    return candidates[-1]


def check_path(path: str, raw_path: bytes | None) -> None:
    """Reject paths that could leave their route once an upstream normalises them."""
    if "\\" in path or "\x00" in path or "/." in path:
        for segment in path.split("/"):
            # `..;x` is `..` to servers that strip path parameters (Tomcat and friends).
            if segment.split(";", 1)[0] in (".", ".."):
                raise BadRequestPath("the path contains '.' or '..' segments; send a normalised path")
        if "\\" in path or "\x00" in path:
            raise BadRequestPath("the path contains a backslash or a NUL byte")
    if raw_path is not None and b"%" in raw_path:
        current = raw_path
        for _ in range(_DECODE_ROUNDS):
            lowered = current.lower()
            for encoding in _DANGEROUS_ENCODINGS:
                if encoding in lowered:
                    raise BadRequestPath(
                        "the path contains an encoded '.', '/', '\\' or NUL (also %25-encoded); send a "
                        "plain, normalised path"
                    )
            decoded = unquote_to_bytes(current)
            if decoded == current or b"%" not in decoded:
                break
            current = decoded


class Router:
    """Longest-prefix match at a segment boundary: `/iris` matches `/iris` and `/iris/x`, not `/irises`."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        self.by_name = {r.name: r for r in routes}
        self._exact = {r.prefix: r for r in routes}

    def match(self, path: str) -> Route | None:
        route = self._exact.get(path)
        if route is not None:
            return route
        for route in self.routes:
            prefix = route.prefix
            if path.startswith(prefix) and path[len(prefix) : len(prefix) + 1] == "/":
                return route
        return None
