"""Property tests: path rules, header filtering and config parsing hold for any input; and hostile raw
requests sent to a running gateway are all refused without anything leaving the route."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httptools
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from servers import ServerThread
from upstream import Upstream

from gateway.app import GatewayApp
from gateway.config import load_config, parse_config
from gateway.errors import BadRequestPath, ConfigError
from gateway.headers import HOP_BY_HOP, connection_tokens, read_request_headers, response_header_lines
from gateway.paths import check_path
from gateway.routing import Router
from gateway.server_protocol import GatewayHttpToolsProtocol

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

FAST = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Nested prefixes (longest match), a look-alike prefix, and upstreams with paths of their own.
ROUTES = {
    "iris": {"path": "/iris", "upstream": "http://up.invalid/api/v1", "auth": {"type": "none"}},
    "iris-v2": {"path": "/iris/v2", "upstream": "http://up.invalid/deep/x", "auth": {"type": "none"}},
    "irises": {"path": "/irises", "upstream": "http://other.invalid/o", "auth": {"type": "none"}},
}
ROUTER: Router = GatewayApp(parse_config({"routes": ROUTES})).router


# ------------------------------------------------------------------------------------- path rules
def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4."""
    output: list[str] = []
    while path:
        if path.startswith("../"):
            path = path[3:]
        elif path.startswith("./"):
            path = path[2:]
        elif path.startswith("/./"):
            path = path[2:]
        elif path == "/.":
            path = "/"
        elif path.startswith("/../"):
            path = path[3:]
            if output:
                output.pop()
        elif path == "/..":
            path = "/"
            if output:
                output.pop()
        elif path in (".", ".."):
            path = ""
        else:
            start = 1 if path.startswith("/") else 0
            end = path.find("/", start)
            end = len(path) if end == -1 else end
            output.append(path[:end])
            path = path[end:]
    return "".join(output)


def upstream_view(forwarded: str) -> str:
    """The path as a lenient upstream resolves it: percent-decoded once, backslashes as slashes, dot
    segments resolved, and anything from a NUL on ignored (C string handling)."""
    path = unquote(forwarded, errors="surrogateescape").replace("\\", "/")
    path = path.split("\x00", 1)[0]
    return remove_dot_segments(path)


def under(path: str, base: str) -> bool:
    base = base.rstrip("/")
    return path == base or path.startswith(base + "/") or (not base and path.startswith("/"))


def forwarded_path(route: Any, path: str, raw_path: bytes | None) -> str:
    """The request target's path as the proxy writes it upstream: the upstream URL's path, then the
    part of the client's path after the route prefix (as `Proxy._attempts` joins them)."""
    suffix = route.forward_path(path, raw_path)
    if isinstance(suffix, bytes):
        suffix = suffix.decode("latin-1")
    base = urlsplit(route.upstreams[0].url).path
    return (base if suffix.startswith("/") or base else "/") + suffix


def as_uvicorn(target: bytes) -> tuple[str, bytes] | None:
    """(scope path, scope raw_path) exactly as uvicorn's httptools protocol builds them; None when the
    parser refuses the target (the client gets uvicorn's own 400)."""
    try:
        raw_path = httptools.parse_url(target).path
    except httptools.HttpParserInvalidURLError:
        return None
    if raw_path is None:
        return None
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        return None
    return (unquote(path) if "%" in path else path), raw_path


_TOKENS = [
    "/", "/", "/", ".", "..", "...", "iris", "v2", "irises", "api", "a", "%2e", "%2E", "%2e%2e",
    "%2f", "%2F", "%5c", "%5C", "%00", "%25", "%252e", "%252f", "%", "%zz", "%c0%ae", "%e2%80%a4",
    "\\", ";", "..;", "%3b", "?", "#", ":", "@", "~", "-", "_", "%20", "%3f", "%23", "//", "./", "/.",
]  # fmt: skip
targets = st.lists(st.sampled_from(_TOKENS), max_size=12).map(lambda parts: "/" + "".join(parts))


def _check_target(target: str) -> None:
    parsed = as_uvicorn(target.encode("latin-1"))
    if parsed is None:
        return  # refused by the HTTP parser
    path, raw_path = parsed
    try:
        check_path(path, raw_path)
    except BadRequestPath:
        return
    route = ROUTER.match(path)
    if route is None:
        return
    assert under(path, route.prefix), (path, route.prefix)
    forwarded = forwarded_path(route, path, raw_path)
    base = urlsplit(route.upstreams[0].url).path
    seen = upstream_view(forwarded)
    assert under(seen, base), f"{target!r} -> {forwarded!r} -> upstream sees {seen!r}, outside {base!r}"


