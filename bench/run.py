#!/usr/bin/env python3
"""scoring-gateway benchmark: one command, loopback only, measured per core.

    python bench/run.py [--quick] [--baseline DIR] [--duration S] [--repeat N] [--scenarios a,b] [--out DIR]

Starts the upstream (nginx answering a fixed body), the proxies under test (the gateway, nginx,
HAProxy, Caddy, a naive Starlette+httpx proxy, the tightest aiohttp forwarder, optionally a second
build of the gateway), pins every proxy alone to one core and wrk + the upstream to the other(s),
drives each with wrk (POST of a small scoring payload) and writes ``<out>/latest.md`` (req/s at
c=32, CPU microseconds per request, added latency at c=1, the client decision, before/after),
``<out>/latest.png`` (chart), ``<out>/latest.json`` (raw numbers) and server logs under
``<out>/run-<timestamp>/``. See bench/README.md for what each scenario means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import http.client
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
LUA_SCRIPT = BENCH_DIR / "wrk" / "score.lua"

PAYLOAD = b'{"data": [[0.1, 2.3, 4.1, 2.0], [0.2, 1.8, 3.9, 2.1]]}'
# Azure ML scoring scripts usually return json.dumps(result), which the runtime serialises again:
# the body is a JSON *string* that holds JSON.
UPSTREAM_BODY = '"[\\"setosa\\", \\"versicolor\\"]"'
STATIC_KEY = "bench-static-primary-key-0123456789abcdef"
AAD_SECRET = "bench-client-secret-0123456789"
AAD_TENANT = "0b3c4000-0000-4000-8000-00000000aad1"
AAD_CLIENT = "0b3c4000-0000-4000-8000-00000000aad2"
# gateway-caller (issue 16): the gateway's API as registered on the emulator (`inbound.entra_id` accepts
# its tokens); the caller is the emulator's app above (AAD_CLIENT, client credentials), assigned ROLE.
CALLER_API_URI = "api://scoring-gateway"
CALLER_API_APP = "0b3c4000-0000-4000-8000-00000000aad3"
CALLER_ROLE = "Scoring.Invoke"

ALL_SCENARIOS = [
    "direct",
    "nginx",
    "haproxy",
    "caddy",
    "naive",
    "aiohttp",
    "floor",
    "gateway",
    "gateway-baseline",
    "gateway-logged",
    "gateway-json",
    "gateway-caller",
    "gateway-aad",
    "gateway-emulator",
]
# Measured only with --baseline DIR.
BASELINE = "gateway-baseline"
# Peers and scenarios that may be unavailable (a package that cannot be installed, the emulator):
# unavailable -> "skipped", not "failed".
OPTIONAL_SCENARIOS = {"haproxy", "caddy", "aiohttp", "gateway-caller", "gateway-aad", "gateway-emulator"}
# The quick run (CI's smoke test) installs nothing but wrk and nginx: peers that are missing are skipped.
QUICK_SCENARIOS = [s for s in ALL_SCENARIOS if s not in {BASELINE, "gateway-aad", "gateway-emulator"}]
DESCRIPTIONS = {
    "direct": "nginx (1 worker) answering POST /score with a fixed body: the upstream alone (load core)",
    "nginx": "nginx (1 worker) reverse proxy to `direct`, injects the key, keep-alive upstream pool",
    "haproxy": "HAProxy (1 thread) reverse proxy to `direct`, injects the key, `http-reuse always`",
    "caddy": "Caddy `reverse_proxy` to `direct` (GOMAXPROCS follows the pinning: 1), injects the key, "
    "keep-alive upstream pool",
    "naive": "Starlette + httpx.AsyncClient forwarder under uvicorn (1 worker), injects the key",
    "aiohttp": "tightest aiohttp forwarder: raw ASGI under the gateway's uvicorn settings, one tuned "
    "`aiohttp.ClientSession`, body streamed through (bench/aiohttp_proxy.py): the upper bound for an "
    "aiohttp-based gateway",
    "floor": "the stack floor: a minimal uvloop + httptools forwarder (bench/floor_proxy.py: route prefix, "
    "key injected, keep-alive upstream pool, Content-Length and chunked framing; protocol callbacks only, no "
    "limits, timers, metrics or logging): what this stack costs before the gateway does any work of its own",
    "gateway": "`gateway serve --workers 1`, key auth route to `direct` (this checkout), the inbound limits "
    "at their defaults",
    BASELINE: "`gateway serve --workers 1`, key auth route to `direct`, from the `--baseline` checkout",
    "gateway-logged": "`gateway` at the default log level (info): an access line per request, to a file",
    "gateway-json": "`gateway-logged` with `log_format: json`, as the Kubernetes manifests set it",
    "gateway-caller": "`gateway`'s key route plus `inbound.entra_id` (the emulator as the authority); wrk "
    "sends a caller token the emulator issued by client credentials for the gateway's audience with every "
    "request: after the first, each connection recognises it as the token it proved (issue 16)",
    "gateway-aad": "`gateway serve --workers 1`, aad_token route (tokens from the emulator) to `direct`",
    "gateway-emulator": "`gateway serve --workers 1`, key route to the emulator's scoring endpoint",
}
# Debian package (and binary) of each peer that the bench installs when missing.
PEER_PACKAGES = {"haproxy": "haproxy", "caddy": "caddy"}

QUICK_DEFAULTS = {"duration": 1, "repeat": 1, "warmup": 0, "soak_requests": 2_000, "concurrency": "1,32"}
FULL_DEFAULTS = {"duration": 5, "repeat": 3, "warmup": 2, "soak_requests": 500_000, "concurrency": "1,32"}
THROUGHPUT_C = 32
LATENCY_C = 1
# Issue 9: prefer a mature client when it comes within 15% of the own client's per-core throughput;
# the issue itself may cost at most 10% of the gateway's figure.
CLIENT_DECISION_RATIO = 0.85
BASELINE_MAX_COST = 0.10
# Issue 18: the gateway's CPU per request within this multiple of the floor's, per-core req/s at least
# this multiple of Caddy's, and at most this much p99 latency added at c=1.
FLOOR_MAX_RATIO = 1.6
CADDY_MIN_RATIO = 1.5
ADDED_P99_MAX_MS = 0.5
# Issue 16: a cached Entra ID caller may cost at most 10% CPU per request over the key route.
CALLER_MAX_RATIO = 1.10


# Other processes may use at most this share of one core (percent) during a reference run: above it the
# report is not written as latest.md unless --allow-busy says this is a smoke run.
BUSY_LIMIT_CORE_PCT = 10.0
EXIT_BUSY = 3


def busy_machine(foreign_core_pct: float | None) -> bool:
    """Whether other work disturbed the run (unknown counts as quiet: /proc/stat unreadable)."""
    return foreign_core_pct is not None and foreign_core_pct > BUSY_LIMIT_CORE_PCT


def report_stem(busy: bool, allow_busy: bool) -> str:
    """The report's file names: `latest` (.md, .png, .json), or `disturbed` for a run on a busy machine
    that --allow-busy did not let replace the reference figures."""
    return "disturbed" if busy and not allow_busy else "latest"


class BenchError(Exception):
    """A scenario could not be set up."""


class ToolsUnavailable(BenchError):
    """wrk or nginx are missing and could not be installed."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# tools


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        cand = Path(d) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


_apt_updated = False


def apt_install(packages: list[str]) -> None:
    """`apt-get install -y` (after one `apt-get update` per run), as root or via `sudo -n`."""
    global _apt_updated
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise ToolsUnavailable(f"{', '.join(packages)} missing, not root and no sudo to install them")
        prefix = ["sudo", "-n"]
    if shutil.which("apt-get") is None:
        raise ToolsUnavailable(f"{', '.join(packages)} missing and apt-get is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"installing {' '.join(packages)} with apt-get")
    steps = [[*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]]
    if not _apt_updated:
        steps.insert(0, [*prefix, "apt-get", "update", "-q"])
    for cmd in steps:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        if res.returncode != 0:
            tail = (res.stdout + res.stderr).strip().splitlines()[-5:]
            raise ToolsUnavailable(f"`{' '.join(cmd)}` failed: {' | '.join(tail)}")
    _apt_updated = True


def ensure_tools(install: bool = True) -> dict[str, str]:
    """Return paths of wrk and nginx, installing them with apt-get when missing."""
    missing = [t for t in ("wrk", "nginx") if find_tool(t) is None]
    if missing and install:
        apt_install(["nginx", "wrk"])
        missing = [t for t in ("wrk", "nginx") if find_tool(t) is None]
    if missing:
        raise ToolsUnavailable(f"{', '.join(missing)} not found")
    return {"wrk": str(find_tool("wrk")), "nginx": str(find_tool("nginx"))}


def ensure_peers(wanted: list[str], install: bool) -> dict[str, str]:
    """Path of each wanted peer binary (haproxy, caddy), installed with apt-get when missing and
    `install`; a peer that is still missing maps to "" (its scenario is skipped, with the reason)."""
    found = {name: find_tool(name) or "" for name in wanted}
    missing = [name for name, path in found.items() if not path]
    if missing and install:
        try:
            apt_install([PEER_PACKAGES[name] for name in missing])
        except ToolsUnavailable as exc:
            log(f"could not install {', '.join(missing)}: {exc}")
        found = {name: find_tool(name) or "" for name in wanted}
    return found


def ensure_python_package(module: str, install: bool = True) -> bool:
    """Import `module`, `pip install` it into this interpreter when missing and `install`.
    Bench-only packages (matplotlib, aiohttp) are installed here, never in the project's dependencies."""
    import importlib

    try:
        importlib.import_module(module)
        return True
    except ImportError:
        pass
    if not install:
        return False
    log(f"{module} missing: pip install {module}")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", module],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if res.returncode != 0:
        log(f"pip install {module} failed: {res.stderr.strip()[-300:]}")
        return False
    importlib.invalidate_caches()
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


# --------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the whole process group (master + workers): SIGTERM, then SIGKILL."""
        pgid = self.popen.pid  # started with start_new_session=True -> pgid == pid
        for sig, wait_s in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            try:
                self.popen.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            # leader gone; make sure no straggler in the group survives
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, 0)
                time.sleep(0.2)
                os.killpg(pgid, signal.SIGKILL)
            return


