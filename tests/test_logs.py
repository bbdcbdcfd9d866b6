"""The log pipeline's own shortcuts (gateway.logs, gateway.telemetry's access record): each writes what the
`logging` library would have written, only cheaper, since the access line is written per request."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway import logs, redaction, telemetry
from gateway.callers import ANONYMOUS
from gateway.telemetry import RequestRecord, Telemetry, access_logger


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


def test_the_access_record_carries_the_lines_fields_for_other_handlers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When anything but the gateway's own handler listens (JSON lines, `caplog`), the access line is a
    record with its fields as extras."""
    keep = _Keep()
    logs.configure("info", "text", stream=io.StringIO())
    access_logger.addHandler(keep)
    try:
        monkeypatch.setattr(telemetry.time, "perf_counter", lambda: 100.25)
        Telemetry._access_line(_request_record(100.0), "iris")
        (made,) = keep.records
    finally:
        access_logger.removeHandler(keep)
        logs.configure("warning")
    assert made.getMessage() == (
        "0a1b2c3d4e5f0000000001 POST route=iris caller=anonymous status=502 upstream_status=503 "
        "duration_ms=250.0 attempts=2 credential=primary bytes_in=55 bytes_out=120 error=upstream_unavailable"
    )
    assert (made.route, made.error_code, made.duration_ms, made.caller) == (
        "iris",
        "upstream_unavailable",
        250.0,
        "anonymous",
    )


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
        # Printable beyond ASCII (the formatter skips its control-character scan), then a tab and a line
        # separator (it does not).
        {**base, "msg": "caller=cert:\u00e9t\u00e9 \u6f22\u5b57", "args": None},
        {**base, "msg": "a\ttab and a\u2028separator\x7f", "args": None},
    ]


