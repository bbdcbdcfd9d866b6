"""The emulated Entra ID as the issuer of caller tokens: an API app registration (the gateway's), app roles
assigned to client apps and managed identities, v1/v2 tokens by the API's `accessTokenAcceptedVersion`,
discovery and keys on the v1 and v2 paths, signing key rotation, and the `openid` fault.

Real sockets, real TLS (the emulator's CA), real MSAL. What the gateway does with these tokens is in
tests/test_caller_tokens.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import msal
import pytest

from gateway.emulator import EmulatorServer, EmulatorState, MsalHttpxClient

TENANT = "c0ffee00-0000-4000-8000-00000000ca11"
OTHER_TENANT = "c0ffee00-0000-4000-8000-00000000ca12"
GATEWAY_URI = "api://scoring-gateway"
GATEWAY_APP = "9a7e0000-0000-4000-8000-0000000000a1"
CLIENT = "c1000000-0000-4000-8000-000000000001"
CLIENT_SECRET = "caller-client-secret-value"
NO_ROLE_CLIENT = "c1000000-0000-4000-8000-000000000002"


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    state = EmulatorState()
    state.add_app(TENANT, CLIENT, secret=CLIENT_SECRET)
    state.add_app(TENANT, NO_ROLE_CLIENT, secret=CLIENT_SECRET)
    state.add_app(OTHER_TENANT, CLIENT, secret=CLIENT_SECRET)
    state.apis.add(
        TENANT,
        identifier_uri=GATEWAY_URI,
        client_id=GATEWAY_APP,
        app_roles=["Scoring.Invoke", "Scoring.Admin"],
    )
    state.apis.assign(GATEWAY_APP, CLIENT, "Scoring.Invoke")
    with EmulatorServer(state) as server:
        yield server


@pytest.fixture(autouse=True)
def _v1_tokens_and_no_faults(emulator: EmulatorServer) -> Iterator[None]:
    yield
    emulator.state.apis.set_token_version(GATEWAY_APP, None)
    emulator.state.clear_faults()


@pytest.fixture
def http(emulator: EmulatorServer) -> Iterator[httpx.Client]:
    with emulator.http_client() as client:
        yield client


def client_token(
    emulator: EmulatorServer, http: httpx.Client, client_id: str, *, tenant: str = TENANT
) -> str:
    app = msal.ConfidentialClientApplication(
        client_id,
        client_credential=CLIENT_SECRET,
        authority=emulator.authority(tenant),
        instance_discovery=False,
        http_client=MsalHttpxClient(http),
    )
    result = app.acquire_token_for_client([f"{GATEWAY_URI}/.default"])
    assert "access_token" in result, result
    token: str = result["access_token"]
    return token


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def test_v1_token_for_the_gateway_carries_the_assigned_role(
    emulator: EmulatorServer, http: httpx.Client
) -> None:
    claims = claims_of(client_token(emulator, http, CLIENT))
    assert claims["ver"] == "1.0" and claims["iss"] == f"https://sts.windows.net/{TENANT}/"
    assert claims["aud"] == GATEWAY_URI and claims["appid"] == CLIENT and claims["tid"] == TENANT
    assert claims["roles"] == ["Scoring.Invoke"]
    assert "roles" not in claims_of(client_token(emulator, http, NO_ROLE_CLIENT))


def test_v2_tokens_when_the_api_accepts_them(emulator: EmulatorServer, http: httpx.Client) -> None:
    emulator.state.apis.set_token_version(GATEWAY_APP, 2)
    claims = claims_of(client_token(emulator, http, CLIENT))
    # v2 access tokens name the API by its client id, whatever identifier the scope used.
    assert claims["ver"] == "2.0" and claims["aud"] == GATEWAY_APP
    assert claims["iss"] == f"{emulator.https_url}/{TENANT}/v2.0"
    assert claims["azp"] == CLIENT and "appid" not in claims and claims["roles"] == ["Scoring.Invoke"]
    by_client_id = http.post(
        f"{emulator.authority(TENANT)}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT,
            "client_secret": CLIENT_SECRET,
            "scope": f"{GATEWAY_APP}/.default",
        },
    )
    assert claims_of(by_client_id.json()["access_token"])["aud"] == GATEWAY_APP


def test_a_second_tenant_issues_its_own_tokens(emulator: EmulatorServer, http: httpx.Client) -> None:
    claims = claims_of(client_token(emulator, http, CLIENT, tenant=OTHER_TENANT))
    assert claims["tid"] == OTHER_TENANT and claims["iss"] == f"https://sts.windows.net/{OTHER_TENANT}/"


def test_managed_identity_token_for_the_gateway_with_role(
    emulator: EmulatorServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = emulator.state
    identity = state.add_user_assigned_identity(name="scoring-app")
    state.apis.assign(GATEWAY_APP, identity.client_id, "Scoring.Invoke")
    for name in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT", "IMDS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in emulator.imds_env().items():
        monkeypatch.setenv(name, value)
    client = msal.ManagedIdentityClient(
        msal.UserAssignedManagedIdentity(client_id=identity.client_id), http_client=http
    )
    result = client.acquire_token_for_client(resource=GATEWAY_URI)
    assert "access_token" in result, result
    claims = claims_of(result["access_token"])
    assert claims["appid"] == identity.client_id and claims["oid"] == identity.object_id
    assert claims["aud"] == GATEWAY_URI and claims["tid"] == state.mi_tenant_id
    assert claims["roles"] == ["Scoring.Invoke"]


def test_discovery_and_keys_on_v1_and_v2_paths(emulator: EmulatorServer, http: httpx.Client) -> None:
    v2 = http.get(f"{emulator.authority(TENANT)}/v2.0/.well-known/openid-configuration").json()
    v1 = http.get(f"{emulator.authority(TENANT)}/.well-known/openid-configuration").json()
    assert v2["issuer"] == f"{emulator.https_url}/{TENANT}/v2.0"
    assert v1["issuer"] == f"https://sts.windows.net/{TENANT}/"
    before = emulator.state.jwks_count
    kids_v2 = [k["kid"] for k in http.get(v2["jwks_uri"]).json()["keys"]]
    kids_v1 = [k["kid"] for k in http.get(v1["jwks_uri"]).json()["keys"]]
    assert kids_v1 == kids_v2 == [emulator.state.signing_kid]
    assert emulator.state.jwks_count == before + 2


def test_signing_key_rotation_publishes_both_then_retires_the_old(
    emulator: EmulatorServer, http: httpx.Client
) -> None:
    admin = f"{emulator.http_url}/_emulator"
    jwks_uri = f"{emulator.authority(TENANT)}/discovery/v2.0/keys"
    old_token = client_token(emulator, http, CLIENT)
    old_kid = jwt.get_unverified_header(old_token)["kid"]

    rotated = http.post(f"{admin}/signing-keys/rotate").json()
    new_kid = rotated["kid"]
    assert new_kid != old_kid and rotated["published"][-2:] == [old_kid, new_kid]
    keys = {k["kid"]: jwt.PyJWK(k) for k in http.get(jwks_uri).json()["keys"]}
    fresh = http.post(
        f"{emulator.authority(TENANT)}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT,
            "client_secret": CLIENT_SECRET,
            "scope": f"{GATEWAY_URI}/.default",
        },
    ).json()["access_token"]
    assert jwt.get_unverified_header(fresh)["kid"] == new_kid
    for token in (old_token, fresh):  # both verify while both keys are published
        kid = jwt.get_unverified_header(token)["kid"]
        jwt.decode(token, keys[kid], algorithms=["RS256"], audience=GATEWAY_URI)

    retired = http.post(f"{admin}/signing-keys/retire").json()
    assert old_kid in retired["removed"] and retired["published"] == [new_kid]
    assert [k["kid"] for k in http.get(jwks_uri).json()["keys"]] == [new_kid]


def test_openid_fault_fails_discovery_and_keys(emulator: EmulatorServer, http: httpx.Client) -> None:
    admin = f"{emulator.http_url}/_emulator"
    assert http.post(f"{admin}/faults", json={"target": "openid", "status": 503}).status_code == 200
    for url in (
        f"{emulator.authority(TENANT)}/v2.0/.well-known/openid-configuration",
        f"{emulator.authority(TENANT)}/.well-known/openid-configuration",
        f"{emulator.authority(TENANT)}/discovery/v2.0/keys",
        f"{emulator.authority(TENANT)}/discovery/keys",
    ):
        answer = http.get(url)
        assert answer.status_code == 503 and answer.json()["error"] == "temporarily_unavailable"
    http.delete(f"{admin}/faults")
    assert http.get(f"{emulator.authority(TENANT)}/discovery/v2.0/keys").status_code == 200


def test_admin_api_registers_apis_and_assigns_roles(emulator: EmulatorServer, http: httpx.Client) -> None:
    admin = f"{emulator.http_url}/_emulator"
    api_id = str(uuid.uuid4())
    created = http.post(
        f"{admin}/apis",
        json={
            "tenant_id": TENANT,
            "client_id": api_id,
            "identifier_uri": "api://another-gateway",
            "app_roles": ["Scoring.Invoke"],
            "access_token_version": 2,
        },
    )
    assert created.json() == {
        "tenant_id": TENANT,
        "client_id": api_id,
        "identifier_uri": "api://another-gateway",
        "app_roles": ["Scoring.Invoke"],
        "access_token_version": 2,
    }
    assign = f"{admin}/apis/{api_id}/role-assignments"
    assert http.post(assign, json={"principal": CLIENT, "role": "Scoring.Invoke"}).status_code == 200
    refused = http.post(assign, json={"principal": CLIENT, "role": "Nope"})
    assert refused.status_code == 400 and "no app role 'Nope'" in refused.json()["error"]
    assert (
        http.patch(f"{admin}/apis/{api_id}", json={"access_token_version": None}).json()[
            "access_token_version"
        ]
        == 1
    )
    assert http.patch(f"{admin}/apis/{api_id}", json={"access_token_version": 3}).status_code == 400
    assert http.post(f"{admin}/apis", json={"tenant_id": TENANT, "colour": "red"}).status_code == 400
    token = http.post(
        f"{emulator.authority(TENANT)}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT,
            "client_secret": CLIENT_SECRET,
            "scope": "api://another-gateway/.default",
        },
    ).json()["access_token"]
    assert (
        claims_of(token)["roles"] == ["Scoring.Invoke"] and claims_of(token)["aud"] == "api://another-gateway"
    )
    assert (
        http.request("DELETE", assign, json={"principal": CLIENT, "role": "Scoring.Invoke"}).status_code
        == 200
    )
    state = http.get(f"{admin}/state").json()
    assert {api["client_id"] for api in state["apis"]} >= {api_id, GATEWAY_APP}
    assert state["signing_keys"] == emulator.state.signing.kids()
    assert "jwks_requests" in state["counters"]
