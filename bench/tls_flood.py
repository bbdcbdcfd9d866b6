"""TLS handshake floods against a real `gateway serve` (issue 19 item 1): descriptors, memory, and the
latency of legitimate clients while thousands of handshakes never finish.

    python bench/tls_flood.py                              # 10 bursts of 3,000 idle + 300 + 100
    python bench/tls_flood.py --bursts 3 --connections 1000 --hold 2   # a short run

Starts an upstream (uvicorn answering a fixed JSON body, its own process) and `gateway serve` with a TLS
listener (certificates from `gateway.emulator.tls.generate_tls`; one worker; `server.max_connections`
and `server.tls.max_handshakes` from the options), then:

1. a quiet phase (`--quiet` s): a legitimate client (its own process, so the flood's Python does not
   share its GIL) sends, every `--interval` s, alternately a request on a new TLS connection (connect,
   handshake, request, close) and one on a keep-alive TLS connection; each latency is counted from the
   moment the request was due (a stalled gateway delays the probes queued behind the slow one too);
   at its end the gateway's RSS and descriptors are the baseline;
2. `--bursts` bursts, each: `--connections` TCP connections that never send a byte, `--half-hello`
   that send the first 6 bytes of a ClientHello and stop, and `--stalled-hello` that send a whole
   ClientHello and never answer the server's (the server computed its key share and signature), all
   opened as fast as this process can, held `--hold` s, then closed (with RST, so that no TIME_WAIT
   piles up); `--gap` s later the gateway's RSS and descriptors are read;
3. `--settle` s after the last burst (the gateway trims its heap `FLOOD_QUIET_S` = 5 s after a flood),
   the final RSS and descriptors, and a second quiet phase for the latency after the floods.

Prints one line per burst, then a markdown table: per burst the flood sockets that connected, those the
gateway closed before the end of the hold, the peak of the gateway's descriptors, its RSS after the
burst, and the legitimate requests during the burst (count, failures, p50/p99/max latency); then the
legitimate latency without flood (before and after) against during the floods, and the final RSS against
the baseline (issue 19's target: within 30 MiB) and against the peak. The process raises its own
RLIMIT_NOFILE to hold the flood (up to the hard limit); `--gateway-nofile` sets the gateway's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KEY = "tls-flood-bench-key-0123456789abcdef"
HALF_HELLO = b"\x16\x03\x01\x02\x00\x01"  # a handshake record of 512 bytes announced, 1 byte sent
RSS_TARGET_MIB = 30.0


# ------------------------------------------------------------------------------------------ roles
def serve_upstream(port: int) -> None:
    """The upstream: any request gets 200 and a small JSON body (keep-alive)."""
    import uvicorn

    body = b'{"result": [1]}'

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", access_log=False)


def legitimate_client(port: int, ca_file: str, interval: float, out: str) -> None:
    """Alternately a request on a new connection and one on the keep-alive connection, every `interval`
    s, until SIGTERM; one JSON line per request: due (monotonic), kind, latency from due, ok, error."""
    import http.client

    context = ssl.create_default_context(cafile=ca_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    keep: http.client.HTTPSConnection | None = None

    def request(connection: http.client.HTTPSConnection) -> None:
        connection.request("POST", "/score/run", body=b'{"data": [[1, 2]]}', headers={"Host": "gw"})
        answer = connection.getresponse()
        data = answer.read()
        if answer.status != 200 or b"result" not in data:
            raise RuntimeError(f"HTTP {answer.status}")

    with open(out, "w", buffering=1) as log:
        due = time.monotonic()
        number = 0
        while not stop.is_set():
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            kind = "new" if number % 2 == 0 else "keepalive"
            error = ""
            try:
                if kind == "new":
                    fresh = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
                    try:
                        request(fresh)
                    finally:
                        fresh.close()
                else:
                    if keep is None:
                        keep = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
                    try:
                        request(keep)
                    except Exception:
                        keep.close()
                        keep = None
                        raise
            except Exception as exc:  # recorded: a legitimate request failed
                error = f"{type(exc).__name__}: {exc}"[:200]
            latency = time.monotonic() - due
            log.write(json.dumps({"due": due, "kind": kind, "latency": latency, "error": error}) + "\n")
            number += 1
            due += interval


# ------------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def client_hello() -> bytes:
    """A complete TLS ClientHello, as a real client's first flight."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def wait_until(predicate: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {within:g} s")
        time.sleep(0.1)