@pytest.mark.parametrize(
    "fields",
    _records(),
    ids=["plain", "control", "exc_info", "newline", "stack", "both", "printable", "unprintable"],
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


class _Writes(io.StringIO):
    """A stream that keeps each `write` call's text."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _batching_handler() -> tuple[logs._LineHandler, _Writes]:
    stream = _Writes()
    handler = logs._LineHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler, stream


def _log(handler: logging.Handler, message: str) -> None:
    handler.handle(logging.makeLogRecord({"name": "gateway.test", "msg": message, "levelno": logging.INFO}))


def test_the_lines_of_one_loop_iteration_are_written_in_one_write_when_it_ends() -> None:
    handler, stream = _batching_handler()

    async def serve() -> None:
        handler.batch(asyncio.get_running_loop())
        for n in range(3):
            _log(handler, f"line {n}")
        assert stream.writes == []  # the iteration that logged them has not ended
        await asyncio.sleep(0)
        assert stream.writes == ["line 0\nline 1\nline 2\n"]
        _log(handler, "line 3")
        handler.flush()  # as `logging.shutdown()` does at exit
        assert stream.writes[-1] == "line 3\n"
        _log(handler, "line 4")
        handler.unbatch()  # the gateway's shutdown
        assert stream.writes[-1] == "line 4\n"
        _log(handler, "line 5")
        assert stream.writes[-1] == "line 5\n"  # no longer batched: at once
        await asyncio.sleep(0)

    asyncio.run(serve())
    assert stream.getvalue() == "".join(f"line {n}\n" for n in range(6))  # each once, in order


def test_a_burst_in_one_iteration_is_written_in_bounded_batches() -> None:
    handler, stream = _batching_handler()

    async def serve() -> None:
        handler.batch(asyncio.get_running_loop())
        for n in range(logs._BATCH_LINES + 10):
            _log(handler, str(n))
        assert [text.count("\n") for text in stream.writes] == [logs._BATCH_LINES]
        await asyncio.sleep(0)
        assert [text.count("\n") for text in stream.writes] == [logs._BATCH_LINES, 10]

    asyncio.run(serve())
    assert stream.getvalue().split() == [str(n) for n in range(logs._BATCH_LINES + 10)]


def test_a_line_from_another_thread_writes_the_loop_threads_lines_first() -> None:
    handler, stream = _batching_handler()

    async def serve() -> None:
        handler.batch(asyncio.get_running_loop())
        _log(handler, "from the loop")
        other = threading.Thread(target=_log, args=(handler, "from a thread"))
        other.start()
        other.join()
        assert stream.writes == ["from the loop\n", "from a thread\n"]
        await asyncio.sleep(0)  # the loop's own write finds nothing left

    asyncio.run(serve())
    assert stream.getvalue() == "from the loop\nfrom a thread\n"


def test_lines_are_written_at_once_when_the_batching_loop_does_not_run() -> None:
    """A loop stopped or closed without the gateway's shutdown would never run the write."""
    handler, stream = _batching_handler()
    loop = asyncio.new_event_loop()
    try:
        handler.batch(loop)
        _log(handler, "while stopped")
        assert stream.writes == ["while stopped\n"]
    finally:
        loop.close()
    _log(handler, "once closed")
    assert stream.writes == ["while stopped\n", "once closed\n"]


@contextlib.contextmanager
def _configured_alone(stream: io.StringIO, fmt: str = "text") -> Iterator[logs._LineHandler]:
    """`logs.configure` as the gateway process has it: its handler the root's only one (the test suite's
    secret-hygiene collector, which `configure` puts back, is set aside meanwhile)."""
    logs.configure("info", fmt, stream=stream)
    root = logging.getLogger()
    others = [handler for handler in root.handlers if not isinstance(handler, logs._LineHandler)]
    for handler in others:
        root.removeHandler(handler)
    try:
        (installed,) = root.handlers
        assert isinstance(installed, logs._LineHandler)
        yield installed
    finally:
        for handler in others:
            root.addHandler(handler)
        logs.configure("warning")


def _access_lines(record: RequestRecord, fmt: str, *, force_record: bool) -> list[str]:
    """The access line as the gateway's handler writes it: straight from the request (`write_message`), or
    through a LogRecord and the library's handler chain (a filter on the access logger forces that). The
    time apart: the two are written at different instants."""
    stream = io.StringIO()
    passes = logging.Filter()  # lets every record through
    with _configured_alone(stream, fmt):
        if force_record:
            access_logger.addFilter(passes)
        try:
            assert (logs.sole_handler(access_logger, logging.INFO) is None) is force_record
            Telemetry._access_line(record, record.route or "")
        finally:
            access_logger.removeFilter(passes)
    lines = stream.getvalue().splitlines()
    if fmt == "json":
        return [re.sub(r'^\{"time": "[^"]*", ', "{", line) for line in lines]
    return [line.split(" ", 1)[1] for line in lines]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_access_line_written_without_a_record_is_the_one_the_record_makes(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Byte for byte (the time apart), also where redaction and the one-line rule change it."""
    monkeypatch.setattr(telemetry.time, "perf_counter", lambda: 100.25)
    secret = "s3cr3t-registered-value-0123456789"
    redaction.register(secret)
    plain = _request_record(100.0)
    hostile = _request_record(100.0)
    hostile.request_id = secret  # a client that sent a secret of the gateway's as its request id
    hostile.caller = dataclasses.replace(ANONYMOUS, id="cert:x\nforged INFO line bearer abc")
    for record in (plain, hostile):
        direct = _access_lines(record, fmt, force_record=False)
        assert direct == _access_lines(record, fmt, force_record=True)
        assert len(direct) == 1
    line = direct[0]
    if fmt == "json":
        assert json.loads(line)["caller"] == "cert:x\nforged INFO line bearer ***"
        assert json.loads(line)["logger"] == "gateway.access"
    else:
        assert line.startswith("INFO gateway.access: ") and "\n" not in line and "bearer ***" in line
    assert secret not in line


def test_the_access_line_goes_through_the_library_whenever_anything_else_would_see_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    with _configured_alone(io.StringIO()) as installed:
        assert logs.sole_handler(access_logger, logging.INFO) is installed
        assert logs.sole_handler(access_logger, logging.DEBUG) is installed
        installed.setLevel(logging.WARNING)
        assert logs.sole_handler(access_logger, logging.INFO) is None
        installed.setLevel(logging.NOTSET)
        for logger in (access_logger, logging.getLogger("gateway"), root):
            extra = _Keep()
            logger.addHandler(extra)
            try:
                assert logs.sole_handler(access_logger, logging.INFO) is None, logger.name
            finally:
                logger.removeHandler(extra)
        access_logger.propagate = False
        try:
            assert logs.sole_handler(access_logger, logging.INFO) is None
        finally:
            access_logger.propagate = True
        installed.addFilter(logging.Filter())
        assert logs.sole_handler(access_logger, logging.INFO) is None
        installed.filters.pop()
        monkeypatch.setattr(logging, "_srcfile", "logging/__init__.py")
        assert logs.sole_handler(access_logger, logging.INFO) is None
        monkeypatch.undo()
        factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(lambda *args, **kwargs: logging.LogRecord(*args, **kwargs))
        try:
            assert logs.sole_handler(access_logger, logging.INFO) is None
        finally:
            logging.setLogRecordFactory(factory)
        assert logs.sole_handler(access_logger, logging.INFO) is installed
        assert not installed.wants_extra
        installed.setFormatter(logging.Formatter())  # somebody else's format
        assert logs.sole_handler(access_logger, logging.INFO) is None
    with _configured_alone(io.StringIO(), "json") as installed:
        assert logs.sole_handler(access_logger, logging.INFO) is installed and installed.wants_extra


def test_a_json_line_has_the_records_extras_and_error_after_its_own_fields() -> None:
    record = logging.makeLogRecord(
        {
            "name": "gateway.test",
            "levelname": "WARNING",
            "created": 1796616000.25,
            "msecs": 250.0,
            "msg": "failed %s",
            "args": ("here",),
            "route": "iris",
            "_private": "not shown",
            "exc_text": "ValueError: boom",
        }
    )
    line = logs.JsonFormatter().format(record)
    assert line.startswith(
        '{"time": "2026-12-07T04:00:00.250Z", "level": "warning", "logger": "gateway.test", '
    )
    assert json.loads(line) == {
        "time": "2026-12-07T04:00:00.250Z",
        "level": "warning",
        "logger": "gateway.test",
        "message": "failed here",
        "route": "iris",
        "error": "ValueError: boom",
    }


class _Opaque:
    """A value JSON has no form for: the line shows its `str()` (`default=str`)."""

    def __str__(self) -> str:
        return "opaque \u00e9\n"


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and the infinities too: the library writes NaN, Infinity
    | st.text()
    | st.builds(_Opaque),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_EXTRA_NAMES = st.sampled_from(["time", "level", "logger", "message", "request_id", "caller"]) | st.text()


@settings(max_examples=300, deadline=None)
@given(
    level=st.sampled_from(["INFO", "WARNING", "Level 5"]),
    name=st.text(max_size=12),
    message=st.text(),
    extra=st.none() | st.dictionaries(_EXTRA_NAMES, _JSON_VALUES, max_size=6),
)
@example(level="INFO", name="gateway.access", message='a \u2028 "quoted" bearer abc', extra={"time": 1})
@example(
    level="INFO",
    name="gateway.access",
    message="m",
    extra={"nan": float("nan"), "inf": [float("-inf")], "opaque": _Opaque(), "text": "\u00e9\u2028\\"},
)
def test_a_json_line_is_what_json_dumps_writes_for_its_fields_and_extras(
    level: str, name: str, message: str, extra: dict[str, Any] | None
) -> None:
    """`JsonFormatter.line` writes the four fields itself and the extras with the C encoder: byte for byte
    what `json.dumps(default=str)` of the one dict writes (an extra of a field's name in its place)."""
    formatter = logs.JsonFormatter()
    created = 1796616000.25
    data = {"time": "2026-12-07T04:00:00.250Z", "level": level.lower(), "logger": name, "message": message}
    data.update(extra or {})
    assert formatter.line(created, level, name, message, extra) == redaction.redact(
        json.dumps(data, default=str)
    )


def test_a_json_line_with_a_circular_extra_is_refused_as_json_dumps_refuses_it() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        logs.JsonFormatter().line(1796616000.25, "INFO", "gateway.test", "m", {"loop": loop})


def test_the_access_line_names_the_level_as_the_library_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry.time, "perf_counter", lambda: 100.25)
    logging.addLevelName(logging.INFO, "NOTE")
    try:
        for fmt in ("text", "json"):
            direct = _access_lines(_request_record(100.0), fmt, force_record=False)
            assert direct == _access_lines(_request_record(100.0), fmt, force_record=True)
            assert "NOTE gateway.access" in direct[0] or '"level": "note"' in direct[0]
    finally:
        logging.addLevelName(logging.INFO, "INFO")


class _FailingStream(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("disk full")


def test_an_access_line_that_cannot_be_written_is_reported_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = "s3cr3t-registered-value-for-the-error-report"
    redaction.register(secret)
    record = _request_record(100.0)
    record.request_id = secret
    with _configured_alone(_FailingStream()):
        Telemetry._access_line(record, "iris")
    report = capsys.readouterr().err
    assert "--- Logging error ---" in report and "disk full" in report
    assert secret not in report and "***" in report


def test_lines_logged_after_the_loop_was_told_to_stop_are_written_once_it_has() -> None:
    """The loop stops at the end of the iteration that logged: the write it had queued never runs."""
    handler, stream = _batching_handler()
    loop = asyncio.new_event_loop()

    def last_iteration() -> None:
        handler.batch(loop)
        loop.stop()
        _log(handler, "one")  # batched: the write is queued for the next iteration, which will not come

    try:
        loop.call_soon(last_iteration)
        loop.run_forever()
        assert stream.getvalue() == ""
        _log(handler, "two")  # the loop no longer runs: everything is written now
        assert stream.getvalue() == "one\ntwo\n"
    finally:
        loop.close()
    _log(handler, "three")
    assert stream.getvalue() == "one\ntwo\nthree\n"


def test_a_line_written_without_a_record_is_formatted_under_the_handlers_lock() -> None:
    """The formatter keeps one clock text for both paths: a record formatted by another thread meanwhile
    must not interleave with it."""
    stream = io.StringIO()
    with _configured_alone(stream) as handler:
        formatter = handler.formatter
        assert isinstance(formatter, logs.TextFormatter)
        inside = threading.Event()
        release = threading.Event()
        overlapped: list[bool] = []
        original = formatter._time_text

        def paused(created: float) -> str:
            if threading.current_thread() is threading.main_thread():
                inside.set()
                release.wait(5)
            else:
                overlapped.append(not release.is_set())  # the main thread is still inside
            return original(created)

        formatter._time_text = paused  # type: ignore[method-assign]
        other = threading.Thread(target=lambda: (inside.wait(5), _log(handler, "from a thread")))
        other.start()
        try:
            threading.Timer(0.2, release.set).start()
            handler.write_message(time.time(), "INFO", "gateway.access", "from the loop", None)
        finally:
            release.set()
            other.join(5)
    assert overlapped == [False]
    assert stream.getvalue().splitlines()[0].endswith("gateway.access: from the loop")
