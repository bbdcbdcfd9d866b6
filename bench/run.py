#!/usr/bin/env python3
"""scoring-gateway benchmark: one command, loopback only.

    python bench/run.py [--quick] [--duration S] [--repeat N] [--scenarios a,b] [--out DIR]

Starts nginx upstreams/proxies, the naive Starlette+httpx proxy and the gateway, drives each with
wrk (POST of a small scoring payload) at several concurrencies, and writes
``<out>/latest.md`` (tables, targets, machine) and ``<out>/latest.png`` (chart), plus
``<out>/latest.json`` (raw numbers) and server logs under ``<out>/run-<timestamp>/``.
See bench/README.md for what each scenario means.
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

ALL_SCENARIOS = [
    "direct",
    "nginx",
    "naive",
    "gateway-key-1w",
    "gateway-key-2w",
    "gateway-aad",
    "gateway-emulator",
]
# Scenarios that depend on pieces still being written elsewhere: unavailable -> "skipped", not "failed".
OPTIONAL_SCENARIOS = {"gateway-aad", "gateway-emulator"}
DESCRIPTIONS = {
    "direct": "nginx (1 worker) answering POST /score with a fixed body: the upstream alone",
    "nginx": "nginx (1 worker) reverse proxy to `direct`, injects the key, keep-alive upstream pool",
    "naive": "Starlette + httpx.AsyncClient forwarder under uvicorn (1 worker), injects the key",
    "gateway-key-1w": "`gateway serve --workers 1`, key auth route to `direct`",
    "gateway-key-2w": "`gateway serve --workers 2`, key auth route to `direct`",
    "gateway-aad": "`gateway serve --workers 1`, aad_token route (tokens from the emulator) to `direct`",
    "gateway-emulator": "`gateway serve --workers 1`, key route to the emulator's scoring endpoint",
}

QUICK_DEFAULTS = {"duration": 1, "repeat": 1, "warmup": 1, "soak_requests": 10_000}
FULL_DEFAULTS = {"duration": 5, "repeat": 3, "warmup": 2, "soak_requests": 200_000}


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


def ensure_tools(install: bool = True) -> dict[str, str]:
    """Return paths of wrk and nginx, installing them with apt-get when missing."""
    missing = [t for t in ("wrk", "nginx") if find_tool(t) is None]
    if missing and install:
        prefix: list[str] = []
        if os.geteuid() != 0:
            if shutil.which("sudo") is None:
                raise ToolsUnavailable(f"{', '.join(missing)} missing, not root and no sudo to install them")
            prefix = ["sudo", "-n"]
        if shutil.which("apt-get") is None:
            raise ToolsUnavailable(f"{', '.join(missing)} missing and apt-get is not available")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        log(f"installing {' '.join(missing)} with apt-get")
        steps = [
            [*prefix, "apt-get", "update", "-q"],
            [*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx", "wrk"],
        ]
        for cmd in steps:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
            if res.returncode != 0:
                tail = (res.stdout + res.stderr).strip().splitlines()[-5:]
                raise ToolsUnavailable(f"`{' '.join(cmd)}` failed: {' | '.join(tail)}")
        missing = [t for t in ("wrk", "nginx") if find_tool(t) is None]
    if missing:
        raise ToolsUnavailable(f"{', '.join(missing)} not found")
    return {"wrk": str(find_tool("wrk")), "nginx": str(find_tool("nginx"))}


def ensure_matplotlib(install: bool = True) -> bool:
    try:
        import matplotlib

        return True
    except ImportError:
        pass
    if not install:
        return False
    log("matplotlib missing: pip install matplotlib")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if res.returncode != 0:
        log(f"pip install matplotlib failed (falling back to a plain PNG): {res.stderr.strip()[-300:]}")
        return False
    import importlib

    importlib.invalidate_caches()
    try:
        import matplotlib  # noqa: F401

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
    ) -> Proc:
        log_fh = open(log_path, "ab")
        try:
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
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
    port: int, method: str, path: str, body: bytes | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
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


def start_nginx(procs: ProcessSet, nginx: str, workdir: Path, name: str, conf_text: str) -> Proc:
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


# --------------------------------------------------------------------------------------------
# wrk


def run_wrk(
    wrk: str, url: str, concurrency: int, duration_s: int, threads: int, timeout_s: int = 10
) -> dict[str, Any]:
    threads = max(1, min(threads, concurrency))
    cmd = [
        wrk,
        f"-t{threads}",
        f"-c{concurrency}",
        f"-d{int(duration_s)}s",
        "--timeout",
        f"{timeout_s}s",
        "-s",
        str(LUA_SCRIPT),
        url,
    ]
    popen = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = popen.communicate(timeout=duration_s + timeout_s + 30)
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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/score"


def check_score(port: int) -> tuple[bool, str]:
    status, headers, body = http_request(port, "POST", "/score", PAYLOAD)
    if status != 200:
        return False, f"POST /score -> {status}: {body[:200]!r}"
    return True, headers.get("x-bench-auth", "?")


def gateway_cmd(config: Path, workers: int) -> list[str]:
    # Equivalent to `gateway serve --config FILE --workers N --log-level warning`, but always runs
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
        "warning",
    ]


def gateway_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["BENCH_PRIMARY_KEY"] = STATIC_KEY
    env["BENCH_AAD_SECRET"] = AAD_SECRET
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def gateway_available() -> tuple[bool, str]:
    res = subprocess.run(
        [sys.executable, "-c", "import gateway.cli"],
        capture_output=True,
        text=True,
        env=gateway_env(),
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines()
        return False, f"`import gateway.cli` failed: {lines[-1] if lines else res.returncode}"
    return True, ""


def key_gateway_yaml(port: int, upstream_url: str) -> str:
    return textwrap.dedent(
        f"""\
        server:
          host: 127.0.0.1
          port: {port}
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


