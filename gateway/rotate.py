"""`gateway rotate`: regenerate both keys of a key route's Azure ML endpoint without a failed request.

Microsoft's procedure for dual keys, one slot at a time, the one not in use first (secondary, then
primary):

1. when the route's keys come from Key Vault (or files), generate the new key here and write it as a new
   version of that slot's secret (or into the file) BEFORE the endpoint accepts it: a gateway that picks
   it up early is rejected with it and fails over to the other key within the same request;
2. ARM `regenerateKeys` (`keyValue` set to that key; with `from_endpoint` Azure generates it and
   `listKeys` reads it back), then poll `Azure-AsyncOperation` (or `Location`) until it succeeded,
   honouring `Retry-After`;
3. verify the new key with `GET` on the endpoint's `swagger.json` beside the scoring URI: the endpoint
   authenticates it (401/403 for a wrong key) but the model does not run;
4. wait `--settle-s` (the longest refresh interval of the route's key sources plus a margin), so that
   every gateway replica holds the new key before the other slot is regenerated.

Any failure stops the run (exit 1) with the step that failed and the state each key is in. A key value
is never printed: it only travels in request bodies and the Authorization header.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import httpx

from gateway import redaction
from gateway.config import FileRef, GatewayConfig, IdentityConfig, KeyAuth, KeyVaultRef, RouteConfig
from gateway.credentials import BuildContext
from gateway.credentials.arm import (
    ArmClient,
    arm_scope,
    azure_error,
    check_arm_url,
    endpoint_url,
    origin_of,
    shared_arm_client,
)
from gateway.credentials.base import Grant
from gateway.credentials.identity import resolve_identity
from gateway.credentials.token import shared_token_cache
from gateway.egress import build_egress
from gateway.errors import ConfigError, CredentialUnavailable
from gateway.keyvault import KeyVaultClient, KeyVaultError, configure
from gateway.secrets import CHECK_INTERVAL_S
from gateway.tls import client_context
from gateway.tokens import TokenEntry

SLOTS = ("primary", "secondary")
DEFAULT_ORDER = ("secondary", "primary")  # gateways use the primary key until it is rejected
SETTLE_MARGIN_S = 5.0
SETTLE_MARGIN_FRACTION = 0.1
OPERATION_TIMEOUT_S = 600.0
RETRY_AFTER_CAP_S = 60.0
VERIFY_ATTEMPTS = 3
VERIFY_PAUSE_S = 2.0
KEY_BYTES = 32  # token_urlsafe(32): 43 characters, like the keys Azure ML generates


class RotationFailed(Exception):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


@dataclass
class SlotPlan:
    slot: str
    source: str  # "keyvault", "file" or "listKeys"
    where: str  # the secret or file the new key goes to, or the listKeys endpoint
    ref: KeyVaultRef | FileRef | None = None
    state: str = "unchanged"


@dataclass
class Plan:
    route: str
    endpoint: str
    regenerate_url: str
    list_keys_url: str
    verify_url: str
    settle_s: float
    slots: list[SlotPlan] = field(default_factory=list)
    auto_order: bool = False  # no --slots: a key the endpoint already rejects goes first

    def describe(self) -> list[str]:
        lines = [
            f"rotate the keys of endpoint {self.endpoint} (route {self.route}), "
            f"slots in this order: {', '.join(s.slot for s in self.slots)}"
        ]
        for number, slot in enumerate(self.slots, 1):
            steps = []
            if slot.source == "listKeys":
                steps.append("ARM regenerateKeys (Azure generates the key), wait for the operation")
                steps.append("read it back with listKeys")
            else:
                steps.append(f"generate a key and write it to {slot.where}")
                steps.append("ARM regenerateKeys with that keyValue, wait for the operation")
            steps.append(f"verify it with GET {self.verify_url}")
            if number < len(self.slots):
                steps.append(f"wait {self.settle_s:g} s for every gateway to pick it up")
            lines.append(f"  {number}. {slot.slot}: " + "; ".join(steps))
        if self.auto_order and self.slots[0].source != "listKeys":
            lines.append("  (a key whose current value the endpoint rejects is rotated first)")
        lines.append(f"  ARM: POST {self.regenerate_url.split('?')[0]}")
        return lines


# ---------------------------------------------------------------------------------------- planning
def _settle_default(config: GatewayConfig, auth: KeyAuth) -> float:
    intervals = []
    if auth.from_endpoint is not None:
        intervals.append(auth.refresh_every_s)
    for spec in (auth.primary, auth.secondary):
        if isinstance(spec, KeyVaultRef):
            intervals.append(config.keyvault.refresh_every_s)
        elif isinstance(spec, FileRef):
            intervals.append(CHECK_INTERVAL_S)
    longest = max(intervals, default=0.0)
    return longest + max(SETTLE_MARGIN_S, longest * SETTLE_MARGIN_FRACTION)


def verify_url_for(route: RouteConfig) -> str:
    """`swagger.json` beside the scoring URI of the route's preferred upstream."""
    upstream = min(route.upstream_list(), key=lambda u: u.priority).url
    parts = urlsplit(upstream)
    path = parts.path.rstrip("/")
    if path.endswith("/score"):
        path = path[: -len("/score")]
    return urlunsplit((parts.scheme, parts.netloc, f"{path}/swagger.json", "", ""))


