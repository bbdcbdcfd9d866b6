"""Shared pieces of the credential tests: the emulator fixtures, app registrations, credential builders.

Imported by the test modules (import `emulator_fixture` and `clean_emulator_fixture` to get the
`emulator` fixture and the autouse clean-up); not a conftest, so other suites keep theirs. Everything
runs against `gateway.emulator` on loopback over TLS; MSAL itself is never mocked.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from gateway.assembly import Assembly
from gateway.config import GatewayConfig, parse_config
from gateway.credentials import BuildContext, Credential, build_credential
from gateway.emulator.server import EmulatorServer
from gateway.emulator.state import ARM_RESOURCE
from gateway.tokens import TokenCache

T = TypeVar("T")

_DEFAULTS: dict[str, Any] = {
    "token_lifetime_s": 3600,
    "refresh_in_s": None,
    "mi_token_lifetime_s": None,
    "aml_token_lifetime_s": 3600,
    "score_delay_s": 0.0,
    # A control plane that misbehaves only in the tests that ask for it.
    "lro_operation_origin": None,
    "lro_retry_after": None,
    "aml_token_expiry": None,
    "aml_token_refresh_after": None,
    "arm_error_message": None,
    "entra_error_message": None,
    "keyvault_error_message": None,
    "entra_expires_in": None,
}
_AZURE_VARIABLES = (
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IMDS_ENDPOINT",
    "MSAL_FORCE_REGION",
)


@pytest.fixture(scope="module", name="emulator")
def emulator_fixture() -> Iterator[EmulatorServer]:
    with EmulatorServer() as server:
        yield server


@pytest.fixture(autouse=True, name="clean_emulator")
def clean_emulator_fixture(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with default lifetimes, no faults and no Azure variables from the machine."""
    for name in _AZURE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    emulator.state.clear_faults()
    emulator.state.configure(**_DEFAULTS)
    yield
    emulator.state.clear_faults()
    emulator.state.configure(**_DEFAULTS)


@dataclass(frozen=True)
class App:
    tenant_id: str
    client_id: str
    secret: str


def register_app(emulator: EmulatorServer, **credentials: Any) -> App:
    """A new app registration in a new tenant (so counters per client id are this test's own)."""
    tenant_id, client_id = str(uuid.uuid4()), str(uuid.uuid4())
    secret = f"secret-{uuid.uuid4().hex}"
    if not credentials:
        credentials = {"secret": secret}
    emulator.state.add_app(tenant_id, client_id, **credentials)
    return App(tenant_id, client_id, credentials.get("secret") or secret)


def identity(emulator: EmulatorServer, app: App, **fields: Any) -> dict[str, Any]:
    """An `identity:` block for `app`; a literal client secret unless another credential is given."""
    block: dict[str, Any] = {
        "tenant_id": app.tenant_id,
        "client_id": app.client_id,
        "authority_host": emulator.authority_host,
        "timeout_s": 3,
    }
    if not any(
        k in fields for k in ("client_secret", "certificate", "federated_token_file", "managed_identity")
    ):
        block["client_secret"] = app.secret
    block.update(fields)
    return block


def endpoint_ref(name: str = "iris-endpoint") -> dict[str, str]:
    return {
        "subscription_id": "00000000-0000-0000-0000-000000000000",
        "resource_group": "rg",
        "workspace": "ws",
        "name": name,
    }


def gateway_config(
    emulator: EmulatorServer, routes: dict[str, dict[str, Any]], **extra: Any
) -> GatewayConfig:
    """A config whose routes forward to the emulator's scoring front end (`/<route>/score`)."""
    data: dict[str, Any] = {
        "tls": {"ca_bundle": str(emulator.ca_file)},
        "server": {"access_log": False},
        "routes": {
            name: {"path": f"/{name}", "upstream": emulator.http_url, **route}
            for name, route in routes.items()
        },
    }
    data.update(extra)
    return parse_config(data, "test.yaml")


def make_context(ca_bundle: str | None, cache: TokenCache | None = None) -> BuildContext:
    """What credentials are built with, made as the gateway makes it: by an assembly."""
    config = parse_config(
        {
            "tls": {"ca_bundle": ca_bundle} if ca_bundle else {},
            "routes": {"r": {"path": "/r", "upstream": "http://127.0.0.1:9", "auth": {"type": "none"}}},
        },
        "test.yaml",
    )
    # Short backoff keeps failure tests fast; the schedule's shape is what they check.
    tokens = (
        TokenCache(backoff_base_s=0.2, backoff_cap_s=1.0, min_interval_s=0.05) if cache is None else cache
    )
    return Assembly(config, "test.yaml", warn_literals=False, tokens=tokens).ctx


def build(
    emulator: EmulatorServer,
    auth: dict[str, Any],
    *,
    route: str = "r",
    ctx: BuildContext | None = None,
) -> Credential:
    config = gateway_config(emulator, {route: {"auth": auth}})
    return build_credential(route, config.routes[route].auth, ctx or make_context(str(emulator.ca_file)))


def run(coroutine: Awaitable[T]) -> T:
    async def main() -> T:
        return await coroutine

    return asyncio.run(main())


async def wait_for(predicate: Callable[[], bool], within: float, interval: float = 0.02) -> bool:
    """Poll `predicate` until it holds or `within` seconds pass; returns its last value."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        await asyncio.sleep(interval)
    return True


def management_token(emulator: EmulatorServer, app: App) -> str:
    """A management token minted by the emulator itself, for the test's own ARM calls."""
    return emulator.state.issue_access_token(
        audience=ARM_RESOURCE, tenant_id=app.tenant_id, appid=app.client_id
    )


def scheduled_refreshes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float | None, float]]:
    """(lifetime, hint, delay) of every refresh the token cache schedules: the decision itself, in
    numbers, instead of a window of wall-clock time around when it happens."""
    from gateway import tokens

    decisions: list[tuple[float, float | None, float]] = []
    decide = tokens.refresh_delay

    def refresh_delay(lifetime_s: float, hint_s: float | None, rng: random.Random) -> float:
        delay = decide(lifetime_s, hint_s, rng)
        decisions.append((lifetime_s, hint_s, delay))
        return delay

    monkeypatch.setattr(tokens, "refresh_delay", refresh_delay)
    return decisions
