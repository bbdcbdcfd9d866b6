"""End-to-end tests of the Azure emulator: real sockets, real TLS, real MSAL, real httpx."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import msal
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from msal import managed_identity as msal_mi

from gateway.emulator import (
    ClientCertificate,
    EmulatorServer,
    EmulatorState,
    MsalHttpxClient,
    generate_client_certificate,
    generate_tls,
)
from gateway.emulator.classifier import CENTROIDS, predict

TENANT = "7a1c0f1e-0000-4000-8000-00000000e001"
SECRET_APP = "5ec12e70-0000-4000-8000-000000000001"
CERT_APP = "ce127000-0000-4000-8000-000000000002"
FED_APP = "fed00000-0000-4000-8000-000000000003"
SECRET = "emulator-client-secret-value"
FED_SUBJECT = "system:serviceaccount:scoring:gateway"
ML_SCOPE = "https://ml.azure.com/.default"
ARM_SCOPE = "https://management.azure.com/.default"
SEED_ROWS = [[0.1, 2.3, 4.1, 2.0], [0.2, 1.8, 3.9, 2.1]]
MI_ENV_VARS = (
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def client_cert() -> ClientCertificate:
    return generate_client_certificate("scoring-gateway test app")


@pytest.fixture(scope="module")
def emulator(client_cert: ClientCertificate) -> Iterator[EmulatorServer]:
    state = EmulatorState()
    state.add_app(TENANT, SECRET_APP, secret=SECRET)
    state.add_app(TENANT, CERT_APP, certificate_pem=client_cert.certificate_pem)
    state.add_app(TENANT, FED_APP, federated_subject=FED_SUBJECT)
    with EmulatorServer(state) as server:
        yield server


@pytest.fixture(autouse=True)
def _restore_state(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "emulator" in request.fixturenames:
        state: EmulatorState = request.getfixturevalue("emulator").state
        state.clear_faults()
        state.configure(
            token_lifetime_s=3600,
            refresh_in_s=None,
            mi_token_lifetime_s=None,
            aml_token_lifetime_s=3600,
            score_delay_s=0.0,
        )


@pytest.fixture
def http(emulator: EmulatorServer) -> Iterator[httpx.Client]:
    with emulator.http_client() as client:
        yield client


@pytest.fixture
def mi_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in MI_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def confidential_app(
    emulator: EmulatorServer, http: Any, client_id: str, credential: Any
) -> msal.ConfidentialClientApplication:
    """The construction that works against the emulator (and, with Azure's authority, against Azure)."""
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=credential,
        authority=emulator.authority(TENANT),
        instance_discovery=False,  # else MSAL asks login.microsoftonline.com about the unknown host
        http_client=MsalHttpxClient(http) if isinstance(http, httpx.Client) else http,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def score(http: httpx.Client, emulator: EmulatorServer, token: str, rows: Any = SEED_ROWS) -> httpx.Response:
    return http.post(emulator.scoring_uri, json={"data": rows}, headers=bearer(token))


class RecordingClient:
    """Wraps an httpx client to capture the form bodies MSAL posts."""

    def __init__(self, inner: httpx.Client) -> None:
        self.inner = MsalHttpxClient(inner)
        self.posted: list[dict[str, Any]] = []

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.inner.get(url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        self.posted.append(dict(kwargs.get("data") or {}))
        return self.inner.post(url, **kwargs)


# --------------------------------------------------------------------------- classifier, TLS
def test_classifier_predicts_nearest_class_mean() -> None:
    assert predict([list(mean) for mean in CENTROIDS.values()]) == ["setosa", "versicolor", "virginica"]
    assert predict([[5.1, 3.5, 1.4, 0.2], [6.9, 3.1, 5.4, 2.1]]) == ["setosa", "virginica"]
    assert predict([]) == []


@pytest.mark.parametrize(
    "rows",
    [[[1, 2, 3]], [[1, 2, 3, "4"]], [[True, 1, 2, 3]], [[math.nan, 1, 2, 3]], "rows", [1, 2, 3, 4], None],
)
def test_classifier_rejects_malformed_rows(rows: Any) -> None:
    with pytest.raises(ValueError):
        predict(rows)


def test_generate_tls_and_client_certificate(tmp_path: Path, client_cert: ClientCertificate) -> None:
    files = generate_tls(tmp_path / "pki")
    assert files.ca_cert.name == "ca.pem" and files.server_key.stat().st_mode & 0o077 == 0
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server.verify_directly_issued_by(ca)

    cert = x509.load_pem_x509_certificate(client_cert.certificate_pem.encode())
    assert client_cert.sha1_thumbprint == cert.fingerprint(hashes.SHA1()).hex()
    assert client_cert.sha256_thumbprint == cert.fingerprint(hashes.SHA256()).hex()
    assert "PRIVATE KEY" in client_cert.private_key_pem


# --------------------------------------------------------------------------- scoring with keys
def test_seed_client_code_gets_labels(emulator: EmulatorServer, http: httpx.Client) -> None:
    # Exactly what the seed does: a JSON string body, then json.loads(response.json()).
    response = http.post(
        emulator.scoring_uri,
        content=json.dumps({"data": SEED_ROWS}),
        headers={"Content-Type": "application/json", **bearer(emulator.state.primary_key)},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    predictions = json.loads(response.json())
    assert predictions == predict(SEED_ROWS) == ["versicolor", "versicolor"]
    assert response.text == json.dumps(json.dumps(predictions))
    for header in ("x-ms-run-fn-exec-ms", "x-ms-server-version", "x-request-id", "x-ms-request-id"):
        assert response.headers[header]


def test_score_over_https_with_secondary_key_echoes_request_ids(
    emulator: EmulatorServer, http: httpx.Client
) -> None:
    response = http.post(
        f"{emulator.https_url}/score",
        json={"data": SEED_ROWS},
        headers={
            **bearer(emulator.state.secondary_key),
            "x-request-id": "req-123",
            "x-ms-client-request-id": "client-456",
        },
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-123"
    assert response.headers["x-ms-client-request-id"] == "client-456"
    assert response.headers["azureml-model-deployment"] == "blue"


def test_score_rejects_missing_and_wrong_credentials(emulator: EmulatorServer, http: httpx.Client) -> None:
    emulator.state.reset_counters()
    missing = http.post(emulator.scoring_uri, json={"data": SEED_ROWS})
    assert (missing.status_code, missing.text) == (401, "key_auth_bad_header_forbidden")
    wrong = score(http, emulator, "not-the-key")
    assert (wrong.status_code, wrong.text) == (401, "key_auth_access_denied")
    basic = http.post(
        emulator.scoring_uri,
        json={"data": SEED_ROWS},
        headers={"Authorization": f"Basic {emulator.state.primary_key}"},
    )
    assert basic.status_code == 401
    assert emulator.state.score_count("401") == 3
    assert [s["reason"] for s in emulator.state.recent_scores()] == [
        "missing_header",
        "unknown_key",
        "bad_header",
    ]


def test_key_rotation_through_admin_api(emulator: EmulatorServer, http: httpx.Client) -> None:
    old_primary, secondary = emulator.state.primary_key, emulator.state.secondary_key
    answer = http.post(f"{emulator.http_url}/_emulator/keys/regenerate", json={"slot": "primary"})
    assert answer.status_code == 200 and answer.json()["slot"] == "primary"
    new_primary = answer.json()["key"]
    assert new_primary != old_primary and emulator.state.primary_key == new_primary
    assert score(http, emulator, old_primary).status_code == 401
    assert score(http, emulator, new_primary).status_code == 200
    assert score(http, emulator, secondary).status_code == 200

    chosen = http.post(
        f"{emulator.http_url}/_emulator/keys/regenerate", json={"slot": "secondary", "value": "k2"}
    )
    assert chosen.json() == {"slot": "secondary", "key": "k2"}
    assert score(http, emulator, "k2").status_code == 200
    bad = http.post(f"{emulator.http_url}/_emulator/keys/regenerate", json={"slot": "tertiary"})
    assert bad.status_code == 400


@pytest.mark.parametrize(
    "body",
    [b"this is not json", b'{"data": [[1, 2, 3]]}', b'{"rows": [[1, 2, 3, 4]]}', b'{"data": "x"}', b"[1, 2]"],
)
def test_malformed_input_fails_like_a_crashing_run(
    emulator: EmulatorServer, http: httpx.Client, body: bytes
) -> None:
    response = http.post(emulator.scoring_uri, content=body, headers=bearer(emulator.state.primary_key))
    assert response.status_code == 500
    assert response.headers["x-ms-run-function-failed"] == "True"
    assert response.json() == {
        "message": "An unexpected error occurred in scoring script. Check the logs for more info."
    }


def test_get_score_health_swagger_and_header_limit(emulator: EmulatorServer, http: httpx.Client) -> None:
    key = bearer(emulator.state.primary_key)
    got = http.get(emulator.scoring_uri, params={"data": json.dumps(SEED_ROWS)}, headers=key)
    assert got.status_code == 200 and json.loads(got.json()) == predict(SEED_ROWS)
    assert http.get(emulator.scoring_uri, headers=key).status_code == 500
    assert http.get(f"{emulator.http_url}/").text == "Healthy"
    assert http.get(f"{emulator.http_url}/swagger.json").status_code == 401
    swagger = http.get(f"{emulator.http_url}/swagger.json", headers=key).json()
    assert swagger["swagger"] == "2.0" and "/score" in swagger["paths"]
    too_long = http.post(
        emulator.scoring_uri, json={"data": SEED_ROWS}, headers={**key, "x-request-id": "x" * 101}
    )
    assert too_long.status_code == 431


# --------------------------------------------------------------------------- Entra ID with MSAL
def test_discovery_and_jwks_verify_issued_tokens(emulator: EmulatorServer, http: httpx.Client) -> None:
    config = http.get(f"{emulator.authority(TENANT)}/v2.0/.well-known/openid-configuration").json()
    for field in ("token_endpoint", "authorization_endpoint", "issuer", "jwks_uri"):
        assert config[field].startswith(f"{emulator.https_url}/{TENANT}")
    jwks = http.get(config["jwks_uri"]).json()
    token = emulator.state.issue_access_token(
        audience="https://ml.azure.com", tenant_id=TENANT, appid=SECRET_APP
    )
    key = jwt.PyJWK(jwks["keys"][0])
    assert jwt.get_unverified_header(token)["kid"] == key.key_id
    claims = jwt.decode(token, key, algorithms=["RS256"], audience="https://ml.azure.com")
    assert claims["iss"] == f"https://sts.windows.net/{TENANT}/" and claims["tid"] == TENANT


def test_msal_client_secret_token_scores_and_is_cached(emulator: EmulatorServer, http: httpx.Client) -> None:
    emulator.state.reset_counters()
    app = confidential_app(emulator, http, SECRET_APP, SECRET)
    result = app.acquire_token_for_client([ML_SCOPE])
    assert result["token_type"] == "Bearer" and result["expires_in"] == 3600
    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert claims["aud"] == "https://ml.azure.com" and claims["appid"] == SECRET_APP
    assert {"oid", "tid", "iat", "nbf", "exp"} <= claims.keys()
    assert score(http, emulator, result["access_token"]).status_code == 200
    assert emulator.state.score_auth_count("aad_token") == 1

    again = app.acquire_token_for_client([ML_SCOPE])
    assert again["token_source"] == "cache"
    assert emulator.state.token_request_count(SECRET_APP, ML_SCOPE) == 1
    assert emulator.state.discovery_count == 1


def test_refresh_in_follows_configuration(emulator: EmulatorServer, http: httpx.Client) -> None:
    token_url = f"{emulator.authority(TENANT)}/oauth2/v2.0/token"
    form = {
        "grant_type": "client_credentials",
        "client_id": SECRET_APP,
        "client_secret": SECRET,
        "scope": ML_SCOPE,
    }
    assert "refresh_in" not in http.post(token_url, data=form).json()
    emulator.state.token_lifetime_s = 7200
    assert http.post(token_url, data=form).json()["refresh_in"] == 3600
    emulator.state.configure(token_lifetime_s=600, refresh_in_s=120)
    body = http.post(token_url, data=form).json()
    assert (body["expires_in"], body["ext_expires_in"], body["refresh_in"]) == (600, 600, 120)


def test_score_rejects_wrong_audience_expired_and_forged_tokens(
    emulator: EmulatorServer, http: httpx.Client
) -> None:
    state = emulator.state
    state.reset_counters()
    arm_token = confidential_app(emulator, http, SECRET_APP, SECRET).acquire_token_for_client([ARM_SCOPE])
    expired = state.issue_access_token(
        audience="https://ml.azure.com", tenant_id=TENANT, appid=SECRET_APP, lifetime_s=-60
    )
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = jwt.decode(expired, options={"verify_signature": False}) | {"exp": int(time.time()) + 600}
    forged = jwt.encode(claims, forger, algorithm="RS256", headers={"kid": state.signing_kid})
    for token in (arm_token["access_token"], expired, forged):
        assert score(http, emulator, token).status_code == 401
    reasons = [s["reason"] for s in state.recent_scores()]
    assert reasons == ["aad_token_wrong_audience", "aad_token_expired", "aad_token_bad_signature"]


def test_msal_certificate_credentials(
    emulator: EmulatorServer, http: httpx.Client, client_cert: ClientCertificate
) -> None:
    recorder = RecordingClient(http)
    # With the public certificate MSAL >= 1.35 signs PS256 and sends x5t#S256 and x5c (SNI).
    sni = confidential_app(
        emulator,
        recorder,
        CERT_APP,
        {"private_key": client_cert.private_key_pem, "public_certificate": client_cert.certificate_pem},
    )
    result = sni.acquire_token_for_client([ML_SCOPE])
    assert "access_token" in result, result
    header = jwt.get_unverified_header(recorder.posted[-1]["client_assertion"])
    assert header["alg"] == "PS256" and "x5t#S256" in header and "x5c" in header
    assert jwt.decode(result["access_token"], options={"verify_signature": False})["appidacr"] == "2"

    # With only a SHA-1 thumbprint it falls back to RS256 + x5t.
    legacy = confidential_app(
        emulator,
        recorder,
        CERT_APP,
        {"private_key": client_cert.private_key_pem, "thumbprint": client_cert.sha1_thumbprint},
    )
    assert "access_token" in legacy.acquire_token_for_client([ARM_SCOPE])
    assert jwt.get_unverified_header(recorder.posted[-1]["client_assertion"])["alg"] == "RS256"

    other = generate_client_certificate("not registered")
    stranger = confidential_app(
        emulator,
        http,
        CERT_APP,
        {"private_key": other.private_key_pem, "public_certificate": other.certificate_pem},
    )
    refused = stranger.acquire_token_for_client([ML_SCOPE])
    assert refused["error"] == "invalid_client" and refused["error_codes"] == [700027]


def test_bare_httpx_client_breaks_msal_certificate_assertions(
    emulator: EmulatorServer, http: httpx.Client, client_cert: ClientCertificate
) -> None:
    # MSAL posts the signed assertion as bytes; httpx form-encodes that as "b'eyJ...'" (requests doesn't).
    app = msal.ConfidentialClientApplication(
        CERT_APP,
        client_credential={
            "private_key": client_cert.private_key_pem,
            "thumbprint": client_cert.sha1_thumbprint,
        },
        authority=emulator.authority(TENANT),
        instance_discovery=False,
        http_client=http,
    )
    result = app.acquire_token_for_client([ML_SCOPE])
    assert result["error"] == "invalid_request" and result["error_codes"] == [50027]


def test_msal_federated_client_assertion(emulator: EmulatorServer, http: httpx.Client) -> None:
    calls: list[int] = []

    def read_projected_token() -> str:
        calls.append(1)
        answer = http.post(f"{emulator.http_url}/_emulator/federated-token", json={"subject": FED_SUBJECT})
        return str(answer.json()["token"])

    app = confidential_app(emulator, http, FED_APP, {"client_assertion": read_projected_token})
    result = app.acquire_token_for_client([ML_SCOPE])
    assert "access_token" in result, result
    assert calls and score(http, emulator, result["access_token"]).status_code == 200

    wrong = confidential_app(
        emulator,
        http,
        FED_APP,
        {"client_assertion": lambda: emulator.state.issue_federated_token("system:serviceaccount:other:sa")},
    )
    refused = wrong.acquire_token_for_client([ML_SCOPE])
    assert refused["error"] == "invalid_client" and refused["error_codes"] == [700213]


def test_entra_errors_have_entra_shape(emulator: EmulatorServer, http: httpx.Client) -> None:
    token_url = f"{emulator.authority(TENANT)}/oauth2/v2.0/token"
    base = {"grant_type": "client_credentials", "client_id": SECRET_APP, "client_secret": SECRET}
    cases = [
        ({**base, "client_secret": "wrong", "scope": ML_SCOPE}, 401, "invalid_client", 7000215),
        ({**base, "client_id": "unknown-app", "scope": ML_SCOPE}, 400, "unauthorized_client", 700016),
        ({**base, "scope": "https://ml.azure.com/user_impersonation"}, 400, "invalid_scope", 1002012),
        ({**base, "scope": "https://unknown.example/.default"}, 400, "invalid_resource", 500011),
        ({**base, "grant_type": "password", "scope": ML_SCOPE}, 400, "unsupported_grant_type", 70003),
        ({**base, "client_secret": "", "scope": ML_SCOPE}, 401, "invalid_client", 7000218),
    ]  # fmt: skip
    for form, status, error, code in cases:
        response = http.post(token_url, data=form, headers={"client-request-id": "corr-1"})
        body = response.json()
        assert (response.status_code, body["error"], body["error_codes"]) == (status, error, [code])
        assert {"error_description", "trace_id", "correlation_id", "timestamp"} <= body.keys()
        assert body["correlation_id"] == "corr-1" and body["error_description"].startswith(f"AADSTS{code}:")
    # MSAL turns a 4xx into an error dict rather than raising.
    app = confidential_app(emulator, http, SECRET_APP, "wrong-secret")
    assert app.acquire_token_for_client([ML_SCOPE])["error"] == "invalid_client"


# --------------------------------------------------------------------------- managed identity with MSAL
def test_msal_managed_identity_imds(
    emulator: EmulatorServer, http: httpx.Client, mi_env: pytest.MonkeyPatch
) -> None:
    state = emulator.state
    for name, value in emulator.imds_env().items():
        mi_env.setenv(name, value)
    assert msal_mi.get_managed_identity_source() is msal_mi.DEFAULT_TO_VM

    system = msal.ManagedIdentityClient(msal.SystemAssignedManagedIdentity(), http_client=http)
    result = system.acquire_token_for_client(resource="https://ml.azure.com")
    assert "access_token" in result, result
    assert 3500 < result["expires_in"] <= 3600
    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert claims["appid"] == state.system_identity.client_id and claims["tid"] == state.mi_tenant_id
    assert score(http, emulator, result["access_token"]).status_code == 200

    uami = state.add_user_assigned_identity()
    user = msal.ManagedIdentityClient(
        msal.UserAssignedManagedIdentity(client_id=uami.client_id), http_client=http
    )
    user_token = user.acquire_token_for_client(resource="https://management.azure.com")["access_token"]
    assert jwt.decode(user_token, options={"verify_signature": False})["appid"] == uami.client_id
    assert state.mi_request_count(uami.client_id, "https://management.azure.com") == 1

    unknown = msal.ManagedIdentityClient(msal.UserAssignedManagedIdentity(client_id="nope"), http_client=http)
    assert unknown.acquire_token_for_client(resource="https://ml.azure.com") == {
        "error": "invalid_request",
        "error_description": "Identity not found",
    }
    raw = http.get(
        f"{emulator.http_url}/metadata/identity/oauth2/token",
        params={"api-version": "2018-02-01", "resource": "https://ml.azure.com"},
    )
    assert raw.status_code == 400 and "metadata header" in raw.json()["error_description"]
    ok = http.get(
        f"{emulator.http_url}/metadata/identity/oauth2/token",
        params={"api-version": "2018-02-01", "resource": "https://ml.azure.com"},
        headers={"Metadata": "true"},
    ).json()
    assert all(isinstance(ok[name], str) for name in ("expires_in", "expires_on", "not_before"))


def test_msal_managed_identity_app_service(
    emulator: EmulatorServer, http: httpx.Client, mi_env: pytest.MonkeyPatch
) -> None:
    for name, value in emulator.app_service_env().items():
        mi_env.setenv(name, value)
    assert msal_mi.get_managed_identity_source() is msal_mi.APP_SERVICE
    client = msal.ManagedIdentityClient(msal.SystemAssignedManagedIdentity(), http_client=http)
    result = client.acquire_token_for_client(resource="https://ml.azure.com")
    assert "access_token" in result, result
    assert score(http, emulator, result["access_token"]).status_code == 200

    mi_env.setenv("IDENTITY_HEADER", "wrong")
    refused = msal.ManagedIdentityClient(msal.SystemAssignedManagedIdentity(), http_client=http)
    error = refused.acquire_token_for_client(resource="https://ml.azure.com")
    # MSAL reports every App Service failure as invalid_scope, carrying "statusCode, message".
    assert error["error"] == "invalid_scope" and error["error_description"].startswith("401, ")


# --------------------------------------------------------------------------- ARM
def test_arm_list_keys_token_and_regenerate(emulator: EmulatorServer, http: httpx.Client) -> None:
    state = emulator.state
    state.reset_counters()
    arm = bearer(
        confidential_app(emulator, http, SECRET_APP, SECRET).acquire_token_for_client([ARM_SCOPE])[
            "access_token"
        ]
    )

    keys = http.post(emulator.arm_endpoint_url("listKeys"), headers=arm).json()
    assert keys == {"primaryKey": state.primary_key, "secondaryKey": state.secondary_key}

    issued = http.post(emulator.arm_endpoint_url("token"), headers=arm).json()
    assert issued["tokenType"] == "Bearer"
    assert time.time() < issued["refreshAfterTimeUtc"] < issued["expiryTimeUtc"] <= time.time() + 3600
    assert score(http, emulator, issued["accessToken"]).status_code == 200
    assert state.score_auth_count("aml_token") == 1

    old_secondary = keys["secondaryKey"]
    regenerated = http.post(
        emulator.arm_endpoint_url("regenerateKeys"), headers=arm, json={"keyType": "Secondary"}
    )
    assert regenerated.status_code == 202
    assert int(regenerated.headers["Retry-After"]) > 0
    assert http.get(regenerated.headers["Location"], headers=arm).status_code == 200
    assert score(http, emulator, old_secondary).status_code == 401
    assert (
        http.post(emulator.arm_endpoint_url("listKeys"), headers=arm).json()["secondaryKey"] != old_secondary
    )

    http.post(
        emulator.arm_endpoint_url("regenerateKeys"),
        headers=arm,
        json={"keyType": "Primary", "keyValue": "chosen"},
    )
    assert state.primary_key == "chosen"
    bad = http.post(emulator.arm_endpoint_url("regenerateKeys"), headers=arm, json={"keyType": "Tertiary"})
    assert bad.status_code == 400

    resource = http.get(emulator.arm_endpoint_url(), headers=arm).json()
    assert resource["properties"]["scoringUri"] == f"{emulator.https_url}/score"
    arm_calls = state.snapshot()["counters"]["arm_calls"]
    assert {op: arm_calls[op] for op in ("listKeys", "token", "regenerateKeys", "get")} == {
        "listKeys": 2, "token": 1, "regenerateKeys": 3, "get": 1
    }  # fmt: skip


def test_arm_rejects_bad_requests(emulator: EmulatorServer, http: httpx.Client) -> None:
    state = emulator.state
    app = confidential_app(emulator, http, SECRET_APP, SECRET)
    url = emulator.arm_endpoint_url("listKeys")

    missing = http.post(url)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "AuthenticationFailed"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer ")
    ml_token = app.acquire_token_for_client([ML_SCOPE])["access_token"]
    wrong_audience = http.post(url, headers=bearer(ml_token)).json()["error"]["code"]
    assert wrong_audience == "InvalidAuthenticationTokenAudience"
    expired = state.issue_access_token(
        audience="https://management.azure.com", tenant_id=TENANT, appid="x", lifetime_s=-1
    )
    assert http.post(url, headers=bearer(expired)).json()["error"]["code"] == "ExpiredAuthenticationToken"

    arm = bearer(app.acquire_token_for_client([ARM_SCOPE])["access_token"])
    no_version = http.post(emulator.arm_endpoint_url("listKeys", api_version=None), headers=arm)
    assert no_version.status_code == 400
    assert no_version.json()["error"]["code"] == "MissingApiVersionParameter"
    assert http.post(emulator.arm_endpoint_url("deleteEverything"), headers=arm).status_code == 404


def test_a_misbehaving_control_plane_on_request(emulator: EmulatorServer, http: httpx.Client) -> None:
    """The knobs tests of the gateway's defences use: operation URLs on another origin, Retry-After text
    that is not a number, non-finite token times, an error message of any size."""
    state = emulator.state
    admin = f"{emulator.http_url}/_emulator/config"
    arm = bearer(
        confidential_app(emulator, http, SECRET_APP, SECRET).acquire_token_for_client([ARM_SCOPE])[
            "access_token"
        ]
    )
    misbehaving = {
        "lro_operation_origin": "http://elsewhere.example:8080",
        "lro_retry_after": "nan",
        "aml_token_expiry": "nan",
        "aml_token_refresh_after": "inf",
        "arm_error_message": "x\x1b[31m" * 3,
    }
    try:
        answer = http.post(admin, json=misbehaving)
        assert answer.status_code == 200 and answer.json()["lro_retry_after"] == "nan"
        regenerated = http.post(
            emulator.arm_endpoint_url("regenerateKeys"), headers=arm, json={"keyType": "Secondary"}
        )
        assert regenerated.status_code == 202 and regenerated.headers["Retry-After"] == "nan"
        for header in ("Location", "Azure-AsyncOperation"):
            assert regenerated.headers[header].startswith("http://elsewhere.example:8080/subscriptions/")
        issued = http.post(emulator.arm_endpoint_url("token"), headers=arm).json()
        assert (issued["expiryTimeUtc"], issued["refreshAfterTimeUtc"]) == ("nan", "inf")
        state.set_fault("arm", status=500, count=1)
        failed = http.post(emulator.arm_endpoint_url("listKeys"), headers=arm)
        assert failed.status_code == 500 and failed.json()["error"]["message"] == "x\x1b[31m" * 3
        assert http.post(admin, json={"lro_retry_after": 5}).status_code == 400  # text settings only
    finally:
        state.configure(**dict.fromkeys(misbehaving))
    assert state.config()["lro_operation_origin"] is None


def test_aml_token_expiry_and_revocation(emulator: EmulatorServer, http: httpx.Client) -> None:
    state = emulator.state
    state.reset_counters()
    state.aml_token_lifetime_s = 0
    expired, _, _ = state.issue_aml_token()
    state.aml_token_lifetime_s = 3600
    live, _, _ = state.issue_aml_token()
    assert score(http, emulator, expired).status_code == 401
    assert score(http, emulator, live).status_code == 200
    assert http.post(f"{emulator.http_url}/_emulator/aml-tokens/revoke").json()["revoked"] >= 1
    assert score(http, emulator, live).status_code == 401
    assert [s["reason"] for s in state.recent_scores()] == ["aml_token_expired", None, "unknown_key"]


# --------------------------------------------------------------------------- faults
def set_fault(http: httpx.Client, emulator: EmulatorServer, **fault: Any) -> dict[str, Any]:
    response = http.post(f"{emulator.http_url}/_emulator/faults", json=fault)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_token_429_with_retry_after_and_msal_throttling(emulator: EmulatorServer, http: httpx.Client) -> None:
    state = emulator.state
    token_url = f"{emulator.authority(TENANT)}/oauth2/v2.0/token"
    form = {
        "grant_type": "client_credentials",
        "client_id": SECRET_APP,
        "client_secret": SECRET,
        "scope": ARM_SCOPE,
    }
    set_fault(http, emulator, target="token", status=429, retry_after=7, count=1)
    throttled = http.post(token_url, data=form)
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "7"
    assert throttled.json()["error"] == "temporarily_unavailable"
    assert http.post(token_url, data=form).status_code == 200

    # MSAL remembers a 429 + Retry-After and replays it without calling the token endpoint again.
    set_fault(http, emulator, target="token", status=429, retry_after=30, count=1)
    app = confidential_app(emulator, http, SECRET_APP, SECRET)
    before = state.token_request_count(SECRET_APP, ML_SCOPE)
    assert app.acquire_token_for_client([ML_SCOPE])["error"] == "temporarily_unavailable"
    assert app.acquire_token_for_client([ML_SCOPE])["error"] == "temporarily_unavailable"
    assert state.token_request_count(SECRET_APP, ML_SCOPE) == before + 1


def test_token_5xx_makes_msal_raise(emulator: EmulatorServer, http: httpx.Client) -> None:
    set_fault(http, emulator, target="token", status=503, count=1)
    app = confidential_app(emulator, http, SECRET_APP, SECRET)
    with pytest.raises(msal.exceptions.MsalServiceError):
        app.acquire_token_for_client([ML_SCOPE])


def test_score_503_for_n_requests_then_recovers(emulator: EmulatorServer, http: httpx.Client) -> None:
    state = emulator.state
    state.reset_counters()
    set_fault(http, emulator, target="score", status=503, count=2, retry_after=1)
    statuses = [score(http, emulator, state.primary_key).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert state.snapshot()["counters"]["score_requests"] == {"503": 2, "ok": 1}
    assert state.faults() == {}


def test_hang_delay_and_other_fault_shapes(emulator: EmulatorServer, http: httpx.Client) -> None:
    state = emulator.state
    set_fault(http, emulator, target="score", hang_s=1.0)
    with pytest.raises(httpx.ReadTimeout):
        http.post(
            emulator.scoring_uri, json={"data": SEED_ROWS}, headers=bearer(state.primary_key), timeout=0.3
        )
    assert http.delete(f"{emulator.http_url}/_emulator/faults").json() == {"cleared": ["score"]}
    assert score(http, emulator, state.primary_key).status_code == 200

    set_fault(http, emulator, target="arm", status=429, retry_after=3)
    arm = http.post(emulator.arm_endpoint_url("listKeys"))
    assert arm.status_code == 429 and arm.headers["Retry-After"] == "3"
    assert arm.json()["error"]["code"] == "TooManyRequests"

    set_fault(http, emulator, target="mi", status=500, count=1)
    imds = http.get(
        f"{emulator.http_url}/metadata/identity/oauth2/token",
        params={"api-version": "2018-02-01", "resource": "https://ml.azure.com"},
        headers={"Metadata": "true"},
    )
    assert imds.status_code == 500 and set(imds.json()) == {"error", "error_description"}

    set_fault(http, emulator, target="score", delay_s=0.2, count=1)
    state.score_delay_s = 0.1
    started = time.perf_counter()
    assert score(http, emulator, state.primary_key).status_code == 200
    assert time.perf_counter() - started >= 0.3


def test_admin_api(emulator: EmulatorServer, http: httpx.Client, client_cert: ClientCertificate) -> None:
    admin = f"{emulator.http_url}/_emulator"
    assert http.post(f"{admin}/faults", json={"target": "dns", "status": 500}).status_code == 400
    assert http.post(f"{admin}/faults", json={"target": "score"}).status_code == 400
    assert http.post(f"{admin}/faults", json={"target": "score", "status": "500"}).status_code == 400
    armed = set_fault(http, emulator, target="token", status=500, count=2)
    assert armed == {
        "target": "token", "status": 500, "retry_after": None, "remaining": 2, "hang_s": None, "delay_s": None
    }  # fmt: skip
    assert http.get(f"{admin}/state").json()["faults"]["token"]["remaining"] == 2
    assert http.delete(f"{admin}/faults", params={"target": "token"}).json() == {"cleared": ["token"]}

    assert http.post(f"{admin}/config", json={"score_delay_s": 0.01}).json()["score_delay_s"] == 0.01
    assert http.post(f"{admin}/config", json={"nonsense": 1}).status_code == 400

    registered = http.post(
        f"{admin}/apps", json={"tenant_id": "other-tenant", "client_id": "admin-app", "secret": "s"}
    ).json()
    assert registered["credentials"] == ["secret"]
    token = http.post(
        f"{emulator.https_url}/other-tenant/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "admin-app",
            "client_secret": "s",
            "scope": ML_SCOPE,
        },
    )
    assert token.status_code == 200

    assert http.post(f"{admin}/reset-counters").json() == {"reset": True}
    state = http.get(f"{admin}/state").json()
    assert state["counters"]["token_requests_total"] == 0 and state["counters"]["score_requests"] == {}
    assert set(state) >= {"counters", "keys", "faults", "config", "apps", "managed_identities"}
    assert client_cert.certificate_pem not in json.dumps(state)


def test_counters_are_consistent_under_concurrency(emulator: EmulatorServer) -> None:
    state = emulator.state
    state.reset_counters()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with emulator.http_client() as client:
                for _ in range(5):
                    assert score(client, emulator, state.primary_key).status_code == 200
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert state.score_count("ok") == 40 and state.score_auth_count("key:primary") == 40


def test_secrets_are_not_logged(
    emulator: EmulatorServer, http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    state = emulator.state
    token = confidential_app(emulator, http, SECRET_APP, SECRET).acquire_token_for_client([ML_SCOPE])
    score(http, emulator, state.primary_key)
    score(http, emulator, "wrong-key-value")
    time.sleep(0.05)
    emulator_records = [r for r in caplog.records if r.name.startswith(("uvicorn", "gateway", "starlette"))]
    text = "\n".join(r.getMessage() for r in emulator_records)
    for secret in (SECRET, state.primary_key, "wrong-key-value", token["access_token"]):
        assert secret not in text


# --------------------------------------------------------------------------- server lifecycle and CLI
def test_server_lifecycle(tmp_path: Path) -> None:
    server = EmulatorServer(EmulatorState(), directory=tmp_path)
    assert server.ca_file == tmp_path / "ca.pem" and server.authority_host == server.https_url
    with server, server.http_client() as client:
        assert client.get(f"{server.https_url}/").text == "Healthy"
        assert client.get(f"{server.http_url}/").text == "Healthy"
    server.stop()  # idempotent
    with (
        httpx.Client(verify=server.ssl_context(), trust_env=False) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.get(f"{server.http_url}/")

    temporary = EmulatorServer()
    directory = temporary.ca_file.parent
    with temporary:
        assert directory.exists()
    assert not directory.exists()


def test_cli_prints_connection_details_and_stops_on_sigint() -> None:
    command = [sys.executable, "-m", "gateway.emulator", "--port", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    repo = Path(__file__).resolve().parents[1]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=repo
    ) as process:
        watchdog = threading.Timer(20, process.kill)  # readline() below must not block forever
        watchdog.start()
        try:
            assert process.stdout is not None
            lines: list[str] = []
            for line in process.stdout:
                lines.append(line)
                if "Ctrl-C" in line:
                    break
            banner = "".join(lines)
            assert "primary key" in banner and "ca.pem" in banner and "keys/regenerate" in banner, banner
            http_url = next(line.split()[2] for line in lines if line.strip().startswith("plain HTTP"))
            with httpx.Client(trust_env=False) as client:
                assert client.get(f"{http_url}/").text == "Healthy"
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=10) == 0
            assert "emulator stopped" in process.stdout.read()
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
