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
    parts = [b"HTTP/1.1 200 OK\r\n"]
    length = response_header_lines(raw, parts)
    assert b"".join(parts) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-ms-run-fn-exec-ms: 3\r\n"
        b"Content-Length: 12\r\n"
    )
    assert length == 12
    # 204 and 304 answers have no body: their Content-Length is not passed on.
    parts = []
    length = response_header_lines(raw, parts, bodyless_status=True)
    assert b"Content-Length" not in b"".join(parts) and length is None
    # A header named by a Connection header that comes after it is dropped too.
    parts = []
    length = response_header_lines(
        [(b"X-Hop", b"1"), (b"Content-Length", b"2"), (b"Connection", b"x-hop")], parts
    )
    assert b"".join(parts) == b"Content-Length: 2\r\n" and length == 2


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


def _raw_exchange(port: int, head: bytes) -> bytes:
    """Send one request head (no body) on a fresh connection; the whole answer, read until close or its
    declared length."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while True:
            if b"\r\n\r\n" in answer:
                top, _, body = answer.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in top.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    None,
                )
                if length is not None and len(body) >= length:
                    return answer
            data = sock.recv(65536)
            if not data:
                return answer
            answer += data


def test_the_header_byte_limit_counts_every_header_of_the_request(gateway_factory, upstream):
    """`server.max_header_bytes` is a total over the request's headers: ten headers of 600 bytes each
    (6000 bytes) pass a 4 KiB limit one by one, but not together. The raw-bytes bound on the head (the
    URL limit plus this one, about 12 KiB here) and the header count (100) are far away, so only the
    byte total can refuse it; nothing may reach the upstream."""
    import json

    from conftest import PRIMARY, key_route

    app, server = upstream
    gateway = gateway_factory(
        {"server": {"max_header_bytes": 4096}, "routes": {"iris": key_route(server.url, primary=PRIMARY)}}
    )

    def head(count: int) -> bytes:
        lines = b""
        for i in range(count):
            name = b"x-big-%02d" % i
            line = name + b": " + b"v" * (600 - len(name) - 4) + b"\r\n"  # 600 bytes as the gateway counts
            assert len(line) == 600
            lines += line
        return b"GET /iris/echo HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n" + lines + b"\r\n"

    # Six of them (3600 bytes with the others, under 4096) pass: the limit is not hit by any one header.
    allowed = _raw_exchange(gateway.port, head(6))
    assert allowed.startswith(b"HTTP/1.1 200 "), allowed[:300]
    assert len(app.requests) == 1
    refused = _raw_exchange(gateway.port, head(10))
    assert refused.startswith(b"HTTP/1.1 431 "), refused[:300]
    body = json.loads(refused.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "headers_too_large"
    assert "server.max_header_bytes" in body["error"]["message"]
    # The gateway answers 431 before routing: had it forwarded the request, the answer would be the
    # upstream's 200, so the count read after the answer is final.
    assert len(app.requests) == 1


def test_request_ids_are_unique_and_in_azure_mls_form():
    import re

    from gateway.headers import new_request_id

    ids = [new_request_id() for _ in range(3000)]  # across several blocks of 256
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{22}", request_id) for request_id in ids)
    assert len({request_id[:12] for request_id in ids}) == 1  # one prefix per process
