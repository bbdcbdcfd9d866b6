"""Secret hygiene over the whole test session: no secret value the suite used may appear in any log
record, in any answer the gateway itself wrote (status, headers, its own bodies), or in the output of a
`gateway serve`/`check`/`demo` process a test captured.

The record is kept by tests/conftest.py (`HYGIENE`): a handler on the root logger for the whole session,
wrappers around what the gateway writes to its clients (`Exchange.answer` for its own answers,
`Exchange.start` for the head of an upstream's, `GatewayApp.__call__`'s `send` for the admin
endpoints), a wrapper around `subprocess.Popen.communicate`, and
wrappers that note every key, client secret and token the emulator hands out. Bodies the gateway passes
through from an upstream are the upstream's words, not the gateway's (the test upstream echoes the
Authorization it received on purpose), so only their status and headers are checked. Answers of the
emulator itself are never recorded: they carry tokens by design.

Each log record is checked twice: as handed to logging (no secret may even reach a logger) and as the
gateway writes it (`gateway.logs`: redacting filter, text and JSON formatters, extras included). Loggers
the tests own (`gateway.test`, `tests.*`) get only the second check: tests log secrets there on purpose
to prove redaction works, so a redaction bug fails this scan too.

The final check runs after every other test (conftest reorders it last).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import httpx
import pytest
from conftest import (
    HYGIENE,
    HYGIENE_LAST,
    PRIMARY,
    SECONDARY,
    SecretHygiene,
    _HygieneHandler,
    _ResponseRecorder,
    find_leaks,
    key_route,
)


def _value() -> str:
    return f"leak-canary-{uuid.uuid4().hex}"


def test_find_leaks_reports_where_a_value_appeared():
    secret, short = _value(), "abc1234"
    entries = [
        ("log", "gateway.proxy during t1", "ok line"),
        ("response", "GET /iris during t2", f"401\ncontent-type: x\n\nbad key {secret}!"),
        ("log", "gateway.x during t3", f"{short} is too short to count"),
    ]
    leaks = find_leaks({secret: "test", short: "short"}, entries)
    assert len(leaks) == 1
    (leak,) = leaks
    assert (leak.kind, leak.where) == ("response", "GET /iris during t2")
    assert "<SECRET>" in leak.excerpt and secret not in leak.excerpt and secret not in str(leak)
    assert find_leaks({secret: "test"}, entries[:1]) == []


def test_a_private_collector_catches_a_leak_on_every_channel():
    """The check can fail: a deliberately leaked value is found in a log record, in a gateway answer's
    headers and own body, and in a process's output; a passed-through upstream body is not checked."""
    private = SecretHygiene()
    in_log, in_header, in_body, in_output, passed_through = (_value() for _ in range(5))
    for value in (in_log, in_header, in_body, in_output, passed_through):
        private.add_secret(value, "self-test")

    logger = logging.getLogger("gateway.hygiene-self-test")
    logger.propagate = False  # keep the deliberate leak out of the session's record
    handler = _HygieneHandler(private)
    logger.addHandler(handler)
    try:
        logger.warning("the key is %s", in_log)
    finally:
        logger.removeHandler(handler)

    async def answer(passthrough: bool, header: bytes, body: bytes) -> str:
        async def send(message: dict) -> None:
            pass

        recorder = _ResponseRecorder(send, "POST /iris/score")
        recorder.passthrough = passthrough
        await recorder({"type": "http.response.start", "status": 502, "headers": [(b"x-debug", header)]})
        await recorder({"type": "http.response.body", "body": body, "more_body": False})
        return recorder.text()

    private.add("response", "own answer", asyncio.run(answer(False, in_header.encode(), in_body.encode())))
    private.add("response", "passed through", asyncio.run(answer(True, b"-", passed_through.encode())))
    private.record_output("`gateway serve` (self-test)", "", f"Traceback ... {in_output}\n")

    leaks = private.leaks()
    found = {(leak.secret, leak.kind) for leak in leaks}
    assert (in_log, "log") in found
    assert (in_log, "log output") in found  # unregistered: the gateway's redaction cannot mask it
    assert (in_header, "response") in found
    assert (in_body, "response") in found
    assert (in_output, "output") in found
    assert passed_through not in {leak.secret for leak in leaks}
    assert PRIMARY in private.secret_values() and SECONDARY in private.secret_values()


