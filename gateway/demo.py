"""`gateway demo`: the whole story on one machine, with nothing from outside it.

Starts the emulator (a local Azure ML endpoint and Entra ID) and the real gateway (`gateway serve`
in a child process) on free loopback ports, then runs the seed's client code against the gateway:
plain HTTP, no credentials. Then it regenerates a key (failover), and rotates both keys of a route
whose keys live in the emulated Key Vault with `gateway rotate` while requests flow, counting failures.
Last, a second gateway that knows its callers (`inbound.entra_id`): an app holding the route's app role
calls through, one without it is refused, and Entra ID rotating its signing keys fails no request.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml

if TYPE_CHECKING:
    from gateway.emulator.server import EmulatorServer

ROWS = [[0.1, 2.3, 4.1, 2.0], [0.2, 1.8, 3.9, 2.1]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _say(text: str = "") -> None:
    print(text, flush=True)


def _score(endpoint: str) -> tuple[int, Any]:
    """The seed's REST client, unchanged but for the missing Authorization header."""
    import requests  # the seed's own client library (it comes with msal)

    json_data = json.dumps({"data": ROWS})
    request_headers = {"Content-Type": "application/json"}
    response = requests.post(url=endpoint, data=json_data, headers=request_headers, timeout=30)
    if response.status_code != 200:
        return response.status_code, response.text
    predictions = json.loads(response.json())
    return response.status_code, predictions


def _show(endpoint: str) -> bool:
    status, predictions = _score(endpoint)
    if status != 200:
        _say(f"    -> HTTP {status}: {predictions}")
        return False
    for i in range(len(ROWS)):
        _say(f"    {ROWS[i]} {predictions[i]}")
    return True


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the gateway did not become healthy in time")


def _rotate_under_traffic(gateway_url: str, config_path: Path, env: dict[str, str]) -> bool:
    """Step 5: `gateway rotate` on a Key Vault route while requests flow; counts the failed ones."""
    endpoint = f"{gateway_url}/iris-kv"
    _say(f"5. Rotating both keys of the endpoint behind {gateway_url}/iris-kv with `gateway rotate`, while")
    _say("   requests flow through it (its keys live in the emulated Key Vault, polled every second):")
    stop = threading.Event()
    counts = {"sent": 0, "failed": 0}

    def traffic() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    ok = client.post(endpoint, json={"data": ROWS}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                counts["sent"] += 1
                counts["failed"] += 0 if ok else 1

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        command = [sys.executable, "-m", "gateway.cli", "rotate", "--config", str(config_path), "iris-kv"]
        result = subprocess.run(
            [*command, "--settle-s", "2"], env=env, capture_output=True, text=True, timeout=120
        )
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(35)
    for line in (result.stdout + result.stderr).splitlines():
        _say(f"   | {line}")
    _say(f"   {counts['sent']} requests during the rotation, {counts['failed']} failed")
    return result.returncode == 0 and counts["failed"] == 0


def _start_gateway(config: dict[str, Any], path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)], env=env)