def make_plan(
    config: GatewayConfig,
    source: str,
    route_name: str,
    *,
    slots: list[str] | None,
    settle_s: float | None,
    verify_url: str | None,
) -> Plan:
    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{source}: routes.{route_name}: {problem}")

    route = config.routes.get(route_name)
    if route is None:
        known = ", ".join(config.routes) or "none"
        raise ConfigError(f"{source}: no route named {route_name!r} (routes: {known})")
    auth = route.auth
    if not isinstance(auth, KeyAuth):
        raise fail(f"auth.type is {auth.type}; only key routes have keys to rotate")
    endpoint = auth.from_endpoint or auth.endpoint
    if endpoint is None:
        raise fail(
            "the endpoint is unknown: add `auth.endpoint` (subscription_id, resource_group, workspace, "
            "name) for keys from Key Vault or files, or use `auth.from_endpoint`"
        )
    order = list(slots or DEFAULT_ORDER)
    for slot in order:
        if slot not in SLOTS:
            raise ConfigError(f"--slots: {slot!r} is not a key slot (primary, secondary)")
    if len(set(order)) != len(order):
        raise ConfigError("--slots: name each slot at most once")
    plans: list[SlotPlan] = []
    for slot in order:
        if auth.from_endpoint is not None:
            plans.append(SlotPlan(slot, "listKeys", f"listKeys of {endpoint.name}"))
            continue
        spec = auth.primary if slot == "primary" else auth.secondary
        if spec is None:
            raise fail(
                f"auth.{slot} is not configured: a rotation without failed requests needs both keys "
                "(the gateway fails over to the other one while a key changes)"
            )
        if isinstance(spec, KeyVaultRef):
            ref = spec.keyvault
            plans.append(SlotPlan(slot, "keyvault", f"Key Vault {ref.vault} secret {ref.secret}", spec))
        elif isinstance(spec, FileRef):
            plans.append(SlotPlan(slot, "file", f"file {spec.file}", spec))
        else:
            kind = "an environment variable" if hasattr(spec, "env") else "the configuration file"
            raise fail(
                f"auth.{slot} comes from {kind}, which gateway rotate cannot update: keep the keys in "
                "Key Vault ({keyvault: ...}) or a file, or use from_endpoint"
            )
    arm_url = auth.arm_url.rstrip("/")
    settle = _settle_default(config, auth) if settle_s is None else settle_s
    return Plan(
        route=route_name,
        endpoint=endpoint.name,
        regenerate_url=endpoint_url(arm_url, endpoint, "regenerateKeys", auth.api_version),
        list_keys_url=endpoint_url(arm_url, endpoint, "listKeys", auth.api_version),
        verify_url=verify_url or verify_url_for(route),
        settle_s=settle,
        slots=plans,
        auto_order=slots is None,
    )


