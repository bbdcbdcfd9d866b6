"""Run gateway.emulator in its own process for the bench (placeholder until the emulator exists)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    info_path = Path(os.environ["BENCH_EMULATOR_INFO"])
    try:
        from gateway.emulator.server import EmulatorServer  # noqa: F401
    except Exception as exc:
        info_path.write_text(json.dumps({"error": f"gateway.emulator.server.EmulatorServer: {exc!r}"}))
        return 0
    info_path.write_text(json.dumps({"error": "emulator launcher not written yet"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
