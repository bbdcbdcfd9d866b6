from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from redis_server import RedisServer, require_redis_server
from servers import ServerThread
from upstream import Upstream

from gateway.app import GatewayApp
from gateway.config import parse_config

# Every server in the suite is on loopback, and the gateway honours proxy variables (issue 9): a proxy
# set on the developer's machine must not carry the suite's traffic. Tests of the egress proxy set
# their own. This changes this process's environment (and its children's) only.
for _name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
    os.environ.pop(_name, None)
    os.environ.pop(_name.lower(), None)

PRIMARY = "primary-key-0123456789abcdef"
SECONDARY = "secondary-key-0123456789abcdef"


@pytest.fixture
def upstream() -> Iterator[tuple[Upstream, ServerThread]]:
    app = Upstream(accepted_keys={PRIMARY, SECONDARY})
    with ServerThread(app, lifespan="off") as server:
        yield app, server


@pytest.fixture
def gateway_factory() -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def start(config: dict[str, Any], **options: Any) -> ServerThread:
        app = GatewayApp(parse_config(config), config_path=options.pop("config_path", None))
        server = ServerThread(app, **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on loopback (skipped, saying why, when the binary is missing)."""
    require_redis_server()
    with RedisServer(tmp_path / "redis") as server:
        yield server


def key_route(upstream_url: str, **auth: Any) -> dict[str, Any]:
    return {"path": "/iris", "upstream": upstream_url, "auth": {"type": "key", **auth}}


# ---------------------------------------------------------------------------------------------------------
# Session-wide collectors: fault-scenario summary lines, and the secret-hygiene record (everything the
# gateway wrote or answered during the session, and every secret value the suite used). The final check
# is tests/test_secret_hygiene.py::test_no_secret_reached_logs_or_gateway_answers, which always runs last.

import logging  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass  # noqa: E402

FAULT_LINES: list[str] = []
HYGIENE_LAST = "secret_hygiene_last"
# Loggers that tests own and log secrets to on purpose (to prove redaction works); not the gateway's.
TEST_OWNED_LOGGERS = ("gateway.test", "tests")


def record_fault_line(line: str) -> None:
    FAULT_LINES.append(line)


@dataclass(frozen=True)
class Leak:
    secret: str  # never printed whole: see `shown`
    origin: str  # where the suite got the secret from
    kind: str  # "log", "log output", "response", "output"
    where: str
    excerpt: str

    @property
    def shown(self) -> str:
        return f"{self.secret[:4]}...({len(self.secret)} chars, {self.origin})"

    def __str__(self) -> str:
        return f"{self.shown} in {self.kind} [{self.where}]: {self.excerpt}"


def find_leaks(secrets: dict[str, str], entries: list[tuple[str, str, str]]) -> list[Leak]:
    """Every (secret, entry) where the secret's value occurs in an entry's text.

    `secrets`: value -> origin. `entries`: (kind, where, text). Values shorter than 8 characters are
    ignored (the gateway's redaction does the same: they would match ordinary words).
    """
    separator = "\x00\x01\x00"
    texts = [text for _, _, text in entries]
    joined = separator.join(texts)
    starts: list[int] = []
    position = 0
    for text in texts:
        starts.append(position)
        position += len(text) + len(separator)
    import bisect

    leaks: list[Leak] = []
    for value, origin in secrets.items():
        if len(value) < 8:
            continue
        seen: set[int] = set()
        at = joined.find(value)
        while at != -1 and len(seen) < 5:
            index = bisect.bisect_right(starts, at) - 1
            if index not in seen:
                seen.add(index)
                kind, where, text = entries[index]
                offset = at - starts[index]
                excerpt = text[max(0, offset - 60) : offset + len(value) + 60].replace(value, "<SECRET>")
                leaks.append(Leak(value, origin, kind, where, excerpt))
            at = joined.find(value, at + 1)
    return leaks


class _HygieneHandler(logging.Handler):
    """Records each log record twice: as the gateway's code handed it to logging (the raw record: the
    gateway must not even pass a secret to a logger), and as `gateway serve` would write it, through the
    gateway's own pipeline (`gateway.logs`: the redacting filter, then the text and the JSON formatter,
    extras included), so a redaction bug shows in the scan too. Loggers the tests own get only the
    second: they pass secrets on purpose, and redaction must mask them."""

    def __init__(self, sink: SecretHygiene) -> None:
        super().__init__(logging.NOTSET)
        self.sink = sink
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        from gateway.logs import JsonFormatter, RedactingFilter, TextFormatter

        self.redacting = RedactingFilter()
        self.text = TextFormatter()
        self.json = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        where = f"{record.name} during {self.sink.current}"
        # First, on a copy: the filter rewrites the record it is given, and formatting caches text on it.
        self.sink.add("log output", where, self.written(record))
        if record.name.startswith(TEST_OWNED_LOGGERS):
            return
        try:
            text = self.format(record)
        except Exception:  # a broken record must not break the test that logged it
            text = f"{record.msg!r} {record.args!r}"
        self.sink.add("log", where, text)

    def written(self, record: logging.LogRecord) -> str:
        """The record as the gateway's log handler writes it (text, then JSON)."""
        copy = logging.makeLogRecord(record.__dict__)
        try:
            self.redacting.filter(copy)
            return self.text.format(copy) + "\n" + self.json.format(copy)
        except Exception as exc:  # a broken record must not break the test that logged it
            return f"<not formattable: {type(exc).__name__}> {record.msg!r} {record.args!r}"


