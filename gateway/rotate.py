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

Before anything changes, the run takes a lock in the route's key store (a tag on the current version of
its Key Vault secret, or a lock file next to its key file; with an expiry): a second run of the same
endpoint refuses to start (exit 3) instead of breaking a key. Both keys are read again before each write
and each regeneration: a change this run did not make stops it rather than being overwritten.

Every ARM request goes through the one Azure REST helper (`gateway.azure_rest`): the operation is followed
only on the ARM host it was started on, over https; `Retry-After` is clamped to [1 s, 60 s].

Any failure stops the run (exit 1) with the step that failed and the state each key is in. A key value
is never printed: it only travels in request bodies and the Authorization header.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import secrets
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from gateway import redaction
from gateway.assembly import Assembly
from gateway.azure_rest import AzureAnswer, AzureError, AzureRest, AzureTokenUnavailable, Pause, clean_message
from gateway.config import FileRef, GatewayConfig, KeyAuth, KeyVaultRef, RouteConfig
from gateway.credentials.arm import arm_scope, check_arm_url, endpoint_url
from gateway.errors import ConfigError
from gateway.keyvault import KeyVaultClient, KeyVaultError
from gateway.secrets import CHECK_INTERVAL_S
from gateway.tokens import TokenEntry

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_LOCKED = 3
SLOTS = ("primary", "secondary")
DEFAULT_ORDER = ("secondary", "primary")  # gateways use the primary key until it is rejected
SETTLE_MARGIN_S = 5.0
SETTLE_MARGIN_FRACTION = 0.1
OPERATION_TIMEOUT_S = 600.0
VERIFY_ATTEMPTS = 3
VERIFY_PAUSE_S = 2.0
KEY_BYTES = 32  # token_urlsafe(32): 43 characters, like the keys Azure ML generates
# The tag on the current version of the route's Key Vault secret (or the lock file's content) that
# says a rotation of the endpoint is running, and until when at most.
LOCK_TAG = "gateway-rotation-lock"
LOCK_MARGIN_S = 300.0


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


# ---------------------------------------------------------------------------------------- the lock
class RotationLocked(Exception):
    """Another rotation of the endpoint holds the lock in the route's key store: nothing was changed."""


