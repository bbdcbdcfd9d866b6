"""Defects found by the acceptance run of issues 11 and 12 (Key Vault, rotation, credential verdicts)."""

from __future__ import annotations

import asyncio

from gateway import metrics
from gateway.credentials.base import Grant, RejectionPolicy
from gateway.credentials.key import KeyCredential, KeySlot
from gateway.secrets import ManagedSecret


def _ready_gauge(route: str) -> float:
    value: float = metrics.CREDENTIAL_READY.labels(route)._value.get()  # type: ignore[attr-defined]
    return value


def test_a_new_key_value_republishes_readiness_without_a_scrape_or_request() -> None:
    # With several workers /metrics shows the minimum over them: a worker that sees no request keeps
    # showing "not ready" after both keys were replaced (Key Vault poll, key file) unless the change
    # itself updates its gauges.
    route = "accept-key-changed"
    primary, secondary = ManagedSecret("test:primary"), ManagedSecret("test:secondary")
    primary.set("old-primary-value")
    secondary.set("old-secondary-value")
    credential = KeyCredential(
        route,
        [KeySlot("primary", primary), KeySlot("secondary", secondary)],
        rejection=RejectionPolicy(reject_after=1),
    )

    async def refuse_both() -> None:
        grant: Grant | None = credential.grant_nowait()
        while grant is not None:
            grant = await credential.rejected(grant)

    asyncio.run(refuse_both())
    assert not credential.status().ready
    assert _ready_gauge(route) == 0

    primary.set("new-primary-value")  # what the Key Vault poll loop or a file re-read does
    assert _ready_gauge(route) == 1