class _ResponseRecorder:
    """Wraps an ASGI `send` of the gateway: keeps status, headers and (the gateway's own) body."""

    __slots__ = ("chunks", "headers", "passthrough", "send", "size", "status", "where")

    def __init__(self, send: Any, where: str) -> None:
        self.send = send
        self.where = where
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.passthrough = False  # set while the proxy streams the upstream's own answer

    async def __call__(self, message: Any) -> None:
        kind = message.get("type", "")
        if kind.endswith("response.start"):
            self.status = message.get("status", 0)
            self.headers = list(message.get("headers", []))
        elif kind.endswith("response.body") and not self.passthrough and self.size < SecretHygiene.MAX_BODY:
            body = message.get("body", b"")
            self.chunks.append(body[: SecretHygiene.MAX_BODY - self.size])
            self.size += len(body)
        await self.send(message)

    def text(self) -> str:
        head = "\n".join(f"{n.decode('latin-1')}: {v.decode('latin-1')}" for n, v in self.headers)
        body = (
            "<upstream body passed through>" if self.passthrough else b"".join(self.chunks).decode("latin-1")
        )
        return f"{self.status}\n{head}\n\n{body}"


class SecretHygiene:
    MAX_BODY = 64 * 1024
    MAX_TOTAL = 64 * 1024 * 1024
    # Between tests, a record past this size is scanned and emptied (`scan_now`), so load tests cannot
    # fill it; the cap above is then only reached by one test that records more than the difference.
    SCAN_AT = 32 * 1024 * 1024

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: list[tuple[str, str, str]] = []
        self.total = 0
        self.dropped = 0
        self.found: list[Leak] = []  # leaks of the entries already scanned and let go
        self.secrets: dict[str, str] = {}
        self.current = "(session set-up)"
        self.handler = _HygieneHandler(self)
        self.counts = {"log": 0, "log output": 0, "response": 0, "output": 0}
        self._undo: list[Callable[[], None]] = []

    def add(self, kind: str, where: str, text: str) -> None:
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if self.total + len(text) > self.MAX_TOTAL:
                self.dropped += 1
                return
            self.total += len(text)
            self.entries.append((kind, where, text))

    def add_secret(self, value: Any, origin: str) -> None:
        if isinstance(value, str) and len(value) >= 8:
            with self.lock:
                self.secrets.setdefault(value, origin)

    def secret_values(self) -> dict[str, str]:
        from gateway import redaction

        values = {PRIMARY: "tests/conftest.py PRIMARY", SECONDARY: "tests/conftest.py SECONDARY"}
        with redaction._lock:
            registered = list(redaction._registered)
        for value in registered:
            values.setdefault(value, "gateway.redaction.register")
        with self.lock:
            for value, origin in self.secrets.items():
                values.setdefault(value, origin)
        return values

    def leaks(self) -> list[Leak]:
        with self.lock:
            entries = list(self.entries)
        return self.found + find_leaks(self.secret_values(), entries)

    def scan_now(self) -> None:
        """Check what is recorded against the secrets known now, keep the leaks, let the entries go. A
        secret first made known later is not looked for in them: tests declare their secrets before
        they use them, and the gateway registers a value before it can reach a log."""
        with self.lock:
            entries, self.entries, self.total = self.entries, [], 0
        self.found.extend(find_leaks(self.secret_values(), entries))

    # installation
    def attach_handler(self, *, levels: bool = True) -> None:
        """The handler goes first on the root logger: a handler with the gateway's redacting filter
        (after `gateway.logs.configure`) rewrites the records it handles, and the raw check must see
        them as the gateway's code made them."""
        root = logging.getLogger()
        if root.handlers[:1] != [self.handler]:
            root.removeHandler(self.handler)
            root.handlers.insert(0, self.handler)
        if not levels:
            return
        # The gateway's default log level; its own loggers at debug, MSAL at warning as `gateway.logs` does.
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        logging.getLogger("gateway").setLevel(logging.DEBUG)
        logging.getLogger("msal").setLevel(logging.WARNING)

    def install(self) -> None:
        self.attach_handler()
        self._patch_gateway_app()
        self._patch_logs()
        self._patch_subprocess()
        self._patch_emulator()

    def _patch_logs(self) -> None:
        """`gateway.logs.configure` replaces the root logger's handlers (tests call it in-process): put
        the collector back at once, keeping the levels the test asked for."""
        from gateway import logs

        hygiene = self

        def wrap(original: Any) -> Any:
            def configure(*args: Any, **kw: Any) -> None:
                original(*args, **kw)
                hygiene.attach_handler(levels=False)

            return configure

        self._replace(logs, "configure", wrap)

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        logging.getLogger().removeHandler(self.handler)

    def _replace(self, owner: Any, name: str, wrapper_factory: Callable[[Any], Any]) -> None:
        original = owner.__dict__.get(name)
        if original is None:
            return  # renamed by someone: nothing to wrap (the self-test notices missing captures)
        setattr(owner, name, wrapper_factory(original))
        self._undo.append(lambda: setattr(owner, name, original))

    def _patch_gateway_app(self) -> None:
        from gateway.exchange import Exchange

        hygiene = self

        def wrap_call(original: Any) -> Any:
            # The admin endpoints: answered through ASGI.
            async def __call__(app: Any, scope: Any, receive: Any, send: Any) -> None:
                if scope.get("type") != "http":
                    await original(app, scope, receive, send)
                    return
                recorder = _ResponseRecorder(send, f"{scope.get('method')} {str(scope.get('path'))[:200]}")
                try:
                    await original(app, scope, receive, recorder)
                finally:
                    if recorder.status:
                        hygiene.add("response", f"{recorder.where} during {hygiene.current}", recorder.text())

            return __call__

        def where(exchange: Any) -> str:
            return f"{exchange.method} {str(exchange.path)[:200]} during {hygiene.current}"

        def wrap_answer(original: Any) -> Any:
            # The proxy's own answers (errors): head and body.
            def answer(exchange: Any, head: bytes, body: bytes) -> None:
                text = (head + b"\r\n" + body[: SecretHygiene.MAX_BODY]).decode("latin-1")
                hygiene.add("response", where(exchange), text)
                original(exchange, head, body)

            return answer

        def wrap_start(original: Any) -> Any:
            # The upstream's answers: the head the gateway wrote; the body is the upstream's own words.
            def start(exchange: Any, head: list[bytes], body: bytes = b"") -> None:
                text = b"".join(head).decode("latin-1") + "\n\n<upstream body passed through>"
                hygiene.add("response", where(exchange), text)
                original(exchange, head, body)

            return start

        self._replace(GatewayApp, "__call__", wrap_call)
        self._replace(Exchange, "answer", wrap_answer)
        self._replace(Exchange, "start", wrap_start)

    def _patch_subprocess(self) -> None:
        hygiene = self

        def wrap(original: Any) -> Any:
            def communicate(process: subprocess.Popen[Any], *args: Any, **kw: Any) -> Any:
                out, err = original(process, *args, **kw)
                argv = [str(a) for a in process.args] if isinstance(process.args, list | tuple) else []
                if any("gateway" in a for a in argv) and {"serve", "check", "demo"} & set(argv):
                    command = " ".join(argv[argv.index(next(a for a in argv if "gateway" in a)) :])[:200]
                    hygiene.record_output(f"`{command}` during {hygiene.current}", out, err)
                return out, err

            return communicate

        self._replace(subprocess.Popen, "communicate", wrap)

    def record_output(self, where: str, *streams: Any) -> None:
        for name, stream in zip(("stdout", "stderr"), streams, strict=False):
            if stream:
                text = stream.decode("utf-8", "replace") if isinstance(stream, bytes) else str(stream)
                self.add("output", f"{name} of {where}", text)

    def _patch_emulator(self) -> None:
        try:
            from gateway.emulator.state import EmulatorState
        except ImportError:
            return
        hygiene = self

        def remember(origin: str, pick: Callable[[Any], Any] = lambda result: result) -> Any:
            def factory(original: Any) -> Any:
                def method(state: Any, *args: Any, **kw: Any) -> Any:
                    result = original(state, *args, **kw)
                    hygiene.add_secret(pick(result), origin)
                    return result

                return method

            return factory

        def wrap_init(original: Any) -> Any:
            def __init__(state: Any, *args: Any, **kw: Any) -> None:
                original(state, *args, **kw)
                for slot, value in state.keys().items():
                    hygiene.add_secret(value, f"emulator {slot} key")
                hygiene.add_secret(state.identity_header, "emulator IDENTITY_HEADER")

            return __init__

        def wrap_add_app(original: Any) -> Any:
            def add_app(state: Any, *args: Any, **kw: Any) -> Any:
                app = original(state, *args, **kw)
                hygiene.add_secret(app.secret, f"emulator client secret of {app.client_id}")
                return app

            return add_app

        self._replace(EmulatorState, "__init__", wrap_init)
        self._replace(EmulatorState, "add_app", wrap_add_app)
        self._replace(EmulatorState, "regenerate_key", remember("emulator regenerated key"))
        self._replace(EmulatorState, "issue_access_token", remember("emulator Entra access token"))
        self._replace(EmulatorState, "issue_federated_token", remember("emulator federated token"))
        self._replace(EmulatorState, "issue_aml_token", remember("emulator AML token", lambda r: r[0]))
        # Everything the emulated Entra ID signs, caller tokens built by tests from their own claims too.
        from gateway.emulator.signing import SigningKeys

        self._replace(SigningKeys, "sign", remember("emulator-signed token"))


