from __future__ import annotations

import pytest

from gateway.client import UpstreamClient
from gateway.credentials.base import NoCredential
from gateway.errors import BadRequestPath
from gateway.paths import check_path
from gateway.retry import RetryBudget
from gateway.routing import Route, Router
from gateway.upstreams import Upstream

CLIENT = UpstreamClient(None)


def _upstream(url: str, **options: int) -> Upstream:
    return Upstream(url, CLIENT.origin(url), **options)


def _route(name: str, prefix: str, *upstreams: Upstream) -> Route:
    return Route(
        name=name,
        prefix=prefix,
        upstreams=list(upstreams) or [_upstream("http://u/score")],
        credential=NoCredential(name),
        headers=[],
        timeout_s=1,
        connect_timeout_s=1,
        read_timeout_s=1,
        max_body_bytes=100,
        replay_buffer_bytes=10,
    )


def test_resolve_remembers_only_paths_that_passed_and_stays_bounded(monkeypatch):
    """Router.resolve runs the path rules once per distinct raw path that passed them; a refused path is
    refused every time, a path without a route answers None every time, and the memory is bounded."""
    import gateway.routing as routing

    router = Router([_route("iris", "/iris")])
    calls = []

    def counting_check(path: str, raw_path: bytes | None) -> None:
        calls.append(raw_path)
        check_path(path, raw_path)

    monkeypatch.setattr(routing, "check_path", counting_check)
    for _ in range(3):
        assert router.resolve("/iris/score", b"/iris/score").name == "iris"
    assert calls == [b"/iris/score"]
    for _ in range(2):
        with pytest.raises(BadRequestPath):
            router.resolve("/iris/../admin", b"/iris/%2e%2e/admin")
        assert router.resolve("/other", b"/other") is None
    assert calls.count(b"/iris/%2e%2e/admin") == 2 and calls.count(b"/other") == 2
    for n in range(routing.CHECKED_PATHS + 5):
        router.resolve(f"/iris/{n}", f"/iris/{n}".encode())
    assert len(router._checked) <= routing.CHECKED_PATHS


def test_longest_prefix_at_segment_boundary():
    router = Router([_route("iris", "/iris"), _route("v2", "/iris/v2"), _route("root", "/models")])
    assert router.match("/iris").name == "iris"
    assert router.match("/iris/swagger.json").name == "iris"
    assert router.match("/iris/v2").name == "v2"
    assert router.match("/iris/v2/score").name == "v2"
    assert router.match("/iris/v20").name == "iris"
    assert router.match("/irises") is None
    assert router.match("/") is None


def test_forward_path_keeps_original_encoding():
    route = _route("iris", "/iris")
    assert route.forward_path("/iris/a b", b"/iris/a%20b") == b"/a%20b"
    assert route.forward_path("/iris", b"/iris") == b""
    assert route.forward_path("/iris/x", None) == b"/x"


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/iris/../x", b"/iris/../x"),
        ("/iris/./x", b"/iris/./x"),
        ("/iris/..", b"/iris/.."),
        ("/iris/../x", b"/iris/%2e%2e/x"),
        ("/iris/a/b", b"/iris/a%2Fb"),
        ("/iris/a\\b", b"/iris/a%5Cb"),
        ("/iris/a\x00", b"/iris/a%00"),
        ("/iris/a\\b", b"/iris/a\\b"),
        ("/iris/%2e%2e/x", b"/iris/%252e%252e/x"),
        ("/iris/..;x/admin", b"/iris/..;x/admin"),
        # %25 followed by an encoded hex pair: an upstream that decodes twice sees '.', '/', '\\', NUL.
        ("/iris/%2e%2e/x", b"/iris/%25%32%65%25%32%65/x"),
        ("/iris/%2e%2e/x", b"/iris/%25%32%45%25%32%45/x"),
        ("/iris/a%2fb", b"/iris/a%25%32%66b"),
        ("/iris/a%5cb", b"/iris/a%25%35%63b"),
        ("/iris/a%00", b"/iris/a%25%30%30"),
        ("/iris/a%2fb", b"/iris/a%252%66b"),
        ("/iris/%2e%2e", b"/iris/%25252e%25252e"),
    ],
)
def test_check_path_refuses_escapes(path, raw):
    with pytest.raises(BadRequestPath):
        check_path(path, raw)


@pytest.mark.parametrize(
    "path",
    ["/iris", "/iris/swagger.json", "/iris/a..b", "/iris/.well-known/x", "/iris/a%2520b", "/iris/100%25"],
)
def test_check_path_allows_ordinary_paths(path):
    check_path(path, path.encode())  # raises BadRequestPath if refused
    assert Router([_route("iris", "/iris")]).match(path).name == "iris"


def test_outlier_ejection_and_failover():
    a, b = _upstream("http://a", priority=0), _upstream("http://b", priority=1)
    route = _route("r", "/r", a, b)
    balancer = route.balancer
    balancer.outlier_failures = 2
    assert balancer.pick() is a
    assert not balancer.failed(a)
    assert balancer.failed(a)
    assert balancer.pick() is b
    assert balancer.pick(tried=(b,)) is a  # last resort
    balancer.succeeded(a)
    assert balancer.pick() is a


def test_probe_is_held_by_one_request_until_its_verdict_or_release():
    a, b = _upstream("http://a", priority=0), _upstream("http://b", priority=1)
    balancer = _route("r", "/r", a, b).balancer
    balancer.outlier_failures = 1
    balancer.failed(a)
    a.ejected_until = 1.0  # the cool-down is over
    first, second = object(), object()
    assert balancer.pick(owner=first) is a  # the probe
    assert balancer.pick(owner=second) is b  # the others wait for its verdict
    balancer.release(second)  # not its probe: nothing changes
    assert balancer.pick(owner=second) is b
    balancer.release(first)  # the probe ended without a verdict: the next request probes
    assert balancer.pick(owner=second) is a
    assert balancer.failed(a, second)  # a failed probe ejects again at once
    assert balancer.pick(owner=first) is b


def test_weighted_choice_within_a_priority():
    a, b = _upstream("http://a", weight=1), _upstream("http://b", weight=3)
    route = _route("r", "/r", a, b)
    picks = [route.balancer.pick() for _ in range(2000)]
    share = picks.count(b) / len(picks)
    assert 0.65 < share < 0.85


def test_retry_budget_limits_amplification():
    budget = RetryBudget(min_retries_per_s=0, ratio=0.2)
    for _ in range(100):
        budget.deposit()
    allowed = sum(budget.try_withdraw() for _ in range(100))
    assert 15 <= allowed <= 21
