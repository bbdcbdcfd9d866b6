"""The configuration file: typed, validated models and the loader that names what is wrong and where."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.egress import NoProxy, parse_proxy_url
from gateway.errors import ConfigError

DEFAULT_CONFIG_PATH = "config/gateway.yaml"
CONFIG_ENV = "GATEWAY_CONFIG"
ADMIN_PATHS = ("/healthz", "/readyz", "/metrics")
MIB = 1024 * 1024

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers the gateway owns on the upstream request; a route may not set them.
_RESERVED_HEADERS = frozenset(
    {"authorization", "host", "content-length", "transfer-encoding", "connection", "x-request-id"}
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnvRef(_Model):
    """`{env: NAME}`: the value of an environment variable."""

    env: str = Field(min_length=1)


class FileRef(_Model):
    """`{file: PATH}`: the content of a file, one trailing newline removed, re-read when it changes."""

    file: str = Field(min_length=1)


class KeyVaultSecretRef(_Model):
    vault: str = Field(
        description="The vault's URL, e.g. https://NAME.vault.azure.net (any https URL: sovereign clouds, "
        "private endpoints)."
    )
    secret: str = Field(
        description="The secret's name; its current (newest) version is used. Key Vault refuses a disabled "
        "current version (403 SecretDisabled) and serves no older one: set a new version instead."
    )

    @field_validator("vault")
    @classmethod
    def _vault(cls, value: str) -> str:
        url = _check_url(value, "vault")
        parts = urlsplit(url)
        if parts.scheme != "https":
            raise ValueError(f"vault must be an https:// URL (it receives a token), got {value!r}")
        return url

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9A-Za-z-]{1,127}", value):
            raise ValueError(f"{value!r} is not a Key Vault secret name (1-127 letters, digits and '-')")
        return value


class KeyVaultRef(_Model):
    """`{keyvault: {vault: URL, secret: NAME}}`: a Key Vault secret, polled for new versions."""

    keyvault: KeyVaultSecretRef


class LiteralRef(_Model):
    """A secret written into the config file itself (allowed, with a start-up warning)."""

    value: SecretStr


def _secret_spec(value: Any) -> Any:
    if isinstance(value, LiteralRef | EnvRef | FileRef | KeyVaultRef):
        return value
    if isinstance(value, str):
        if not value:
            raise ValueError("a secret must not be empty")
        return LiteralRef(value=SecretStr(value))
    if isinstance(value, dict) and len(value) == 1:
        ((key, inner),) = value.items()
        if key in ("env", "file") and isinstance(inner, str) and inner:
            return EnvRef(env=inner) if key == "env" else FileRef(file=inner)
        if key == "keyvault" and isinstance(inner, dict):
            return KeyVaultRef.model_validate(value)
    raise ValueError(
        "expected a string, {env: VARIABLE_NAME}, {file: /path/to/file} or "
        "{keyvault: {vault: https://NAME.vault.azure.net, secret: NAME}}"
    )


def _dump_ref(value: Any) -> Any:
    if isinstance(value, LiteralRef):
        return "**********"
    if isinstance(value, EnvRef | FileRef | KeyVaultRef):
        return value.model_dump()
    return value


SecretSpec = Annotated[
    LiteralRef | EnvRef | FileRef | KeyVaultRef, PlainValidator(_secret_spec), PlainSerializer(_dump_ref)
]


def _header_value(value: Any) -> Any:
    if isinstance(value, str):
        if "\r" in value or "\n" in value:
            raise ValueError("a header value must not contain line breaks")
        return value
    return _secret_spec(value)


# A plain string is an ordinary header value; {env:} and {file:} carry secrets such as API keys.
HeaderValue = Annotated[
    str | EnvRef | FileRef | KeyVaultRef, PlainValidator(_header_value), PlainSerializer(_dump_ref)
]


class ServerTlsConfig(_Model):
    """TLS termination of client connections. The certificate and key are secrets: a changed file is
    used by the next connection, without a restart."""

    cert: SecretSpec = Field(description="PEM certificate chain, server certificate first.")
    key: SecretSpec = Field(description="PEM private key of the certificate.")
    client_ca: str | None = Field(
        None,
        description=(
            "PEM file of the CAs that sign client certificates: set, clients must present one (mutual "
            "TLS), which counts as inbound protection for a non-loopback `host`. A change to the file "
            "applies to new connections within a second; sessions from before it do not resume, and no "
            "session tickets are issued (see docs/kubernetes.md, TLS and mutual TLS)."
        ),
    )
    max_handshakes: int = Field(
        128,
        ge=1,
        description="TLS handshakes a worker lets run at once. A connection beyond it, or beyond "
        "`server.max_connections` (which counts a connection from its accept, handshake included), "
        "takes the place of the oldest unfinished handshake, so idle or slow handshakes cannot keep "
        "clients out or hold memory. A handshake is timed by `server.header_timeout_s`.",
    )


class ServerConfig(_Model):
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on. Loopback by default: a sidecar shares the pod's network.",
    )
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="Worker processes (uvicorn).")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    access_log: bool = Field(True, description="One line per proxied request at level info.")
    max_body_bytes: int = Field(10 * MIB, ge=0, description="Default request body limit (413 above it).")
    replay_buffer_bytes: int = Field(
        2 * MIB, ge=0, description="Request bodies up to this size are kept so they can be re-sent."
    )
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="Total request header size (431 above it).")
    max_header_count: int = Field(100, ge=8, description="Request header count (431 above it).")
    max_url_bytes: int = Field(
        8 * 1024, ge=256, description="Request target (path and query) length (414 above it)."
    )
    max_trailer_bytes: int = Field(
        8 * 1024, ge=0, description="Total size of a chunked request's trailers (431 above it)."
    )
    max_chunk_extension_bytes: int = Field(
        4 * 1024, ge=0, description="Chunk extension bytes before a chunk's data (400 above it)."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest wait for a complete request head, from the connection's opening or the end "
        "of the previous answer (408 client_timeout, or a plain close if nothing arrived).",
    )
    grace_period_s: float = Field(
        25.0, ge=0, description="How long in-flight requests may finish after SIGTERM."
    )
    keepalive_timeout_s: float = Field(5.0, gt=0, description="Idle client connections close after this.")
    client_body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest wait for the first body byte, and longest pause while a client sends its body "
        "(408 client_timeout after it).",
    )
    body_timeout_s: float = Field(
        120.0, gt=0, description="Longest time a client may take to send a whole request body (408 after it)."
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="Client connections a worker holds at once, counted from the TCP accept (over TLS, "
        "handshakes in progress included); more are answered 503 by the server. Over TLS a connection "
        "beyond it takes the place of the oldest unfinished handshake, or, with none, is closed at once.",
    )
    allow_unauthenticated_remote: bool = Field(
        False, description="Allow a non-loopback host without inbound protection. Think twice."
    )
    send_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A client that reads none of the answer for this long is disconnected and its "
        "upstream request aborted.",
    )
    tls: ServerTlsConfig | None = Field(
        None, description="Serve HTTPS instead of HTTP, on every listener (host:port and `uds`)."
    )
    uds: str | None = Field(
        None,
        description="Also listen on this Unix domain socket path (created with mode 0660: the gateway's "
        "user and group may connect). Its clients have no address, so `inbound.allow_cidrs` refuses them; "
        "`inbound.api_keys` applies as on TCP. The gateway refuses to start while another process listens "
        "on the path, replaces a stale socket file, and at exit removes the file only if it is still the "
        "one it created.",
    )
    tcp: bool = Field(True, description="Listen on host:port; false serves the `uds` socket only.")

    @model_validator(mode="after")
    def _some_listener(self) -> ServerConfig:
        if not self.tcp and self.uds is None:
            raise ValueError("`tcp: false` needs `uds: /path/to/socket`: the gateway must listen somewhere")
        return self


class ApiKeyHash(_Model):
    name: str = Field("client", description="Who holds the key; appears in logs, never the key.")
    sha256: str = Field(description="Hex SHA-256 of the key: `printf %s KEY | sha256sum`.")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be 64 hex digits (the SHA-256 of the key, not the key itself)")
        return value.lower()


class RatePolicyConfig(_Model):
    """A request rate for one caller: `burst` requests at once, refilled at `requests_per_s` (a GCRA,
    the continuous form of a token bucket)."""

    requests_per_s: float = Field(
        gt=0, allow_inf_nan=False, description="Sustained requests per second allowed to one caller."
    )
    burst: int | None = Field(
        None,
        ge=1,
        description="Requests one caller may send at once after a quiet spell. Default: one second's worth "
        "(`requests_per_s` rounded up).",
    )

    @property
    def burst_requests(self) -> int:
        return self.burst if self.burst is not None else max(1, math.ceil(self.requests_per_s))


def _caller_names(value: dict[str, RatePolicyConfig]) -> dict[str, RatePolicyConfig]:
    names: dict[str, RatePolicyConfig] = {}
    for name, rate in value.items():
        if not name or len(name) > 256 or not name.isprintable():
            raise ValueError(f"{name!r} is not a caller name (1-256 printable characters)")
        # App ids are GUIDs, which tokens may spell in either case: callers are counted in lower case.
        key = "app:" + name[4:].lower() if name[:4].lower() == "app:" else name
        if key in names:
            raise ValueError(f"{name!r} is named twice (app ids are compared in lower case)")
        names[key] = rate
    return names


class CallerLimitsConfig(_Model):
    """Per-caller request rates. A caller is who `inbound` recognised: `app:<id>` (Entra ID app),
    `key:<name>` (an `inbound.api_keys` entry), `cert:<subject CN>` (client certificate); an anonymous
    caller is counted by its client address. Refused: 429 `rate_limited` with `Retry-After`,
    `RateLimit-Policy` and `RateLimit`; a refused request consumes no quota."""

    per_caller: RatePolicyConfig | None = Field(
        None, description="The rate each caller gets separately. Unset: only the callers under `callers`."
    )
    callers: dict[str, RatePolicyConfig] = Field(
        default_factory=dict,
        description='Rates for named callers instead of `per_caller`, e.g. `{"app:1b2c...": '
        '{requests_per_s: 50}, "10.1.2.3": {requests_per_s: 1}}` (an anonymous caller by its address).',
    )

    _names = field_validator("callers")(_caller_names)

    @property
    def limits_callers(self) -> bool:
        return self.per_caller is not None or bool(self.callers)


_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")


class EntraIdConfig(_Model):
    """Callers authenticate with Microsoft Entra ID access tokens (`Authorization: Bearer <token>`, what
    every Azure SDK credential sends for the gateway's scope): a managed identity, a workload identity or
    a service principal. The gateway validates the token (RS256 signature with the tenant's published
    signing keys, audience, issuer, tenant, lifetime) and never forwards it. See [callers](callers.md)."""

    tenant_id: str = Field(
        description="Directory (tenant) ID of the gateway's app registration, the GUID tokens carry in "
        "`tid`. Its signing keys are read at start-up from "
        "`{authority}/{tenant_id}/v2.0/.well-known/openid-configuration`."
    )
    audiences: list[str] = Field(
        min_length=1,
        description="Accepted `aud` values: the gateway app's application ID URI (e.g. "
        "`api://scoring-gateway`: v1 tokens carry it when callers ask for `api://scoring-gateway/.default`) "
        "and/or its application (client) ID (what v2 tokens always carry).",
    )
    authority: str = Field(
        "https://login.microsoftonline.com",
        description="Entra ID's https origin: `https://login.microsoftonline.us` (US Government), "
        "`https://login.chinacloudapi.cn` (China), or the emulator's HTTPS origin.",
    )
    clock_skew_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="Leeway for `exp` and `nbf` against this host's clock: a token is accepted until `exp` "
        "plus this, and from `nbf` minus this.",
    )
    allowed_tenants: list[str] | None = Field(
        None,
        description="Tenants whose tokens are accepted (multi-tenant callers), `tenant_id` among them; each "
        "one's signing keys are read from its own discovery document. Unset: `tenant_id` only.",
    )

    @field_validator("tenant_id")
    @classmethod
    def _tenant(cls, value: str) -> str:
        return _check_tenant(value)

    @field_validator("audiences")
    @classmethod
    def _audiences(cls, value: list[str]) -> list[str]:
        for audience in value:
            if not audience.strip() or audience != audience.strip():
                raise ValueError(f"{audience!r} is not an audience (an application ID URI or client ID)")
        return value

    @field_validator("authority")
    @classmethod
    def _authority(cls, value: str) -> str:
        url = _check_url(value, "authority")
        if urlsplit(url).scheme != "https":
            raise ValueError(
                f"authority must be an https:// URL (the signing keys come from it), got {value!r}"
            )
        return url

    @field_validator("allowed_tenants")
    @classmethod
    def _tenants(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("list at least `tenant_id`, or leave `allowed_tenants` out")
        return [_check_tenant(tenant) for tenant in value]

    @model_validator(mode="after")
    def _home_tenant_allowed(self) -> EntraIdConfig:
        if self.allowed_tenants is not None and self.tenant_id not in self.allowed_tenants:
            raise ValueError(
                f"allowed_tenants must include tenant_id ({self.tenant_id}): it lists every tenant whose "
                "tokens are accepted"
            )
        return self

    def tenants(self) -> tuple[str, ...]:
        """Every accepted tenant, `tenant_id` first, each once (lower case, as tokens' `tid`)."""
        return tuple(dict.fromkeys([self.tenant_id, *(self.allowed_tenants or ())]))


def _check_tenant(value: str) -> str:
    if not _TENANT.match(value) or value.lower() in ("common", "organizations", "consumers"):
        raise ValueError(
            f"{value!r} is not a tenant: give the directory (tenant) ID, a GUID such as "
            "72f988bf-86f1-41af-91ab-2d7cd011db47"
        )
    return value.lower()


class InboundConfig(_Model):
    """Who may use the gateway. Admin endpoints (/healthz, /readyz, /metrics) are always open."""

    allow_cidrs: list[str] = Field(default_factory=list, description="Client networks allowed (empty: any).")
    api_keys: list[ApiKeyHash] = Field(default_factory=list, description="Keys clients must present.")
    api_key_header: str = Field("x-gateway-key", description="Header that carries the client's key.")
    limits: CallerLimitsConfig = Field(
        default_factory=CallerLimitsConfig,  # type: ignore[arg-type]
        description="Per-caller request rates across all routes (checked with the route's own, together).",
    )
    entra_id: EntraIdConfig | None = Field(
        None,
        description="Callers identify themselves with Entra ID access tokens; counts as inbound protection "
        "for a non-loopback `server.host`. See [callers](callers.md).",
    )

    @field_validator("allow_cidrs")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP network such as 10.0.0.0/8 or 127.0.0.1/32"
                ) from None
        return value

    @field_validator("api_key_header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not _HEADER_NAME.match(value) or value.lower() in _RESERVED_HEADERS:
            raise ValueError(f"{value!r} cannot be used as the API key header")
        return value.lower()

    @property
    def enabled(self) -> bool:
        return bool(self.allow_cidrs or self.api_keys)


class TlsConfig(_Model):
    ca_bundle: str | None = Field(
        None,
        description="PEM file of CAs trusted in addition to the system ones, for every outbound connection.",
    )


class EgressConfig(_Model):
    """The forward proxy for every outbound connection: upstreams, Entra ID, the App Service identity
    endpoint and ARM (the instance metadata service, and an identity endpoint on a loopback or
    link-local address, are always direct). Unset keys fall back to the
    environment: `https_proxy`/`HTTPS_PROXY` for https origins, `http_proxy`/`HTTP_PROXY` for http
    ones, `no_proxy`/`NO_PROXY` (lower case first, as curl)."""

    proxy: str | None = Field(
        None,
        description=(
            "`http://host:port` of the proxy (https origins go through a CONNECT tunnel, http ones in "
            "absolute form), or `none` for no proxy whatever the environment says. Unset: the "
            "environment's variables."
        ),
    )
    no_proxy: list[str] | None = Field(
        None,
        description=(
            "Origins reached directly: host names (which cover their subdomains), domain suffixes such "
            "as `.internal`, IP addresses, CIDRs, or `*`. Loopback is proxied unless listed: add "
            "`localhost` and `127.0.0.1`. Unset: `NO_PROXY`."
        ),
    )
    proxy_auth: SecretSpec | None = Field(
        None,
        description="`user:password` sent to the proxy as Basic `Proxy-Authorization`; a secret. From Key "
        "Vault it is read before the proxy has credentials: list the vault in `no_proxy`, or let the proxy "
        "pass it unauthenticated.",
    )

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, value: str | None) -> str | None:
        if value is None or value == "none":
            return value
        try:
            parse_proxy_url(value, "proxy", environment=False)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("proxy: ")) from None
        return value

    @field_validator("no_proxy")
    @classmethod
    def _no_proxy(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        for entry in value:
            NoProxy.check(entry)  # ValueError says what is wrong
        return value

    @model_validator(mode="after")
    def _auth_needs_a_proxy(self) -> EgressConfig:
        if self.proxy == "none" and self.proxy_auth is not None:
            raise ValueError("`proxy_auth` is for a proxy; `proxy: none` uses none")
        return self


class OtelConfig(_Model):
    """OpenTelemetry tracing: one SERVER span per proxied request, continuing the client's W3C trace
    context and passed on to the upstream in `traceparent`. Needs the `otel` extra
    (`pip install 'scoring-gateway[otel]'`); the SDK's `OTEL_*` variables (sampler, resource
    attributes, OTLP headers) apply. Read at start-up only: a reload keeps the running tracing."""

    enabled: bool = Field(
        False, description="Trace proxied requests. Off: OpenTelemetry is not even imported."
    )
    service_name: str = Field(
        "scoring-gateway", min_length=1, description="`service.name` of the spans' resource."
    )
    exporter: Literal["none", "console", "otlp"] = Field(
        "none",
        description=(
            "Where finished spans go. `none`: nowhere (the upstream still sees the gateway's span as its "
            "parent); `console`: JSON on standard output; `otlp`: OTLP over HTTP, which also needs "
            "`pip install 'scoring-gateway[otlp]'`."
        ),
    )
    otlp_endpoint: str | None = Field(
        None,
        description=(
            "OTLP/HTTP traces URL, e.g. `http://otel-collector:4318/v1/traces`. Unset: "
            "`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `http://localhost:4318/v1/traces`. "
            "`tls.ca_bundle` does not apply (use `OTEL_EXPORTER_OTLP_CERTIFICATE`)."
        ),
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, "otlp_endpoint")

    @model_validator(mode="after")
    def _endpoint_needs_otlp(self) -> OtelConfig:
        if self.otlp_endpoint is not None and self.exporter != "otlp":
            raise ValueError("`otlp_endpoint` is only used with `exporter: otlp`")
        return self


class TelemetryConfig(_Model):
    otel: OtelConfig = Field(
        default_factory=OtelConfig,  # type: ignore[arg-type]
        description="OpenTelemetry tracing (optional; off by default).",
    )


class CertificateConfig(_Model):
    private_key: SecretSpec
    certificate: SecretSpec


class ManagedIdentityRef(_Model):
    client_id: str | None = None
    resource_id: str | None = None

    @model_validator(mode="after")
    def _one_id(self) -> ManagedIdentityRef:
        if (self.client_id is None) == (self.resource_id is None):
            raise ValueError("a user-assigned managed identity needs exactly one of client_id or resource_id")
        return self


class IdentityConfig(_Model):
    """How the gateway proves who it is to Microsoft Entra ID. Unset fields fall back to AZURE_* variables."""

    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: SecretSpec | None = None
    certificate: CertificateConfig | None = None
    federated_token_file: str | None = None
    managed_identity: Literal["system"] | ManagedIdentityRef | None = None
    authority_host: str | None = None
    timeout_s: float = Field(10.0, gt=0, description="Timeout of one call to the identity provider.")

    @model_validator(mode="after")
    def _one_credential(self) -> IdentityConfig:
        given = [
            name
            for name in ("client_secret", "certificate", "federated_token_file", "managed_identity")
            if getattr(self, name) is not None
        ]
        if len(given) > 1:
            raise ValueError(
                f"give only one of client_secret, certificate, federated_token_file, "
                f"managed_identity (found {', '.join(given)})"
            )
        return self


class EndpointRef(_Model):
    """An Azure ML online endpoint in the control plane."""

    subscription_id: str = Field(min_length=1)
    resource_group: str = Field(min_length=1)
    workspace: str = Field(min_length=1)
    name: str = Field(min_length=1)


class NoneAuth(_Model):
    type: Literal["none"]


def _check_reject_statuses(value: tuple[int, ...]) -> tuple[int, ...]:
    for status in value:
        if not 400 <= status <= 499:
            raise ValueError(f"{status} is not a 4xx status: only a refusal can mean a bad credential")
    return value


# When the upstream's answers declare a credential rejected (readiness, error log, metric): the same
# three keys on every auth type that holds a credential. A tuple, so that the auth config stays hashable.
RejectStatuses = Annotated[tuple[int, ...], AfterValidator(_check_reject_statuses)]
_REJECT_STATUSES = Field(
    (401,),
    description="Upstream statuses that mean the credential was refused: the request is replayed with "
    "another key or a fresh token.",
)
_REJECT_AFTER = Field(
    3, ge=1, description="Refusals in this many distinct requests declare a key or token rejected..."
)
_REJECT_WINDOW_S = Field(
    60.0, gt=0, description="...when they fall within this many seconds with no acceptance in between."
)


class KeyAuth(_Model):
    type: Literal["key"]
    primary: SecretSpec | None = None
    secondary: SecretSpec | None = None
    recheck_after_s: float = Field(300.0, gt=0, description="When a rejected key is tried again.")
    reject_statuses: RejectStatuses = _REJECT_STATUSES
    reject_after: int = _REJECT_AFTER
    reject_window_s: float = _REJECT_WINDOW_S
    from_endpoint: EndpointRef | None = Field(None, description="Fetch the keys with listKeys instead.")
    endpoint: EndpointRef | None = Field(
        None,
        description="The Azure ML endpoint whose keys `primary`/`secondary` hold, so that `gateway rotate` "
        "can regenerate them (keys from Key Vault or files).",
    )
    identity: IdentityConfig | None = None
    arm_url: str = "https://management.azure.com"
    api_version: str = "2023-04-01"
    refresh_every_s: float = Field(
        900.0, gt=0, description="How often keys are fetched from the control plane."
    )
    probe_path: str | None = Field(
        None,
        description="Path (on the origin of the route's preferred upstream) the gateway GETs with a key "
        "that client requests keep getting refused with, before it declares the key rejected: 2xx clears "
        "the key, a `reject_statuses` answer declares it, anything else leaves the refusals to decide. "
        "Unset: `swagger.json` beside the scoring URI, which Azure ML answers 401 to a wrong key.",
    )

    @field_validator("probe_path")
    @classmethod
    def _probe_path(cls, value: str | None) -> str | None:
        if value is not None and (
            not value.startswith("/") or value.startswith("//") or any(c in value for c in " #\r\n\\")
        ):
            raise ValueError(
                f"{value!r} is not a path such as /swagger.json (the key goes only to the upstream)"
            )
        return value

    @model_validator(mode="after")
    def _keys_or_endpoint(self) -> KeyAuth:
        if self.from_endpoint is None:
            if self.primary is None:
                raise ValueError(
                    "a key route needs `primary` (and optionally `secondary`), or `from_endpoint`"
                )
            if self.identity is not None and self.endpoint is None:
                raise ValueError("`identity` is only used with `from_endpoint` or `endpoint`")
        elif self.endpoint is not None:
            raise ValueError(
                "`endpoint` is for keys given as `primary`/`secondary`; `from_endpoint` names it"
            )
        elif self.primary is not None or self.secondary is not None:
            raise ValueError("give either literal keys (`primary`/`secondary`) or `from_endpoint`, not both")
        return self


class AadTokenAuth(_Model):
    type: Literal["aad_token"]
    identity: IdentityConfig = Field(default_factory=IdentityConfig)  # type: ignore[arg-type]
    scope: str = "https://ml.azure.com/.default"
    reject_statuses: RejectStatuses = _REJECT_STATUSES
    reject_after: int = _REJECT_AFTER
    reject_window_s: float = _REJECT_WINDOW_S


class AmlTokenAuth(_Model):
    type: Literal["aml_token"]
    identity: IdentityConfig = Field(default_factory=IdentityConfig)  # type: ignore[arg-type]
    endpoint: EndpointRef
    arm_url: str = "https://management.azure.com"
    api_version: str = "2023-04-01"
    reject_statuses: RejectStatuses = _REJECT_STATUSES
    reject_after: int = _REJECT_AFTER
    reject_window_s: float = _REJECT_WINDOW_S


AuthConfig = Annotated[NoneAuth | KeyAuth | AadTokenAuth | AmlTokenAuth, Field(discriminator="type")]


class UpstreamConfig(_Model):
    url: str
    priority: int = Field(0, description="Lower is preferred; equal priorities share traffic by weight.")
    weight: int = Field(1, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, "url")


class RetryConfig(_Model):
    attempts: int = Field(3, ge=1, le=10, description="Upstream attempts per request, the first included.")
    on_statuses: list[int] = Field(
        default_factory=lambda: [429, 502, 503],
        description="Upstream error statuses (4xx, 5xx) replayed (429 and 503 honour Retry-After); never "
        "424; 504 and 408 through `on_timeouts`, not here.",
    )
    on_connection_errors: bool = Field(
        True, description="Replay when the connection failed before any byte of the request was sent."
    )
    on_timeouts: bool = Field(
        False,
        description="Also replay after a timeout, 504 or 408: the model may still be working on the request.",
    )
    on_connection_lost: bool = Field(
        False,
        description="Also replay when the connection failed after the request was sent (it may have run).",
    )
    backoff_base_s: float = Field(0.05, ge=0)
    backoff_max_s: float = Field(2.0, ge=0)
    retry_after_cap_s: float = Field(
        5.0, ge=0, description="Longest Retry-After the gateway waits out itself."
    )
    budget_ratio: float = Field(
        0.2, ge=0, le=1, description="Retries beyond min_retries_per_s: this fraction of the requests (10 s)."
    )
    deadline_s: float | None = Field(None, gt=0, description="Whole-request deadline across attempts.")
    min_retries_per_s: float = Field(
        10.0, ge=0, description="Retries always allowed per second, whatever budget_ratio says."
    )

    @field_validator("on_statuses")
    @classmethod
    def _error_statuses_never_424(cls, value: list[int]) -> list[int]:
        for status in value:
            if not 400 <= status <= 599:
                # A replayed 2xx or 3xx would run a request again that the upstream answered.
                raise ValueError(
                    f"{status} is not an error status: only 4xx and 5xx answers can be replayed, "
                    "e.g. [429, 502, 503]"
                )
        if 424 in value:
            raise ValueError(
                "424 means the model itself failed (score.py raised or the container crashed); replaying "
                "it fails again: remove 424"
            )
        return value

    @model_validator(mode="after")
    def _timeout_statuses_with_on_timeouts(self) -> RetryConfig:
        named = sorted(set(self.on_statuses) & {408, 504}, reverse=True)
        if named and not self.on_timeouts:
            # One switch decides "the model may still be working on it": listed here without it, a
            # 504 would be replayed while a timeout of the same request would not.
            raise ValueError(
                f"on_statuses lists {' and '.join(map(str, named))}: 504 and 408 are replayed by "
                "retry.on_timeouts (the model may still be working on the request): remove them from "
                "on_statuses and set on_timeouts: true to replay them"
            )
        return self


class OutlierConfig(_Model):
    consecutive_failures: int = Field(5, ge=1)
    ejection_s: float = Field(30.0, gt=0)
    probe_timeout_s: float = Field(
        10.0, gt=0, description="A probe without a verdict by then stops holding back the other requests."
    )


class RouteLimitsConfig(CallerLimitsConfig):
    """What the route admits: requests in flight to its upstreams (`max_concurrent`, with a queue) and
    each caller's request rate. Checked before the request body is read: a refused request costs no
    upload, is never retried and never counts against an upstream. See docs/limits.md."""

    max_concurrent: int | Literal["auto"] | None = Field(
        None,
        description="Requests in flight to the route's upstreams at once, per gateway process; more wait in "
        "the queue, then get 503 `route_busy`. For Azure ML: `instances x "
        "max_concurrent_requests_per_instance`, divided by the gateway processes sharing the endpoint. "
        "`auto`: follow the endpoint, between `min` and `max`. Unset: no limit.",
    )
    min: int | None = Field(
        None,
        ge=1,
        description="With `max_concurrent: auto`: the lowest limit, also the first one. Default 1.",
    )
    max: int | None = Field(
        None,
        ge=1,
        description="With `max_concurrent: auto`: the highest limit. Default: the route's `max_connections`.",
    )
    queue: int = Field(
        0,
        ge=0,
        description="Requests that may wait for a slot, first come first served; beyond it 503 `route_busy` "
        "at once.",
    )
    queue_timeout_s: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="Longest wait in the queue (shorter when the request's deadline, `retry.deadline_s` or "
        "`timeout_s`, comes first); then 503 `route_busy`.",
    )

    @field_validator("max_concurrent", mode="before")
    @classmethod
    def _static_or_auto(cls, value: Any) -> Any:
        if isinstance(value, bool) or (not isinstance(value, int) and value not in (None, "auto")):
            raise ValueError(f"must be a number of requests or `auto`, got {value!r}")
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (leave it unset for no limit)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RouteLimitsConfig:
        if self.max_concurrent != "auto" and (self.min is not None or self.max is not None):
            raise ValueError("`min` and `max` bound `max_concurrent: auto`; a fixed limit has neither")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"`min` ({self.min}) is above `max` ({self.max})")
        if self.max_concurrent is None and (self.queue or "queue_timeout_s" in self.model_fields_set):
            raise ValueError(
                "`queue` and `queue_timeout_s` need `max_concurrent`: nothing waits without a limit"
            )
        if self.queue == 0 and "queue_timeout_s" in self.model_fields_set:
            raise ValueError("`queue_timeout_s` needs `queue` above 0: with no queue a request never waits")
        return self


