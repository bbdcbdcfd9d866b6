"""Instructions per proxied request under callgrind: a load-independent yardstick for the hot path.

Runs an upstream (a fixed nginx-shaped answer, uvloop + httptools, not measured), the proxy under
callgrind (`gateway serve` with the bench's key route, or `floor` = bench/floor_proxy.py), warms it
up, zeroes callgrind's counters, sends N `POST /score` requests (the bench's JSON) over C keep-alive
connections, dumps the counters and prints instructions per request. Another process on the machine
changes wall-clock figures, not these.

    python bench/callgrind_per_request.py                   # gateway of this checkout, 2000 requests, c=4
    python bench/callgrind_per_request.py --target floor
    python bench/callgrind_per_request.py --annotate 30     # plus the top 30 functions (inclusive)
    python bench/callgrind_per_request.py --py-spy 25       # py-spy samples instead (pip install py-spy)
    python bench/callgrind_per_request.py --caller entra    # callers send an Entra ID token (emulator)
    python bench/callgrind_per_request.py --caller entra --route-callers app_ids
    python bench/callgrind_per_request.py --access-log      # log level info: an access line per request
    python bench/callgrind_per_request.py --access-log json # the same as JSON lines (Kubernetes manifests)
    python bench/callgrind_per_request.py --auth aad        # an aad_token route (tokens from the emulator)
    python bench/callgrind_per_request.py --opcodes 30      # bytecodes per request: top functions and lines

`--root DIR` measures the gateway of another checkout (PYTHONPATH=DIR) with this interpreter.

`--caller entra` (issue 16) starts gateway.emulator in its own process (bench/emulator_launcher.py, not
under callgrind) as the Entra ID of the gateway's `inbound.entra_id` (authority = its HTTPS origin,
`tls.ca_bundle` = its CA), registers the gateway's API and a calling app there, gets one token for the
gateway's audience (client credentials) and sends it as `Authorization: Bearer` with every request, the
warm-up's included: the measured requests hit the gateway's validated-token cache. `--route-callers`
adds a rule to the route (`callers.app_ids: [the caller]` or `callers.roles: [Scoring.Invoke]`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from run import (  # bench/run.py: which checkout's gateway a process imports; caller tokens (issue 16)
    entra_caller_token,
    entra_inbound_yaml,
    gateway_available,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = b'{"data": [[0.1, 2.3, 4.1, 2.0], [0.2, 1.8, 3.9, 2.1]]}'
KEY = "bench-static-primary-key-0123456789abcdef"
# --caller entra: the emulated directory, the gateway's API registration and the calling app.
ENTRA_TENANT = "cb160000-0000-4000-8000-0000000000a1"
GATEWAY_URI = "api://scoring-gateway"
GATEWAY_APP = "cb160000-0000-4000-8000-0000000000a2"
CALLER_APP = "cb160000-0000-4000-8000-0000000000c1"
CALLER_SECRET = "bench-caller-secret-0123456789"
ROLE = "Scoring.Invoke"
EMULATOR_LAUNCHER = Path(__file__).resolve().parent / "emulator_launcher.py"
UPSTREAM_SERVER = r"""
import asyncio, sys, httptools, uvloop
BODY = b'"[\\"setosa\\", \\"versicolor\\"]"'
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 05:00:00 GMT\r\n"
          b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n"
          b"X-Bench-Auth: key\r\n\r\n" % len(BODY)) + BODY
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.p = httptools.HttpRequestParser(self)
    def data_received(self, d): self.p.feed_data(d)
    def on_message_complete(self): self.t.write(ANSWER)
async def main():
    s = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await s.serve_forever()
