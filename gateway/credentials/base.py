"""The one small interface every credential kind implements.

The proxy asks for a `Grant` (the Authorization header value to send) on every request, tells the
credential when the upstream rejected or accepted it, and reads `status()` for readiness, metrics
and `gateway check`. `grant_nowait()` must be cheap: no lock, no I/O, no coroutine.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gateway.errors import SecretError
from gateway.secrets import check_header_value


@dataclass(frozen=True, slots=True, eq=False)
class Grant:
    """What to send upstream: `header` is the full Authorization value, or None for open upstreams."""

    header: str | None
    slot: str  # "primary", "secondary", "token", "none": safe to log and to use as a metric label
    expires_at: float | None = None  # wall-clock seconds, for tokens
    # The whole header line as the upstream client writes it, encoded once per grant, not per request.
    header_line: bytes | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.header is not None:
            try:
                check_header_value(self.header, "the credential")
            except SecretError as exc:
                raise ValueError(str(exc)) from None
            object.__setattr__(
                self, "header_line", b"Authorization: " + self.header.encode("latin-1") + b"\r\n"
            )

    def __repr__(self) -> str:
        return f"Grant(slot={self.slot!r})"


@dataclass(slots=True)
class CredentialStatus:
    kind: str
    ready: bool
    state: str  # "valid", "rejected", "unavailable", "refreshing", "pending", "open"
    active_slot: str | None = None
    source: str = ""
    expires_in_s: float | None = None
    detail: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "auth_type": self.kind,
            "state": self.state,
            "ready": self.ready,
            "active_slot": self.active_slot,
            "source": self.source,
        }
        if self.expires_in_s is not None:
            data["expires_in_s"] = round(self.expires_in_s, 1)
        if self.detail:
            data["detail"] = self.detail
        data.update(self.extra)
        return data


class Credential(abc.ABC):
    kind: ClassVar[str]
    # Upstream statuses that mean "this credential was refused".
    rejection_statuses: ClassVar[frozenset[int]] = frozenset({401})

    def __init__(self, route: str) -> None:
        self.route = route

    @abc.abstractmethod
    def grant_nowait(self) -> Grant | None:
        """The grant to use now, or None when one must first be acquired with `grant()`."""

    async def grant(self) -> Grant:
        """Wait for a grant; raises CredentialUnavailable when none can be had."""
        grant = self.grant_nowait()
        assert grant is not None
        return grant

    async def rejected(self, grant: Grant) -> Grant | None:
        """The upstream refused `grant`. Return another one to replay the request with, or None."""
        return None

    def accepted(self, grant: Grant) -> None:  # noqa: B027 - optional hook, a no-op by default
        """The upstream accepted `grant` (it answered something other than a rejection)."""

    @abc.abstractmethod
    def status(self) -> CredentialStatus: ...

    async def start(self) -> None:  # noqa: B027
        """Begin background work (refresh loops). Called once the event loop runs."""

    async def close(self) -> None:  # noqa: B027
        """Stop background work."""

    async def check(self) -> CredentialStatus:
        """Acquire the credential once, for `gateway check`."""
        await self.grant()
        return self.status()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(route={self.route!r})"


class NoCredential(Credential):
    """`auth.type: none`: the upstream is open; the client's own Authorization is still dropped."""

    kind = "none"
    rejection_statuses = frozenset()
    _GRANT = Grant(header=None, slot="none")

    def grant_nowait(self) -> Grant:
        return self._GRANT

    def status(self) -> CredentialStatus:
        return CredentialStatus(kind=self.kind, ready=True, state="open")