class CallerRulesConfig(_Model):
    """Who is meant: a caller matches when it matches any one entry of any list."""

    app_ids: list[str] = Field(
        default_factory=list,
        description="Application (client) IDs of Entra ID callers (`appid` of v1 tokens, `azp` of v2 "
        "tokens; a managed identity's client ID). Needs `inbound.entra_id`.",
    )
    roles: list[str] = Field(
        default_factory=list,
        description="App roles, e.g. `Scoring.Invoke`: an Entra ID caller matches when its token's `roles` "
        "(the gateway app's roles assigned to it) hold any of them. Needs `inbound.entra_id`.",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Names of keys in `inbound.api_keys`: a client that sent one of these keys.",
    )
    cert_subjects: list[str] = Field(
        default_factory=list,
        description="Common names (CN) of client certificates (mutual TLS). Needs `server.tls.client_ca`, "
        "and neither `inbound.api_keys` nor `inbound.entra_id` (with them a key or token names the caller).",
    )

    @field_validator("app_ids", "roles", "api_keys", "cert_subjects")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or name != name.strip():
                raise ValueError(f"{name!r} is not a name (empty, or spaces around it)")
        return value

    @field_validator("app_ids")
    @classmethod
    def _app_ids(cls, value: list[str]) -> list[str]:
        return [app_id.lower() for app_id in value]  # GUIDs: tokens may spell them in either case

    def is_empty(self) -> bool:
        return not (self.app_ids or self.roles or self.api_keys or self.cert_subjects)


