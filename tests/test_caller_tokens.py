"""Entra ID caller tokens: validation (`gateway.caller_tokens`) with the signing keys read from OpenID
discovery (`gateway.signing_keys`), against the emulated Entra ID over TLS with its CA. Client tokens
come from real MSAL (client credentials, managed identity) or from the emulator's own signer; hostile
tokens are built by hand. Clocks are injected where a duration matters."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import jwt
import msal
import pytest
from azure_env import wait_for
from conftest import HYGIENE
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import REGISTRY

from gateway.caller_tokens import CallerTokenValidator, bearer_token, v1_issuer, v2_issuer
from gateway.callers import OTHER, CallerFactory
from gateway.config import parse_config
from gateway.emulator import EmulatorServer, EmulatorState, MsalHttpxClient
from gateway.errors import CallerUnauthenticated, ConfigError, UnknownSigningKey
from gateway.signing_keys import EntraSigningKeys
from gateway.tls import client_context

T = TypeVar("T")
TENANT = "7e4a0000-0000-4000-8000-0000000000a1"
OTHER_TENANT = "7e4a0000-0000-4000-8000-0000000000b2"
GATEWAY_URI = "api://scoring-gateway"
GATEWAY_APP = "9a7e0000-0000-4000-8000-0000000000a1"
CLIENT = "c1000000-0000-4000-8000-0000000000c1"
NO_ROLE_CLIENT = "c1000000-0000-4000-8000-0000000000c2"
SECRET = "caller-tokens-client-secret"
ROLE = "Scoring.Invoke"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    state = EmulatorState()
    for tenant in (TENANT, OTHER_TENANT):
        state.add_app(tenant, CLIENT, secret=SECRET)
    state.add_app(TENANT, NO_ROLE_CLIENT, secret=SECRET)
    state.apis.add(
        TENANT, identifier_uri=GATEWAY_URI, client_id=GATEWAY_APP, app_roles=[ROLE, "Scoring.Admin"]
    )
    state.apis.assign(GATEWAY_APP, CLIENT, ROLE)
    with EmulatorServer(state) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean(emulator: EmulatorServer) -> Iterator[None]:
    emulator.state.clear_faults()
    yield
    emulator.state.clear_faults()
    emulator.state.apis.set_token_version(GATEWAY_APP, None)


def run(make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()

    return asyncio.run(main())


def entra(emulator: EmulatorServer, **fields: Any) -> dict[str, Any]:
    return {
        "tenant_id": TENANT,
        "audiences": [GATEWAY_URI, GATEWAY_APP],
        "authority": emulator.https_url,
        **fields,
    }


@asynccontextmanager
async def validating(
    emulator: EmulatorServer,
    *,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    cache_size: int = 100,
    ca: bool = True,
    keys_options: dict[str, Any] | None = None,
    **fields: Any,
) -> AsyncIterator[tuple[CallerTokenValidator, EntraSigningKeys]]:
    config = parse_config(
        {
            "inbound": {"entra_id": entra(emulator, **fields)},
            "routes": {
                "fraud": {
                    "path": "/fraud",
                    "upstream": emulator.http_url,
                    "auth": {"type": "none"},
                    "callers": {"app_ids": [CLIENT], "roles": [ROLE]},
                }
            },
        }
    )
    assert config.inbound.entra_id is not None
    verify = client_context(str(emulator.ca_file) if ca else None)
    async with httpx.AsyncClient(verify=verify, trust_env=False, timeout=5) as http:
        keys = EntraSigningKeys(
            config.inbound.entra_id, lambda: http, clock=monotonic, **(keys_options or {})
        )
        try:
            await keys.start()
            validator = CallerTokenValidator(
                config.inbound.entra_id, keys, CallerFactory(config), clock=clock, cache_size=cache_size
            )
            yield validator, keys
        finally:
            await keys.aclose()


def issue(emulator: EmulatorServer, **fields: Any) -> str:
    """A token the emulated Entra ID signs: by default a v1 token of CLIENT for the gateway, with its role."""
    options: dict[str, Any] = {
        "audience": GATEWAY_URI,
        "tenant_id": TENANT,
        "appid": CLIENT,
        "roles": [ROLE],
        "authority": emulator.https_url,
    }
    options.update(fields)
    return emulator.state.issue_access_token(**options)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(
    header: dict[str, Any],
    claims: dict[str, Any],
    sign: Callable[[bytes], bytes] | None = None,
    *,
    remember: bool = True,
) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = b"" if sign is None else sign(signing_input.encode())
    token = f"{signing_input}.{b64(signature)}"
    if remember:  # it must never show in any output
        HYGIENE.add_secret(token, "a forged caller token")
    return token


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


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


# ------------------------------------------------------------------------------ callers that pass
def test_msal_tokens_v1_and_v2_make_app_callers(emulator: EmulatorServer) -> None:
    v1 = msal_token(emulator, CLIENT)
    emulator.state.apis.set_token_version(GATEWAY_APP, 2)
    v2 = msal_token(emulator, CLIENT)
    no_role = msal_token(emulator, NO_ROLE_CLIENT)
    assert claims_of(v1)["ver"] == "1.0" and claims_of(v2)["ver"] == "2.0"

    async def main() -> None:
        async with validating(emulator) as (validator, _):
            for token in (v1, v2, v1.encode()):
                caller = await validator.authenticate(token)
                assert (caller.id, caller.label, caller.tenant_id) == (
                    f"app:{CLIENT}",
                    f"app:{CLIENT}",
                    TENANT,
                )
                assert caller.roles == {ROLE} and caller.oid == claims_of(v1)["oid"]
            other = await validator.authenticate(no_role)
            assert other.id == f"app:{NO_ROLE_CLIENT}" and other.roles == frozenset() and other.label == OTHER
        # Audiences without the client id: a v2 token (aud = the API's client id) is refused, saying why.
        async with validating(emulator, audiences=[GATEWAY_URI]) as (validator, _):
            with pytest.raises(CallerUnauthenticated) as caught:
                await validator.authenticate(v2)
            assert caught.value.reason == "wrong_audience"
            assert f"for audience '{GATEWAY_APP}'" in caught.value.message
            assert f"accepts '{GATEWAY_URI}'" in caught.value.message

    run(main)


def test_managed_identity_caller(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    state = emulator.state
    identity = state.add_user_assigned_identity(name="scoring-app")
    state.apis.assign(GATEWAY_APP, identity.client_id, ROLE)
    for name in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT", "IMDS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in emulator.imds_env().items():
        monkeypatch.setenv(name, value)
    with emulator.http_client() as http:
        client = msal.ManagedIdentityClient(
            msal.UserAssignedManagedIdentity(client_id=identity.client_id), http_client=http
        )
        token = client.acquire_token_for_client(resource=GATEWAY_URI)["access_token"]

    async def main() -> None:
        async with validating(emulator, tenant_id=state.mi_tenant_id) as (validator, _):
            caller = await validator.authenticate(token)
            assert caller.id == f"app:{identity.client_id}" and caller.oid == identity.object_id
            assert caller.roles == {ROLE} and caller.tenant_id == state.mi_tenant_id

    run(main)


# ------------------------------------------------------------------------------ tokens that are refused
def _hostile_tokens(emulator: EmulatorServer) -> dict[str, tuple[str, str, list[str]]]:
    """name -> (token, reason, fragments the message must hold)."""
    state = emulator.state
    kid = state.signing_kid
    now = int(time.time())
    good = issue(emulator)
    claims = claims_of(good)
    head, payload, signature = good.split(".")
    tampered_claims = claims | {"roles": [ROLE, "Scoring.Admin"]}
    tampered_payload = f"{head}.{b64(json.dumps(tampered_claims).encode())}.{signature}"
    flipped = bytearray(base64.urlsafe_b64decode(signature + "=="))
    flipped[10] ^= 0x01
    tampered_signature = f"{head}.{payload}.{b64(bytes(flipped))}"
    public_pem = state.public_key_pem().encode()
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attacker_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(attacker.public_key()))
    rs256 = {"typ": "JWT", "alg": "RS256", "kid": kid}

    def hs256(data: bytes) -> bytes:
        return hmac.new(public_pem, data, hashlib.sha256).digest()

    def with_attacker_key(headers: dict[str, Any]) -> str:
        token = jwt.encode(claims, attacker, algorithm="RS256", headers=headers)
        HYGIENE.add_secret(token, "a caller token signed by an attacker's key")
        return token

    other_app = issue(emulator, tenant_id=OTHER_TENANT)
    return {
        "expired": (issue(emulator, lifetime_s=-600), "expired", ["expired at", "get a new token"]),
        "not_yet_valid": (
            issue(emulator, extra_claims={"nbf": now + 600, "exp": now + 3600}),
            "not_yet_valid",
            ["not valid before", "check the clocks"],
        ),
        "wrong_audience": (
            issue(emulator, audience="https://ml.azure.com"),
            "wrong_audience",
            ["for audience 'https://ml.azure.com'", f"accepts '{GATEWAY_URI}' or '{GATEWAY_APP}'"],
        ),
        "wrong_issuer": (
            issue(emulator, extra_claims={"iss": f"https://evil.example/{TENANT}/v2.0"}),
            "wrong_issuer",
            [f"issuer 'https://evil.example/{TENANT}/v2.0'", f"https://sts.windows.net/{TENANT}/"],
        ),
        "issuer_of_another_tenant": (
            issue(emulator, extra_claims={"iss": f"https://sts.windows.net/{OTHER_TENANT}/"}),
            "wrong_issuer",
            ["is not Entra ID's v1 or v2 issuer of its tenant"],
        ),
        "wrong_tenant": (other_app, "wrong_tenant", [f"from tenant '{OTHER_TENANT}'", "allowed_tenants"]),
        "alg_none": (
            forged({"typ": "JWT", "alg": "none", "kid": kid}, claims),
            "algorithm",
            ["algorithm 'none', not RS256"],
        ),
        "hs256_with_the_public_key": (
            forged({"typ": "JWT", "alg": "HS256", "kid": kid}, claims, hs256),
            "algorithm",
            ["algorithm 'HS256', not RS256"],
        ),
        "unknown_kid": (
            with_attacker_key({"kid": "not-a-published-key"}),
            "unknown_key",
            ["signed with key 'not-a-published-key'", "not among the signing keys"],
        ),
        "no_kid": (
            forged({"typ": "JWT", "alg": "RS256"}, claims, lambda d: b"x" * 256),
            "unknown_key",
            ["no `kid`"],
        ),
        "forged_with_a_published_kid": (
            with_attacker_key({"kid": kid}),
            "bad_signature",
            ["signature does not verify", "altered"],
        ),
        "tampered_payload": (tampered_payload, "bad_signature", ["signature does not verify"]),
        "tampered_signature": (tampered_signature, "bad_signature", ["signature does not verify"]),
        "embedded_jwk": (with_attacker_key({"kid": kid, "jwk": attacker_jwk}), "embedded_key", ["(jwk in"]),
        "jku": (
            with_attacker_key({"kid": kid, "jku": "https://evil.example/keys"}),
            "embedded_key",
            ["(jku in"],
        ),
        "x5u_and_x5c": (
            forged(rs256 | {"x5u": "https://evil.example/c", "x5c": ["MIIB"]}, claims, lambda d: b"x"),
            "embedded_key",
            ["(x5u, x5c in"],
        ),
        "not_a_jwt": ("not-a-token", "malformed", ["not a JWT"]),
        "no_client": (
            emulator.state.signing.sign({k: v for k, v in claims.items() if k != "appid"}),
            "no_client",
            ["names no client application"],
        ),
        "no_expiry": (
            emulator.state.signing.sign({k: v for k, v in claims.items() if k != "exp"}),
            "malformed",
            ["no expiry"],
        ),
        "exp_not_a_number": (
            emulator.state.signing.sign(claims | {"exp": "tomorrow"}),
            "malformed",
            ["`exp` claim is not a time"],
        ),
    }


def test_every_hostile_token_is_refused_with_its_reason(emulator: EmulatorServer) -> None:
    cases = _hostile_tokens(emulator)

    async def main() -> None:
        async with validating(emulator) as (validator, _):
            for name, (token, reason, fragments) in cases.items():
                before = metric("gateway_caller_token_refusals_total", reason=reason)
                with pytest.raises(CallerUnauthenticated) as caught:
                    await validator.authenticate(token)
                refusal = caught.value
                assert refusal.reason == reason, (name, refusal.message)
                for fragment in fragments:
                    assert fragment in refusal.message, (name, refusal.message)
                signature = token.split(".")[-1]
                assert token not in refusal.message and (not signature or signature not in refusal.message)
                assert (refusal.status, refusal.code) == (401, "caller_unauthenticated")
                assert refusal.headers == ((b"www-authenticate", b'Bearer error="invalid_token"'),)
                assert metric("gateway_caller_token_refusals_total", reason=reason) == before + 1, name
            assert validator.cached_tokens == 0  # nothing refused is remembered

    run(main)


# ------------------------------------------------------------------------------ signing keys
def test_a_thousand_random_kids_cost_one_key_read(emulator: EmulatorServer) -> None:
    clock = Clock(1000.0)
    claims = claims_of(issue(emulator))
    tokens = [
        # A sample of them for the secret-hygiene scan, which stays quick.
        forged(
            {"alg": "RS256", "kid": secrets.token_urlsafe(12)},
            claims,
            lambda d: b"x" * 256,
            remember=i % 100 == 0,
        )
        for i in range(1000)
    ]

    async def main() -> None:
        async with validating(emulator, monotonic=clock) as (validator, _):
            reads = emulator.state.jwks_count
            unknown_reads = metric("gateway_signing_key_fetches_total", reason="unknown_kid", result="ok")
            # Half at once (they share one read), half one after the other (the limit holds them off).
            outcomes = await asyncio.gather(
                *(validator.authenticate(t) for t in tokens[:500]), return_exceptions=True
            )
            for token in tokens[500:]:
                with pytest.raises(UnknownSigningKey):
                    await validator.authenticate(token)
            assert all(isinstance(outcome, UnknownSigningKey) for outcome in outcomes)
            assert 1 <= emulator.state.jwks_count - reads <= 2
            assert (
                metric("gateway_signing_key_fetches_total", reason="unknown_kid", result="ok")
                == unknown_reads + 1
            )
            assert (await validator.authenticate(issue(emulator))).id == f"app:{CLIENT}"  # still serving

            clock.now += 301  # the limit is over: the next unknown kid is read once more
            reads = emulator.state.jwks_count
            with pytest.raises(UnknownSigningKey):
                await validator.authenticate(tokens[0])
            with pytest.raises(UnknownSigningKey):
                await validator.authenticate(tokens[1])
            assert emulator.state.jwks_count - reads == 1

    run(main)


def test_signing_key_rotation_is_followed_without_a_failed_request(emulator: EmulatorServer) -> None:
    admin = f"{emulator.http_url}/_emulator"
    token_url = f"{emulator.authority(TENANT)}/oauth2/v2.0/token"
    form = {"grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET}
    form["scope"] = f"{GATEWAY_URI}/.default"

    async def main() -> None:
        failures: list[str] = []
        async with (
            validating(emulator) as (validator, _),
            httpx.AsyncClient(verify=client_context(str(emulator.ca_file)), trust_env=False) as http,
        ):

            async def new_token() -> str:
                answer = await http.post(token_url, data=form)
                token: str = answer.json()["access_token"]
                return token

            async def call(token: str) -> None:
                try:
                    await validator.authenticate(token)
                except CallerUnauthenticated as exc:
                    failures.append(exc.message)

            before = [await new_token() for _ in range(3)]
            for token in before:
                await call(token)
            reads = emulator.state.jwks_count
            new_kid = (await http.post(f"{admin}/signing-keys/rotate")).json()["kid"]
            after = [await new_token() for _ in range(3)]
            assert {jwt.get_unverified_header(t)["kid"] for t in after} == {new_kid}
            # Requests keep coming with tokens of both keys, concurrently.
            await asyncio.gather(*(call(token) for token in before + after + before + after))
            assert emulator.state.jwks_count - reads == 1  # one read found the new key
            await http.post(f"{admin}/signing-keys/retire")
            await asyncio.gather(*(call(token) for token in [*after, await new_token()]))
        assert failures == []

    run(main)


def test_provider_down_keeps_validating_with_the_last_good_keys(
    emulator: EmulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with validating(emulator) as (validator, keys):
            assert keys.ready and not keys.stale
            emulator.state.set_fault("openid", status=503)
            with caplog.at_level(logging.WARNING, logger="gateway.entra_id"):
                assert not await keys.refresh()
                assert not await keys.refresh()
            assert keys.stale and keys.ready and metric("gateway_signing_keys_stale") == 1
            tenant = keys.status()["tenants"][TENANT]
            assert "answered 503" in tenant["error"] and tenant["kids"] == [emulator.state.signing_kid]
            lines = [
                r.getMessage() for r in caplog.records if "cannot read the signing keys" in r.getMessage()
            ]
            assert len(lines) == 1 and "(refresh)" in lines[0] and "last good keys stay in use" in lines[0]
            # A token never seen before is checked with the cached keys.
            assert (await validator.authenticate(issue(emulator))).id == f"app:{CLIENT}"
            # An unknown kid still costs one attempt, which fails; the keys stay.
            with pytest.raises(UnknownSigningKey):
                await validator.authenticate(forged({"alg": "RS256", "kid": "new"}, {}, lambda d: b"x"))
            assert keys.key(emulator.state.signing_kid) is not None

            emulator.state.clear_faults()
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="gateway.entra_id"):
                assert await keys.refresh()
            assert not keys.stale and metric("gateway_signing_keys_stale") == 0
            assert keys.status()["tenants"][TENANT]["error"] is None
            assert any("read again after a failure" in r.getMessage() for r in caplog.records)

    run(main)


def test_start_up_failures_are_config_errors_naming_the_url(emulator: EmulatorServer) -> None:
    discovery = f"{emulator.https_url}/{TENANT}/v2.0/.well-known/openid-configuration"

    async def start(**options: Any) -> str:
        with pytest.raises(ConfigError) as caught:
            async with validating(emulator, **options):
                pass
        return str(caught.value)

    emulator.state.set_fault("openid", status=503, count=1)
    message = run(lambda: start())
    assert f"{discovery} answered 503" in message and "inbound.entra_id" in message
    message = run(lambda: start(ca=False))
    assert "is not trusted" in message and "tls.ca_bundle" in message
    closed = "https://127.0.0.1:9"
    message = run(lambda: start(authority=closed))
    assert f"cannot reach {closed}/{TENANT}/v2.0/.well-known/openid-configuration" in message
    emulator.state.set_fault("openid", status=404, count=1, skip=1)  # discovery passes, the key set fails
    assert f"{emulator.https_url}/{TENANT}/discovery/v2.0/keys answered 404" in run(lambda: start())


def test_allowed_tenants(emulator: EmulatorServer) -> None:
    v1 = issue(emulator, tenant_id=OTHER_TENANT)
    v2 = issue(emulator, tenant_id=OTHER_TENANT, version=2)

    async def main() -> None:
        async with validating(emulator) as (validator, _):
            with pytest.raises(CallerUnauthenticated) as caught:
                await validator.authenticate(v1)
            assert caught.value.reason == "wrong_tenant"
        reads = emulator.state.jwks_count
        async with validating(emulator, allowed_tenants=[TENANT, OTHER_TENANT]) as (validator, keys):
            assert emulator.state.jwks_count - reads == 2  # each tenant's own key set
            assert set(keys.status()["tenants"]) == {TENANT, OTHER_TENANT}
            for token in (v1, v2):
                caller = await validator.authenticate(token)
                assert caller.tenant_id == OTHER_TENANT and caller.id == f"app:{CLIENT}"
            issuers = validator.issuers()
            assert issuers[f"https://sts.windows.net/{OTHER_TENANT}/"] == OTHER_TENANT
            assert issuers[f"{emulator.https_url}/{OTHER_TENANT}/v2.0"] == OTHER_TENANT

    run(main)


def test_clock_skew_and_cached_tokens_expire(emulator: EmulatorServer) -> None:
    now = time.time()
    clock = Clock(now)
    expiring = issue(emulator, lifetime_s=100)
    early = issue(emulator, extra_claims={"nbf": int(now) + 30, "exp": int(now) + 3600})
    expires = claims_of(expiring)["exp"]

    async def main() -> None:
        async with validating(emulator, clock=clock) as (validator, _):  # default skew: 60 s
            assert (await validator.authenticate(early)).id == f"app:{CLIENT}"  # 30 s early is within it
            clock.now = expires + 59
            assert (await validator.authenticate(expiring)).id == f"app:{CLIENT}"
            assert validator.cached_tokens == 2
            clock.now = expires + 61  # past exp + skew: the cached entry is gone and the check says why
            with pytest.raises(CallerUnauthenticated) as caught:
                await validator.authenticate(expiring)
            assert (
                caught.value.reason == "expired"
                and "61 s ago (clock skew allowed: 60 s)" in caught.value.message
            )
        clock.now = now
        async with validating(emulator, clock=clock, clock_skew_s=10) as (validator, _):
            with pytest.raises(CallerUnauthenticated) as caught:
                await validator.authenticate(early)
            assert (
                caught.value.reason == "not_yet_valid"
                and "(clock skew allowed: 10 s)" in caught.value.message
            )
            clock.now = expires + 11
            with pytest.raises(CallerUnauthenticated):
                await validator.authenticate(expiring)

    run(main)


def test_validated_tokens_are_cached_within_a_bound(emulator: EmulatorServer) -> None:
    tokens = [issue(emulator) for _ in range(5)]
    admin = f"{emulator.http_url}/_emulator"

    async def main() -> None:
        async with validating(emulator, cache_size=3) as (validator, keys):
            for token in tokens:
                await validator.authenticate(token)
            assert validator.cached_tokens == 3 and validator.cache_size == 3
            # Take the key that signed them away: only a token still cached passes (no signature check).
            async with httpx.AsyncClient(trust_env=False) as http:
                await http.post(f"{admin}/signing-keys/rotate")
                await http.post(f"{admin}/signing-keys/retire")
            assert await keys.refresh()
            for token in tokens[2:]:
                assert validator.validate(token).id == f"app:{CLIENT}"
            for token in tokens[:2]:  # evicted: checked again, and its key is gone
                with pytest.raises(UnknownSigningKey):
                    validator.validate(token)

    run(main)


def test_the_cache_holds_digests_never_the_tokens(emulator: EmulatorServer) -> None:
    """A long-lived structure of bearer tokens is what a heap dump or a debugger would show: the cache is
    keyed by each token's SHA-256, and what it keeps of a caller holds no part of the token."""
    tokens = [issue(emulator) for _ in range(3)]

    async def main() -> None:
        async with validating(emulator) as (validator, _):
            for token in tokens:
                await validator.authenticate(token)
            cache = validator._cache
            assert len(cache) == 3
            for token in tokens:
                raw = token.encode()
                signature = raw.rsplit(b".", 1)[1]
                assert hashlib.sha256(raw).digest() in cache
                for key, (_, caller) in cache.items():
                    assert len(key) == 32 and signature not in key
                    assert signature.decode() not in repr(caller)  # a dataclass: its repr shows every field

    run(main)


