from __future__ import annotations

from gateway.headers import read_request_headers, response_header_lines


def test_request_headers_split():
    raw = [
        (b"host", b"gw:8080"),
        (b"authorization", b"Bearer from-client"),
        (b"connection", b"keep-alive, x-private"),
        (b"x-private", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"te", b"trailers"),
        (b"content-length", b"12"),
        (b"x-request-id", b"rid"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"content-type", b"application/json"),
        (b"x-ms-client-request-id", b"c1"),
    ]
    inbound = read_request_headers(raw)
    assert inbound.forwarded == [(b"content-type", b"application/json"), (b"x-ms-client-request-id", b"c1")]
    assert inbound.request_id == "rid"
    assert inbound.host == b"gw:8080"
    assert inbound.xff == b"10.0.0.1"
    assert inbound.content_length == 12


def test_response_headers():
    raw = [
        (b"Content-Type", b"application/json"),
        (b"Connection", b"close, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"x-request-id", b"upstream-id"),
        (b"x-ms-run-fn-exec-ms", b"3"),
        (b"Content-Length", b"12"),
    ]
    lines, length = response_header_lines(raw, b"x-request-id: our-id\r\n")
    assert lines == (
        b"Content-Type: application/json\r\nx-ms-run-fn-exec-ms: 3\r\nContent-Length: 12\r\n"
        b"x-request-id: our-id\r\n"
    )
    assert length == 12
    # 204 and 304 answers have no body: their Content-Length is not passed on.
    lines, length = response_header_lines(raw, b"", bodyless_status=True)
    assert b"Content-Length" not in lines and length is None


def test_the_configured_header_limits_are_enforced_by_the_server(gateway_factory, upstream):
    """The limits live in the server protocol only (gateway.server_protocol), built from `server.*` as
    `gateway serve` builds it: the in-process servers of the tests must get the configured ones too."""
    import httpx
    from conftest import PRIMARY, key_route

    _, server = upstream
    gateway = gateway_factory(
        {"server": {"max_header_count": 10}, "routes": {"iris": key_route(server.url, primary=PRIMARY)}}
    )
    few = {f"x-h{i}": "v" for i in range(3)}
    many = {f"x-h{i}": "v" for i in range(12)}
    assert httpx.post(f"{gateway.url}/iris/score", json={}, headers=few, timeout=10).status_code == 200
    refused = httpx.post(f"{gateway.url}/iris/score", json={}, headers=many, timeout=10)
    assert refused.status_code == 431 and refused.json()["error"]["code"] == "headers_too_large"
