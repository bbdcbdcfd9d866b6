"""Hot reload through the real gateway: cached Entra tokens survive a reload that leaves their route's
auth alone, and a broken file leaves the running routes serving."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from azure_env import (
    clean_emulator_fixture,  # noqa: F401 - fixture
    emulator_fixture,  # noqa: F401 - fixture
    gateway_config,
    identity,
    register_app,
)
from servers import ServerThread

from gateway.app import GatewayApp
from gateway.emulator.server import EmulatorServer

ROWS = {"data": [[5.1, 3.5, 1.4, 0.2]]}


def test_reload_keeps_cached_tokens_and_survives_a_broken_file(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    app = register_app(emulator)
    aad = {"auth": {"type": "aad_token", "identity": identity(emulator, app)}}
    other = {"auth": {"type": "none"}}
    config = gateway_config(emulator, {"aad": aad, "other": other})
    # Only reload_from_file reads it (below, once broken); the gateway was built from `config`.
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text("# replaced by the test\n")
    gateway = GatewayApp(config, config_path=str(config_file))
    with ServerThread(gateway) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        response = client.post("/aad/score", json=ROWS)
        assert response.status_code == 200, response.text
        assert emulator.state.token_request_count(app.client_id) == 1
        first = gateway.router.match("/aad/score")
        assert first is not None
        before = first.credential

        # Change only the unrelated route, and add one: the aad route's credential is reused as it is.
        changed = gateway_config(
            emulator,
            {"aad": aad, "other": {**other, "timeout_s": 7}, "added": {"auth": {"type": "none"}}},
        )
        server.call(gateway.reload(changed))
        assert {r.name for r in gateway.router.routes} == {"aad", "other", "added"}
        route = gateway.router.match("/aad/score")
        assert route is not None and route.credential is before
        for _ in range(5):
            response = client.post("/aad/score", json=ROWS)
            assert response.status_code == 200, response.text
            assert json.loads(response.json()) == ["setosa"]
        assert client.post("/added/score", json=ROWS).status_code == 401  # no credential on that route
        assert emulator.state.token_request_count(app.client_id) == 1

        # A broken file is rejected; the running routes keep serving with the token they have.
        config_file.write_text("routes: {broken: yes}\n")
        assert server.call(gateway.reload_from_file()) is False
        assert {r.name for r in gateway.router.routes} == {"aad", "other", "added"}
        assert client.post("/aad/score", json=ROWS).status_code == 200
        assert client.get("/readyz").json()["ready"]
        assert emulator.state.token_request_count(app.client_id) == 1


def test_metrics_show_the_token_countdown_and_zero_once_it_is_gone(emulator: EmulatorServer) -> None:
    app = register_app(emulator)
    emulator.state.token_lifetime_s = 3
    config = gateway_config(
        emulator, {"aad": {"auth": {"type": "aad_token", "identity": identity(emulator, app)}}}
    )
    with ServerThread(GatewayApp(config)) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.post("/aad/score", json=ROWS).status_code == 200

        def expiry() -> float:
            for line in client.get("/metrics").text.splitlines():
                if line.startswith('gateway_credential_expiry_seconds{route="aad"}'):
                    return float(line.rsplit(" ", 1)[1])
            raise AssertionError("no expiry gauge for the route")

        assert 0 < expiry() <= 3
        emulator.state.set_fault("token", status=503)  # the refresh fails from now on
        deadline = time.monotonic() + 10
        while expiry() > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert expiry() == 0
        assert client.post("/aad/score", json=ROWS).json()["error"]["code"] == "credential_unavailable"
