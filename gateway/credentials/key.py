"""`auth.type: key`: a primary and an optional secondary endpoint key, with failover between them.

The active slot is used until the upstream refuses it; then the other slot is tried with the same
request at once and, if accepted, becomes active. One refusal only makes a slot suspect: a client can
provoke a 401 (see `gateway.credentials.base`). Refusals in `reject_after` distinct requests within
`reject_window_s` with no acceptance in between call for a verdict, which the gateway reaches with a
request of its own (`probe`, see `gateway.credentials.probe`): accepted, the refusals came from what
the requests asked and the slot is cleared; refused, or when the probe cannot tell, the slot is
declared rejected (readiness, error log, metric). The request whose refusal called for the verdict
waits for the probe, until its own deadline at most (then it gets the refusal and the probe goes on for
the requests that follow); at most one probe per slot runs at a time, and after a probe accepted the
key, the next one waits `PROBE_INTERVAL_S`. A declared slot is skipped by failover and tried again when its
value changes (a rotated file, keys fetched again from the control plane) or after `recheck_after_s`.
The route is not ready while every slot is declared rejected.

A rotation can leave a slot declared with a value the endpoint accepts again (a key written to the
source just before the control plane took it): when the active slot is refused, nothing else is usable
and the sources hold nothing new, a slot declared before the active one was last accepted is tried
once more within the request, since the endpoint's keys evidently changed since that declaration.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from gateway import metrics
from gateway.credentials.base import (
    DEFAULT_REJECTION,
    Credential,
    CredentialStatus,
    DeadlinePassed,
    Grant,
    RejectionPolicy,
    Suspicion,
    by_deadline,
    replay,
)
from gateway.credentials.probe import KeyProbe, ProbeResult, ProbeVerdict
from gateway.secrets import Secret

logger = logging.getLogger("gateway.credentials")

# After the gateway's probe accepted a key, refusals that call for another verdict within this many
# seconds are taken as the same story (requests refused for what they ask), not probed again: however
# fast a client provokes refusals, the endpoint gets at most one probe per slot in this interval.
PROBE_INTERVAL_S = 10.0

# Returns True when it obtained key values different from the ones held.
Refetch = Callable[[], Awaitable[bool]]


class KeySlot:
    def __init__(self, name: str, secret: Secret) -> None:
        self.name = name
        self.secret = secret
        self._value: str | None = None
        self._grant: Grant | None = None
        self.suspicion = Suspicion()  # with the credential's policy, set by KeyCredential
        self.suspect = False  # refused since last accepted; read by the accepted() fast path
        self._suspect_value: str | None = None  # the value the suspicion is about
        self.rejected_value: str | None = None  # declared rejected while it still holds this value
        self.declared_after = 0  # the credential's acceptance count when this slot was declared
        self.probing: asyncio.Task[None] | None = None  # the gateway's probe of this slot, under way
        self.cleared: tuple[str, float] | None = None  # (value, monotonic time) a probe last accepted

    def grant(self) -> Grant:
        value = self.secret.value
        if value is not self._value or self._grant is None:
            self._value = value
            self._grant = Grant(header=f"Bearer {value}", slot=self.name)
        return self._grant

    def is_current(self, grant: Grant) -> bool:
        """`grant` carries the slot's present value (replays are copies, so compare the header)."""
        return grant.header == self.grant().header

    def usable(self, now: float, recheck_after_s: float) -> bool:
        rejected = self.rejected_value
        if rejected is None:
            return True
        declared_at = self.suspicion.declared_at
        return self.secret.value != rejected or declared_at is None or now - declared_at >= recheck_after_s

    def reject(self, now: float) -> bool:
        """One request's refusal of the present value; True when the refusals call for a verdict
        (`declare`, or `accept` when the gateway's probe accepts the key)."""
        value = self.secret.value
        if value != self._suspect_value:  # a new value starts with a clean record
            self.suspicion.accepted()
            self._suspect_value = value
            self.rejected_value = None
        self.suspect = True
        return self.suspicion.verdict_due(now)

    def declare(self, value: str, now: float) -> None:
        self.rejected_value = value
        self.suspicion.declared_at = now

    def accept(self) -> bool:
        """The present value was accepted; True if the slot had been declared rejected."""
        self.suspect = False
        self._suspect_value = None
        self.rejected_value = None
        return self.suspicion.accepted()

    def __repr__(self) -> str:
        return f"KeySlot(name={self.name!r}, source={self.secret.source!r})"


