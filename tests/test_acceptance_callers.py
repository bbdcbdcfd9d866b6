"""Callers end to end (issue 16): the real gateway with the emulated Entra ID as the OpenID provider (over
TLS with its CA), client tokens from real MSAL or the emulator's signer, hostile tokens built by hand,
the answers read from the raw socket, and an upstream that records what it got.

- valid callers pass, and the upstream sees only the route's credential;
- every refused token is a 401 naming its reason, with `WWW-Authenticate`;
- roles, app ids and key names decide per route (403 naming the caller and the route), before the body;
- only callers a route names may choose its deployment;
- a signing-key rotation under load fails no request; random `kid`s cost one key read; the provider
  going down keeps tokens validating;
- the caller in the access log, the span and the metrics, whose `caller` label stays bounded.

Every token the tests mint reaches the secret-hygiene record (tests/conftest.py): the emulator's through
its patched signer, forged ones through `_secret`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import msal
import pytest
import yaml
from conftest import HYGIENE, PRIMARY
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families
from servers import Answer, KeptAlive, ServerThread
from upstream import Upstream

from gateway.emulator import EmulatorServer, EmulatorState, MsalHttpxClient
from gateway.errors import ConfigError

TENANT = "5ca11e00-0000-4000-8000-0000000000a1"
OTHER_TENANT = "5ca11e00-0000-4000-8000-0000000000b2"
GATEWAY_URI = "api://scoring-gateway"
GATEWAY_APP = "9a7e0000-0000-4000-8000-00000000ca11"
SCORER = "c1000000-0000-4000-8000-0000000000a1"  # holds Scoring.Invoke
NO_ROLE = "c1000000-0000-4000-8000-0000000000a2"  # holds no role
PINNER = "c1000000-0000-4000-8000-0000000000a3"  # named by app id, may choose the deployment
SECRET = "callers-acceptance-client-secret"
ROLE = "Scoring.Invoke"
BATCH_KEY = "batch-job-gateway-key-0123456789"
OTHER_KEY = "other-holder-gateway-key-0123456789"


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _secret(value: str, origin: str) -> str:
    HYGIENE.add_secret(value, origin)
    return value


_secret(BATCH_KEY, "tests/test_acceptance_callers.py BATCH_KEY")
_secret(OTHER_KEY, "tests/test_acceptance_callers.py OTHER_KEY")


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    state = EmulatorState()
    for client in (SCORER, NO_ROLE, PINNER):
        state.add_app(TENANT, client, secret=SECRET)
    state.add_app(OTHER_TENANT, SCORER, secret=SECRET)
    state.apis.add(TENANT, identifier_uri=GATEWAY_URI, client_id=GATEWAY_APP, app_roles=[ROLE])
    state.apis.assign(GATEWAY_APP, SCORER, ROLE)
    with EmulatorServer(state) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean_emulator(emulator: EmulatorServer) -> Iterator[None]:
    emulator.state.clear_faults()
    yield
    emulator.state.clear_faults()
    emulator.state.apis.set_token_version(GATEWAY_APP, None)


@pytest.fixture
def recording() -> Iterator[tuple[Upstream, ServerThread]]:
    app = Upstream(accepted_keys={PRIMARY})
    with ServerThread(app, lifespan="off") as server:
        yield app, server


def gateway_config(emulator: EmulatorServer, upstream_url: str, **entra: Any) -> dict[str, Any]:
    return {
        "tls": {"ca_bundle": str(emulator.ca_file)},
        "egress": {"proxy": "none"},
        "inbound": {
            "entra_id": {
                "tenant_id": TENANT,
                "audiences": [GATEWAY_URI, GATEWAY_APP],
                "authority": emulator.https_url,
                **entra,
            },
            "api_keys": [
                {"name": "batch", "sha256": _sha256(BATCH_KEY)},
                {"name": "other", "sha256": _sha256(OTHER_KEY)},
            ],
        },
        "routes": {
            "fraud": {
                "path": "/fraud",
                "upstream": upstream_url,
                "auth": {"type": "key", "primary": {"env": "CALLERS_TEST_KEY"}},
                "headers": {"azureml-model-deployment": "blue"},
                "callers": {
                    "roles": [ROLE],
                    "app_ids": [PINNER],
                    "api_keys": ["batch"],
                    "may_pin_deployment": {"app_ids": [PINNER]},
                },
            },
            "open": {
                "path": "/open",
                "upstream": upstream_url,
                "auth": {"type": "key", "primary": {"env": "CALLERS_TEST_KEY"}},
            },
        },
    }


@pytest.fixture
def gateway(
    emulator: EmulatorServer,
    recording: tuple[Upstream, ServerThread],
    gateway_factory: Callable[..., ServerThread],
    monkeypatch: pytest.MonkeyPatch,
) -> ServerThread:
    monkeypatch.setenv("CALLERS_TEST_KEY", PRIMARY)
    return gateway_factory(gateway_config(emulator, recording[1].url))


def msal_token(emulator: EmulatorServer, client_id: str, *, tenant: str = TENANT) -> str:
    with emulator.http_client() as http:
        app = msal.ConfidentialClientApplication(
            client_id,
            client_credential=SECRET,
            authority=emulator.authority(tenant),
            instance_discovery=False,
            http_client=MsalHttpxClient(http),
        )
        result = app.acquire_token_for_client([f"{GATEWAY_URI}/.default"])
    assert "access_token" in result, result
    token: str = result["access_token"]
    return token


def issue(emulator: EmulatorServer, **fields: Any) -> str:
    """A token the emulated Entra ID signs; by default a v1 token of SCORER for the gateway, with its role."""
    options: dict[str, Any] = {"audience": GATEWAY_URI, "tenant_id": TENANT, "appid": SCORER, "roles": [ROLE]}
    options.update(fields)
    return emulator.state.issue_access_token(authority=emulator.https_url, **options)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(
    header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes] | None = None
) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = b"" if sign is None else sign(signing_input.encode())
    return _secret(f"{signing_input}.{b64(signature)}", "a forged caller token")


def good_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "aud": GATEWAY_URI,
        "iss": f"https://sts.windows.net/{TENANT}/",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "appid": SCORER,
        "tid": TENANT,
        "ver": "1.0",
        "roles": [ROLE],
    }
    claims.update(changes)
    return claims


# ------------------------------------------------------------------------------ the raw socket
def raw(
    port: int, path: str, headers: dict[str, str], body: bytes = b"{}", *, send_body: bool = True
) -> Answer:
    """One request on its own connection, the answer read to its end (the gateway closes after it)."""
    lines = [f"POST {path} HTTP/1.1", "Host: gw", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body if send_body else b"")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no complete answer within 10 s: {data[:300]!r}") from None
            if not chunk:
                break
            data += chunk
            _, sep, rest = data.partition(b"\r\n\r\n")
            if sep and not send_body:  # the client never sends its body: read the answer's length only
                length = int(Answer(data).header("content-length")[0])
                if len(rest) >= length:
                    break
    return Answer(data)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upstream_headers(response: httpx.Response) -> list[tuple[str, str]]:
    return [tuple(pair) for pair in json.loads(response.json())["headers"]]  # type: ignore[misc]


def scrape(gateway: ServerThread) -> str:
    return httpx.get(f"{gateway.url}/metrics", timeout=10).text


def samples(text: str, name: str) -> list[dict[str, str]]:
    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found.append({**sample.labels, "value": str(sample.value)})
    return found


def value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for sample in samples(text, name):
        if all(sample.get(key) == wanted for key, wanted in labels.items()):
            total += float(sample["value"])
    return total


# ------------------------------------------------------------------------------ callers that pass
def test_valid_callers_pass_and_the_upstream_sees_only_the_routes_credential(
    emulator: EmulatorServer,
    gateway: ServerThread,
    recording: tuple[Upstream, ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    v1 = msal_token(emulator, SCORER)
    emulator.state.apis.set_token_version(GATEWAY_APP, 2)
    v2 = msal_token(emulator, SCORER)
    pinner = msal_token(emulator, PINNER)
    callers = [
        (bearer(v1), f"app:{SCORER}"),
        (bearer(v2), f"app:{SCORER}"),
        ({"Authorization": f"bearer {v1}"}, f"app:{SCORER}"),  # the scheme in any case
        (bearer(pinner), f"app:{PINNER}"),
        ({"x-gateway-key": BATCH_KEY}, "key:batch"),
    ]
    for headers, caller in callers:
        for path in ("/fraud/echo", "/open/echo"):
            response = httpx.post(f"{gateway.url}{path}", json={"data": [[1, 2, 3, 4]]}, headers=headers)
            assert response.status_code == 200, (caller, path, response.text)
            seen = upstream_headers(response)
            assert [v for n, v in seen if n == "authorization"] == [f"Bearer {PRIMARY}"]
            assert not [n for n, _ in seen if n == "x-gateway-key"]
            for token in (v1, v2, pinner, BATCH_KEY):
                assert token not in json.dumps(seen)
            assert any(
                f"route={path.split('/')[1]} caller={caller} status=200" in r.getMessage()
                for r in caplog.records
            )
    # The JSON log's field, from the same record.
    assert {getattr(r, "caller", None) for r in caplog.records if r.name == "gateway.access"} >= {
        f"app:{SCORER}",
        f"app:{PINNER}",
        "key:batch",
    }


def test_every_refused_token_is_a_401_naming_its_reason_with_the_challenge(
    emulator: EmulatorServer, gateway: ServerThread
) -> None:
    public_pem = emulator.state.signing.current.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    kid = emulator.state.signing.current.kid
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    valid = issue(emulator)
    head, payload, signature = valid.split(".")
    tampered_claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    tampered_claims["roles"] = ["Scoring.Admin"]
    tampered = _secret(f"{head}.{b64(json.dumps(tampered_claims).encode())}.{signature}", "a tampered token")
    now = time.time()
    cases = {
        "expired": (issue(emulator, lifetime_s=-3600), "the access token expired at"),
        "not_yet_valid": (
            issue(emulator, extra_claims={"nbf": int(now) + 3600}),
            "the access token is not valid before",
        ),
        "wrong_audience": (
            issue(emulator, audience="https://ml.azure.com"),
            "the access token is for audience 'https://ml.azure.com', not for this gateway",
        ),
        "wrong_tenant": (issue(emulator, tenant_id=OTHER_TENANT), f"is from tenant '{OTHER_TENANT}'"),
        "wrong_issuer": (
            issue(emulator, extra_claims={"iss": "https://sts.windows.net/someone-else/"}),
            "is not Entra ID's v1 or v2 issuer of its tenant",
        ),
        "algorithm": (forged({"alg": "none", "typ": "JWT", "kid": kid}, good_claims()), "algorithm 'none'"),
        "algorithm_hs256": (
            forged(
                {"alg": "HS256", "typ": "JWT", "kid": kid},
                good_claims(),
                lambda data: hmac.new(public_pem, data, hashlib.sha256).digest(),
            ),
            "algorithm 'HS256', not RS256",
        ),
        "embedded_key": (
            forged(
                {"alg": "RS256", "kid": kid, "jku": "https://attacker.example/keys"},
                good_claims(),
                lambda data: b"x",
            ),
            "brings its own key (jku in its header)",
        ),
        "unknown_key": (
            jwt.encode(good_claims(), stranger, algorithm="RS256", headers={"kid": "not-a-published-key"}),
            "is signed with key 'not-a-published-key', which is not among the signing keys",
        ),
        "bad_signature": (tampered, "signature does not verify"),
        "malformed": ("not-a-jwt-at-all", "the access token is not a JWT"),
        "no_client": (issue(emulator, appid=""), "names no client application"),
    }
    _secret(cases["unknown_key"][0], "a token signed by a stranger")
    before = scrape(gateway)
    for reason, (token, message) in cases.items():
        answer = raw(gateway.port, "/fraud/score", bearer(token))
        assert answer.status == 401, (reason, answer.body)
        error = answer.error()
        assert error["code"] == "caller_unauthenticated", reason
        assert message in error["message"], (reason, error["message"])
        assert answer.header("www-authenticate") == ['Bearer error="invalid_token"'], reason
        assert token not in answer.body.decode("latin-1")
    after = scrape(gateway)
    for reason in cases:
        counted = "algorithm" if reason == "algorithm_hs256" else reason
        assert value(after, "gateway_caller_token_refusals_total", reason=counted) > value(
            before, "gateway_caller_token_refusals_total", reason=counted
        ), reason
    # No credential at all: the bare challenge (RFC 6750 3.1), and what to send.
    answer = raw(gateway.port, "/open/score", {})
    assert answer.status == 401 and answer.header("www-authenticate") == ["Bearer"]
    assert answer.error()["code"] == "caller_unauthenticated"
    assert f"'{GATEWAY_URI}/.default'" in answer.error()["message"]
    assert "x-gateway-key" in answer.error()["message"]
    # A token refused is refused, whatever else the request carries; two Authorization headers are ambiguous.
    answer = raw(gateway.port, "/open/score", {**bearer(cases["expired"][0]), "x-gateway-key": BATCH_KEY})
    assert answer.status == 401 and answer.error()["code"] == "caller_unauthenticated"
    lines = "POST /open/score HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nConnection: close\r\n"
    lines += f"Authorization: Bearer {valid}\r\nAuthorization: Bearer {valid}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(lines.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert (
        Answer(data).status == 401 and "more than one Authorization header" in Answer(data).error()["message"]
    )
    # A wrong API key keeps its own code.
    answer = raw(gateway.port, "/open/score", {"x-gateway-key": "not-a-configured-key"})
    assert answer.status == 401 and answer.error()["code"] == "client_unauthenticated"
    assert not answer.header("www-authenticate")


# ------------------------------------------------------------------------------ per-route rules
def test_roles_app_ids_and_key_names_decide_per_route_before_the_body(
    emulator: EmulatorServer, gateway: ServerThread, recording: tuple[Upstream, ServerThread]
) -> None:
    upstream, _ = recording
    scorer, no_role, pinner = (msal_token(emulator, client) for client in (SCORER, NO_ROLE, PINNER))
    allowed = {
        "/fraud": [bearer(scorer), bearer(pinner), {"x-gateway-key": BATCH_KEY}],
        "/open": [bearer(scorer), bearer(no_role), bearer(pinner), {"x-gateway-key": OTHER_KEY}],
    }
    for prefix, callers in allowed.items():
        for headers in callers:
            assert raw(gateway.port, f"{prefix}/score", headers).status == 200, (prefix, headers)
    refused = [(bearer(no_role), f"caller app:{NO_ROLE}"), ({"x-gateway-key": OTHER_KEY}, "caller key:other")]
    for headers, who in refused:
        seen_before = upstream.seen("/score")
        # The body is announced and never sent: the refusal comes before the gateway waits for it.
        answer = raw(gateway.port, "/fraud/score", headers, b"x" * 5000, send_body=False)
        assert answer.status == 403, answer.body
        error = answer.error()
        assert error["code"] == "caller_not_allowed"
        assert error["message"] == f"{who} may not use route fraud; ask the gateway's operator for access"
        assert ROLE not in error["message"] and "batch" not in error["message"]
        assert upstream.seen("/score") == seen_before


def test_only_callers_the_route_names_choose_its_deployment(
    emulator: EmulatorServer, gateway: ServerThread, recording: tuple[Upstream, ServerThread]
) -> None:
    upstream, _ = recording
    scorer, pinner = msal_token(emulator, SCORER), msal_token(emulator, PINNER)

    def deployments(path: str, headers: dict[str, str]) -> list[str]:
        answer = raw(gateway.port, path, {**headers, "azureml-model-deployment": "green"})
        assert answer.status == 200, answer.body
        with upstream.lock:
            seen = upstream.requests[-1]["headers"]
        return [v for n, v in seen if n == "azureml-model-deployment"]

    assert deployments("/fraud/score", bearer(pinner)) == ["green"]  # may_pin_deployment names it
    assert deployments("/fraud/score", bearer(scorer)) == ["blue"]  # the route's own header
    assert deployments("/fraud/score", {"x-gateway-key": BATCH_KEY}) == ["blue"]
    assert deployments("/open/score", bearer(scorer)) == []  # no header of its own, nobody may choose
    assert deployments("/open/score", bearer(pinner)) == []  # may_pin_deployment is per route
    # A pinning caller that does not choose gets the route's deployment.
    answer = raw(gateway.port, "/fraud/score", bearer(pinner))
    assert answer.status == 200
    with upstream.lock:
        seen = upstream.requests[-1]["headers"]
    assert [v for n, v in seen if n == "azureml-model-deployment"] == ["blue"]


# ------------------------------------------------------------------------------ signing keys
class Load:
    """Clients sending requests with `token()` until stopped; every answer but 200 is a failure."""

    def __init__(self, url: str, token: Callable[[], str], clients: int = 4) -> None:
        self.url = url
        self.token = token
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    response = client.post(
                        self.url, json={"data": [[1, 2, 3, 4]]}, headers=bearer(self.token())
                    )
                    failure = (
                        None if response.status_code == 200 else f"{response.status_code} {response.text}"
                    )
                except httpx.HTTPError as exc:
                    failure = repr(exc)
                with self.lock:
                    self.sent += 1
                    if failure is not None:
                        self.failures.append(failure)

    def count(self) -> int:
        with self.lock:
            return self.sent

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_signing_key_rotation_under_load_fails_no_request(
    emulator: EmulatorServer, gateway: ServerThread
) -> None:
    state = emulator.state
    current = {"token": msal_token(emulator, SCORER)}
    jwks_before = state.jwks_count
    with Load(f"{gateway.url}/fraud/score", lambda: current["token"]) as load:
        wait_for(lambda: load.count() >= 20, "requests before the rotation")
        new_kid = state.signing.rotate()  # Entra ID signs with a new key from now on
        current["token"] = token = issue(emulator)
        assert jwt.get_unverified_header(token)["kid"] == new_kid
        sent = load.count()
        wait_for(lambda: load.count() >= sent + 40, "requests with the new key's tokens")
        state.signing.retire()  # the old key is withdrawn; its tokens were replaced
        current["token"] = issue(emulator)
        sent = load.count()
        wait_for(lambda: load.count() >= sent + 20, "requests after the old key was retired")
    assert load.failures == [], load.failures[:3]
    assert state.jwks_count - jwks_before == 1  # one read, for the new kid
    status = httpx.get(f"{gateway.url}/readyz", timeout=10).json()["entra_id"]
    assert new_kid in status["tenants"][TENANT]["kids"] and status["stale"] is False


def test_a_flood_of_random_kids_costs_one_key_read(emulator: EmulatorServer, gateway: ServerThread) -> None:
    state = emulator.state
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks_before = state.jwks_count
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        for index in range(1000):
            token = jwt.encode(good_claims(), stranger, algorithm="RS256", headers={"kid": uuid.uuid4().hex})
            if index % 100 == 0:
                _secret(token, "a token with a random kid")  # a sample: the hygiene scan stays quick
            response = client.post("/open/score", content=b"{}", headers=bearer(token))
            assert response.status_code == 401
            assert response.json()["error"]["message"].startswith("the access token is signed with key")
    assert state.jwks_count - jwks_before == 1
    # A real caller is not hurt by the flood.
    assert (
        httpx.post(f"{gateway.url}/fraud/score", json={}, headers=bearer(issue(emulator))).status_code == 200
    )


def test_the_provider_going_down_keeps_tokens_validating(
    emulator: EmulatorServer, gateway: ServerThread
) -> None:
    state = emulator.state
    token = issue(emulator)
    assert httpx.post(f"{gateway.url}/fraud/score", json={}, headers=bearer(token)).status_code == 200
    state.set_fault("openid", status=503)
    app = gateway.app
    keys = app.assembly.signing_keys
    assert keys is not None
    assert gateway.call(keys.refresh()) is False  # what the daily refresh meets
    ready = httpx.get(f"{gateway.url}/readyz", timeout=10)
    assert ready.status_code == 200  # the last good keys check tokens: still ready
    detail = ready.json()["entra_id"]
    assert detail["stale"] is True and "answered 503" in detail["tenants"][TENANT]["error"]
    assert value(scrape(gateway), "gateway_signing_keys_stale") == 1
    # Tokens keep validating: one seen before, and new ones (not cached yet).
    for fresh in (token, issue(emulator), issue(emulator, appid=PINNER, roles=[])):
        assert httpx.post(f"{gateway.url}/fraud/score", json={}, headers=bearer(fresh)).status_code == 200
    state.clear_faults()
    assert gateway.call(keys.refresh()) is True
    assert httpx.get(f"{gateway.url}/readyz", timeout=10).json()["entra_id"]["stale"] is False
    assert value(scrape(gateway), "gateway_signing_keys_stale") == 0


# ------------------------------------------------------------------------------ visible, bounded
def test_the_caller_label_stays_bounded_whatever_clients_send(
    emulator: EmulatorServer, gateway: ServerThread
) -> None:
    before = scrape(gateway)  # the registry is the process's: other tests' requests are in it

    def delta(text: str, **labels: str) -> float:
        return value(text, "gateway_requests_total", **labels) - value(
            before, "gateway_requests_total", **labels
        )

    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        assert client.post("/fraud/score", json={}, headers=bearer(issue(emulator))).status_code == 200
        pinner = issue(emulator, appid=PINNER, roles=[])
        assert client.post("/fraud/score", json={}, headers=bearer(pinner)).status_code == 200
        for _ in range(60):  # valid tokens of apps nobody configured
            token = issue(emulator, appid=str(uuid.uuid4()), roles=[])
            assert client.post("/open/score", json={}, headers=bearer(token)).status_code == 200
        for _ in range(470):  # keys nobody configured
            assert (
                client.post(
                    "/open/score", json={}, headers={"x-gateway-key": secrets.token_hex(16)}
                ).status_code
                == 401
            )
        for index in range(470):  # garbage tokens
            garbage = ".".join(b64(secrets.token_bytes(size)) for size in (12, 30, 20))
            if index % 100 == 0:
                _secret(garbage, "a garbage token")
            assert client.post("/open/score", json={}, headers=bearer(garbage)).status_code == 401
    text = scrape(gateway)
    labels = {sample["caller"] for sample in samples(text, "gateway_requests_total")}
    assert labels <= {f"app:{PINNER}", "key:batch", "key:other", "other", "anonymous"}, labels
    assert delta(text, route="open", caller="other", status="200") == 60
    # Labels name the callers the configuration names: PINNER by its app id; SCORER, let in by its role,
    # counts as `other` (its id is in the access line and the span).
    assert delta(text, route="fraud", caller=f"app:{PINNER}", status="200") == 1
    assert delta(text, route="fraud", caller="other", status="200") == 1
    assert delta(text, caller="anonymous", status="401") == 940


def test_the_span_of_a_request_names_its_caller(
    emulator: EmulatorServer,
    recording: tuple[Upstream, ServerThread],
    gateway_factory: Callable[..., ServerThread],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The OpenTelemetry span carries the caller as the access line does: `app:<id>` for an Entra ID
    caller (also one the route refuses, and one counted as `other` in the metrics), `key:<name>` for an
    API-key caller (tests/test_tracing.py shows `anonymous`)."""
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    monkeypatch.setenv("CALLERS_TEST_KEY", PRIMARY)
    config = gateway_config(emulator, recording[1].url)
    config["telemetry"] = {"otel": {"enabled": True, "service_name": "callers-under-test"}}
    gateway = gateway_factory(config)
    exporter = InMemorySpanExporter()
    assert gateway.app.tracing is not None and gateway.app.tracing.provider is not None
    gateway.app.tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
    stranger = str(uuid.uuid4())
    sent = [
        ("/fraud/score", bearer(issue(emulator)), 200, f"app:{SCORER}"),
        ("/open/score", bearer(issue(emulator, appid=stranger, roles=[])), 200, f"app:{stranger}"),
        ("/fraud/score", bearer(issue(emulator, appid=NO_ROLE, roles=[])), 403, f"app:{NO_ROLE}"),
        ("/fraud/score", {"x-gateway-key": BATCH_KEY}, 200, "key:batch"),
        ("/fraud/score", {"x-gateway-key": OTHER_KEY}, 403, "key:other"),
    ]
    for path, headers, status, caller in sent:
        exporter.clear()
        assert raw(gateway.port, path, headers).status == status, caller
        # The span ends right after the answer's last byte: the client may be a moment ahead.
        deadline = time.monotonic() + 5
        while not exporter.get_finished_spans() and time.monotonic() < deadline:
            time.sleep(0.01)
        (span,) = exporter.get_finished_spans()
        assert span.attributes is not None
        assert span.attributes["gateway.caller"] == caller
        assert span.attributes["http.response.status_code"] == status


