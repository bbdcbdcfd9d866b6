"""`auth.type: key`: a primary and an optional secondary endpoint key, with failover between them.

The active slot is used until the upstream rejects it; then the other slot is tried with the same
request and, if accepted, becomes active. A rejected slot is tried again when its value changes
(a rotated file, keys fetched again from the control plane) or after `recheck_after_s`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence

from gateway import metrics
from gateway.credentials.base import Credential, CredentialStatus, Grant
from gateway.secrets import Secret

logger = logging.getLogger("gateway.credentials")

# Returns True when it obtained key values different from the ones held.
Refetch = Callable[[], Awaitable[bool]]


class KeySlot:
    def __init__(self, name: str, secret: Secret) -> None:
        self.name = name
        self.secret = secret
        self._value: str | None = None
        self._grant: Grant | None = None
        self.rejected_value: str | None = None
        self.rejected_at = 0.0

    def grant(self) -> Grant:
        value = self.secret.value
        if value is not self._value or self._grant is None:
            self._value = value
            self._grant = Grant(header=f"Bearer {value}", slot=self.name)
        return self._grant

    def is_current(self, grant: Grant) -> bool:
        return grant is self.grant()

    def usable(self, now: float, recheck_after_s: float) -> bool:
        rejected = self.rejected_value
        if rejected is None:
            return True
        if self.secret.value != rejected or now - self.rejected_at >= recheck_after_s:
            return True
        return False

    def reject(self) -> None:
        self.rejected_value = self.secret.value
        self.rejected_at = time.monotonic()

    def __repr__(self) -> str:
        return f"KeySlot(name={self.name!r}, source={self.secret.source!r})"


class KeyCredential(Credential):
    kind = "key"
    # Azure ML answers 401 for a wrong key; 403 is what some fronts (and AKS endpoints) use.
    rejection_statuses = frozenset({401, 403})

    def __init__(
        self,
        route: str,
        slots: Sequence[KeySlot],
        *,
        recheck_after_s: float = 300.0,
        refetch: Refetch | None = None,
        source: str | None = None,
    ) -> None:
        super().__init__(route)
        if not slots:
            raise ValueError("a key credential needs at least one key")
        self.slots = list(slots)
        self.recheck_after_s = recheck_after_s
        self._refetch = refetch
        self._active = self.slots[0]
        self._switched_at = -math.inf  # monotonic time of the last failover
        self._all_rejected = False
        self._source = source or ", ".join(f"{s.name}={s.secret.source}" for s in self.slots)
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

    async def rejected(self, grant: Grant) -> Grant | None:
        slot = self._slot(grant)
        if slot is None:
            return None
        if not slot.is_current(grant):
            # The key changed while this request was in flight: the new value deserves a try.
            return slot.grant()
        slot.reject()
        now = time.monotonic()
        for other in self.slots:
            if other is not slot and other.usable(now, self.recheck_after_s):
                return other.grant()
        if self._refetch is not None and await self._refetch():
            candidate = self._choose()
            if candidate.usable(time.monotonic(), self.recheck_after_s):
                return candidate.grant()
        if slot is self._active:
            # The active key worked since the others were rejected, and now fails: the endpoint's keys
            # changed (a rotation), so a rejection older than the last failover is stale: try it again.
            for other in self.slots:
                if other is not slot and other.rejected_at <= self._switched_at:
                    return other.grant()
        if not self._all_rejected:
            self._all_rejected = True
            logger.error(
                "route %s: every key was rejected by the upstream (%s); the route is not ready. "
                "Rotate the key source or check the endpoint's keys",
                self.route,
                ", ".join(s.name for s in self.slots),
            )
        return None

    def accepted(self, grant: Grant) -> None:
        active = self._active
        if grant.slot == active.name and active.rejected_value is None:
            return
        slot = self._slot(grant)
        if slot is None or not slot.is_current(grant):
            return
        slot.rejected_value = None
        if self._all_rejected:
            self._all_rejected = False
            logger.warning(
                "route %s: the %s key is accepted again; the route is ready", self.route, slot.name
            )
        if slot is not active:
            self._active = slot
            self._switched_at = time.monotonic()
            metrics.KEY_FAILOVERS.labels(self.route, slot.name).inc()
            logger.warning(
                "route %s: switched to the %s key after the %s key was rejected",
                self.route,
                slot.name,
                active.name,
            )

    def status(self) -> CredentialStatus:
        now = time.monotonic()
        usable = [s for s in self.slots if s.usable(now, self.recheck_after_s)]
        rejected = [s.name for s in self.slots if s not in usable]
        if not usable:
            state = "rejected"
        elif rejected:
            state = "degraded"
        else:
            state = "valid"
        extra: dict[str, object] = {"rejected_slots": rejected} if rejected else {}
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