class RouteCallersConfig(CallerRulesConfig):
    """Which callers may use the route: a request is allowed when its caller matches any entry; other
    callers get 403 `caller_not_allowed`. Without `callers`, every caller that passes `inbound` may.
    Lists left empty here (only `may_pin_deployment` given) let every caller in."""

    may_pin_deployment: CallerRulesConfig | None = Field(
        None,
        description="Callers whose `azureml-model-deployment` header reaches the upstream (same keys as "
        "above). For everyone else the route's own `headers` entry (or none) applies. Unset: nobody may "
        "choose the deployment.",
    )

    @model_validator(mode="after")
    def _some_rule(self) -> RouteCallersConfig:
        if self.is_empty() and (self.may_pin_deployment is None or self.may_pin_deployment.is_empty()):
            raise ValueError(
                "`callers` names nobody: list app_ids, roles, api_keys or cert_subjects (or remove "
                "`callers` to let every caller in)"
            )
        if self.may_pin_deployment is not None and self.may_pin_deployment.is_empty():
            raise ValueError(
                "`may_pin_deployment` names nobody: list app_ids, roles, api_keys or cert_subjects (or "
                "remove it: then nobody may choose the deployment)"
            )
        return self

    def rule_sets(self) -> tuple[CallerRulesConfig, ...]:
        return (self,) if self.may_pin_deployment is None else (self, self.may_pin_deployment)


