"""Real servers on loopback ports for the tests: an ASGI app under uvicorn in a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from gateway.app import GatewayApp
from gateway.server_protocol import GatewayHttpToolsProtocol, InboundLimits, http_protocol


def free_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(
        socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
    )  # so asyncio sets TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class ServerThread:
    """Runs `app` with the gateway's own uvicorn settings until `stop()`."""

    def __init__(self, app: Any, *, lifespan: str = "on", **options: Any) -> None:
        self.app = app
        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            loop="uvloop",
            # A gateway gets its configured inbound limits, as `gateway serve` gives them.
            http=http_protocol(InboundLimits.from_config(app.config.server))
            if isinstance(app, GatewayApp)
            else GatewayHttpToolsProtocol,
            lifespan=lifespan,
            server_header=False,
            date_header=False,
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=options.pop("timeout_graceful_shutdown", 2),
            # As `gateway serve`: uvicorn's default would take the client address from a loopback
            # client's X-Forwarded-For, so tests would see a client address production never does.
            proxy_headers=options.pop("proxy_headers", False),
            **options,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server for {self.app!r} did not start")
            time.sleep(0.01)
        return self

    def call(self, coroutine: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's own loop (e.g. a reload) and wait for its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def gateway_process(config: dict[str, Any], tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A real `gateway serve` with `config` (written to `tmp`), its output in `tmp/gateway.log`; yields
    (process, log path) once /healthz answers on the config's port, and stops it afterwards."""
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{config['server']['port']}/healthz"
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"gateway did not start: {log_path.read_text()}"
            time.sleep(0.05)
        yield process, log_path
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


class FullBacklog:
    """A listener that never accepts, its accept queue filled (backlog 0, one connection queued): the
    kernel drops the SYNs of further connections, so their TCP connect never completes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.fillers: list[socket.socket] = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(self.sock.getsockname())
            self.fillers.append(filler)
        # The queue is full once a filler's handshake completed (its socket turns writable).
        deadline = time.monotonic() + 10
        while not select.select([], self.fillers, [], 0.05)[1]:
            assert time.monotonic() < deadline, "no connection reached the accept queue"

    def close(self) -> None:
        for sock in (*self.fillers, self.sock):
            sock.close()


class Answer:
    """An HTTP answer read from a raw socket: status, headers (names lowered), body."""

    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers.append((name.strip().lower(), value.strip()))

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = json.loads(self.body)["error"]
        return error


class KeptAlive:
    """One client connection for several requests (pipelined or not), each answer read to its
    Content-Length; bytes of the next answer that came with one stay buffered for it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def post(self, path: str, headers: dict[str, str], body: bytes = b"{}") -> Answer:
        self.send(request_bytes(path, headers, body))
        return self.answer()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> Answer:
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = int(Answer(head + b"\r\n\r\n").header("content-length")[0])
        while len(rest) < length:
            rest += self._recv()
        self.buffer = rest[length:]
        return Answer(head + b"\r\n\r\n" + rest[:length])

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        assert data, f"the gateway closed the connection: {self.buffer[:300]!r}"
        return data

    def close(self) -> None:
        self.sock.close()


def request_bytes(path: str, headers: dict[str, str] | None = None, body: bytes = b"{}") -> bytes:
    """A POST with a Content-Length, as raw bytes."""
    lines = [f"POST {path} HTTP/1.1", "Host: gw", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