@FAST
@given(targets)
@example("/iris/../irises/x")
@example("/iris/%2e%2e/x")
@example("/iris/.%2e/x")
@example("/iris/a%2fb/../../x")
@example("/iris\\..\\x")
@example("/%69ris/..")
@example("/iris/v2/..")
@example("/iris%2f..%2fx")
def test_forwarded_path_stays_under_the_routes_upstream_path(target: str) -> None:
    _check_target(target)


@FAST
@given(st.text(st.characters(codec="ascii", exclude_characters="\r\n \t"), max_size=40))
def test_any_ascii_target_stays_under_the_route(text: str) -> None:
    _check_target("/iris/" + text)


@FAST
@given(st.text(max_size=40), st.booleans())
def test_path_rules_on_any_decoded_path(text: str, with_raw: bool) -> None:
    """Any scope path (any Unicode, with or without raw_path) is refused or stays inside the route."""
    path = "/iris/" + text
    raw_path = path.encode("utf-8", "surrogatepass") if with_raw else None
    try:
        check_path(path, raw_path)
    except BadRequestPath:
        return
    route = ROUTER.match(path)
    assert route is not None
    seen = upstream_view(forwarded_path(route, path, raw_path))
    assert under(seen, urlsplit(route.upstreams[0].url).path), (path, seen)


# ------------------------------------------------------------------------------------------ headers
_NAMES = [
    *sorted(HOP_BY_HOP), b"authorization", b"host", b"content-length", b"x-request-id",
    b"x-forwarded-for", b"expect", b"x-custom", b"x-drop-me", b"accept", b"content-type",
    b"azureml-model-deployment", b"cookie",
]  # fmt: skip
names = st.sampled_from(_NAMES) | st.from_regex(rb"\A[a-z0-9!#$%&'*+.^_`|~-]{1,12}\Z")
token_lists = st.lists(st.sampled_from(_NAMES) | st.sampled_from([b"close", b"keep-alive", b"X-Drop-Me"]))
connection_values = token_lists.map(lambda tokens: b" , ".join(tokens) + b" ")
header_values = st.binary(max_size=30).filter(lambda v: b"\r" not in v and b"\n" not in v)
request_headers = st.lists(
    st.tuples(names, header_values) | st.tuples(st.just(b"connection"), connection_values), max_size=25
)


def _named_in_connection(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named |= connection_tokens(value)
    return named


def _name(item: Any) -> bytes:
    name = item[0]
    return (name.encode("latin-1") if isinstance(name, str) else name).lower()


@FAST
@given(request_headers)
def test_request_headers_never_forward_hop_by_hop_connection_named_or_authorization(headers) -> None:
    inbound = read_request_headers(headers)
    forwarded = {_name(item) for item in inbound.forwarded}
    assert not forwarded & HOP_BY_HOP
    assert b"authorization" not in forwarded
    assert not forwarded & _named_in_connection(headers), forwarded


response_header_lists = st.lists(
    st.tuples(
        names.map(lambda n: n.title()) | names,  # upstreams send any case
        header_values,
    )
    | st.tuples(st.sampled_from([b"Connection", b"connection", b"CONNECTION"]), connection_values),
    max_size=25,
)


@FAST
@given(response_header_lists)
@example([(b"Connection", b"x-a"), (b"Connection", b"x-b"), (b"X-A", b"1"), (b"X-B", b"2")])
def test_response_headers_never_pass_hop_by_hop_or_connection_named(headers) -> None:
    parts: list[bytes] = []
    response_header_lines(headers, parts)
    lines = b"".join(parts) + b"x-request-id: rid-1\r\n"  # the proxy's own line follows them
    out = [tuple(line.split(b": ", 1)) for line in lines.split(b"\r\n") if line]
    passed = {name.lower() for name, _ in out}
    assert not passed & HOP_BY_HOP
    # x-request-id is the gateway's own (the upstream's is dropped), whatever Connection says.
    assert not passed & (_named_in_connection(headers) - {b"x-request-id"}), (headers, out)
    assert [v for n, v in out if n.lower() == b"x-request-id"] == [b"rid-1"]


any_headers = st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=200)), max_size=200)


@FAST
@given(any_headers)
def test_header_functions_never_crash(headers) -> None:
    read_request_headers(headers)
    response_header_lines(headers, [])


