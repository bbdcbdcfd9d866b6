"""Identity and control-plane faults under load, against the emulator (Entra ID + ARM) over TLS.

The scoring upstream is the fault kit's upstream (so request ids and executions are counted); it
authenticates every request against the emulator's own state: its Entra ID token signature and
audience, or its current endpoint keys.
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from faultkit import OK, Answer, Ledger, Request, drive, fault_upstream, wait_until

from gateway.emulator.server import EmulatorServer
from gateway.emulator.state import AML_RESOURCE, ARM_RESOURCE, EmulatorState, TokenValidationError

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

_MISSING = [
    name
    for name in ("gateway.credentials.aad", "gateway.credentials.control_plane", "gateway.tokens")
    if importlib.util.find_spec(name) is None
]
needs_token_credentials = pytest.mark.skipif(
    bool(_MISSING), reason=f"token credentials not written yet: {', '.join(_MISSING)} missing"
)
ENDPOINT = {"subscription_id": "00000000-0000-0000-0000-000000000000", "resource_group": "rg",
            "workspace": "ws", "name": "iris-endpoint"}  # fmt: skip


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    with EmulatorServer(EmulatorState()) as server:
        yield server


@pytest.fixture
def app(emulator: EmulatorServer) -> Iterator[dict[str, str]]:
    """A fresh app registration (its own tenant), and the emulator back to defaults afterwards."""
    tenant, client = str(uuid.uuid4()), str(uuid.uuid4())
    secret = f"fault-secret-{uuid.uuid4().hex}"
    emulator.state.add_app(tenant, client, secret=secret)
    yield {"tenant_id": tenant, "client_id": client, "secret": secret}
    emulator.state.clear_faults()
    emulator.state.configure(token_lifetime_s=3600, refresh_in_s=None)


def _identity(emulator: EmulatorServer, app: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("FAULT_CLIENT_SECRET", app["secret"])
    return {
        "tenant_id": app["tenant_id"],
        "client_id": app["client_id"],
        "client_secret": {"env": "FAULT_CLIENT_SECRET"},
        "authority_host": emulator.authority_host,
        "timeout_s": 3,
    }


def _entra_checked(emulator: EmulatorServer) -> Any:
    def behaviour(request: Request) -> Answer:
        try:
            emulator.state.verify_access_token(request.key, audiences=(AML_RESOURCE,))
        except TokenValidationError:
            return Answer(401)
        return OK

    return behaviour


def _aad_gateway(gateway_factory: Any, emulator: EmulatorServer, upstream_url: str, identity: dict) -> Any:
    return gateway_factory(
        {
            "tls": {"ca_bundle": str(emulator.ca_file)},
            "routes": {
                "aad": {
                    "path": "/aad",
                    "upstream": upstream_url,
                    "auth": {"type": "aad_token", "identity": identity},
                }
            },
        }
    )


@needs_token_credentials
@pytest.mark.parametrize(
    ("scenario", "fault"),
    [
        ("identity_provider_down", {"status": 503}),
        ("identity_provider_429_storm", {"status": 429, "retry_after": 1}),
    ],
)
def test_identity_provider_fails_while_the_cached_token_is_valid(
    gateway_factory, emulator, app, monkeypatch, scenario, fault
):
    """Entra ID fails (down, or throttling with Retry-After) exactly when the gateway refreshes its
    token: the cached token is still valid, so no client notices, and the gateway does not turn the
    load into a storm of token requests."""
    state = emulator.state
    # Valid for 20 s, refresh asked for after 1 s: the refresh falls inside the outage.
    state.configure(token_lifetime_s=20, refresh_in_s=1)
    ledger = Ledger()
    with fault_upstream(ledger, behaviour=_entra_checked(emulator)) as upstream:
        gw = _aad_gateway(gateway_factory, emulator, upstream.url, _identity(emulator, app, monkeypatch))
        assert httpx.post(gw.url + "/aad/score", content=b"{}", timeout=10).status_code == 200  # warm
        client = app["client_id"]
        # At least the first token. Not exactly one: on a slow machine the 1 s refresh may already have
        # come (and succeeded) before this line; the outage then catches a later one.
        assert state.token_request_count(client) >= 1
        seen: dict[str, Any] = {}

        def outage() -> None:
            state.set_fault("token", **fault)
            seen["before"] = state.token_request_count(client)

        def refresh_failed() -> None:
            seen["refresh_tried"] = wait_until(lambda: state.token_request_count(client) > seen["before"], 20)

        load = drive(
            scenario,
            gw.url + "/aad/score",
            total=500,
            ledger=ledger,
            events=[(20, "identity provider fails", outage), (60, "refresh fails", refresh_failed)],
        )
        during = state.token_request_count(client) - seen["before"]
        status = httpx.get(gw.url + "/readyz").json()["routes"][0]

    assert seen.get("refresh_tried"), "the gateway never tried to refresh during the outage"
    assert not load.failed, load.summary()
    assert load.duplicated == 0
    assert 1 <= during <= 6, f"{during} token requests while Entra ID was failing: not backing off"
    # Still ready (the token is valid), and /readyz says what is failing.
    assert status["ready"] and status["state"] == "refreshing" and status.get("detail"), status


@needs_token_credentials
def test_both_keys_regenerated_through_the_control_plane(gateway_factory, emulator, app, monkeypatch):
    """The route's keys come from ARM listKeys; an operator regenerates both keys mid-load (ARM
    regenerateKeys). Requests with the old keys are refused by the endpoint; the gateway fetches the
    keys again (once, not per request) and replays: no client notices."""
    state = emulator.state
    ledger = Ledger()

    def keys_checked(request: Request) -> Answer:
        return OK if state.match_key(request.key) else Answer(401)

    with fault_upstream(ledger, behaviour=keys_checked, delay_s=0.002) as upstream:
        gw = gateway_factory(
            {
                "tls": {"ca_bundle": str(emulator.ca_file)},
                "routes": {
                    "iris": {
                        "path": "/iris",
                        "upstream": upstream.url,
                        "auth": {
                            "type": "key",
                            "from_endpoint": ENDPOINT,
                            "identity": _identity(emulator, app, monkeypatch),
                            "arm_url": emulator.https_url,
                        },
                    }
                },
            }
        )
        assert httpx.post(gw.url + "/iris/score", content=b"{}", timeout=10).status_code == 200
        management = state.issue_access_token(
            audience=ARM_RESOURCE, tenant_id=app["tenant_id"], appid=app["client_id"]
        )
        old = state.keys()
        list_keys_before = state.arm_call_count("listKeys")

        def regenerate_both() -> None:
            with httpx.Client(verify=emulator.ssl_context(), trust_env=False, timeout=10) as arm:
                for key_type in ("Primary", "Secondary"):
                    response = arm.post(
                        emulator.arm_endpoint_url("regenerateKeys"),
                        json={"keyType": key_type},
                        headers={"Authorization": f"Bearer {management}"},
                    )
                    assert response.status_code == 202, response.text

        load = drive(
            "control_plane_keys_regenerated",
            gw.url + "/iris/score",
            total=400,
            ledger=ledger,
            events=[(150, "regenerate both keys", regenerate_both)],
        )
        refetches = state.arm_call_count("listKeys") - list_keys_before

    new = state.keys()
    assert new["primary"] != old["primary"] and new["secondary"] != old["secondary"]
    assert not load.failed, load.summary()
    assert load.duplicated == 0
    assert ledger.outcomes["401"] >= 1, "the regeneration reached no request"
    assert 1 <= refetches <= 3, f"{refetches} listKeys calls: the keys were not fetched once"
    assert (
        ledger.auth_count(f"Bearer {new['primary']}") + ledger.auth_count(f"Bearer {new['secondary']}") > 100
    )


@needs_token_credentials
def test_identity_provider_down_at_start_answers_503_credential_unavailable(
    gateway_factory, emulator, app, monkeypatch
):
    """No token was ever obtained and Entra ID is down: there is no retry path, so every client gets
    503 credential_unavailable quickly (never a hang), the upstream is never called without a token,
    and the identity provider is not called once per request."""
    state = emulator.state
    state.set_fault("token", status=503)
    ledger = Ledger()
    with fault_upstream(ledger, behaviour=_entra_checked(emulator)) as upstream:
        gw = _aad_gateway(gateway_factory, emulator, upstream.url, _identity(emulator, app, monkeypatch))
        load = drive("identity_provider_down_at_start", gw.url + "/aad/score", total=200, ledger=ledger)
        calls = state.token_request_count(app["client_id"])

    assert len(load.failed) == load.sent, load.summary()
    for outcome in load.failed:
        assert (outcome.status, outcome.code) == (503, "credential_unavailable"), outcome
        assert outcome.elapsed < 4.0  # at most one token request's timeout (3 s)
    assert sum(ledger.attempts.values()) == 0
    assert 1 <= calls <= 5, f"{calls} token requests for {load.sent} client requests"
