"""Credential verdicts no client can provoke (issue 11, items 4 and 5).

A request that gets a 401 still fails over at once (the other key, a fresh token), but a key slot or a
token is *declared* rejected (readiness, error log, metric) only after repeated rejections across distinct
requests within a window with no acceptance in between. A rejected token stays in use until a different
one exists; a forced refresh is always allowed for a token that had been accepted.

Real servers on loopback: the scriptable test upstream for keys, the emulator for tokens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from azure_env import (
    clean_emulator_fixture,  # noqa: F401 - pytest fixture
    emulator_fixture,  # noqa: F401 - pytest fixture
    endpoint_ref,
    gateway_config,
    identity,
    register_app,
)
from conftest import PRIMARY, SECONDARY, key_route
from servers import ServerThread
from test_client_conformance import Peer, RawUpstream
from test_replay import access_line

from gateway.app import GatewayApp
from gateway.credentials.probe import PROBE_TIMEOUT_S
from gateway.emulator.server import EmulatorServer

ROWS = {"data": [[5.1, 3.5, 1.4, 0.2]]}


def _keys(monkeypatch: pytest.MonkeyPatch, *, secondary: bool = True) -> dict[str, Any]:
    monkeypatch.setenv("VERDICT_PRIMARY", PRIMARY)
    monkeypatch.setenv("VERDICT_SECONDARY", SECONDARY)
    keys: dict[str, Any] = {"primary": {"env": "VERDICT_PRIMARY"}}
    if secondary:
        keys["secondary"] = {"env": "VERDICT_SECONDARY"}
    return keys


def _auth_headers(app: Any, since: int) -> list[str]:
    return [dict(r["headers"]).get("authorization", "") for r in app.requests[since:]]


def _auth_headers_for(app: Any, path: str) -> list[str]:
    return [dict(r["headers"]).get("authorization", "") for r in app.requests if r["path"] == path]


def _route(gw: ServerThread) -> dict[str, Any]:
    response = httpx.get(gw.url + "/readyz")
    route: dict[str, Any] = response.json()["routes"][0]
    route["http_status"] = response.status_code
    return route


# ------------------------------------------------------------------------------------------------ keys
def test_one_client_provoked_401_fails_over_but_declares_nothing(upstream, gateway_factory, monkeypatch):
    """A payload the endpoint's WAF refuses whatever the key: both keys are tried in the request, the
    client gets the 401, and the pod stays in its Service with both slots valid."""
    app, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_keys(monkeypatch))}})
    assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 200
    before = len(app.requests)
    app.fail_next = [401, 401]
    response = httpx.post(gw.url + "/iris/echo", content=b'{"evil": 1}')
    assert response.status_code == 401
    assert _auth_headers(app, before) == [f"Bearer {PRIMARY}", f"Bearer {SECONDARY}"]  # failed over at once
    route = _route(gw)
    assert route["http_status"] == 200 and route["ready"]
    assert route["state"] == "valid" and "rejected_slots" not in route
    assert route["active_slot"] == "primary"
    assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 200


def test_one_403_is_the_upstreams_answer_not_a_key_verdict(upstream, gateway_factory, monkeypatch):
    """Azure ML answers 401 to a bad key; a 403 (a WAF, score.py) says nothing about the key by default."""
    app, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_keys(monkeypatch))}})
    before = len(app.requests)
    app.fail_next = [403]
    assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 403
    assert len(app.requests) == before + 1  # not replayed with the other key
    route = _route(gw)
    assert route["http_status"] == 200 and route["state"] == "valid" and route["active_slot"] == "primary"


def test_reject_statuses_403_fails_over_once_without_a_verdict(upstream, gateway_factory, monkeypatch):
    app, server = upstream
    route_config = key_route(server.url, **_keys(monkeypatch), reject_statuses=[401, 403])
    gw = gateway_factory({"routes": {"iris": route_config}})
    before = len(app.requests)
    app.fail_next = [403]
    response = httpx.post(gw.url + "/iris/echo", content=b"{}")
    assert response.status_code == 200  # replayed with the secondary, which was accepted
    assert _auth_headers(app, before) == [f"Bearer {PRIMARY}", f"Bearer {SECONDARY}"]
    route = _route(gw)
    assert route["http_status"] == 200 and route["state"] == "valid" and "rejected_slots" not in route


def test_three_rejections_across_requests_declare_a_slot_rejected(
    upstream, gateway_factory, monkeypatch, caplog
):
    app, server = upstream
    app.accepted_keys = {"another-key-entirely-0123456789"}
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_keys(monkeypatch, secondary=False))}})
    with caplog.at_level(logging.INFO, logger="gateway"):
        for attempt in range(2):
            assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 401
            route = _route(gw)
            assert route["http_status"] == 200 and route["state"] == "valid", attempt
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 401
        route = _route(gw)
    assert route["http_status"] == 503 and route["state"] == "rejected"
    assert route["rejected_slots"] == ["primary"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("route iris" in e and "primary" in e and "3" in e for e in errors), errors
    assert all(PRIMARY not in e for e in errors)
    # Accepted again (the key was fixed at the endpoint): ready at once.
    app.accepted_keys = {PRIMARY}
    assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 200
    route = _route(gw)
    assert route["http_status"] == 200 and route["state"] == "valid"


def test_an_acceptance_between_rejections_resets_the_count(upstream, gateway_factory, monkeypatch):
    app, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_keys(monkeypatch, secondary=False))}})
    for _ in range(5):
        app.fail_next = [401]
        assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 401
        assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 200
    route = _route(gw)
    assert route["http_status"] == 200 and route["state"] == "valid"


def test_rejections_outside_the_window_do_not_add_up(upstream, gateway_factory, monkeypatch):
    app, server = upstream
    app.accepted_keys = set()
    route_config = key_route(server.url, **_keys(monkeypatch, secondary=False), reject_window_s=0.5)
    gw = gateway_factory({"routes": {"iris": route_config}})
    for _ in range(3):
        assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 401
        time.sleep(0.7)
    assert _route(gw)["http_status"] == 200
    # A threshold of 2 in a wider window.
    route_config = key_route(
        server.url, **_keys(monkeypatch, secondary=False), reject_after=2, reject_window_s=30
    )
    gw = gateway_factory({"routes": {"iris": route_config}})
    for _ in range(2):
        assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 401
    assert _route(gw)["http_status"] == 503


def test_both_keys_regenerated_turn_readyz_503_after_repeated_rejections(
    upstream, gateway_factory, monkeypatch
):
    app, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_keys(monkeypatch))}})
    assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 200
    app.accepted_keys = {"regenerated-primary-0123456789", "regenerated-secondary-0123456789"}
    statuses = []
    for _ in range(3):
        before = len(app.requests)
        statuses.append(httpx.post(gw.url + "/iris/echo", content=b"{}").status_code)
        forwarded = [r for r in app.requests[before:] if r["path"] == "/echo"]
        assert len(forwarded) <= 2  # each slot at most once per request
        statuses.append(_route(gw)["http_status"])
    assert statuses[:-1] == [401, 200, 401, 200, 401]
    route = _route(gw)
    assert route["http_status"] == 503 and route["state"] == "rejected"
    assert sorted(route["rejected_slots"]) == ["primary", "secondary"]
    assert PRIMARY not in str(route) and SECONDARY not in str(route)
    # Declared only after the gateway's own probe with each key was refused too.
    assert sorted(_auth_headers_for(app, "/swagger.json")) == sorted(
        [f"Bearer {PRIMARY}", f"Bearer {SECONDARY}"]
    )


def test_client_requests_to_a_path_refused_whatever_the_key_declare_nothing(
    upstream, gateway_factory, monkeypatch, caplog
):
    """With `upstream` the endpoint's base URL any client may pick a path that answers 401 whatever the
    key: three such requests declared both slots rejected, /readyz 503 for recheck_after_s. Refusals in
    client requests only make a slot suspect; the gateway's own probe with the key (GET swagger.json
    beside the scoring URI, as `gateway rotate` verifies a key) is accepted and clears the suspicion."""
    app, server = upstream
    gw = gateway_factory({"routes": {"iris": key_route(server.url, **_keys(monkeypatch))}})
    with caplog.at_level(logging.INFO, logger="gateway"):
        for _ in range(3):
            assert httpx.get(gw.url + "/iris/status/401").status_code == 401
        route = _route(gw)
    assert route["http_status"] == 200 and route["state"] == "valid", route
    assert "rejected_slots" not in route and "suspect_slots" not in route
    assert sorted(_auth_headers_for(app, "/swagger.json")) == sorted(
        [f"Bearer {PRIMARY}", f"Bearer {SECONDARY}"]
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("probe" in w and "accepted" in w and "primary" in w for w in warnings), warnings
    assert all(PRIMARY not in w and SECONDARY not in w for w in warnings)
    assert httpx.post(gw.url + "/iris/echo", content=b"{}").status_code == 200
    # However fast a client provokes refusals, each key is probed at most once per PROBE_INTERVAL_S.
    for _ in range(3):
        assert httpx.get(gw.url + "/iris/status/401").status_code == 401
    assert len(_auth_headers_for(app, "/swagger.json")) == 2
    assert _route(gw)["http_status"] == 200


def test_a_probe_that_cannot_tell_leaves_the_rule_of_repeated_refusals(
    upstream, gateway_factory, monkeypatch, caplog
):
    """`auth.probe_path` names the probe; one that answers 404 (no sign the key was even looked at) says
    nothing about the key, so the refusals alone decide, as before."""
    app, server = upstream
    route_config = key_route(server.url, **_keys(monkeypatch, secondary=False), probe_path="/status/404")
    gw = gateway_factory({"routes": {"iris": route_config}})
    with caplog.at_level(logging.INFO, logger="gateway"):
        for _ in range(3):
            assert httpx.get(gw.url + "/iris/status/401").status_code == 401
        route = _route(gw)
    assert route["http_status"] == 503 and route["rejected_slots"] == ["primary"], route
    assert [r["path"] for r in app.requests if r["path"] == "/status/404"] == ["/status/404"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("primary" in e and "/status/404" in e and "404" in e for e in errors), errors


async def _refuse_every_key_and_never_answer_the_probe(peer: Peer) -> None:
    """Every scoring request gets 401; the gateway's probe (GET swagger.json) never gets an answer."""
    while (request := await peer.read_request()) is not None:
        if b"/swagger.json" in request[0]:
            await asyncio.sleep(60)  # cancelled when the upstream stops
            return
        await peer.send(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 7\r\n\r\nrefused")


@pytest.mark.parametrize(
    "limits",
    [
        pytest.param({"timeout_s": 2, "retry": {"deadline_s": 1}}, id="retry.deadline_s"),
        pytest.param({"timeout_s": 1}, id="timeout_s"),
    ],
)
def test_a_probe_that_never_answers_holds_the_request_no_longer_than_its_deadline(
    gateway_factory, monkeypatch, caplog, limits
):
    """The refusal that calls for the verdict waits for the gateway's probe only until the request's own
    deadline (`retry.deadline_s`, else `timeout_s`): a probe URL that never answers held the client for
    PROBE_TIMEOUT_S (10 s) with deadline_s 1. Past its deadline the request gets the upstream's refusal,
    as it would without a replay."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    with RawUpstream(_refuse_every_key_and_never_answer_the_probe) as raw:
        route_config = key_route(raw.url, **_keys(monkeypatch, secondary=False), reject_after=1)
        gw = gateway_factory({"routes": {"iris": {**route_config, **limits}}})
        started = time.monotonic()
        response = httpx.post(
            gw.url + "/iris/score", content=b"{}", headers={"x-request-id": "probe-deadline"}, timeout=30
        )
        waited = time.monotonic() - started
        assert response.status_code == 401 and response.content == b"refused", response.text
        assert raw.executions(b"/swagger.json") == 1  # the probe was sent and is still under way
    # Well over the deadline of 1 s (a loaded machine), well under the probe's own timeout.
    assert waited < PROBE_TIMEOUT_S / 2, f"the client waited {waited:.1f} s for the gateway's probe"
    line = access_line(caplog, "probe-deadline").getMessage()
    assert " status=401 upstream_status=401 " in line and " attempts=1 " in line, line


def test_a_score_refused_whatever_the_key_at_the_emulator_declares_nothing(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The emulator's front end, as Azure ML: swagger.json answers 401 to a wrong key and 200 to a valid
    one; scoring refused for both keys in three requests (a payload its WAF refuses) is not a verdict."""
    with httpx.Client() as client:
        assert client.get(emulator.http_url + "/swagger.json").status_code == 401
        bad = {"Authorization": "Bearer not-a-key-of-this-endpoint"}
        assert client.get(emulator.http_url + "/swagger.json", headers=bad).status_code == 401
        good = {"Authorization": f"Bearer {emulator.state.primary_key}"}
        assert client.get(emulator.http_url + "/swagger.json", headers=good).status_code == 200
    monkeypatch.setenv("EMULATOR_PRIMARY", emulator.state.primary_key)
    monkeypatch.setenv("EMULATOR_SECONDARY", emulator.state.secondary_key)
    auth = {"type": "key", "primary": {"env": "EMULATOR_PRIMARY"}, "secondary": {"env": "EMULATOR_SECONDARY"}}
    config = gateway_config(emulator, {"iris": {"auth": auth}})
    with (
        ServerThread(GatewayApp(config)) as gateway,
        httpx.Client(base_url=gateway.url, timeout=10) as client,
    ):
        emulator.state.set_fault("score", status=401, count=6)
        assert [client.post("/iris/score", json=ROWS).status_code for _ in range(3)] == [401] * 3
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["routes"][0]["state"] == "valid", ready.text
        assert client.post("/iris/score", json=ROWS).status_code == 200
    # Keys the endpoint really refuses (both regenerated in Azure) are still declared: the probe with
    # each is refused too.
    emulator.state.regenerate_key("primary", None)
    emulator.state.regenerate_key("secondary", None)
    with (
        ServerThread(GatewayApp(config)) as gateway,
        httpx.Client(base_url=gateway.url, timeout=10) as client,
    ):
        assert [client.post("/iris/score", json=ROWS).status_code for _ in range(3)] == [401] * 3
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["routes"][0]["state"] == "rejected", ready.text


# ---------------------------------------------------------------------------------------------- tokens
def _aad_gateway(emulator: EmulatorServer) -> tuple[ServerThread, Any]:
    app = register_app(emulator)
    config = gateway_config(
        emulator, {"aad": {"auth": {"type": "aad_token", "identity": identity(emulator, app)}}}
    )
    return ServerThread(GatewayApp(config)), app


def test_spurious_401_while_entra_id_is_down_keeps_the_token(emulator: EmulatorServer) -> None:
    """One 401 on a token valid for an hour, and the identity provider down at that moment: the request
    gets the upstream's 401, every later request still uses the (suspect) token: no 503."""
    gateway, app = _aad_gateway(emulator)
    with gateway, httpx.Client(base_url=gateway.url, timeout=10) as client:
        assert client.post("/aad/score", json=ROWS).status_code == 200
        emulator.state.set_fault("token", status=503)
        emulator.state.set_fault("score", status=401, count=1)
        assert client.post("/aad/score", json=ROWS).status_code == 401
        for _ in range(5):
            response = client.post("/aad/score", json=ROWS)
            assert response.status_code == 200, response.text
        ready = client.get("/readyz")
        route = ready.json()["routes"][0]
        assert ready.status_code == 200 and route["ready"]
    assert emulator.state.token_request_count(app.client_id) >= 2  # a new token was asked for


def test_revocation_seconds_after_a_refresh_is_recovered(emulator: EmulatorServer) -> None:
    """The forced refresh after a 401 is not rate-limited when the rejected token had been accepted."""
    app = register_app(emulator)
    auth = {
        "type": "aml_token",
        "identity": identity(emulator, app),
        "endpoint": endpoint_ref(),
        "arm_url": emulator.https_url,
    }
    config = gateway_config(emulator, {"aml": {"auth": auth}})
    with (
        ServerThread(GatewayApp(config)) as gateway,
        httpx.Client(base_url=gateway.url, timeout=10) as client,
    ):
        assert client.post("/aml/score", json=ROWS).status_code == 200
        calls = emulator.state.arm_call_count("token")
        for round_ in range(1, 4):  # three revocations within a second or two
            emulator.state.revoke_aml_tokens()
            response = client.post("/aml/score", json=ROWS)
            assert response.status_code == 200, (round_, response.text)
            assert emulator.state.arm_call_count("token") == calls + round_
        route = client.get("/readyz").json()["routes"][0]
        assert route["state"] == "valid"


def test_token_never_accepted_is_refreshed_at_most_once_per_interval_and_then_declared(
    emulator: EmulatorServer,
) -> None:
    """The identity may not call the endpoint: every token is refused. A new token is asked for once,
    not per request, and after repeated rejections across requests the route is not ready."""
    gateway, app = _aad_gateway(emulator)
    with gateway, httpx.Client(base_url=gateway.url, timeout=10) as client:
        emulator.state.set_fault("score", status=401)
        statuses = [client.post("/aad/score", json=ROWS).status_code for _ in range(2)]
        # The first request was replayed with a second token, refused too: one request, one count.
        assert client.get("/readyz").status_code == 200
        statuses += [client.post("/aad/score", json=ROWS).status_code for _ in range(2)]
        assert statuses == [401] * 4
        assert emulator.state.token_request_count(app.client_id) == 2  # the first and one forced
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["routes"][0]["state"] == "rejected"
        emulator.state.clear_faults("score")
        assert client.post("/aad/score", json=ROWS).status_code == 200
        assert client.get("/readyz").status_code == 200


def test_a_revocation_under_concurrent_load_declares_nothing(
    emulator: EmulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Twenty requests in flight when the token is revoked: all are refused at about the same time, while
    one new token is fetched. That is one event, not twenty rejections: every request is replayed and
    answered, and the route never leaves its Service."""
    app = register_app(emulator)
    auth = {
        "type": "aml_token",
        "identity": identity(emulator, app),
        "endpoint": endpoint_ref(),
        "arm_url": emulator.https_url,
    }
    config = gateway_config(emulator, {"aml": {"auth": auth}})
    with (
        ServerThread(GatewayApp(config)) as gateway,
        httpx.Client(base_url=gateway.url, timeout=10) as client,
    ):
        assert client.post("/aml/score", json=ROWS).status_code == 200
        calls = emulator.state.arm_call_count("token")
        emulator.state.revoke_aml_tokens()
        emulator.state.set_fault("arm", delay_s=0.5)  # the new token takes a while: refusals pile up
        with caplog.at_level(logging.INFO, logger="gateway"), ThreadPoolExecutor(20) as pool:
            statuses = list(
                pool.map(
                    lambda _: httpx.post(gateway.url + "/aml/score", json=ROWS, timeout=10).status_code,
                    range(20),
                )
            )
        assert statuses == [200] * 20
        assert emulator.state.arm_call_count("token") == calls + 1
        route = client.get("/readyz").json()["routes"][0]
        assert route["ready"] and route["state"] == "valid"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
