"""The emulator (`python -m gateway.emulator`) in a process of its own, reached over HTTP only: for load
tests, where an endpoint sharing the driver's GIL would show the driver's work as latency (which the
adaptive concurrency limit reacts to)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class RemoteEmulator:
    process: subprocess.Popen[str]
    url: str
    key: str

    @property
    def scoring_uri(self) -> str:
        return self.url + "/score"

    def admin(self, path: str, body: dict[str, Any] | None = None) -> Any:
        if body is None:
            response = httpx.get(f"{self.url}/_emulator/{path}", timeout=10)
        else:
            response = httpx.post(f"{self.url}/_emulator/{path}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def deployment(self, name: str = "blue") -> dict[str, Any]:
        """The deployment's capacity counters: `peak_in_flight`, `mean_in_flight`, `served`, `throttled`."""
        return self.admin("state")["deployments"][name]  # type: ignore[no-any-return]


def start_emulator(*, capacity: int, score_delay_s: float) -> RemoteEmulator:
    """An emulator whose deployment `blue` scores at most `capacity` requests at once (429 beyond), each
    taking `score_delay_s`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.emulator", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    url = key = ""
    deadline = time.monotonic() + 60
    while not (url and key):
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the emulator exited with {process.wait(10)} before its banner")
        if line.strip().startswith("plain HTTP"):
            url = line.split()[2]
        elif line.strip().startswith("primary key"):
            key = line.split()[2]
        assert time.monotonic() < deadline, "no emulator banner within 60 s"
    emulator = RemoteEmulator(process, url, key)
    emulator.admin("config", {"score_delay_s": score_delay_s})
    emulator.admin("deployments", {"name": "blue", "max_concurrent": capacity})
    return emulator


def stop_emulator(emulator: RemoteEmulator) -> None:
    emulator.process.terminate()
    try:
        emulator.process.wait(15)
    except subprocess.TimeoutExpired:
        emulator.process.kill()
        emulator.process.wait(5)
