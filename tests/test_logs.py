"""The log pipeline's own shortcuts (gateway.logs, gateway.telemetry's access record): each writes what the
`logging` library would have written, only cheaper, since the access line is written per request."""

from __future__ import annotations

import io
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway import logs, telemetry
from gateway.callers import ANONYMOUS
from gateway.telemetry import RequestRecord, Telemetry, access_logger

# The clock's readings, and the time text a formatter added from them.
_TIME_FIELDS = {"created", "msecs", "relativeCreated", "asctime"}


def _request_record(started: float) -> RequestRecord:
    record = RequestRecord("POST", started)
    record.request_id = "0a1b2c3d4e5f0000000001"
    record.route = "iris"
    record.caller = ANONYMOUS
    record.status = 502
    record.upstream_status = 503
    record.attempts = 2
    record.credential = "primary"
    record.bytes_in = 55
    record.bytes_out = 120
    record.error = "upstream_unavailable"
    return record


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_access_record_is_the_one_the_library_makes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built from a template when `configure` turned the caller look-up off; made by `info()` when somebody
    installed a record factory: the same attributes, the same values but the clock's."""
    keep = _Keep()
    logs.configure("info", "text", stream=io.StringIO())
    access_logger.addHandler(keep)
    try:
        monkeypatch.setattr(telemetry.time, "perf_counter", lambda: 100.25)
        Telemetry._access_line(_request_record(100.0), "iris")
        built = keep.records.pop()
        factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(lambda *args, **kwargs: logging.LogRecord(*args, **kwargs))
        try:
            Telemetry._access_line(_request_record(100.0), "iris")
        finally:
            logging.setLogRecordFactory(factory)
        made = keep.records.pop()
    finally:
        access_logger.removeHandler(keep)
        logs.configure("warning")
    assert set(vars(built)) == set(vars(made))
    assert {k: v for k, v in vars(built).items() if k not in _TIME_FIELDS} == {
        k: v for k, v in vars(made).items() if k not in _TIME_FIELDS
    }
    assert abs(built.created - made.created) < 60 and built.msecs == int(built.msecs)
    assert built.getMessage() == (
        "0a1b2c3d4e5f0000000001 POST route=iris caller=anonymous status=502 upstream_status=503 "
        "duration_ms=250.0 attempts=2 credential=primary bytes_in=55 bytes_out=120 error=upstream_unavailable"
    )
    assert (built.route, built.error_code, built.duration_ms) == ("iris", "upstream_unavailable", 250.0)


def _records() -> list[dict[str, Any]]:
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    base = {
        "name": "gateway.test",
        "levelname": "WARNING",
        "levelno": 30,
        "created": time.time(),
        "msecs": 5.0,
    }
    return [
        {**base, "msg": "plain %s", "args": ("line",)},
        {**base, "msg": "a\nsecond line", "args": None},
        {**base, "msg": "failed", "args": None, "exc_info": exc_info},
        {**base, "msg": "ends in a newline\n", "args": None, "exc_text": "ValueError: boom"},
        {**base, "msg": "with a stack", "args": None, "stack_info": "Stack (most recent call last):\n  here"},
        {**base, "msg": "both", "args": None, "exc_text": "E", "stack_info": "S"},
    ]


@pytest.mark.parametrize(
    "fields", _records(), ids=["plain", "control", "exc_info", "newline", "stack", "both"]
)
def test_the_text_formatter_writes_what_logging_formatter_writes(fields: dict[str, Any]) -> None:
    formatter = logs.TextFormatter()
    ours = formatter.format(logging.makeLogRecord(fields))
    library = logging.Formatter.format(formatter, logging.makeLogRecord(fields))
    assert ours == logs._CONTROL.sub(logs._escape_control, library)
    assert "\n" not in ours  # one record, one line


def _handler_writes(stream: Any, path: Path) -> str:
    handler = logs._LineHandler(stream)
    handler.setFormatter(logs.TextFormatter())
    handler.emit(logging.makeLogRecord({"name": "gateway.test", "msg": "written", "levelname": "INFO"}))
    return path.read_text()  # what reached the file, not what waits in a buffer


def test_the_handler_flushes_a_buffered_stream_after_every_line(tmp_path: Path) -> None:
    path = tmp_path / "buffered.log"
    with open(path, "w", buffering=65536) as stream:
        assert not logs._flushes_itself(stream)
        assert _handler_writes(stream, path).endswith(" INFO gateway.test: written\n")


class _CountingFlushes(io.TextIOWrapper):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_the_handler_does_not_flush_a_stream_that_wrote_the_line_out_itself(tmp_path: Path) -> None:
    """Line-buffered (stderr) or written through to an unbuffered file (PYTHONUNBUFFERED=1): the line is
    in the file once written, and the handler does not call the stream's `flush` too."""
    path = tmp_path / "line.log"
    with _CountingFlushes(open(path, "wb"), line_buffering=True) as stream:
        assert logs._flushes_itself(stream)
        assert _handler_writes(stream, path).endswith(": written\n")
        assert stream.flushes == 0
    path = tmp_path / "unbuffered.log"
    with _CountingFlushes(io.FileIO(path, "w"), write_through=True) as stream:
        assert logs._flushes_itself(stream)
        assert _handler_writes(stream, path).endswith(": written\n")
        assert stream.flushes == 0
