"""Fault-injection kit: an upstream that misbehaves on cue, a bounded load driver, and the tally.

The upstream is a raw asyncio HTTP/1.1 server (not an ASGI app) because the faults worth testing live
below ASGI: a connection reset before the status line, a reset or a clean close halfway through a body,
a socket that never answers, a listener that disappears while connections are pooled.

Every request carries its own `x-request-id` (the gateway passes a client's id on), so the upstream
can count, per request id, how many attempts reached it and how many it *executed*: read in full and
did the scoring work, whether or not the answer made it back (answered 2xx, cut halfway through the
answer, or `Drop(executed=True)`: worked on and died before answering). Refusals (401, 503), hangs
and drops before the work are not executions, so a retry after them is not a duplicate.
`duplicated` is the number of request ids executed more than once: work done twice for one client
request, which only a retry policy that was allowed to may cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import record_fault_line

BODY = json.dumps({"data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}).encode()
HANG_CAP_S = 4.0  # a hung upstream request is held at most this long (bounded even if never released)
EXECUTED = frozenset({"executed", "truncated", "executed_unanswered"})  # outcomes where the work was done


# --------------------------------------------------------------------------------------------- ledger
class Ledger:
    """What all fault upstreams of one scenario saw, by request id. Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()
        self.executions: Counter[str] = Counter()
        self.auth: Counter[str] = Counter()
        self.by_upstream: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.in_flight: dict[str, int] = {}
        self.active = 0  # requests the upstreams are working on right now
        self.peak = 0

    def arrived(self, rid: str, upstream: str, auth: str) -> int:
        with self.lock:
            self.attempts[rid] += 1
            self.auth[auth] += 1
            self.by_upstream[upstream] += 1
            self.in_flight[rid] = self.in_flight.get(rid, 0) + 1
            self.active += 1
            self.peak = max(self.peak, self.active)
            return self.attempts[rid]

    def finished(self, rid: str, outcome: str) -> None:
        """`executed`, `truncated` and `executed_unanswered` (the work was done, only the answer broke or
        never left) count as executions."""
        with self.lock:
            self.outcomes[outcome] += 1
            self.active -= 1
            if outcome in EXECUTED:
                self.executions[rid] += 1
            left = self.in_flight.get(rid, 0) - 1
            if left > 0:
                self.in_flight[rid] = left
            else:
                self.in_flight.pop(rid, None)

    def executed_twice(self) -> list[str]:
        with self.lock:
            return sorted(rid for rid, n in self.executions.items() if n > 1)

    def in_flight_ids(self) -> set[str]:
        with self.lock:
            return set(self.in_flight)

    def auth_count(self, value: str) -> int:
        with self.lock:
            return self.auth[value]


# -------------------------------------------------------------------------------------------- actions
@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    rid: str
    attempt: int  # 1 for the first time this request id reached any upstream of the ledger
    upstream: str

    @property
    def key(self) -> str:
        return self.headers.get("authorization", "").removeprefix("Bearer ")


