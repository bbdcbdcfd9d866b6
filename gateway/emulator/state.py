"""All mutable state of the emulator: credentials, identities, token signing, counters and fault switches.

The HTTP handlers run on the emulator's event-loop thread while tests read counters and flip faults from
their own thread, so every access goes through one lock. Nothing here performs I/O.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final, Literal

import jwt
from cryptography.hazmat.primitives import serialization

from gateway.emulator.api_apps import ApiApp, ApiApps, TokenVersion
from gateway.emulator.capacity import DeploymentCapacity
from gateway.emulator.signing import SigningKeys
from gateway.emulator.tls import thumbprints

__all__ = [
    "AML_RESOURCE",
    "ARM_RESOURCE",
    "FAULT_TARGETS",
    "FEDERATED_AUDIENCE",
    "FEDERATED_ISSUER",
    "KEYVAULT_RESOURCE",
    "EmulatorState",
    "Fault",
    "ManagedIdentity",
    "RegisteredApp",
    "TokenValidationError",
]

AML_RESOURCE: Final = "https://ml.azure.com"
ARM_RESOURCE: Final = "https://management.azure.com"
# The audience Entra ID requires on workload-identity (federated) assertions.
FEDERATED_AUDIENCE: Final = "api://AzureADTokenExchange"
# A stand-in for a Kubernetes service-account issuer; `.invalid` guarantees nobody can resolve it.
FEDERATED_ISSUER: Final = "https://oidc.emulator.invalid/"
# "keyvault": every Key Vault request; "regenerate": ARM regenerateKeys calls only; "lro": the status of
# regenerateKeys operations (a failing fault makes the next operation report `Failed`); "openid": the
# OpenID discovery documents and the signing keys (JWKS), v1 and v2.
# Text settings that make the control plane misbehave (see EmulatorState); None behaves as Azure does.
_MISBEHAVIOUR_SETTINGS: Final = (
    "lro_operation_origin",
    "lro_retry_after",
    "aml_token_expiry",
    "aml_token_refresh_after",
    "arm_error_message",
    "entra_error_message",
    "keyvault_error_message",
    "entra_expires_in",
)
FAULT_TARGETS: Final = ("token", "mi", "arm", "score", "keyvault", "regenerate", "lro", "openid")

KeySlot = Literal["primary", "secondary"]
FaultTarget = Literal["token", "mi", "arm", "score", "keyvault", "regenerate", "lro", "openid"]
KEYVAULT_RESOURCE: Final = "https://vault.azure.net"

_RECENT_SCORES = 200
_DEFAULT_RESOURCES = (
    AML_RESOURCE,
    ARM_RESOURCE,
    "https://management.core.windows.net",
    "https://vault.azure.net",
)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def normalize_resource(resource: str) -> str:
    """`https://management.azure.com/` and `https://management.azure.com` name the same resource."""
    return resource.rstrip("/")


class TokenValidationError(Exception):
    """A bearer token the emulator refuses; `reason` is a short machine-readable word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RegisteredApp:
    """An app registration (service principal) with the credentials Entra ID would accept for it."""

    tenant_id: str
    client_id: str
    object_id: str
    secret: str | None = field(default=None, repr=False)
    certificate_pem: str | None = field(default=None, repr=False)
    federated_subject: str | None = None
    certificate_sha1: str | None = None
    certificate_sha256: str | None = None

    def public_json(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "client_id": self.client_id,
            "object_id": self.object_id,
            "credentials": [
                kind
                for kind, present in (
                    ("secret", self.secret is not None),
                    ("certificate", self.certificate_pem is not None),
                    ("federated", self.federated_subject is not None),
                )
                if present
            ],
            "federated_subject": self.federated_subject,
            "certificate_sha1": self.certificate_sha1,
        }


@dataclass(frozen=True)
class ManagedIdentity:
    client_id: str
    object_id: str
    resource_id: str
    system_assigned: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VaultSecretVersion:
    """One version of a Key Vault secret."""

    version: str
    value: str = field(repr=False)
    created: int
    enabled: bool = True
    tags: dict[str, str] = field(default_factory=dict)
    updated: int | None = None

    def bundle(self, base_url: str, name: str, *, with_value: bool = True) -> dict[str, Any]:
        """The secret bundle Key Vault answers (without `value` for listings and attribute updates)."""
        bundle: dict[str, Any] = {
            "id": f"{base_url}/secrets/{name}/{self.version}",
            "attributes": {
                "enabled": self.enabled,
                "created": self.created,
                "updated": self.updated or self.created,
                "recoveryLevel": "Recoverable+Purgeable",
            },
            "tags": dict(self.tags),
        }
        return {"value": self.value, **bundle} if with_value else bundle