def test_keys_are_refreshed_in_the_background(emulator: EmulatorServer) -> None:
    async def main() -> None:
        async with validating(emulator, keys_options={"refresh_every_s": 0.05}) as (_, keys):
            reads = emulator.state.jwks_count
            keys.start_refreshing()
            assert await wait_for(lambda: emulator.state.jwks_count >= reads + 2, within=15)

    run(main)


def test_the_background_refresh_waits_a_day_and_backs_off_from_a_minute_after_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The schedule `run()` keeps, read from its sleeps: a day between refreshes by default; after a
    failed one, retries whose ceiling doubles from a minute (full jitter: each at most its ceiling),
    never longer than the day; a success goes back to the day and starts the backoff over."""
    entra = parse_config(
        {
            "inbound": {"entra_id": {"tenant_id": str(uuid.uuid4()), "audiences": ["api://gw"]}},
            "routes": {"r": {"path": "/r", "upstream": "http://127.0.0.1:1", "auth": {"type": "none"}}},
        }
    ).inbound.entra_id
    assert entra is not None
    keys = EntraSigningKeys(entra, lambda: httpx.AsyncClient())
    outcomes = iter([False, False, False, True, False])
    sleeps: list[float] = []

    async def refresh() -> bool:
        return next(outcomes)

    class Enough(Exception):
        pass

    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        if len(sleeps) == 6:
            raise Enough

    monkeypatch.setattr(keys, "refresh", refresh)
    monkeypatch.setattr("gateway.signing_keys.asyncio.sleep", sleep)
    with pytest.raises(Enough):
        asyncio.run(keys.run())
    day = 24 * 3600
    assert sleeps[0] == day and sleeps[4] == day  # at start, and after the success
    for delay, ceiling in zip(sleeps[1:4], (60, 120, 240), strict=True):
        assert 0 <= delay <= ceiling
    assert 0 <= sleeps[5] <= 60  # the backoff started over


def test_start_up_and_periodic_reads_leave_the_unknown_kid_read_free(emulator: EmulatorServer) -> None:
    """The 5-minute limit counts only reads for unknown `kid`s: right after the start-up read, and right
    after a background refresh (even one that follows an unknown-kid read by more than the limit), a
    token naming an unknown `kid` is read for at once, once."""
    clock = Clock(1000.0)
    claims = claims_of(issue(emulator))

    def unknown() -> str:
        return forged({"alg": "RS256", "kid": secrets.token_urlsafe(12)}, claims, lambda d: b"x" * 256)

    def unknown_kid_reads() -> float:
        return metric("gateway_signing_key_fetches_total", reason="unknown_kid", result="ok")

    async def reads_for_unknown_kid(validator: CallerTokenValidator) -> float:
        # Counted by reason: a periodic read still in flight when the task is stopped cannot blur it.
        reads = unknown_kid_reads()
        with pytest.raises(UnknownSigningKey):
            await validator.authenticate(unknown())
        return unknown_kid_reads() - reads

    async def main() -> None:
        options = {"refresh_every_s": 0.05}
        async with validating(emulator, monotonic=clock, keys_options=options) as (validator, keys):
            assert await reads_for_unknown_kid(validator) == 1  # the start-up read did not count
            assert await reads_for_unknown_kid(validator) == 0  # the limit holds

            clock.now += 301  # the limit is over; now the background refresh reads the keys
            reads = emulator.state.jwks_count
            keys.start_refreshing()
            assert await wait_for(lambda: emulator.state.jwks_count >= reads + 1, within=15)
            keys.stop()
            assert await reads_for_unknown_kid(validator) == 1  # the refresh did not count
            assert await reads_for_unknown_kid(validator) == 0

            clock.now += 301
            assert await keys.refresh()  # the refresh method, driven directly
            assert await reads_for_unknown_kid(validator) == 1

    run(main)


def test_issuer_forms_and_bearer_header() -> None:
    tenant = str(uuid.uuid4())
    assert v1_issuer("https://login.microsoftonline.com", tenant) == f"https://sts.windows.net/{tenant}/"
    assert v1_issuer("https://login.microsoftonline.us", tenant) == f"https://sts.windows.net/{tenant}/"
    assert v1_issuer("https://login.chinacloudapi.cn", tenant) == f"https://sts.chinacloudapi.cn/{tenant}/"
    assert (
        v2_issuer("https://login.microsoftonline.us/", tenant)
        == f"https://login.microsoftonline.us/{tenant}/v2.0"
    )
    assert bearer_token(b"Bearer abc.def.ghi") == b"abc.def.ghi"
    assert bearer_token(b"bearer   abc ") == b"abc"
    assert (
        bearer_token(b"Basic abc") is None and bearer_token(b"Bearer") is None and bearer_token(b"") is None
    )


def test_only_rsa_signing_keys_of_2048_bits_and_more_are_taken() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from gateway.signing_keys import SigningKeyFetchError, _parse_discovery, _parse_jwks

    def jwk(key: Any, **extra: Any) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
        return data | extra

    strong = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    curve = json.loads(
        jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
    )
    rejected = [
        jwk(weak.public_key(), kid="weak"),
        curve | {"kid": "ec"},
        jwk(strong.public_key(), kid="enc", use="enc"),
        jwk(strong.public_key(), kid="rs512", alg="RS512"),
        jwk(strong.public_key()),  # no kid
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        "not a key",
    ]
    url = "https://login.example/keys"
    with pytest.raises(SigningKeyFetchError, match="holds no RSA signing key of 2048 bits"):
        _parse_jwks(url, {"keys": rejected})
    keys = _parse_jwks(
        url, {"keys": [*rejected, jwk(strong, kid="good")]}
    )  # private parts given: public taken
    assert list(keys) == ["good"] and keys["good"].public_numbers() == strong.public_key().public_numbers()
    with pytest.raises(SigningKeyFetchError, match="not a key set"):
        _parse_jwks(url, {"kid": "x"})
    with pytest.raises(SigningKeyFetchError, match="no https `jwks_uri`"):
        _parse_discovery(url, {"jwks_uri": "http://login.example/keys"})
    assert _parse_discovery(url, {"jwks_uri": url, "issuer": 7}) == (url, None)
