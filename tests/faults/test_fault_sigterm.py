"""SIGTERM mid-load on `gateway serve` (a real process): in-flight requests finish, new connections
are refused, and the process exits with status 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import HYGIENE, PRIMARY
from faultkit import Ledger, drive, fault_upstream, wait_until
from servers import free_socket

GRACE_S = 5.0
MODEL_LATENCY_S = 0.3


def _free_port() -> int:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_sigterm_mid_load_drains_and_exits_0(tmp_path: Path):
    ledger = Ledger()
    port = _free_port()
    with fault_upstream(ledger, accepted_keys={PRIMARY}, delay_s=MODEL_LATENCY_S) as upstream:
        config = {
            "server": {"host": "127.0.0.1", "port": port, "grace_period_s": GRACE_S},
            "routes": {
                "iris": {
                    "path": "/iris",
                    "upstream": upstream.url,
                    "auth": {"type": "key", "primary": {"env": "FAULT_PRIMARY"}},
                }
            },
        }
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
            env={**os.environ, "FAULT_PRIMARY": PRIMARY},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        url = f"http://127.0.0.1:{port}"
        stop: dict[str, float | set[str]] = {}
        try:

            def healthy() -> bool:
                assert process.poll() is None, "gateway serve exited before the load"
                try:
                    return httpx.get(url + "/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            assert wait_until(healthy, 20, 0.05), "gateway serve did not start"

            def terminate() -> None:
                # Wait until the upstream is working on several requests, then stop the gateway.
                wait_until(lambda: len(ledger.in_flight_ids()) >= 4, 3)
                stop["in_flight"] = ledger.in_flight_ids()
                stop["at"] = time.perf_counter()
                process.send_signal(signal.SIGTERM)

            # One connection per request, so "new connection refused" is observable on every request.
            load = drive(
                "sigterm_mid_load",
                url + "/iris/score",
                total=200,
                ledger=ledger,
                keepalive=False,
                events=[(40, "SIGTERM", terminate)],
            )
            status = process.wait(GRACE_S + 5)
            exited = time.perf_counter()
        finally:
            if process.poll() is None:
                process.kill()
            out, err = process.communicate(timeout=10)
            HYGIENE.record_output("`gateway serve` (SIGTERM scenario)", out, err)

    assert status == 0, err[-2000:]
    sigterm = stop["at"]
    assert isinstance(sigterm, float)
    in_flight = stop["in_flight"]
    assert isinstance(in_flight, set) and len(in_flight) >= 4
    by_rid = {o.rid: o for o in load.outcomes}
    for rid in in_flight:
        assert by_rid[rid].ok, f"request {rid} was in flight at SIGTERM and did not complete: {by_rid[rid]}"
    assert all(o.ok for o in load.outcomes if o.ended < sigterm), "a request failed before SIGTERM"
    after = [o for o in load.outcomes if o.started > sigterm]
    assert after, "no request was sent after SIGTERM"
    for outcome in after:
        # Refused (or closed before any answer by a listener that was shutting down): never a 5xx,
        # never a hang.
        assert outcome.ok or outcome.error in ("ConnectError", "RemoteProtocolError", "ReadError"), outcome
        assert outcome.elapsed < 2.0
    assert any(o.error == "ConnectError" for o in after), "new connections were not refused"
    # A request that failed without having started after SIGTERM was never taken by the gateway: its
    # connection was still in the listener's backlog (reset when the listener closed) or its bytes unread
    # when the shutdown began. Whatever the gateway took has an access line, and none of those failed.
    assert all(f"gateway.access: {o.rid} " in err for o in load.outcomes if o.ok)  # the lines are there
    for outcome in load.failed:
        if outcome not in after:
            assert f"gateway.access: {outcome.rid} " not in err, f"taken, and failed: {outcome}"
            assert outcome.error in ("RemoteProtocolError", "ReadError", "ConnectError"), outcome
    assert exited - sigterm < GRACE_S + 2
    assert load.duplicated == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/healthz", timeout=1)