uvloop.run(main())
"""


# The gateway under cProfile: SIGUSR1 starts profiling (after the warm-up), SIGUSR2 stops and writes it.
CPROFILED = """
import cProfile, signal, sys
profile = cProfile.Profile()
signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
signal.signal(signal.SIGUSR2, lambda *_: (profile.disable(), profile.dump_stats(%r)))
from gateway.cli import main
sys.exit(main())
"""


# The gateway with its bytecodes counted per (file, function, line): SIGUSR1 starts counting (after the
# warm-up), SIGUSR2 stops and writes the counts. Deterministic, unlike a sampling profile, and free of the
# time a C call takes: what the interpreter itself is asked to do per request.
OPCODE_COUNTED = """
import collections, json, signal, sys
counts = collections.Counter()
def trace(frame, event, arg):
    if event == "call":
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
    elif event == "opcode":
        code = frame.f_code
        counts[code.co_filename, code.co_name, frame.f_lineno] += 1
    return trace
def stop(*_):
    sys.settrace(None)
    with open(%r, "w") as out:
        json.dump([[*key, count] for key, count in counts.items()], out)
signal.signal(signal.SIGUSR1, lambda *_: sys.settrace(trace))
signal.signal(signal.SIGUSR2, stop)
from gateway.cli import main
sys.exit(main())
"""


def print_opcodes(path: Path, served: int, top: int, root: Path) -> None:
    """Bytecodes per request: the total, then the top functions and the top lines."""
    functions: dict[str, int] = {}
    lines: dict[str, int] = {}
    for file, function, line, count in json.loads(path.read_text()):
        name = file.removeprefix(f"{root}/")
        functions[f"{name}:{function}"] = functions.get(f"{name}:{function}", 0) + count
        lines[f"{name}:{line} {function}"] = lines.get(f"{name}:{line} {function}", 0) + count
    print(f"bytecodes per request: {sum(functions.values()) / served:,.0f}")
    for title, table in (("function", functions), ("line", lines)):
        print(f"{'per req':>8}  {title}")
        for name, count in sorted(table.items(), key=lambda item: -item[1])[:top]:
            print(f"{count / served:8.1f}  {name}")


def print_cprofile(path: Path, served: int, top: int) -> None:
    stats = pstats.Stats(str(path))
    rows = []
    for (file, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tottime, calls / served, cumtime, f"{Path(file).name}:{line}({func})"))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"{'tottime%':>8} {'calls/req':>9} {'cum us/req':>10}  function")
    for tottime, per, cumtime, name in rows[:top]:
        print(f"{100 * tottime / total:8.1f} {per:9.2f} {1e6 * cumtime / served:10.1f}  {name}")
    print(f"python calls per request: {sum(c[1] for c in stats.stats.values()) / served:.1f}")  # type: ignore[attr-defined]


def print_py_spy(path: Path, top: int) -> None:
    """py-spy's raw output (one line per distinct stack: frames from the outermost, `;`-joined, then a
    sample count): the share of samples each function is running in (self), and in (inclusive), and the
    self share per gateway module. Time in a C call (a socket write) counts for the Python frame that
    made it; the loop's idle wait is not sampled."""
    self_samples: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    modules: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame_name(frame) for frame in stack.split(";")]
        leaf = frames[-1]
        self_samples[leaf] = self_samples.get(leaf, 0) + count
        for name in set(frames):
            inclusive[name] = inclusive.get(name, 0) + count
        module = leaf.split(":")[0] if leaf.startswith("gateway/") else "(not the gateway's code)"
        modules[module] = modules.get(module, 0) + count
    if not total:
        raise SystemExit(f"no samples in {path}")
    print(f"{total} samples")
    print(f"{'self%':>6} {'incl%':>6}  function")
    for name, count in sorted(self_samples.items(), key=lambda item: -item[1])[:top]:
        print(f"{100 * count / total:6.1f} {100 * inclusive[name] / total:6.1f}  {name}")
    print("\nself time per module:")
    for module, count in sorted(modules.items(), key=lambda item: -item[1]):
        print(f"{100 * count / total:6.1f}  {module}")


