"""A route's upstreams: selection by priority and weight, and passive outlier detection.

An upstream that fails `outlier.consecutive_failures` times in a row is ejected for `outlier.ejection_s`
(a failure: no connection, a timeout, a 5xx other than 501, or an answer that broke off mid-body; a
success: any other answer, once it arrived whole); then one request probes it while the others keep to
the rest. The probe ends on every exit of its attempt: a verdict (an answer, a failure), or none (the
client went away, its body broke the limit, an exception, a cancellation) and then the next request
probes again. A probe also has its own deadline (`outlier.probe_timeout_s`): one that has no verdict by
then (a slow model) stops blocking the others.
"""

from __future__ import annotations

import logging
import random
import time
from urllib.parse import urlsplit

from gateway import metrics
from gateway.client import Origin

logger = logging.getLogger("gateway.routing")


class Upstream:
    """One upstream URL of a route and its passive health (consecutive failures, ejection, probe)."""

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
        self.ejections = 0
        # The request probing this ejected upstream (any object that identifies it), and until when.
        self.probe_owner: object | None = None
        self.probe_until = 0.0

    def available(self, now: float) -> bool:
        if self.ejected_until == 0.0:
            return True
        # After the cool-down one request probes the upstream; the rest wait for its verdict.
        return now >= self.ejected_until and (self.probe_owner is None or now >= self.probe_until)

    def __repr__(self) -> str:
        return f"Upstream(url={self.url!r})"


class Balancer:
    """Picks the upstream for each attempt and keeps the upstreams' health."""

    def __init__(
        self,
        route: str,
        upstreams: list[Upstream],
        *,
        outlier_failures: int = 5,
        ejection_s: float = 30.0,
        probe_timeout_s: float = 10.0,
    ) -> None:
        self.route = route
        self.upstreams = upstreams
        self.outlier_failures = outlier_failures
        self.ejection_s = ejection_s
        self.probe_timeout_s = probe_timeout_s
        groups: dict[int, list[Upstream]] = {}
        for upstream in upstreams:
            groups.setdefault(upstream.priority, []).append(upstream)
        self._by_priority = [groups[p] for p in sorted(groups)]

    def pick(self, tried: tuple[Upstream, ...] = (), owner: object | None = None) -> Upstream:
        """The preferred available upstream not yet tried by this request; an ejected one as a last resort.
        When the pick is an ejected upstream whose cool-down is over, `owner` probes it."""
        now = time.monotonic()
        for group in self._by_priority:
            candidates = [u for u in group if u not in tried and u.available(now)]
            if candidates:
                chosen = candidates[0] if len(candidates) == 1 else _weighted(candidates)
                if chosen.ejected_until and owner is not None:
                    chosen.probe_owner = owner
                    chosen.probe_until = now + self.probe_timeout_s
                return chosen
        fresh = [u for u in self.upstreams if u not in tried] or self.upstreams
        return min(fresh, key=lambda u: u.ejected_until)

    def answered(self, upstream: Upstream, status: int, owner: object | None = None) -> None:
        """The head of the upstream's answer arrived: a server error counts as a failure at once (501 is
        an answer). Any other answer is a success only once its body has arrived whole (`completed`,
        or `succeeded` for one the gateway discards): an upstream whose answers break off mid-body
        would otherwise be healthy again at every head, and never reach `consecutive_failures`."""
        if status >= 500 and status != 501:
            self.failed(upstream, owner)

    def completed(self, upstream: Upstream, status: int) -> None:
        """The answer with `status` arrived whole: a success unless its status was a failure already."""
        if status < 500 or status == 501:
            self.succeeded(upstream)

    def succeeded(self, upstream: Upstream) -> None:
        if upstream.consecutive_failures or upstream.ejected_until:
            if upstream.ejected_until:
                logger.warning("route %s: upstream %s is healthy again", self.route, upstream.origin)
            upstream.consecutive_failures = 0
            upstream.ejected_until = 0.0
            upstream.probe_owner = None

    def failed(self, upstream: Upstream, owner: object | None = None) -> bool:
        """Count a failure; return True when it ejected the upstream."""
        upstream.consecutive_failures += 1
        probing = upstream.probe_owner is not None and upstream.probe_owner is owner
        if probing or upstream.consecutive_failures >= self.outlier_failures:
            now = time.monotonic()
            # Requests that were already in flight keep failing after the ejection: that extends it,
            # but it is the same ejection (one count, one log line), not a new one per failure.
            already_ejected = upstream.ejected_until > now and not probing
            if probing:
                upstream.probe_owner = None
            upstream.ejected_until = now + self.ejection_s
            if already_ejected:
                return False
            upstream.ejections += 1
            metrics.UPSTREAM_EJECTIONS.labels(self.route, upstream.origin).inc()
            if len(self.upstreams) > 1 or upstream.consecutive_failures == self.outlier_failures:
                logger.warning(
                    "route %s: upstream %s ejected for %.0f s after %d consecutive failures",
                    self.route,
                    upstream.origin,
                    self.ejection_s,
                    upstream.consecutive_failures,
                )
            return True
        return False

    def release(self, owner: object) -> None:
        """The request `owner` ended: a probe it still holds (no verdict: the client went away, its body
        broke the limit, an exception, a cancellation) ends with it, and the next request probes."""
        for upstream in self.upstreams:
            if upstream.probe_owner is owner:
                upstream.probe_owner = None


def _weighted(candidates: list[Upstream]) -> Upstream:
    total = sum(u.weight for u in candidates)
    point = random.random() * total
    for upstream in candidates:
        point -= upstream.weight
        if point < 0:
            return upstream
    return candidates[-1]
