"""`aml_token` routes and control-plane keys (`key` with `from_endpoint`) against the emulated ARM, with
real MSAL for the management token; and end to end through the gateway under concurrent load."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

import httpx
import pytest
from azure_env import (
    App,
    build,
    clean_emulator_fixture,  # noqa: F401 - fixture
    emulator_fixture,  # noqa: F401 - fixture
    endpoint_ref,
    gateway_config,
    identity,
    management_token,
    register_app,
    run,
    scheduled_refreshes,
    wait_for,
)
from servers import ServerThread

from gateway.app import GatewayApp
from gateway.credentials import Credential
from gateway.credentials.base import Grant
from gateway.emulator.server import EmulatorServer
from gateway.errors import CredentialUnavailable

ARM_SCOPE = "https://management.azure.com/.default"
ROWS = {"data": [[5.1, 3.5, 1.4, 0.2]]}


def aml_auth(emulator: EmulatorServer, app: App) -> dict[str, Any]:
    return {
        "type": "aml_token",
        "identity": identity(emulator, app),
        "endpoint": endpoint_ref(),
        "arm_url": emulator.https_url,
    }


def keys_auth(emulator: EmulatorServer, app: App, **extra: Any) -> dict[str, Any]:
    return {
        "type": "key",
        "from_endpoint": endpoint_ref(),
        "identity": identity(emulator, app),
        "arm_url": emulator.https_url,
        **extra,
    }


def score(emulator: EmulatorServer, grant: Grant) -> int:
    assert grant.header is not None
    response = httpx.post(emulator.scoring_uri, json=ROWS, headers={"Authorization": grant.header})
    return response.status_code


def regenerate(emulator: EmulatorServer, app: App, key_type: str) -> None:
    """Regenerate a key the way an operator does: ARM regenerateKeys on the endpoint."""
    response = httpx.post(
        emulator.arm_endpoint_url("regenerateKeys"),
        json={"keyType": key_type},
        headers={"Authorization": f"Bearer {management_token(emulator, app)}"},
        verify=emulator.ssl_context(),
    )
    assert response.status_code == 202, response.text


def grant_of(credential: Credential) -> Grant:
    async def get() -> Grant:
        return await credential.grant()

    return run(get())


# ---------------------------------------------------------------------------------------- aml_token
def test_aml_token_from_arm_is_accepted_by_the_endpoint(emulator: EmulatorServer) -> None:
    app = register_app(emulator)
    credential = build(emulator, aml_auth(emulator, app))
    assert credential.grant_nowait() is None
    tokens_before = emulator.state.arm_call_count("token")

    async def scenario() -> Grant:
        grants = await asyncio.gather(*(credential.grant() for _ in range(100)))
        assert len({g.header for g in grants}) == 1
        return grants[0]

    grant = run(scenario())
    assert score(emulator, grant) == 200
    assert emulator.state.score_auth_count("aml_token") >= 1
    assert emulator.state.arm_call_count("token") - tokens_before == 1
    assert emulator.state.token_request_count(app.client_id, ARM_SCOPE) == 1
    status = credential.status()
    assert status.kind == "aml_token" and status.state == "valid"
    assert status.source.startswith("ARM token for endpoint iris-endpoint as client_secret literal")


def test_aml_token_is_refreshed_at_refresh_after(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator.state.configure(aml_token_lifetime_s=4)  # refreshAfterTimeUtc: half of it
    app = register_app(emulator)
    credential = build(emulator, aml_auth(emulator, app))
    decisions = scheduled_refreshes(monkeypatch)
    arrivals: list[float] = []  # ARM token calls, on the gateway's clock (the emulator is in-process)
    record = emulator.state.record_arm_call

    def record_arm_call(operation: str) -> None:
        if operation == "token":
            arrivals.append(time.monotonic())
        record(operation)

    monkeypatch.setattr(emulator.state, "record_arm_call", record_arm_call)

    async def scenario() -> None:
        await credential.start()
        try:
            assert await wait_for(lambda: credential.grant_nowait() is not None, 10)
            first = credential.grant_nowait()
            entry = credential.entry  # type: ignore[attr-defined]
            refresh_at = entry.refresh_mono
            # The ARM token's own refresh time decides (whole seconds: 1-2 s of a 4 s lifetime), not
            # two thirds of the lifetime; jitter is at most 5 % of the lifetime.
            lifetime, hint, delay = next(
                d for d in decisions if d[0] < 100
            )  # not the 3600 s management token
            assert 3 < lifetime < 4.5 and hint is not None and 1 <= hint <= 3, (lifetime, hint)
            assert hint <= delay <= hint + 0.05 * lifetime, (hint, delay)
            assert await wait_for(lambda: len(arrivals) >= 2, 20)
            assert arrivals[1] >= refresh_at  # not before it was due
            assert await wait_for(lambda: credential.grant_nowait() is not first, 10)
        finally:
            await credential.close()

    run(scenario())
    # The management token (3600 s) was fetched once and reused for both ARM calls.
    assert emulator.state.token_request_count(app.client_id, ARM_SCOPE) == 1


def test_arm_401_fetches_the_management_token_again_once(emulator: EmulatorServer) -> None:
    app = register_app(emulator)
    credential = build(emulator, aml_auth(emulator, app))
    emulator.state.set_fault("arm", status=401, count=1)
    assert score(emulator, grant_of(credential)) == 200
    assert emulator.state.token_request_count(app.client_id, ARM_SCOPE) == 2


def test_arm_403_says_which_permission_is_missing(emulator: EmulatorServer) -> None:
    app = register_app(emulator)
    credential = build(emulator, aml_auth(emulator, app))
    emulator.state.set_fault("arm", status=403)
    with pytest.raises(CredentialUnavailable) as raised:
        grant_of(credential)
    assert "403 AuthorizationFailed" in raised.value.message
    status = credential.status()
    assert not status.ready
    assert "onlineEndpoints/token/action" in (status.detail or "")


def test_revoked_aml_token_is_replaced_when_the_endpoint_refuses_it(emulator: EmulatorServer) -> None:
    app = register_app(emulator)
    credential = build(emulator, aml_auth(emulator, app))

    async def scenario() -> None:
        first = await credential.grant()
        emulator.state.revoke_aml_tokens()
        assert await asyncio.to_thread(score, emulator, first) == 401
        second = await credential.rejected(first)
        assert second is not None
        assert await asyncio.to_thread(score, emulator, second) == 200

    run(scenario())


# ---------------------------------------------------------------------------------------- listKeys
def test_control_plane_keys_are_fetched_once_for_concurrent_first_requests(emulator: EmulatorServer) -> None:
    app = register_app(emulator)
    credential = build(emulator, keys_auth(emulator, app))
    assert credential.grant_nowait() is None
    status = credential.status()
    assert status.state == "pending" and not status.ready
    before = emulator.state.arm_call_count("listKeys")

    async def scenario() -> set[str | None]:
        grants = await asyncio.gather(*(credential.grant() for _ in range(100)))
        return {g.header for g in grants}

    assert run(scenario()) == {f"Bearer {emulator.state.primary_key}"}
    assert emulator.state.arm_call_count("listKeys") - before == 1
    status = credential.status()
    assert status.kind == "key" and status.state == "valid" and status.active_slot == "primary"
    assert status.source.startswith("listKeys of endpoint iris-endpoint as client_secret literal")


def test_regenerated_keys_reach_the_credential_without_a_failed_request(emulator: EmulatorServer) -> None:
    app = register_app(emulator)
    credential = build(emulator, keys_auth(emulator, app))

    async def scenario() -> None:
        primary = await credential.grant()
        assert await asyncio.to_thread(score, emulator, primary) == 200
        listed = emulator.state.arm_call_count("listKeys")

        await asyncio.to_thread(regenerate, emulator, app, "Primary")
        assert await asyncio.to_thread(score, emulator, primary) == 401
        secondary = await credential.rejected(primary)  # the other held key: no control-plane call
        assert secondary is not None and secondary.slot == "secondary"
        assert await asyncio.to_thread(score, emulator, secondary) == 200
        credential.accepted(secondary)
        assert emulator.state.arm_call_count("listKeys") == listed

        await asyncio.to_thread(regenerate, emulator, app, "Secondary")
        assert await asyncio.to_thread(score, emulator, secondary) == 401
        fresh = await credential.rejected(secondary)  # both held keys are stale: listKeys at once
        assert fresh is not None
        assert await asyncio.to_thread(score, emulator, fresh) == 200
        assert emulator.state.arm_call_count("listKeys") == listed + 1

    run(scenario())


def test_keys_are_refreshed_in_the_background(emulator: EmulatorServer) -> None:
    app = register_app(emulator)
    credential = build(emulator, keys_auth(emulator, app, refresh_every_s=0.5))

    async def scenario() -> None:
        await credential.start()
        try:
            assert await wait_for(lambda: credential.grant_nowait() is not None, 3)
            new_primary = emulator.state.regenerate_key("primary")
            grant = credential.grant_nowait
            assert await wait_for(
                lambda: (g := grant()) is not None and g.header == f"Bearer {new_primary}", 2
            )
        finally:
            await credential.close()

    run(scenario())


def test_keys_unavailable_until_listkeys_succeeds(emulator: EmulatorServer) -> None:
    app = register_app(emulator)
    credential = build(emulator, keys_auth(emulator, app))
    emulator.state.set_fault("arm", status=503, retry_after=1)

    async def scenario() -> None:
        with pytest.raises(CredentialUnavailable) as raised:
            await credential.grant()
        assert raised.value.retry_after is not None and raised.value.retry_after >= 1
        assert "503" in raised.value.message
        status = credential.status()
        assert (
            status.state == "unavailable"
            and not status.ready
            and "throttling or failing" in (status.detail or "")
        )
        emulator.state.clear_faults()
        await credential.start()
        try:
            assert await wait_for(lambda: credential.grant_nowait() is not None, 3)
        finally:
            await credential.close()

    run(scenario())


# ---------------------------------------------------------------------------------------- end to end
def test_gateway_aml_token_route_survives_a_revocation(emulator: EmulatorServer) -> None:
    app = register_app(emulator)
    config = gateway_config(emulator, {"aml": {"auth": aml_auth(emulator, app)}})
    with (
        ServerThread(GatewayApp(config)) as gateway,
        httpx.Client(base_url=gateway.url, timeout=10) as client,
    ):
        response = client.post("/aml/score", json=ROWS)
        assert response.status_code == 200, response.text
        assert json.loads(response.json()) == ["setosa"]
        calls = emulator.state.arm_call_count("token")
        emulator.state.revoke_aml_tokens()
        response = client.post("/aml/score", json=ROWS)
        assert response.status_code == 200, response.text
        assert emulator.state.arm_call_count("token") == calls + 1
        route = client.get("/readyz").json()["routes"][0]
        assert route["auth_type"] == "aml_token" and route["state"] == "valid"


def test_gateway_keys_regenerated_under_load_fail_no_request(emulator: EmulatorServer) -> None:
    app = register_app(emulator)
    config = gateway_config(emulator, {"keys": {"auth": keys_auth(emulator, app)}})
    threads, per_thread = 8, 50
    statuses: list[int] = []
    done = 0
    lock = threading.Lock()

    def client_thread(url: str) -> None:
        nonlocal done
        with httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(per_thread):
                status = client.post("/keys/score", json=ROWS).status_code
                with lock:
                    statuses.append(status)
                    done += 1
                time.sleep(0.002)

    def wait_until(count: int) -> None:
        deadline = time.monotonic() + 20
        while done < count and time.monotonic() < deadline:
            time.sleep(0.005)

    refused = emulator.state.score_count("401")
    with ServerThread(GatewayApp(config)) as gateway:
        workers = [threading.Thread(target=client_thread, args=(gateway.url,)) for _ in range(threads)]
        for worker in workers:
            worker.start()
        wait_until(100)
        regenerate(emulator, app, "Primary")  # -> failover to the secondary key
        wait_until(220)
        regenerate(emulator, app, "Secondary")  # -> both held keys stale: listKeys, then replay
        for worker in workers:
            worker.join(30)
        ready = httpx.get(f"{gateway.url}/readyz").json()["routes"][0]

    assert len(statuses) == threads * per_thread
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert emulator.state.score_count("401") > refused  # the upstream did refuse stale keys...
    assert ready["ready"] and ready["state"] == "valid"  # ...and the gateway recovered every time


# ---------------------------------------------------------------------------------------------------------
# Numbers and messages from a misbehaving control plane (issue 19)


@pytest.mark.parametrize(
    ("setting", "value"), [("aml_token_expiry", "nan"), ("aml_token_refresh_after", "inf")]
)
def test_non_finite_token_times_are_refused_and_fetches_keep_a_floor(
    emulator: EmulatorServer, setting: str, value: str
) -> None:
    """ARM answers a token whose times are not finite: it is refused with a message saying so, and the
    gateway asks again at most once a second (once, `nan` made thousands of ARM calls a second)."""
    app = register_app(emulator)
    emulator.state.configure(**{setting: value})
    config = gateway_config(emulator, {"aml": {"auth": aml_auth(emulator, app)}})
    with (
        ServerThread(GatewayApp(config)) as gateway,
        httpx.Client(base_url=gateway.url, timeout=10) as client,
    ):
        calls = emulator.state.arm_call_count("token")
        started = time.monotonic()
        statuses = set()
        deadline = started + 30
        while emulator.state.arm_call_count("token") < calls + 4 and time.monotonic() < deadline:
            statuses.add(client.post("/aml/score", json=ROWS).status_code)  # requests keep coming
        elapsed = time.monotonic() - started
        assert emulator.state.arm_call_count("token") >= calls + 4
        assert elapsed >= 2.9, f"4 token calls in {elapsed:.2f} s: no floor between attempts"
        assert statuses == {503}  # no usable token: requests and readiness agree
        ready = client.get("/readyz").json()
        assert ready["ready"] is False
        detail = ready["routes"][0]["detail"]
        field = "expiryTimeUtc" if setting == "aml_token_expiry" else "refreshAfterTimeUtc"
        assert field in detail and "not a finite" in detail, detail


def test_a_huge_arm_error_message_is_cut_short_in_readyz_and_logs(
    emulator: EmulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = register_app(emulator)
    emulator.state.configure(arm_error_message=("y" * 100 + "\x1b[31m\r\nforged log line ") * 50_000)
    emulator.state.set_fault("arm", status=500)
    caplog.set_level(logging.WARNING, logger="gateway")
    config = gateway_config(emulator, {"aml": {"auth": aml_auth(emulator, app)}})
    with (
        ServerThread(GatewayApp(config)) as gateway,
        httpx.Client(base_url=gateway.url, timeout=10) as client,
    ):
        assert client.post("/aml/score", json=ROWS).status_code == 503
        answer = client.get("/readyz")
        assert len(answer.content) < 4000, len(answer.content)
        detail = answer.json()["routes"][0]["detail"]
        assert "ARM token answered 500" in detail and "yyyy" in detail
        assert "\x1b" not in detail and "\n" not in detail and "\r" not in detail
    lines = [r.getMessage() for r in caplog.records if "ARM token answered 500" in r.getMessage()]
    assert lines and all(len(line) < 2000 and "\x1b" not in line and "\n" not in line for line in lines)
