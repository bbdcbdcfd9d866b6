"""Routes at run time: prefix matching, and what a route holds once prepared at start-up. Path rules are in
`gateway.paths`, upstream selection and outlier detection in `gateway.upstreams`, the replay policy and
its budget in `gateway.retry`."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote

from gateway import metrics
from gateway.callers import RouteAccess
from gateway.concurrency import ConcurrencyLimit
from gateway.credentials.base import Credential
from gateway.paths import check_path
from gateway.ratelimit import RouteRateLimit
from gateway.retry import ReplayPolicy
from gateway.secrets import Secret
from gateway.upstreams import Balancer, Upstream

# The client's choice of deployment: forwarded only from callers the route's `callers.may_pin_deployment`
# names (see `gateway.proxy`); from everyone else it is dropped like a header the route sets itself.
DEPLOYMENT_HEADER = b"azureml-model-deployment"


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
    replay: ReplayPolicy = field(default_factory=ReplayPolicy)
    outlier_failures: int = 5
    ejection_s: float = 30.0
    probe_timeout_s: float = 10.0
    credential_key: tuple[str, object] = ("", None)
    # `routes.NAME.callers`; None: every caller may use the route, and nobody may choose its deployment.
    access: RouteAccess | None = None
    # Admission (`routes.NAME.limits`, `inbound.limits`); None: nothing to check, nothing to pay.
    rate_limit: RouteRateLimit | None = None
    concurrency: ConcurrencyLimit | None = None
    concurrency_key: tuple[object, ...] | None = None  # what it was built from (kept across a reload)
    # Client headers never forwarded: those the route sets, and the deployment the client may not choose.
    header_names: frozenset[bytes] = frozenset()
    # The route's fixed header lines, in wire form once; secret-backed ones are read per request.
    static_header_lines: bytes = b""
    secret_headers: tuple[tuple[bytes, Secret], ...] = ()
    prefix_bytes: bytes = b""
    in_flight: metrics.InFlight = field(init=False)  # the route's requests in flight
    balancer: Balancer = field(init=False)
    single_upstream: Upstream | None = field(init=False)  # the route's only upstream: no balancer to ask

    def __post_init__(self) -> None:
        self.prefix_bytes = self.prefix.encode()
        self.header_names = frozenset(name.lower() for name, _ in self.headers) | {DEPLOYMENT_HEADER}
        self.static_header_lines = b"".join(
            name + b": " + value + b"\r\n" for name, value in self.headers if isinstance(value, bytes)
        )
        self.secret_headers = tuple(
            (name, value) for name, value in self.headers if not isinstance(value, bytes)
        )
        self.in_flight = metrics.in_flight(self.name)
        self.single_upstream = self.upstreams[0] if len(self.upstreams) == 1 else None
        self.balancer = Balancer(
            self.name,
            self.upstreams,
            outlier_failures=self.outlier_failures,
            ejection_s=self.ejection_s,
            probe_timeout_s=self.probe_timeout_s,
        )

    def forward_path(self, path: str, raw_path: bytes | None) -> bytes:
        """The part of the request path after the route prefix, in its original encoding."""
        if raw_path is not None and raw_path.startswith(self.prefix_bytes):
            return raw_path[len(self.prefix_bytes) :]
        return quote(path[len(self.prefix) :], safe="/:@!$&'()*+,;=-._~").encode("latin-1")


# How many distinct request paths the router remembers as checked and matched (see `Router.resolve`).
CHECKED_PATHS = 1024


class Router:
    """Longest-prefix match at a segment boundary: `/iris` matches `/iris` and `/iris/x`, not `/irises`."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        self.by_name = {r.name: r for r in routes}
        self._exact = {r.prefix: r for r in routes}
        # Raw request path -> its route, for paths that passed the path rules and matched a route. Hot
        # path: a client calls the same few paths over and over, and the rules (percent-decoding rounds,
        # segment checks) and the prefix match give the same answer every time. Refusals and misses are
        # never remembered (they are checked again, and answered the same). Bounded: emptied when full.
        self._checked: dict[bytes, Route] = {}

    def resolve(self, path: str, raw_path: bytes) -> Route | None:
        """The route of a request path that passes the path rules (`gateway.paths`), None when no route
        matches; raises BadRequestPath. `path` is `raw_path` percent-decoded (as the server protocol
        parses it)."""
        route = self._checked.get(raw_path)
        if route is not None:
            return route
        check_path(path, raw_path)
        route = self.match(path)
        if route is not None:
            checked = self._checked
            if len(checked) >= CHECKED_PATHS:
                checked.clear()
            checked[raw_path] = route
        return route

    def match(self, path: str) -> Route | None:
        route = self._exact.get(path)
        if route is not None:
            return route
        for route in self.routes:
            prefix = route.prefix
            if path.startswith(prefix) and path[len(prefix) : len(prefix) + 1] == "/":
                return route
        return None
