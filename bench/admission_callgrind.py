"""Instructions per proxied request, counted by callgrind (load-independent), for issue 17's hot-path
budget: a route without limits must cost what it cost before admission was wired (within 0.5%), a route
with a local concurrency limit and a per-caller local rate at most 5% more.

    python bench/admission_callgrind.py [--requests 300 1300] [--cases none,local] [--source DIR]

Per case, `gateway serve` runs under `valgrind --tool=callgrind` (the gateway process only; the client
and the upstream run here, outside it) twice: for the first and the second number of requests, each
sent one after another on one keep-alive connection. The instructions per request are the difference of
the two totals divided by the difference of the counts, so start-up, imports and shutdown cancel out.
`--source DIR` runs the gateway from another checkout (e.g. `git archive main | tar -x -C DIR`), to
compare with the code before a change. Cases:

- `none`: the route has no `limits` (and there is no `inbound.limits`);
- `local`: `limits: {max_concurrent: 64, per_caller: {requests_per_s: 1e9, burst: 1000000}}`: a slot
  and a rate decision in this process per request, never refused;
- `auto`: as `local` with `max_concurrent: auto` (an `observe()` per upstream answer).

The access log is on, as by default (`--log-level warning` leaves it out, so the same difference is a
larger share of what is left). Needs valgrind (`apt-get install valgrind`). Slow: a run is one to
two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from run import REPO_ROOT, gateway_available  # bench/run.py: which checkout's gateway a process imports

RESPONSE = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n["setosa", 1]\n'
REQUEST = (
    b"POST /iris/score HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 34\r\n\r\n"
    b'{"data": [[5.1, 3.5, 1.4, 0.2]]}\r\n'
)
CASES: dict[str, dict[str, Any] | None] = {
    "none": None,
    "local": {"max_concurrent": 64, "per_caller": {"requests_per_s": 1e9, "burst": 1_000_000}},
    "auto": {
        "max_concurrent": "auto",
        "min": 64,
        "max": 64,
        "per_caller": {"requests_per_s": 1e9, "burst": 1_000_000},
    },
}


class _Upstream(asyncio.Protocol):
    """Answers every request with the same small JSON (one request per read: the client waits)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            match = re.search(rb"(?i)content-length: *(\d+)", head)
            length = int(match.group(1)) if match else 0
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.transport.write(RESPONSE)  # type: ignore[attr-defined]


def _start_upstream() -> int:
    ready = threading.Event()
    port: list[int] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        server = loop.run_until_complete(loop.create_server(_Upstream, "127.0.0.1", 0))
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    ready.wait(10)
    return port[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _read_answer(sock: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the gateway closed the connection")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer: {head[:200]!r}")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)


def run_once(
    case: str, requests: int, upstream_port: int, source: str | None, work: Path, log_level: str
) -> int:
    """Total instructions of one `gateway serve` under callgrind that served `requests` requests."""
    port = _free_port()
    route: dict[str, Any] = {
        "path": "/iris",
        "upstream": f"http://127.0.0.1:{upstream_port}/score",
        "auth": {"type": "key", "primary": {"env": "BENCH_KEY"}},
    }
    limits = CASES[case]
    if limits is not None:
        route["limits"] = limits
    config = {"server": {"host": "127.0.0.1", "port": port}, "routes": {"iris": route}}
    config_path = work / f"{case}-{requests}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = work / f"callgrind-{case}-{requests}.out"
    env = {**os.environ, "BENCH_KEY": "bench-key-0123456789", "PYTHONHASHSEED": "0"}
    # This checkout's gateway unless told otherwise; run from the work directory, as `-m` puts the current
    # directory first on sys.path (from the repository's root it would import this checkout's package).
    env["PYTHONPATH"] = str(Path(source).resolve()) if source else str(Path(__file__).resolve().parent.parent)
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--config",
        str(config_path),
        "--log-level",
        log_level,
    ]
    log = (work / f"gateway-{case}-{requests}.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    try:
        deadline = time.monotonic() + 600
        while True:  # connect only: no request is served before the measured ones
            if process.poll() is not None:
                raise RuntimeError(
                    f"the gateway exited: {(work / f'gateway-{case}-{requests}.log').read_text()}"
                )
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=120)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with sock:
            for _ in range(requests):
                sock.sendall(REQUEST)
                _read_answer(sock)
        process.send_signal(signal.SIGTERM)
        process.wait(600)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    text = out.read_text(errors="replace")
    match = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no totals in {out}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, nargs=2, default=(300, 1300))
    parser.add_argument("--cases", default="none,local")
    parser.add_argument("--source", help="run the gateway from this checkout (PYTHONPATH)")
    parser.add_argument(
        "--log-level", default="info", help="`warning` leaves the access log out (info: written, the default)"
    )
    args = parser.parse_args()
    usable, why = gateway_available(Path(args.source) if args.source else REPO_ROOT)
    if not usable:
        raise SystemExit(why)
    upstream_port = _start_upstream()
    low, high = args.requests
    with tempfile.TemporaryDirectory(prefix="admission-callgrind-") as directory:
        work = Path(directory)
        for case in args.cases.split(","):
            totals = [
                run_once(case, n, upstream_port, args.source, work, args.log_level) for n in (low, high)
            ]
            per_request = (totals[1] - totals[0]) / (high - low)
            print(
                f"{case:<6} {per_request:12,.0f} instructions per request "
                f"(totals {totals[0]:,} for {low}, {totals[1]:,} for {high})",
                flush=True,
            )


if __name__ == "__main__":
    main()
