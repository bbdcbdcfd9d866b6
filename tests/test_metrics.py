"""Metrics that tell 401 from 429 from 408 from 424 (issue 11, item 7).

Requests are counted by route, the gateway's status code (bounded: unknown codes fold into their class)
and error code; the upstream's status separately. Credential gauges follow the credential's state as it
changes, and with several worker processes only live ones count.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import yaml
from azure_env import (
    clean_emulator_fixture,  # noqa: F401 - pytest fixture
    emulator_fixture,  # noqa: F401 - pytest fixture
    identity,
    register_app,
)
from conftest import HYGIENE, PRIMARY, SECONDARY, key_route
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from servers import free_socket

from gateway import metrics
from gateway.emulator.server import EmulatorServer

ROOT = Path(__file__).resolve().parent.parent


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def _value(text: str, name: str, **labels: str) -> float:
    return _samples(text, name).get(tuple(sorted(labels.items())), 0.0)


def test_status_label_keeps_known_codes_and_folds_the_rest() -> None:
    for code in (200, 401, 403, 404, 408, 413, 424, 429, 499, 500, 502, 503, 504):
        assert metrics.status_label(code) == str(code)
    assert metrics.status_label(418) == "4xx"
    assert metrics.status_label(599) == "5xx"
    assert metrics.status_label(299) == "2xx"
    assert metrics.status_label(0) == "other"
    assert metrics.status_label(1000) == "other"


def test_requests_by_gateway_status_and_upstream_status(upstream, gateway_factory) -> None:
    app, server = upstream
    app.accepted_keys = None
    route = {"path": "/iris", "upstream": server.url, "auth": {"type": "none"}, "retry": {"attempts": 1}}
    gw = gateway_factory({"routes": {"iris": route}})
    before = httpx.get(gw.url + "/metrics").text
    for code in (401, 429, 408, 424, 424, 418, 599):
        assert httpx.get(f"{gw.url}/iris/status/{code}").status_code == code
    assert httpx.get(gw.url + "/nowhere").status_code == 404
    text = httpx.get(gw.url + "/metrics").text

    def delta(name: str, **labels: str) -> float:
        return _value(text, name, **labels) - _value(before, name, **labels)

    for status, count in (("401", 1), ("429", 1), ("408", 1), ("424", 2), ("4xx", 1), ("5xx", 1)):
        assert (
            delta("gateway_requests_total", route="iris", status=status, error_code="", caller="anonymous")
            == count
        ), status
        assert delta("gateway_upstream_responses_total", route="iris", status=status) == count, status
    assert (
        delta(
            "gateway_requests_total", route="", status="404", error_code="route_not_found", caller="anonymous"
        )
        == 1
    )
    labels = {dict(k).get("status") for k in _samples(text, "gateway_requests_total")}
    assert "418" not in labels and "599" not in labels


def test_gateway_errors_have_no_upstream_status(gateway_factory) -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    route = {"path": "/down", "upstream": f"http://127.0.0.1:{port}", "auth": {"type": "none"}}
    gw = gateway_factory({"routes": {"down": route}})
    assert httpx.get(gw.url + "/down/x").status_code == 502
    text = httpx.get(gw.url + "/metrics").text
    assert _value(
        text,
        "gateway_requests_total",
        route="down",
        status="502",
        error_code="upstream_unreachable",
        caller="anonymous",
    )
    assert not [k for k in _samples(text, "gateway_upstream_responses_total") if ("route", "down") in k]


def test_credential_gauges_follow_the_state_without_a_scrape(upstream, gateway_factory, monkeypatch) -> None:
    """Readiness and the active slot are set when the verdict or a failover happens: nothing here reads
    /metrics or /readyz before checking the gauges."""
    app, server = upstream
    monkeypatch.setenv("GAUGE_PRIMARY", PRIMARY)
    monkeypatch.setenv("GAUGE_SECONDARY", SECONDARY)
    keys = {"primary": {"env": "GAUGE_PRIMARY"}, "secondary": {"env": "GAUGE_SECONDARY"}}
    route = key_route(server.url, **keys)
    gw = gateway_factory({"routes": {"gauges": {**route, "path": "/gauges"}}})

    def gauge(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"route": "gauges", **labels})

    assert gauge("gateway_credential_ready") == 1
    assert gauge("gateway_active_key_slot", slot="primary") == 1
    app.accepted_keys = {SECONDARY}
    assert httpx.post(gw.url + "/gauges/echo", content=b"{}").status_code == 200
    assert gauge("gateway_active_key_slot", slot="secondary") == 1
    assert gauge("gateway_active_key_slot", slot="primary") == 0
    app.accepted_keys = set()
    for _ in range(3):
        assert httpx.post(gw.url + "/gauges/echo", content=b"{}").status_code == 401
    assert gauge("gateway_credential_ready") == 0
    assert gauge("gateway_credential_rejected", slot="secondary") == 1
    assert gauge("gateway_credential_rejected", slot="primary") == 1
    assert (gauge("gateway_credential_rejections_total", slot="primary") or 0) >= 3
    app.accepted_keys = {PRIMARY, SECONDARY}
    # The declared slots are tried again only after recheck_after_s; a fixed key is found by a request.
    assert httpx.post(gw.url + "/gauges/echo", content=b"{}").status_code == 200
    assert gauge("gateway_credential_ready") == 1


_WORKER = textwrap.dedent(
    """
    import sys, time
    from gateway import metrics
    metrics.CREDENTIAL_READY.labels("r").set(float(sys.argv[1]))
    metrics.CREDENTIAL_EXPIRY_TIMESTAMP.labels("r").set(float(sys.argv[2]))
    print("set", flush=True)
    time.sleep(60)
    """
)


def test_dead_workers_gauges_no_longer_count(tmp_path: Path) -> None:
    """Two worker processes share a multiprocess directory: one without a token (ready 0), one with
    (ready 1). When the one without is killed, readiness is the live worker's; while both live it is the
    minimum, and so is the expiry."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, ready, expiry], env=env, stdout=subprocess.PIPE, text=True
        )
        for ready, expiry in (("1", "2000"), ("0", "1000"))
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "set"
        render = [sys.executable, "-c", "from gateway import metrics; print(metrics.render()[0].decode())"]

        def scrape() -> str:
            return subprocess.run(
                render, env=env, capture_output=True, text=True, check=True, timeout=60
            ).stdout

        text = scrape()
        assert _value(text, "gateway_credential_ready", route="r") == 0
        assert _value(text, "gateway_credential_expiry_timestamp_seconds", route="r") == 1000
        workers[1].send_signal(signal.SIGKILL)
        workers[1].wait(10)
        text = scrape()
        assert _value(text, "gateway_credential_ready", route="r") == 1
        assert _value(text, "gateway_credential_expiry_timestamp_seconds", route="r") == 2000
        assert not any(str(workers[1].pid) in p.name for p in tmp_path.iterdir() if "live" in p.name)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)