def gateway_check(config: Path, workdir: Path) -> tuple[bool, str]:
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
            env=gateway_env(),
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
    procs: ProcessSet, workdir: Path, sc: Scenario, yaml_text: str, workers: int, check_first: bool
) -> None:
    cfg = workdir / f"{sc.name}.yaml"
    cfg.write_text(yaml_text)
    if check_first:
        ok, why = gateway_check(cfg, workdir)
        if not ok:
            raise BenchError(why)
    sc.proc = procs.start(
        sc.name, gateway_cmd(cfg, workers), workdir / f"{sc.name}.log", env=gateway_env(), cwd=workdir
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
        {
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
        self.stat0, self.own0 = self._stat(), self._own()
        with contextlib.suppress(OSError):
            self.loadavg = " / ".join(Path("/proc/loadavg").read_text().split()[:3])

    def foreign_pct(self) -> float | None:
        """Share of all cores' time used by processes the bench did not start (approximate)."""
        busy1, total1 = self._stat()
        total = total1 - self.stat0[1]
        if total <= 0:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        foreign_s = (busy1 - self.stat0[0]) / hz - (self._own() - self.own0)
        return max(0.0, foreign_s / (total / hz) * 100)


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
    for tool in ("nginx", "wrk"):
        with contextlib.suppress(Exception):
            res = subprocess.run([tools[tool], "-v"], capture_output=True, text=True, timeout=10, check=False)
            first = (res.stderr + res.stdout).strip().splitlines()[0]
            info[tool] = first.replace("nginx version: ", "").split(" Copyright")[0]
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


def target_concurrency(concurrencies: list[int]) -> int:
    return 32 if 32 in concurrencies else max(concurrencies)


def derive(scen: dict[str, Scenario], concurrencies: list[int]) -> dict[str, Any]:
    def s(name: str, c: int) -> dict[str, Any] | None:
        sc = scen.get(name)
        return summarize(sc, c) if sc and sc.status == "ok" else None

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "rps") -> float | None:
        if not a or not b or not b[key]:
            return None
        return float(a[key] / b[key])

    rows = []
    for c in concurrencies:
        g1, g2 = s("gateway-key-1w", c), s("gateway-key-2w", c)
        rows.append(
            {
                "c": c,
                "gw_nginx": ratio(g1, s("nginx", c)),
                "gw_naive": ratio(g1, s("naive", c)),
                "gw2_gw1": ratio(g2, g1),
                "aad_key": ratio(s("gateway-aad", c), g1),
                "nginx_direct": ratio(s("nginx", c), s("direct", c)),
            }
        )
    c1 = 1 if 1 in concurrencies else min(concurrencies)
    added: dict[str, Any] = {"c": c1}
    d = s("direct", c1)
    for name in ("nginx", "naive", "gateway-key-1w", "gateway-key-2w", "gateway-aad"):
        x = s(name, c1)
        if d and x:
            added[name] = {"p50_ms": x["p50_ms"] - d["p50_ms"], "p99_ms": x["p99_ms"] - d["p99_ms"]}
    return {"ratios": rows, "added_latency": added}


def targets(
    scen: dict[str, Scenario], concurrencies: list[int], derived: dict[str, Any], soak: dict[str, Any]
) -> list[tuple[str, str, str]]:
    tc = target_concurrency(concurrencies)
    row = next((r for r in derived["ratios"] if r["c"] == tc), {})
    out: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("**pass**" if ok else "**MISS**")

    def ratio_target(label: str, value: float | None, need: float, fmt_s: str = "{:.2f}x") -> None:
        out.append(
            (
                label,
                "-" if value is None else fmt_s.format(value),
                verdict(None if value is None else value >= need),
            )
        )

    ratio_target(f"gateway 1w key c={tc} >= 0.25 x nginx", row.get("gw_nginx"), 0.25)
    ratio_target(f"gateway 1w key c={tc} >= 10 x naive", row.get("gw_naive"), 10.0)
    add = derived["added_latency"].get("gateway-key-1w")
    c1 = derived["added_latency"]["c"]
    if add:
        out.append(
            (
                f"added latency c={c1} p50 <= 1 ms over direct",
                f"{add['p50_ms']:+.3f} ms",
                verdict(add["p50_ms"] <= 1.0),
            )
        )
        out.append(
            (
                f"added latency c={c1} p99 <= 3 ms over direct",
                f"{add['p99_ms']:+.3f} ms",
                verdict(add["p99_ms"] <= 3.0),
            )
        )
    else:
        out.append((f"added latency c={c1} p50 <= 1 ms / p99 <= 3 ms over direct", "-", "-"))
    aad = row.get("aad_key")
    out.append(
        (
            f"aad route within 5% of key route (c={tc} req/s)",
            "-" if aad is None else f"{aad:.3f}x",
            verdict(None if aad is None else aad >= 0.95),
        )
    )
    ratio_target(f"2 workers >= 1.6 x 1 worker (c={tc})", row.get("gw2_gw1"), 1.6)
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


def write_markdown(
    path: Path,
    args: argparse.Namespace,
    scen: dict[str, Scenario],
    concurrencies: list[int],
    derived: dict[str, Any],
    soak: dict[str, Any],
    machine: dict[str, str],
    elapsed_s: float,
    started: str,
    png_note: str,
) -> None:
    out: list[str] = []
    out.append("# scoring-gateway benchmark")
    out.append("")
    out.append(f"Command: `{args.command_line}`  ")
    out.append(f"Started {started}, took {elapsed_s:.0f} s.  ")
    foreign = args.foreign_cpu_pct
    if foreign is not None:
        warn = (
            " **The machine was busy with other work: these numbers are disturbed.**" if foreign > 10 else ""
        )
        out.append(
            f"Load average at start {args.loadavg_start}; processes not started by the bench used "
            f"~{foreign:.0f}% of all cores' time during the run.{warn}  "
        )
    out.append(
        f"wrk {args.threads} thread(s), {args.duration} s per run, {args.repeat} run(s) per cell "
        f"(medians; errors and requests summed over runs), {args.warmup} s warm-up per scenario, "
        "keep-alive, loopback. Payload: `" + PAYLOAD.decode() + "`. All servers run at the same time on the "
        "same machine as wrk; cells are measured interleaved (for each repeat, for each concurrency, every "
        "scenario back to back)."
    )
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
                    sc.reason.replace("|", "/").replace("\n", " ")[:300],
                ]
            )
            continue
        for c in concurrencies:
            sm = summarize(sc, c)
            if sm is None:
                rows.append([name, str(c), "-", "-", "-", "-", "-", "-", "not measured"])
                continue
            spread = f"{sm['rps_min']:,.0f}-{sm['rps_max']:,.0f}" if sm["runs"] > 1 else ""
            rows.append(
                [
                    name,
                    str(c),
                    fmt(sm["rps"], 0),
                    fmt(sm["p50_ms"], 3),
                    fmt(sm["p90_ms"], 3),
                    fmt(sm["p99_ms"], 3),
                    f"{sm['errors']:,}",
                    f"{sm['requests']:,}",
                    (f"req/s range {spread}; " if spread else "") + f"upstream saw auth: {sc.auth_seen}",
                ]
            )
    out.append(
        md_table(
            ["scenario", "c", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "requests", "notes"], rows
        )
    )
    out.append("")
    out.append(
        "Errors = socket errors (connect/read/write/timeout) + HTTP responses >= 400 as counted by wrk."
    )
    out.append("")
    out.append("## Ratios (req/s)")
    out.append("")
    rrows = [
        [
            str(r["c"]),
            fmt(r["gw_nginx"]),
            fmt(r["gw_naive"]),
            fmt(r["gw2_gw1"]),
            fmt(r["aad_key"], 3),
            fmt(r["nginx_direct"]),
        ]
        for r in derived["ratios"]
    ]
    out.append(
        md_table(
            [
                "c",
                "gateway-1w / nginx",
                "gateway-1w / naive",
                "gateway-2w / 1w",
                "aad / key",
                "nginx / direct",
            ],
            rrows,
        )
    )
    out.append("")
    add = derived["added_latency"]
    out.append(f"## Latency added over `direct` at c={add['c']} (median p50 / p99)")
    out.append("")
    arows = [[name, f"{v['p50_ms']:+.3f}", f"{v['p99_ms']:+.3f}"] for name, v in add.items() if name != "c"]
    out.append(md_table(["scenario", "p50 added ms", "p99 added ms"], arows) if arows else "not measured")
    out.append("")
    out.append("## Gateway memory (RSS of the process tree: master + workers, from /proc)")
    out.append("")
    mrows = []
    for name in args.scenario_list:
        sc = scen[name]
        if not name.startswith("gateway") or sc.status != "ok":
            continue
        m = sc.memory
        for label, key in (
            ("after warm-up", "after_warmup"),
            ("after measurements", "after_measure"),
            ("after soak", "after_soak"),
        ):
            if key in m:
                mrows.append(
                    [
                        name,
                        label,
                        str(m[key]["processes"]),
                        f"{m[key]['rss_kib'] / 1024:.1f}",
                        f"{m[key]['pss_kib'] / 1024:.1f}",
                        f"{m[key]['served']:,}",
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
            f"through `gateway-key-1w` in {soak.get('seconds', 0):.0f} s "
            f"({soak.get('rps', 0):,.0f} req/s, {soak.get('errors', 0):,} errors"
            + ("; stopped by the time cap" if soak.get("capped") else "")
            + f"). RSS growth after warm-up -> after soak: {fmt(soak.get('growth_pct'), 1)}% over "
            f"{soak.get('requests_between', 0):,} requests; "
            f"during the soak alone: {fmt(soak.get('soak_growth_pct'), 1)}%."
        )
        out.append("")
    out.append("## Targets")
    out.append("")
    out.append(
        md_table(
            ["target", "measured", "result"], [list(t) for t in targets(scen, concurrencies, derived, soak)]
        )
    )
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


def write_chart(
    path: Path, scen: dict[str, Scenario], order: list[str], concurrencies: list[int], use_mpl: bool
) -> str:
    names = [n for n in order if scen[n].status == "ok"]
    data = {(n, c): summarize(scen[n], c) for n in names for c in concurrencies}
    if use_mpl:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker

        fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
        width = 0.8 / max(1, len(concurrencies))
        for ax, key, title in (
            (axes[0], "rps", "requests/s (higher is better)"),
            (axes[1], "p99_ms", "p99 latency, ms (lower is better)"),
        ):
            for i, c in enumerate(concurrencies):
                xs, ys = [], []
                for j, n in enumerate(names):
                    sm = data[(n, c)]
                    if sm:
                        xs.append(j + (i - (len(concurrencies) - 1) / 2) * width)
                        ys.append(sm[key])
                bars = ax.bar(xs, ys, width=width, label=f"c={c}")
                for bx, by in zip(xs, ys, strict=True):
                    label = f"{by:,.0f}" if key == "rps" else f"{by:.1f}"
                    ax.annotate(label, (bx, by), ha="center", va="bottom", fontsize=6, rotation=90)
                del bars
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
            ax.set_yscale("log")
            tops = [sm[key] for sm in data.values() if sm and sm[key] > 0]
            if tops:
                ax.set_ylim(top=max(tops) * 3)  # room for the value labels above the bars
            plain = ticker.FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 10 else f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_title(title)
            ax.grid(axis="y", which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"scoring-gateway bench ({_dt.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return "(matplotlib)."
    _plain_png(path, names, concurrencies, data)
    return (
        "(matplotlib unavailable: plain bar chart without text; left half req/s, right half p99, "
        "log scale, scenarios in table order, one bar per concurrency, darker = higher c)."
    )


def _plain_png(path: Path, names: list[str], concurrencies: list[int], data: dict[Any, Any]) -> None:
    """Minimal PNG writer (no dependencies) used only when matplotlib cannot be installed."""
    w, h = 1200, 400
    px = bytearray(b"\xff" * (w * h * 3))

    def rect(x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int]) -> None:
        for y in range(max(0, y0), min(h, y1)):
            row = y * w * 3
            for x in range(max(0, x0), min(w, x1)):
                px[row + 3 * x : row + 3 * x + 3] = bytes(rgb)

    shades = [(120, 170, 230), (50, 110, 200), (10, 40, 120), (0, 0, 60)]
    for panel, key in enumerate(("rps", "p99_ms")):
        vals = [sm[key] for sm in data.values() if sm and sm[key] > 0]
        if not vals:
            continue
        lo, hi = math.log10(min(vals)) - 0.3, math.log10(max(vals)) + 0.1
        x_base = panel * (w // 2) + 20
        slot = (w // 2 - 40) / max(1, len(names))
        rect(x_base, h - 21, x_base + w // 2 - 40, h - 20, (0, 0, 0))
        for j, n in enumerate(names):
            for i, c in enumerate(concurrencies):
                sm = data[(n, c)]
                if not sm or sm[key] <= 0:
                    continue
                bw = max(1, int(slot * 0.8 / len(concurrencies)))
                x0 = int(x_base + j * slot + i * bw)
                hgt = int((math.log10(sm[key]) - lo) / (hi - lo) * (h - 40))
                rect(x0, h - 20 - hgt, x0 + bw - 1, h - 20, shades[i % len(shades)])
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
        "--quick", action="store_true", help="smoke-test settings: 1 s runs, 1 repeat, short soak (~1 min)"
    )
    p.add_argument("--duration", type=int, help="seconds per wrk run (integer; default 5, quick 1)")
    p.add_argument(
        "--repeat", type=int, help="runs per scenario and concurrency, medians reported (default 3, quick 1)"
    )
    p.add_argument("--warmup", type=int, help="seconds of warm-up load per scenario (default 2, quick 1)")
    p.add_argument(
        "--concurrency", default="1,32,128", help="comma-separated connection counts (default 1,32,128)"
    )
    p.add_argument(
        "--scenarios",
        default=",".join(ALL_SCENARIOS),
        help="comma-separated subset of: " + ", ".join(ALL_SCENARIOS),
    )
    p.add_argument(
        "--threads", type=int, default=1, help="wrk threads (default 1: this bench targets 2-core machines)"
    )
    p.add_argument(
        "--soak-requests",
        type=int,
        help="requests sent through gateway-key-1w for the memory-growth check "
        "(default 200000, quick 10000, 0 = off)",
    )
    p.add_argument("--soak-concurrency", type=int, default=32)
    p.add_argument("--soak-max-seconds", type=int, default=150, help="time cap for the soak (default 150)")
    p.add_argument(
        "--out", type=Path, default=BENCH_DIR / "results", help="output directory (default bench/results)"
    )
    p.add_argument("--no-install", action="store_true", help="do not apt-get/pip install missing tools")
    args = p.parse_args(argv)
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for key, val in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    if args.duration < 1 or args.repeat < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--duration/--repeat/--threads must be >= 1 and --warmup >= 0 (wrk takes whole seconds)")
    try:
        args.concurrency_list = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    except ValueError:
        p.error("--concurrency must be comma-separated integers")
    if not args.concurrency_list or min(args.concurrency_list) < 1:
        p.error("--concurrency needs positive integers")
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in ALL_SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {ALL_SCENARIOS}")
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
) -> None:
    nginx = tools["nginx"]
    direct = scen["direct"]
    direct.port = free_port()
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
            ok, detail = check_score(sc.port)
            if not ok:
                raise BenchError(f"sanity request failed: {detail}")
            # The emulator checks the key itself (401 otherwise) and sends no X-Bench-Auth header.
            sc.auth_seen = "key (emulator answered 200)" if name == "gateway-emulator" else detail
            sc.status = "ok"
            log(
                f"{name} ready on port {sc.port} in {time.monotonic() - t0:.1f}s "
                f"(upstream saw auth: {sc.auth_seen})"
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
        sc.proc = start_nginx(
            procs, nginx, workdir, "nginx", proxy_conf(workdir / "nginx", sc.port, direct.port)
        )
        wait_until(lambda: check_score(sc.port)[0], 20.0, sc.proc, "nginx proxy")

    setup("nginx", nginx_proxy)

    def naive(sc: Scenario) -> None:
        env = dict(os.environ, NAIVE_UPSTREAM_URL=direct_url, NAIVE_API_KEY=STATIC_KEY)
        cmd = [
            sys.executable, "-m", "uvicorn", "naive_proxy:app", "--app-dir", str(BENCH_DIR),
            "--host", "127.0.0.1", "--port", str(sc.port), "--workers", "1", "--log-level", "warning",
        ]  # fmt: skip
        sc.proc = procs.start("naive", cmd, workdir / "naive.log", env=env)
        wait_until(lambda: http_request(sc.port, "GET", "/healthz")[0] == 200, 30.0, sc.proc, "naive proxy")

    setup("naive", naive)

    gw_wanted = [n for n in args.scenario_list if n.startswith("gateway")]
    if not gw_wanted:
        return
    ok, why = gateway_available()
    if not ok:
        for name in gw_wanted:
            scen[name].status = "skipped" if name in OPTIONAL_SCENARIOS else "failed"
            scen[name].reason = f"gateway not available: {why}"
            log(f"{name} {scen[name].status}: {scen[name].reason}")
        return

    for name, workers in (("gateway-key-1w", 1), ("gateway-key-2w", 2)):
        setup(
            name,
            lambda sc, w=workers: start_gateway(  # type: ignore[misc]
                procs, workdir, sc, key_gateway_yaml(sc.port, direct_url), w, check_first=False
            ),
        )

    emulator: dict[str, Any] = {}
    emu_error = ""
    if "gateway-aad" in args.scenario_list or "gateway-emulator" in args.scenario_list:
        try:
            emulator = start_emulator(procs, workdir)
            log(f"emulator up: { ({k: v for k, v in emulator.items() if k != 'proc'}) }")
        except (BenchError, OSError, ValueError) as exc:
            emu_error = f"emulator unavailable: {exc}"
            log(emu_error)

    def aad(sc: Scenario) -> None:
        if emu_error:
            raise BenchError(emu_error)
        yaml_text = aad_gateway_yaml(sc.port, direct_url, emulator["https_url"], emulator["ca_file"])
        start_gateway(procs, workdir, sc, yaml_text, 1, check_first=True)

    setup("gateway-aad", aad)

    def emu_route(sc: Scenario) -> None:
        if emu_error:
            raise BenchError(emu_error)
        url = emulator["http_url"].rstrip("/") + "/score"
        start_gateway(procs, workdir, sc, key_gateway_yaml(sc.port, url), 1, check_first=True)

    setup("gateway-emulator", emu_route)


def run_soak(args: argparse.Namespace, tools: dict[str, str], sc: Scenario) -> dict[str, Any]:
    """Send ~N requests through the gateway in time-bounded wrk chunks (wrk cannot stop at a count)."""
    assert sc.proc is not None
    target, conc = args.soak_requests, args.soak_concurrency
    sent, errors, t0 = 0, 0, time.monotonic()
    rps_guess = max(1.0, (summarize(sc, target_concurrency(args.concurrency_list)) or {"rps": 1000.0})["rps"])
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    cpu = CpuMeter()
    cpu.start()
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    signal.signal(signal.SIGTERM, _raise_exit)
    tools = ensure_tools(install=not args.no_install)
    use_mpl = ensure_matplotlib(install=not args.no_install)

    est = (
        len(args.scenario_list) * len(args.concurrency_list) * (args.repeat * args.duration)
        + len(args.scenario_list) * args.warmup
    )
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
        setup_scenarios(args, tools, procs, workdir, scen)
        active = [scen[n] for n in args.scenario_list if scen[n].status == "ok"]

        def served_by(sc: Scenario) -> int:
            return sc.requests_served

        if args.warmup > 0:
            for sc in active:
                res = run_wrk(tools["wrk"], sc.url, 32, args.warmup, args.threads)
                sc.requests_served += res["requests"]
                log(f"warm-up {sc.name}: {res['rps']:,.0f} req/s, {res['errors']} errors")
        for sc in active:
            if sc.name.startswith("gateway") and sc.proc:
                sc.memory["after_warmup"] = tree_memory(sc.proc.pid) | {"served": served_by(sc)}

        for rep in range(args.repeat):
            for c in args.concurrency_list:
                for sc in active:
                    if sc.proc is not None and not sc.proc.alive():
                        if sc.status == "ok":
                            sc.status = "failed"
                            sc.reason = f"process died during the run: {sc.proc.log_tail()}"
                            log(f"{sc.name}: {sc.reason}")
                        continue
                    res = run_wrk(tools["wrk"], sc.url, c, args.duration, args.threads)
                    res["repeat"] = rep
                    sc.runs.setdefault(c, []).append(res)
                    sc.requests_served += res["requests"]
                    log(
                        f"rep {rep + 1}/{args.repeat} c={c:<4} {sc.name:<17} {res['rps']:>9,.0f} req/s  "
                        f"p50 {res['p50_us'] / 1000:7.3f} ms  p99 {res['p99_us'] / 1000:7.3f} ms  "
                        f"errors {res['errors']}"
                    )
        active = [sc for sc in active if sc.status == "ok"]
        for sc in active:
            if sc.name.startswith("gateway") and sc.proc:
                sc.memory["after_measure"] = tree_memory(sc.proc.pid) | {"served": served_by(sc)}

        g1 = scen["gateway-key-1w"]
        if args.soak_requests > 0 and g1.status == "ok" and g1.proc is not None:
            soak = run_soak(args, tools, g1)
            g1.requests_served += soak["requests"]
            time.sleep(0.5)
            g1.memory["after_soak"] = tree_memory(g1.proc.pid) | {"served": served_by(g1)}
            base = g1.memory["after_warmup"]["rss_kib"]
            before = g1.memory["after_measure"]["rss_kib"]
            after = g1.memory["after_soak"]["rss_kib"]
            soak["growth_pct"] = (after - base) / base * 100 if base else None
            soak["soak_growth_pct"] = (after - before) / before * 100 if before else None
            soak["requests_between"] = g1.memory["after_soak"]["served"] - g1.memory["after_warmup"]["served"]
            log(
                f"soak done: {soak['requests']:,} requests, "
                f"RSS {base} -> {after} KiB ({soak['growth_pct']:+.1f}%)"
            )
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
            for f in (
                list(workdir.glob("*.log")) + list(workdir.glob("*.yaml")) + list(workdir.glob("*/error.log"))
            ):
                dest = run_dir / (f.parent.name + "-" + f.name if f.parent != workdir else f.name)
                shutil.copy2(f, dest)
            for f in workdir.glob("*/nginx.conf"):
                shutil.copy2(f, run_dir / f"{f.parent.name}-nginx.conf")
        shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.monotonic() - t_start
    args.foreign_cpu_pct = cpu.foreign_pct()
    args.loadavg_start = cpu.loadavg
    if args.foreign_cpu_pct is not None and args.foreign_cpu_pct > 10:
        log(
            f"WARNING: other processes used ~{args.foreign_cpu_pct:.0f}% of all CPU during the run; "
            "the numbers are disturbed"
        )
    derived = derive(scen, args.concurrency_list)
    machine = machine_info(tools)
    png_note = write_chart(out_dir / "latest.png", scen, args.scenario_list, args.concurrency_list, use_mpl)
    write_markdown(
        out_dir / "latest.md",
        args,
        scen,
        args.concurrency_list,
        derived,
        soak,
        machine,
        elapsed,
        started,
        png_note,
    )
    raw = {
        "command": args.command_line,
        "started": started,
        "elapsed_s": elapsed,
        "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)} | {"out": str(out_dir)},
        "scenarios": {
            n: {
                "status": scen[n].status,
                "port": scen[n].port,
                "reason": scen[n].reason,
                "auth_seen": scen[n].auth_seen,
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
    (out_dir / "latest.json").write_text(json.dumps(raw, indent=2, default=str))
    log(f"wrote {out_dir / 'latest.md'} and {out_dir / 'latest.png'} in {elapsed:.0f}s (logs: {run_dir})")
    failed = [n for n in args.scenario_list if scen[n].status == "failed"]
    if failed:
        log(f"failed scenarios: {', '.join(failed)}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