@dataclass(frozen=True)
class LockHolder:
    run: str
    host: str
    until: float  # wall-clock seconds

    def text(self) -> str:
        return f"run={self.run};host={self.host};until={self.until:.0f}"

    @classmethod
    def parse(cls, text: str | None) -> LockHolder | None:
        """A lock as stored; None when absent or unreadable (which takes nothing from anyone)."""
        if not text:
            return None
        fields = dict(part.partition("=")[::2] for part in text.split(";"))
        try:
            until = float(fields["until"])
        except (KeyError, ValueError):
            return None
        if not math.isfinite(until):
            return None
        return cls(fields.get("run", "?")[:40], fields.get("host", "?")[:100], until)

    def describe(self) -> str:
        when = dt.datetime.fromtimestamp(self.until, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"run {self.run} on {self.host}, until {when}"


class KeyStoreLock:
    """At most one rotation of an endpoint at a time, held where its keys live: a tag on the current
    version of the route's Key Vault secret, or a lock file next to its key file. A lock carries an
    expiry, so a run that crashed blocks the next ones only until then.

    Key Vault has no compare-and-swap: two runs starting in the same instant can both write the tag; the
    one whose tag is read back proceeds, and the re-read of both keys before each change (`Rotation`)
    stops a run whose keys changed under it."""

    def __init__(self, slot: SlotPlan, vault: KeyVaultClient | None, holder: LockHolder) -> None:
        self.slot = slot
        self.vault = vault
        self.holder = holder
        self.where = slot.where

    @property
    def tag(self) -> dict[str, str]:
        """The tag every new version of the lock's secret carries while the lock is held."""
        return {LOCK_TAG: self.holder.text()} if isinstance(self.slot.ref, KeyVaultRef) else {}

    async def acquire(self) -> None:
        """Take the lock; RotationLocked if another unexpired run holds it (KeyVaultError, OSError)."""
        if isinstance(self.slot.ref, KeyVaultRef):
            await self._acquire_tag(self.slot.ref)
        elif isinstance(self.slot.ref, FileRef):
            self._acquire_file(self._lock_file(self.slot.ref))

    async def release(self) -> None:
        """Give the lock back if it is still ours (failures are harmless: the lock expires)."""
        try:
            if isinstance(self.slot.ref, KeyVaultRef):
                assert self.vault is not None
                ref = self.slot.ref.keyvault
                current = await self.vault.get(ref.vault, ref.secret)
                if current.tags.get(LOCK_TAG) == self.holder.text():
                    tags = {k: v for k, v in current.tags.items() if k != LOCK_TAG}
                    await self.vault.set_tags(ref.vault, ref.secret, current.version, tags)
            elif isinstance(self.slot.ref, FileRef):
                path = self._lock_file(self.slot.ref)
                if LockHolder.parse(_read_lock_file(path)) == self.holder:
                    path.unlink(missing_ok=True)
        except (KeyVaultError, OSError):
            pass

    def _refuse(self, holder: LockHolder, where: str) -> RotationLocked:
        return RotationLocked(
            f"another rotation of this endpoint holds the lock in {where} ({holder.describe()}); nothing was "
            f"changed. If no rotation is running (one that crashed), wait until then, or remove the lock "
            f"({self._how_to_remove()})"
        )

    def _how_to_remove(self) -> str:
        if isinstance(self.slot.ref, FileRef):
            return f"delete {self._lock_file(self.slot.ref)}"
        return f"remove the tag {LOCK_TAG} from the secret's current version"

    async def _acquire_tag(self, ref: KeyVaultRef) -> None:
        assert self.vault is not None
        vault, name = ref.keyvault.vault, ref.keyvault.secret
        current = await self.vault.get(vault, name)
        held = LockHolder.parse(current.tags.get(LOCK_TAG))
        if held is not None and held.until > time.time() and held != self.holder:
            raise self._refuse(held, self.where)
        await self.vault.set_tags(vault, name, current.version, {**current.tags, **self.tag})
        again = await self.vault.get(vault, name)
        winner = LockHolder.parse(again.tags.get(LOCK_TAG))
        if winner != self.holder:
            if winner is not None and winner.until > time.time():
                raise self._refuse(winner, self.where)
            raise RotationLocked(
                f"the current version of {self.where} changed while this run took the lock (another "
                "rotation?); nothing was changed"
            )

    def _lock_file(self, ref: FileRef) -> Path:
        path = Path(ref.file)
        return path.parent / f".{path.name}.rotation-lock"

    def _acquire_file(self, path: Path) -> None:
        where = f"the lock file {path}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            held = LockHolder.parse(_read_lock_file(path))
            if held is not None and held.until > time.time():
                raise self._refuse(held, where) from None
            _write_file(path, self.holder.text())  # expired or unreadable: taken over, atomically
            if LockHolder.parse(_read_lock_file(path)) != self.holder:
                raise RotationLocked(
                    f"another run took {where} at the same moment; nothing was changed"
                ) from None
            return
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self.holder.text() + "\n")