class Sampler(threading.Thread):
    """The gateway's descriptors and RSS every 50 ms; `peak()` since the last `reset()`."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.max_fds = 0
        self.max_rss = 0.0
        self.all_time_rss = 0.0

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                fds, rss = open_fds(self.pid), rss_mib(self.pid)
            except (OSError, RuntimeError):
                return
            with self.lock:
                self.max_fds = max(self.max_fds, fds)
                self.max_rss = max(self.max_rss, rss)
                self.all_time_rss = max(self.all_time_rss, rss)

    def reset(self) -> None:
        with self.lock:
            self.max_fds, self.max_rss = 0, 0.0

    def peak(self) -> tuple[int, float]:
        with self.lock:
            return self.max_fds, self.max_rss


def flood(port: int, idle: int, half: int, stalled: int, hold: float) -> tuple[int, int, int, int]:
    """Open the burst's connections, send the partial/complete ClientHellos, hold them, close them.
    Returns (connected, failed to connect, closed by the gateway during the hold, open at its end)."""
    address = ("127.0.0.1", port)
    sockets: list[socket.socket] = []
    payload: dict[int, bytes] = {}
    # Mixed: every kind arrives all along the burst (the same order in every run).
    kinds = ["idle"] * idle + ["half"] * half + ["stalled"] * stalled
    random.Random(19).shuffle(kinds)
    hello = client_hello()
    failed = 0
    for kind in kinds:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        # Closed with RST: thousands of TIME_WAITs per burst would exhaust the ephemeral ports.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        code = sock.connect_ex(address)
        if code not in (0, 115):  # EINPROGRESS
            failed += 1
            sock.close()
            continue
        sockets.append(sock)
        if kind != "idle":
            payload[sock.fileno()] = HALF_HELLO if kind == "half" else hello
    # Wait for the connections to complete (writable) and send each its bytes.
    poller = select.poll()
    by_fd = {sock.fileno(): sock for sock in sockets}
    for fd in by_fd:
        poller.register(fd, select.POLLOUT)
    pending = set(by_fd)
    connected = 0
    deadline = time.monotonic() + 5
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            if fd not in pending:
                continue
            pending.discard(fd)
            poller.unregister(fd)
            sock = by_fd[fd]
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                failed += 1
                continue
            connected += 1
            data = payload.get(fd)
            if data is not None:
                try:
                    sock.send(data)
                except OSError:
                    pass
    failed += len(pending)  # still connecting after 5 s (SYN dropped: accept queue full)
    time.sleep(hold)
    closed_by_gateway = still_open = 0
    for sock in sockets:
        try:  # read what came (the server's answer to a complete ClientHello) up to the close or reset
            while sock.recv(65536, socket.MSG_DONTWAIT):
                pass
            closed_by_gateway += 1
        except BlockingIOError:
            still_open += 1
        except OSError:
            closed_by_gateway += 1
    for sock in sockets:
        sock.close()
    return connected, failed, closed_by_gateway, still_open


def samples_between(path: Path, start: float, end: float) -> list[dict[str, Any]]:
    rows = []
    with path.open() as log:
        for line in log:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line, half written
            if start <= row["due"] < end:
                rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]], kind: str | None = None) -> dict[str, Any]:
    chosen = [r for r in rows if kind is None or r["kind"] == kind]
    ok = [r["latency"] * 1000 for r in chosen if not r["error"]]
    errors = [r["error"] for r in chosen if r["error"]]
    return {
        "n": len(chosen),
        "failed": len(errors),
        "errors": sorted(set(errors))[:3],
        "p50": percentile(ok, 0.5),
        "p99": percentile(ok, 0.99),
        "max": max(ok) if ok else float("nan"),
    }


def fmt(stats: dict[str, Any]) -> str:
    return f"{stats['n']} | {stats['failed']} | {stats['p50']:.1f} | {stats['p99']:.1f} | {stats['max']:.1f}"


# ------------------------------------------------------------------------------------------ the run
def run(args: argparse.Namespace) -> int:
    from gateway.emulator.tls import generate_tls

    per_burst = args.connections + args.half_hello + args.stalled_hello
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = per_burst + 512
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < wanted:
        print(f"warning: RLIMIT_NOFILE {soft} < {wanted}: the flood will be smaller", file=sys.stderr)

    workdir = Path(tempfile.mkdtemp(prefix="tls-flood-"))
    tls = generate_tls(workdir / "pki")
    upstream_port, port = free_port(), free_port()
    server: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "log_level": "warning",
        "access_log": False,
        "tls": {
            "cert": {"file": str(tls.server_cert)},
            "key": {"file": str(tls.server_key)},
            "max_handshakes": args.max_handshakes,
        },
    }
    if args.max_connections:
        server["max_connections"] = args.max_connections
    config = {
        "server": server,
        "routes": {
            "score": {
                "path": "/score",
                "upstream": f"http://127.0.0.1:{upstream_port}",
                "auth": {"type": "key", "primary": {"env": "TLS_FLOOD_KEY"}},
            }
        },
    }
    config_path = workdir / "gateway.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    env = {
        name: value
        for name, value in os.environ.items()
        if name.upper() not in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
    }
    env["TLS_FLOOD_KEY"] = KEY
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")

    def gateway_limits() -> None:
        if args.gateway_nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.gateway_nofile, args.gateway_nofile))

    processes: list[subprocess.Popen[bytes]] = []
    log_path = workdir / "gateway.log"
    samples_path = workdir / "legitimate.jsonl"
    try:
        upstream = subprocess.Popen(
            [sys.executable, __file__, "--role", "upstream", "--port", str(upstream_port)], env=env
        )
        processes.append(upstream)
        with log_path.open("wb") as log:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=gateway_limits,
                cwd=ROOT,
            )
        processes.append(gateway)
        context = ssl.create_default_context(cafile=str(tls.ca_cert))

        def healthy() -> bool:
            assert gateway.poll() is None, log_path.read_text()
            try:
                with context.wrap_socket(
                    socket.create_connection(("127.0.0.1", port), timeout=2), server_hostname="localhost"
                ) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
                    return sock.recv(100).startswith(b"HTTP/1.1 200")
            except OSError:
                return False

        wait_until(healthy, 30, "the gateway's start")
        client = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--role",
                "client",
                "--port",
                str(port),
                "--ca",
                str(tls.ca_cert),
                "--interval",
                str(args.interval),
                "--out",
                str(samples_path),
            ],
            env=env,
        )
        processes.append(client)
        sampler = Sampler(gateway.pid)
        sampler.start()
        load_before = os.getloadavg()

        quiet_start, cpu_at_start = time.monotonic(), cpu_seconds(gateway.pid)
        time.sleep(args.quiet)
        quiet_end, cpu_at_floods = time.monotonic(), cpu_seconds(gateway.pid)
        quiet_cpu_rate = (cpu_at_floods - cpu_at_start) / (quiet_end - quiet_start)  # legitimate load alone
        baseline_rss, baseline_fds = rss_mib(gateway.pid), open_fds(gateway.pid)
        print(
            f"baseline: RSS {baseline_rss:.1f} MiB, {baseline_fds} descriptors "
            f"(gateway pid {gateway.pid}; load average {load_before[0]:.2f})",
            flush=True,
        )

        bursts: list[dict[str, Any]] = []
        flood_windows: list[tuple[float, float]] = []
        for number in range(1, args.bursts + 1):
            sampler.reset()
            started = time.monotonic()
            connected, failed, closed, still_open = flood(
                port, args.connections, args.half_hello, args.stalled_hello, args.hold
            )
            ended = time.monotonic()
            flood_windows.append((started, ended))
            peak_fds, peak_rss = sampler.peak()
            time.sleep(args.gap)
            assert gateway.poll() is None, log_path.read_text()
            after_rss, after_fds = rss_mib(gateway.pid), open_fds(gateway.pid)
            legit = summary(samples_between(samples_path, started, ended))
            burst = {
                "burst": number,
                "connected": connected,
                "failed": failed,
                "closed": closed,
                "open": still_open,
                "peak_fds": peak_fds,
                "peak_rss": peak_rss,
                "rss": after_rss,
                "fds": after_fds,
                "legit": legit,
                "seconds": ended - started,
            }
            bursts.append(burst)
            print(
                f"burst {number}: {connected} connected ({failed} failed to), "
                f"{closed} closed by the gateway, "
                f"{still_open} still open at the end of the hold; gateway peak {peak_fds} fds, "
                f"{peak_rss:.1f} MiB; {args.gap:g} s later {after_fds} fds, RSS {after_rss:.1f} MiB; "
                f"legitimate: {legit['n']} requests, {legit['failed']} failed, p99 {legit['p99']:.1f} ms",
                flush=True,
            )

        floods_seconds, floods_cpu = time.monotonic() - quiet_end, cpu_seconds(gateway.pid) - cpu_at_floods
        time.sleep(args.settle)
        final_rss, final_fds = rss_mib(gateway.pid), open_fds(gateway.pid)
        after_start = time.monotonic()
        time.sleep(args.quiet)
        after_end = time.monotonic()
        client.send_signal(signal.SIGTERM)
        client.wait(20)
        load_after = os.getloadavg()

        metrics = ""
        try:
            with context.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="localhost"
            ) as sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
                metrics = b"".join(chunks).decode("latin-1")
        except OSError as exc:
            metrics = f"(no /metrics: {exc})"
        refusals = [
            line for line in metrics.splitlines() if line.startswith("gateway_inbound_refusals_total{")
        ]
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    before = samples_between(samples_path, quiet_start, quiet_end)
    after = samples_between(samples_path, after_start, after_end)
    during = [row for start, end in flood_windows for row in samples_between(samples_path, start, end)]
    print()
    print(
        f"TLS flood: {args.bursts} bursts of {args.connections} idle + {args.half_hello} half-ClientHello + "
        f"{args.stalled_hello} stalled-ClientHello connections, held {args.hold:g} s; "
        f"server.max_connections {args.max_connections or 'unset'}, server.tls.max_handshakes "
        f"{args.max_handshakes}, gateway RLIMIT_NOFILE {args.gateway_nofile or 'inherited'}; legitimate "
        f"requests every {args.interval * 1000:g} ms (new connection / keep-alive alternately); "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after, {os.cpu_count()} CPUs"
    )
    print()
    print(
        "| burst | connected (failed) | closed by gateway / open at end of hold | peak fds | RSS after "
        "(MiB) | legit n | failed | p50 ms | p99 ms | max ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| baseline | | | {baseline_fds} | {baseline_rss:.1f} | {fmt(summary(before))} |")
    for b in bursts:
        print(
            f"| {b['burst']} | {b['connected']} ({b['failed']}) | {b['closed']} / {b['open']} | "
            f"{b['peak_fds']} | {b['rss']:.1f} | {fmt(b['legit'])} |"
        )
    print(f"| {args.settle:g} s after the last | | | {final_fds} | {final_rss:.1f} | {fmt(summary(after))} |")
    print()
    print("| legitimate requests | n | failed | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|")
    for label, rows in (("before the floods", before), ("during the floods", during), ("after", after)):
        for kind in ("new", "keepalive"):
            name = "new connection" if kind == "new" else "keep-alive"
            print(f"| {label}, {name} | {fmt(summary(rows, kind))} |")
    print()
    growth = final_rss - baseline_rss
    verdict = "within" if growth <= RSS_TARGET_MIB else "NOT within"
    print(
        f"RSS: baseline {baseline_rss:.1f} MiB, highest seen {sampler.all_time_rss:.1f} MiB, "
        f"{args.settle:g} s after the last burst {final_rss:.1f} MiB: {growth:+.1f} MiB, {verdict} the "
        f"{RSS_TARGET_MIB:g} MiB target"
    )
    flood_connections = sum(b["connected"] for b in bursts)
    flood_cpu = floods_cpu - quiet_cpu_rate * floods_seconds
    print(
        f"gateway CPU: {quiet_cpu_rate * 100:.1f} % of a core for the legitimate requests alone; "
        f"{floods_cpu:.2f} s over the {floods_seconds:.0f} s of bursts and gaps, {flood_cpu:.2f} s more than "
        f"the legitimate requests alone: {flood_cpu / max(flood_connections, 1) * 1e6:.0f} µs per flood "
        "connection"
    )
    failures = [r for r in during + before + after if r["error"]]
    print(f"legitimate failures: {len(failures)} of {len(during) + len(before) + len(after)}")
    for error in sorted({r["error"] for r in failures})[:5]:
        print(f"  {error}")
    for line in refusals:
        print(line)
    log_text = log_path.read_text(errors="replace")
    if "Traceback" in log_text:
        print(f"the gateway's log has a traceback: {log_path}")
    print(f"(gateway log and samples in {workdir})")
    return 0 if growth <= RSS_TARGET_MIB and not failures else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bursts", type=int, default=10)
    parser.add_argument("--connections", type=int, default=3000, help="idle connections per burst")
    parser.add_argument("--half-hello", type=int, default=300, help="half-ClientHello connections per burst")
    parser.add_argument(
        "--stalled-hello",
        type=int,
        default=100,
        help="complete-ClientHello-then-silent connections per burst",
    )
    parser.add_argument("--hold", type=float, default=3.0, help="seconds each burst is held")
    parser.add_argument("--gap", type=float, default=2.0, help="seconds between bursts")
    parser.add_argument("--quiet", type=float, default=5.0, help="seconds without flood, before and after")
    parser.add_argument(
        "--settle", type=float, default=8.0, help="seconds after the last burst before the RSS"
    )
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between legitimate requests")
    parser.add_argument("--max-connections", type=int, default=256, help="server.max_connections (0: unset)")
    parser.add_argument("--max-handshakes", type=int, default=128, help="server.tls.max_handshakes")
    parser.add_argument(
        "--gateway-nofile", type=int, default=0, help="the gateway's RLIMIT_NOFILE (0: inherited)"
    )
    parser.add_argument(
        "--role", choices=["bench", "upstream", "client"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "upstream":
        serve_upstream(args.port)
        return 0
    if args.role == "client":
        legitimate_client(args.port, args.ca, args.interval, args.out)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