def _frame_name(frame: str) -> str:
    """`request (gateway/client.py:797)` -> `gateway/client.py:request`, site-packages shortened."""
    function, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    if "/gateway/" in file:
        file = "gateway/" + file.split("/gateway/", 1)[1]
    return f"{file}:{function}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline_s: float = 120.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"port {port} did not open within {deadline_s:.0f} s")


def start_emulator(work: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """gateway.emulator in its own process (plain Python, not under callgrind); its URLs and CA file."""
    info_file = work / "emulator.json"
    (work / "emulator").mkdir()
    emulator_env = dict(
        env,
        BENCH_EMULATOR_INFO=str(info_file),
        BENCH_EMULATOR_WORKDIR=str(work / "emulator"),
        BENCH_AAD_TENANT=ENTRA_TENANT,
        BENCH_AAD_CLIENT=CALLER_APP,
        BENCH_AAD_SECRET=CALLER_SECRET,
        BENCH_PRIMARY_KEY=KEY,
    )
    proc = subprocess.Popen(
        [sys.executable, str(EMULATOR_LAUNCHER)],
        env=emulator_env,
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=open(work / "emulator.log", "wb"),
    )
    end = time.monotonic() + 60
    while not (info_file.exists() and info_file.stat().st_size > 0):
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise SystemExit(f"the emulator did not start: see {work / 'emulator.log'}")
        time.sleep(0.1)
    info: dict[str, Any] = json.loads(info_file.read_text())
    if info.get("error"):
        proc.terminate()
        raise SystemExit(str(info["error"]))
    return proc, info


def caller_token(emulator: dict[str, Any]) -> str:
    """Register the gateway's API (with an app role assigned to the caller) and get the caller's token
    for it, as an Azure SDK credential would: client credentials, scope `<application ID URI>/.default`."""
    return entra_caller_token(
        emulator,
        tenant_id=ENTRA_TENANT,
        client_id=CALLER_APP,
        client_secret=CALLER_SECRET,
        api_uri=GATEWAY_URI,
        api_client_id=GATEWAY_APP,
        role=ROLE,
    )


def entra_yaml(emulator: dict[str, Any], route_callers: str) -> tuple[str, str]:
    """The top of the gateway's config (`tls`, `inbound.entra_id`) and the route's `callers` lines."""
    head = entra_inbound_yaml(emulator, ENTRA_TENANT, [GATEWAY_URI, GATEWAY_APP])
    rule = {"app_ids": f"app_ids: [{CALLER_APP}]", "roles": f"roles: [{ROLE}]"}.get(route_callers)
    return head, (f"    callers:\n      {rule}\n" if rule else "")


async def one_connection(port: int, count: int, extra_headers: bytes = b"") -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        b"POST /score HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: bench\r\nAccept: */*\r\n%s"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (port, extra_headers, len(PAYLOAD), PAYLOAD)
    )
    for _ in range(count):
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"proxy answered {head[:200]!r}")
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if match is None:
            raise SystemExit(f"no content-length in {head!r}")
        await reader.readexactly(int(match.group(1)))
    writer.close()


async def load(port: int, requests: int, connections: int, extra_headers: bytes) -> None:
    per = requests // connections
    await asyncio.gather(*(one_connection(port, per, extra_headers) for _ in range(connections)))


def run_load(port: int, requests: int, connections: int, extra_headers: bytes = b"") -> None:
    asyncio.run(load(port, requests, connections, extra_headers))


