"""Secret values: a literal, an environment variable or a file that may be rotated while we run.

A `Secret` never shows its value in `repr()` or `str()`. File secrets are re-checked at most once
a second (mtime, size and inode of the file the path resolves to, so a Kubernetes secret volume,
which swaps a symlink, is noticed); a failed re-read keeps the last good value and is logged once.
Every value ever loaded is checked (size, then form) and then registered with `gateway.redaction` so no
log line can carry it; a value over `MAX_SECRET_CHARS` is refused, naming its source.
"""

from __future__ import annotations

import logging
import os
import re
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from gateway import redaction
from gateway.errors import SecretError

logger = logging.getLogger("gateway.secrets")

CHECK_INTERVAL_S = 1.0
# The longest secret value the gateway takes, from any source: Key Vault's limit (25 KB), so that a value
# can move between a file, a variable and a vault. Checked before anything else touches a value (before
# it is registered for redaction, which every log line then scans).
MAX_SECRET_CHARS = 25 * 1024
# A file is refused unread beyond this: UTF-8 takes at most 4 bytes a character, plus a final CRLF.
_MAX_FILE_BYTES = 4 * MAX_SECRET_CHARS + 2


_NOT_IN_HEADERS = re.compile(r"[\x00-\x1f\x7f]")
_BYTE_ORDER_MARK = "\ufeff"


def check_header_value(value: str, source: str) -> str:
    """The one check of a value bound for an HTTP header (keys, tokens, route headers), at load and on
    every rotation: what fails here would corrupt the request or fail every request that sends it."""
    if _BYTE_ORDER_MARK in value:
        raise SecretError(
            f"{source} starts with a UTF-8 byte-order mark (some editors add one); save it without a BOM"
        )
    if _NOT_IN_HEADERS.search(value) or value != value.strip():
        raise SecretError(
            f"{source} contains a line break, control character or surrounding space and cannot be sent "
            "in a header"
        )
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise SecretError(
            f"{source} contains characters outside ISO-8859-1 (latin-1) and cannot be sent in a header"
        ) from None
    return value


def check_size(value: str, source: str) -> str:
    if len(value) > MAX_SECRET_CHARS:
        raise SecretError(
            f"{source} is {len(value)} characters, over the limit of {MAX_SECRET_CHARS} (25 KB, Key Vault's "
            "limit for a secret value)"
        )
    return value


class Secret:
    """A secret value and where it comes from. `value` is cheap: call it on every request."""

    source: str

    def __init__(self, source: str) -> None:
        self.source = source
        self.version = 0
        # Wall-clock time the value was created (a Key Vault version's `created`) or first seen here.
        self.since = time.time()
        self._listeners: list[weakref.WeakMethod[Callable[[Secret], None]]] = []

    @property
    def value(self) -> str:
        raise NotImplementedError

    def subscribe(self, listener: Callable[[Secret], None]) -> None:
        """Call the bound method `listener` after each change of the value (held weakly: a closed
        credential is not kept alive by the secrets it used)."""
        self._listeners.append(weakref.WeakMethod(listener))

    def _changed(self, since: float | None = None) -> None:
        self.version += 1
        self.since = time.time() if since is None else since
        alive = []
        for reference in self._listeners:
            listener = reference()
            if listener is not None:
                alive.append(reference)
                listener(self)
        self._listeners = alive

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r})"

    __str__ = __repr__


class LiteralSecret(Secret):
    def __init__(self, value: str, *, header: bool = False) -> None:
        super().__init__("literal")
        if not value:
            raise SecretError("the literal secret is empty")
        check_size(value, "the literal secret")
        self._value = check_header_value(value, "the literal secret") if header else value
        redaction.register(value)

    @property
    def value(self) -> str:
        return self._value


