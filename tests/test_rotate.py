"""`gateway rotate` against the emulator (ARM regenerateKeys with its asynchronous operation, Key Vault,
the scoring front end) over real HTTP/TLS: two gateway replicas under continuous traffic see no failed
request; a failure stops the run with the step and the keys' state; --dry-run changes nothing; no key
value appears in any output."""

from __future__ import annotations

import asyncio
import io
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from azure_env import (  # noqa: F401
    clean_emulator_fixture,
    emulator_fixture,
    endpoint_ref,
    register_app,
)
from conftest import HYGIENE
from servers import ServerThread
from test_keyvault import ROWS, config_data, key_pair, publish, readyz, wait_until

from gateway.app import GatewayApp
from gateway.config import parse_config
from gateway.emulator.server import EmulatorServer
from gateway.rotate import run_rotate

SETTLE_S = 1.5


@pytest.fixture(autouse=True)
def quick_operations(emulator: EmulatorServer) -> Iterator[None]:
    """regenerateKeys operations answer InProgress once, with a Retry-After of 0: polling is exercised
    without slowing the suite."""
    emulator.state.configure(lro_retry_after_s=0, lro_polls=1)
    yield
    emulator.state.configure(lro_retry_after_s=10, lro_polls=0)


def rotation_config(emulator: EmulatorServer, prefix: str, **keyvault: Any) -> dict[str, Any]:
    data = config_data(emulator, prefix, **keyvault)
    arm_app = register_app(emulator)
    HYGIENE.add_secret(arm_app.secret, "tests/test_rotate.py ARM client secret")
    data["routes"]["iris"]["auth"].update(
        {
            "endpoint": endpoint_ref(),
            "arm_url": emulator.https_url,
            "identity": {
                "tenant_id": arm_app.tenant_id,
                "client_id": arm_app.client_id,
                "client_secret": arm_app.secret,
                "authority_host": emulator.authority_host,
                "timeout_s": 3,
            },
        }
    )
    return data


async def no_pause(seconds: float) -> None:
    """Polls of ARM's operation without the wait (the clamped Retry-After is 1 s at least): the tests here
    are about keys, not about pacing; `test_retry_after_*` records the waits instead."""
    await asyncio.sleep(0)


def rotate(data: dict[str, Any], **options: Any) -> tuple[int, str]:
    out = io.StringIO()
    options.setdefault("pause", no_pause)
    code = asyncio.run(
        run_rotate(parse_config(data, "rotate.yaml"), "rotate.yaml", "iris", out=out, **options)
    )
    text = out.getvalue()
    HYGIENE.record_output("gateway rotate (in process)", text)
    return code, text


class Traffic:
    """Requests sent continuously through every gateway from background threads; counts what failed."""

    def __init__(self, gateways: list[ServerThread]) -> None:
        self.gateways = gateways
        self.sent = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self.per_gateway = [0] * len(gateways)
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(len(gateways))
        ]
        self._lock = threading.Lock()

    def _run(self, number: int) -> None:
        gateway = self.gateways[number]
        with httpx.Client(timeout=20) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(f"{gateway.url}/iris/score", json=ROWS)
                    outcome = (
                        None
                        if response.status_code == 200
                        else f"{response.status_code} {response.text[:200]}"
                    )
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}"
                with self._lock:
                    self.sent += 1
                    self.per_gateway[number] += 1
                    if outcome is not None:
                        self.failed.append(outcome)

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def answered(self, more: int = 10, within: float = 60) -> None:
        """Until `more` further requests were answered through every gateway: positive evidence that
        traffic flowed at this point (instead of sleeping and hoping it did)."""
        with self._lock:
            targets = [count + more for count in self.per_gateway]
        deadline = time.monotonic() + within
        while True:
            with self._lock:
                if all(count >= target for count, target in zip(self.per_gateway, targets, strict=True)):
                    return
            assert time.monotonic() < deadline, f"fewer than {more} requests per gateway in {within} s"
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