class ProcessSet:
    """Owns every process the bench starts; ``close()`` stops them all (newest first)."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(
        self,
        name: str,
        cmd: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        cpus: set[int] | None = None,
    ) -> Proc:
        """Start `cmd` in its own session; with `cpus`, the process (and so every process and thread
        it starts later) may run only on those cores, from before its first instruction."""
        log_fh = open(log_path, "ab")
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        try:
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=pin,
            )
        finally:
            log_fh.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def close(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every process group at once, wait up to `timeout_s` in total, SIGKILL what is left."""
        procs, self.procs = self.procs[::-1], []
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in procs:
            try:
                proc.stop()  # SIGKILLs the group if anything in it is still alive
            except Exception as exc:  # keep stopping the others
                log(f"failed to stop {proc.name} (pid {proc.pid}): {exc}")


# --------------------------------------------------------------------------------------------
# HTTP helpers (stdlib only, so readiness checks don't depend on anything the servers use)


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    timeout: float = 5.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        sent = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=sent | (headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def wait_until(
    check: Callable[[], bool], timeout_s: float, proc: Proc | None = None, what: str = "server"
) -> None:
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise BenchError(f"{what} exited with code {proc.popen.returncode}: {proc.log_tail()}")
        try:
            if check():
                return
        except (OSError, http.client.HTTPException) as exc:
            last_exc = exc
        time.sleep(0.1)
    tail = proc.log_tail() if proc else ""
    raise BenchError(f"{what} not ready after {timeout_s:.0f}s (last error: {last_exc}) {tail}")


# --------------------------------------------------------------------------------------------
# nginx


def nginx_quote(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def nginx_conf(prefix: Path, server_block: str, extra_http: str = "") -> str:
    user = "user root;" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / ('tmp_' + kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
worker_processes 1;
daemon off;
master_process on;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
{user}
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
{temp}
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{extra_http}
{server_block}
}}
"""


def start_nginx(
    procs: ProcessSet, nginx: str, workdir: Path, name: str, conf_text: str, cpus: set[int] | None = None
) -> Proc:
    prefix = workdir / name
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(conf_text)
    test = subprocess.run(
        [nginx, "-t", "-q", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if test.returncode != 0:
        raise BenchError(f"nginx config for {name} invalid: {test.stderr.strip()}")
    return procs.start(
        name,
        [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        workdir / f"{name}.log",
        cpus=cpus,
    )


def direct_conf(prefix: Path, port: int) -> str:
    # X-Bench-Auth tells the bench (sanity check only) which credential reached the upstream.
    extra = f"""\
    map_hash_bucket_size 128;
    map $http_authorization $bench_auth_seen {{
        default "other";
        "" "none";
        {nginx_quote("Bearer " + STATIC_KEY)} "key";
        "~^Bearer " "bearer";
    }}"""
    server = f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /score {{
            default_type application/json;
            add_header X-Bench-Auth $bench_auth_seen;
            return 200 {nginx_quote(UPSTREAM_BODY)};
        }}
        location / {{
            return 404;
        }}
    }}"""
    return nginx_conf(prefix, server, extra)


def proxy_conf(prefix: Path, port: int, upstream_port: int) -> str:
    extra = f"""\
    upstream bench_direct {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}"""
    server = f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /score {{
            proxy_pass http://bench_direct/score;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization {nginx_quote("Bearer " + STATIC_KEY)};
        }}
        location / {{
            return 404;
        }}
    }}"""
    return nginx_conf(prefix, server, extra)


# --------------------------------------------------------------------------------------------
# HAProxy and Caddy: plain reverse proxies to `direct`, keep-alive upstream, the same fixed key


def haproxy_conf(port: int, upstream_port: int) -> str:
    return f"""\
global
    nbthread 1
    maxconn 4096
    log stderr format raw local0 err

defaults
    mode http
    timeout connect 5s
    timeout client 75s
    timeout server 60s
    timeout http-keep-alive 75s
    option http-keep-alive
    http-reuse always

frontend bench
    bind 127.0.0.1:{port}
    http-request set-header Authorization "Bearer {STATIC_KEY}"
    default_backend direct

backend direct
    server direct 127.0.0.1:{upstream_port}
"""


def start_haproxy(
    procs: ProcessSet, haproxy: str, workdir: Path, port: int, upstream_port: int, cpus: set[int] | None
) -> Proc:
    conf = workdir / "haproxy.cfg"
    conf.write_text(haproxy_conf(port, upstream_port))
    test = subprocess.run(
        [haproxy, "-c", "-q", "-f", str(conf)], capture_output=True, text=True, timeout=30, check=False
    )
    if test.returncode != 0:
        raise BenchError(f"haproxy config invalid: {(test.stdout + test.stderr).strip()}")
    # -db: stay in the foreground, no daemon; -W would add a master process for nothing.
    return procs.start("haproxy", [haproxy, "-db", "-f", str(conf)], workdir / "haproxy.log", cpus=cpus)


def caddyfile(port: int, upstream_port: int) -> str:
    return f"""\
{{
    admin off
    auto_https off
    log {{
        level ERROR
    }}
}}