def _stop_gateway(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


def _caller_token(emulator: EmulatorServer, tenant_id: str, client_id: str, secret: str, scope: str) -> str:
    """What an app's Azure SDK credential does for the gateway's scope: client credentials with MSAL."""
    import msal

    app = msal.ConfidentialClientApplication(
        client_id,
        client_credential=secret,
        authority=emulator.authority(tenant_id),
        instance_discovery=False,
        http_client=emulator.msal_http_client(),
    )
    result = app.acquire_token_for_client([scope])
    if "access_token" not in result:
        raise RuntimeError(f"no caller token for app {client_id}: {result.get('error_description')}")
    token: str = result["access_token"]
    return token


def _callers(
    emulator: EmulatorServer, tenant_id: str, identity: dict[str, Any], workdir: Path, env: dict[str, str]
) -> bool:
    """Step 6: a gateway with `inbound.entra_id` and a route for the holders of an app role."""
    state = emulator.state
    gateway_app = str(uuid.uuid4())
    api_uri = "api://scoring-gateway-demo"
    state.apis.add(tenant_id, identifier_uri=api_uri, client_id=gateway_app, app_roles=["Scoring.Invoke"])
    apps = {}
    for name in ("fraud-scorer", "intruder"):
        client_id, secret = str(uuid.uuid4()), uuid.uuid4().hex * 2
        state.add_app(tenant_id, client_id, secret=secret)
        apps[name] = (client_id, secret)
    state.apis.assign(gateway_app, apps["fraud-scorer"][0], "Scoring.Invoke")
    port = _free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        "tls": {"ca_bundle": str(emulator.ca_file)},
        "egress": {"proxy": "none"},
        "inbound": {
            "entra_id": {
                "tenant_id": tenant_id,
                "audiences": [api_uri, gateway_app],
                "authority": emulator.https_url,
            }
        },
        "routes": {
            "fraud": {
                "path": "/fraud",
                "upstream": f"{emulator.https_url}/score",
                "auth": {"type": "aad_token", "identity": identity},
                "callers": {"roles": ["Scoring.Invoke"]},
            }
        },
    }
    url = f"http://127.0.0.1:{port}"
    endpoint = f"{url}/fraud"
    scope = f"{api_uri}/.default"
    _say(f"6. A gateway that knows its callers, {url} (inbound.entra_id): apps send an Entra ID")
    _say(f"   token for {scope}; route /fraud serves the apps holding the app role Scoring.Invoke.")
    process = _start_gateway(config, workdir / "gateway-callers.yaml", env)
    try:
        _wait_healthy(url, process)
        ok = True
        with httpx.Client(timeout=30) as client:
            for name, expected in (("fraud-scorer", 200), ("intruder", 403)):
                client_id, secret = apps[name]
                token = _caller_token(emulator, tenant_id, client_id, secret, scope)
                answer = client.post(
                    endpoint, json={"data": ROWS}, headers={"Authorization": f"Bearer {token}"}
                )
                role = "holds the role" if name == "fraud-scorer" else "holds no role"
                if answer.status_code == 200:
                    shown = f"predictions {json.loads(answer.json())}"
                else:
                    error = answer.json().get("error", {})
                    shown = f"{error.get('code')}: {error.get('message')}"
                _say(f"   app {name} ({role}): HTTP {answer.status_code} {shown}")
                ok = ok and answer.status_code == expected
            answer = client.post(endpoint, json={"data": ROWS})
            _say(f"   no token: HTTP {answer.status_code} {answer.json().get('error', {}).get('code')}")
            ok = ok and answer.status_code == 401
        ok = _signing_key_rotation(emulator, tenant_id, apps["fraud-scorer"], scope, endpoint) and ok
    finally:
        _stop_gateway(process)
    return ok


def _signing_key_rotation(
    emulator: EmulatorServer, tenant_id: str, app: tuple[str, str], scope: str, endpoint: str
) -> bool:
    """Entra ID rolls its signing key while an app's requests flow: the app's next token is signed with
    a key the gateway has not seen, which it reads at once. (The old key stays published, as Entra ID
    keeps it until the tokens it signed have expired.)"""
    state = emulator.state
    current = {"token": _caller_token(emulator, tenant_id, *app, scope)}
    stop = threading.Event()
    counts = {"sent": 0, "failed": 0}

    def traffic() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                headers = {"Authorization": f"Bearer {current['token']}"}
                try:
                    ok = client.post(endpoint, json={"data": ROWS}, headers=headers).status_code == 200
                except httpx.HTTPError:
                    ok = False
                counts["sent"] += 1
                counts["failed"] += 0 if ok else 1

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        new_kid = state.signing.rotate()
        current["token"] = _caller_token(emulator, tenant_id, *app, scope)  # a new app instance: no cache
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(35)
    sent, failed = counts["sent"], counts["failed"]
    _say(f"   Entra ID started signing with a new key ({new_kid[:12]}...) while the app called; its")
    _say(f"   next token was signed with it: {sent} requests during the key rotation, {failed} failed")
    return counts["failed"] == 0 and counts["sent"] > 0