@dataclass(frozen=True)
class Fault:
    """What to do to the next requests of one target.

    `status`: answer with this HTTP status and the target's Azure-shaped error body.
    `retry_after`: seconds, sent as a Retry-After header along with `status`.
    `remaining`: how many more requests are affected; None means until cleared.
    `skip`: how many requests pass untouched before the fault applies (fail the second call, not the first).
    `delay_s`: latency added before answering (normally, unless `status` is set too).
    `hang_s`: hold the request this long, then fail it (with `status`, else 504): an unresponsive service.
    """

    target: str
    status: int | None = None
    retry_after: int | None = None
    remaining: int | None = None
    hang_s: float | None = None
    delay_s: float | None = None
    skip: int = 0

    @property
    def fails(self) -> bool:
        return self.status is not None or self.hang_s is not None

    @property
    def failure_status(self) -> int:
        return self.status if self.status is not None else 504

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.skip:
            del data["skip"]
        return data


class EmulatorState:
    """Everything the emulated services know. Safe to use from any thread.

    Lifetimes are plain attributes and can be changed at any time; they apply to tokens issued afterwards:
    `token_lifetime_s` (Entra ID client-credential tokens), `refresh_in_s` (None: Entra's own rule, i.e.
    half the lifetime when it is at least 2 h, else omitted; 0: never send `refresh_in`),
    `mi_token_lifetime_s` (None: same as `token_lifetime_s`), `aml_token_lifetime_s` (ARM `token` op),
    `score_delay_s` (model latency), `lro_retry_after_s` (Retry-After of regenerateKeys' 202 and of its
    operation's InProgress answers), `lro_polls` (how many polls of an operation answer InProgress).

    A misbehaving control plane, for tests of the gateway's defences (text settings; None: as Azure
    behaves): `lro_operation_origin` (operation URLs point at this origin, e.g. another host or plain
    http, instead of the ARM host the operation was started on), `lro_retry_after` (the Retry-After text
    of operation answers, e.g. "nan", replacing `lro_retry_after_s`), `aml_token_expiry` and
    `aml_token_refresh_after` (sent as `expiryTimeUtc` and `refreshAfterTimeUtc` of `token` answers, e.g.
    "nan"), `arm_error_message` (the message of every ARM error answer, e.g. megabytes of text), and
    the same for Entra ID (`entra_error_message`, the description of every token endpoint error) and Key
    Vault (`keyvault_error_message`); `entra_expires_in` (the `expires_in` of Entra ID token answers and
    of IMDS managed-identity answers, e.g. "nan", "inf", "-1", "1e308": a JSON number where the text is
    one, else the text).
    """

    def __init__(
        self,
        *,
        primary_key: str | None = None,
        secondary_key: str | None = None,
        token_lifetime_s: int = 3600,
        refresh_in_s: int | None = None,
        mi_token_lifetime_s: int | None = None,
        aml_token_lifetime_s: int = 3600,
        score_delay_s: float = 0.0,
        lro_retry_after_s: int = 10,
        lro_polls: int = 0,
        mi_tenant_id: str | None = None,
        identity_header: str | None = None,
        deployment: str = "blue",
    ) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, str] = {
            "primary": primary_key or secrets.token_urlsafe(32),
            "secondary": secondary_key or secrets.token_urlsafe(32),
        }
        self.token_lifetime_s = token_lifetime_s
        self.refresh_in_s = refresh_in_s
        self.mi_token_lifetime_s = mi_token_lifetime_s
        self.aml_token_lifetime_s = aml_token_lifetime_s
        self.score_delay_s = score_delay_s
        self.lro_retry_after_s = lro_retry_after_s
        self.lro_polls = lro_polls
        self.deployment = deployment
        self.lro_operation_origin: str | None = None
        self.lro_retry_after: str | None = None
        self.aml_token_expiry: str | None = None
        self.aml_token_refresh_after: str | None = None
        self.arm_error_message: str | None = None
        self.entra_error_message: str | None = None
        self.keyvault_error_message: str | None = None
        self.entra_expires_in: str | None = None

        self._apps: dict[tuple[str, str], RegisteredApp] = {}
        self._resources: set[str] = {normalize_resource(r) for r in _DEFAULT_RESOURCES}
        self.mi_tenant_id = mi_tenant_id or str(uuid.uuid4())
        # The secret App Service injects as IDENTITY_HEADER; it must come back in X-IDENTITY-HEADER.
        self.identity_header = identity_header or secrets.token_urlsafe(24)
        self.system_identity = self._make_identity("system", system_assigned=True)
        self._user_identities: dict[str, ManagedIdentity] = {}

        self.signing = SigningKeys()
        self.apis = ApiApps()

        self._aml_tokens: dict[str, float] = {}
        self._vault: dict[str, list[VaultSecretVersion]] = {}
        self._operations: dict[str, tuple[str, int]] = {}  # id -> (final status, InProgress polls left)
        self._faults: dict[str, Fault] = {}
        # Scoring requests each deployment serves at once (none set: no limit); see capacity.py.
        self.capacity = DeploymentCapacity()
        self._init_counters()

    # ----------------------------------------------------------------- endpoint keys
    @property
    def primary_key(self) -> str:
        with self._lock:
            return self._keys["primary"]

    @property
    def secondary_key(self) -> str:
        with self._lock:
            return self._keys["secondary"]

    def keys(self) -> dict[str, str]:
        with self._lock:
            return dict(self._keys)

    def regenerate_key(self, slot: str, value: str | None = None) -> str:
        """Replace one key (like ARM regenerateKeys). Returns the new key; the old one stops working."""
        slot = slot.lower()
        if slot not in self._keys:
            raise ValueError(f"slot must be 'primary' or 'secondary', not {slot!r}")
        if value is not None and not value.strip():
            raise ValueError("key value must not be empty")
        new_key = value if value is not None else secrets.token_urlsafe(32)
        with self._lock:
            self._keys[slot] = new_key
        return new_key

    def match_key(self, candidate: str) -> str | None:
        """Return the slot whose key equals `candidate`, comparing in constant time."""
        with self._lock:
            keys = dict(self._keys)
        found = None
        for slot, key in keys.items():
            if secrets.compare_digest(candidate.encode(), key.encode()):
                found = slot
        return found

    # ----------------------------------------------------------------- Key Vault
    def set_secret(
        self, name: str, value: str, *, created: int | None = None, tags: dict[str, str] | None = None
    ) -> str:
        """Add a new version of a Key Vault secret, which becomes its current version; returns its id. An
        empty value is a version like any other, as in Azure Key Vault."""
        version = VaultSecretVersion(
            uuid.uuid4().hex, value, int(time.time()) if created is None else created, tags=dict(tags or {})
        )
        with self._lock:
            self._vault.setdefault(name.lower(), []).append(version)
        return version.version

    def get_secret(self, name: str, version: str | None = None) -> VaultSecretVersion | None:
        """The current (newest) version, or the one named; None if there is none. A disabled version is
        returned too: Key Vault refuses to serve it (403 SecretDisabled) and never falls back to an
        older one."""
        with self._lock:
            versions = list(self._vault.get(name.lower(), []))
        if version:
            return next((v for v in versions if v.version == version), None)
        return versions[-1] if versions else None

    def secret_versions(self, name: str) -> list[str]:
        with self._lock:
            return [v.version for v in self._vault.get(name.lower(), [])]

    def secret_version_list(self, name: str) -> list[VaultSecretVersion]:
        with self._lock:
            return list(self._vault.get(name.lower(), []))

    def update_secret(
        self,
        name: str,
        version: str | None = None,
        *,
        enabled: bool | None = None,
        tags: dict[str, str] | None = None,
    ) -> VaultSecretVersion | None:
        """Change a version's `enabled` attribute or its tags (Key Vault's UpdateSecret); the current
        version when `version` is None. None if there is no such version."""
        with self._lock:
            versions = self._vault.get(name.lower(), [])
            for index, found in enumerate(versions):
                if found.version == version or (version is None and index == len(versions) - 1):
                    changes: dict[str, Any] = {"updated": int(time.time())}
                    if enabled is not None:
                        changes["enabled"] = enabled
                    if tags is not None:
                        changes["tags"] = dict(tags)
                    versions[index] = replace(found, **changes)
                    return versions[index]
        return None

    def delete_secret(self, name: str) -> bool:
        with self._lock:
            return self._vault.pop(name.lower(), None) is not None

    # ----------------------------------------------------------------- ARM operations
    def start_operation(self, status: str = "Succeeded") -> str:
        """A long-running operation that reports InProgress for `lro_polls` polls, then `status`."""
        operation_id = str(uuid.uuid4())
        with self._lock:
            self._operations[operation_id] = (status, int(self.lro_polls))
        return operation_id

    def poll_operation(self, operation_id: str) -> str | None:
        """The operation's status now (counting this poll); None for an unknown id."""
        with self._lock:
            entry = self._operations.get(operation_id)
            if entry is None:
                return None
            status, pending = entry
            if pending > 0:
                self._operations[operation_id] = (status, pending - 1)
                return "InProgress"
            return status

    # ----------------------------------------------------------------- app registrations
    def add_app(
        self,
        tenant_id: str,
        client_id: str,
        *,
        secret: str | None = None,
        certificate_pem: str | None = None,
        federated_subject: str | None = None,
    ) -> RegisteredApp:
        """Register (or replace) an app in a tenant with any combination of credentials."""
        if not (secret or certificate_pem or federated_subject):
            raise ValueError("an app needs a secret, a certificate or a federated subject")
        sha1 = sha256 = None
        if certificate_pem:
            sha1, sha256 = thumbprints(certificate_pem)
        app = RegisteredApp(
            tenant_id=tenant_id,
            client_id=client_id,
            object_id=str(uuid.uuid4()),
            secret=secret,
            certificate_pem=certificate_pem,
            federated_subject=federated_subject,
            certificate_sha1=sha1,
            certificate_sha256=sha256,
        )
        with self._lock:
            self._apps[(tenant_id.lower(), client_id.lower())] = app
        return app

    def get_app(self, tenant_id: str, client_id: str) -> RegisteredApp | None:
        with self._lock:
            return self._apps.get((tenant_id.lower(), client_id.lower()))

    def apps(self) -> list[RegisteredApp]:
        with self._lock:
            return list(self._apps.values())

    def add_resource(self, resource: str) -> None:
        """Make Entra ID issue tokens for another resource (application ID URI)."""
        with self._lock:
            self._resources.add(normalize_resource(resource))

    def knows_resource(self, resource: str) -> bool:
        with self._lock:
            if normalize_resource(resource) in self._resources:
                return True
        return self.apis.find(resource) is not None

    # ----------------------------------------------------------------- managed identities
    def _make_identity(
        self, name: str, *, system_assigned: bool, client_id: str | None = None
    ) -> ManagedIdentity:
        group = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/emulator/providers"
        if system_assigned:
            resource_id = f"{group}/Microsoft.Compute/virtualMachines/{name}"
        else:
            resource_id = f"{group}/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        return ManagedIdentity(
            client_id=client_id or str(uuid.uuid4()),
            object_id=str(uuid.uuid4()),
            resource_id=resource_id,
            system_assigned=system_assigned,
        )

    def add_user_assigned_identity(
        self, client_id: str | None = None, *, name: str | None = None
    ) -> ManagedIdentity:
        with self._lock:
            identity = self._make_identity(
                name or f"uami-{len(self._user_identities) + 1}", system_assigned=False, client_id=client_id
            )
            self._user_identities[identity.client_id.lower()] = identity
        return identity

    def user_assigned_identities(self) -> list[ManagedIdentity]:
        with self._lock:
            return list(self._user_identities.values())

    def find_identity(
        self, *, client_id: str | None = None, object_id: str | None = None, resource_id: str | None = None
    ) -> ManagedIdentity | None:
        """Resolve an MI selector the way IMDS does; no selector means the system-assigned identity."""
        if not (client_id or object_id or resource_id):
            return self.system_identity
        with self._lock:
            candidates = [self.system_identity, *self._user_identities.values()]
        for identity in candidates:
            if client_id and identity.client_id.lower() == client_id.lower():
                return identity
            if object_id and identity.object_id.lower() == object_id.lower():
                return identity
            if resource_id and identity.resource_id.lower() == resource_id.lower():
                return identity
        return None

    # ----------------------------------------------------------------- token signing
    @property
    def signing_kid(self) -> str:
        """The `kid` of the key that signs tokens now (see `signing.rotate()`)."""
        return self.signing.current.kid

    def public_key_pem(self) -> str:
        return self.signing.current.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def _sign(self, claims: dict[str, Any]) -> str:
        return self.signing.sign(claims)

    def _verification_key(self, token: str, what: str) -> Any:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenValidationError("malformed", f"{what} is not a JWT") from exc
        key = self.signing.find(header.get("kid"))
        if key is None or header.get("alg") != "RS256":
            raise TokenValidationError("unknown_key", f"{what} was not signed by this identity provider")
        return key.public_key

    def issue_access_token(
        self,
        *,
        audience: str,
        tenant_id: str,
        appid: str,
        oid: str | None = None,
        lifetime_s: float | None = None,
        appidacr: str = "1",
        extra_claims: dict[str, Any] | None = None,
        version: TokenVersion = 1,
        authority: str | None = None,
        roles: list[str] | None = None,
    ) -> str:
        """Sign an Entra-ID-shaped app-only access token, v1 (`iss` https://sts.windows.net/{tid}/, the
        client in `appid`) or v2 (`iss` {authority}/{tid}/v2.0, the client in `azp`; needs `authority`).
        `roles`: app roles assigned to the client (omitted when empty, as Entra does). A negative
        lifetime yields an expired token."""
        now = int(time.time())
        lifetime = self.token_lifetime_s if lifetime_s is None else lifetime_s
        object_id = oid or str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant_id}/{appid}"))
        claims: dict[str, Any] = {"aud": audience}
        if version == 2:
            if authority is None:
                raise ValueError("a v2 token needs the authority its issuer is under")
            claims |= {"iss": f"{authority.rstrip('/')}/{tenant_id}/v2.0", "iat": now, "nbf": now}
            claims |= {"exp": int(now + lifetime), "azp": appid, "azpacr": appidacr}
        else:
            issuer = f"https://sts.windows.net/{tenant_id}/"
            claims |= {"iss": issuer, "iat": now, "nbf": now, "exp": int(now + lifetime)}
            claims |= {"appid": appid, "appidacr": appidacr, "idp": issuer}
        claims |= {
            "idtyp": "app",
            "oid": object_id,
            "sub": object_id,
            "tid": tenant_id,
            "uti": _b64url(secrets.token_bytes(16)),
            "ver": "2.0" if version == 2 else "1.0",
        }
        if roles:
            claims["roles"] = list(roles)
        claims.update(extra_claims or {})
        return self._sign(claims)

    def issue_token_for_resource(
        self,
        resource: str,
        *,
        tenant_id: str,
        appid: str,
        oid: str | None = None,
        lifetime_s: float | None = None,
        appidacr: str = "1",
        extra_claims: dict[str, Any] | None = None,
        authority: str,
    ) -> str:
        """What Entra ID issues to client `appid` for `resource` (a scope without `/.default`): for a
        registered API, the API's token version, audience and the roles assigned to the client."""
        api: ApiApp | None = self.apis.find(resource)
        if api is None:
            return self.issue_access_token(
                audience=resource,
                tenant_id=tenant_id,
                appid=appid,
                oid=oid,
                lifetime_s=lifetime_s,
                appidacr=appidacr,
                extra_claims=extra_claims,
            )
        version = api.access_token_version
        return self.issue_access_token(
            # v2 tokens always name the API by its client id; v1 tokens by what the client asked for.
            audience=api.client_id if version == 2 else resource.rstrip("/"),
            tenant_id=tenant_id,
            appid=appid,
            oid=oid,
            lifetime_s=lifetime_s,
            appidacr=appidacr,
            extra_claims=extra_claims,
            version=version,
            authority=authority,
            roles=self.apis.roles(api, appid),
        )

    def verify_access_token(self, token: str, *, audiences: Collection[str]) -> dict[str, Any]:
        """Check signature, expiry and audience of a token this emulator issued; return its claims."""
        public_key = self._verification_key(token, "the token")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                public_key,
                algorithms=["RS256"],
                options={"verify_aud": False, "require": ["exp", "aud", "iss"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenValidationError("expired", "the token has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise TokenValidationError("not_yet_valid", "the token is not valid yet") from exc
        except jwt.InvalidSignatureError as exc:
            raise TokenValidationError("bad_signature", "the token signature is invalid") from exc
        except jwt.PyJWTError as exc:
            raise TokenValidationError("malformed", f"the token is invalid: {exc}") from exc
        if not str(claims["iss"]).startswith("https://sts.windows.net/"):
            raise TokenValidationError("wrong_issuer", "the token was not issued for a resource")
        wanted = {normalize_resource(a) for a in audiences}
        if normalize_resource(str(claims["aud"])) not in wanted:
            raise TokenValidationError(
                "wrong_audience", f"the token audience {claims['aud']!r} is not accepted"
            )
        return claims

    def issue_federated_token(
        self, subject: str, *, audience: str = FEDERATED_AUDIENCE, lifetime_s: float = 3600
    ) -> str:
        """A workload-identity token (what AKS projects into AZURE_FEDERATED_TOKEN_FILE) for `subject`."""
        now = int(time.time())
        claims = {
            "iss": FEDERATED_ISSUER,
            "sub": subject,
            "aud": [audience],
            "iat": now,
            "nbf": now,
            "exp": int(now + lifetime_s),
            "jti": str(uuid.uuid4()),
        }
        return self._sign(claims)

    def verify_federated_token(self, token: str) -> dict[str, Any]:
        public_key = self._verification_key(token, "the assertion")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                public_key,
                algorithms=["RS256"],
                audience=FEDERATED_AUDIENCE,
                issuer=FEDERATED_ISSUER,
                options={"require": ["exp", "sub", "aud", "iss"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenValidationError("expired", "the assertion has expired") from exc
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
            raise TokenValidationError("no_match", str(exc)) from exc
        except jwt.PyJWTError as exc:
            raise TokenValidationError("bad_signature", f"the assertion is invalid: {exc}") from exc
        return claims

    # ----------------------------------------------------------------- lifetimes
    def entra_lifetimes(self) -> tuple[int, int | None]:
        """(expires_in, refresh_in or None) for a new Entra ID token response."""
        lifetime = int(self.token_lifetime_s)
        if self.refresh_in_s is None:
            return lifetime, (lifetime // 2 if lifetime >= 7200 else None)
        return lifetime, (int(self.refresh_in_s) or None)

    def mi_lifetime(self) -> int:
        return int(
            self.mi_token_lifetime_s if self.mi_token_lifetime_s is not None else self.token_lifetime_s
        )

    # ----------------------------------------------------------------- AML tokens
    def issue_aml_token(self) -> tuple[str, int, int]:
        """Issue an opaque endpoint token. Returns (token, expiry, refresh_after) in Unix seconds."""
        now = time.time()
        lifetime = self.aml_token_lifetime_s
        token = secrets.token_urlsafe(48)
        with self._lock:
            # Forget tokens an hour after expiry: a long benchmark must not grow the table without bound,
            # yet a recently expired token should still be reported as expired rather than unknown.
            self._aml_tokens = {t: exp for t, exp in self._aml_tokens.items() if exp > now - 3600}
            self._aml_tokens[token] = now + lifetime
        return token, int(now + lifetime), int(now + lifetime / 2)

    def check_aml_token(self, token: str) -> str | None:
        """None if `token` is a live AML token; "expired" or "unknown" otherwise."""
        with self._lock:
            expiry = self._aml_tokens.get(token)
        if expiry is None:
            return "unknown"
        return None if expiry > time.time() else "expired"

    def revoke_aml_tokens(self) -> int:
        with self._lock:
            count = len(self._aml_tokens)
            self._aml_tokens.clear()
        return count

    # ----------------------------------------------------------------- faults
    def set_fault(
        self,
        target: str,
        *,
        status: int | None = None,
        retry_after: int | None = None,
        count: int | None = None,
        hang_s: float | None = None,
        delay_s: float | None = None,
        skip: int = 0,
    ) -> Fault:
        """Arm a fault for `target` ("token", "mi", "arm", "score"), replacing any previous one.

        `count` limits it to the next N requests; None keeps it until `clear_faults`.
        """
        if target not in FAULT_TARGETS:
            raise ValueError(f"target must be one of {', '.join(FAULT_TARGETS)}, not {target!r}")
        if status is None and hang_s is None and delay_s is None:
            raise ValueError("a fault needs a status, hang_s or delay_s")
        if status is not None and not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        if count is not None and count < 1:
            raise ValueError("count must be at least 1")
        for name, value in (("retry_after", retry_after), ("hang_s", hang_s), ("delay_s", delay_s)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")
        if skip < 0:
            raise ValueError("skip must not be negative")
        fault = Fault(target, status, retry_after, count, hang_s, delay_s, skip)
        with self._lock:
            self._faults[target] = fault
        return fault

    def clear_faults(self, target: str | None = None) -> list[str]:
        with self._lock:
            if target is None:
                cleared = list(self._faults)
            else:
                cleared = [target] if target in self._faults else []
            for name in cleared:
                del self._faults[name]
        return cleared

    def faults(self) -> dict[str, Fault]:
        with self._lock:
            return dict(self._faults)

    def take_fault(self, target: str) -> Fault | None:
        """Consume one use of the fault armed for `target`, if any."""
        with self._lock:
            fault = self._faults.get(target)
            if fault is None:
                return None
            if fault.skip > 0:
                self._faults[target] = replace(fault, skip=fault.skip - 1)
                return None
            if fault.remaining is not None:
                if fault.remaining <= 1:
                    del self._faults[target]
                else:
                    self._faults[target] = replace(fault, remaining=fault.remaining - 1)
            return fault

    # ----------------------------------------------------------------- counters
    def _init_counters(self) -> None:
        self._token_requests: Counter[tuple[str, str]] = Counter()
        self._mi_requests: Counter[tuple[str, str]] = Counter()
        self._arm_calls: Counter[str] = Counter()
        self._keyvault_requests: Counter[tuple[str, str]] = Counter()
        self._score_outcomes: Counter[str] = Counter()
        self._score_auth: Counter[str] = Counter()
        self._discovery_requests = 0
        self._jwks_requests = 0
        self._recent_scores: deque[dict[str, Any]] = deque(maxlen=_RECENT_SCORES)

    def record_discovery(self) -> None:
        with self._lock:
            self._discovery_requests += 1

    def record_jwks(self) -> None:
        with self._lock:
            self._jwks_requests += 1

    def record_token_request(self, client_id: str, scope: str) -> None:
        with self._lock:
            self._token_requests[(client_id, scope)] += 1

    def record_mi_request(self, client_id: str, resource: str) -> None:
        with self._lock:
            self._mi_requests[(client_id, resource)] += 1

    def record_arm_call(self, operation: str) -> None:
        with self._lock:
            self._arm_calls[operation] += 1

    def record_keyvault_request(self, method: str, name: str) -> None:
        with self._lock:
            self._keyvault_requests[(method, name.lower())] += 1

    def keyvault_request_count(self, method: str | None = None, name: str | None = None) -> int:
        with self._lock:
            return sum(
                n
                for (m, s), n in self._keyvault_requests.items()
                if (method is None or m == method) and (name is None or s == name.lower())
            )

    def record_score(self, outcome: str, *, auth: str | None, reason: str | None, request_id: str) -> None:
        """Count a scoring request. `outcome` is "ok" or the status code; `auth` is how it authenticated."""
        with self._lock:
            self._score_outcomes[outcome] += 1
            if auth:
                self._score_auth[auth] += 1
            self._recent_scores.append(
                {
                    "time": time.time(),
                    "outcome": outcome,
                    "auth": auth,
                    "reason": reason,
                    "request_id": request_id,
                }
            )

    def token_request_count(self, client_id: str | None = None, scope: str | None = None) -> int:
        with self._lock:
            return sum(
                n
                for (c, s), n in self._token_requests.items()
                if (client_id is None or c == client_id) and (scope is None or s == scope)
            )

    def mi_request_count(self, client_id: str | None = None, resource: str | None = None) -> int:
        with self._lock:
            return sum(
                n
                for (c, r), n in self._mi_requests.items()
                if (client_id is None or c == client_id) and (resource is None or r == resource)
            )

    def arm_call_count(self, operation: str | None = None) -> int:
        with self._lock:
            return self._arm_calls[operation] if operation else sum(self._arm_calls.values())

    def score_count(self, outcome: str | None = None) -> int:
        with self._lock:
            return self._score_outcomes[outcome] if outcome else sum(self._score_outcomes.values())

    def score_auth_count(self, auth: str) -> int:
        with self._lock:
            return self._score_auth[auth]

    @property
    def discovery_count(self) -> int:
        with self._lock:
            return self._discovery_requests

    @property
    def jwks_count(self) -> int:
        """Requests for the signing keys (JWKS), v1 and v2 paths, any tenant, faulted ones included."""
        with self._lock:
            return self._jwks_requests

    def recent_scores(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._recent_scores)

    def reset_counters(self) -> None:
        with self._lock:
            self._init_counters()
        self.capacity.reset_counters()

    # ----------------------------------------------------------------- admin view
    def config(self) -> dict[str, Any]:
        return {
            "token_lifetime_s": self.token_lifetime_s,
            "refresh_in_s": self.refresh_in_s,
            "mi_token_lifetime_s": self.mi_token_lifetime_s,
            "aml_token_lifetime_s": self.aml_token_lifetime_s,
            "score_delay_s": self.score_delay_s,
            "lro_retry_after_s": self.lro_retry_after_s,
            "lro_polls": self.lro_polls,
            **{name: getattr(self, name) for name in _MISBEHAVIOUR_SETTINGS},
        }

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Set lifetimes/knobs by name (the keys of `config()`); unknown names raise ValueError."""
        allowed = set(self.config())
        unknown = set(settings) - allowed
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        for name, value in settings.items():
            if name in _MISBEHAVIOUR_SETTINGS:
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{name} must be a string or null")
                setattr(self, name, value)
                continue
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
                raise ValueError(f"{name} must be a number or null")
            if value is None and name not in ("refresh_in_s", "mi_token_lifetime_s"):
                raise ValueError(f"{name} must not be null")
            setattr(self, name, value)
        return self.config()

    def snapshot(self, *, recent: int = 50) -> dict[str, Any]:
        """A JSON-serializable view of counters, keys, faults and configuration."""

        def rows(
            counter: Iterable[tuple[tuple[str, str], int]], names: tuple[str, str]
        ) -> list[dict[str, Any]]:
            return [{names[0]: a, names[1]: b, "count": n} for (a, b), n in sorted(counter)]

        with self._lock:
            counters = {
                "token_requests_total": sum(self._token_requests.values()),
                "token_requests": rows(self._token_requests.items(), ("client_id", "scope")),
                "mi_token_requests_total": sum(self._mi_requests.values()),
                "mi_token_requests": rows(self._mi_requests.items(), ("client_id", "resource")),
                "discovery_requests": self._discovery_requests,
                "jwks_requests": self._jwks_requests,
                "arm_calls": {op: self._arm_calls[op] for op in ("listKeys", "token", "regenerateKeys")}
                | dict(self._arm_calls),
                "score_requests_total": sum(self._score_outcomes.values()),
                "score_requests": dict(self._score_outcomes),
                "score_requests_by_auth": dict(self._score_auth),
            }
            recent_scores = list(self._recent_scores)[-recent:] if recent else []
            keys = dict(self._keys)
            faults = {name: fault.to_json() for name, fault in self._faults.items()}
            live_aml_tokens = sum(1 for exp in self._aml_tokens.values() if exp > time.time())
        return {
            "counters": counters,
            "keys": keys,
            "faults": faults,
            "config": self.config(),
            "deployments": self.capacity.snapshot(),
            "live_aml_tokens": live_aml_tokens,
            "recent_scores": recent_scores,
            "apps": [app.public_json() for app in self.apps()],
            "apis": [api.to_json() for api in self.apis.all()],
            "signing_keys": self.signing.kids(),
            "managed_identities": {
                "tenant_id": self.mi_tenant_id,
                "system": self.system_identity.to_json(),
                "user_assigned": [i.to_json() for i in self.user_assigned_identities()],
                "identity_header": self.identity_header,
            },
        }