@dataclass(frozen=True)
class Answer:
    """Answer normally (status 200 executes the request) or with a scripted status."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    chunked: bool = False


@dataclass(frozen=True)
class Hang:
    """Never answer: hold the connection until the upstream stops (or HANG_CAP_S), then drop it."""


@dataclass(frozen=True)
class Drop:
    """Cut the connection before any answer: `rst` sends a TCP reset, else a clean close (FIN).

    `executed`: the upstream did the work first (the model ran) and died before answering, so the
    request counts as executed; a client must not learn of it except through an error."""

    rst: bool = True
    executed: bool = False


@dataclass(frozen=True)
class Truncate:
    """Send a 200 status line and part of the body, then cut the connection (RST or FIN)."""

    rst: bool = True
    chunked: bool = False


Action = Answer | Hang | Drop | Truncate
Behaviour = Callable[[Request], Action]
OK = Answer()


# ------------------------------------------------------------------------------------------- upstream
class FaultUpstream:
    """A loopback HTTP/1.1 upstream with keep-alive, run on its own event loop in a thread.

    `accepted_keys`: bearer values answered normally; anything else gets 401 (None: accept all).
    `behaviour(request) -> Action` decides everything else and may be swapped at any time.
    `delay_s`: time every normal answer takes (the model's latency).
    `kill()`: the process dies: the listener closes, idle pooled connections are closed and requests
    in progress are cut before they answer (so they are never executed).
    """

    _REASONS = {200: "OK", 401: "Unauthorized", 429: "Too Many Requests", 503: "Service Unavailable"}

    def __init__(
        self,
        ledger: Ledger,
        name: str = "a",
        *,
        accepted_keys: Iterable[str] | None = None,
        behaviour: Behaviour | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.ledger = ledger
        self.name = name
        self.accepted_keys: set[str] | None = set(accepted_keys) if accepted_keys is not None else None
        self.behaviour = behaviour
        self.delay_s = delay_s
        self.dead = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"fault-upstream-{name}", daemon=True)
        self._started = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self._writers: dict[asyncio.StreamWriter, bool] = {}  # writer -> busy with a request
        self._stop: asyncio.Event | None = None

    # lifecycle
    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._server = await asyncio.start_server(self._connection, sock=self.sock, limit=1 << 20)
        self._started.set()
        await self._stop.wait()
        self._close_all(abort=True)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2)

    def start(self) -> FaultUpstream:
        if self._thread.is_alive() or self._started.is_set():
            return self
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fault upstream did not start")
        return self

    def stop(self) -> None:
        if self._thread.is_alive() and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> FaultUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill(self) -> None:
        """Die now (from any thread); returns once the listener is closed."""
        done = threading.Event()

        def die() -> None:
            self.dead = True
            if self._server is not None:
                self._server.close()
            self._close_all(abort=False)
            done.set()

        self.loop.call_soon_threadsafe(die)
        done.wait(5)

    def _close_all(self, *, abort: bool) -> None:
        for writer, busy in list(self._writers.items()):
            if abort or not busy:
                _cut(writer, rst=abort)

    # protocol
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers[writer] = False
        try:
            while not self.dead:
                request = await _read_request(reader)
                if request is None:
                    return
                self._writers[writer] = True
                keep = await self._serve(request, writer)
                self._writers[writer] = False
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return
        finally:
            self._writers.pop(writer, None)
            _cut(writer, rst=False)

    async def _serve(self, raw: tuple[str, str, dict[str, str], bytes], writer: asyncio.StreamWriter) -> bool:
        method, target, headers, body = raw
        rid = headers.get("x-request-id", "-")
        attempt = self.ledger.arrived(rid, self.name, headers.get("authorization", ""))
        request = Request(method, target, headers, body, rid, attempt, self.name)
        outcome = "cut"
        try:
            if self.accepted_keys is not None and request.key not in self.accepted_keys:
                outcome = "401"
                _write(writer, 401, b'{"message": "Unauthorized"}', ())
                return True
            action = self.behaviour(request) if self.behaviour is not None else OK
            if isinstance(action, Hang):
                assert self._stop is not None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), HANG_CAP_S)
                outcome = "hung"
                _cut(writer, rst=True)
                return False
            if isinstance(action, Drop):
                if action.executed and self.delay_s:
                    await asyncio.sleep(self.delay_s)
                outcome = "executed_unanswered" if action.executed else "dropped"
                _cut(writer, rst=action.rst)
                return False
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.dead:
                _cut(writer, rst=True)  # died while working on it: never answered, never executed
                return False
            payload = json.dumps({"rid": rid, "upstream": self.name, "target": target}).encode()
            if isinstance(action, Truncate):
                outcome = "truncated"
                _write_head(writer, 200, len(payload) if not action.chunked else None, ())
                half = payload[: len(payload) // 2]
                writer.write(b"%x\r\n%s\r\n" % (len(half), half) if action.chunked else half)
                await writer.drain()
                await asyncio.sleep(0.01)
                _cut(writer, rst=action.rst)
                return False
            if action.status == 200:
                outcome = "executed"
            else:
                outcome = str(action.status)
                payload = json.dumps({"status": action.status}).encode()
            _write(writer, action.status, payload, action.headers, chunked=action.chunked)
            await writer.drain()
            return True
        finally:
            self.ledger.finished(rid, outcome)


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            chunks.append(chunk[:-2])
        body = b"".join(chunks)
    else:
        length = int(headers.get("content-length") or 0)
        body = await reader.readexactly(length) if length else b""
    return method, target, headers, body


def _write_head(
    writer: asyncio.StreamWriter, status: int, length: int | None, headers: Iterable[tuple[str, str]]
) -> None:
    reason = FaultUpstream._REASONS.get(status, "Status")
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    lines.extend(f"{n}: {v}" for n, v in headers)
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def _write(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    headers: Iterable[tuple[str, str]],
    *,
    chunked: bool = False,
) -> None:
    _write_head(writer, status, None if chunked else len(body), headers)
    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body)


def _cut(writer: asyncio.StreamWriter, *, rst: bool) -> None:
    transport = writer.transport
    if transport.is_closing():
        return
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


# ------------------------------------------------------------------------------------------------ load
@dataclass
class Outcome:
    index: int
    rid: str
    started: float
    ended: float
    status: int | None = None
    code: str | None = None  # the gateway's error code, when its JSON error came back
    error: str | None = None  # the client-side exception class, when there was no complete answer
    own_answer: bool = False  # a 200 whose body names this request id (no crossed answers)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.own_answer

    @property
    def elapsed(self) -> float:
        return self.ended - self.started


@dataclass
class Load:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    events: dict[str, float] = field(default_factory=dict)  # event name -> perf_counter time
    duplicated: int = 0
    line: str = ""

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def succeeded(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ok]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def summary(self) -> str:
        failures = Counter(f"{o.status or o.error}{'/' + o.code if o.code else ''}" for o in self.failed)
        return f"{self.line} failures={dict(failures)}"


Event = tuple[int, str, Callable[[], None]]  # (after this many answers, name, action)


def drive(
    name: str,
    url: str | Callable[[int], str],
    *,
    total: int,
    ledger: Ledger,
    workers: int = 8,
    timeout_s: float = 5.0,
    budget_s: float = 9.0,
    events: Iterable[Event] = (),
    keepalive: bool = True,
    body: bytes = BODY,
) -> Load:
    """Send `total` POSTs from `workers` threads, run `events` once enough answers are in, then tally.

    Bounded: each request has `timeout_s`, the whole load `budget_s`; a client timeout is recorded as
    a failure with error `ReadTimeout` etc. (a hang), never waited out.
    """
    load = Load(name)
    lock = threading.Lock()
    counter = iter(range(total))
    done = threading.Event()
    deadline = time.monotonic() + budget_s
    pending = sorted(events, key=lambda e: e[0])
    run = uuid.uuid4().hex[:6]
    # Request ids in Azure ML's form (letters, digits, '-', '_', at most 40), which the gateway passes on.
    id_name = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:24]

    def answered() -> int:
        with lock:
            return len(load.outcomes)

    def controller() -> None:
        for threshold, event_name, action in pending:
            while answered() < threshold and not done.is_set() and time.monotonic() < deadline:
                time.sleep(0.002)
            if done.is_set() or time.monotonic() >= deadline:
                return
            load.events[event_name] = time.perf_counter()
            action()
            load.events[event_name + ":done"] = time.perf_counter()

    def worker() -> None:
        limits = httpx.Limits(max_keepalive_connections=workers if keepalive else 0)
        headers = {"content-type": "application/json"}
        if not keepalive:
            headers["connection"] = "close"
        with httpx.Client(timeout=timeout_s, limits=limits, trust_env=False, headers=headers) as client:
            while time.monotonic() < deadline:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                rid = f"{id_name}-{run}-{index:05d}"
                target = url(index) if callable(url) else url
                outcome = Outcome(index, rid, time.perf_counter(), 0.0)
                try:
                    response = client.post(target, content=body, headers={"x-request-id": rid})
                    outcome.status = response.status_code
                    if response.status_code == 200:
                        with contextlib.suppress(ValueError, AttributeError):
                            outcome.own_answer = response.json().get("rid") == rid
                    elif response.headers.get("content-type", "").startswith("application/json"):
                        with contextlib.suppress(ValueError, AttributeError, TypeError):
                            outcome.code = response.json()["error"]["code"]
                except httpx.HTTPError as exc:
                    outcome.error = type(exc).__name__
                outcome.ended = time.perf_counter()
                with lock:
                    load.outcomes.append(outcome)

    control = threading.Thread(target=controller, daemon=True)
    control.start()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic() + timeout_s + 1))
    done.set()
    control.join(5)
    assert not any(t.is_alive() for t in threads), f"{name}: load threads still running: a hang"
    load.outcomes.sort(key=lambda o: o.index)
    load.duplicated = len(ledger.executed_twice())
    load.line = (
        f"{name}: sent={load.sent} succeeded={len(load.succeeded)} failed={len(load.failed)} "
        f"duplicated={load.duplicated}"
    )
    print(load.line)
    record_fault_line(load.line)
    return load


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0, step_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step_s)
    return condition()


def index_of(request: Request) -> int:
    """The load index encoded at the end of a request id made by `drive`, or -1."""
    try:
        return int(request.rid.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def fault_upstream(ledger: Ledger, name: str = "a", **options: Any) -> FaultUpstream:
    return FaultUpstream(ledger, name, **options).start()
