"""Smoke test of the benchmark: a --quick run writes latest.md and latest.png with a row per target.

No timing assertions: this only proves the bench runs end to end (nginx, wrk, the naive proxy, the
aiohttp forwarder and the gateway, plus HAProxy and Caddy when they are installed, start pinned to their
core, are driven, are stopped, and the report is written), including the before/after comparison with
this same checkout as the baseline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "run.py"
# Always measured; haproxy and caddy are measured when installed (the quick run installs neither),
# aiohttp when importable and gateway-caller when the emulator starts, otherwise their rows say "skipped".
REQUIRED = [
    "direct",
    "nginx",
    "naive",
    "floor",
    "gateway",
    "gateway-baseline",
    "gateway-logged",
    "gateway-json",
]
OPTIONAL = ["haproxy", "caddy", "aiohttp", "gateway-caller"]
CONCURRENCY = [1, 32]


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_busy_machine_keeps_latest_md_unless_told() -> None:
    """Over 10% of a core used by other processes: no latest.md (the report goes to disturbed.md and
    the exit status says so), unless --allow-busy; at or under it, latest.md."""
    bench = _load_bench()
    assert bench.busy_machine(bench.BUSY_LIMIT_CORE_PCT + 0.1)
    assert not bench.busy_machine(bench.BUSY_LIMIT_CORE_PCT)
    assert not bench.busy_machine(None)  # /proc/stat unreadable: nothing to say
    assert bench.report_stem(busy=True, allow_busy=False) == "disturbed"
    assert bench.report_stem(busy=True, allow_busy=True) == "latest"
    assert bench.report_stem(busy=False, allow_busy=False) == "latest"


def test_bench_quick_run_writes_report(tmp_path: Path) -> None:
    bench = _load_bench()
    try:
        bench.ensure_tools(install=True)  # apt-get install nginx wrk when missing
    except bench.ToolsUnavailable as exc:
        pytest.skip(f"wrk/nginx are missing and could not be installed: {exc}")

    out = tmp_path / "results"
    # --allow-busy: the suite runs on a busy machine; the report must then say its figures are disturbed.
    cmd = [sys.executable, str(RUN), "--quick", "--allow-busy", "--baseline", str(ROOT), "--out", str(out)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        # SIGTERM (not SIGKILL) so the bench stops the servers it started before it exits.
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        pytest.fail(f"bench did not finish within 300 s:\n{stderr[-4000:]}")
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{stderr[-4000:]}"

    md = (out / "latest.md").read_text()
    png = (out / "latest.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    raw = json.loads((out / "latest.json").read_text())
    for section in (
        "## Per core",
        "## Gateway cost (issue 18)",
        "## Client decision",
        "## Before / after",
        "## Results",
        "## Targets",
        "## Machine",
        "## Gateway memory",
    ):
        assert section in md
    measured = [name for name in REQUIRED + OPTIONAL if raw["scenarios"][name]["status"] == "ok"]
    assert set(REQUIRED) <= set(measured), raw["scenarios"]
    for name in OPTIONAL:
        if name not in measured:
            assert raw["scenarios"][name]["status"] == "skipped", raw["scenarios"][name]
            assert re.search(rf"^\| {name} \| skipped \|", md, re.MULTILINE), md
    for name in measured:
        for c in CONCURRENCY:
            row = re.compile(
                rf"^\| {re.escape(name)} \| {c} \| [0-9][0-9,]* \| [0-9][0-9,.]* \|", re.MULTILINE
            )
            assert row.search(md), (
                f"no measured row (req/s and CPU µs/req) for {name} c={c} in latest.md:\n{md}"
            )
    assert "CPU" in md and "Kernel" in md and "Python" in md
    assert re.search(r"^\| gateway \| [0-9][0-9,.]* \| [0-9.]+x \| [0-9.]+x \|", md, re.MULTILINE), md
    if "gateway-caller" in measured:  # issue 16: the cached Entra ID caller against the key route
        assert re.search(r"^\| gateway-caller \| [0-9][0-9,.]* \| ", md, re.MULTILINE), md
        assert re.search(
            r"^\| cached Entra caller CPU per request <= 1\.10 x the key route's \(issue 16\) \| [0-9.]+x ",
            md,
            re.MULTILINE,
        ), md
    if raw["settings"]["busy"]:
        assert "Written as latest.md only because of --allow-busy" in md
    assert not (out / "disturbed.md").exists()
    assert raw["derived"]["before_after"]["rps"] > 0

    # Each proxy ran alone on its own core, away from wrk and the upstream (when there are 2 cores).
    if len(os.sched_getaffinity(0)) >= 2:
        direct_cores = raw["scenarios"]["direct"]["pinned_to"]
        for name in measured:
            if name != "direct":
                pinned = raw["scenarios"][name]["pinned_to"]
                assert pinned and "," not in pinned and pinned not in direct_cores.split(","), (name, pinned)

    # Every server the bench started was stopped: nothing listens on the ports it used any more.
    for name in measured:
        port = raw["scenarios"][name]["port"]
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