http://127.0.0.1:{port} {{
    reverse_proxy 127.0.0.1:{upstream_port} {{
        header_up Authorization "Bearer {STATIC_KEY}"
        transport http {{
            keepalive 75s
            keepalive_idle_conns 64
            keepalive_idle_conns_per_host 64
        }}
    }}
}}
"""


def start_caddy(
    procs: ProcessSet, caddy: str, workdir: Path, port: int, upstream_port: int, cpus: set[int] | None
) -> Proc:
    home = workdir / "caddy"
    home.mkdir(parents=True, exist_ok=True)
    conf = home / "Caddyfile"
    conf.write_text(caddyfile(port, upstream_port))
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home), XDG_DATA_HOME=str(home))
    cmd = [caddy, "run", "--config", str(conf), "--adapter", "caddyfile"]
    return procs.start("caddy", cmd, workdir / "caddy.log", env=env, cwd=home, cpus=cpus)


# --------------------------------------------------------------------------------------------
# /proc memory


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    children = _children_map()
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def _status_kb(pid: int, field_name: str, path: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory(pid: int) -> dict[str, Any]:
    """RSS (and PSS) of a process and all its descendants, in KiB."""
    pids = process_tree(pid)
    rss = sum(_status_kb(p, "VmRSS") for p in pids)
    pss = sum(_status_kb(p, "Pss", "smaps_rollup") for p in pids)
    return {"processes": len(pids), "rss_kib": rss, "pss_kib": pss}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads), from /proc/<pid>/stat, in seconds."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5): utime, stime
    return ticks / CLOCK_TICKS


def tree_affinity(pids: list[int]) -> set[int]:
    """The union of the cores every thread of these processes may run on."""
    cpus: set[int] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    cpus |= os.sched_getaffinity(int(tid))
    return cpus


@dataclass
class Pinning:
    """Which cores the proxies under test get, and which wrk, the upstreams and the bench itself get."""

    proxy_cpus: set[int]
    load_cpus: set[int]

    @property
    def active(self) -> bool:
        return bool(self.proxy_cpus)

    def describe(self) -> str:
        if not self.active:
            return "not pinned (fewer than 2 usable cores, or --no-pin)"
        return (
            f"proxy under test alone on core {fmt_cpus(self.proxy_cpus)}; wrk, the upstream and the "
            f"bench on core {fmt_cpus(self.load_cpus)}"
        )


def fmt_cpus(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def choose_pinning(enabled: bool, proxy_cpu: int | None) -> Pinning:
    usable = os.sched_getaffinity(0)
    if not enabled or len(usable) < 2:
        return Pinning(set(), set())
    proxy = proxy_cpu if proxy_cpu is not None else max(usable)
    if proxy not in usable:
        raise SystemExit(f"--proxy-cpu {proxy} is not one of the usable cores {fmt_cpus(usable)}")
    return Pinning({proxy}, usable - {proxy})


# --------------------------------------------------------------------------------------------
# wrk


def run_wrk(
    wrk: str,
    url: str,
    concurrency: int,
    duration_s: int,
    threads: int,
    timeout_s: int = 10,
    cpu_pids: list[int] | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One wrk run; with `cpu_pids`, also the CPU time those processes spent per request; `headers` are
    sent with every request (wrk -H, next to the script's Content-Type)."""
    threads = max(1, min(threads, concurrency))
    cmd = [
        wrk,
        f"-t{threads}",
        f"-c{concurrency}",
        f"-d{int(duration_s)}s",
        "--timeout",
        f"{timeout_s}s",
        *(arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")),
        "-s",
        str(LUA_SCRIPT),
        url,
    ]
    cpu_before = tree_cpu_seconds(cpu_pids) if cpu_pids else 0.0
    popen = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = popen.communicate(timeout=duration_s + timeout_s + 30)
        cpu_s = tree_cpu_seconds(cpu_pids) - cpu_before if cpu_pids else None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        raise
    for line in out.splitlines():
        if line.startswith("BENCH_RESULT "):
            res: dict[str, Any] = json.loads(line[len("BENCH_RESULT ") :])
            break
    else:
        raise BenchError(
            f"wrk produced no result (rc={popen.returncode}): {err.strip()} {out.strip()[-300:]}"
        )
    secs = res["duration_us"] / 1e6 or 1.0
    res["rps"] = res["requests"] / secs
    res["errors"] = sum(
        res[k] for k in ("errors_connect", "errors_read", "errors_write", "errors_status", "errors_timeout")
    )
    res["concurrency"] = concurrency
    res["threads"] = threads
    res["cpu_s"] = cpu_s
    res["cpu_us_per_req"] = cpu_s / res["requests"] * 1e6 if cpu_s is not None and res["requests"] else None
    return res


# --------------------------------------------------------------------------------------------
# scenarios


@dataclass
class Scenario:
    name: str
    port: int = 0
    proc: Proc | None = None
    status: str = "pending"  # ok | skipped | failed
    reason: str = ""
    auth_seen: str = ""
    runs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    requests_served: int = 0
    pids: list[int] = field(default_factory=list)  # the process tree whose CPU time is counted
    pinned_to: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (gateway-caller)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/score"


def check_score(port: int, request_headers: dict[str, str] | None = None) -> tuple[bool, str]:
    status, headers, body = http_request(port, "POST", "/score", PAYLOAD, headers=request_headers)
    if status != 200:
        return False, f"POST /score -> {status}: {body[:200]!r}"
    return True, headers.get("x-bench-auth", "?")


def gateway_cmd(config: Path, workers: int, log_level: str = "warning") -> list[str]:
    # Equivalent to `gateway serve --config FILE --workers N --log-level LEVEL`, but always runs
    # the gateway package of this checkout (the console script may point at another install).
    return [
        sys.executable,
        "-c",
        "import sys; from gateway.cli import main; sys.exit(main())",
        "serve",
        "--config",
        str(config),
        "--workers",
        str(workers),
        "--log-level",
        log_level,
    ]


def gateway_env(root: Path = REPO_ROOT, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that runs the gateway package of checkout `root` with this interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["BENCH_PRIMARY_KEY"] = STATIC_KEY
    env["BENCH_AAD_SECRET"] = AAD_SECRET
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def gateway_available(root: Path = REPO_ROOT) -> tuple[bool, str]:
    """Whether checkout `root`'s gateway imports with this interpreter, and from `root` itself (an
    editable install of another checkout must not win over PYTHONPATH)."""
    res = subprocess.run(
        [sys.executable, "-c", "import gateway.cli; print(gateway.cli.__file__)"],
        capture_output=True,
        text=True,
        env=gateway_env(root),
        cwd=root,
        timeout=60,
        check=False,
    )
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines()
        return False, f"`import gateway.cli` failed: {lines[-1] if lines else res.returncode}"
    imported = Path(res.stdout.strip()).resolve()
    if not imported.is_relative_to(root.resolve()):
        return False, f"PYTHONPATH={root} imports the gateway from {imported}, not from that checkout"
    return True, ""


def key_gateway_yaml(port: int, upstream_url: str, log_format: str = "text") -> str:
    return textwrap.dedent(
        f"""\
        server:
          host: 127.0.0.1
          port: {port}
          log_format: {log_format}
        routes:
          score:
            path: /score
            upstream: {upstream_url}
            timeout_s: 60
            auth:
              type: key
              primary: {{env: BENCH_PRIMARY_KEY}}
        """
    )


def aad_gateway_yaml(port: int, upstream_url: str, authority: str, ca_file: str) -> str:
    return textwrap.dedent(
        f"""\
        server:
          host: 127.0.0.1
          port: {port}
        tls:
          ca_bundle: {ca_file}
        routes:
          score:
            path: /score
            upstream: {upstream_url}
            timeout_s: 60
            auth:
              type: aad_token
              identity:
                tenant_id: {AAD_TENANT}
                client_id: {AAD_CLIENT}
                client_secret: {{env: BENCH_AAD_SECRET}}
                authority_host: {authority}
        """
    )


def entra_inbound_yaml(emulator: dict[str, Any], tenant_id: str, audiences: list[str]) -> str:
    """Top-level config lines (`tls`, `inbound.entra_id`) that make the gateway accept caller tokens of
    `tenant_id` for `audiences`, with the emulator as the authority (its HTTPS origin, trusted through
    its CA). Shared with bench/callgrind_per_request.py."""
    return textwrap.dedent(
        f"""\
        tls:
          ca_bundle: {emulator["ca_file"]}
        inbound:
          entra_id:
            tenant_id: {tenant_id}
            audiences: [{", ".join(audiences)}]
            authority: {emulator["https_url"]}
        """
    )


def entra_caller_token(
    emulator: dict[str, Any],
    *,
    tenant_id: str,
    client_id: str,
    client_secret: str,
    api_uri: str,
    api_client_id: str,
    role: str,
) -> str:
    """Register the gateway's API on the emulator (application ID URI `api_uri`, app role `role`
    assigned to the app `client_id`, which the emulator must know with `client_secret`) and get that
    app's token for it, as an Azure SDK credential would: client credentials, scope `<api_uri>/.default`.
    Stdlib only, no proxy from the environment. Shared with bench/callgrind_per_request.py."""
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=emulator["ca_file"])),
    )

    def post(url: str, body: bytes, content_type: str) -> dict[str, Any]:
        request = urllib.request.Request(
            url, data=body, headers={"Content-Type": content_type}, method="POST"
        )
        try:
            with opener.open(request, timeout=30) as answer:
                data: dict[str, Any] = json.loads(answer.read())
                return data
        except urllib.error.HTTPError as exc:
            raise BenchError(f"POST {url} -> {exc.code}: {exc.read()[:300]!r}") from None

    def post_json(url: str, doc: dict[str, Any]) -> None:
        post(url, json.dumps(doc).encode(), "application/json")

    admin = emulator["http_url"].rstrip("/") + "/_emulator"
    post_json(
        f"{admin}/apis",
        {"tenant_id": tenant_id, "identifier_uri": api_uri, "client_id": api_client_id, "app_roles": [role]},
    )
    post_json(f"{admin}/apis/{api_client_id}/role-assignments", {"principal": client_id, "role": role})
    form = {
        "grant_type": "client_credentials",
        "client_id": client_id,
        "client_secret": client_secret,
        "scope": f"{api_uri}/.default",
    }
    answer = post(
        f"{emulator['https_url'].rstrip('/')}/{tenant_id}/oauth2/v2.0/token",
        urllib.parse.urlencode(form).encode(),
        "application/x-www-form-urlencoded",
    )
    return str(answer["access_token"])


def gateway_check(config: Path, workdir: Path, root: Path = REPO_ROOT) -> tuple[bool, str]:
    """Run `gateway check --config FILE`; (False, why) when the config is not accepted."""
    cmd = [
        sys.executable,
        "-c",
        "import sys; from gateway.cli import main; sys.exit(main())",
        "check",
        "--config",
        str(config),
    ]
    try:
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=gateway_env(root),
            cwd=workdir,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, "`gateway check` timed out"
    if res.returncode != 0:
        lines = (res.stdout + res.stderr).strip().splitlines()
        return False, f"`gateway check` exit {res.returncode}: {' | '.join(lines[-3:])}"
    return True, ""


def start_gateway(
    procs: ProcessSet,
    workdir: Path,
    sc: Scenario,
    yaml_text: str,
    check_first: bool,
    cpus: set[int] | None,
    root: Path = REPO_ROOT,
    log_level: str = "warning",
) -> None:
    cfg = workdir / f"{sc.name}.yaml"
    cfg.write_text(yaml_text)
    if check_first:
        ok, why = gateway_check(cfg, workdir, root)
        if not ok:
            raise BenchError(why)
    sc.proc = procs.start(
        sc.name,
        gateway_cmd(cfg, 1, log_level),
        workdir / f"{sc.name}.log",
        env=gateway_env(root),
        cwd=workdir,
        cpus=cpus,
    )

    def healthy() -> bool:
        status, _, _ = http_request(sc.port, "GET", "/healthz", timeout=2.0)
        return status == 200

    wait_until(healthy, 60.0, sc.proc, f"gateway {sc.name}")


EMULATOR_LAUNCHER = BENCH_DIR / "emulator_launcher.py"


def start_emulator(procs: ProcessSet, workdir: Path) -> dict[str, Any]:
    """Start gateway.emulator in its own process; returns the URLs/CA it printed."""
    info_file = workdir / "emulator.json"
    env = gateway_env(
        extra={
            "BENCH_EMULATOR_INFO": str(info_file),
            "BENCH_EMULATOR_WORKDIR": str(workdir / "emulator"),
            "BENCH_AAD_TENANT": AAD_TENANT,
            "BENCH_AAD_CLIENT": AAD_CLIENT,
        }
    )
    (workdir / "emulator").mkdir(exist_ok=True)
    proc = procs.start(
        "emulator", [sys.executable, str(EMULATOR_LAUNCHER)], workdir / "emulator.log", env=env
    )

    def ready() -> bool:
        return info_file.exists() and info_file.stat().st_size > 0

    wait_until(ready, 60.0, proc, "emulator")
    info: dict[str, Any] = json.loads(info_file.read_text())
    if info.get("error"):
        raise BenchError(str(info["error"]))
    info["proc"] = proc
    return info


