"""Path rules: a request path that could leave its route once an upstream normalises it is refused."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from gateway.errors import BadRequestPath

# Percent-encodings that could change how a path splits into segments after we forwarded it.
_DANGEROUS_ENCODINGS = (b"%2e", b"%2f", b"%5c", b"%00")
# How many rounds of decoding an upstream (or a chain of them) may apply: `%25%32%65` is `%2e` once
# decoded and `.` twice; three rounds cover every chain we know of.
_DECODE_ROUNDS = 3


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
