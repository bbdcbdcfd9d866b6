"""The project's own rules: ruff-clean everywhere, mypy-clean (strict) for gateway/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_check():
    result = _run("ruff", "check", "gateway", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format():
    result = _run("ruff", "format", "--check", "gateway", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_gateway():
    result = _run("mypy", "gateway")
    assert result.returncode == 0, result.stdout + result.stderr