class EmulatorJournal:
    """What reached the emulator, in order: Key Vault requests, ARM calls, and each key the endpoint took
    together with what the slot's key source held at that moment (read by `source(slot)`)."""

    def __init__(self, emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entries: list[tuple[str, ...]] = []
        self.taken: list[tuple[str, str, str | None]] = []  # (slot, key taken, key in the source then)
        self.source: Any = None
        state = emulator.state
        lock = threading.Lock()
        record_keyvault, record_arm, regenerate = (
            state.record_keyvault_request,
            state.record_arm_call,
            state.regenerate_key,
        )

        def record_keyvault_request(method: str, name: str) -> None:
            with lock:
                self.entries.append(("keyvault", method, name))
            record_keyvault(method, name)

        def record_arm_call(operation: str) -> None:
            with lock:
                self.entries.append(("arm", operation))
            record_arm(operation)

        def regenerate_key(slot: str, value: str | None = None) -> str:
            held = self.source(slot) if self.source is not None else None
            new_key = regenerate(slot, value)
            with lock:
                self.entries.append(("key taken", slot))
                self.taken.append((slot, new_key, held))
            return new_key

        monkeypatch.setattr(state, "record_keyvault_request", record_keyvault_request)
        monkeypatch.setattr(state, "record_arm_call", record_arm_call)
        monkeypatch.setattr(state, "regenerate_key", regenerate_key)

    def writes_and_regenerations(self) -> list[tuple[str, ...]]:
        return [e for e in self.entries if e[:2] == ("keyvault", "PUT") or e == ("arm", "regenerateKeys")]


def test_dry_run_prints_the_plan_and_changes_nothing(emulator: EmulatorServer) -> None:
    primary, secondary = key_pair(emulator, "dry")
    data = rotation_config(emulator, "dry")
    calls = emulator.state.arm_call_count("regenerateKeys")
    writes = emulator.state.keyvault_request_count("PUT")
    code, out = rotate(data, dry_run=True, settle_s=5)
    assert code == 0, out
    assert "1. secondary" in out and "2. primary" in out and "dry-secondary" in out
    assert "wait 5 s" in out and "swagger.json" in out and "dry run" in out
    assert emulator.state.arm_call_count("regenerateKeys") == calls
    assert emulator.state.keyvault_request_count("PUT") == writes
    assert emulator.state.keys() == {"primary": primary, "secondary": secondary}


def test_cli_dry_run_and_config_errors(emulator: EmulatorServer, tmp_path: Path) -> None:
    key_pair(emulator, "cli")
    data = rotation_config(emulator, "cli")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "gateway.cli", "rotate", "--config", str(path), "iris", "--dry-run"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate(timeout=60)
    HYGIENE.record_output("gateway rotate --dry-run", out, err)
    assert process.returncode == 0, err
    assert "1. secondary" in out
    unknown = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "rotate", "--config", str(path), "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    HYGIENE.record_output("gateway rotate nope", unknown.stdout, unknown.stderr)
    assert unknown.returncode == 2 and "no route named 'nope'" in unknown.stderr
    without_endpoint = rotation_config(emulator, "cli")
    del without_endpoint["routes"]["iris"]["auth"]["endpoint"]
    del without_endpoint["routes"]["iris"]["auth"]["identity"]
    code, out = rotate(without_endpoint)
    assert code == 2 and "auth.endpoint" in out


def test_rotation_with_two_replicas_under_traffic_fails_no_request(emulator: EmulatorServer) -> None:
    old = key_pair(emulator, "rot")
    data = rotation_config(emulator, "rot", refresh_every_s=0.3)
    replicas = [ServerThread(GatewayApp(parse_config(data, "rotate.yaml"))).start() for _ in range(2)]
    try:
        with Traffic(replicas) as traffic:
            traffic.answered()
            code, out = rotate(data, settle_s=SETTLE_S)
            traffic.answered()  # requests after the rotation too
        assert code == 0, out
        keys = emulator.state.keys()
        assert set(keys.values()).isdisjoint(old)
        for slot in ("primary", "secondary"):
            stored = emulator.state.get_secret(f"rot-{slot}")
            assert stored is not None and stored.value == keys[slot]
            HYGIENE.add_secret(keys[slot], f"rotated {slot} key")
        assert traffic.sent > 20
        assert traffic.failed == [], traffic.failed[:5]
        assert "secondary key is rotated and verified" in out and "both keys rotated" in out
        assert out.index("secondary key is rotated") < out.index("regenerating the primary key")
        for replica in replicas:
            ready = httpx.get(f"{replica.url}/readyz").json()
            assert ready["ready"] is True
            metrics = httpx.get(f"{replica.url}/metrics").text
            for slot in ("secondary", "primary"):  # the process's one registry, shared by every test
                line = f'gateway_key_rotations_total{{route="iris",slot="{slot}"}} '
                assert float(metrics.split(line, 1)[1].split()[0]) >= 1
        print(f"rotation under traffic: {traffic.sent} requests, {len(traffic.failed)} failed")
    finally:
        for replica in replicas:
            replica.stop()


def test_failure_mid_way_stops_with_the_step_and_the_key_state(emulator: EmulatorServer) -> None:
    key_pair(emulator, "mid")
    data = rotation_config(emulator, "mid", refresh_every_s=0.3)
    # The secondary's regenerateKeys succeeds; the primary's fails.
    emulator.state.set_fault("regenerate", status=500, skip=1)
    with (
        ServerThread(GatewayApp(parse_config(data, "rotate.yaml"))) as gateway,
        Traffic([gateway]) as traffic,
    ):
        code, out = rotate(data, settle_s=SETTLE_S)
        # The gateway picks up the primary the endpoint rejects (positive evidence: its /readyz shows
        # the vault's version), and requests after that still succeed: it uses the secondary.
        written = emulator.state.get_secret("mid-primary")
        assert written is not None
        assert wait_until(
            lambda: any(
                s["secret"] == "mid-primary" and s["version"] == written.version
                for s in readyz(gateway)["keyvault"]
            ),
            within=30,
        )
        traffic.answered()
    assert code == 1
    assert "step `regenerate` failed" in out and "500" in out
    assert "secondary: rotated and verified" in out
    assert "primary: a new key is in Key Vault" in out and "still has the old one" in out
    assert traffic.failed == [], traffic.failed[:5]
    keys = emulator.state.keys()
    stored = emulator.state.get_secret("mid-primary")
    assert stored is not None and stored.value != keys["primary"]
    HYGIENE.add_secret(stored.value, "mid-way primary key")


def test_a_failed_first_key_vault_write_stops_at_the_write_step_before_any_key_changes(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The identity may not write to the vault (no Key Vault Secrets Officer role): the first write is
    refused, and the run must stop there, before ARM is asked for anything, so both endpoint keys stay
    what every gateway holds."""
    key_pair(emulator, "wfail")
    data = rotation_config(emulator, "wfail")
    before = emulator.state.keys()
    journal = EmulatorJournal(emulator, monkeypatch)
    # The first write of a key (PUT) is refused, whatever reads (and lock tags) come before it: the fault
    # is armed as that request arrives, just before the emulated vault looks for one.
    record = emulator.state.record_keyvault_request

    def refuse_the_first_write(method: str, name: str) -> None:
        record(method, name)
        if method == "PUT" and not any(e[:2] == ("keyvault", "PUT") for e in journal.entries[:-1]):
            emulator.state.set_fault("keyvault", status=403, count=1)

    monkeypatch.setattr(emulator.state, "record_keyvault_request", refuse_the_first_write)
    code, out = rotate(data, settle_s=0, slots=["secondary", "primary"])
    assert code == 1, out
    assert "step `write` failed" in out and "403" in out and "wfail-secondary" in out
    assert "secondary: unchanged; primary: unchanged" in out
    assert emulator.state.keys() == before
    # What reached the emulator, in order: the refused write, and nothing for ARM after it.
    assert journal.writes_and_regenerations() == [("keyvault", "PUT", "wfail-secondary")]
    assert journal.taken == []


def test_each_key_is_in_the_vault_before_the_endpoint_takes_it(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Microsoft's order, checked as it happens (not from the end state): for each slot, the vault
    write reaches the emulator before regenerateKeys, and at the moment the endpoint takes a key, the
    vault already holds exactly that key."""
    key_pair(emulator, "order")
    data = rotation_config(emulator, "order")
    journal = EmulatorJournal(emulator, monkeypatch)

    def in_vault(slot: str) -> str | None:
        stored = emulator.state.get_secret(f"order-{slot}")
        return None if stored is None else stored.value

    journal.source = in_vault
    code, out = rotate(data, settle_s=0)
    assert code == 0, out
    assert journal.writes_and_regenerations() == [
        ("keyvault", "PUT", "order-secondary"),
        ("arm", "regenerateKeys"),
        ("keyvault", "PUT", "order-primary"),
        ("arm", "regenerateKeys"),
    ]
    assert [slot for slot, _, _ in journal.taken] == ["secondary", "primary"]
    for slot, taken, _ in journal.taken:
        HYGIENE.add_secret(taken, f"order-rotated {slot} key")
    # Compared as booleans: a failure must not print key values.
    in_place = {slot: held == taken for slot, taken, held in journal.taken}
    assert in_place == {"secondary": True, "primary": True}, "the endpoint took a key the vault did not hold"


def test_a_failed_operation_stops_at_the_wait_step(emulator: EmulatorServer) -> None:
    key_pair(emulator, "lro")
    data = rotation_config(emulator, "lro")
    emulator.state.set_fault("lro", status=500, count=1)
    code, out = rotate(data, settle_s=0)
    assert code == 1
    assert "step `wait` failed" in out and "Failed" in out
    assert "secondary: regeneration requested with the new key" in out and "primary: unchanged" in out


def test_verification_failure_names_the_verify_step(emulator: EmulatorServer) -> None:
    key_pair(emulator, "ver")
    data = rotation_config(emulator, "ver")
    code, out = rotate(data, settle_s=0, slots=["secondary"], verify_url=f"{emulator.http_url}/nope-401")
    # The emulator answers 404 for unknown paths: authenticated as far as the check can tell.
    assert code == 0, out
    emulator.state.set_fault("score", status=401)
    code, out = rotate(data, settle_s=0, slots=["secondary"], verify_url=f"{emulator.http_url}/score")
    assert code == 1 and "step `verify` failed" in out and "rejected" in out


def test_from_endpoint_routes_rotate_through_list_keys(emulator: EmulatorServer) -> None:
    old = emulator.state.keys()
    data = rotation_config(emulator, "lk")
    auth = data["routes"]["iris"]["auth"]
    for name in ("primary", "secondary", "endpoint"):
        auth.pop(name)
    auth["from_endpoint"] = endpoint_ref()
    auth["refresh_every_s"] = 3600
    with (
        ServerThread(GatewayApp(parse_config(data, "rotate.yaml"))) as gateway,
        Traffic([gateway]) as traffic,
    ):
        traffic.answered()
        code, out = rotate(data, settle_s=0.5)
        traffic.answered()
    assert code == 0, out
    new = emulator.state.keys()
    assert set(new.values()).isdisjoint(old.values())
    for slot, value in new.items():
        HYGIENE.add_secret(value, f"listKeys rotated {slot}")
    assert traffic.failed == [], traffic.failed[:5]


def test_no_key_value_in_any_output(emulator: EmulatorServer) -> None:
    key_pair(emulator, "quiet")
    data = rotation_config(emulator, "quiet")
    code, out = rotate(data, settle_s=0)
    assert code == 0, out
    values = list(emulator.state.keys().values())
    for value in values:
        HYGIENE.add_secret(value, "quiet rotated key")
        assert value not in out


def test_back_to_back_rotations_and_a_rerun_after_a_failure_fail_no_request(emulator: EmulatorServer) -> None:
    """The gateway remembers a key it saw rejected (for `recheck_after_s`): a second rotation right after
    the first, and a re-run after a run that stopped half-way (the vault then holds a primary the
    endpoint does not have), must still find a working key for every request.

    Back to back, a replica whose poll is slow can hold two stale keys: it then re-reads the vault
    within the request, and must use what the poll loop stored meanwhile (see
    test_keyvault.py::test_keys_the_poll_loop_brings_while_every_key_is_rejected_are_used)."""
    key_pair(emulator, "again")
    data = rotation_config(emulator, "again", refresh_every_s=0.3)
    replicas = [ServerThread(GatewayApp(parse_config(data, "rotate.yaml"))).start() for _ in range(2)]

    def every_replica_holds_the_vaults_primary() -> bool:
        current = emulator.state.get_secret("again-primary")
        return current is not None and all(
            any(
                s["secret"] == "again-primary" and s["version"] == current.version
                for s in readyz(r)["keyvault"]
            )
            for r in replicas
        )

    try:
        with Traffic(replicas) as traffic:
            traffic.answered()
            first, out1 = rotate(data, settle_s=SETTLE_S)
            second, out2 = rotate(data, settle_s=SETTLE_S)
            emulator.state.set_fault(
                "regenerate", status=500, skip=1, count=1
            )  # the primary's regeneration fails
            third, out3 = rotate(data, settle_s=SETTLE_S)
            # Every replica holds the primary the endpoint rejects, and traffic meets it, before the re-run.
            assert wait_until(every_replica_holds_the_vaults_primary, within=30)
            traffic.answered()
            fourth, out4 = rotate(data, settle_s=SETTLE_S)  # the recovery: run it again
            traffic.answered()
        assert (first, second, third, fourth) == (0, 0, 1, 0), (out1, out2, out3, out4)
        assert "primary key in Key Vault is rejected by the endpoint" in out4
        assert out4.index("regenerating the primary key") < out4.index("regenerating the secondary key")
        keys = emulator.state.keys()
        for slot in ("primary", "secondary"):
            stored = emulator.state.get_secret(f"again-{slot}")
            assert stored is not None and stored.value == keys[slot]
            HYGIENE.add_secret(keys[slot], f"rotated {slot} key")
        assert traffic.failed == [], (len(traffic.failed), traffic.failed[:5])
    finally:
        for replica in replicas:
            replica.stop()


def test_key_files_are_rewritten_before_the_endpoint_takes_the_key(
    emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, secondary = key_pair(emulator, "files")
    (tmp_path / "primary").write_text(primary + "\n")
    (tmp_path / "secondary").write_text(secondary + "\n")
    data = rotation_config(emulator, "files")
    auth = data["routes"]["iris"]["auth"]
    auth["primary"] = {"file": str(tmp_path / "primary")}
    auth["secondary"] = {"file": str(tmp_path / "secondary")}
    journal = EmulatorJournal(emulator, monkeypatch)
    journal.source = lambda slot: (tmp_path / slot).read_text().removesuffix("\n")
    with (
        ServerThread(GatewayApp(parse_config(data, "rotate.yaml"))) as gateway,
        Traffic([gateway]) as traffic,
    ):
        traffic.answered()
        code, out = rotate(data)  # default settle: 1 s file checks + 5 s margin
        traffic.answered()
    assert code == 0, out
    assert "waiting 6 s" in out
    keys = emulator.state.keys()
    for slot in ("primary", "secondary"):
        HYGIENE.add_secret(keys[slot], f"file-rotated {slot} key")
        assert (tmp_path / slot).read_text() == keys[slot] + "\n"
    # The order, as it happened: each file already held the key when the endpoint took it.
    assert [slot for slot, _, _ in journal.taken] == ["secondary", "primary"]
    in_place = {slot: held == taken for slot, taken, held in journal.taken}  # booleans: no key printed
    assert in_place == {"secondary": True, "primary": True}, "the endpoint took a key its file did not hold"
    assert traffic.failed == [], traffic.failed[:5]


def test_no_management_token_stops_at_the_token_step_with_nothing_changed(emulator: EmulatorServer) -> None:
    old = emulator.state.keys()
    data = rotation_config(emulator, "tok")
    auth = data["routes"]["iris"]["auth"]
    for name in ("primary", "secondary", "endpoint"):
        auth.pop(name)
    auth["from_endpoint"] = endpoint_ref()
    emulator.state.set_fault("token", status=401)
    code, out = rotate(data, settle_s=0)
    assert code == 1 and "step `token` failed" in out
    assert "secondary: unchanged; primary: unchanged" in out
    assert emulator.state.keys() == old


# ---------------------------------------------------------------------------------------------------------
# A misbehaving control plane, two runs at once, a key store that changes under the run (issues 15, 19)


@pytest.mark.parametrize("where", ["plain http", "another host"])
def test_an_operation_url_off_the_arm_host_is_not_followed(emulator: EmulatorServer, where: str) -> None:
    """regenerateKeys answers with operation URLs on another origin: the run stops at `wait` with a clear
    error, and the management token is never sent there (the emulator sees no poll at all)."""
    key_pair(emulator, "away")
    data = rotation_config(emulator, "away")
    elsewhere = (
        emulator.http_url if where == "plain http" else emulator.https_url.replace("127.0.0.1", "localhost")
    )
    emulator.state.configure(lro_operation_origin=elsewhere)
    polls = emulator.state.arm_call_count("operationResult")
    code, out = rotate(data, settle_s=0, slots=["secondary"])
    assert code == 1, out
    assert "step `wait` failed" in out and "not followed" in out and elsewhere in out
    assert emulator.state.arm_call_count("operationResult") == polls  # the token never left


@pytest.mark.parametrize("retry_after", ["nan", "0", "inf", "-5", "soon"])
def test_retry_after_of_an_operation_is_clamped(emulator: EmulatorServer, retry_after: str) -> None:
    key_pair(emulator, "pace")
    data = rotation_config(emulator, "pace")
    emulator.state.configure(lro_retry_after=retry_after, lro_polls=3)
    waits: list[float] = []

    async def recording(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    code, out = rotate(data, settle_s=0, slots=["secondary"], pause=recording)
    assert code == 0, out
    assert len(waits) == 4, waits  # the 202's wait, then one after each of three InProgress answers
    assert all(1.0 <= w <= 60.0 for w in waits), waits


def test_a_huge_error_message_is_cut_short_and_cleaned(emulator: EmulatorServer) -> None:
    key_pair(emulator, "loud")
    data = rotation_config(emulator, "loud")
    emulator.state.configure(arm_error_message=("x" * 100 + "\x1b[2J\r\nFAKE LINE ") * 50_000)  # ~5.5 MB
    emulator.state.set_fault("regenerate", status=500, count=1)
    code, out = rotate(data, settle_s=0, slots=["secondary"])
    assert code == 1 and "step `regenerate` failed" in out
    assert len(out) < 3000, len(out)
    line = next(line for line in out.splitlines() if "step `regenerate` failed" in line)
    assert "\x1b" not in out and "FAKE LINE" in line  # one line: the message's line breaks are gone


def test_two_concurrent_rotations_one_refuses_and_no_request_fails(emulator: EmulatorServer) -> None:
    old = key_pair(emulator, "twice")
    data = rotation_config(emulator, "twice", refresh_every_s=0.3)

    def locked() -> bool:
        current = emulator.state.get_secret("twice-primary")
        return current is not None and "gateway-rotation-lock" in current.tags

    outcome: dict[str, tuple[int, str]] = {}
    with (
        ServerThread(GatewayApp(parse_config(data, "rotate.yaml"))) as gateway,
        Traffic([gateway]) as traffic,
    ):
        first = threading.Thread(target=lambda: outcome.update(first=rotate(data, settle_s=SETTLE_S)))
        first.start()
        assert wait_until(locked, 20)
        outcome["second"] = rotate(data, settle_s=SETTLE_S)
        first.join(60)
        time.sleep(0.5)  # requests after both runs too
    (code1, out1), (code2, out2) = outcome["first"], outcome["second"]
    assert code1 == 0, out1
    assert code2 == 3, out2
    assert "another rotation of this endpoint holds the lock" in out2 and "nothing was changed" in out2
    assert "regenerating" not in out2
    keys = emulator.state.keys()
    assert set(keys.values()).isdisjoint(old)
    for slot in ("primary", "secondary"):
        stored = emulator.state.get_secret(f"twice-{slot}")
        assert stored is not None and stored.value == keys[slot]
        HYGIENE.add_secret(keys[slot], f"rotated {slot} key")
    assert not locked()  # released
    assert traffic.sent > 10 and traffic.failed == [], traffic.failed[:5]


def test_a_lock_left_by_a_crashed_run_blocks_until_it_expires(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    primary, secondary = key_pair(emulator, "crash")
    (tmp_path / "primary").write_text(primary + "\n")
    (tmp_path / "secondary").write_text(secondary + "\n")
    data = rotation_config(emulator, "crash")
    auth = data["routes"]["iris"]["auth"]
    auth["primary"] = {"file": str(tmp_path / "primary")}
    auth["secondary"] = {"file": str(tmp_path / "secondary")}
    lock = tmp_path / ".primary.rotation-lock"
    lock.write_text(f"run=crashed;host=elsewhere:1;until={time.time() + 3600:.0f}\n")
    code, out = rotate(data, settle_s=0)
    assert code == 3 and "crashed" in out and str(lock) in out, out
    assert (tmp_path / "primary").read_text() == primary + "\n"
    lock.write_text(f"run=crashed;host=elsewhere:1;until={time.time() - 1:.0f}\n")  # expired
    code, out = rotate(data, settle_s=0)
    assert code == 0, out
    assert not lock.exists()
    for slot, value in emulator.state.keys().items():
        HYGIENE.add_secret(value, f"crash rotated {slot}")


def test_a_key_changed_during_the_run_stops_it_instead_of_being_overwritten(emulator: EmulatorServer) -> None:
    key_pair(emulator, "chg")
    data = rotation_config(emulator, "chg")
    regenerations = emulator.state.arm_call_count("regenerateKeys")
    outcome: dict[str, tuple[int, str]] = {}
    running = threading.Thread(target=lambda: outcome.update(run=rotate(data, settle_s=4)))
    running.start()
    # The secondary is regenerated; while the run waits to settle, an operator sets a new primary.
    assert wait_until(lambda: emulator.state.arm_call_count("regenerateKeys") > regenerations, 20)
    operators = publish(emulator, "chg-primary", f"operator-{secrets.token_urlsafe(24)}")
    running.join(60)
    code, out = outcome["run"]
    assert code == 1, out
    assert "step `read` failed" in out and "primary key changed" in out and "not overwritten" in out
    current = emulator.state.get_secret("chg-primary")
    assert current is not None and current.version == operators  # not overwritten
    assert "primary: unchanged" in out
    HYGIENE.add_secret(emulator.state.keys()["secondary"], "chg rotated secondary")


def test_a_disabled_current_version_stops_rotate_at_read(emulator: EmulatorServer) -> None:
    key_pair(emulator, "dis")
    data = rotation_config(emulator, "dis")
    current = emulator.state.get_secret("dis-secondary")
    assert current is not None
    emulator.state.update_secret("dis-secondary", enabled=False)
    code, out = rotate(data, settle_s=0)
    assert code == 1, out
    assert "step `read` failed" in out and "SecretDisabled" in out and current.version in out
    assert "enable it or set a new version" in out
    assert "secondary: unchanged; primary: unchanged" in out


def test_a_key_vault_lock_tag_left_by_a_crashed_run_blocks_until_it_expires(emulator: EmulatorServer) -> None:
    """The vault form of the lock (issue 19 item 8): the `gateway-rotation-lock` tag a crashed run left on
    the current version of the route's primary secret refuses every run until its `until`, then a run
    takes it over, rotates and leaves no tag behind."""
    primary, secondary = key_pair(emulator, "vcrash")
    data = rotation_config(emulator, "vcrash")
    crashed = f"run=crashed;host=elsewhere:1;until={time.time() + 3600:.0f}"
    emulator.state.update_secret("vcrash-primary", tags={"gateway-rotation-lock": crashed})
    regenerations = emulator.state.arm_call_count("regenerateKeys")
    code, out = rotate(data, settle_s=0)
    assert code == 3, out
    assert "another rotation of this endpoint holds the lock" in out and "crashed" in out, out
    assert "remove the tag gateway-rotation-lock" in out and "nothing was changed" in out
    assert emulator.state.arm_call_count("regenerateKeys") == regenerations
    assert emulator.state.keys() == {"primary": primary, "secondary": secondary}
    current = emulator.state.get_secret("vcrash-primary")
    assert current is not None and current.value == primary
    assert current.tags.get("gateway-rotation-lock") == crashed  # not taken from a live holder

    expired = f"run=crashed;host=elsewhere:1;until={time.time() - 1:.0f}"
    emulator.state.update_secret("vcrash-primary", tags={"gateway-rotation-lock": expired})
    code, out = rotate(data, settle_s=0)
    assert code == 0, out
    keys = emulator.state.keys()
    assert set(keys.values()).isdisjoint({primary, secondary})
    for slot in ("primary", "secondary"):
        stored = emulator.state.get_secret(f"vcrash-{slot}")
        assert stored is not None and stored.value == keys[slot]
        assert "gateway-rotation-lock" not in stored.tags  # released
        HYGIENE.add_secret(keys[slot], f"vcrash rotated {slot}")
