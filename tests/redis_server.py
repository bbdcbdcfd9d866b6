"""A real `redis-server` for the tests: loopback, a free port, a temporary directory, no persistence,
nothing changed on the machine. It can be killed and started again on the same port.

CI installs the Debian package `redis-server` (see .ci/run); a test that needs one is skipped, saying
why, only when the binary is truly missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

_SEARCH = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")


def find_redis_server() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    for directory in _SEARCH:
        candidate = Path(directory) / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_redis_server() -> str:
    binary = find_redis_server()
    if binary is None:
        pytest.skip(
            "redis-server is not installed: install the Debian package redis-server (.ci/run does) to run "
            "the shared rate-limit tests"
        )
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """`redis-server` on 127.0.0.1; `extra` arguments are passed on (e.g. `--requirepass`, TLS)."""

    def __init__(self, directory: Path, *, extra: tuple[str, ...] = (), tls: bool = False) -> None:
        self.binary = require_redis_server()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra = extra
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "redis.log"

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        port_args = ("--port", "0", "--tls-port", str(self.port)) if self.tls else ("--port", str(self.port))
        command = [
            self.binary,
            *port_args,
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--logfile", str(self.log),
            "--enable-debug-command", "local",
            *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not self._accepts():
            if self.process.poll() is not None:
                log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {log}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"redis-server did not listen on {self.port} within {timeout_s} s")
            time.sleep(0.02)
        return self

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to clients (a crash, an OOM kill, a node lost)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        self.kill()

    def command(self, *args: str, timeout: float = 5.0) -> bytes:
        """One command over a plain connection (not for TLS servers); the raw RESP reply, within `timeout`
        seconds."""
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            password = self._password()
            if password is not None:
                sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(password), password.encode()))
                sock.recv(100)
            sock.sendall(b"".join(parts))
            return sock.recv(65536)

    def _password(self) -> str | None:
        if "--requirepass" in self.extra:
            return self.extra[self.extra.index("--requirepass") + 1]
        return None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