class KeyCredential(Credential):
    kind = "key"

    def __init__(
        self,
        route: str,
        slots: Sequence[KeySlot],
        *,
        recheck_after_s: float = 300.0,
        refetch: Refetch | None = None,
        source: str | None = None,
        rejection: RejectionPolicy = DEFAULT_REJECTION,
    ) -> None:
        super().__init__(route, rejection)
        if not slots:
            raise ValueError("a key credential needs at least one key")
        self.slots = list(slots)
        for slot in self.slots:
            slot.suspicion = Suspicion(rejection)
        self.recheck_after_s = recheck_after_s
        self._refetch = refetch
        self._active = self.slots[0]
        self._accepts = 0  # acceptances of the active slot, to date declarations (see the docstring)
        self._all_rejected = False
        self._source = source or ", ".join(f"{s.name}={s.secret.source}" for s in self.slots)
        # The gateway's own request that decides a verdict; set by the router, which knows the upstream.
        # None: refusals alone decide.
        self.probe: KeyProbe | None = None
        for slot in self.slots:
            slot.secret.subscribe(self._key_changed)

    def _key_changed(self, secret: Secret) -> None:
        for slot in self.slots:
            if slot.secret is secret:
                metrics.KEY_ROTATIONS.labels(self.route, slot.name).inc()
                logger.warning(
                    "route %s: the %s key changed (%s); using the new one",
                    self.route,
                    slot.name,
                    secret.source,
                )
        # A new value lifts a declared rejection: the gauges must say so now, not at this worker's next
        # request or scrape (with several workers, /metrics shows the minimum over all of them).
        self.publish()

    @property
    def active(self) -> KeySlot:
        return self._active

    def _slot(self, grant: Grant) -> KeySlot | None:
        for slot in self.slots:
            if slot.name == grant.slot:
                return slot
        return None

    def _choose(self) -> KeySlot:
        now = time.monotonic()
        if self._active.usable(now, self.recheck_after_s):
            return self._active
        for slot in self.slots:
            if slot.usable(now, self.recheck_after_s):
                return slot
        return self._active

    def grant_nowait(self) -> Grant:
        active = self._active
        if active.rejected_value is None:
            return active.grant()
        return self._choose().grant()

    async def rejected(self, grant: Grant, until: float | None = None) -> Grant | None:
        slot = self._slot(grant)
        if slot is None:
            return None
        tried = grant.tried
        if not slot.is_current(grant):
            # The key changed while this request was in flight: the new value deserves a try, and the
            # refusal of the old one says nothing about it.
            return replay(slot.grant(), tried)
        try:
            if slot.name not in tried:
                await self._count_rejection(slot, time.monotonic(), until)
            return await self._replacement(slot, tried, until)
        except DeadlinePassed:
            return None  # the request's deadline came before a verdict or the keys: it gets the refusal

    async def _replacement(self, slot: KeySlot, tried: frozenset[str], until: float | None) -> Grant | None:
        """The grant to replay a request refused with `slot` (and `tried` already) with, or None."""
        now = time.monotonic()
        tried = tried | {slot.name}
        for other in self.slots:
            if other.name not in tried and other.usable(now, self.recheck_after_s):
                return replay(other.grant(), tried)
        if self._refetch is not None:
            held = {s.name: s.secret.value for s in self.slots}
            # Until the request's deadline at most, as the probe (the read is the control plane's, shielded).
            await by_deadline(until, self._refetch())
            # Whatever changed while it read, not only what its own read changed: the poll loop may
            # have stored the new keys first (its read was in flight), and then this one changes nothing.
            now = time.monotonic()
            for other in self.slots:
                if other.secret.value != held[other.name] and other.usable(now, self.recheck_after_s):
                    return replay(other.grant(), tried - {other.name})
        if slot is self._active:
            for other in self.slots:
                if (
                    other.name not in tried
                    and other.rejected_value is not None
                    and other.declared_after < self._accepts
                ):
                    return replay(other.grant(), tried)
        return None

    async def _count_rejection(self, slot: KeySlot, now: float, until: float | None) -> None:
        """Count the refusal; a probe it starts is waited for until the request's deadline (`until`, on
        `time.perf_counter()`) at most: DeadlinePassed past it."""
        metrics.CREDENTIAL_REJECTIONS.labels(self.route, slot.name).inc()
        if not slot.reject(now):
            if slot.rejected_value is not None:
                slot.declared_after = self._accepts
                self.publish()  # refused again after recheck_after_s: declared anew, without a new log
            return
        value = slot.secret.value
        probe = self.probe
        if probe is None:
            self._declare(slot, value, now, "")
            return
        if slot.probing is not None:
            return  # the probe under way decides
        cleared = slot.cleared
        if cleared is not None and cleared[0] == value and now - cleared[1] < PROBE_INTERVAL_S:
            return
        slot.probing = asyncio.create_task(self._probe(slot, value, probe))
        # Waited for by this request (so its answer comes after the verdict), but never past the request's
        # own deadline: a probe URL that does not answer would hold it (and its route's concurrency slot)
        # for PROBE_TIMEOUT_S. Never cancelled with the request: the verdict serves the requests after it.
        await by_deadline(until, asyncio.shield(slot.probing))

    async def _probe(self, slot: KeySlot, value: str, probe: KeyProbe) -> None:
        try:
            result = await probe.check(value)
        finally:
            slot.probing = None
        if slot.secret.value != value:
            return  # the key changed meanwhile: the new value starts with a clean record
        policy = self.rejection
        if result.verdict is ProbeVerdict.ACCEPTED:
            slot.accept()
            slot.cleared = (value, time.monotonic())
            logger.warning(
                "route %s: the upstream refused the %s key in %d requests within %s s, but the gateway's "
                "own probe (GET %s) accepted it (%s): it is not declared rejected (the requests were "
                "refused for what they asked, not for the key)",
                self.route,
                slot.name,
                policy.reject_after,
                f"{policy.window_s:g}",
                probe.url,
                result.detail,
            )
            self.publish()
            return
        self._declare(slot, value, time.monotonic(), self._probe_note(probe, result))

    @staticmethod
    def _probe_note(probe: KeyProbe, result: ProbeResult) -> str:
        verdict = "refused it too" if result.verdict is ProbeVerdict.REJECTED else "could not tell"
        return f"; the gateway's own probe (GET {probe.url}) {verdict}: {result.detail}"

    def _declare(self, slot: KeySlot, value: str, now: float, probe_note: str) -> None:
        slot.declare(value, now)
        slot.declared_after = self._accepts
        policy = self.rejection
        logger.error(
            "route %s: the upstream refused the %s key in %d requests within %s s with no acceptance in "
            "between%s; it is declared rejected and skipped until its value changes or for %s s",
            self.route,
            slot.name,
            policy.reject_after,
            f"{policy.window_s:g}",
            probe_note,
            f"{self.recheck_after_s:g}",
        )
        if not self._all_rejected and not any(s.usable(now, self.recheck_after_s) for s in self.slots):
            self._all_rejected = True
            logger.error(
                "route %s: every key was rejected by the upstream (%s); the route is not ready. "
                "Rotate the key source or check the endpoint's keys",
                self.route,
                ", ".join(s.name for s in self.slots),
            )
        self.publish()

    def accepted(self, grant: Grant) -> None:
        active = self._active
        if grant.slot == active.name and not active.suspect:
            self._accepts += 1
            return
        slot = self._slot(grant)
        if slot is None or not slot.is_current(grant):
            return
        changed = slot.accept()
        self._accepts += 1
        if self._all_rejected:
            self._all_rejected = False
            logger.warning(
                "route %s: the %s key is accepted again; the route is ready", self.route, slot.name
            )
        elif changed:
            logger.warning(
                "route %s: the %s key is accepted again; it is no longer declared rejected",
                self.route,
                slot.name,
            )
        if slot is not active:
            self._active = slot
            changed = True
            metrics.KEY_FAILOVERS.labels(self.route, slot.name).inc()
            logger.warning(
                "route %s: switched to the %s key after the %s key was rejected",
                self.route,
                slot.name,
                active.name,
            )
        if changed:
            self.publish()

    def status(self) -> CredentialStatus:
        now = time.monotonic()
        usable = [s for s in self.slots if s.usable(now, self.recheck_after_s)]
        rejected = [s.name for s in self.slots if s not in usable]
        suspect = [s.name for s in usable if s.suspect]
        if not usable:
            state = "rejected"
        elif rejected:
            state = "degraded"
        else:
            state = "valid"
        extra: dict[str, object] = {}
        if rejected:
            extra["rejected_slots"] = rejected
        if suspect:
            extra["suspect_slots"] = suspect
        wall = time.time()
        ages = {s.name: round(max(0.0, wall - s.secret.since)) for s in self.slots}
        for slot_name, age in ages.items():
            metrics.KEY_AGE.labels(self.route, slot_name).set(age)
        extra["key_age_s"] = ages
        return CredentialStatus(
            kind=self.kind,
            ready=bool(usable),
            state=state,
            active_slot=self._choose().name,
            source=self._source,
            extra=extra,
        )

    async def check(self) -> CredentialStatus:
        for slot in self.slots:
            slot.grant()
        return self.status()
