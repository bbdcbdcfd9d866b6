"""Smoke test of the benchmark: a short run writes latest.md and latest.png with a row per scenario.

No timing assertions: this only proves the bench runs end to end (nginx, wrk, the naive proxy and the
gateway start, are driven, are stopped, and the report is written).
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
SCENARIOS = ["direct", "nginx", "naive", "gateway-key-1w"]
CONCURRENCY = [1, 8]


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_quick_run_writes_report(tmp_path: Path) -> None:
    bench = _load_bench()
    try:
        bench.ensure_tools(install=True)  # apt-get install nginx wrk when missing
    except bench.ToolsUnavailable as exc:
        pytest.skip(f"wrk/nginx are missing and could not be installed: {exc}")

    out = tmp_path / "results"
    cmd = [
        sys.executable,
        str(RUN),
        "--quick",
        "--scenarios",
        ",".join(SCENARIOS),
        "--duration",
        "1",
        "--repeat",
        "1",
        "--concurrency",
        ",".join(map(str, CONCURRENCY)),
        "--soak-requests",
        "2000",
        "--out",
        str(out),
    ]
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
    assert (out / "latest.json").is_file()
    for section in ("## Results", "## Targets", "## Machine", "## Gateway memory"):
        assert section in md
    for name in SCENARIOS:
        for c in CONCURRENCY:
            row = re.compile(rf"^\| {re.escape(name)} \| {c} \| [0-9][0-9,]* \|", re.MULTILINE)
            assert row.search(md), f"no measured row for {name} c={c} in latest.md:\n{md}"
    assert "CPU" in md and "Kernel" in md and "Python" in md

    # Every server the bench started was stopped: nothing listens on the ports it used any more.
    raw = json.loads((out / "latest.json").read_text())
    for name in SCENARIOS:
        port = raw["scenarios"][name]["port"]
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
