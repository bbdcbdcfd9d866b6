"""Keep secrets out of every string the gateway writes: log lines, error bodies, exceptions.

Static secrets (keys, client secrets) are registered by value when loaded. Tokens change too often
to register, so anything shaped like a bearer credential or a JWT is masked by pattern as well.

Registering is cheap and linear: a value goes into a set. The matcher is rebuilt at most once per
change, by the first `redact()` after it, and its size does not grow with the values' lengths: one
regular expression of the distinct first `_PREFIX_LENGTH` characters of the values finds where a value
may start, and the values with that prefix (longest first) are compared there. (A regular expression
of all the values, rebuilt for each new one, cost 0.5 s for the 20th value of 25 KB and 3.8 s for one of
3 MiB, on the event loop.)
"""

from __future__ import annotations

import re
import threading

MASK = "***"
# Short values would mask ordinary words; real keys and secrets are far longer than this.
_MIN_REGISTERED_LENGTH = 8
_PREFIX_LENGTH = _MIN_REGISTERED_LENGTH
_MAX_REGISTERED = 4096

_lock = threading.Lock()
_registered: dict[str, None] = {}  # insertion-ordered, bounded: rotated values age out
_stale = False  # a value was added or aged out since the matcher was built


class _Matcher:
    __slots__ = ("by_prefix", "starts")

    def __init__(self, values: list[str]) -> None:
        by_prefix: dict[str, list[str]] = {}
        for value in values:
            by_prefix.setdefault(value[:_PREFIX_LENGTH], []).append(value)
        for group in by_prefix.values():
            group.sort(key=len, reverse=True)  # at one position the longest value wins
        self.by_prefix = by_prefix
        self.starts = re.compile("|".join(re.escape(prefix) for prefix in by_prefix))

    def sub(self, text: str) -> str:
        search = self.starts.search
        match = search(text)
        if match is None:
            return text
        pieces: list[str] = []
        done = 0
        while match is not None:
            start = match.start()
            for value in self.by_prefix[match.group()]:
                if text.startswith(value, start):
                    pieces.append(text[done:start])
                    pieces.append(MASK)
                    done = start + len(value)
                    match = search(text, done)
                    break
            else:
                match = search(text, start + 1)
        if not pieces:
            return text
        pieces.append(text[done:])
        return "".join(pieces)


_matcher: _Matcher | None = None

_SHAPES = re.compile(
    r"(?i)(bearer\s+)[^\s\"',;]+"  # Authorization header values
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"  # JWTs
    r"|((?:client_secret|client_assertion|access_token|accessToken|primaryKey|secondaryKey)"
    r"[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,}]+"
)


def register(value: str) -> None:
    """Remember a secret value so `redact()` masks it wherever it appears. Callers check a value's size
    and form first (gateway.secrets): this only stores it."""
    global _stale
    if len(value) < _MIN_REGISTERED_LENGTH:
        return
    with _lock:
        if value in _registered:
            return
        _registered[value] = None
        while len(_registered) > _MAX_REGISTERED:
            del _registered[next(iter(_registered))]
        _stale = True


def _current() -> _Matcher | None:
    global _matcher, _stale
    if _stale:
        with _lock:
            if _stale:
                _matcher = _Matcher(list(_registered)) if _registered else None
                _stale = False
    return _matcher


def _mask_shape(match: re.Match[str]) -> str:
    prefix = match.group(1) or match.group(2)
    return f"{prefix}{MASK}" if prefix else MASK


# `_SHAPES` can match only where one of its words occurs, compared as `(?i)` compares: casefold, plus the
# one letter `re` matches to `i` that casefold keeps apart (dotless i, U+0131). A line without any of
# them (the access line, most lines) skips the case-insensitive scan: ~10 µs on a 300-character line.
# The words, one `in` each, written out: a loop over them cost a fifth more per line.
def _may_hold_a_shape(text: str) -> bool:
    folded = text.casefold()
    if "\u0131" in folded:
        folded = folded.replace("\u0131", "i")
    return (
        "bearer" in folded
        or "eyj" in folded
        or "client_secret" in folded
        or "client_assertion" in folded
        or "access_token" in folded
        or "accesstoken" in folded
        or "primarykey" in folded
        or "secondarykey" in folded
    )


def redact(text: str) -> str:
    matcher = _current()
    if matcher is not None:
        text = matcher.sub(text)
    if _may_hold_a_shape(text):
        return _SHAPES.sub(_mask_shape, text)
    return text