# --------------------------------------------------------------------------------------------
# aggregation


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarize(sc: Scenario, c: int) -> dict[str, Any] | None:
    runs = sc.runs.get(c) or []
    if not runs:
        return None
    return {
        "rps": median([r["rps"] for r in runs]),
        "p50_ms": median([r["p50_us"] / 1000 for r in runs]),
        "p90_ms": median([r["p90_us"] / 1000 for r in runs]),
        "p99_ms": median([r["p99_us"] / 1000 for r in runs]),
        "cpu_us": median([r["cpu_us_per_req"] for r in runs if r.get("cpu_us_per_req") is not None]),
        "errors": sum(r["errors"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "runs": len(runs),
        "rps_min": min(r["rps"] for r in runs),
        "rps_max": max(r["rps"] for r in runs),
    }


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


# --------------------------------------------------------------------------------------------
# machine


@dataclass
class CpuMeter:
    """How much CPU the machine spent outside this bench (other people's processes) during the run."""

    stat0: tuple[int, int] = (0, 0)
    own0: float = 0.0
    wall0: float = 0.0
    loadavg: str = ""

    @staticmethod
    def _stat() -> tuple[int, int]:
        try:
            vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return (0, 0)
        user, nice, system = vals[0], vals[1], vals[2]
        return (user + nice + system, sum(vals))

    @staticmethod
    def _own() -> float:
        t = os.times()  # includes every reaped child: wrk runs, servers and (via their masters) workers
        return t.user + t.system + t.children_user + t.children_system

    def start(self) -> None:
        self.stat0, self.own0, self.wall0 = self._stat(), self._own(), time.monotonic()
        with contextlib.suppress(OSError):
            self.loadavg = " / ".join(Path("/proc/loadavg").read_text().split()[:3])

    def foreign(self) -> tuple[float, float] | None:
        """CPU used by processes the bench did not start (approximate): as a share of all cores' time,
        and as a share of one core (100 = one core kept busy the whole run), in percent."""
        busy1, total1 = self._stat()
        total = total1 - self.stat0[1]
        wall = time.monotonic() - self.wall0
        if total <= 0 or wall <= 0:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        foreign_s = max(0.0, (busy1 - self.stat0[0]) / hz - (self._own() - self.own0))
        return foreign_s / (total / hz) * 100, foreign_s / wall * 100


def machine_info(tools: dict[str, str]) -> dict[str, str]:
    info: dict[str, str] = {}
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info["CPU"] = cpu
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info["Cores"] = f"{os.cpu_count()} logical ({usable} usable by this process)"
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    info["Memory"] = f"{mem_kib / 1024 / 1024:.1f} GiB"
    info["Kernel"] = f"{platform.system()} {platform.release()} ({platform.machine()})"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                info["OS"] = line.split("=", 1)[1].strip('"')
    info["Python"] = f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})"
    for tool, flag in (("nginx", "-v"), ("wrk", "-v"), ("haproxy", "-v"), ("caddy", "version")):
        if not tools.get(tool):
            continue
        with contextlib.suppress(Exception):
            res = subprocess.run([tools[tool], flag], capture_output=True, text=True, timeout=10, check=False)
            first = (res.stderr + res.stdout).strip().splitlines()[0]
            info[tool] = first.replace("nginx version: ", "").split(" Copyright")[0].split(" - ")[0]
    pkgs = []
    for dist in (
        "scoring-gateway",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "httpx",
        "aiohttp",
        "msal",
        "pydantic",
        "PyYAML",
    ):
        try:
            pkgs.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pkgs.append(f"{dist} (not installed)")
    info["Packages"] = ", ".join(pkgs)
    with contextlib.suppress(Exception):
        rev = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if rev.returncode == 0:
            info["Commit"] = rev.stdout.strip()
    return info


# --------------------------------------------------------------------------------------------
# reporting


def throughput_c(concurrencies: list[int]) -> int:
    return THROUGHPUT_C if THROUGHPUT_C in concurrencies else max(concurrencies)


def latency_c(concurrencies: list[int]) -> int:
    return LATENCY_C if LATENCY_C in concurrencies else min(concurrencies)


def paired_ratio(a: Scenario, b: Scenario, c: int, key: str) -> float | None:
    """Median over repeats of a/b, each repeat's two runs taken back to back (drift cancels)."""
    pairs = [
        ra[key] / rb[key]
        for ra, rb in zip(a.runs.get(c, []), b.runs.get(c, []), strict=False)
        if ra.get(key) and rb.get(key)
    ]
    return median(pairs) if pairs else None


def derive(scen: dict[str, Scenario], args: argparse.Namespace) -> dict[str, Any]:
    """The figures per target, the ratios, the client decision and the before/after comparison."""
    tc, lc = throughput_c(args.concurrency_list), latency_c(args.concurrency_list)

    def s(name: str, c: int) -> dict[str, Any] | None:
        sc = scen.get(name)
        return summarize(sc, c) if sc and sc.status == "ok" else None

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "rps") -> float | None:
        if not a or not b or not b[key] or math.isnan(a[key]) or math.isnan(b[key]):
            return None
        return float(a[key] / b[key])

    direct_lat = s("direct", lc)
    per_target: dict[str, dict[str, Any]] = {}
    for name in args.scenario_list:
        hi, lo = s(name, tc), s(name, lc)
        row: dict[str, Any] = {
            "rps": hi["rps"] if hi else None,
            "cpu_us": hi["cpu_us"] if hi and not math.isnan(hi["cpu_us"]) else None,
            "errors": (hi["errors"] if hi else 0) + (lo["errors"] if lo and lc != tc else 0),
        }
        row["per_core_rps"] = 1e6 / row["cpu_us"] if row["cpu_us"] else None
        if lo and direct_lat and name != "direct":
            row["added_p50_ms"] = lo["p50_ms"] - direct_lat["p50_ms"]
            row["added_p99_ms"] = lo["p99_ms"] - direct_lat["p99_ms"]
        per_target[name] = row

    gw = s("gateway", tc)
    ratios = {
        "gateway / nginx": ratio(gw, s("nginx", tc)),
        "gateway / naive": ratio(gw, s("naive", tc)),
        "gateway-aad / gateway": ratio(s("gateway-aad", tc), gw),
        "gateway-caller / gateway": ratio(s("gateway-caller", tc), gw),
        "gateway-logged / gateway": ratio(s("gateway-logged", tc), gw),
        "gateway-json / gateway": ratio(s("gateway-json", tc), gw),
    }
    decision: dict[str, Any] = {}
    aio = s("aiohttp", tc)
    if gw and aio:
        rps_ratio = ratio(aio, gw)
        cpu_ratio = ratio(gw, aio, "cpu_us")  # aiohttp's per-core capacity / the gateway's
        assert rps_ratio is not None
        decision = {
            "aiohttp_over_gateway_rps": rps_ratio,
            "aiohttp_over_gateway_per_core": cpu_ratio,
            "prefer_aiohttp": rps_ratio >= CLIENT_DECISION_RATIO,
        }
    before_after: dict[str, Any] = {}
    base_sc = scen.get(BASELINE)
    if base_sc and base_sc.status == "ok" and scen["gateway"].status == "ok":
        a, b = scen["gateway"], base_sc
        before_after = {
            "rps": paired_ratio(a, b, tc, "rps"),
            "cpu_us": paired_ratio(a, b, tc, "cpu_us_per_req"),
            "p50_c1": paired_ratio(a, b, lc, "p50_us"),
            "p99_c1": paired_ratio(a, b, lc, "p99_us"),
            "pairs": min(len(a.runs.get(tc, [])), len(b.runs.get(tc, []))),
        }

    # Issue 18: what a request costs the gateway next to nginx (the machine) and the floor (the stack).
    def cpu_of(name: str) -> float | None:
        value = per_target.get(name, {}).get("cpu_us")
        return float(value) if value else None

    cost: dict[str, dict[str, float | None]] = {}
    for name in (
        "gateway",
        "gateway-logged",
        "gateway-json",
        "gateway-caller",
        "gateway-aad",
        "gateway-emulator",
        BASELINE,
    ):
        cpu = cpu_of(name)
        if cpu is None:
            continue
        nginx_cpu, floor_cpu, caddy_cpu = cpu_of("nginx"), cpu_of("floor"), cpu_of("caddy")
        cost[name] = {
            "cpu_us": cpu,
            "x_nginx": cpu / nginx_cpu if nginx_cpu else None,
            "x_floor": cpu / floor_cpu if floor_cpu else None,
            # per-core req/s of the gateway / Caddy's = Caddy's CPU per request / the gateway's
            "per_core_x_caddy": caddy_cpu / cpu if caddy_cpu else None,
        }
    # Issue 16: a cached Entra ID caller against the key route, CPU per request; the two are measured back
    # to back in every repeat, so the median of the per-repeat ratios cancels slow drifts of the machine.
    entra_caller: dict[str, Any] = {}
    caller_sc = scen.get("gateway-caller")
    if caller_sc and caller_sc.status == "ok" and scen["gateway"].status == "ok":
        a, b = caller_sc, scen["gateway"]
        entra_caller = {
            "cpu_ratio": paired_ratio(a, b, tc, "cpu_us_per_req"),
            "pairs": min(len(a.runs.get(tc, [])), len(b.runs.get(tc, []))),
            "caller_cpu_us": cpu_of("gateway-caller"),
            "key_cpu_us": cpu_of("gateway"),
        }
    return {
        "throughput_c": tc,
        "latency_c": lc,
        "per_target": per_target,
        "cost": cost,
        "entra_caller": entra_caller,
        "ratios": ratios,
        "client_decision": decision,
        "before_after": before_after,
    }