class RouteConfig(_Model):
    path: str
    upstream: str | None = None
    upstreams: list[UpstreamConfig] | None = None
    timeout_s: float = Field(60.0, gt=0, description="Total time for one upstream attempt.")
    connect_timeout_s: float = Field(
        5.0, gt=0, description="Longest time to open an upstream connection (TCP, TLS and proxy CONNECT)."
    )
    headers: dict[str, HeaderValue] = Field(default_factory=dict)
    auth: AuthConfig
    max_body_bytes: int | None = Field(None, ge=0, description="Overrides server.max_body_bytes.")
    replay_buffer_bytes: int | None = Field(None, ge=0, description="Overrides server.replay_buffer_bytes.")
    read_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Longest silence of the upstream while its answer (head or body) is awaited; every "
        "byte resets it, so a streamed answer that makes progress is never cut. Default: `timeout_s`.",
    )
    write_timeout_s: float = Field(
        30.0, gt=0, description="Longest stall while the request is sent (the upstream stops reading it)."
    )
    pool_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Longest wait for a pooled connection when all `max_connections` are busy; after it "
        "503 overloaded with Retry-After (never retried, never counted against the upstream).",
    )
    max_connections: int = Field(
        256,
        ge=1,
        description="Pooled upstream connections for this route, to each of its upstream origins (its own, "
        "whatever other routes reach the same origin). A reload that changes it closes the route's "
        "connections, the busy ones once their requests are done.",
    )
    limits: RouteLimitsConfig = Field(
        default_factory=RouteLimitsConfig,  # type: ignore[arg-type]
        description="Admission: requests in flight (with a queue) and per-caller request rates.",
    )
    retry: RetryConfig = Field(default_factory=RetryConfig)  # type: ignore[arg-type]
    outlier: OutlierConfig = Field(default_factory=OutlierConfig)  # type: ignore[arg-type]
    callers: RouteCallersConfig | None = Field(
        None,
        description="Which callers may use this route, and which may choose its deployment. Unset: every "
        "caller that passes `inbound`; nobody may choose the deployment. See [callers](callers.md).",
    )

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("max_concurrent_requests" in data or "queue_timeout_s" in data):
            limit = data.get("max_concurrent_requests", "N")
            wait = data.get("queue_timeout_s", 1.0)
            # The old keys queued as many requests as the limit allowed in flight.
            raise ValueError(
                "`max_concurrent_requests` and `queue_timeout_s` were replaced by `limits`; write "
                f"`limits: {{max_concurrent: {limit}, queue: {limit}, queue_timeout_s: {wait}}}` instead "
                "(docs/limits.md)"
            )
        return data

    @model_validator(mode="after")
    def _one_upstream_form(self) -> RouteConfig:
        if (self.upstream is None) == (self.upstreams is None):
            raise ValueError("give either `upstream: URL` or `upstreams: [{url: ...}, ...]`")
        if self.upstreams is not None and not self.upstreams:
            raise ValueError("`upstreams` must list at least one upstream")
        limit = self.limits.max if self.limits.max_concurrent == "auto" else self.limits.max_concurrent
        if isinstance(limit, int) and limit > self.max_connections:
            raise ValueError(
                f"`limits` allows {limit} requests in flight but `max_connections` is "
                f"{self.max_connections}: the extra ones would wait for a connection; lower the limit or "
                "raise `max_connections`"
            )
        return self

    def upstream_list(self) -> list[UpstreamConfig]:
        if self.upstreams is not None:
            return list(self.upstreams)
        assert self.upstream is not None
        return [UpstreamConfig(url=self.upstream)]  # type: ignore[call-arg]

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        if any(c in value for c in "?#%\\ \t") or "//" in value:
            raise ValueError("must be a plain path without '?', '#', '%', '\\', spaces or '//'")
        if any(segment in (".", "..") for segment in value.split("/")):
            raise ValueError("must not contain '.' or '..' segments")
        stripped = value.rstrip("/") or "/"
        for admin in ADMIN_PATHS:
            if stripped == "/" or admin == stripped or admin.startswith(stripped + "/"):
                raise ValueError(f"would shadow the admin endpoint {admin}; choose another prefix")
        return stripped

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, "upstream")

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"{name!r} is set by the gateway itself and cannot be configured")
        return value


