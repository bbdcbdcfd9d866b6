"""`aad_token` routes: every way to be an Entra ID identity, resolved from config and environment, with
real MSAL against the emulator over TLS; and end to end through the gateway."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import certifi
import httpx
import jwt
import pytest
from azure_env import (
    build,
    clean_emulator_fixture,  # noqa: F401 - fixture
    emulator_fixture,  # noqa: F401 - fixture
    gateway_config,
    identity,
    make_context,
    register_app,
    run,
    wait_for,
)
from servers import ServerThread

from gateway import secrets
from gateway.app import GatewayApp
from gateway.credentials import Credential
from gateway.emulator.server import EmulatorServer
from gateway.emulator.tls import generate_client_certificate
from gateway.errors import ConfigError, CredentialUnavailable

SUBJECT = "system:serviceaccount:scoring:gateway"
ROWS = {"data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}


def claims(header: str | None) -> dict[str, Any]:
    assert header is not None and header.startswith("Bearer ")
    decoded: dict[str, Any] = jwt.decode(header.removeprefix("Bearer "), options={"verify_signature": False})
    return decoded


def acquire(credential: Credential) -> dict[str, Any]:
    async def get() -> str | None:
        return (await credential.grant()).header

    return claims(run(get()))


def test_client_secret_file_rotation_rebuilds_the_application(
    emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(secrets, "CHECK_INTERVAL_S", 0.0)  # notice the rotated file at once
    app = register_app(emulator)
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(app.secret + "\n")
    credential = build(
        emulator,
        {"type": "aad_token", "identity": identity(emulator, app, client_secret={"file": str(secret_file)})},
    )
    assert f"client_secret file:{secret_file}" in credential.status().source

    async def scenario() -> None:
        first = await credential.grant()
        assert claims(first.header)["appidacr"] == "1"
        discoveries = emulator.state.discovery_count
        # The secret is rotated in Entra ID and in the mounted file; the old one stops working.
        rotated = app.secret + "-rotated"
        emulator.state.add_app(app.tenant_id, app.client_id, secret=rotated)
        secret_file.write_text(rotated + "\n")
        second = await credential.rejected(first)
        assert second is not None and second.header != first.header
        # Rebuilt with the new secret, without a second OpenID discovery (MSAL's HTTP memory is kept).
        assert emulator.state.discovery_count == discoveries

    run(scenario())
    assert emulator.state.token_request_count(app.client_id) == 2


def test_certificate_credential_sends_an_x5c_assertion(emulator: EmulatorServer, tmp_path: Path) -> None:
    certificate = generate_client_certificate()
    app = register_app(emulator, certificate_pem=certificate.certificate_pem)
    (tmp_path / "key.pem").write_text(certificate.private_key_pem)
    (tmp_path / "cert.pem").write_text(certificate.certificate_pem)
    auth = {
        "type": "aad_token",
        "identity": identity(
            emulator,
            app,
            certificate={
                "private_key": {"file": str(tmp_path / "key.pem")},
                "certificate": {"file": str(tmp_path / "cert.pem")},
            },
        ),
    }
    token = acquire(build(emulator, auth))
    assert token["appid"] == app.client_id and token["appidacr"] == "2"


def test_federated_token_file_is_read_for_every_token_request(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    app = register_app(emulator, federated_subject=SUBJECT)
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(emulator.state.issue_federated_token(SUBJECT))
    credential = build(
        emulator,
        {"type": "aad_token", "identity": identity(emulator, app, federated_token_file=str(token_file))},
    )

    async def scenario() -> None:
        first = await credential.grant()
        assert claims(first.header)["appidacr"] == "2"
        # The kubelet replaces the projected token; here with an expired one: the next request must
        # present it (and fail), proving the file is not read once and kept.
        token_file.write_text(emulator.state.issue_federated_token(SUBJECT, lifetime_s=-60))
        assert await credential.rejected(first) is None
        assert "700024" in (credential.status().detail or "")
        token_file.write_text(emulator.state.issue_federated_token(SUBJECT))
        await credential.start()
        try:
            # The refused token stays in use until the refresher (backing off) obtains a new one.
            assert await wait_for(lambda: emulator.state.token_request_count(app.client_id) == 3, 3)
            assert await wait_for(lambda: credential.grant_nowait().header != first.header, 3)  # type: ignore[union-attr]
        finally:
            await credential.close()

    run(scenario())
    assert emulator.state.token_request_count(app.client_id) == 3


def test_managed_identity_through_imds(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in emulator.imds_env().items():
        monkeypatch.setenv(name, value)
    system = build(emulator, {"type": "aad_token", "identity": {"managed_identity": "system"}})
    assert system.status().source.startswith("managed identity (system)")
    assert acquire(system)["appid"] == emulator.state.system_identity.client_id

    user = emulator.state.add_user_assigned_identity()
    assigned = build(
        emulator, {"type": "aad_token", "identity": {"managed_identity": {"client_id": user.client_id}}}
    )
    token = acquire(assigned)
    assert token["appid"] == user.client_id and token["aud"] == "https://ml.azure.com"
    assert emulator.state.mi_request_count(user.client_id, "https://ml.azure.com") == 1


def test_managed_identity_on_app_service(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in emulator.app_service_env().items():
        monkeypatch.setenv(name, value)
    credential = build(emulator, {"type": "aad_token", "identity": {"managed_identity": "system"}})
    assert acquire(credential)["appid"] == emulator.state.system_identity.client_id

    monkeypatch.setenv("IDENTITY_HEADER", "not-the-injected-secret")
    refused = build(emulator, {"type": "aad_token", "identity": {"managed_identity": "system"}})
    with pytest.raises(CredentialUnavailable) as raised:
        acquire(refused)
    assert "X-IDENTITY-HEADER" in raised.value.message
    status = refused.status()
    assert status.state == "unavailable" and "managed identity" in (status.detail or "")


def test_environment_variables_fill_in_the_identity(
    emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", emulator.authority_host + "/")

    def use(app_tenant: str, app_client: str, **variables: str) -> Credential:
        monkeypatch.setenv("AZURE_TENANT_ID", app_tenant)
        monkeypatch.setenv("AZURE_CLIENT_ID", app_client)
        for name in ("AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH", "AZURE_FEDERATED_TOKEN_FILE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        return build(emulator, {"type": "aad_token", "identity": {"timeout_s": 3}})

    app = register_app(emulator)
    credential = use(app.tenant_id, app.client_id, AZURE_CLIENT_SECRET=app.secret)
    assert "client_secret env:AZURE_CLIENT_SECRET" in credential.status().source
    assert acquire(credential)["appid"] == app.client_id

    certificate = generate_client_certificate()
    cert_app = register_app(emulator, certificate_pem=certificate.certificate_pem)
    pem = tmp_path / "client.pem"
    pem.write_text(certificate.private_key_pem + certificate.certificate_pem)
    credential = use(cert_app.tenant_id, cert_app.client_id, AZURE_CLIENT_CERTIFICATE_PATH=str(pem))
    assert acquire(credential)["appidacr"] == "2"

    workload_app = register_app(emulator, federated_subject=SUBJECT)
    token_file = tmp_path / "token"
    token_file.write_text(emulator.state.issue_federated_token(SUBJECT))
    credential = use(
        workload_app.tenant_id, workload_app.client_id, AZURE_FEDERATED_TOKEN_FILE=str(token_file)
    )
    assert acquire(credential)["appid"] == workload_app.client_id


@pytest.mark.parametrize(
    ("identity_block", "env", "expected"),
    [
        ({"client_id": "c", "client_secret": "s3cret-value"}, {}, "no tenant: set tenant_id"),
        ({"tenant_id": "t", "client_secret": "s3cret-value"}, {}, "no client id: set client_id"),
        ({"tenant_id": "t", "client_id": "c"}, {}, "no credential: set one of client_secret"),
        ({"client_secret": "s3cret-value"}, {"AZURE_TENANT_ID": "t"}, "AZURE_CLIENT_ID"),
        ({"tenant_id": "common", "client_id": "c", "client_secret": "s3cret-value"}, {}, "is not a tenant"),
        (
            {
                "tenant_id": "t",
                "client_id": "c",
                "client_secret": "s3cret-value",
                "authority_host": "http://x",
            },
            {},
            "authority_host must be an https:// URL",
        ),
        (
            {"tenant_id": "t", "client_id": "c", "federated_token_file": "/nonexistent/token"},
            {},
            "federated_token_file: the token file /nonexistent/token does not exist",
        ),
    ],
)
def test_configuration_errors_name_the_identity_and_what_to_set(
    emulator: EmulatorServer,
    monkeypatch: pytest.MonkeyPatch,
    identity_block: dict[str, Any],
    env: dict[str, str],
    expected: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        build(emulator, {"type": "aad_token", "identity": identity_block}, route="iris")
    message = str(raised.value)
    assert message.startswith("test.yaml: routes.iris.auth.identity")
    assert expected in message
    assert "s3cret-value" not in message


def test_scope_must_be_a_default_scope(emulator: EmulatorServer) -> None:
    app = register_app(emulator)
    with pytest.raises(ConfigError, match=r"routes\.r\.auth\.scope: .*/\.default"):
        build(
            emulator,
            {"type": "aad_token", "identity": identity(emulator, app), "scope": "https://ml.azure.com"},
        )


def test_tls_trust_comes_from_the_config_never_from_ca_variables(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = register_app(emulator)
    auth = {"type": "aad_token", "identity": identity(emulator, app)}
    # Variables naming a bundle without the emulator's CA do not stop tls.ca_bundle from working...
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(name, certifi.where())
    assert acquire(build(emulator, auth))["appid"] == app.client_id

    # ...and variables naming the emulator's CA do not make it trusted without tls.ca_bundle.
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(name, str(emulator.ca_file))
    untrusted = build(emulator, auth, ctx=make_context(None))
    with pytest.raises(CredentialUnavailable) as raised:
        acquire(untrusted)
    assert "not trusted" in raised.value.message
    assert "tls.ca_bundle" in (untrusted.status().detail or "")


def test_routes_with_the_same_identity_share_one_application(emulator: EmulatorServer) -> None:
    app = register_app(emulator)
    ctx = make_context(str(emulator.ca_file))
    block = identity(emulator, app)
    scoring = build(emulator, {"type": "aad_token", "identity": block}, route="a", ctx=ctx)
    same_scope = build(emulator, {"type": "aad_token", "identity": block}, route="b", ctx=ctx)
    management = build(
        emulator,
        {"type": "aad_token", "identity": block, "scope": "https://management.azure.com/.default"},
        route="c",
        ctx=ctx,
    )
    discoveries = emulator.state.discovery_count

    async def scenario() -> None:
        grants = await asyncio.gather(*(c.grant() for c in (scoring, same_scope, management)))
        assert grants[0] is grants[1] and grants[0].header != grants[2].header

    run(scenario())
    assert emulator.state.discovery_count - discoveries == 1  # one MSAL application built
    assert emulator.state.token_request_count(app.client_id) == 2  # one token per scope


def test_a_hanging_identity_provider_times_out(emulator: EmulatorServer) -> None:
    app = register_app(emulator)
    credential = build(emulator, {"type": "aad_token", "identity": identity(emulator, app, timeout_s=0.5)})
    emulator.state.set_fault("token", hang_s=3, count=1)
    with pytest.raises(CredentialUnavailable) as raised:
        acquire(credential)
    # The 0.5 s timeout fired (the hang lasts 3 s and then answers): said by the error, not measured.
    assert "did not answer within 0.5 s" in raised.value.message


def test_gateway_scores_with_entra_tokens_and_replays_after_a_401(emulator: EmulatorServer) -> None:
    app = register_app(emulator)
    config = gateway_config(
        emulator, {"aad": {"auth": {"type": "aad_token", "identity": identity(emulator, app)}}}
    )
    with (
        ServerThread(GatewayApp(config)) as gateway,
        httpx.Client(base_url=gateway.url, timeout=10) as client,
    ):
        response = client.post("/aad/score", json=ROWS)
        assert response.status_code == 200, response.text
        assert json.loads(response.json()) == ["setosa", "virginica"]
        assert emulator.state.token_request_count(app.client_id) == 1

        # The endpoint refuses the token once (as after a revocation): the gateway fetches a new
        # token and sends the request again; the client sees a normal answer.
        refused = emulator.state.score_count("401")
        emulator.state.set_fault("score", status=401, count=1)
        response = client.post("/aad/score", json=ROWS)
        assert response.status_code == 200, response.text
        assert emulator.state.score_count("401") == refused + 1
        assert emulator.state.token_request_count(app.client_id) == 2

        for _ in range(20):
            assert client.post("/aad/score", json=ROWS).status_code == 200
        assert emulator.state.token_request_count(app.client_id) == 2

        ready = client.get("/readyz").json()
        (route,) = ready["routes"]
        assert ready["ready"] and route["auth_type"] == "aad_token" and route["state"] == "valid"
        assert route["expires_in_s"] > 3000
        metrics = client.get("/metrics").text
        assert 'gateway_credential_refreshes_total{kind="aad_token",result="ok",route="aad"}' in metrics


# ---------------------------------------------------------------------------------------------------------
# Numbers and messages from a misbehaving Entra ID (issue 19)
HUGE_MESSAGE = ("z" * 100 + "\x1b[31m\r\nforged log line ") * 50_000  # ~5.8 MB, with control characters


def test_a_huge_entra_error_message_is_cut_short_in_readyz_and_logs(
    emulator: EmulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The token endpoint refuses the client secret with a 5 MB description (the ARM case is in
    tests/test_credentials_aml.py): /readyz and the log line get a short one-line excerpt."""
    import logging

    app = register_app(emulator)
    emulator.state.configure(entra_error_message=HUGE_MESSAGE)
    caplog.set_level(logging.WARNING, logger="gateway")
    wrong = identity(emulator, app, client_secret="not-the-registered-secret-value")
    config = gateway_config(emulator, {"aad": {"auth": {"type": "aad_token", "identity": wrong}}})
    with (
        ServerThread(GatewayApp(config)) as gateway,
        httpx.Client(base_url=gateway.url, timeout=10) as client,
    ):
        assert client.post("/aad/score", json=ROWS).status_code == 503
        answer = client.get("/readyz")
        assert len(answer.content) < 4000, len(answer.content)
        detail = answer.json()["routes"][0]["detail"]
        assert "invalid_client" in detail and "zzzz" in detail, detail
        # Entra's description, cut to ~500 characters; the error name, trace id and hint come around it.
        excerpt = detail.partition("AADSTS7000215: ")[2].partition(" (trace id")[0]
        assert 100 < len(excerpt) <= 520 and len(detail) < 1000, (len(excerpt), len(detail))
        assert not any(ord(c) < 32 or c == "\x7f" for c in detail), detail
    lines = [r.getMessage() for r in caplog.records if "invalid_client" in r.getMessage()]
    assert lines, [r.getMessage()[:200] for r in caplog.records]
    for line in lines:
        assert len(line) < 2000, len(line)
        assert "\x1b" not in line and "\n" not in line and "\r" not in line


