"""Credentials that are a cached bearer token (`aad_token`, `aml_token`): thin views of `gateway.tokens`."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.credentials.base import (
    DEFAULT_REJECTION,
    Credential,
    CredentialStatus,
    DeadlinePassed,
    Grant,
    RejectionPolicy,
    Suspicion,
    by_deadline,
)
from gateway.tokens import TokenEntry


class TokenCredential(Credential):
    """The route's token lives in the shared cache; `dependencies` are tokens needed to obtain it (the
    management token behind an Azure ML endpoint token), kept fresh while the route exists."""

    def __init__(
        self,
        route: str,
        entry: TokenEntry,
        *,
        source: str,
        dependencies: Sequence[TokenEntry] = (),
        rejection: RejectionPolicy = DEFAULT_REJECTION,
    ) -> None:
        super().__init__(route, rejection)
        if entry.suspicion.policy != rejection and not entry.suspicion.suspect:
            entry.suspicion = Suspicion(rejection)
        self.entry = entry
        self.dependencies = tuple(dependencies)
        self.source = source
        for token in (*self.dependencies, entry):
            token.register(self, route, self.kind)
        # The hot path: one TLRU look-up, bound here so grant_nowait does no attribute walking.
        self._valid = entry.cache.valid
        self._key = entry.key

    def grant_nowait(self) -> Grant | None:
        try:
            grant: Grant = self._valid[self._key]  # raises KeyError at and after the token's expiry
        except KeyError:
            return None
        return grant

    async def grant(self) -> Grant:
        return await self.entry.get()

    async def rejected(self, grant: Grant, until: float | None = None) -> Grant | None:
        # A new token is waited for until the request's deadline at most (Entra ID can take up to
        # identity.timeout_s); the fetch, shielded in the cache, goes on for the requests after it.
        try:
            return await by_deadline(until, self.entry.reject(grant))
        except DeadlinePassed:
            return None

    def accepted(self, grant: Grant) -> None:
        # Per request: one identity check while the token is known good.
        if grant is not self.entry.settled:
            self.entry.accept(grant)

    async def start(self) -> None:
        for entry in (*self.dependencies, self.entry):
            entry.attach(self, self.route, self.kind)

    async def close(self) -> None:
        for entry in (self.entry, *self.dependencies):
            await entry.detach(self)

    def status(self) -> CredentialStatus:
        entry = self.entry
        state = entry.state()
        detail = entry.last_error
        if detail and entry.last_hint:
            detail = f"{detail} ({entry.last_hint})"
        if detail is None:
            for dependency in self.dependencies:
                if dependency.last_error:
                    detail = f"refreshing {dependency.scope} fails: {dependency.last_error}"
                    break
        held = entry.grant
        return CredentialStatus(
            kind=self.kind,
            ready=state != "rejected" and self.grant_nowait() is not None,
            state=state,
            active_slot="token",
            source=self.source,
            expires_in_s=entry.expires_in(),
            expires_at=held.expires_at if held is not None and entry.peek() is not None else None,
            detail=detail,
            extra={"suspect": True} if entry.suspect else {},
        )