def run_demo(*, keep_running: bool = False) -> int:
    from gateway.emulator.server import EmulatorServer
    from gateway.emulator.state import EmulatorState

    workdir = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    state = EmulatorState(lro_retry_after_s=1)
    tenant_id, client_id, client_secret = str(uuid.uuid4()), str(uuid.uuid4()), uuid.uuid4().hex * 2
    state.add_app(tenant_id, client_id, secret=client_secret)
    emulator = EmulatorServer(state, directory=workdir / "emulator").start()
    process: subprocess.Popen[bytes] | None = None
    try:
        keys = state.keys()
        state.set_secret("iris-primary-key", keys["primary"])
        state.set_secret("iris-secondary-key", keys["secondary"])
        (workdir / "primary-key").write_text(keys["primary"] + "\n")
        (workdir / "secondary-key").write_text(keys["secondary"] + "\n")
        port = _free_port()
        routes: dict[str, Any] = {
            "iris": {
                "path": "/iris",
                "upstream": emulator.scoring_uri,
                "timeout_s": 30,
                "headers": {"azureml-model-deployment": "blue"},
                "auth": {
                    "type": "key",
                    "primary": {"file": str(workdir / "primary-key")},
                    "secondary": {"file": str(workdir / "secondary-key")},
                },
            }
        }
        routes["iris-aad"] = {
            "path": "/iris-aad",
            "upstream": f"{emulator.https_url}/score",
            "auth": {
                "type": "aad_token",
                "identity": {
                    "tenant_id": tenant_id,
                    "client_id": client_id,
                    "client_secret": {"env": "DEMO_CLIENT_SECRET"},
                    "authority_host": emulator.authority_host,
                },
            },
        }
        identity = {
            "tenant_id": tenant_id,
            "client_id": client_id,
            "client_secret": {"env": "DEMO_CLIENT_SECRET"},
            "authority_host": emulator.authority_host,
        }
        vault = emulator.vault_url
        routes["iris-kv"] = {
            "path": "/iris-kv",
            "upstream": emulator.scoring_uri,
            "auth": {
                "type": "key",
                "primary": {"keyvault": {"vault": vault, "secret": "iris-primary-key"}},
                "secondary": {"keyvault": {"vault": vault, "secret": "iris-secondary-key"}},
                "endpoint": {
                    "subscription_id": "00000000-0000-0000-0000-000000000000",
                    "resource_group": "rg",
                    "workspace": "ws",
                    "name": "iris-endpoint",
                },
                "arm_url": emulator.https_url,
                "identity": identity,
            },
        }
        config = {
            "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
            "tls": {"ca_bundle": str(emulator.ca_file)},
            "keyvault": {"identity": identity, "refresh_every_s": 1},
            # Everything the demo talks to is on this machine: a proxy from the environment must not
            # carry loopback traffic.
            "egress": {"proxy": "none"},
            "routes": routes,
        }
        config_path = workdir / "gateway.yaml"
        env = {**os.environ, "DEMO_CLIENT_SECRET": client_secret}
        # The demo's own clients (the seed's `requests` code, httpx) reach loopback directly as well.
        loopback = "127.0.0.1,localhost"
        for name in ("NO_PROXY", "no_proxy"):
            os.environ[name] = f"{os.environ[name]},{loopback}" if os.environ.get(name) else loopback
        process = _start_gateway(config, config_path, env)
        gateway_url = f"http://127.0.0.1:{port}"
        _wait_healthy(gateway_url, process)

        _say("scoring-gateway demo (everything runs on this machine)")
        _say(f"  emulated Azure ML endpoint  {emulator.scoring_uri}")
        _say(f"  emulated Entra ID           {emulator.authority_host}")
        _say(f"  gateway                     {gateway_url}  config {config_path}")
        _say()
        endpoint = f"{gateway_url}/iris"
        _say(f"1. The seed's client code, posting to {endpoint} with no credentials:")
        ok = _show(endpoint)
        _say()
        new_key = state.regenerate_key("primary")
        _say("2. The primary key was regenerated in the endpoint; the gateway still holds the old one.")
        _say("   Next call (the gateway fails over to the secondary key within the same request):")
        ok = _show(endpoint) and ok
        ready = httpx.get(f"{gateway_url}/readyz", timeout=5).json()
        iris = next(r for r in ready["routes"] if r["name"] == "iris")
        _say(f"   route iris: active key slot = {iris['active_slot']}, state = {iris['state']}")
        _say()
        (workdir / "primary-key.new").write_text(new_key + "\n")
        (workdir / "primary-key.new").replace(workdir / "primary-key")
        state.set_secret("iris-primary-key", new_key)  # the Key Vault copy, for step 5
        _say("3. The new primary key was written to the key file (as a Kubernetes secret update would).")
        _say("   The gateway picks it up without a restart; readiness then reports no rejected key.")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            iris = next(
                r
                for r in httpx.get(f"{gateway_url}/readyz", timeout=5).json()["routes"]
                if r["name"] == "iris"
            )
            if iris["state"] == "valid":
                break
            time.sleep(0.25)
        _say(f"   route iris: state = {iris['state']}")
        _say()
        aad_endpoint = f"{gateway_url}/iris-aad"
        _say(f"4. The same rows through an Entra ID (aad_token) route, {aad_endpoint}:")
        ok = _show(aad_endpoint) and ok
        _say()
        ok = _rotate_under_traffic(gateway_url, config_path, env) and ok
        _say()
        ok = _callers(emulator, tenant_id, identity, workdir, env) and ok
        _say()
        if keep_running:
            _say("Both keep running. Try:")
            _say(
                f"  curl -s -X POST {endpoint} -H 'Content-Type: application/json' "
                f"""-d '{json.dumps({"data": ROWS})}'"""
            )
            _say(f"  curl -s {gateway_url}/readyz")
            _say("Press Ctrl-C to stop.")
            with contextlib.suppress(KeyboardInterrupt):
                while process.poll() is None:
                    time.sleep(0.5)
        _say("demo finished: all calls succeeded" if ok else "demo finished with failures")
        return 0 if ok else 1
    except RuntimeError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop_gateway(process)
        emulator.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # it holds the demo's keys