def test_without_callers_no_client_chooses_the_deployment(
    recording: tuple[Upstream, ServerThread],
    gateway_factory: Callable[..., ServerThread],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No inbound identity, no `callers`: what every gateway before issue 16 was. A client's deployment
    header went through, so any client could score against any deployment of the endpoint."""
    upstream, server = recording
    monkeypatch.setenv("CALLERS_TEST_KEY", PRIMARY)
    route = {"upstream": server.url, "auth": {"type": "key", "primary": {"env": "CALLERS_TEST_KEY"}}}
    gateway = gateway_factory(
        {
            "routes": {
                "plain": {"path": "/plain", **route},
                "blue": {"path": "/blue", "headers": {"azureml-model-deployment": "blue"}, **route},
            }
        }
    )
    for path, expected in (("/plain/score", []), ("/blue/score", ["blue"])):
        answer = raw(
            gateway.port, path, {"azureml-model-deployment": "green", "AzureML-Model-Deployment": "red"}
        )
        assert answer.status == 200, answer.body
        with upstream.lock:
            seen = upstream.requests[-1]["headers"]
        assert [v for n, v in seen if n == "azureml-model-deployment"] == expected, path


# ------------------------------------------------------------------------------ a real `gateway serve`
GATEWAY = [sys.executable, "-m", "gateway.cli"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve(config: dict[str, Any], tmp_path: Path) -> subprocess.Popen[str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen(
        [*GATEWAY, "serve", "--config", str(path)],
        env={**os.environ, "CALLERS_TEST_KEY": PRIMARY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.terminate()
    try:
        out, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return out + err


def test_gateway_serve_reads_the_signing_keys_at_start_and_refuses_to_start_without_them(
    emulator: EmulatorServer, recording: tuple[Upstream, ServerThread], tmp_path: Path
) -> None:
    upstream, server = recording
    port = _free_port()
    config = gateway_config(emulator, server.url)
    config["server"] = {"host": "0.0.0.0", "port": port}  # Entra ID tokens are its inbound protection
    config["inbound"].pop("api_keys")
    config["routes"]["fraud"]["callers"] = {"roles": [ROLE]}
    discovery = f"{emulator.https_url}/{TENANT}/v2.0/.well-known/openid-configuration"

    emulator.state.set_fault("openid", status=503)
    process = _serve(config, tmp_path)
    try:
        process.wait(60)
    finally:
        output = _stop(process)
    assert process.returncode == 2, output
    assert "cannot read Entra ID's signing keys" in output and f"{discovery} answered 503" in output

    emulator.state.clear_faults()
    process = _serve(config, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, _stop(process)
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.05)
        token, no_role = issue(emulator), issue(emulator, appid=NO_ROLE, roles=[])
        assert raw(port, "/fraud/score", bearer(token)).status == 200
        with upstream.lock:
            seen = upstream.requests[-1]["headers"]
        assert [v for n, v in seen if n == "authorization"] == [f"Bearer {PRIMARY}"]
        refused = raw(port, "/fraud/score", bearer(issue(emulator, lifetime_s=-600)))
        assert refused.status == 401 and refused.header("www-authenticate") == [
            'Bearer error="invalid_token"'
        ]
        assert raw(port, "/fraud/score", {}).header("www-authenticate") == ["Bearer"]
        denied = raw(port, "/fraud/score", bearer(no_role))
        assert (
            denied.status == 403 and f"caller app:{NO_ROLE} may not use route fraud" in denied.body.decode()
        )
        detail = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()["entra_id"]
        assert detail["tenants"][TENANT]["jwks_uri"] == f"{emulator.https_url}/{TENANT}/discovery/v2.0/keys"
    finally:
        output = _stop(process)
    assert f"caller=app:{SCORER} status=200" in output
    assert f"caller=app:{NO_ROLE} status=403" in output
    assert token not in output and no_role not in output


def test_gateway_check_reads_the_signing_keys_and_prints_the_issuers(
    emulator: EmulatorServer, recording: tuple[Upstream, ServerThread], tmp_path: Path
) -> None:
    config = gateway_config(emulator, recording[1].url, allowed_tenants=[TENANT, OTHER_TENANT])
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "CALLERS_TEST_KEY": PRIMARY}
    command = [*GATEWAY, "check", "--config", str(path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for tenant in (TENANT, OTHER_TENANT):
        assert f"https://sts.windows.net/{tenant}/  tenant {tenant}" in result.stdout
        assert f"{emulator.https_url}/{tenant}/v2.0  tenant {tenant}" in result.stdout
        assert f"tenant {tenant}: 1 signing keys from {emulator.https_url}/{tenant}/discovery/v2.0/keys" in (
            result.stdout
        )
    assert "Entra ID signing keys (inbound.entra_id)" in result.stdout

    emulator.state.set_fault("openid", status=500)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "CALLERS  inbound.entra_id  FAILED" in result.stdout and "answered 500" in result.stdout


def test_client_certificates_name_callers_on_a_mutual_tls_gateway(
    recording: tuple[Upstream, ServerThread], tmp_path: Path
) -> None:
    from test_inbound_tls import Ca

    server_ca = Ca("callers server CA")
    client_ca = Ca("callers client CA")
    cert, key = server_ca.issue("localhost", server=True)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    (tmp_path / "client-ca.pem").write_bytes(client_ca.pem())
    port = _free_port()
    route = {"upstream": recording[1].url, "auth": {"type": "key", "primary": {"env": "CALLERS_TEST_KEY"}}}
    config = {
        "server": {
            "port": port,
            "tls": {
                "cert": {"file": str(tmp_path / "tls.crt")},
                "key": {"file": str(tmp_path / "tls.key")},
                "client_ca": str(tmp_path / "client-ca.pem"),
            },
        },
        "routes": {
            "reports": {"path": "/reports", "callers": {"cert_subjects": ["reporting"]}, **route},
            "open": {"path": "/open", **route},
        },
    }

    def client(common_name: str) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=server_ca.pem().decode())
        certificate, private_key = client_ca.issue(common_name, server=False)
        (tmp_path / f"{common_name}.pem").write_bytes(certificate + private_key)
        context.load_cert_chain(tmp_path / f"{common_name}.pem")
        return context

    def ask(context: ssl.SSLContext, path: str) -> Answer:
        with context.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost"
        ) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return Answer(data)

    reporting, laptop = client("reporting"), client("laptop")
    process = _serve(config, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, _stop(process)
            try:
                if ask(reporting, "/healthz").status == 200:
                    break
            except (OSError, ssl.SSLError):
                pass
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.1)
        assert ask(reporting, "/reports/score").status == 200
        assert ask(laptop, "/open/score").status == 200
        denied = ask(laptop, "/reports/score")
        assert denied.status == 403
        assert denied.error()["message"].startswith("caller cert:laptop may not use route reports")
    finally:
        output = _stop(process)
    assert "route=reports caller=cert:reporting status=200" in output
    assert "route=open caller=cert:laptop status=200" in output


# ------------------------------------------------------------------------------ reload
def test_a_reload_keeps_the_signing_keys_unless_their_settings_change(
    emulator: EmulatorServer, gateway: ServerThread, recording: tuple[Upstream, ServerThread]
) -> None:
    from gateway.config import parse_config

    state, app = emulator.state, gateway.app
    kept = app.assembly.signing_keys
    token, no_role = issue(emulator), issue(emulator, appid=NO_ROLE, roles=[])
    config = gateway_config(emulator, recording[1].url)
    # New rules and a narrower audience list: the same keys serve on, the new rules apply at once.
    config["routes"]["fraud"]["callers"] = {"app_ids": [NO_ROLE]}
    config["inbound"]["entra_id"]["audiences"] = [GATEWAY_URI]
    discovery_before = state.discovery_count
    gateway.call(app.reload(parse_config(config)))
    assert app.assembly.signing_keys is kept and state.discovery_count == discovery_before
    assert raw(gateway.port, "/fraud/score", bearer(no_role)).status == 200
    assert raw(gateway.port, "/fraud/score", bearer(token)).status == 403

    # Another tenant accepted: the keys are read again, and a failure rejects the reload.
    config["inbound"]["entra_id"]["allowed_tenants"] = [TENANT, OTHER_TENANT]
    state.set_fault("openid", status=500)
    with pytest.raises(ConfigError, match="cannot read Entra ID's signing keys"):
        gateway.call(app.reload(parse_config(config)))
    assert app.assembly.signing_keys is kept
    assert raw(gateway.port, "/fraud/score", bearer(no_role)).status == 200
    state.clear_faults()
    gateway.call(app.reload(parse_config(config)))
    assert app.assembly.signing_keys is not kept and app.assembly.signing_keys is not None
    other = issue(emulator, tenant_id=OTHER_TENANT, appid=NO_ROLE, roles=[])
    assert raw(gateway.port, "/fraud/score", bearer(other)).status == 200

    # No more Entra ID: tokens mean nothing; the keys stop being refreshed.
    config["inbound"].pop("entra_id")
    config["routes"]["fraud"]["callers"] = {"api_keys": ["batch"]}
    gateway.call(app.reload(parse_config(config)))
    assert app.assembly.signing_keys is None
    answer = raw(gateway.port, "/open/score", bearer(token))
    assert answer.status == 401 and answer.error()["code"] == "client_unauthenticated"
    assert raw(gateway.port, "/fraud/score", {"x-gateway-key": BATCH_KEY}).status == 200


def test_a_connection_recognises_the_token_its_last_request_proved_and_nothing_else(
    emulator: EmulatorServer,
    recording: tuple[Upstream, ServerThread],
    gateway_factory: Callable[..., ServerThread],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A keep-alive client's token is checked by comparing it with the one its connection's last request
    proved (no hash): another token on that connection is validated in full, a refusal does not spoil the
    good token, the proof ends when the token expires, and a reload that changes what is accepted ends it
    too."""
    from gateway.config import parse_config

    monkeypatch.setenv("CALLERS_TEST_KEY", PRIMARY)
    config = gateway_config(emulator, recording[1].url, clock_skew_s=0)
    gateway = gateway_factory(config)
    token = issue(emulator)
    tampered = _secret(token[:-8] + ("A" * 8 if not token.endswith("A" * 8) else "B" * 8), "a tampered token")
    connection = KeptAlive(gateway.port)
    try:
        assert [connection.post("/fraud/score", bearer(token)).status for _ in range(3)] == [200] * 3
        refused = connection.post("/fraud/score", bearer(tampered))
        assert refused.status == 401 and refused.error()["code"] == "caller_unauthenticated"
        assert connection.post("/fraud/score", bearer(token)).status == 200

        # A token that expires while the connection keeps presenting it: refused from its expiry on.
        short = issue(emulator, lifetime_s=5)
        assert connection.post("/fraud/score", bearer(short)).status == 200
        expires = json.loads(base64.urlsafe_b64decode(short.split(".")[1] + "=="))["exp"]
        deadline = time.monotonic() + 30
        while (answer := connection.post("/fraud/score", bearer(short))).status == 200:
            assert time.monotonic() < deadline, "the expired token was still accepted after 30 s"
            time.sleep(0.05)
        assert answer.status == 401 and "expired" in answer.error()["message"]
        assert time.time() >= expires - 1  # not refused early (the token's exp has whole seconds)

        # A reload that accepts only the gateway's client id as the audience: the token (for its
        # application ID URI) is no longer proved, though its connection presented it a moment ago.
        assert connection.post("/fraud/score", bearer(token)).status == 200
        config["inbound"]["entra_id"]["audiences"] = [GATEWAY_APP]
        gateway.call(gateway.app.reload(parse_config(config)))
        answer = connection.post("/fraud/score", bearer(token))
        assert answer.status == 401 and GATEWAY_APP in answer.error()["message"]
    finally:
        connection.close()
