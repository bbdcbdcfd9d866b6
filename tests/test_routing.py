from __future__ import annotations

import pytest

from gateway.client import UpstreamClient
from gateway.credentials.base import NoCredential
from gateway.errors import BadRequestPath
from gateway.routing import Route, Router, Upstream, check_path

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
    route.outlier_failures = 2
    assert route.pick_upstream() is a
    assert not route.record_failure(a)
    assert route.record_failure(a)
    assert route.pick_upstream() is b
    assert route.pick_upstream(tried=(b,)) is a  # last resort
    route.record_success(a)
    assert route.pick_upstream() is a


def test_weighted_choice_within_a_priority():
    a, b = _upstream("http://a", weight=1), _upstream("http://b", weight=3)
    route = _route("r", "/r", a, b)
    picks = [route.pick_upstream() for _ in range(2000)]
    share = picks.count(b) / len(picks)
    assert 0.65 < share < 0.85


def test_retry_budget_limits_amplification():
    route = _route("r", "/r")
    route.budget_ratio = 0.2
    for _ in range(100):
        route.count_request()
    allowed = sum(route.allow_retry() for _ in range(100))
    assert 15 <= allowed <= 21