HYGIENE = SecretHygiene()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{HYGIENE_LAST}: run after every other test of the session")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[Any]) -> None:
    last = [item for item in items if item.get_closest_marker(HYGIENE_LAST)]
    if last:
        items[:] = [item for item in items if item not in last] + last


@pytest.fixture(scope="session", autouse=True)
def _secret_hygiene_session() -> Iterator[SecretHygiene]:
    HYGIENE.install()
    yield HYGIENE
    HYGIENE.uninstall()


@pytest.fixture(autouse=True)
def _secret_hygiene_test(request: pytest.FixtureRequest, _secret_hygiene_session: SecretHygiene) -> None:
    if HYGIENE.total > HYGIENE.SCAN_AT:
        HYGIENE.scan_now()
    HYGIENE.current = request.node.nodeid
    HYGIENE.attach_handler()  # a test may have replaced the root handlers (gateway.logs.configure)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FAULT_LINES:
        terminalreporter.section("fault scenarios")
        for line in FAULT_LINES:
            terminalreporter.write_line(line)
    if any(HYGIENE.counts.values()):
        terminalreporter.write_line(
            "secret hygiene: checked {log} log records (and {formatted} as written), {response} gateway "
            "answers, {output} process outputs against {secrets} secret values".format(
                log=HYGIENE.counts["log"],
                formatted=HYGIENE.counts["log output"],
                response=HYGIENE.counts["response"],
                output=HYGIENE.counts["output"],
                secrets=len(HYGIENE.secret_values()),
            )
        )