# ------------------------------------------------------------------------------------------- config
_KEYS = [
    "server", "routes", "tls", "inbound", "path", "upstream", "upstreams", "url", "auth", "type", "key",
    "none", "aad_token", "aml_token", "primary", "secondary", "env", "file", "value", "headers", "retry",
    "attempts", "deadline_s", "timeout_s", "outlier", "priority", "weight", "port", "host", "identity",
    "from_endpoint", "endpoint", "allow_cidrs", "api_keys", "sha256", "client_secret", "iris",
    "max_body_bytes", "max_concurrent_requests", "limits", "max_concurrent", "per_caller",
    "requests_per_s", "callers", "limits_store", "redis", "on_statuses", "managed_identity", "certificate",
    "scope", "tenant_id",
]  # fmt: skip
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from([*_KEYS, "/iris", "http://h", "http://[::1", "https://h:99999", "http://h/x?y", "/"])
    | st.binary(max_size=8)
)
yamlish = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8) | st.integers(), inner, max_size=5)
    ),
    max_leaves=30,
)


def _route_like(draw: Any) -> dict[str, Any]:
    route: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(_KEYS), max_size=6, unique=True)):
        route[key] = draw(yamlish)
    route.setdefault("path", draw(st.sampled_from(["/iris", "/a/b", "iris", "/healthz", "/x/../y"])))
    route.setdefault(
        "auth", draw(st.sampled_from([{"type": "none"}, {"type": "key"}, {"type": "aad_token"}]))
    )
    return route


@st.composite
def configs(draw: Any) -> Any:
    if draw(st.booleans()):
        return draw(yamlish)
    routes = {draw(st.sampled_from(["iris", "b", "bad name", ""])): _route_like(draw) for _ in range(2)}
    return {"routes": routes, **draw(st.dictionaries(st.sampled_from(_KEYS), yamlish, max_size=2))}


@settings(FAST, max_examples=150)
@given(configs())
def test_parse_config_raises_only_config_error(data: Any) -> None:
    try:
        parse_config(data, "fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml")


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(configs())
def test_load_config_of_dumped_structures_raises_only_config_error(tmp_path: Path, data: Any) -> None:
    path = tmp_path / "fuzz.yaml"
    try:
        path.write_text(yaml.safe_dump(data))
    except yaml.YAMLError:
        return
    try:
        load_config(path)
    except ConfigError:
        pass


def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 5000)
    with pytest.raises(ConfigError):
        load_config(path)


def test_upstream_port_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        config = parse_config(
            {"routes": {"r": {"path": "/r", "upstream": "http://h:99999", "auth": {"type": "none"}}}}
        )
        GatewayApp(config)


# -------------------------------------------------------------------------- hostile raw requests, live
HOSTILE: dict[str, bytes] = {
    "absolute-form": b"GET http://evil.example/iris/echo HTTP/1.1\r\nHost: evil.example\r\n",
    "absolute-form https": b"GET https://evil.example:443/iris/echo?x=1 HTTP/1.1\r\nHost: x\r\n",
    "absolute-form userinfo": b"GET http://u:p@evil.example/iris/echo HTTP/1.1\r\nHost: x\r\n",
    "absolute-form HTTP/1.0": b"GET http://evil.example/iris/echo HTTP/1.0\r\n",
    "absolute-form no path": b"GET http://evil.example HTTP/1.1\r\nHost: x\r\n",
    "authority-form CONNECT": b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n",
    "CONNECT with a path": b"CONNECT /iris/echo HTTP/1.1\r\nHost: x\r\n",
    "TRACE": b"TRACE /iris/echo HTTP/1.1\r\nHost: x\r\n",
    "scheme-relative": b"GET //evil.example/iris/echo HTTP/1.1\r\nHost: x\r\n",
    "asterisk": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n",
    "dot-dot": b"GET /iris/../metrics HTTP/1.1\r\nHost: x\r\n",
    "dot-dot to a sibling": b"GET /iris/../irises/x HTTP/1.1\r\nHost: x\r\n",
    "encoded dot-dot": b"GET /iris/%2e%2e/%2E%2E/x HTTP/1.1\r\nHost: x\r\n",
    "encoded prefix and dot-dot": b"GET /%69ris/%2e%2e HTTP/1.1\r\nHost: x\r\n",
    "encoded slash": b"GET /iris/..%2f..%2fx HTTP/1.1\r\nHost: x\r\n",
    "encoded backslash": b"GET /iris/..%5c..%5cx HTTP/1.1\r\nHost: x\r\n",
    "backslash": b"GET /iris\\..\\x HTTP/1.1\r\nHost: x\r\n",
    "encoded NUL": b"GET /iris/a%00b HTTP/1.1\r\nHost: x\r\n",
    "raw NUL": b"GET /iris/a\x00b HTTP/1.1\r\nHost: x\r\n",
    "very long path": b"GET /iris/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n",
    "very long query": b"GET /iris/x?" + b"q" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n",
    "many headers": b"GET /iris/x HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"x-h%d: v\r\n" % i for i in range(500)),
    "huge header": b"GET /iris/x HTTP/1.1\r\nHost: x\r\nx-big: " + b"v" * 200_000 + b"\r\n",
    "NUL in a header value": b"GET /iris/x HTTP/1.1\r\nHost: x\r\nx-a: a\x00b\r\n",
    "control byte in a header": b"GET /iris/x HTTP/1.1\r\nHost: x\r\nx-a: a\x01b\r\n",
    "space in a header name": b"GET /iris/x HTTP/1.1\r\nHost: x\r\nx a: b\r\n",
    "obsolete line folding": b"GET /iris/x HTTP/1.1\r\nHost: x\r\nx-a: b\r\n c\r\n",
    "two content-lengths": b"POST /iris/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n",
    "content-length and chunked": b"POST /iris/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n",
    "websocket upgrade": b"GET /iris/x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "TLS hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
}
PARSER_400 = b"Invalid HTTP request received."


