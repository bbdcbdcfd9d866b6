"""Run gateway.emulator in its own process for the bench (so it does not share a GIL with run.py).

Reads its settings from the environment (set by bench/run.py), writes the emulator's URLs and CA file as
JSON to $BENCH_EMULATOR_INFO (or {"error": ...} if it cannot start), then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any


def _write(path: Path, info: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)  # atomic: run.py never reads a half-written file


def main() -> int:
    info_path = Path(os.environ["BENCH_EMULATOR_INFO"])
    try:
        from gateway.emulator.server import EmulatorServer
        from gateway.emulator.state import EmulatorState
    except Exception as exc:
        _write(info_path, {"error": f"cannot import gateway.emulator: {exc!r}"})
        return 0

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        state = EmulatorState(primary_key=os.environ["BENCH_PRIMARY_KEY"])
        state.add_app(
            os.environ["BENCH_AAD_TENANT"],
            os.environ["BENCH_AAD_CLIENT"],
            secret=os.environ["BENCH_AAD_SECRET"],
        )
        workdir = os.environ.get("BENCH_EMULATOR_WORKDIR")
        server = EmulatorServer(state, directory=Path(workdir) if workdir else None).start()
    except Exception as exc:
        _write(info_path, {"error": f"emulator failed to start: {exc!r}"})
        return 0
    try:
        _write(
            info_path,
            {"http_url": server.http_url, "https_url": server.https_url, "ca_file": str(server.ca_file)},
        )
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