def test_log_output_is_checked_after_redaction_for_test_owned_loggers_too():
    """Loggers the tests own log secrets on purpose: their raw records are not checked, but what the
    gateway's pipeline writes of them is. A registered value is masked there (no leak); a value
    redaction does not know (what a redaction bug looks like) is found."""
    private = SecretHygiene()
    masked, unmasked = _value(), _value()
    private.add_secret(masked, "self-test")
    private.add_secret(unmasked, "self-test")
    from gateway import redaction

    redaction.register(masked)
    logger = logging.getLogger("gateway.test.hygiene-self-test")
    logger.propagate = False
    handler = _HygieneHandler(private)
    logger.addHandler(handler)
    try:
        logger.warning("key %s", masked)
        logger.warning("key %s", unmasked, extra={"detail": f"extra {masked}"})
    finally:
        logger.removeHandler(handler)
    kinds = {kind for kind, _, _ in private.entries}
    assert kinds == {"log output"}  # test-owned: no raw record kept
    written = "\n".join(text for _, _, text in private.entries)
    assert "key ***" in written and '"detail": "extra ***"' in written  # text and JSON, extras included
    found = {(leak.secret, leak.kind) for leak in private.leaks()}
    assert found == {(unmasked, "log output")}


def test_a_record_scanned_between_tests_keeps_its_leaks():
    """Load tests record hundreds of thousands of answers: between tests a big record is scanned and
    emptied, and what it held still counts at the end."""
    private = SecretHygiene()
    leaked, later = _value(), _value()
    private.add_secret(leaked, "test")
    private.add("log output", "t1", f"oops {leaked}")
    private.add("log output", "t1", "fine")
    private.scan_now()
    assert private.entries == [] and private.total == 0
    private.add_secret(later, "test")
    private.add("response", "t2", f"again {later}")
    assert {(leak.secret, leak.where) for leak in private.leaks()} == {(leaked, "t1"), (later, "t2")}


def test_the_session_record_is_live(gateway_factory, upstream, monkeypatch):
    """The session's collector really sees log records and the gateway's answers (own and passed
    through), so an empty record cannot pass the final check by accident."""
    canary = _value()
    before = len(HYGIENE.entries)
    logging.getLogger("gateway.hygiene-canary").warning("canary %s", canary)
    monkeypatch.setenv("HYGIENE_PRIMARY", PRIMARY)
    _, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, primary={"env": "HYGIENE_PRIMARY"})}})
    assert httpx.get(gw.url + "/nowhere").status_code == 404
    echoed = httpx.post(gw.url + "/iris/echo", content=b"{}")
    assert PRIMARY in echoed.text  # the test upstream echoes the Authorization it received
    new = HYGIENE.entries[before:]
    assert any(kind == "log" and canary in text for kind, _, text in new)
    assert any(kind == "response" and "route_not_found" in text for kind, _, text in new)
    passed = [text for kind, where, text in new if kind == "response" and where.startswith("POST /iris/echo")]
    assert passed and "<upstream body passed through>" in passed[0] and PRIMARY not in passed[0]
    assert PRIMARY in HYGIENE.secret_values()


@pytest.mark.secret_hygiene_last
def test_no_secret_reached_logs_or_gateway_answers():
    assert HYGIENE_LAST == "secret_hygiene_last"
    leaks = HYGIENE.leaks()
    report = "\n".join(str(leak) for leak in leaks[:40])
    assert not leaks, f"{len(leaks)} secret value(s) appeared where they must not:\n{report}"
    assert HYGIENE.dropped == 0, f"{HYGIENE.dropped} entries were not recorded (record full)"