def _exchange(port: int, request: bytes) -> tuple[bytes, float]:
    if request.endswith(b"\r\n") and not request.startswith((b"PRI", b"\x16")):
        request += b"\r\n" if b"\r\nConnection:" in request else b"Connection: close\r\n\r\n"
    started = time.monotonic()
    answer = b""
    # Under the default header timeout (10 s): a gateway holding the connection fails the read.
    with socket.create_connection(("127.0.0.1", port), timeout=9.5) as sock:
        try:
            sock.sendall(request)
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass  # the parser closed on us before reading everything: a refusal too
    return answer, time.monotonic() - started


@pytest.fixture(scope="module")
def hostile_target() -> Iterator[tuple[Upstream, ServerThread]]:
    """A recording upstream and the gateway in front of it, with the HTTP protocol `gateway serve` uses."""
    upstream = Upstream(accepted_keys=None)
    with ServerThread(upstream, lifespan="off") as up:
        config = {
            "routes": {"iris": {"path": "/iris", "upstream": up.url + "/api", "auth": {"type": "none"}}}
        }
        gateway = ServerThread(GatewayApp(parse_config(config)))
        gateway.server.config.http = GatewayHttpToolsProtocol
        with gateway:
            yield upstream, gateway


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_raw_requests_are_refused_and_never_leave_the_route(hostile_target, name):
    upstream, gw = hostile_target
    with upstream.lock:
        upstream.requests.clear()
    answer, took = _exchange(gw.port, HOSTILE[name])
    assert took < 8.0, f"{name}: the gateway held the connection for {took:.1f} s"  # generous: loaded CI
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    if name == "websocket upgrade" and status_line.startswith(b"HTTP/1.1 200"):
        # Without a WebSocket implementation uvicorn treats it as a plain GET: forwarded inside the
        # route, without the hop-by-hop Upgrade and Connection headers.
        (seen,) = upstream.requests
        assert seen["path"] == "/api/x"
        assert not {n for n, _ in seen["headers"]} & {"upgrade", "connection"}
        return
    if answer:
        assert status_line.startswith(b"HTTP/1.1 4"), f"{name}: {answer[:300]!r}"
        if body != PARSER_400:  # uvicorn's parser answered; everything else is the gateway's JSON
            error = json.loads(body)["error"]
            assert error["code"] and error["message"], error
    # else: the parser closed the connection without an answer
    assert upstream.requests == [], f"{name}: the upstream received {upstream.requests}"
    # ...and a normal request still works, inside the route.
    sane, _ = _exchange(gw.port, b"GET /iris/echo HTTP/1.1\r\nHost: x\r\n")
    assert sane.startswith(b"HTTP/1.1 200"), sane[:200]
    assert [r["path"] for r in upstream.requests] == ["/api/echo"]


def test_absolute_form_is_refused_with_a_json_400(hostile_target):
    upstream, gw = hostile_target
    upstream.requests.clear()
    answer, _ = _exchange(gw.port, HOSTILE["absolute-form"])
    assert answer.startswith(b"HTTP/1.1 400")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "bad_request_path"
    assert upstream.requests == []


def test_gateway_serve_refuses_absolute_form(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from servers import free_socket

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    upstream = Upstream(accepted_keys=None)
    with ServerThread(upstream, lifespan="off") as up:
        config = {
            "server": {"host": "127.0.0.1", "port": port},
            "routes": {"iris": {"path": "/iris", "upstream": up.url, "auth": {"type": "none"}}},
        }
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 20
            answer = b""
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    answer, _ = _exchange(port, HOSTILE["absolute-form"])
                    break
                except OSError:
                    time.sleep(0.05)
        finally:
            process.terminate()
            process.communicate(timeout=15)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