def _check_url(value: str, what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an absolute http:// or https:// URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"{what} must not have a query string or fragment")
    if parts.username or parts.password:
        raise ValueError(f"{what} must not carry credentials in the URL")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port range only when it is read
    except ValueError:
        raise ValueError(f"{what} has an invalid port (1-65535), got {value!r}") from None
    return value.rstrip("/")


class KeyVaultConfig(_Model):
    """How `{keyvault: ...}` secrets are read: who the gateway is to Key Vault, and how often it polls."""

    identity: IdentityConfig | None = Field(
        None,
        description="Who reads the secrets (same keys as a route's `identity`). Unset: the AZURE_* "
        "variables (workload identity, a client secret or certificate).",
    )
    scope: str = Field(
        "https://vault.azure.net/.default",
        description="Token scope; sovereign clouds: https://vault.usgovcloudapi.net/.default, "
        "https://vault.azure.cn/.default.",
    )
    refresh_every_s: float = Field(
        60.0, gt=0, description="How often each secret is polled for a new version (one request per secret)."
    )
    api_version: str = Field("7.4", description="Key Vault REST API version.")
    timeout_s: float = Field(
        10.0,
        gt=0,
        description="Timeout of one Key Vault request; a reload whose new secret is not read within it is "
        "refused (the running configuration stays).",
    )


class RedisStoreConfig(_Model):
    """Redis holding the per-caller rate counters, so every replica of the gateway counts one quota."""

    url: SecretSpec = Field(
        description="`redis://[[user]:password@]host[:port][/db]`, or `rediss://` for TLS verified with the "
        "gateway's trust (`tls.ca_bundle` plus the system CAs). A secret: `{env: NAME}`, `{file: PATH}`, "
        "`{keyvault: ...}` or a literal (which may hold no password)."
    )
    key_prefix: str = Field(
        "scoring-gateway:",
        min_length=1,
        max_length=128,
        description="Prefix of every key the gateway writes; gateways that must not share quotas need "
        "different prefixes.",
    )
    timeout_ms: int = Field(
        50,
        ge=1,
        le=10_000,
        description="Longest a request waits for Redis; after it, and while Redis is down, the request is "
        "decided locally.",
    )
    expected_replicas: int = Field(
        ge=1,
        description="How many gateway processes share the quotas (replicas x workers). While Redis is "
        "unreachable each process allows each caller 1/`expected_replicas` of its rate and burst.",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: Any) -> Any:
        if isinstance(value, LiteralRef):
            check_redis_url(value.value.get_secret_value())
        return value


def check_redis_url(url: str) -> None:
    """Raise ValueError (never quoting the URL: it may hold a password) unless `url` is a Redis URL the
    gateway can use."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("the Redis URL is malformed (check the port)") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("the Redis URL must be redis://host[:port][/db] or rediss://... (TLS)")
    if parts.query or parts.fragment:
        raise ValueError("the Redis URL must not have query parameters or a fragment")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError("the Redis URL's path must be a database number, e.g. /0")
    if port == 0:
        raise ValueError("the Redis URL's port must be 1-65535")


class LimitsStoreConfig(_Model):
    """Where per-caller rate limits are counted. Unset: in each gateway process on its own."""

    redis: RedisStoreConfig = Field(description="Count them in Redis, shared by every replica.")


class GatewayConfig(_Model):
    server: ServerConfig = Field(default_factory=ServerConfig)  # type: ignore[arg-type]
    tls: TlsConfig = Field(default_factory=TlsConfig)  # type: ignore[arg-type]
    inbound: InboundConfig = Field(default_factory=InboundConfig)  # type: ignore[arg-type]
    telemetry: TelemetryConfig = Field(
        default_factory=TelemetryConfig,
        description="Telemetry beyond logs and `/metrics`: OpenTelemetry tracing.",
    )
    egress: EgressConfig = Field(
        default_factory=EgressConfig,  # type: ignore[arg-type]
        description="Forward proxy for outbound connections (default: the environment's proxy variables).",
    )
    routes: dict[str, RouteConfig] = Field(min_length=1)
    keyvault: KeyVaultConfig = Field(
        default_factory=KeyVaultConfig,  # type: ignore[arg-type]
        description="Key Vault access for `{keyvault: ...}` secrets.",
    )
    limits_store: LimitsStoreConfig | None = Field(
        None,
        description="A store shared by the replicas for per-caller rate limits (`inbound.limits`, "
        "`routes.NAME.limits`). Unset: each gateway process counts alone.",
    )

    @field_validator("routes")
    @classmethod
    def _route_names(cls, value: dict[str, RouteConfig]) -> dict[str, RouteConfig]:
        seen: dict[str, str] = {}
        for name, route in value.items():
            if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", name):
                raise ValueError(f"route name {name!r} may only use letters, digits, '_', '.', '-'")
            if route.path in seen:
                raise ValueError(
                    f"routes {seen[route.path]!r} and {name!r} have the same path {route.path!r}"
                )
            seen[route.path] = name
        return value

    @field_validator("routes")
    @classmethod
    def _route_callers(cls, value: dict[str, RouteConfig], info: ValidationInfo) -> dict[str, RouteConfig]:
        inbound, server = info.data.get("inbound"), info.data.get("server")
        if not isinstance(inbound, InboundConfig) or not isinstance(server, ServerConfig):
            return value  # their own errors are reported; these checks need both
        key_names = sorted({key.name for key in inbound.api_keys})
        problems: list[str] = []
        for name, route in value.items():
            if route.callers is None:
                continue
            for rules, where in zip(
                route.callers.rule_sets(),
                (f"{name}.callers", f"{name}.callers.may_pin_deployment"),
                strict=False,
            ):
                problems.extend(_caller_rule_problems(rules, where, inbound, server, key_names))
        if problems:
            raise ValueError("; ".join(problems))
        return value

    def has_inbound_protection(self) -> bool:
        """Whether every proxied request must prove something about its client: an allowed network, an
        API key, an Entra ID token or a client certificate (what a non-loopback listener needs)."""
        inbound = self.inbound
        mutual_tls = self.server.tls is not None and self.server.tls.client_ca is not None
        return bool(inbound.allow_cidrs or inbound.api_keys or inbound.entra_id is not None or mutual_tls)

    def max_body_bytes(self, route: RouteConfig) -> int:
        return self.server.max_body_bytes if route.max_body_bytes is None else route.max_body_bytes

    def replay_buffer_bytes(self, route: RouteConfig) -> int:
        return (
            self.server.replay_buffer_bytes
            if route.replay_buffer_bytes is None
            else route.replay_buffer_bytes
        )


def _caller_rule_problems(
    rules: CallerRulesConfig, where: str, inbound: InboundConfig, server: ServerConfig, key_names: list[str]
) -> list[str]:
    problems: list[str] = []
    if inbound.entra_id is None:
        for field in ("app_ids", "roles"):
            if getattr(rules, field):
                problems.append(
                    f"{where}.{field}: needs `inbound.entra_id` (app ids and roles come from Entra ID tokens)"
                )
    for key in rules.api_keys:
        if key not in key_names:
            configured = ", ".join(key_names) if key_names else "none"
            problems.append(
                f"{where}.api_keys: {key!r} is not the name of a key in `inbound.api_keys` "
                f"(configured: {configured})"
            )
    if rules.cert_subjects and (server.tls is None or server.tls.client_ca is None):
        problems.append(
            f"{where}.cert_subjects: needs `server.tls.client_ca` (client certificates come with mutual TLS)"
        )
    elif rules.cert_subjects and (inbound.api_keys or inbound.entra_id is not None):
        # gateway.inbound: a key or a token is then required of every request, and it names the caller.
        problems.append(
            f"{where}.cert_subjects: a client certificate names the caller only when neither "
            "`inbound.api_keys` nor `inbound.entra_id` is configured (with them, every request sends a key "
            "or a token, which names the caller); list key names, app ids or roles instead"
        )
    return problems


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        text = str(item)
        # pydantic adds the union member it tried to the location; a reader knows only the file's keys.
        if text in ("none", "key", "aad_token", "aml_token") or text.startswith(("function-", "literal[")):
            continue
        parts.append(text)
    return ".".join(parts) or "(top level)"


def format_validation_error(source: str, error: ValidationError) -> str:
    lines: list[str] = []
    seen: set[tuple[str, str]] = set()
    for item in error.errors(include_url=False, include_input=False):
        where = _location(tuple(item["loc"]))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and indentation)"
        elif item["type"] == "missing":
            message = "required key is missing"
        if (where, message) in seen:
            continue
        seen.add((where, message))
        lines.append(f"{source}: {where}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> GatewayConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: (top level): expected a mapping with `routes:`")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found (pass --config PATH or set {CONFIG_ENV})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: {where}invalid YAML: {problem}") from None
    return parse_config(data, source)


def with_server_overrides(config: GatewayConfig, overrides: dict[str, Any]) -> GatewayConfig:
    """`config` with `server` settings given on the command line (`gateway serve --port ...`)."""
    if not overrides:
        return config
    return config.model_copy(update={"server": config.server.model_copy(update=overrides)})


def default_config_path() -> str:
    return os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH
