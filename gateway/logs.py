"""Logging set-up: text or JSON lines, every message passed through redaction first."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
import threading
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


# `json.dumps(data, default=str)` builds this encoder for every call.
_encode_json = json.JSONEncoder(default=str).encode
# What that encoder does with a dict, without its per-call set-up in Python (a closure and the settings
# read again): the C encoder it makes, with a fresh `markers` dict (a circular extra is refused, not
# recursed). None where the C accelerator is missing: `_encode_json` then.
_json_string = json.encoder.encode_basestring_ascii
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)  # not in typeshed
# A JSON line's own fields, written before the extras: an extra of the same name takes its place.
_JSON_LINE_FIELDS = frozenset({"time", "level", "logger", "message"})


def _encode_extras(extra: dict[str, Any]) -> str:
    """`_encode_json(extra)`, with the one-shot C encoder built as `JSONEncoder.iterencode` builds it."""
    if _c_make_encoder is None:
        return _encode_json(extra)
    return "".join(_c_make_encoder({}, str, _json_string, None, ": ", ", ", False, False, True)(extra, 0))


class _LineFormatter(logging.Formatter):
    """A formatter of one line per record, which can also write a record's line from its fields alone
    (`line`, for `_LineHandler.write_message`), and reads the clock's text once a second."""

    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt)
        self._second = -1
        self._second_text = ""

    def _time_text(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # strftime once a second, not once a line
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        # The milliseconds as LogRecord computes its `msecs`.
        return f"{self._second_text}.{int((created - second) * 1000):03d}Z"

    def line(
        self, created: float, level_name: str, logger_name: str, message: str, extra: dict[str, Any] | None
    ) -> str:
        """What `format` writes for a record made at `created` with these fields and `extra`, and no
        exception or stack (`message` redacted already, as the handler's `RedactingFilter` leaves it)."""
        raise NotImplementedError


class JsonFormatter(_LineFormatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = {
            key: value
            for key, value in record.__dict__.items()
            if key not in _STANDARD_ATTRS and not key.startswith("_")
        }
        if record.exc_text:
            extra["error"] = record.exc_text
        return self.line(record.created, record.levelname, record.name, record.getMessage(), extra)

    def line(
        self, created: float, level_name: str, logger_name: str, message: str, extra: dict[str, Any] | None
    ) -> str:
        # The bytes `_encode_json` writes for the dict of the four fields and the extras, without building
        # that dict: the four are written here, the extras by the C encoder (an access line: 16 fields).
        if extra and not _JSON_LINE_FIELDS.isdisjoint(extra):
            data: dict[str, Any] = {
                "time": self._time_text(created),
                "level": level_name.lower(),
                "logger": logger_name,
                "message": message,
            }
            data.update(extra)
            return redact(_encode_json(data))
        text = (
            f'{{"time": "{self._time_text(created)}", "level": {_json_string(level_name.lower())}, '
            f'"logger": {_json_string(logger_name)}, "message": {_json_string(message)}'
        )
        return redact(f"{text}, {_encode_extras(extra)[1:]}" if extra else f"{text}}}")


class TextFormatter(_LineFormatter):
    """`<time> <LEVEL> <logger>: <message>`. The message and exception text come redacted by the handler's
    `RedactingFilter` (`configure` installs both; a filter runs before the formatter), and nothing else in
    the line can hold a secret, so the line is not scanned a second time: the access line is written per
    request."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._time_text(record.created)

    def line(
        self, created: float, level_name: str, logger_name: str, message: str, extra: dict[str, Any] | None
    ) -> str:
        return _one_line(f"{self._time_text(created)} {level_name} {logger_name}: {message}")

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
        return _one_line(text)


def _one_line(text: str) -> str:
    # One record, one line: a value that carries a line break cannot forge a second record. Every
    # character `_CONTROL` matches is unprintable; a printable line (the access line) skips the scan.
    return text if text.isprintable() else _CONTROL.sub(_escape_control, text)


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


# A batch written before the loop's iteration ends once it holds this many lines (a burst stays bounded).
_BATCH_LINES = 512


class _LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """`logging.StreamHandler`, cheaper for a line per request in two ways:

    - While the gateway serves (`batch_lines` at start-up, `unbatch_lines` at shutdown), the lines of the
      event loop's thread are collected and written once per loop iteration, by a callback the loop runs
      right after the work at hand: one write system call for all the requests an iteration answered,
      instead of one per line. nginx's `access_log ... buffer=` and Envoy's access log flush interval
      batch the same way, but for up to a second; here a line waits for no I/O and no timer, only for the
      iteration that logged it to end. A line from another thread writes the batched ones first, so each
      thread's lines stay in order; `flush()` (and so `logging.shutdown()` at exit) writes them too.
    - No flush after each line when the stream writes the line out itself (`_flushes_itself`): the flush
      takes the handler's lock and calls the stream once more per record."""

    _checked: Any = None  # the stream `_flushes_itself` was asked about (`setStream` may replace it)
    _flushes = False
    _batch: list[str] | None = None  # lines of the loop's thread not written yet (None: not batching)
    _batch_loop: asyncio.AbstractEventLoop | None = None
    _batch_thread = 0
    _batch_due = False  # the loop will write the batch (`_write_batch` is scheduled)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._put(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    @property
    def wants_extra(self) -> bool:
        """Its lines show a record's extras (JSON lines)."""
        return isinstance(self.formatter, JsonFormatter)

    def write_message(
        self, created: float, level_name: str, logger_name: str, message: str, extra: dict[str, Any] | None
    ) -> None:
        """Write the line `handle()` writes for a record with these fields and extras (None: the text line
        shows none) and no exception, without making the record: the message redacted as the
        `RedactingFilter` does it, then formatted as the formatter's `format` does. Only for the handler
        `sole_handler` finds."""
        message = redact(message)  # first: an error report below shows the message too
        try:
            formatter = self.formatter
            assert isinstance(formatter, _LineFormatter)
            # Formatted under the lock, as `handle()` formats: the formatter's clock text is shared.
            with self.lock:  # type: ignore[union-attr]
                self._put(formatter.line(created, level_name, logger_name, message, extra) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(logging.makeLogRecord({"name": logger_name, "msg": message, "created": created}))

    def _put(self, line: str) -> None:
        """Write a formatted line, or add it to the batch (the caller holds the handler's lock)."""
        batch = self._batch
        if batch is not None:
            if threading.get_ident() == self._batch_thread:
                batch.append(line)
                loop = self._batch_loop
                assert loop is not None
                if not loop.is_running():
                    # Stopped or closed without the gateway's shutdown (perhaps with the write due still
                    # queued in it): the loop may never run it.
                    self._batch_due = False
                    self._write_out()
                elif not self._batch_due:
                    self._batch_due = True
                    loop.call_soon(self._write_batch)
                elif len(batch) >= _BATCH_LINES:
                    self._write_out()
                return
            if batch:
                self._write_out()
        self._write(line)

    def _write(self, text: str) -> None:
        stream = self.stream
        stream.write(text)
        if stream is not self._checked:
            self._checked, self._flushes = stream, _flushes_itself(stream)
        if not self._flushes:
            super().flush()

    def _write_out(self) -> None:
        """Write the batched lines (the caller holds the handler's lock)."""
        batch = self._batch
        if batch:
            text = "".join(batch)
            batch.clear()  # written or not (a stream that fails keeps failing): never written twice
            self._write(text)

    def _write_batch(self) -> None:
        """The loop's callback at the end of an iteration that logged."""
        with self.lock:  # type: ignore[union-attr]
            self._batch_due = False
            try:
                self._write_out()
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": "batched log lines could not be written"}))

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_out()
            super().flush()

    def batch(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_out()
            self._batch, self._batch_loop, self._batch_thread = [], loop, threading.get_ident()
            self._batch_due = False

    def unbatch(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_out()
            self._batch, self._batch_loop, self._batch_due = None, None, False


def sole_handler(logger: logging.Logger, level: int) -> _LineHandler | None:
    """The handler a record of `logger` at `level` would reach, when `handle()` would pass it to that one
    alone and it is the `_LineHandler` that `configure` installs (its `RedactingFilter` the only filter,
    its formatter the text or JSON one): its `write_message` then writes what `handle()` would, without the
    record. None when anything else would see the record (a handler or filter added since, `caplog`, a
    record factory, the caller look-up). Asked per line: it reads a few attributes of the two or three
    loggers on the way."""
    if (
        logger.disabled
        or logger.filters
        or logging._srcfile is not None
        or logging.getLogRecordFactory() is not logging.LogRecord
    ):
        return None
    current = logger
    while current.parent is not None:  # up to the root
        if current.handlers or not current.propagate:
            return None
        current = current.parent
    handlers = current.handlers
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    if (
        type(handler) is not _LineHandler
        or type(handler.formatter) not in (TextFormatter, JsonFormatter)
        or handler.level > level
        or len(handler.filters) != 1
        or type(handler.filters[0]) is not RedactingFilter
    ):
        return None
    return handler


def batch_lines(loop: asyncio.AbstractEventLoop) -> None:
    """From now on, the gateway's log lines written in `loop`'s thread are written once per iteration of
    `loop` (see `_LineHandler`). Called by the gateway at start-up, in the loop."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _LineHandler):
            handler.batch(loop)


def unbatch_lines() -> None:
    """Write the batched lines and write each line at once again (the gateway's shutdown)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _LineHandler):
            handler.unbatch()


class _UnfinishedResponseFilter(logging.Filter):
    """Drops uvicorn's ERROR line for an answer the application left unfinished: the gateway does that
    on purpose to cut off the client connection (an upstream broke off its answer), and has already
    logged why, as a warning naming the request."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "ASGI callable returned without completing response."
