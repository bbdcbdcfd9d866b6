"""The `gateway` command as a user runs it: real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml
from conftest import PRIMARY, SECONDARY
from servers import free_socket

GATEWAY = [sys.executable, "-m", "gateway.cli"]


def _free_port() -> int:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    return port


def _config(tmp_path: Path, upstream_url: str, port: int, **server) -> Path:
    (tmp_path / "secondary").write_text(SECONDARY + "\n")
    config = {
        "server": {"host": "127.0.0.1", "port": port, **server},
        "routes": {
            "iris": {
                "path": "/iris",
                "upstream": upstream_url,
                "auth": {
                    "type": "key",
                    "primary": {"env": "CLI_PRIMARY"},
                    "secondary": {"file": str(tmp_path / "secondary")},
                },
            }
        },
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(path: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "CLI_PRIMARY": PRIMARY}
    return subprocess.Popen(
        [*GATEWAY, "serve", "--config", str(path), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_healthy(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError("gateway did not start")


def _reloads(url: str, result: str) -> float:
    """gateway_config_reloads_total{result=...} of the gateway at `url` (0 before the first)."""
    sample = f'gateway_config_reloads_total{{result="{result}"}} '
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(sample):
            return float(line.split()[-1])
    return 0.0


def _wait_until_refused(port: int, within: float = 20) -> None:
    """Until a new connection to `port` is refused: the server closed its listener (shutdown began)."""
    import socket

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"port {port} still accepts connections {within} s after SIGTERM")


def test_help_explains_each_command():
    result = subprocess.run([*GATEWAY, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for command in ("serve", "check", "rotate", "emulator", "demo"):
        assert command in result.stdout
    result = subprocess.run([*GATEWAY, "serve", "--help"], capture_output=True, text=True, timeout=30)
    assert "--workers" in result.stdout and "GATEWAY_CONFIG" in result.stdout


def test_serve_drains_in_flight_requests_on_sigterm(upstream, tmp_path):
    app, server = upstream
    port = _free_port()
    process = _start(_config(tmp_path, server.url, port))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process)
        result: dict[str, object] = {}

        def slow_request() -> None:
            response = httpx.get(url + "/iris/chunks", timeout=20)
            result["status"] = response.status_code
            result["body"] = response.text

        thread = threading.Thread(target=slow_request)
        thread.start()
        deadline = time.monotonic() + 5
        while app.seen("/chunks") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        # Positive evidence that the shutdown began while the request is in flight: the listener is
        # closed (new connections are refused), so the drain, not a race, lets the request finish.
        _wait_until_refused(port)
        assert app.seen("/chunks") == 1 and "status" not in result
        assert server.loop is not None
        server.loop.call_soon_threadsafe(app.release.set)
        thread.join(20)
        assert result == {"status": 200, "body": "first;second"}
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    _, stderr = process.communicate()
    assert PRIMARY not in stderr and SECONDARY not in stderr


def test_requests_cut_off_when_the_grace_period_ends_say_so_in_the_access_log(upstream, tmp_path):
    """SIGTERM with requests still in flight after server.grace_period_s: their connections are cut,
    and each access line names the cut (`error=shutting_down`), with 503 for the request that had no
    answer yet and the upstream's status for the one whose answer had started. They used to read
    `status=0` with no error code, counted among the requests the upstream answered."""
    app, server = upstream
    port = _free_port()
    process = _start(_config(tmp_path, server.url, port, grace_period_s=1))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process)
        got: dict[str, str] = {}

        def request(path: str) -> None:
            try:
                with httpx.stream("GET", url + path, timeout=20) as response:
                    got[path] = f"{response.status_code} " + response.read().decode()
            except httpx.HTTPError as exc:
                got[path] = type(exc).__name__

        threads = [threading.Thread(target=request, args=(path,)) for path in ("/iris/hang", "/iris/chunks")]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 5
        while (app.seen("/hang") == 0 or app.seen("/chunks") == 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(20)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        server.loop.call_soon_threadsafe(app.release.set)  # type: ignore[union-attr]
    _, stderr = process.communicate()
    # Neither client got a complete answer: no answer at all, or the first chunk and then the cut.
    assert got["/iris/hang"] == "RemoteProtocolError" and got["/iris/chunks"] == "RemoteProtocolError"
    access = [line for line in stderr.splitlines() if "gateway.access" in line]
    hang = [line for line in access if " GET " in line and "upstream_status=-" in line]
    chunks = [line for line in access if " GET " in line and "upstream_status=200" in line]
    assert len(hang) == 1 and len(chunks) == 1, access
    assert " status=503 " in hang[0] and hang[0].endswith(" error=shutting_down"), hang
    assert " status=200 " in chunks[0] and chunks[0].endswith(" error=shutting_down"), chunks


def test_serve_with_two_workers(upstream, tmp_path):
    _, server = upstream
    port = _free_port()
    process = _start(_config(tmp_path, server.url, port), "--workers", "2")
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process)
        for _ in range(10):
            response = httpx.post(url + "/iris/echo", content=b"{}")
            assert response.status_code == 200
        metrics = httpx.get(url + "/metrics").text
        assert 'gateway_requests_total{caller="anonymous",error_code="",route="iris",status="200"}' in metrics
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_check_reports_each_route(upstream, tmp_path):
    _, server = upstream
    path = _config(tmp_path, server.url, 0)
    env = {**os.environ, "CLI_PRIMARY": PRIMARY}
    result = subprocess.run(
        [*GATEWAY, "check", "--config", str(path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "iris" in result.stdout and "reachable" in result.stdout
    assert PRIMARY not in result.stdout + result.stderr

    env.pop("CLI_PRIMARY")
    result = subprocess.run(
        [*GATEWAY, "check", "--config", str(path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "CLI_PRIMARY is not set" in result.stdout

    (tmp_path / "bad.yaml").write_text("routes: {iris: {path: /iris}}\n")
    result = subprocess.run(
        [*GATEWAY, "check", "--config", str(tmp_path / "bad.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "routes.iris.auth: required key is missing" in result.stderr


def test_check_reports_unreachable_upstream(tmp_path):
    path = _config(tmp_path, f"http://127.0.0.1:{_free_port()}", 0)
    env = {**os.environ, "CLI_PRIMARY": PRIMARY}
    result = subprocess.run(
        [*GATEWAY, "check", "--config", str(path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "UNREACHABLE" in result.stdout


def test_hot_reload_on_file_change_and_rejects_invalid(upstream, tmp_path):
    _app, server = upstream
    port = _free_port()
    path = _config(tmp_path, server.url, port)
    process = _start(path)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process)
        assert httpx.get(url + "/iris/echo").status_code == 200
        config = yaml.safe_load(path.read_text())
        config["routes"]["iris"]["path"] = "/flowers"
        path.write_text(yaml.safe_dump(config))
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while httpx.get(url + "/flowers/echo").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(url + "/flowers/echo").status_code == 200
        assert httpx.get(url + "/iris/echo").status_code == 404
        rejected = _reloads(url, "rejected")
        path.write_text("routes: {broken: yes}\n")
        process.send_signal(signal.SIGHUP)
        # Positive evidence that the broken file was read and refused, before asserting what stays.
        deadline = time.monotonic() + 20
        while _reloads(url, "rejected") == rejected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _reloads(url, "rejected") > rejected, "the reload of the broken file never ran"
        assert httpx.get(url + "/flowers/echo").status_code == 200  # the old config stays
        assert httpx.get(url + "/iris/echo").status_code == 404
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
    _, stderr = process.communicate()
    assert "configuration reload rejected" in stderr
    assert json.dumps(PRIMARY) not in stderr


def test_demo_runs_to_the_end():
    # A newcomer's machine may set proxy variables: the demo is all loopback and must not use them
    # (here they point at a closed port, so any request sent through them would fail).
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "HTTPS_PROXY": dead, "HTTP_PROXY": dead, "https_proxy": dead, "http_proxy": dead}
    result = subprocess.run([*GATEWAY, "demo"], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[0.1, 2.3, 4.1, 2.0]" in result.stdout
    assert "demo finished: all calls succeeded" in result.stdout
    assert "both keys rotated" in result.stdout
    assert "requests during the rotation, 0 failed" in result.stdout
    # Step 6: callers with Entra ID tokens, per-route roles, and Entra ID rotating its signing key.
    assert "app fraud-scorer (holds the role): HTTP 200 predictions" in result.stdout
    assert "app intruder (holds no role): HTTP 403 caller_not_allowed: caller app:" in result.stdout
    assert "no token: HTTP 401 caller_unauthenticated" in result.stdout
    assert "requests during the key rotation, 0 failed" in result.stdout
