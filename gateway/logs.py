"""Logging set-up: text or JSON lines, every message passed through redaction first."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import time
from typing import Any

from gateway.redaction import redact

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
    "message",
    "asctime",
}


# In any text-log message: whatever could start a new line or move the cursor. (The one client-chosen
# value in the access line, the request id, is taken from the client only in Azure ML's form: letters,
# digits, `-` and `_`; see gateway.headers.)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_control(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]


class RedactingFilter(logging.Filter):
    """Masks secrets in the final message, in exception text and in structured extras."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg = cleaned
            record.args = None
        if record.exc_info:
            # Tracebacks can quote locals and URLs; keep only the exception's (redacted) summary.
            exc = record.exc_info[1]
            record.exc_text = redact(f"{type(exc).__name__}: {exc}") if exc else None
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                data[key] = value
        if record.exc_text:
            data["error"] = record.exc_text
        return redact(json.dumps(data, default=str))


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <logger>: <message>`. The message and exception text come redacted by the handler's
    `RedactingFilter` (`configure` installs both; a filter runs before the formatter), and nothing else in
    the line can hold a secret, so the line is not scanned a second time: the access line is written per
    request."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:  # strftime once a second, not once a line
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        # `logging.Formatter.format` with this class's format string written out (it is fixed, and it
        # uses the time): the library's version asks `usesTime()` and formats a `%` template with the
        # record's attributes for every line, and the access line is written per request.
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        text = f"{record.asctime} {record.levelname} {record.name}: {record.message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}" if text[-1:] != "\n" else text + record.exc_text
        if record.stack_info:
            text = f"{text}\n" if text[-1:] != "\n" else text
            text += self.formatStack(record.stack_info)
        # One record, one line: a value that carries a line break cannot forge a second record.
        return _CONTROL.sub(_escape_control, text)


def configure(level: str = "info", fmt: str = "text", stream: Any = None) -> None:
    # What a record would otherwise gather for every line and no format of ours prints: the caller's
    # file and line (a walk up the stack), thread, process and multiprocessing names. The logging
    # documentation's "Optimization" section names these switches.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = _LineHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uv = logging.getLogger(name)
        uv.handlers = []
        uv.propagate = True
    # The gateway writes its own access line; uvicorn's would duplicate it without the route.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("msal").setLevel(max(logging.WARNING, root.level))
    # No level prints header values: at debug, the WebSocket library uvicorn hands handshakes to logs
    # every request and response header through `uvicorn.error`.
    for name in ("uvicorn.error", "websockets"):
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    uvicorn_error = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _UnfinishedResponseFilter) for f in uvicorn_error.filters):
        uvicorn_error.addFilter(_UnfinishedResponseFilter())


def _flushes_itself(stream: Any) -> bool:
    """True for a text stream whose every line reaches the file as it is written: line-buffered (stderr,
    terminal or not, since Python 3.9), or written through to an unbuffered file (PYTHONUNBUFFERED=1,
    as the Dockerfile sets)."""
    if getattr(stream, "line_buffering", False):
        return True
    return bool(getattr(stream, "write_through", False)) and isinstance(
        getattr(stream, "buffer", None), io.RawIOBase
    )


class _LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """`logging.StreamHandler`, without its flush after each line when the stream has written the line
    out already (`_flushes_itself`): the flush takes the handler's lock and calls the stream once more per
    record, and the access line is written per request."""

    _checked: Any = None  # the stream `_flushes_itself` was asked about (`setStream` may replace it)
    _flushes = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            stream = self.stream
            stream.write(message + self.terminator)
            if stream is not self._checked:
                self._checked, self._flushes = stream, _flushes_itself(stream)
            if not self._flushes:
                self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class _UnfinishedResponseFilter(logging.Filter):
    """Drops uvicorn's ERROR line for an answer the application left unfinished: the gateway does that
    on purpose to cut off the client connection (an upstream broke off its answer), and has already
    logged why, as a warning naming the request."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "ASGI callable returned without completing response."
