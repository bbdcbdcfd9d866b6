"""The bench's stack floor (bench/floor_proxy.py) does the forwarding the issue 18 ratio assumes: the
route prefix, the key injected in place of the client's, Content-Length and chunked framing both ways,
and a kept-alive upstream connection. A floor that did less would flatter nothing but itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

FLOOR = Path(__file__).resolve().parents[1] / "bench" / "floor_proxy.py"
KEY = "floor-test-key"


class RawUpstream:
    """An HTTP/1.1 upstream on a raw socket: records each request's head and body (Content-Length
    framed, as the floor sends them) and the connection it came on; `/score/chunked` answers chunked."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[tuple[bytes, bytes, int]] = []
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                body, buffer = buffer[:length], buffer[length:]
                self.requests.append((head, body, number))
                if head.split(b" ")[1] == b"/score/chunked":
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"
                    )
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + b'"ok!"')


@pytest.fixture
def floor() -> Iterator[tuple[str, RawUpstream]]:
    upstream = RawUpstream()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(
        os.environ,
        FLOOR_UPSTREAM_URL=f"http://127.0.0.1:{upstream.port}/score",
        FLOOR_PREFIX="/iris",
        FLOOR_API_KEY=KEY,
        FLOOR_PORT=str(port),
    )
    process = subprocess.Popen([sys.executable, str(FLOOR)], env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the floor did not listen within 30 s"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", upstream
    finally:
        process.terminate()
        process.wait(10)
        upstream.sock.close()


def test_the_floor_forwards_with_the_key_and_both_framings(floor: tuple[str, RawUpstream]) -> None:
    base, upstream = floor

    def chunks() -> Iterator[bytes]:
        yield b'{"data": '
        yield b"[[1, 2]]}"

    with httpx.Client(base_url=base, timeout=10) as client:
        plain = client.post("/iris/x?v=1", content=b'{"data": [[0.1]]}', headers={"Authorization": "mine"})
        streamed = client.post("/iris/chunked", content=chunks())  # the client's body chunked
        other = client.get("/elsewhere")

    assert (plain.status_code, plain.content) == (200, b'"ok!"')
    assert (streamed.status_code, streamed.content) == (200, b"abcd")
    assert streamed.headers["transfer-encoding"] == "chunked"  # an unframed answer passed on chunked
    assert other.status_code == 404
    (head1, body1, conn1), (head2, body2, conn2) = upstream.requests
    assert head1.startswith(b"POST /score/x?v=1 HTTP/1.1\r\n")
    assert head2.startswith(b"POST /score/chunked HTTP/1.1\r\n")
    for head in (head1, head2):
        authorization = [line for line in head.lower().split(b"\r\n") if line.startswith(b"authorization:")]
        assert authorization == [b"authorization: bearer " + KEY.encode()]  # the client's replaced
        assert b"transfer-encoding" not in head.lower()
    assert (body1, body2) == (b'{"data": [[0.1]]}', b'{"data": [[1, 2]]}')
    assert conn1 == conn2  # the upstream connection was kept alive and reused