def targets(derived: dict[str, Any], soak: dict[str, Any]) -> list[tuple[str, str, str]]:
    tc, lc = derived["throughput_c"], derived["latency_c"]
    ratios = derived["ratios"]
    out: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("**pass**" if ok else "**MISS**")

    def at_least(label: str, value: float | None, need: float, digits: int = 2) -> None:
        shown = "-" if value is None else f"{value:.{digits}f}x"
        out.append((label, shown, verdict(None if value is None else value >= need)))

    at_least(f"gateway c={tc} >= 0.25 x nginx (req/s, one core each)", ratios["gateway / nginx"], 0.25)
    at_least(f"gateway c={tc} >= 10 x naive (req/s)", ratios["gateway / naive"], 10.0)
    cost = derived["cost"].get("gateway", {})
    floor_x = cost.get("x_floor")
    out.append(
        (
            f"gateway CPU per request <= {FLOOR_MAX_RATIO:g} x the floor's (c={tc})",
            "-" if floor_x is None else f"{floor_x:.2f}x",
            verdict(None if floor_x is None else floor_x <= FLOOR_MAX_RATIO),
        )
    )
    at_least(
        f"gateway per-core req/s >= {CADDY_MIN_RATIO:g} x Caddy's (from CPU per request, c={tc})",
        cost.get("per_core_x_caddy"),
        CADDY_MIN_RATIO,
    )
    gw = derived["per_target"].get("gateway", {})
    for key, limit in (("added_p50_ms", 1.0), ("added_p99_ms", ADDED_P99_MAX_MS)):
        value = gw.get(key)
        out.append(
            (
                f"added latency c={lc} {key[6:9]} <= {limit:g} ms over direct",
                "-" if value is None else f"{value:+.3f} ms",
                verdict(None if value is None else value <= limit),
            )
        )
    at_least(f"aad route within 5% of key route (c={tc} req/s)", ratios["gateway-aad / gateway"], 0.95, 3)
    caller = derived["entra_caller"]
    caller_x = caller.get("cpu_ratio")
    out.append(
        (
            f"cached Entra caller CPU per request <= {CALLER_MAX_RATIO:.2f} x the key route's (issue 16)",
            "-"
            if caller_x is None
            else f"{caller_x:.3f}x (c={tc}, median of {caller['pairs']} back-to-back pair(s))",
            verdict(None if caller_x is None else caller_x <= CALLER_MAX_RATIO),
        )
    )
    decision = derived["client_decision"]
    if decision:
        out.append(
            (
                f"own client: the aiohttp upper bound stays below {CLIENT_DECISION_RATIO:.2f} x the "
                f"gateway (c={tc} req/s, one core each)",
                f"{decision['aiohttp_over_gateway_rps']:.2f}x",
                verdict(not decision["prefer_aiohttp"]),
            )
        )
    before_after = derived["before_after"]
    if before_after.get("rps") is not None:
        at_least(
            f"this build >= {1 - BASELINE_MAX_COST:.2f} x the baseline (c={tc} req/s, paired A/B)",
            before_after["rps"],
            1 - BASELINE_MAX_COST,
            3,
        )
    growth = soak.get("growth_pct")
    served = soak.get("requests_between")
    if growth is None:
        out.append(("RSS growth < 10% (issue: over 1,000,000 requests)", "-", "-"))
    else:
        out.append(
            (
                f"RSS growth < 10% (measured over {served:,} requests; issue: 1,000,000)",
                f"{growth:+.1f}%",
                verdict(growth < 10.0),
            )
        )
    return out


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def signed(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:+.{digits}f}"


def write_markdown(
    path: Path,
    args: argparse.Namespace,
    scen: dict[str, Scenario],
    derived: dict[str, Any],
    soak: dict[str, Any],
    machine: dict[str, str],
    elapsed_s: float,
    started: str,
    png_note: str,
) -> None:
    tc, lc = derived["throughput_c"], derived["latency_c"]
    out: list[str] = ["# scoring-gateway benchmark", ""]
    out.append(f"Command: `{args.command_line}`  ")
    out.append(f"Started {started}, took {elapsed_s:.0f} s.  ")
    out.append(f"Pinning: {args.pinning}.  ")
    foreign = args.foreign_cpu_pct
    if foreign is not None:
        out.append(
            f"Load average at start {args.loadavg_start}; processes not started by the bench used "
            f"~{foreign:.0f}% of all cores' time during the run, ~{args.foreign_core_pct:.0f}% of one core "
            f"(a reference run needs <= {BUSY_LIMIT_CORE_PCT:g}%).  "
        )
        if args.busy:
            out.append(
                "**The machine was busy with other work: these numbers are disturbed. "
                + (
                    "Written as latest.md only because of --allow-busy (a smoke run): do not quote them.**"
                    if args.allow_busy
                    else "Not written as latest.md; rerun on a quiet machine.**"
                )
                + "  "
            )
    out.append(
        f"wrk {args.threads} thread(s), {args.duration} s per run, {args.repeat} run(s) per cell "
        f"(medians; errors and requests summed over runs), {args.warmup} s warm-up per scenario at "
        f"c={THROUGHPUT_C}, keep-alive, loopback. Payload: `" + PAYLOAD.decode() + "`. Cells are measured "
        "interleaved (for each repeat, for each concurrency, every scenario back to back)."
    )
    out.append("")
    out.append("## Per core")
    out.append("")
    out.append(
        f"req/s at c={tc}; CPU time of the proxy's whole process tree (utime + stime from "
        f"/proc/<pid>/stat, before and after each run) per request at c={tc}; per-core capacity = "
        f"1,000,000 / CPU µs per request; latency added over `direct` at c={lc} (median p50 / p99). For "
        "`direct` the CPU is the upstream nginx's own, on the load core."
    )
    out.append("")
    rows = []
    for name in args.scenario_list:
        sc, row = scen[name], derived["per_target"].get(name, {})
        if sc.status != "ok":
            rows.append(
                [
                    name,
                    sc.status,
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    sc.reason.replace("|", "/").replace("\n", " ")[:300],
                ]
            )
            continue
        rows.append(
            [
                name,
                fmt(row.get("rps"), 0),
                fmt(row.get("cpu_us"), 1),
                fmt(row.get("per_core_rps"), 0),
                signed(row.get("added_p50_ms")),
                signed(row.get("added_p99_ms")),
                f"{row.get('errors', 0):,}",
                f"core {sc.pinned_to}; upstream saw auth: {sc.auth_seen}",
            ]
        )
    out.append(
        md_table(
            [
                "target",
                f"req/s c={tc}",
                "CPU µs/req",
                "per-core req/s",
                f"added p50 ms c={lc}",
                f"added p99 ms c={lc}",
                "errors",
                "notes",
            ],
            rows,
        )
    )
    out.append("")
    out.append("## Gateway cost (issue 18)")
    out.append("")
    out.append(
        f"CPU µs per request at c={tc} of each gateway route, with the inbound limits at their defaults, as "
        "a multiple of nginx's (what the machine can do) and of the floor's (what uvloop + httptools can "
        "do: bench/floor_proxy.py); per-core req/s as a multiple of Caddy's."
    )
    out.append("")
    crow = [
        [
            name,
            fmt(c["cpu_us"], 1),
            "-" if c["x_nginx"] is None else f"{c['x_nginx']:.2f}x",
            "-" if c["x_floor"] is None else f"{c['x_floor']:.2f}x",
            "-" if c["per_core_x_caddy"] is None else f"{c['per_core_x_caddy']:.2f}x",
        ]
        for name, c in derived["cost"].items()
    ]
    out.append(
        md_table(["route", "CPU µs/req", "x nginx", "x floor", "per-core req/s x Caddy"], crow)
        if crow
        else "no gateway measured"
    )
    out.append("")
    caller = derived["entra_caller"]
    if caller.get("cpu_ratio") is not None:
        out.append(
            f"Cached Entra ID caller (issue 16): `gateway-caller` / `gateway` CPU µs per request at c={tc}, "
            f"median of {caller['pairs']} back-to-back pair(s): **{caller['cpu_ratio']:.3f}x** "
            f"({fmt(caller['caller_cpu_us'], 1)} vs {fmt(caller['key_cpu_us'], 1)} µs, medians); the issue "
            f"allows {CALLER_MAX_RATIO:.2f}x."
        )
        out.append("")
    decision = derived["client_decision"]
    out.append("## Client decision (issue 9)")
    out.append("")
    if decision:
        verdict = (
            "**prefer aiohttp**: the aiohttp forwarder comes within 15% of the gateway per core (if an "
            "aiohttp-based client also passes the conformance suite)"
            if decision["prefer_aiohttp"]
            else "**keep the own client**: the gateway beats the tightest aiohttp forwarder per core by more "
            "than 15%"
        )
        out.append(
            f"`aiohttp` / `gateway` at c={tc}, one core each: {decision['aiohttp_over_gateway_rps']:.2f}x "
            f"req/s, {fmt(decision['aiohttp_over_gateway_per_core'])}x per-core capacity (from CPU µs per "
            f"request). Threshold {CLIENT_DECISION_RATIO:.2f}x. Verdict: {verdict}. The aiohttp forwarder "
            "does less than the gateway (no routing, config, metrics, retry policy or per-phase timeouts), "
            "so it is an upper bound for an aiohttp-based gateway."
        )
    else:
        out.append("not measured (needs both `gateway` and `aiohttp`)")
    out.append("")
    before_after = derived["before_after"]
    if args.baseline is not None:
        out.append(f"## Before / after (this checkout vs `--baseline {args.baseline}`)")
        out.append("")
        if before_after:
            out.append(
                f"Median over {before_after['pairs']} back-to-back pairs (A B A B) of this build / baseline: "
                f"req/s at c={tc} {fmt(before_after['rps'], 3)}x; CPU µs per request "
                f"{fmt(before_after['cpu_us'], 3)}x (lower is better); at c={lc} p50 "
                f"{fmt(before_after['p50_c1'], 3)}x, p99 {fmt(before_after['p99_c1'], 3)}x. Issue 9 may cost "
                f"at most {BASELINE_MAX_COST:.0%} of the gateway's figure: req/s ratio >= "
                f"{1 - BASELINE_MAX_COST:.2f}."
            )
        else:
            out.append(f"not measured: {scen[BASELINE].reason or scen['gateway'].reason}")
        out.append("")
    out.append("## Results")
    out.append("")
    rows = []
    for name in args.scenario_list:
        sc = scen[name]
        if sc.status != "ok":
            rows.append(
                [
                    name,
                    "-",
                    sc.status,
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    sc.reason.replace("|", "/").replace("\n", " ")[:300],
                ]
            )
            continue
        for c in args.concurrency_list:
            sm = summarize(sc, c)
            if sm is None:
                rows.append([name, str(c), "-", "-", "-", "-", "-", "-", "-", "not measured"])
                continue
            spread = f"req/s range {sm['rps_min']:,.0f}-{sm['rps_max']:,.0f}" if sm["runs"] > 1 else ""
            rows.append(
                [
                    name,
                    str(c),
                    fmt(sm["rps"], 0),
                    fmt(sm["cpu_us"], 1),
                    fmt(sm["p50_ms"], 3),
                    fmt(sm["p90_ms"], 3),
                    fmt(sm["p99_ms"], 3),
                    f"{sm['errors']:,}",
                    f"{sm['requests']:,}",
                    spread,
                ]
            )
    out.append(
        md_table(
            [
                "scenario",
                "c",
                "req/s",
                "CPU µs/req",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "errors",
                "requests",
                "notes",
            ],
            rows,
        )
    )
    out.append("")
    out.append(
        "Errors = socket errors (connect/read/write/timeout) + HTTP responses >= 400 as counted by wrk."
    )
    out.append("")
    out.append(f"## Ratios (req/s at c={tc})")
    out.append("")
    out.append(md_table(["ratio", "value"], [[k, fmt(v, 3)] for k, v in derived["ratios"].items()]))
    out.append("")
    out.append("## Gateway memory (RSS of the process tree, from /proc)")
    out.append("")
    mrows = []
    for name in args.scenario_list:
        sc = scen[name]
        if not name.startswith("gateway") or sc.status != "ok":
            continue
        for label, key in (
            ("after warm-up", "after_warmup"),
            ("after measurements", "after_measure"),
            ("after soak", "after_soak"),
        ):
            m = sc.memory.get(key)
            if m:
                mrows.append(
                    [
                        name,
                        label,
                        str(m["processes"]),
                        f"{m['rss_kib'] / 1024:.1f}",
                        f"{m['pss_kib'] / 1024:.1f}",
                        f"{m['served']:,}",
                    ]
                )
    out.append(
        md_table(["scenario", "when", "processes", "RSS MiB", "PSS MiB", "requests served so far"], mrows)
        if mrows
        else "no gateway measured"
    )
    out.append("")
    if soak:
        out.append(
            f"Soak: {soak.get('requests', 0):,} requests at c={soak.get('concurrency')} "
            f"through `gateway` in {soak.get('seconds', 0):.0f} s "
            f"({soak.get('rps', 0):,.0f} req/s, {soak.get('errors', 0):,} errors"
            + ("; stopped by the time cap" if soak.get("capped") else "")
            + f"). RSS growth after warm-up -> after soak: {fmt(soak.get('growth_pct'), 1)}% over "
            f"{soak.get('requests_between', 0):,} requests; "
            f"during the soak alone: {fmt(soak.get('soak_growth_pct'), 1)}%."
        )
        out.append("")
    out.append("## Targets")
    out.append("")
    out.append(md_table(["target", "measured", "result"], [list(t) for t in targets(derived, soak)]))
    out.append("")
    out.append("## Scenarios")
    out.append("")
    for name in args.scenario_list:
        out.append(f"- `{name}`: {DESCRIPTIONS[name]}")
    out.append("")
    out.append("## Machine")
    out.append("")
    out.append(md_table(["", ""], [[k, v] for k, v in machine.items()]))
    out.append("")
    out.append(f"Chart: `latest.png` {png_note}")
    out.append("")
    path.write_text("\n".join(out))