def _read_lock_file(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")[:512].strip()
    except (OSError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------------------------------- running
class Rotation:
    def __init__(self, plan: Plan, config: GatewayConfig, assembly: Assembly, out: TextIO) -> None:
        self.plan = plan
        self.config = config
        self.out = out
        auth = config.routes[plan.route].auth
        assert isinstance(auth, KeyAuth)
        self.auth = auth
        self.assembly = assembly
        self.arm_url = check_arm_url(auth.arm_url, f"routes.{plan.route}.auth.arm_url", assembly.ctx)
        identity = assembly.identity(plan.route, auth.identity)
        self.management: TokenEntry = assembly.ctx.tokens.entry(identity, arm_scope(self.arm_url))
        self.rest: AzureRest = assembly.rest
        self.vault: KeyVaultClient | None = None
        if any(s.source == "keyvault" for s in plan.slots):
            self.vault = assembly.keyvault_client()
        self.lock: KeyStoreLock | None = None
        store = _lock_slot(plan, config)
        if store is not None:
            until = float(math.ceil(time.time() + _lock_ttl(plan)))  # whole seconds, as stored
            holder = LockHolder(secrets.token_hex(6), f"{socket.gethostname()}:{os.getpid()}", until)
            self.lock = KeyStoreLock(store, self.vault, holder)
        self.expected: dict[str, str] = {}  # slot -> the key the store should hold, as last read or written

    def say(self, message: str) -> None:
        print(redaction.redact(f"route {self.plan.route}: {message}"), file=self.out, flush=True)

    async def run(self) -> None:
        self.rest.acquire(self)
        try:
            if self.lock is not None:
                try:
                    await self.lock.acquire()
                except (KeyVaultError, OSError) as exc:
                    raise RotationFailed(
                        "read", f"cannot take the rotation lock in {self.lock.where}: {exc}"
                    ) from None
            try:
                await self._rotate_all()
            finally:
                if self.lock is not None:
                    await self.lock.release()
        finally:
            await self.rest.release(self)

    async def _rotate_all(self) -> None:
        await self._read_keys()
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

    # ------------------------------------------------------------------ the key store
    async def _current_keys(self) -> dict[str, str]:
        """Both keys as the route's key store holds them now (Key Vault, files, or listKeys)."""
        if self.auth.from_endpoint is not None:
            answer = await self._arm("POST", self.plan.list_keys_url, None, step="read")
            if answer.status != 200:
                raise RotationFailed("read", self._arm_problem("listKeys", answer))
            data = answer.json_object()
            keys = {slot: data.get(f"{slot}Key") for slot in SLOTS}
            for slot, value in keys.items():
                if not isinstance(value, str) or not value:
                    raise RotationFailed("read", f"listKeys answered without a {slot}Key")
                redaction.register(value)
            return {slot: str(value) for slot, value in keys.items()}
        found: dict[str, str] = {}
        for slot in SLOTS:
            spec = self.auth.primary if slot == "primary" else self.auth.secondary
            where = _where(spec)
            try:
                if isinstance(spec, KeyVaultRef):
                    assert self.vault is not None
                    value = (await self.vault.get(spec.keyvault.vault, spec.keyvault.secret)).value
                    redaction.register(value)
                elif isinstance(spec, FileRef):
                    value = _read_file(Path(spec.file))
                else:
                    continue  # a slot this run does not rotate, from a source it cannot read again
            except (KeyVaultError, OSError) as exc:
                raise RotationFailed(
                    "read", f"cannot read the current {slot} key from {where}: {exc}"
                ) from None
            found[slot] = value
        return found

    async def _read_keys(self) -> None:
        self.expected = await self._current_keys()

    async def _check_unchanged(self, before: str) -> None:
        """Both keys are still what this run last read or wrote; else stop, so that another run's (or an
        operator's) change is not overwritten."""
        now = await self._current_keys()
        for slot, value in now.items():
            if slot in self.expected and value != self.expected[slot]:
                raise RotationFailed(
                    "read",
                    f"the {slot} key changed in the key store while this run was going (another rotation, or "
                    f"an operator?); stopping before {before}, so that the change is not overwritten",
                )

    async def _rotate(self, slot: SlotPlan) -> None:
        new_key: str | None = None
        if slot.source != "listKeys":
            await self._check_unchanged(f"writing the new {slot.slot} key")
            new_key = secrets.token_urlsafe(KEY_BYTES)
            redaction.register(new_key)
            await self._write(slot, new_key)
            self.expected[slot.slot] = new_key
        await self._check_unchanged(f"regenerating the {slot.slot} key")
        self.say(f"regenerating the {slot.slot} key of endpoint {self.plan.endpoint}")
        body: dict[str, Any] = {"keyType": slot.slot.capitalize()}
        if new_key is not None:
            body["keyValue"] = new_key
        try:
            answer = await self._arm("POST", self.plan.regenerate_url, body, step="regenerate")
        except RotationFailed as exc:
            if exc.step != "regenerate":
                raise
            # Sent, but no answer: ARM may or may not have started the regeneration.
            slot.state = (
                f"{slot.state}; the regenerateKeys request got no answer, so the endpoint may have "
                "the old or the new key"
            )
            raise
        if answer.status not in (200, 202, 204):
            raise RotationFailed("regenerate", self._arm_problem("regenerateKeys", answer))
        slot.state = (
            "regeneration requested; whether the endpoint has the new key is unknown"
            if new_key is None
            else "regeneration requested with the new key; whether the endpoint has it yet is unknown"
        )
        if answer.status == 202:
            try:
                await self.rest.follow_operation(
                    answer,
                    started_on=self.arm_url,
                    token=self.management,
                    what="ARM regenerateKeys",
                    timeout_s=OPERATION_TIMEOUT_S,
                )
            except AzureError as exc:
                raise RotationFailed("wait", str(exc)) from None
        slot.state = "regenerated in the endpoint; the old key no longer works"
        if new_key is None:
            new_key = (await self._current_keys())[slot.slot]
        self.expected[slot.slot] = new_key
        self.say(f"the {slot.slot} key was regenerated; verifying it")
        await self._verify(slot, new_key)
        slot.state = "rotated and verified"
        self.say(f"the {slot.slot} key is rotated and verified")

    async def _order(self) -> None:
        """Gateways use a key the endpoint accepts: one it rejects (a previous run stopped after writing
        it, before the endpoint took it) is not in use anywhere, so it is rotated first."""
        rejected = [s for s in self.plan.slots if await self._rejected(self.expected[s.slot])]
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
            answer = await self.rest.send(
                "GET", self.plan.verify_url, what="verify", headers={"Authorization": f"Bearer {key}"}
            )
        except AzureError:
            return False
        return answer.status in (401, 403)

    async def _write(self, slot: SlotPlan, new_key: str) -> None:
        try:
            if isinstance(slot.ref, KeyVaultRef):
                assert self.vault is not None
                tags = self.lock.tag if self.lock is not None and self.lock.slot is slot else None
                written = await self.vault.put(
                    slot.ref.keyvault.vault, slot.ref.keyvault.secret, new_key, tags=tags
                )
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

    async def _arm(self, method: str, url: str, body: dict[str, Any] | None, *, step: str) -> AzureAnswer:
        what = "ARM " + url.split("?")[0].rsplit("/", 1)[-1]
        try:
            return await self.rest.call(method, url, token=self.management, what=what, body=body)
        except AzureTokenUnavailable as exc:
            raise RotationFailed("token", str(exc)) from None  # nothing was sent
        except AzureError as exc:
            raise RotationFailed(step, str(exc)) from None  # the request may have been sent

    async def _verify(self, slot: SlotPlan, key: str) -> None:
        problem = ""
        for attempt in range(1, VERIFY_ATTEMPTS + 1):
            try:
                answer = await self.rest.send(
                    "GET", self.plan.verify_url, what="verify", headers={"Authorization": f"Bearer {key}"}
                )
            except AzureError as exc:
                problem = f"GET {self.plan.verify_url} failed: {exc}"
            else:
                if answer.status not in (401, 403):
                    return
                problem = f"GET {self.plan.verify_url} answered {answer.status}: the new key is rejected"
            if attempt < VERIFY_ATTEMPTS:
                await asyncio.sleep(VERIFY_PAUSE_S)
        raise RotationFailed("verify", redaction.redact(problem))

    def _arm_problem(self, what: str, answer: AzureAnswer) -> str:
        hint = ""
        if answer.status == 403:
            hint = (
                "grant the identity Microsoft.MachineLearningServices/workspaces/onlineEndpoints/"
                "regenerateKeys/action and listKeys/action on the endpoint"
            )
        return str(self.rest.failure(answer, what, hint=hint))

    def key_states(self) -> str:
        return "; ".join(f"{s.slot}: {s.state}" for s in self.plan.slots)


def _where(spec: object) -> str:
    if isinstance(spec, KeyVaultRef):
        return f"Key Vault {spec.keyvault.vault} secret {spec.keyvault.secret}"
    if isinstance(spec, FileRef):
        return f"file {spec.file}"
    return "the configuration"


def _lock_slot(plan: Plan, config: GatewayConfig) -> SlotPlan | None:
    """Where the lock lives: the route's primary key's store (else its secondary's), so that every run on
    the route, whatever its --slots, takes the same lock. None for `from_endpoint` (no store of ours)."""
    auth = config.routes[plan.route].auth
    assert isinstance(auth, KeyAuth)
    for slot in SLOTS:
        spec = auth.primary if slot == "primary" else auth.secondary
        if isinstance(spec, KeyVaultRef | FileRef):
            planned = next((s for s in plan.slots if s.slot == slot), None)
            return planned or SlotPlan(
                slot, "keyvault" if isinstance(spec, KeyVaultRef) else "file", _where(spec), spec
            )
    return None


def _lock_ttl(plan: Plan) -> float:
    """How long a run may hold the lock: its longest possible duration, plus a margin."""
    per_slot = OPERATION_TIMEOUT_S + VERIFY_ATTEMPTS * (VERIFY_PAUSE_S + 30.0) + 60.0
    return len(plan.slots) * per_slot + max(0, len(plan.slots) - 1) * plan.settle_s + LOCK_MARGIN_S


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
    pause: Pause | None = None,
) -> int:
    """0: rotated; 1: a step failed (the message says which and the keys' state); 2: configuration;
    3: another rotation of the endpoint holds the lock (nothing changed). `pause` waits between polls of
    ARM's operation (tests record the waits instead of sleeping)."""
    stream = out or sys.stdout
    errors = out or sys.stderr
    try:
        plan = make_plan(config, source, route, slots=slots, settle_s=settle_s, verify_url=verify_url)
    except ConfigError as exc:
        print(f"gateway rotate: {exc}", file=errors)
        return EXIT_CONFIG
    if dry_run:
        for line in plan.describe():
            print(line, file=stream)
        print("dry run: nothing was changed", file=stream)
        return 0
    assembly: Assembly | None = None
    try:
        # Only what the rotation needs is read from Key Vault: the proxy's credentials and the route's
        # identity (its keys are read and written by the rotation itself).
        assembly = await Assembly.create(
            config,
            source,
            only=lambda path: path.startswith(("egress.", f"routes.{route}.auth.identity.")),
            pause=pause or asyncio.sleep,
        )
        rotation = Rotation(plan, config, assembly, stream)
    except ConfigError as exc:
        print(f"gateway rotate: {exc}", file=errors)
        if assembly is not None:
            await assembly.close()
        return EXIT_CONFIG
    try:
        await rotation.run()
    except RotationLocked as exc:
        print(redaction.redact(f"gateway rotate: route {route}: {exc}"), file=errors, flush=True)
        return EXIT_LOCKED
    except Exception as exc:  # RotationFailed, or a surprise: either way, say what state the keys are in
        step, message = (
            (exc.step, exc.message)
            if isinstance(exc, RotationFailed)
            else ("unknown", f"unexpected {type(exc).__name__}: {clean_message(str(exc))}")
        )
        print(
            redaction.redact(
                f"gateway rotate: route {route}: step `{step}` failed: {message}. "
                f"Key state: {rotation.key_states()}. See docs/rotation.md (recovering from a failed run)."
            ),
            file=errors,
            flush=True,
        )
        return EXIT_FAILED
    finally:
        await assembly.close()
    print(
        f"route {route}: both keys rotated" if len(plan.slots) == 2 else f"route {route}: rotated",
        file=stream,
    )
    return 0
