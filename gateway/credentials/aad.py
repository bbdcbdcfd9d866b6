"""`auth.type: aad_token`: a Microsoft Entra ID token for the endpoint's audience (managed endpoints)."""

from __future__ import annotations

from gateway.config import AadTokenAuth
from gateway.credentials import BuildContext
from gateway.credentials.base import Credential, RejectionPolicy
from gateway.credentials.identity import resolve_identity
from gateway.credentials.token import TokenCredential
from gateway.errors import ConfigError


class AadTokenCredential(TokenCredential):
    kind = "aad_token"


def build_aad_credential(route: str, auth: AadTokenAuth, ctx: BuildContext) -> Credential:
    scope = auth.scope.strip()
    if not scope.endswith("/.default") or scope == "/.default":
        raise ConfigError(
            f"{ctx.source}: routes.{route}.auth.scope: client-credential tokens need a resource's "
            f"`/.default` scope, e.g. https://ml.azure.com/.default; got {auth.scope!r}"
        )
    identity = resolve_identity(route, auth.identity, ctx)
    entry = ctx.tokens.entry(identity, scope)
    return AadTokenCredential(
        route, entry, source=f"{identity.description}, scope {scope}", rejection=RejectionPolicy.of(auth)
    )