def write_chart(path: Path, scen: dict[str, Scenario], order: list[str], use_mpl: bool) -> str:
    """Two panels, one bar per target: req/s at c=32 and CPU µs per request (both one core each)."""
    names = [n for n in order if scen[n].status == "ok" and n != "direct"]
    concurrencies = sorted({c for n in names for c in scen[n].runs})
    tc = throughput_c(concurrencies) if concurrencies else THROUGHPUT_C
    data = {n: summarize(scen[n], tc) for n in names}
    panels = (
        ("rps", f"requests/s at c={tc}, one core (higher is better)"),
        ("cpu_us", "CPU µs per request (lower is better)"),
    )
    if use_mpl:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for ax, (key, title) in zip(axes, panels, strict=True):
            values = [(data[n] or {}).get(key) or 0.0 for n in names]
            values = [0.0 if math.isnan(v) else v for v in values]
            colors = ["tab:red" if n.startswith("gateway") else "tab:gray" for n in names]
            ax.bar(range(len(names)), values, color=colors)
            for x, v in enumerate(values):
                ax.annotate(
                    f"{v:,.0f}" if key == "rps" else f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=8
                )
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
            if any(v > 0 for v in values):
                # Log scale: the naive proxy is two orders of magnitude off the others.
                ax.set_yscale("log")
                ax.set_ylim(top=max(values) * 3)
            ax.set_title(title + ", log scale")
            ax.grid(axis="y", which="both", alpha=0.3)
        fig.suptitle(f"scoring-gateway bench, per core ({_dt.datetime.now():%Y-%m-%d %H:%M})")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return "(matplotlib)."
    _plain_png(path, names, [key for key, _ in panels], data)
    return (
        "(matplotlib unavailable: plain bar chart without text; left half req/s, right half CPU µs per "
        "request, targets in table order)."
    )