class EnvSecret(Secret):
    """An environment variable, read once: a process's environment does not change under it."""

    def __init__(self, name: str, *, header: bool = False) -> None:
        super().__init__(f"env:{name}")
        self.name = name
        value = os.environ.get(name)
        if value is None:
            raise SecretError(f"environment variable {name} is not set")
        if not value.strip():
            raise SecretError(f"environment variable {name} is empty")
        self._value = check_size(value.strip(), f"environment variable {name}")
        if header:
            check_header_value(self._value, f"environment variable {name}")
        redaction.register(self._value)

    @property
    def value(self) -> str:
        return self._value


def _strip_newline(text: str) -> str:
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


class FileSecret(Secret):
    """A file whose content (minus one trailing newline) is the value; re-read when it changes."""

    def __init__(self, path: str | Path, *, strip: bool = True, header: bool = False) -> None:
        super().__init__(f"file:{path}")
        self.path = Path(path)
        self._strip = strip
        self._header = header
        self._signature: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._last_error: str | None = None
        self._value = self._read()  # raises SecretError: a start-up failure is a config error

    def _read(self) -> str:
        try:
            stat = os.stat(self.path)
            if stat.st_size > _MAX_FILE_BYTES:
                raise SecretError(
                    f"secret file {self.path} is {stat.st_size} bytes, over the limit of {MAX_SECRET_CHARS} "
                    "characters (25 KB, Key Vault's limit for a secret value)"
                )
            with open(self.path, "rb") as file:
                raw = file.read(_MAX_FILE_BYTES + 1)  # the file may have grown since `stat`
        except OSError as exc:
            raise SecretError(f"cannot read secret file {self.path}: {exc.strerror or exc}") from None
        if len(raw) > _MAX_FILE_BYTES:
            raise SecretError(
                f"secret file {self.path} is over {_MAX_FILE_BYTES} bytes, over the limit of "
                f"{MAX_SECRET_CHARS} characters (25 KB, Key Vault's limit for a secret value)"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretError(f"secret file {self.path} is not UTF-8 text") from None
        value = _strip_newline(text) if self._strip else text
        check_size(value, f"secret file {self.path}")
        if not value.strip():
            raise SecretError(f"secret file {self.path} is empty")
        if self._header:
            check_header_value(value, f"secret file {self.path}")
        self._signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        self._next_check = time.monotonic() + CHECK_INTERVAL_S
        redaction.register(value)
        return value

    @property
    def value(self) -> str:
        if time.monotonic() >= self._next_check:
            self.refresh()
        return self._value

    def refresh(self) -> bool:
        """Re-read the file if it changed; return True when the value changed."""
        self._next_check = time.monotonic() + CHECK_INTERVAL_S
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            self._report(
                f"cannot stat secret file {self.path}: {exc.strerror or exc}; keeping the last value"
            )
            return False
        if (stat.st_mtime_ns, stat.st_size, stat.st_ino) == self._signature:
            return False
        try:
            value = self._read()
        except SecretError as exc:
            self._report(f"{exc}; keeping the last value")
            return False
        self._last_error = None
        if value == self._value:
            return False
        self._value = value
        self._changed()
        logger.info("secret %s changed; using the new value", self.source)
        return True

    def _report(self, message: str) -> None:
        if message != self._last_error:
            self._last_error = message
            logger.warning(message)

    @property
    def error(self) -> str | None:
        return self._last_error


class ManagedSecret(Secret):
    """A value the gateway sets itself, e.g. an endpoint key fetched from the control plane.

    `value` raises SecretError until the first `set()`; check `loaded` first where that can happen.
    """

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self._value: str | None = None

    @property
    def loaded(self) -> bool:
        return self._value is not None

    @property
    def value(self) -> str:
        value = self._value
        if value is None:
            raise SecretError(f"{self.source} has not been fetched yet")
        return value

    def set(self, value: str) -> bool:
        """Store a new value; return True when it differs from the one held.

        An equal value keeps the old string object: key slots compare by identity to notice changes.
        """
        if not value:
            raise SecretError(f"{self.source}: refusing an empty value")
        check_size(value, self.source)
        redaction.register(value)
        if value == self._value:
            return False
        first = self._value is None
        self._value = value
        if first:
            self.since = time.time()
        else:
            self._changed()
        return True
