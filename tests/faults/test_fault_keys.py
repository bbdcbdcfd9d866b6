"""Key faults under concurrent load: a key revoked mid-load, a key file rotated mid-load."""

from __future__ import annotations

import httpx
import pytest
from conftest import PRIMARY, SECONDARY, key_route
from faultkit import Ledger, drive, fault_upstream, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

ROTATED = "rotated-primary-key-0123456789abcdef"


def test_primary_key_revoked_mid_load(gateway_factory, monkeypatch):
    """The primary key stops working while requests are in flight: every request is replayed with the
    secondary key, no client sees a 401, and the gateway stays on the secondary."""
    monkeypatch.setenv("FAULT_PRIMARY", PRIMARY)
    monkeypatch.setenv("FAULT_SECONDARY", SECONDARY)
    ledger = Ledger()
    with fault_upstream(ledger, accepted_keys={PRIMARY, SECONDARY}, delay_s=0.002) as upstream:
        route = key_route(
            upstream.url, primary={"env": "FAULT_PRIMARY"}, secondary={"env": "FAULT_SECONDARY"}
        )
        gw = gateway_factory({"routes": {"iris": route}})
        load = drive(
            "primary_key_revoked",
            gw.url + "/iris/score",
            total=400,
            ledger=ledger,
            events=[(150, "revoke primary", lambda: upstream.accepted_keys.discard(PRIMARY))],
        )
        ready = httpx.get(gw.url + "/readyz").json()["routes"][0]

    assert not load.failed, load.summary()
    assert load.duplicated == 0
    assert ledger.outcomes["401"] >= 1, "the revocation reached no request"
    assert ledger.auth_count(f"Bearer {SECONDARY}") >= 200
    assert ready["active_slot"] == "secondary"


def test_secret_file_rotated_mid_load(gateway_factory, tmp_path, monkeypatch):
    """Kubernetes-style rotation while loaded: the new key is written to a new file and renamed over
    the old one, then the old key is revoked. No client notices, and the gateway moves to the new
    primary by re-reading the file (not by failing over: the secondary is never needed)."""
    monkeypatch.setenv("FAULT_SECONDARY", SECONDARY)
    key_file = tmp_path / "primary"
    key_file.write_text(PRIMARY + "\n")
    ledger = Ledger()
    with fault_upstream(ledger, accepted_keys={PRIMARY, SECONDARY}, delay_s=0.002) as upstream:
        route = key_route(upstream.url, primary={"file": str(key_file)}, secondary={"env": "FAULT_SECONDARY"})
        gw = gateway_factory({"routes": {"iris": route}})
        picked_up: dict[str, bool] = {}

        def rotate() -> None:
            upstream.accepted_keys.add(ROTATED)  # the new key exists before anyone uses it
            new = tmp_path / "primary.new"
            new.write_text(ROTATED + "\n")
            new.replace(key_file)
            picked_up["yes"] = wait_until(lambda: ledger.auth_count(f"Bearer {ROTATED}") > 0, 4.0)
            upstream.accepted_keys.discard(PRIMARY)  # then the old one is revoked

        load = drive(
            "secret_file_rotated",
            gw.url + "/iris/score",
            total=500,
            ledger=ledger,
            events=[(100, "rotate", rotate)],
        )

    assert picked_up.get("yes"), "the gateway never used the rotated key"
    assert not load.failed, load.summary()
    assert load.duplicated == 0
    assert ledger.auth_count(f"Bearer {SECONDARY}") == 0, "failed over instead of re-reading the file"
    assert ledger.auth_count(f"Bearer {ROTATED}") >= 100