# ---------------------------------------------------------------------------------------- running
class Rotation:
    def __init__(self, plan: Plan, config: GatewayConfig, source: str, out: TextIO) -> None:
        self.plan = plan
        self.config = config
        self.out = out
        auth = config.routes[plan.route].auth
        assert isinstance(auth, KeyAuth)
        self.auth = auth
        self.ctx = BuildContext(ssl_context=client_context(config.tls.ca_bundle), source=source)
        configure(self.ctx, config.keyvault)  # before any secret is resolved (egress.proxy_auth, identity)
        self.ctx.egress = build_egress(
            config.egress, self.ctx
        )  # ARM, Key Vault and Entra ID as `serve` reaches them
        arm_url = check_arm_url(auth.arm_url, f"routes.{plan.route}.auth.arm_url", self.ctx)
        identity = resolve_identity(plan.route, auth.identity or IdentityConfig.model_validate({}), self.ctx)
        self.management: TokenEntry = shared_token_cache(self.ctx).entry(identity, arm_scope(arm_url))
        self.arm: ArmClient = shared_arm_client(self.ctx)
        self.vault: KeyVaultClient | None = None
        if any(s.source == "keyvault" for s in plan.slots):
            self.vault = configure(self.ctx, config.keyvault).client()

    def say(self, message: str) -> None:
        print(redaction.redact(f"route {self.plan.route}: {message}"), file=self.out, flush=True)

    async def run(self) -> None:
        self.arm.acquire(self)
        try:
            if self.plan.auto_order and self.plan.slots[0].source != "listKeys":
                await self._order()
            for number, slot in enumerate(self.plan.slots, 1):
                await self._rotate(slot)
                if number < len(self.plan.slots) and self.plan.settle_s > 0:
                    following = self.plan.slots[number].slot
                    self.say(
                        f"waiting {self.plan.settle_s:g} s for every gateway to pick up the new "
                        f"{slot.slot} key before the {following} key changes"
                    )
                    await asyncio.sleep(self.plan.settle_s)
        finally:
            await self.arm.release(self)

    async def _rotate(self, slot: SlotPlan) -> None:
        new_key: str | None = None
        if slot.source != "listKeys":
            new_key = secrets.token_urlsafe(KEY_BYTES)
            redaction.register(new_key)
            await self._write(slot, new_key)
        self.say(f"regenerating the {slot.slot} key of endpoint {self.plan.endpoint}")
        body: dict[str, Any] = {"keyType": slot.slot.capitalize()}
        if new_key is not None:
            body["keyValue"] = new_key
        try:
            response = await self._arm("POST", self.plan.regenerate_url, body, step="regenerate")
        except RotationFailed as exc:
            if exc.step != "regenerate":
                raise
            # Sent, but no answer: ARM may or may not have started the regeneration.
            slot.state = (
                f"{slot.state}; the regenerateKeys request got no answer, so the endpoint may have "
                "the old or the new key"
            )
            raise
        if response.status_code not in (200, 202, 204):
            raise RotationFailed("regenerate", _arm_problem("regenerateKeys", response))
        slot.state = (
            "regeneration requested; whether the endpoint has the new key is unknown"
            if new_key is None
            else "regeneration requested with the new key; whether the endpoint has it yet is unknown"
        )
        if response.status_code == 202:
            await self._wait(response)
        slot.state = "regenerated in the endpoint; the old key no longer works"
        if new_key is None:
            new_key = await self._read_back(slot.slot)
        self.say(f"the {slot.slot} key was regenerated; verifying it")
        await self._verify(slot, new_key)
        slot.state = "rotated and verified"
        self.say(f"the {slot.slot} key is rotated and verified")

    async def _order(self) -> None:
        """Gateways use a key the endpoint accepts: one it rejects (a previous run stopped after writing
        it, before the endpoint took it) is not in use anywhere, so it is rotated first."""
        rejected = []
        for slot in self.plan.slots:
            try:
                if isinstance(slot.ref, KeyVaultRef):
                    assert self.vault is not None
                    current = (await self.vault.get(slot.ref.keyvault.vault, slot.ref.keyvault.secret)).value
                else:
                    assert isinstance(slot.ref, FileRef)
                    current = _read_file(Path(slot.ref.file))
            except (KeyVaultError, OSError) as exc:
                raise RotationFailed(
                    "read", f"cannot read the current {slot.slot} key from {slot.where}: {exc}"
                ) from None
            if await self._rejected(current):
                rejected.append(slot)
        if len(rejected) == 1 and rejected[0] is not self.plan.slots[0]:
            place = "Key Vault" if rejected[0].source == "keyvault" else "its file"
            self.say(
                f"the current {rejected[0].slot} key in {place} is rejected by the endpoint (a previous run "
                "stopped half-way?): no gateway uses it, so it is rotated first"
            )
            self.plan.slots.remove(rejected[0])
            self.plan.slots.insert(0, rejected[0])
        elif len(rejected) == len(self.plan.slots):
            self.say("the endpoint rejects every current key: requests fail already; rotating to repair that")

    async def _rejected(self, key: str) -> bool:
        """True when the scoring front end refuses `key` (401/403); other answers and errors: False."""
        try:
            response = await self.arm.http_client().get(
                self.plan.verify_url, headers={"Authorization": f"Bearer {key}"}
            )
        except httpx.HTTPError:
            return False
        return response.status_code in (401, 403)

    async def _write(self, slot: SlotPlan, new_key: str) -> None:
        try:
            if isinstance(slot.ref, KeyVaultRef):
                assert self.vault is not None
                written = await self.vault.put(slot.ref.keyvault.vault, slot.ref.keyvault.secret, new_key)
                slot.where = f"{slot.where} version {written.version}"
            elif isinstance(slot.ref, FileRef):
                _write_file(Path(slot.ref.file), new_key)
        except (KeyVaultError, OSError) as exc:
            raise RotationFailed(
                "write", f"cannot write the new {slot.slot} key to {slot.where}: {exc}"
            ) from None
        slot.state = (
            f"a new key is in {slot.where}, but the endpoint still has the old one (gateways that read it "
            "are rejected with it and use the other key)"
        )
        self.say(f"wrote a new {slot.slot} key to {slot.where}")

    async def _arm(self, method: str, url: str, body: dict[str, Any] | None, *, step: str) -> httpx.Response:
        try:
            grant: Grant = self.management.peek() or await self.management.get()
        except CredentialUnavailable as exc:
            raise RotationFailed("token", f"no management token for ARM ({step}): {exc.message}") from None
        http = self.arm.http_client()  # the process's one httpx client for Azure APIs (TLS, proxy)
        for attempt in (1, 2):
            assert grant.header is not None
            try:
                response = await http.request(
                    method,
                    url,
                    headers={"Authorization": grant.header, "Accept": "application/json"},
                    json=body,
                )
            except httpx.HTTPError as exc:
                raise RotationFailed(
                    step, f"ARM ({origin_of(url)}) could not be reached: {type(exc).__name__}: {exc}"
                ) from None
            if response.status_code == 401 and attempt == 1:
                replacement = await self.management.reject(grant, verdict=False)
                if replacement is not None:
                    grant = replacement
                    continue
            return response
        raise AssertionError("unreachable")

    async def _wait(self, accepted: httpx.Response) -> None:
        """Poll the operation until it succeeded: Azure-AsyncOperation's `status`, else Location's 202."""
        async_operation = accepted.headers.get("azure-asyncoperation")
        location = accepted.headers.get("location")
        if not async_operation and not location:
            return  # nothing to poll: ARM accepted it and gave no way to follow it
        url = async_operation or location
        assert url is not None
        deadline = time.monotonic() + OPERATION_TIMEOUT_S
        delay = _retry_after(accepted)
        while True:
            if time.monotonic() + delay > deadline:
                raise RotationFailed("wait", f"the operation did not finish within {OPERATION_TIMEOUT_S:g} s")
            await asyncio.sleep(delay)
            response = await self._arm("GET", url, None, step="wait")
            delay = _retry_after(response)
            if async_operation:
                if response.status_code != 200:
                    raise RotationFailed("wait", _arm_problem("the operation status", response))
                status = str(_json(response).get("status") or "")
                if status.lower() == "succeeded":
                    return
                if status.lower() in ("failed", "canceled", "cancelled"):
                    raise RotationFailed(
                        "wait", f"the operation ended {status}: {_arm_problem('it', response)}"
                    )
            else:
                if response.status_code in (200, 204):
                    return
                if response.status_code != 202:
                    raise RotationFailed("wait", _arm_problem("the operation result", response))

    async def _read_back(self, slot: str) -> str:
        response = await self._arm("POST", self.plan.list_keys_url, None, step="read")
        if response.status_code != 200:
            raise RotationFailed("read", _arm_problem("listKeys", response))
        value = _json(response).get(f"{slot}Key")
        if not isinstance(value, str) or not value:
            raise RotationFailed("read", f"listKeys answered without a {slot}Key")
        redaction.register(value)
        return value

    async def _verify(self, slot: SlotPlan, key: str) -> None:
        problem = ""
        for attempt in range(1, VERIFY_ATTEMPTS + 1):
            try:
                response = await self.arm.http_client().get(
                    self.plan.verify_url, headers={"Authorization": f"Bearer {key}"}
                )
            except httpx.HTTPError as exc:
                problem = f"GET {self.plan.verify_url} failed: {type(exc).__name__}: {exc}"
            else:
                if response.status_code not in (401, 403):
                    return
                problem = (
                    f"GET {self.plan.verify_url} answered {response.status_code}: the new key is rejected"
                )
            if attempt < VERIFY_ATTEMPTS:
                await asyncio.sleep(VERIFY_PAUSE_S)
        raise RotationFailed("verify", redaction.redact(problem))

    def key_states(self) -> str:
        return "; ".join(f"{s.slot}: {s.state}" for s in self.plan.slots)


