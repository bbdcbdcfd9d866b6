"""Header rules, both ways: hop-by-hop headers are dropped (RFC 9110 section 7.6.1, plus the ones
`Connection` names), the client's Authorization never reaches the upstream, and the gateway sets
Host, X-Forwarded-* and x-request-id itself, and x-ms-client-request-id when the client sent none."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Dropped from requests as well: the gateway sets these itself or the transport owns them.
_REQUEST_OWNED = HOP_BY_HOP | {
    b"authorization",
    b"host",
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
}
_RESPONSE_OWNED = HOP_BY_HOP | {b"x-request-id"}
# Response headers the gateway reads: the ones it owns (dropped) and Content-Length (the body's framing).
_RESPONSE_READ = _RESPONSE_OWNED | {b"content-length"}
# `Connection` values that name no header to drop (the usual ones): no token set to build.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})
# Azure ML's client request id: forwarded as the client sent it, else the gateway sets its own.
_CLIENT_REQUEST_ID = b"x-ms-client-request-id"
# Request headers the gateway reads: the ones it owns (dropped) and the client request id (forwarded).
_READ = _REQUEST_OWNED | {_CLIENT_REQUEST_ID}
# What Azure ML accepts as a request id. A client's x-request-id becomes the gateway's request id (and
# Azure ML's, when the client sends no x-ms-client-request-id) only in this form, so logs always join.
_REQUEST_ID_FORM = re.compile(rb"[A-Za-z0-9_-]{1,40}")


def connection_tokens(value: bytes) -> set[bytes]:
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


# A random per-process prefix and a counter: unique across processes and restarts, and far cheaper
# than a UUID per request. Hot path: formatting an int costs more than the rest of the id, so the
# counter's last two hex digits come from a table and the rest (the prefix and 8 digits) is formatted
# once per 256 ids.
_ID_PREFIX = os.urandom(6).hex()
_id_counter = itertools.count(1)
_LAST_DIGITS = tuple(f"{low:02x}" for low in range(256))
_id_block: tuple[int, str] = (-1, "")  # (counter // 256, the id up to its last two digits)


def new_request_id() -> str:
    global _id_block
    count = next(_id_counter)  # atomic: ids stay unique when several threads ask
    high = count >> 8
    block = _id_block
    if block[0] != high:
        block = _id_block = (high, f"{_ID_PREFIX}{high:08x}")
    return block[1] + _LAST_DIGITS[count & 0xFF]


class InboundHeaders:
    """What the proxy needs from the client's headers, read in a single pass. All bytes, as received."""

    __slots__ = ("client_request_id", "content_length", "forwarded", "host", "request_id", "xff")

    def __init__(self) -> None:
        self.forwarded: list[tuple[bytes, bytes]] = []
        self.request_id: str | None = None
        self.client_request_id = False  # the client sent x-ms-client-request-id
        self.host: bytes | None = None
        self.xff: bytes | None = None
        self.content_length: int | None = None


def read_request_headers(raw: Iterable[tuple[bytes, bytes]]) -> InboundHeaders:
    """Split the client's headers into those to forward and the few the gateway itself uses.

    Their count and size were checked while they arrived (`gateway.server_protocol`, 431)."""
    result = InboundHeaders()
    forwarded = result.forwarded
    dropped: set[bytes] | None = None
    # Hot path: each header tuple is passed on as it is, not unpacked and built again.
    for header in raw:
        name = header[0]
        if name in _READ:
            value = header[1]
            if name == b"x-request-id":
                if _REQUEST_ID_FORM.fullmatch(value):
                    result.request_id = value.decode("ascii")
            elif name == _CLIENT_REQUEST_ID:
                result.client_request_id = True
                forwarded.append(header)
            elif name == b"host":
                result.host = value
            elif name == b"content-length":
                try:
                    result.content_length = int(value)
                except ValueError:
                    result.content_length = None
            elif name == b"x-forwarded-for":
                result.xff = value
            elif name == b"connection":
                dropped = (dropped or set()) | connection_tokens(value)
            continue
        forwarded.append(header)
    if dropped:
        result.forwarded = [(n, v) for n, v in forwarded if n.lower() not in dropped]
        if _CLIENT_REQUEST_ID in dropped:
            result.client_request_id = False
    return result


def response_header_lines(
    raw: Iterable[tuple[bytes, bytes]], parts: list[bytes], *, bodyless_status: bool = False
) -> int | None:
    """The upstream's headers as the client gets them, appended to `parts` in wire form (name, ": ",
    value, CRLF: the caller joins the whole answer head once): unchanged except for hop-by-hop ones and
    the upstream's x-request-id. Returns the Content-Length they state (None without one). A 204 or 304
    answer (`bodyless_status`) loses its Content-Length: it has no body."""
    start = len(parts)
    dropped: set[bytes] | None = None
    length: int | None = None
    for name, value in raw:
        lowered = name.lower()
        if lowered in _RESPONSE_READ:  # hot path: one set look-up for every other header
            if lowered == b"content-length":
                if bodyless_status:
                    continue
                try:
                    length = int(value)  # the client's parser checked its digits
                except ValueError:
                    continue  # unreadable: dropped, and the gateway frames the body itself
            else:
                if lowered == b"connection" and value.lower() not in _PLAIN_CONNECTION:
                    dropped = (dropped or set()) | connection_tokens(value)  # every Connection header counts
                continue
        parts += (name, b": ", value, b"\r\n")
    if dropped:
        # Rare: `Connection` names headers to drop, some perhaps already added. Again, without them.
        del parts[start:]
        for name, value in raw:
            lowered = name.lower()
            if lowered in _RESPONSE_OWNED or lowered in dropped:
                continue
            if lowered == b"content-length":
                if bodyless_status:
                    continue
                try:
                    int(value)
                except ValueError:
                    continue
            parts += (name, b": ", value, b"\r\n")
        if b"content-length" in dropped:
            length = None
    return length