def _free_port() -> int:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    return port


def _pids(directory: Path, pattern: str = "gauge_live*.db") -> set[int]:
    return {int(p.stem.rpartition("_")[2]) for p in directory.glob(pattern)}


def test_serve_with_two_workers_counts_live_workers_only(emulator: EmulatorServer, tmp_path: Path) -> None:
    """`gateway serve --workers 2` on a token route whose identity provider fails: no worker has a token.
    A worker that died earlier had one (its last gauge says ready): it must not count. A worker killed
    now has its gauge files removed by the next scrape."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    dead = subprocess.Popen(
        [sys.executable, "-c", _WORKER.replace("time.sleep(60)", ""), "1", "2000"], env=env, text=True
    )
    assert dead.wait(60) == 0
    assert _pids(directory) == {dead.pid}
    app = register_app(emulator)
    emulator.state.set_fault("token", status=503)
    port = _free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "access_log": False},
        "tls": {"ca_bundle": str(emulator.ca_file)},
        "routes": {
            "r": {
                "path": "/r",
                "upstream": emulator.http_url,
                "auth": {"type": "aad_token", "identity": identity(emulator, app)},
            }
        },
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that the workers go with it, whatever happens
    )
    url = f"http://127.0.0.1:{port}"

    def workers() -> set[int]:
        # Workers publish their credential gauges at start-up (the supervisor writes none of these).
        return _pids(directory, "gauge_livemin_*.db") - {dead.pid}

    try:
        deadline = time.monotonic() + 60
        while len(workers()) < 2:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        text = httpx.get(url + "/metrics", timeout=10).text
        assert dead.pid not in _pids(directory)
        assert _value(text, "gateway_credential_ready", route="r") == 0
        victim = min(workers())
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while victim in _pids(directory):
            assert time.monotonic() < deadline, "the killed worker's gauges still count"
            try:
                httpx.get(url + "/metrics", timeout=5)
            except httpx.HTTPError:
                pass  # the connection may have gone to the killed worker
            time.sleep(0.2)
        text = httpx.get(url + "/metrics", timeout=10).text
        assert _value(text, "gateway_credential_ready", route="r") == 0
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate(timeout=30)
        HYGIENE.record_output("`gateway serve --workers 2` (metrics scenario)", out, err)


def test_telemetry_counts_reach_every_metric_at_flush() -> None:
    """Telemetry counts in plain ints per route and adds them at flush: answered requests by status and
    caller, error answers by code, upstream answers, latency buckets and sum, retries and replays."""
    from gateway.callers import Caller
    from gateway.telemetry import RequestRecord, Telemetry

    def value(metric: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(metric, labels) or 0.0

    route = "telemetry-unit"
    caller = Caller(kind="key", name="team-a", id="key:team-a", label="key:team-a")
    before = {
        "ok": value("gateway_requests_total", route=route, status="200", error_code="", caller="key:team-a"),
        "err": value(
            "gateway_requests_total",
            route=route,
            status="502",
            error_code="upstream_unreachable",
            caller="anonymous",
        ),
        "up": value("gateway_upstream_responses_total", route=route, status="200"),
        "count": value("gateway_upstream_duration_seconds_count", route=route),
        "sum": value("gateway_upstream_duration_seconds_sum", route=route),
        "retries": value("gateway_upstream_retries_total", route=route),
        "replays": value("gateway_credential_replays_total", route=route),
    }
    telemetry = Telemetry(access_log=False)
    for _ in range(3):
        record = RequestRecord("POST", 100.0)
        record.route, record.caller, record.status, record.upstream_status = route, caller, 200, 200
        record.headers_at = 100.25
        record.retries, record.credential_replays = 1, 2
        telemetry.request_done(record)
    failed = RequestRecord("POST", 100.0)
    failed.route, failed.status, failed.error = route, 502, "upstream_unreachable"
    telemetry.request_done(failed)
    telemetry.flush()
    assert value("gateway_requests_total", route=route, status="200", error_code="", caller="key:team-a") == (
        before["ok"] + 3
    )
    assert (
        value(
            "gateway_requests_total",
            route=route,
            status="502",
            error_code="upstream_unreachable",
            caller="anonymous",
        )
        == before["err"] + 1
    )
    assert value("gateway_upstream_responses_total", route=route, status="200") == before["up"] + 3
    assert value("gateway_upstream_duration_seconds_count", route=route) == before["count"] + 3
    assert abs(value("gateway_upstream_duration_seconds_sum", route=route) - before["sum"] - 0.75) < 1e-9
    assert value("gateway_upstream_duration_seconds_bucket", route=route, le="0.25") >= 3
    assert value("gateway_upstream_retries_total", route=route) == before["retries"] + 3
    assert value("gateway_credential_replays_total", route=route) == before["replays"] + 6
