"""Keep secrets out of every string the gateway writes: log lines, error bodies, exceptions.

Static secrets (keys, client secrets) are registered by value when loaded. Tokens change too often
to register, so anything shaped like a bearer credential or a JWT is masked by pattern as well.
"""

from __future__ import annotations

import re
import threading

MASK = "***"
# Short values would mask ordinary words; real keys and secrets are far longer than this.
_MIN_REGISTERED_LENGTH = 8
_MAX_REGISTERED = 4096

_lock = threading.Lock()
_registered: dict[str, None] = {}  # insertion-ordered, bounded: rotated values age out
_pattern: re.Pattern[str] | None = None

_SHAPES = re.compile(
    r"(?i)(bearer\s+)[^\s\"',;]+"  # Authorization header values
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"  # JWTs
    r"|((?:client_secret|client_assertion|access_token|accessToken|primaryKey|secondaryKey)"
    r"[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,}]+"
)


def register(value: str) -> None:
    """Remember a secret value so `redact()` masks it wherever it appears."""
    global _pattern
    if len(value) < _MIN_REGISTERED_LENGTH:
        return
    with _lock:
        if value in _registered:
            return
        _registered[value] = None
        while len(_registered) > _MAX_REGISTERED:
            del _registered[next(iter(_registered))]
        ordered = sorted(_registered, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(v) for v in ordered))


def _mask_shape(match: re.Match[str]) -> str:
    prefix = match.group(1) or match.group(2)
    return f"{prefix}{MASK}" if prefix else MASK


def redact(text: str) -> str:
    pattern = _pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    return _SHAPES.sub(_mask_shape, text)