@pytest.mark.parametrize("expires_in", ["nan", "inf", "-1", "1e308"])
@pytest.mark.parametrize("source", ["client_secret", "imds"])
def test_an_absurd_expires_in_is_refused_without_spinning(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch, source: str, expires_in: str
) -> None:
    """Entra ID's token endpoint (MSAL) or IMDS answers a token whose `expires_in` is not a usable
    lifetime: the token is refused, /readyz says why, and the gateway asks again only a few times while
    requests keep coming for 3 s (once, a `nan` expiry made thousands of token calls a second)."""
    import time

    if source == "imds":
        for name, value in emulator.imds_env().items():
            monkeypatch.setenv(name, value)
        client_id = emulator.state.system_identity.client_id
        auth = {"type": "aad_token", "identity": {"managed_identity": "system", "timeout_s": 3}}

        def token_requests() -> int:
            return emulator.state.mi_request_count(client_id)
    else:
        app = register_app(emulator)
        auth = {"type": "aad_token", "identity": identity(emulator, app)}

        def token_requests() -> int:
            return emulator.state.token_request_count(app.client_id)

    emulator.state.configure(entra_expires_in=expires_in)
    before = token_requests()
    config = gateway_config(emulator, {"aad": {"auth": auth}})
    with (
        ServerThread(GatewayApp(config)) as gateway,
        httpx.Client(base_url=gateway.url, timeout=10) as client,
    ):
        statuses = set()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            statuses.add(client.post("/aad/score", json=ROWS).status_code)  # requests keep coming
        asked = token_requests() - before
        assert 1 <= asked <= 10, f"{asked} token requests in 3 s for expires_in={expires_in}"
        assert statuses == {503}, statuses  # no usable token: requests and readiness agree
        ready = client.get("/readyz").json()
        assert ready["ready"] is False
        (route,) = ready["routes"]
        assert route["state"] == "unavailable", route
        detail = route["detail"]
        assert "expir" in detail, detail  # says it is the token's lifetime that is wrong