def _read_file(path: Path) -> str:
    value = path.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
    redaction.register(value)
    return value


def _write_file(path: Path, value: str) -> None:
    """Replace the file atomically (a reader sees the old key or the new one, never half of it)."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(value + "\n")
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _retry_after(response: httpx.Response) -> float:
    try:
        value = float(response.headers.get("retry-after", "1"))
    except ValueError:
        value = 1.0
    return min(max(value, 0.0), RETRY_AFTER_CAP_S)


def _arm_problem(what: str, response: httpx.Response) -> str:
    code, message = azure_error(response)
    text = f"{what} answered {response.status_code}" + (f" {code}" if code else "")
    if message:
        text += f": {message}"
    if response.status_code == 403:
        text += (
            " (grant the identity Microsoft.MachineLearningServices/workspaces/onlineEndpoints/"
            "regenerateKeys/action and listKeys/action on the endpoint)"
        )
    return redaction.redact(text)


async def run_rotate(
    config: GatewayConfig,
    source: str,
    route: str,
    *,
    slots: list[str] | None = None,
    settle_s: float | None = None,
    dry_run: bool = False,
    verify_url: str | None = None,
    out: TextIO | None = None,
) -> int:
    """0: rotated; 1: a step failed (the message says which and the keys' state); 2: configuration."""
    stream = out or sys.stdout
    errors = out or sys.stderr
    try:
        plan = make_plan(config, source, route, slots=slots, settle_s=settle_s, verify_url=verify_url)
    except ConfigError as exc:
        print(f"gateway rotate: {exc}", file=errors)
        return 2
    if dry_run:
        for line in plan.describe():
            print(line, file=stream)
        print("dry run: nothing was changed", file=stream)
        return 0
    try:
        rotation = Rotation(plan, config, source, stream)
    except ConfigError as exc:
        print(f"gateway rotate: {exc}", file=errors)
        return 2
    try:
        await rotation.run()
    except Exception as exc:  # RotationFailed, or a surprise: either way, say what state the keys are in
        step, message = (
            (exc.step, exc.message)
            if isinstance(exc, RotationFailed)
            else ("unknown", f"unexpected {type(exc).__name__}: {exc}")
        )
        print(
            redaction.redact(
                f"gateway rotate: route {route}: step `{step}` failed: {message}. "
                f"Key state: {rotation.key_states()}. See docs/rotation.md (recovering from a failed run)."
            ),
            file=errors,
            flush=True,
        )
        return 1
    print(
        f"route {route}: both keys rotated" if len(plan.slots) == 2 else f"route {route}: rotated",
        file=stream,
    )
    return 0
