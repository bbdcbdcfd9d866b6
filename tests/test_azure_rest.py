"""The Azure REST helper's rules for what Azure (or a stand-in) sends: Retry-After and error messages.
Requests themselves are exercised against the emulator by the ARM, Key Vault and rotate tests; here,
against the emulated Key Vault: a refused token is replaced once (never in a loop), and a vault that
throttles with Retry-After is not polled again before the time the helper's rules give."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import httpx
import pytest
from azure_env import clean_emulator_fixture, emulator_fixture, register_app  # noqa: F401
from conftest import HYGIENE

from gateway import redaction
from gateway.app import GatewayApp
from gateway.azure_rest import (
    MAX_MESSAGE_CHARS,
    RETRY_AFTER_MAX_S,
    RETRY_AFTER_MIN_S,
    clean_message,
    origin_of,
    retry_after_s,
)
from gateway.config import parse_config
from gateway.emulator.server import EmulatorServer
from gateway.emulator.state import KEYVAULT_RESOURCE
from gateway.keyvault import vaults as vaults_module
from gateway.keyvault.client import KeyVaultError

KEYVAULT_SCOPE = "https://vault.azure.net/.default"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        ("0", 1.0),  # never a busy loop
        ("-5", 1.0),
        ("0.2", 1.0),
        ("3600", 60.0),  # never an hour without looking
        ("nan", 5.0),
        ("inf", 5.0),
        ("-inf", 5.0),
        ("soon", 5.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 5.0),  # a date: the default
        (None, 5.0),
        ("  12 ", 12.0),
    ],
)
def test_retry_after_is_a_finite_number_of_seconds_within_bounds(header: str | None, expected: float) -> None:
    assert retry_after_s(header, 5.0) == expected


def test_retry_after_clamps_the_default_too() -> None:
    assert retry_after_s(None, 0.0) == 1.0 and retry_after_s("x", 1e9) == 60.0


def test_an_error_message_is_one_short_clean_line() -> None:
    forged = "denied\r\n2026-01-01 INFO gateway: all good\x1b[2J\u202eevil\u2028next\x00"
    cleaned = clean_message(forged)
    assert cleaned == "denied 2026-01-01 INFO gateway: all good [2J evil next"
    huge = ("x" * 99 + "\n") * 50_000  # 5 MB
    cut = clean_message(huge)
    assert len(cut) == MAX_MESSAGE_CHARS and cut.endswith("…") and "\n" not in cut
    assert clean_message("short") == "short"


def test_an_error_message_never_carries_a_registered_secret() -> None:
    secret = "registered-secret-value-4f1d2c"
    redaction.register(secret)
    assert secret not in clean_message(f"the key {secret} is wrong")


def test_origin_of_names_scheme_host_and_port_only() -> None:
    assert origin_of("https://user:pw@management.azure.com:443/subscriptions/x?api-version=1") == (
        "https://management.azure.com:443"
    )
    assert origin_of("http://[::1]:8080/a") == "http://[::1]:8080"
    assert origin_of("https://h:99999/") == "https://h"


# ------------------------------------------------------------------------------ against Key Vault
def _published(emulator: EmulatorServer, name: str) -> str:
    value = f"{name}-{secrets.token_urlsafe(24)}"
    HYGIENE.add_secret(value, f"tests/test_azure_rest.py secret {name}")
    emulator.state.set_secret(name, value)
    return value


def _vault_app(
    emulator: EmulatorServer, client_id: str, tenant_id: str, secret: str, *names: str
) -> GatewayApp:
    """A gateway whose one route sends each of `names` (Key Vault secrets) in a header; built (and its
    secrets read) but not served: the test drives its Key Vault client and poller itself."""
    HYGIENE.add_secret(secret, "tests/test_azure_rest.py client secret")
    headers = {f"x-{name}": {"keyvault": {"vault": emulator.vault_url, "secret": name}} for name in names}
    data: dict[str, Any] = {
        "tls": {"ca_bundle": str(emulator.ca_file)},
        "keyvault": {
            "identity": {
                "tenant_id": tenant_id,
                "client_id": client_id,
                "client_secret": secret,
                "authority_host": emulator.authority_host,
                "timeout_s": 3,
            },
            "refresh_every_s": 3600,  # polls happen when the test calls them
        },
        "routes": {
            "tagged": {
                "path": "/tagged",
                "upstream": emulator.http_url,
                "auth": {"type": "none"},
                "headers": headers,
            }
        },
    }
    return GatewayApp(parse_config(data, "kv.yaml"))


def test_key_vault_refuses_a_token_as_azure_does_when_told_to(emulator: EmulatorServer) -> None:
    """The emulator's `keyvault` fault with status 401 answers as Key Vault answers a token it refuses:
    `Unauthorized`, with the challenge naming the authority and `resource="https://vault.azure.net"`."""
    _published(emulator, "challenged")
    app = register_app(emulator)
    token = emulator.state.issue_access_token(
        audience=KEYVAULT_RESOURCE, tenant_id=app.tenant_id, appid=app.client_id
    )
    url = f"{emulator.vault_url}/secrets/challenged?api-version=7.4"
    emulator.state.set_fault("keyvault", status=401, count=1)
    with httpx.Client(verify=emulator.ssl_context(), headers={"Authorization": f"Bearer {token}"}) as client:
        refused = client.get(url)
        assert refused.status_code == 401, refused.text
        challenge = refused.headers["www-authenticate"]
        assert (
            challenge.startswith('Bearer authorization="https://')
            and 'resource="https://vault.azure.net"' in challenge
        )
        error = refused.json()["error"]
        assert error["code"] == "Unauthorized" and error["message"], error
        assert client.get(url).status_code == 200  # once: the same token is accepted next


def test_a_key_vault_401_gets_one_new_token_and_a_second_one_names_the_vault(
    emulator: EmulatorServer,
) -> None:
    """AzureRest on the Key Vault path: a 401 makes the vault token be fetched again once and the read
    re-sent (at start-up, and later with a token the vault had accepted); a 401 to the new token too is
    an error naming the vault and the secret, after exactly one new token and two requests: no loop."""
    app_registration = register_app(emulator)
    value = _published(emulator, "refused-once")

    def tokens() -> int:
        return emulator.state.token_request_count(app_registration.client_id, KEYVAULT_SCOPE)

    def reads() -> int:
        return emulator.state.keyvault_request_count("GET", "refused-once")

    emulator.state.set_fault("keyvault", status=401, count=1)
    gateway = _vault_app(
        emulator,
        app_registration.client_id,
        app_registration.tenant_id,
        app_registration.secret,
        "refused-once",
    )
    # Start-up: the first token refused once, a second one fetched, the read sent again and answered.
    assert (tokens(), reads()) == (2, 2)
    assert not emulator.state.faults()
    client = gateway.assembly.vaults.client()

    async def scenario() -> None:
        try:
            # A token the vault had accepted is refused once (revoked, or the vault's keys rolled over).
            emulator.state.set_fault("keyvault", status=401, count=1)
            read = await client.get(emulator.vault_url, "refused-once")
            assert read.value == value
            assert (tokens(), reads()) == (3, 4)

            # Refused again with the new token: one new token, one re-send, then the error.
            emulator.state.set_fault("keyvault", status=401)
            with pytest.raises(KeyVaultError) as raised:
                await asyncio.wait_for(client.get(emulator.vault_url, "refused-once"), 30)
            assert (tokens(), reads()) == (4, 6)
            error = raised.value
            assert error.status == 401, error
            message = str(error)
            assert message.startswith(
                f"Key Vault {emulator.vault_url}: secret refused-once: GET answered 401 "
            )
            assert "Unauthorized" in message and "keyvault.scope" in message, message
            assert value not in message
        finally:
            emulator.state.clear_faults()
            await gateway.assembly.rest.close()

    asyncio.run(scenario())


class _Clock:
    """Stands in for the `time` module of gateway.keyvault.vaults: its monotonic clock moves only when
    the test moves it (the wall clock is the real one)."""

    def __init__(self) -> None:
        self.now = 5000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


@pytest.mark.parametrize(
    ("status", "retry_after", "waits"),
    [
        (429, 30, 30.0),
        (429, 3600, RETRY_AFTER_MAX_S),  # an hour asked: polled again after the helper's maximum
        (429, 0, RETRY_AFTER_MIN_S),  # never a busy loop
        (503, 7, 7.0),
    ],
)
def test_a_throttled_vault_is_not_polled_before_its_retry_after(
    status: int, retry_after: int, waits: float, emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Key Vault answers one read of a poll with `status` and `Retry-After: retry_after`: no request goes
    to that vault, for any of its secrets, by a poll or a re-read, before `waits` seconds (the Retry-After
    within azure_rest's bounds) on the poller's clock; the first poll at that time reads them all."""
    app_registration = register_app(emulator)
    names = [f"throttled-{status}-{retry_after}-{letter}" for letter in "ab"]
    values = {name: _published(emulator, name) for name in names}
    gateway = _vault_app(
        emulator, app_registration.client_id, app_registration.tenant_id, app_registration.secret, *names
    )
    vault = gateway.assembly.vaults.vaults[emulator.vault_url]
    assert sorted(vault.secrets) == names
    clock = _Clock()
    monkeypatch.setattr(vaults_module, "time", clock)

    def reads() -> int:
        return sum(emulator.state.keyvault_request_count("GET", name) for name in names)

    async def scenario() -> None:
        try:
            for name in names:  # new versions: a read that is sent gets them
                values[name] = _published(emulator, name)
            emulator.state.set_fault("keyvault", status=status, retry_after=retry_after, count=1)
            before = reads()
            throttled_at = clock.now
            assert await vault.poll() is True  # the secret not throttled has a new version
            assert reads() == before + 2
            assert not emulator.state.faults()  # exactly one read was refused
            assert vault.retry_at == throttled_at + waits  # the schedule: the pause asked for, clamped
            assert sum(s.error is not None for s in vault.secrets.values()) == 1

            clock.now = throttled_at + waits - 0.01
            assert await vault.poll() is False
            assert await vault.refetch(names) is False
            assert reads() == before + 2, "the vault was polled before its Retry-After"

            clock.now = throttled_at + waits
            await vault.poll()
            assert reads() == before + 4
            for name, secret in vault.secrets.items():
                assert secret.error is None and secret.value == values[name], secret.status()
        finally:
            emulator.state.clear_faults()
            await gateway.assembly.rest.close()

    asyncio.run(scenario())