def totals(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=("gateway", "floor"), default="gateway")
    ap.add_argument("--root", type=Path, default=REPO_ROOT, help="checkout whose gateway is measured")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=400)
    ap.add_argument(
        "--caller",
        choices=("none", "entra", "token-only"),
        default="none",
        help="entra: `inbound.entra_id` (the emulator) and every request with a valid bearer token; "
        "token-only: the same token sent to a gateway without `inbound.entra_id` (which drops it): what "
        "the bigger request costs, apart from validating it",
    )
    ap.add_argument(
        "--auth",
        choices=("key", "aad"),
        default="key",
        help="the route's credential: key, or aad: aad_token from the emulator (started, not measured)",
    )
    ap.add_argument(
        "--route-callers",
        choices=("none", "app_ids", "roles"),
        default="none",
        help="with --caller entra: a `callers` rule on the route naming the caller's app id or role",
    )
    ap.add_argument(
        "--access-log",
        nargs="?",
        const="text",
        choices=("text", "json"),
        help="the gateway at log level info (its default): an access line per request, to a file, as text "
        "lines (the default) or JSON lines",
    )
    ap.add_argument("--annotate", type=int, default=0, help="print the top N functions (inclusive)")
    ap.add_argument("--keep", type=Path, help="keep the callgrind dump at this path")
    ap.add_argument(
        "--cprofile",
        type=int,
        default=0,
        help="instead of callgrind: cProfile the gateway, print the top N functions (calls per request)",
    )
    ap.add_argument(
        "--opcodes",
        type=int,
        default=0,
        help="instead of callgrind: count the gateway's bytecodes per request (sys.settrace), print the "
        "top N functions and lines",
    )
    ap.add_argument(
        "--py-spy",
        type=int,
        default=0,
        help="instead of callgrind: sample the gateway with py-spy during the requests, print the top N",
    )
    args = ap.parse_args()
    if args.caller != "none" and args.target != "gateway":
        ap.error("--caller needs --target gateway")
    if args.route_callers != "none" and args.caller != "entra":
        ap.error("--route-callers needs --caller entra")

    if args.target == "gateway":
        usable, why = gateway_available(args.root.resolve())
        if not usable:
            raise SystemExit(why)
    work = Path(tempfile.mkdtemp(prefix="cg-"))
    up_port, port = free_port(), free_port()
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")  # as the Dockerfile and bench/run.py run the gateway
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(name, None)
    emulator: subprocess.Popen[bytes] | None = None
    extra_headers = b""
    top, callers = "", ""
    auth = "      type: key\n      primary: {env: BENCH_PRIMARY_KEY}\n"  # under routes.score.auth
    if args.caller != "none" or args.auth == "aad":
        emulator_env = dict(env, PYTHONPATH=str(args.root.resolve()))
        emulator, info = start_emulator(work, emulator_env)
        if args.caller != "none":
            try:
                token = caller_token(info)
            except BaseException:
                emulator.terminate()
                raise
            extra_headers = b"Authorization: Bearer %s\r\n" % token.encode()
        if args.caller == "entra":
            top, callers = entra_yaml(info, args.route_callers)
        if args.auth == "aad":
            if not top:
                top = f"tls:\n  ca_bundle: {info['ca_file']}\n"
            # The emulator's registered app (bench/emulator_launcher.py) as the gateway's own identity.
            auth = (
                "      type: aad_token\n      identity:\n"
                f"        tenant_id: {ENTRA_TENANT}\n        client_id: {CALLER_APP}\n"
                "        client_secret: {env: BENCH_AAD_SECRET}\n"
                f"        authority_host: {info['https_url']}\n"
            )
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM_SERVER, str(up_port)])
    if args.target == "gateway":
        config = work / "gateway.yaml"
        config.write_text(
            top
            + textwrap.dedent(
                f"""\
                server:
                  host: 127.0.0.1
                  port: {port}
                routes:
                  score:
                    path: /score
                    upstream: http://127.0.0.1:{up_port}/score
                    timeout_s: 60
                    auth:
                """
            )
            + auth
            + callers
        )
        env["PYTHONPATH"] = str(args.root.resolve())
        env["BENCH_PRIMARY_KEY"] = KEY
        env["BENCH_AAD_SECRET"] = CALLER_SECRET
        cmd = [
            sys.executable,
            "-c",
            "import sys; from gateway.cli import main; sys.exit(main())",
            "serve",
            "--config",
            str(config),
            "--workers",
            "1",
            "--log-level",
            "info" if args.access_log else "warning",
            "--log-format",
            args.access_log or "text",
        ]
    else:
        env.update(
            FLOOR_UPSTREAM_URL=f"http://127.0.0.1:{up_port}/score",
            FLOOR_PREFIX="/score",
            FLOOR_API_KEY=KEY,
            FLOOR_PORT=str(port),
        )
        cmd = [sys.executable, str(REPO_ROOT / "bench" / "floor_proxy.py")]
    out = work / "callgrind.out"
    if args.cprofile or args.opcodes:
        if args.target != "gateway":
            ap.error("--cprofile and --opcodes measure the gateway")
        if args.cprofile:
            cmd[1:3] = ["-c", CPROFILED % str(work / "cprofile.out")]
        else:
            cmd[1:3] = ["-c", OPCODE_COUNTED % str(work / "opcodes.json")]
    elif args.py_spy:
        if shutil.which("py-spy") is None:
            raise SystemExit("--py-spy needs py-spy on PATH: pip install py-spy")
    else:
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd]
    # Run from the work directory: `-c` puts the current directory first on sys.path, and from the
    # repository's root that would import this checkout's gateway whatever `--root` says.
    proxy = subprocess.Popen(
        cmd,
        env=env,
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=open(work / "proxy.log", "wb"),
    )
    try:
        wait_port(up_port)
        wait_port(port)
        run_load(port, args.warmup, args.connections, extra_headers)
        served = args.requests // args.connections * args.connections
        if args.cprofile or args.opcodes:
            os.kill(proxy.pid, signal.SIGUSR1)
            run_load(port, args.requests, args.connections, extra_headers)
            os.kill(proxy.pid, signal.SIGUSR2)
            stats = work / ("cprofile.out" if args.cprofile else "opcodes.json")
            end = time.monotonic() + 30
            while not stats.exists() and time.monotonic() < end:
                time.sleep(0.1)
            time.sleep(0.5)
            if args.cprofile:
                print_cprofile(stats, served, args.cprofile)
            else:
                print_opcodes(stats, served, args.opcodes, args.root.resolve())
            return 0
        if args.py_spy:
            samples = work / "py-spy.txt"
            spy = subprocess.Popen(
                [
                    *("py-spy", "record", "--pid", str(proxy.pid), "--format", "raw", "--rate", "1000"),
                    *("--output", str(samples)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(work / "py-spy.log", "wb"),
            )
            time.sleep(1.0)  # attached before the first measured request
            run_load(port, args.requests, args.connections, extra_headers)
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            print_py_spy(samples, args.py_spy)
            return 0
        subprocess.run(["callgrind_control", "-z", str(proxy.pid)], check=True, capture_output=True)
        run_load(port, args.requests, args.connections, extra_headers)
        subprocess.run(["callgrind_control", "-d", str(proxy.pid)], check=True, capture_output=True)
        dumps = sorted(work.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
        if not dumps:
            raise SystemExit(f"no dump in {work}")
        dump = dumps[-1]
        per_request = totals(dump) / served
        caller = "" if args.caller == "none" else f", caller {args.caller}"
        if args.route_callers != "none":
            caller += f", route callers.{args.route_callers}"
        if args.access_log:
            caller += f", access log ({args.access_log})"
        print(
            f"{args.target}: {per_request:,.0f} instructions/request "
            f"({served} requests, c={args.connections}{caller})"
        )
        if args.keep:
            args.keep.write_bytes(dump.read_bytes())
        if args.annotate:
            res = subprocess.run(
                ["callgrind_annotate", "--inclusive=yes", str(dump)], capture_output=True, text=True
            )
            print("\n".join(res.stdout.splitlines()[: args.annotate + 25]))
    finally:
        proxy.terminate()
        upstream.terminate()
        proxy.wait(30)
        upstream.wait(30)
        if emulator is not None:
            emulator.terminate()
            emulator.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
