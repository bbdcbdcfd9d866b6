"""The token cache (gateway.tokens) with real MSAL against the emulated Entra ID over TLS on loopback.

Lifetimes are seconds, not hours: the emulator issues 3-10 s tokens, and `refresh_in` moves refreshes
earlier still. Counters come from the emulator, so "one token request" means one POST it received.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid

import jwt
import pytest
from azure_env import (
    build,
    clean_emulator_fixture,  # noqa: F401 - fixture
    emulator_fixture,  # noqa: F401 - fixture
    identity,
    make_context,
    register_app,
    run,
    scheduled_refreshes,
    wait_for,
)
from prometheus_client import REGISTRY

from gateway.credentials import Credential
from gateway.emulator.server import EmulatorServer
from gateway.errors import CredentialUnavailable
from gateway.tokens import (
    REFRESH_MARGIN_S,
    AccessToken,
    TokenCache,
    TokenEntry,
    TokenFetchError,
    TokenSource,
    refresh_delay,
    serve_margin,
)

AML_SCOPE = "https://ml.azure.com/.default"


def aad(emulator: EmulatorServer, route: str = "r", **identity_fields: object) -> tuple[Credential, str]:
    app = register_app(emulator)
    credential = build(
        emulator, {"type": "aad_token", "identity": identity(emulator, app, **identity_fields)}, route=route
    )
    return credential, app.client_id


def refreshes(route: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "gateway_credential_refreshes_total", {"route": route, "kind": "aad_token", "result": result}
    )
    return value or 0.0


def token_arrivals(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch, client_id: str) -> list[float]:
    """When each token request of `client_id` reached the emulator, on the gateway's own clock
    (`time.monotonic()`: the emulator runs in this process), in order."""
    arrivals: list[float] = []
    record = emulator.state.record_token_request

    def record_token_request(client: str, scope: str) -> None:
        if client == client_id:
            arrivals.append(time.monotonic())
        record(client, scope)

    monkeypatch.setattr(emulator.state, "record_token_request", record_token_request)
    return arrivals


def backoff_delays(entry: TokenEntry) -> list[tuple[float, float]]:
    """(when, delay) of every backoff the entry draws after a failed fetch: its next attempt is due no
    earlier than `when + delay` (the entry sets `retry_at` from a later reading of the clock)."""
    drawn: list[tuple[float, float]] = []
    draw = entry.backoff.next_delay

    def next_delay(retry_after: float | None = None) -> float:
        delay = draw(retry_after)
        drawn.append((time.monotonic(), delay))
        return delay

    entry.backoff.next_delay = next_delay  # type: ignore[method-assign]
    return drawn


def entry_of(credential: Credential) -> TokenEntry:
    entry = getattr(credential, "entry", None)
    assert isinstance(entry, TokenEntry), credential
    return entry


def test_refresh_schedule_rules() -> None:
    rng = random.Random(7)
    for _ in range(500):
        # No hint: two thirds of the lifetime, give or take 5 %.
        assert 2400 - 180 <= refresh_delay(3600, None, rng) <= 2400 + 180
        # A hint is never anticipated, and jitter after it stays within 30 s.
        assert 1800 <= refresh_delay(3600, 1800, rng) <= 1830
        # A late hint is capped at 5 minutes before expiry...
        assert refresh_delay(3600, 3500, rng) == 3600 - REFRESH_MARGIN_S
        # ...or, for short tokens, a sixth of the lifetime before it.
        assert refresh_delay(60, 59, rng) == 50
        assert 1.85 <= refresh_delay(3, None, rng) <= 2.15
    assert serve_margin(3600) == 10
    assert serve_margin(3) == pytest.approx(0.15)


def test_cached_token_is_served_without_network(emulator: EmulatorServer) -> None:
    credential, client_id = aad(emulator)

    async def scenario() -> str:
        assert credential.grant_nowait() is None  # cold: the proxy then awaits grant()
        first = await credential.grant()
        for _ in range(1000):
            assert credential.grant_nowait() is first
        assert await credential.grant() is first
        status = credential.status()
        assert status.state == "valid" and status.ready
        assert status.expires_in_s is not None and 3500 < status.expires_in_s <= 3600
        assert first.header is not None
        return first.header

    header = run(scenario())
    assert emulator.state.token_request_count(client_id) == 1
    claims = jwt.decode(header.removeprefix("Bearer "), options={"verify_signature": False})
    assert claims["aud"] == "https://ml.azure.com" and claims["appid"] == client_id


def test_concurrent_cold_requests_share_one_token_request(emulator: EmulatorServer) -> None:
    credential, client_id = aad(emulator)
    emulator.state.set_fault("token", delay_s=0.3)  # keep the one request in flight while callers pile up

    async def scenario() -> set[str | None]:
        grants = await asyncio.gather(*(credential.grant() for _ in range(500)))
        return {g.header for g in grants}

    headers = run(scenario())
    assert len(headers) == 1
    assert emulator.state.token_request_count(client_id) == 1


def test_refresh_happens_at_the_providers_hint(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator.state.configure(token_lifetime_s=10, refresh_in_s=2)
    credential, client_id = aad(emulator)
    arrivals = token_arrivals(emulator, monkeypatch, client_id)
    decisions = scheduled_refreshes(monkeypatch)

    async def scenario() -> None:
        await credential.start()
        try:
            assert await wait_for(lambda: credential.grant_nowait() is not None, 10)
            first = credential.grant_nowait()
            entry = entry_of(credential)
            lifetime, hint, delay = decisions[0]
            # MSAL rounds refresh_on down to a whole second: a hint of 1-2 s in a 10 s lifetime.
            assert 9 < lifetime < 10.5 and hint is not None and 1 <= hint <= 3, (lifetime, hint)
            # Never before the hint, jitter of at most 5 % of the lifetime: long before two thirds of it.
            assert hint <= delay <= hint + 0.05 * lifetime, (hint, delay)
            assert entry.expires_mono - entry.refresh_mono == pytest.approx(lifetime - delay)
            refresh_at = entry.refresh_mono
            assert await wait_for(lambda: len(arrivals) >= 2, 20)
            # The refresher waited for its schedule (the emulator shares the gateway's clock).
            assert arrivals[1] >= refresh_at
            assert await wait_for(lambda: credential.grant_nowait() is not first, 10)
            second = credential.grant_nowait()
            assert second is not None and first is not None and second.header != first.header
        finally:
            await credential.close()

    run(scenario())


def test_refresh_without_hint_comes_at_two_thirds_of_the_lifetime(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator.state.configure(token_lifetime_s=3, refresh_in_s=0)  # 0: the answer carries no refresh_in
    credential, client_id = aad(emulator)
    arrivals = token_arrivals(emulator, monkeypatch, client_id)
    decisions = scheduled_refreshes(monkeypatch)

    async def scenario() -> None:
        await credential.start()
        try:
            assert await wait_for(lambda: credential.grant_nowait() is not None, 10)
            entry = entry_of(credential)
            lifetime, hint, delay = decisions[0]
            assert 2 < lifetime < 3.5 and hint is None, (lifetime, hint)
            assert abs(delay - lifetime * 2 / 3) <= 0.05 * lifetime, (lifetime, delay)
            assert entry.expires_mono - entry.refresh_mono == pytest.approx(lifetime - delay)
            refresh_at = entry.refresh_mono
            assert await wait_for(lambda: len(arrivals) >= 2, 20)
            assert arrivals[1] >= refresh_at
        finally:
            await credential.close()

    run(scenario())


def test_identity_provider_down_serves_the_cached_token_then_503(emulator: EmulatorServer) -> None:
    emulator.state.configure(token_lifetime_s=3, refresh_in_s=1)
    route = f"down-{uuid.uuid4().hex[:8]}"
    credential, _ = aad(emulator, route=route)

    async def scenario() -> None:
        await credential.start()
        try:
            assert await wait_for(lambda: credential.grant_nowait() is not None, 10)
            cached = credential.grant_nowait()
            # Retry-After: 0 keeps MSAL's own throttling out of it; every attempt reaches the emulator.
            emulator.state.set_fault("token", status=503, retry_after=0)
            assert await wait_for(lambda: credential.status().detail is not None, 10)
            status = credential.status()
            assert status.state == "refreshing" and status.ready
            assert "503" in (status.detail or "")
            assert credential.grant_nowait() is cached  # still valid: keep serving it

            # Served until shortly before its 3 s expiry (5 % of the lifetime), not a moment longer.
            assert cached is not None
            entry = entry_of(credential)
            assert entry.expires_mono - cached.serve_until == pytest.approx(0.15, abs=0.01)
            assert await wait_for(lambda: credential.grant_nowait() is None, 10)
            assert time.monotonic() >= cached.serve_until
            with pytest.raises(CredentialUnavailable) as raised:
                await credential.grant()
            assert raised.value.status == 503 and raised.value.code == "credential_unavailable"
            assert raised.value.retry_after is not None and raised.value.retry_after >= 1
            status = credential.status()
            assert status.state == "expired" and not status.ready
            assert refreshes(route, "error") >= 1

            emulator.state.clear_faults()
            assert await wait_for(lambda: credential.grant_nowait() is not None, 10)
            status = credential.status()
            assert status.state == "valid" and status.detail is None
            assert refreshes(route, "ok") >= 2
        finally:
            await credential.close()

    run(scenario())


def test_failures_back_off_and_the_refresher_never_stops(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = register_app(emulator)
    ctx = make_context(
        str(emulator.ca_file), TokenCache(backoff_base_s=0.1, backoff_cap_s=0.4, min_interval_s=0.05)
    )
    credential = build(emulator, {"type": "aad_token", "identity": identity(emulator, app)}, ctx=ctx)
    arrivals = token_arrivals(emulator, monkeypatch, app.client_id)
    delays = backoff_delays(entry_of(credential))
    emulator.state.set_fault("token", status=500, retry_after=0)

    async def scenario() -> None:
        await credential.start()
        try:
            # It keeps trying (positive evidence: the attempts arrive)...
            assert await wait_for(lambda: len(arrivals) >= 6, 30), len(arrivals)
            # ...each one only once the backoff drawn after the previous failure has passed: no flood.
            attempts, drawn = list(arrivals), list(delays)
            for number, (failed_at, delay) in enumerate(drawn[: len(attempts) - 1]):
                assert attempts[number + 1] >= failed_at + delay, (number, attempts, drawn)
            # Drawn below 0.1, 0.2, 0.4, 0.4... s: growing to the cap, never beyond it.
            ceilings = [0.1, 0.2, 0.4, 0.4, 0.4]
            assert all(delay <= ceiling for (_, delay), ceiling in zip(drawn, ceilings, strict=False)), drawn
            status = credential.status()
            assert status.state == "unavailable" and not status.ready
            with pytest.raises(CredentialUnavailable):
                await credential.grant()
            emulator.state.clear_faults()
            assert await wait_for(lambda: credential.grant_nowait() is not None, 10)
        finally:
            await credential.close()

    run(scenario())


def test_retry_after_is_honoured(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    credential, client_id = aad(emulator)
    arrivals = token_arrivals(emulator, monkeypatch, client_id)
    delays = backoff_delays(entry_of(credential))
    emulator.state.set_fault("token", status=429, retry_after=2, count=1)

    async def scenario() -> None:
        await credential.start()
        try:
            assert await wait_for(lambda: credential.status().detail is not None, 10)
            with pytest.raises(CredentialUnavailable) as raised:
                await credential.grant()  # no network call: the wait is known
            assert raised.value.retry_after == 2
            assert "temporarily_unavailable" in raised.value.message
            assert await wait_for(lambda: credential.grant_nowait() is not None, 20)
            ((failed_at, delay),) = delays
            assert delay >= 2  # Retry-After is a floor under the drawn backoff
            assert len(arrivals) == 2 and arrivals[1] >= failed_at + delay
            assert emulator.state.token_request_count(client_id) == 2
        finally:
            await credential.close()

    run(scenario())


def test_rejected_token_is_replaced_once_bypassing_msals_cache(emulator: EmulatorServer) -> None:
    credential, client_id = aad(emulator)

    async def scenario() -> None:
        first = await credential.grant()
        # Twenty requests answered 401 at once: one new token request, shared by all of them.
        replacements = await asyncio.gather(*(credential.rejected(first) for _ in range(20)))
        headers = {r.header if r is not None else None for r in replacements}
        assert len(headers) == 1 and None not in headers and first.header not in headers
        # MSAL's cache would have answered with the same (3600 s) token; ours asked the network.
        assert emulator.state.token_request_count(client_id) == 2
        new = replacements[0]
        assert new is not None
        assert credential.grant_nowait().header == new.header  # type: ignore[union-attr]
        # A late 401 for the old token: replay with the current one, no request.
        late = await credential.rejected(first)
        assert late is not None and late.header == new.header
        # The fresh token refused too, moments later: the upstream will not take tokens from this
        # identity; no further request (a misconfigured route must not cost one token per request).
        assert await credential.rejected(new) is None
        assert emulator.state.token_request_count(client_id) == 2

    run(scenario())


def test_expired_token_is_never_served(emulator: EmulatorServer) -> None:
    emulator.state.configure(token_lifetime_s=2, refresh_in_s=0)
    credential, client_id = aad(emulator)

    async def scenario() -> None:
        grant = await credential.grant()  # no start(): nothing refreshes it
        assert grant.expires_at is not None
        assert await wait_for(lambda: credential.grant_nowait() is None, 10)
        assert time.time() < grant.expires_at  # withdrawn before its expiry, not after
        again = await credential.grant()
        assert again.header != grant.header

    run(scenario())
    assert emulator.state.token_request_count(client_id) == 2


def test_failures_are_logged_with_route_client_and_hint_never_secrets(
    emulator: EmulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = register_app(emulator)
    wrong = f"wrong-{uuid.uuid4().hex}"
    credential = build(
        emulator,
        {"type": "aad_token", "identity": identity(emulator, app, client_secret=wrong)},
        route="scoring",
    )
    good = build(emulator, {"type": "aad_token", "identity": identity(emulator, app)}, route="scoring")

    async def scenario() -> str:
        with pytest.raises(CredentialUnavailable) as raised:
            await credential.grant()
        assert "invalid_client" in raised.value.message and wrong not in raised.value.message
        grant = await good.grant()
        await good.rejected(grant)
        assert grant.header is not None
        return grant.header

    with caplog.at_level(logging.DEBUG, logger="gateway"):
        header = run(scenario())
    text = caplog.text
    assert "route scoring" in text
    assert f"client {app.client_id[:4]}" in text
    assert "invalid_client" in text and "check the client_secret" in text
    for secret in (wrong, app.secret, header.removeprefix("Bearer ")):
        assert secret not in text


class _Flaky(TokenSource):
    """A source whose first calls raise what no source should: the refresher must outlive it."""

    def __init__(self, failures: int) -> None:
        self.key = f"flaky-{uuid.uuid4()}"
        self.description = "flaky test source"
        self.deadline_s = 1.0
        self.failures = failures
        self.calls = 0

    async def fetch(self, scope: str) -> AccessToken:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("boom") if self.calls % 2 else TokenFetchError("down", retry_after=0.05)
        return AccessToken(value=f"token-{self.calls}", expires_at=time.time() + 60)


def test_refresher_survives_unexpected_exceptions() -> None:
    source = _Flaky(failures=5)
    cache = TokenCache(backoff_base_s=0.02, backoff_cap_s=0.05, min_interval_s=0.01)
    entry = cache.entry(source, "scope")

    async def scenario() -> None:
        owner = object()
        entry.attach(owner, "r", "aad_token")
        try:
            assert await wait_for(lambda: entry.peek() is not None, 3)
            assert source.calls == 6
            assert entry.state() == "valid" and entry.last_error is None
        finally:
            await entry.detach(owner)
        assert len(cache) == 0

    run(scenario())
