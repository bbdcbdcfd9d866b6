from __future__ import annotations

from gateway.headers import read_request_headers, response_headers


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
    ]
    out = response_headers(raw, b"our-id")
    assert out == [
        (b"Content-Type", b"application/json"),
        (b"x-ms-run-fn-exec-ms", b"3"),
        (b"x-request-id", b"our-id"),
    ]