def _plain_png(path: Path, names: list[str], keys: list[str], data: dict[str, Any]) -> None:
    """Minimal PNG writer (no dependencies) used only when matplotlib is not there."""
    w, h = 1200, 400
    px = bytearray(b"\xff" * (w * h * 3))

    def rect(x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int]) -> None:
        for y in range(max(0, y0), min(h, y1)):
            row = y * w * 3
            for x in range(max(0, x0), min(w, x1)):
                px[row + 3 * x : row + 3 * x + 3] = bytes(rgb)

    for panel, key in enumerate(keys):
        vals = [(data[n] or {}).get(key) or 0.0 for n in names]
        vals = [0.0 if math.isnan(v) else v for v in vals]
        top = max(vals, default=0.0)
        x_base = panel * (w // 2) + 20
        slot = (w // 2 - 40) / max(1, len(names))
        rect(x_base, h - 21, x_base + w // 2 - 40, h - 20, (0, 0, 0))
        for j, (n, v) in enumerate(zip(names, vals, strict=True)):
            if top <= 0 or v <= 0:
                continue
            x0 = int(x_base + j * slot)
            hgt = int(v / top * (h - 40))
            rgb = (200, 40, 40) if n.startswith("gateway") else (120, 120, 120)
            rect(x0, h - 20 - hgt, x0 + int(slot * 0.8), h - 20, rgb)
    raw = b"".join(b"\x00" + bytes(px[y * w * 3 : (y + 1) * w * 3]) for y in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
        )

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    path.write_bytes(png)


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test settings: 1 s runs, 1 repeat, short soak; installs nothing but wrk and nginx "
        "(peers that are missing are skipped)",
    )
    p.add_argument("--duration", type=int, help="seconds per wrk run (integer; default 5, quick 1)")
    p.add_argument(
        "--repeat", type=int, help="runs per scenario and concurrency, medians reported (default 3, quick 1)"
    )
    p.add_argument("--warmup", type=int, help="seconds of warm-up load per scenario (default 2, quick 0)")
    p.add_argument(
        "--concurrency",
        help=f"comma-separated connection counts (default {LATENCY_C},{THROUGHPUT_C}: latency, throughput)",
    )
    p.add_argument(
        "--scenarios",
        help="comma-separated subset of: "
        + ", ".join(s for s in ALL_SCENARIOS if s != BASELINE)
        + " (default all; quick: "
        + ", ".join(QUICK_SCENARIOS)
        + ")",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of the gateway, measured as `gateway-baseline` next to this one "
        "(same interpreter, that checkout on PYTHONPATH), alternating A B A B",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="wrk threads (default 1: wrk and the upstream share one core)"
    )
    p.add_argument(
        "--proxy-cpu",
        type=int,
        help="the core the proxy under test is pinned to (default: the last usable one)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin anything to cores")
    p.add_argument(
        "--soak-requests",
        type=int,
        help="requests through `gateway` for the memory-growth check (default 200000, quick 2000, 0 = off)",
    )
    p.add_argument("--soak-concurrency", type=int, default=32)
    p.add_argument("--soak-max-seconds", type=int, default=240, help="time cap for the soak (default 240)")
    p.add_argument(
        "--out", type=Path, default=BENCH_DIR / "results", help="output directory (default bench/results)"
    )
    p.add_argument("--no-install", action="store_true", help="do not apt-get/pip install anything missing")
    p.add_argument(
        "--allow-busy",
        action="store_true",
        help=f"write latest.md even when other processes used more than {BUSY_LIMIT_CORE_PCT:g}%% of a core "
        "(a smoke run; the report says so). Without it such a run writes disturbed.md and exits "
        f"{EXIT_BUSY}",
    )
    args = p.parse_args(argv)
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for key, val in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    args.install_peers = not (args.no_install or args.quick)
    if args.duration < 1 or args.repeat < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--duration/--repeat/--threads must be >= 1 and --warmup >= 0 (wrk takes whole seconds)")
    try:
        args.concurrency_list = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    except ValueError:
        p.error("--concurrency must be comma-separated integers")
    if not args.concurrency_list or min(args.concurrency_list) < 1:
        p.error("--concurrency needs positive integers")
    if args.scenarios is None:
        wanted = QUICK_SCENARIOS if args.quick else [s for s in ALL_SCENARIOS if s != BASELINE]
    else:
        wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in ALL_SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {ALL_SCENARIOS}")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "gateway" / "cli.py").is_file():
            p.error(f"--baseline {args.baseline} is not a checkout of the gateway (no gateway/cli.py)")
        wanted = [*wanted, "gateway", BASELINE]
    elif BASELINE in wanted:
        p.error(f"{BASELINE} needs --baseline DIR")
    args.scenario_list = [s for s in ALL_SCENARIOS if s in wanted]
    args.command_line = "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.command_line = args.command_line.strip()
    return args


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def setup_scenarios(
    args: argparse.Namespace,
    tools: dict[str, str],
    procs: ProcessSet,
    workdir: Path,
    scen: dict[str, Scenario],
    pinning: Pinning,
) -> None:
    nginx = tools["nginx"]
    proxy_cpus = pinning.proxy_cpus or None
    direct = scen["direct"]
    direct.port = free_port()
    # The upstream inherits the bench's own affinity: the load core(s).
    direct.proc = start_nginx(procs, nginx, workdir, "direct", direct_conf(workdir / "direct", direct.port))
    wait_until(lambda: check_score(direct.port)[0], 20.0, direct.proc, "direct nginx")
    direct_url = direct.url

    def setup(name: str, fn: Callable[[Scenario], None]) -> None:
        if name not in args.scenario_list:
            return
        sc = scen[name]
        sc.port = sc.port or free_port()
        t0 = time.monotonic()
        try:
            fn(sc)
            ok, detail = check_score(sc.port, sc.headers)
            if not ok:
                raise BenchError(f"sanity request failed: {detail}")
            # The emulator checks the key itself (401 otherwise) and sends no X-Bench-Auth header.
            sc.auth_seen = "key (emulator answered 200)" if name == "gateway-emulator" else detail
            assert sc.proc is not None
            sc.pids = process_tree(sc.proc.pid)
            sc.pinned_to = fmt_cpus(tree_affinity(sc.pids))
            if name != "direct" and pinning.active and sc.pinned_to != fmt_cpus(pinning.proxy_cpus):
                raise BenchError(f"{name} runs on cores {sc.pinned_to}, not {fmt_cpus(pinning.proxy_cpus)}")
            sc.status = "ok"
            log(
                f"{name} ready on port {sc.port} in {time.monotonic() - t0:.1f}s, {len(sc.pids)} "
                f"process(es) on core {sc.pinned_to} (upstream saw auth: {sc.auth_seen})"
            )
        except Exception as exc:  # one scenario that cannot start must not sink the others
            sc.status = "skipped" if name in OPTIONAL_SCENARIOS else "failed"
            sc.reason = str(exc).strip()
            if not isinstance(exc, BenchError):
                sc.reason = f"{type(exc).__name__}: {sc.reason}"
            log(f"{name} {sc.status}: {sc.reason}")
            if sc.proc is not None:
                sc.proc.stop()

    setup("direct", lambda sc: None)

    def nginx_proxy(sc: Scenario) -> None:
        conf = proxy_conf(workdir / "nginx", sc.port, direct.port)
        sc.proc = start_nginx(procs, nginx, workdir, "nginx", conf, proxy_cpus)
        wait_until(lambda: check_score(sc.port)[0], 20.0, sc.proc, "nginx proxy")

    setup("nginx", nginx_proxy)

    def haproxy(sc: Scenario) -> None:
        if not tools.get("haproxy"):
            raise BenchError(
                "haproxy is not installed" + ("" if args.install_peers else " (not installed here)")
            )
        sc.proc = start_haproxy(procs, tools["haproxy"], workdir, sc.port, direct.port, proxy_cpus)
        wait_until(lambda: check_score(sc.port)[0], 20.0, sc.proc, "haproxy")

    setup("haproxy", haproxy)

    def caddy(sc: Scenario) -> None:
        if not tools.get("caddy"):
            raise BenchError(
                "caddy is not installed" + ("" if args.install_peers else " (not installed here)")
            )
        sc.proc = start_caddy(procs, tools["caddy"], workdir, sc.port, direct.port, proxy_cpus)
        wait_until(lambda: check_score(sc.port)[0], 30.0, sc.proc, "caddy")

    setup("caddy", caddy)

    def naive(sc: Scenario) -> None:
        env = dict(os.environ, NAIVE_UPSTREAM_URL=direct_url, NAIVE_API_KEY=STATIC_KEY)
        cmd = [
            sys.executable, "-m", "uvicorn", "naive_proxy:app", "--app-dir", str(BENCH_DIR),
            "--host", "127.0.0.1", "--port", str(sc.port), "--workers", "1", "--log-level", "warning",
        ]  # fmt: skip
        sc.proc = procs.start("naive", cmd, workdir / "naive.log", env=env, cpus=proxy_cpus)
        wait_until(lambda: http_request(sc.port, "GET", "/healthz")[0] == 200, 30.0, sc.proc, "naive proxy")

    setup("naive", naive)

    def aiohttp_forwarder(sc: Scenario) -> None:
        if not tools.get("aiohttp"):
            raise BenchError("aiohttp is not importable by this interpreter")
        env = dict(
            os.environ, AIOHTTP_UPSTREAM_URL=direct_url, AIOHTTP_API_KEY=STATIC_KEY, AIOHTTP_PORT=str(sc.port)
        )
        cmd = [sys.executable, str(BENCH_DIR / "aiohttp_proxy.py")]
        sc.proc = procs.start("aiohttp", cmd, workdir / "aiohttp.log", env=env, cpus=proxy_cpus)
        wait_until(lambda: http_request(sc.port, "GET", "/healthz")[0] == 200, 30.0, sc.proc, "aiohttp proxy")

    setup("aiohttp", aiohttp_forwarder)

    def floor(sc: Scenario) -> None:
        env = dict(
            os.environ,
            FLOOR_UPSTREAM_URL=direct_url,
            FLOOR_PREFIX="/score",
            FLOOR_API_KEY=STATIC_KEY,
            FLOOR_PORT=str(sc.port),
        )
        cmd = [sys.executable, str(BENCH_DIR / "floor_proxy.py")]
        sc.proc = procs.start("floor", cmd, workdir / "floor.log", env=env, cpus=proxy_cpus)
        wait_until(lambda: http_request(sc.port, "GET", "/healthz")[0] == 200, 30.0, sc.proc, "floor proxy")

    setup("floor", floor)

    gw_wanted = [n for n in args.scenario_list if n.startswith("gateway")]
    if not gw_wanted:
        return
    roots = {name: (args.baseline if name == BASELINE else REPO_ROOT) for name in gw_wanted}
    for root in set(roots.values()):
        ok, why = gateway_available(root)
        if ok:
            continue
        for name in [n for n, r in roots.items() if r == root]:
            scen[name].status = "skipped" if name in OPTIONAL_SCENARIOS else "failed"
            scen[name].reason = f"gateway not available: {why}"
            log(f"{name} {scen[name].status}: {scen[name].reason}")
        gw_wanted = [n for n in gw_wanted if roots[n] != root]

    for name in ("gateway", BASELINE):
        if name in gw_wanted:
            setup(
                name,
                lambda sc, root=roots[name]: start_gateway(  # type: ignore[misc]
                    procs, workdir, sc, key_gateway_yaml(sc.port, direct_url), False, proxy_cpus, root
                ),
            )

    for name, log_format in (("gateway-logged", "text"), ("gateway-json", "json")):
        if name in gw_wanted:
            setup(
                name,
                lambda sc, log_format=log_format: start_gateway(  # type: ignore[misc]
                    procs,
                    workdir,
                    sc,
                    key_gateway_yaml(sc.port, direct_url, log_format),
                    False,
                    proxy_cpus,
                    log_level="info",
                ),
            )

    emulator: dict[str, Any] = {}
    emu_error = ""
    if {"gateway-caller", "gateway-aad", "gateway-emulator"} & set(gw_wanted):
        try:
            emulator = start_emulator(procs, workdir)
            log(f"emulator up: { ({k: v for k, v in emulator.items() if k != 'proc'}) }")
        except (BenchError, OSError, ValueError) as exc:
            emu_error = f"emulator unavailable: {exc}"
            log(emu_error)

    def entra_caller(sc: Scenario) -> None:
        if emu_error:
            raise BenchError(emu_error)
        token = entra_caller_token(
            emulator,
            tenant_id=AAD_TENANT,
            client_id=AAD_CLIENT,
            client_secret=AAD_SECRET,
            api_uri=CALLER_API_URI,
            api_client_id=CALLER_API_APP,
            role=CALLER_ROLE,
        )
        # Every request, the sanity check's (the first: it validates the token and caches it) included.
        sc.headers = {"Authorization": f"Bearer {token}"}
        yaml_text = key_gateway_yaml(sc.port, direct_url) + entra_inbound_yaml(
            emulator, AAD_TENANT, [CALLER_API_URI, CALLER_API_APP]
        )
        start_gateway(procs, workdir, sc, yaml_text, True, proxy_cpus)

    if "gateway-caller" in gw_wanted:
        setup("gateway-caller", entra_caller)

    def aad(sc: Scenario) -> None:
        if emu_error:
            raise BenchError(emu_error)
        yaml_text = aad_gateway_yaml(sc.port, direct_url, emulator["https_url"], emulator["ca_file"])
        start_gateway(procs, workdir, sc, yaml_text, True, proxy_cpus)

    if "gateway-aad" in gw_wanted:
        setup("gateway-aad", aad)

    def emu_route(sc: Scenario) -> None:
        if emu_error:
            raise BenchError(emu_error)
        url = emulator["http_url"].rstrip("/") + "/score"
        start_gateway(procs, workdir, sc, key_gateway_yaml(sc.port, url), True, proxy_cpus)

    if "gateway-emulator" in gw_wanted:
        setup("gateway-emulator", emu_route)


def run_soak(args: argparse.Namespace, tools: dict[str, str], sc: Scenario) -> dict[str, Any]:
    """Send ~N requests through the gateway in time-bounded wrk chunks (wrk cannot stop at a count)."""
    assert sc.proc is not None
    target, conc = args.soak_requests, args.soak_concurrency
    sent, errors, t0 = 0, 0, time.monotonic()
    rps_guess = max(1.0, (summarize(sc, throughput_c(args.concurrency_list)) or {"rps": 1000.0})["rps"])
    capped = False
    log(f"soak: {target:,} requests at c={conc} through {sc.name} (cap {args.soak_max_seconds}s)")
    while sent < target:
        left_s = args.soak_max_seconds - (time.monotonic() - t0)
        if left_s < 1:
            capped = True
            break
        chunk = int(min(15, left_s, max(1, math.ceil((target - sent) / rps_guess))))
        res = run_wrk(tools["wrk"], sc.url, conc, chunk, args.threads)
        sent += res["requests"]
        errors += res["errors"]
        rps_guess = max(1.0, res["rps"])
        if not sc.proc.alive():
            raise BenchError(f"{sc.name} died during the soak: {sc.proc.log_tail()}")
    secs = time.monotonic() - t0
    return {"requests": sent, "errors": errors, "seconds": secs, "rps": sent / secs if secs else 0.0,
            "concurrency": conc, "capped": capped}  # fmt: skip


def measure(args: argparse.Namespace, tools: dict[str, str], active: list[Scenario]) -> None:
    """Warm up every scenario, then for each repeat, for each concurrency, run every scenario back to
    back (the gateway and its baseline next to each other: A B A B), so slow drifts of the machine hit
    them alike."""
    if args.warmup > 0:
        for sc in active:
            res = run_wrk(tools["wrk"], sc.url, THROUGHPUT_C, args.warmup, args.threads, headers=sc.headers)
            sc.requests_served += res["requests"]
            log(f"warm-up {sc.name}: {res['rps']:,.0f} req/s, {res['errors']} errors")
    for sc in active:
        if sc.name.startswith("gateway") and sc.proc:
            sc.memory["after_warmup"] = tree_memory(sc.proc.pid) | {"served": sc.requests_served}

    for rep in range(args.repeat):
        for c in args.concurrency_list:
            for sc in active:
                if sc.proc is not None and not sc.proc.alive():
                    if sc.status == "ok":
                        sc.status = "failed"
                        sc.reason = f"process died during the run: {sc.proc.log_tail()}"
                        log(f"{sc.name}: {sc.reason}")
                    continue
                res = run_wrk(
                    tools["wrk"], sc.url, c, args.duration, args.threads, cpu_pids=sc.pids, headers=sc.headers
                )
                res["repeat"] = rep
                sc.runs.setdefault(c, []).append(res)
                sc.requests_served += res["requests"]
                cpu = res["cpu_us_per_req"]
                log(
                    f"rep {rep + 1}/{args.repeat} c={c:<4} {sc.name:<17} {res['rps']:>9,.0f} req/s  "
                    f"cpu {'-' if cpu is None else f'{cpu:6.1f}'} us/req  "
                    f"p50 {res['p50_us'] / 1000:7.3f} ms  p99 {res['p99_us'] / 1000:7.3f} ms  "
                    f"errors {res['errors']}"
                )
    for sc in active:
        if sc.status == "ok" and sc.name.startswith("gateway") and sc.proc:
            sc.memory["after_measure"] = tree_memory(sc.proc.pid) | {"served": sc.requests_served}


def soak_gateway(args: argparse.Namespace, tools: dict[str, str], gw: Scenario) -> dict[str, Any]:
    soak = run_soak(args, tools, gw)
    gw.requests_served += soak["requests"]
    assert gw.proc is not None
    time.sleep(0.5)
    gw.memory["after_soak"] = tree_memory(gw.proc.pid) | {"served": gw.requests_served}
    base = gw.memory["after_warmup"]["rss_kib"]
    before = gw.memory["after_measure"]["rss_kib"]
    after = gw.memory["after_soak"]["rss_kib"]
    soak["growth_pct"] = (after - base) / base * 100 if base else None
    soak["soak_growth_pct"] = (after - before) / before * 100 if before else None
    soak["requests_between"] = gw.memory["after_soak"]["served"] - gw.memory["after_warmup"]["served"]
    log(f"soak done: {soak['requests']:,} requests, RSS {base} -> {after} KiB ({soak['growth_pct']:+.1f}%)")
    return soak


PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    # Everything here talks to loopback directly: an egress proxy from the environment (honoured by
    # httpx, and by the gateway since issue 9) would put that proxy into the measurement.
    for name in PROXY_ENV:
        os.environ.pop(name, None)
        os.environ.pop(name.upper(), None)
    pinning = choose_pinning(not args.no_pin, args.proxy_cpu)
    if pinning.active:
        # wrk, the upstream nginx, the emulator and this script inherit this: the load core(s).
        os.sched_setaffinity(0, pinning.load_cpus)
    log(f"pinning: {pinning.describe()}")
    cpu = CpuMeter()
    cpu.start()
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    signal.signal(signal.SIGTERM, _raise_exit)
    tools = ensure_tools(install=not args.no_install)
    peers = [name for name in PEER_PACKAGES if name in args.scenario_list]
    tools |= ensure_peers(peers, install=args.install_peers)
    if "aiohttp" in args.scenario_list:
        tools["aiohttp"] = "yes" if ensure_python_package("aiohttp", install=args.install_peers) else ""
    use_mpl = ensure_python_package("matplotlib", install=not args.no_install and not args.quick)

    est = len(args.scenario_list) * (len(args.concurrency_list) * args.repeat * args.duration + args.warmup)
    log(f"scenarios: {', '.join(args.scenario_list)}; concurrency {args.concurrency_list}; "
        f"~{est}s of load + soak (<= {args.soak_max_seconds}s) + start-up")  # fmt: skip

    out_dir: Path = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = out_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    scen = {name: Scenario(name) for name in ALL_SCENARIOS}
    soak: dict[str, Any] = {}
    procs = ProcessSet()
    workdir = Path(tempfile.mkdtemp(prefix="scoring-bench-"))
    try:
        setup_scenarios(args, tools, procs, workdir, scen, pinning)
        measure(args, tools, [scen[n] for n in args.scenario_list if scen[n].status == "ok"])
        gw = scen["gateway"]
        if args.soak_requests > 0 and gw.status == "ok" and gw.proc is not None:
            soak = soak_gateway(args, tools, gw)
    finally:
        # Don't let a second Ctrl-C / SIGTERM interrupt the clean-up itself.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            procs.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        with contextlib.suppress(OSError):
            run_dir.mkdir(parents=True, exist_ok=True)
            for f in [
                *workdir.glob("*.log"),
                *workdir.glob("*.yaml"),
                *workdir.glob("*.cfg"),
                *workdir.glob("*/error.log"),
                *workdir.glob("*/Caddyfile"),
            ]:
                dest = run_dir / (f.parent.name + "-" + f.name if f.parent != workdir else f.name)
                shutil.copy2(f, dest)
            for f in workdir.glob("*/nginx.conf"):
                shutil.copy2(f, run_dir / f"{f.parent.name}-nginx.conf")
        shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.monotonic() - t_start
    foreign = cpu.foreign()
    args.foreign_cpu_pct, args.foreign_core_pct = foreign if foreign is not None else (None, None)
    args.busy = busy_machine(args.foreign_core_pct)
    args.loadavg_start = cpu.loadavg
    args.pinning = pinning.describe()
    # A run on a busy machine never replaces the reference figures unless the caller says so.
    stem = report_stem(args.busy, args.allow_busy)
    if args.busy:
        log(
            f"WARNING: other processes used ~{args.foreign_core_pct:.0f}% of one core during the run "
            f"(limit {BUSY_LIMIT_CORE_PCT:g}%): the numbers are disturbed; "
            + (
                "writing latest.md anyway because of --allow-busy (smoke run)"
                if args.allow_busy
                else f"NOT writing latest.md: the report goes to {stem}.md; rerun on a quiet machine"
            )
        )
    derived = derive(scen, args)
    machine = machine_info(tools)
    png_note = write_chart(out_dir / f"{stem}.png", scen, args.scenario_list, use_mpl)
    write_markdown(out_dir / f"{stem}.md", args, scen, derived, soak, machine, elapsed, started, png_note)
    raw = {
        "command": args.command_line,
        "started": started,
        "elapsed_s": elapsed,
        "machine": machine,
        "pinning": args.pinning,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "baseline")}
        | {"out": str(out_dir), "baseline": str(args.baseline) if args.baseline else None},
        "scenarios": {
            n: {
                "status": scen[n].status,
                "port": scen[n].port,
                "reason": scen[n].reason,
                "auth_seen": scen[n].auth_seen,
                "pinned_to": scen[n].pinned_to,
                "summary": {c: summarize(scen[n], c) for c in args.concurrency_list},
                "runs": scen[n].runs,
                "memory": scen[n].memory,
            }
            for n in args.scenario_list
        },
        "derived": derived,
        "soak": soak,
        "logs": str(run_dir),
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(raw, indent=2, default=str))
    log(f"wrote {out_dir / f'{stem}.md'} and {out_dir / f'{stem}.png'} in {elapsed:.0f}s (logs: {run_dir})")
    failed = [n for n in args.scenario_list if scen[n].status == "failed"]
    if failed:
        log(f"failed scenarios: {', '.join(failed)}")
        return 2
    return EXIT_BUSY if stem == "disturbed" else 0


if __name__ == "__main__":
    sys.exit(main())
