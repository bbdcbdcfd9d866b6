"""Credential kinds behind one interface (`base.Credential`), and the factory that builds them from config."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.config import (
    AadTokenAuth,
    AmlTokenAuth,
    EnvRef,
    FileRef,
    KeyAuth,
    KeyVaultRef,
    LiteralRef,
    NoneAuth,
    SecretSpec,
)
from gateway.credentials.base import Credential, CredentialStatus, Grant, NoCredential, RejectionPolicy
from gateway.credentials.key import KeyCredential, KeySlot
from gateway.egress import Egress
from gateway.errors import ConfigError, SecretError
from gateway.secrets import EnvSecret, FileSecret, LiteralSecret, Secret

if TYPE_CHECKING:
    from gateway.azure_rest import AzureRest
    from gateway.keyvault import KeyVaults
    from gateway.tokens import TokenCache

__all__ = [
    "BuildContext",
    "Credential",
    "CredentialStatus",
    "Grant",
    "build_credential",
    "resolve_secret",
]

logger = logging.getLogger("gateway.config")


@dataclass
class BuildContext:
    """What the builders of credentials and secrets share within one process, all made by the assembly
    (`gateway.assembly`, the only place that makes one): TLS trust, the egress policy, the Azure REST
    helper, the token cache, Key Vault, and long-lived clients (`shared`: MSAL identities, their thread
    pool, endpoint keys)."""

    ssl_context: ssl.SSLContext
    egress: Egress
    rest: AzureRest
    tokens: TokenCache
    vaults: KeyVaults
    source: str = "<config>"
    warn_literals: bool = True
    shared: dict[str, Any] = field(default_factory=dict)


def resolve_secret(spec: SecretSpec, where: str, ctx: BuildContext, *, header: bool = False) -> Secret:
    """`header=True` for values sent in an HTTP header (keys, header values): no control characters,
    checked at start-up and on every change of a file."""
    try:
        if isinstance(spec, EnvRef):
            return EnvSecret(spec.env, header=header)
        if isinstance(spec, FileRef):
            return FileSecret(spec.file, header=header)
        if isinstance(spec, KeyVaultRef):
            return ctx.vaults.secret(spec, where, header=header)  # read before the build started
        if ctx.warn_literals:
            logger.warning(
                "%s: %s is a literal secret in the config file; prefer {env: NAME} or {file: PATH}",
                ctx.source,
                where,
            )
        assert isinstance(spec, LiteralRef)
        return LiteralSecret(spec.value.get_secret_value(), header=header)
    except SecretError as exc:
        raise ConfigError(f"{ctx.source}: {where}: {exc}") from None


def build_credential(route: str, auth: Any, ctx: BuildContext) -> Credential:
    where = f"routes.{route}.auth"
    if isinstance(auth, NoneAuth):
        return NoCredential(route)
    if isinstance(auth, KeyAuth):
        if auth.from_endpoint is not None:
            from gateway.credentials.control_plane import build_control_plane_keys

            return build_control_plane_keys(route, auth, ctx)
        slots = [KeySlot("primary", resolve_secret(auth.primary, f"{where}.primary", ctx, header=True))]  # type: ignore[arg-type]
        if auth.secondary is not None:
            slots.append(
                KeySlot("secondary", resolve_secret(auth.secondary, f"{where}.secondary", ctx, header=True))
            )
        from gateway.keyvault import refetcher

        refetch = refetcher([slot.secret for slot in slots])  # Key Vault keys: read again when rejected
        return KeyCredential(
            route,
            slots,
            recheck_after_s=auth.recheck_after_s,
            rejection=RejectionPolicy.of(auth),
            refetch=refetch,
        )
    if isinstance(auth, AadTokenAuth):
        from gateway.credentials.aad import build_aad_credential

        return build_aad_credential(route, auth, ctx)
    if isinstance(auth, AmlTokenAuth):
        from gateway.credentials.aml import build_aml_credential

        return build_aml_credential(route, auth, ctx)
    raise ConfigError(f"{ctx.source}: {where}.type: unsupported auth type")
