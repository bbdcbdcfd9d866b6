"""The configuration reference, generated from the models in `gateway.config`.

    python -m gateway.config_reference > docs/configuration.md

Every key, its type, default and description come from the pydantic models. Fields that have no
`Field(description=...)` in `gateway/config.py` take theirs from `FIELD_NOTES` below, and rules that
span several keys (checked by model validators) from `SECTION_NOTES`; moving a note into config.py
makes the model's description win. tests/test_docs.py fails when docs/configuration.md is stale,
when a key has no description at all, or when a note names a key that no longer exists.
"""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gateway import config as cfg
from gateway.secrets import MAX_SECRET_CHARS

# Descriptions of fields that config.py leaves undescribed, keyed "ModelName.field".
FIELD_NOTES: dict[str, str] = {
    # top level
    "GatewayConfig.server": "The listener and its limits.",
    "GatewayConfig.tls": "TLS policy for every outbound connection (upstreams, Entra ID, ARM).",
    "GatewayConfig.inbound": "Who may send requests through the gateway.",
    "GatewayConfig.routes": "The routes, by name. The name is used in logs, metrics labels and `/readyz`.",
    # server
    "ServerConfig.port": "Port to listen on. `gateway serve --port` overrides it.",
    "ServerConfig.log_level": "Log level of the gateway's own log lines. `--log-level` overrides it.",
    "ServerConfig.log_format": "`text`: one human-readable line per event; `json`: one JSON object per line.",
    # routes
    "RouteConfig.path": (
        "Path prefix the route answers on; `<path>/rest` is forwarded to `<upstream>/rest`. Must start "
        "with `/`, must not be `/` nor contain `?`, `#`, `%`, `\\`, spaces, `//`, `.` or `..` segments, "
        "and must not shadow an admin endpoint. A trailing `/` is removed."
    ),
    "RouteConfig.upstream": (
        "Base URL of the scoring endpoint, `http://` or `https://`, without query string, fragment or "
        "credentials, e.g. `https://NAME.REGION.inference.ml.azure.com`."
    ),
    "RouteConfig.upstreams": "Several upstreams instead of `upstream`, with priorities and weights.",
    "RouteConfig.connect_timeout_s": "Time to open a connection to the upstream (TCP and TLS).",
    "RouteConfig.headers": (
        "Extra headers sent upstream on every request, replacing a client's header of the same name, "
        "e.g. `azureml-model-deployment: blue`. A value is a plain string or a secret "
        "(`{env: NAME}`, `{file: PATH}`)."
    ),
    "RouteConfig.auth": "How the gateway authenticates to the upstream; `type` selects the kind.",
    "RouteConfig.retry": "When and how often a failed upstream attempt is repeated.",
    "RouteConfig.outlier": "Passive health checking: when an upstream is taken out of rotation.",
    "UpstreamConfig.url": "Base URL of this upstream (same rules as `upstream`).",
    "UpstreamConfig.weight": "Share of traffic among upstreams of the same priority.",
    "RetryConfig.on_statuses": "Upstream statuses that are retried (when the request body can be re-sent).",
    "RetryConfig.on_connection_errors": "Retry when the upstream cannot be reached or the attempt times out.",
    "RetryConfig.backoff_base_s": "First backoff ceiling; it doubles per retry (full jitter).",
    "RetryConfig.backoff_max_s": "Largest backoff ceiling.",
    "OutlierConfig.consecutive_failures": (
        "Consecutive failures (connection errors, timeouts, 5xx other than 501, answers that break off "
        "mid-body) that eject an upstream; an answer counts as a success once it arrived whole."
    ),
    "OutlierConfig.ejection_s": ("How long an ejected upstream gets no traffic; then one request probes it."),
    # auth
    "NoneAuth.type": "The upstream needs no credential. The client's own `Authorization` is still dropped.",
    "KeyAuth.type": "Endpoint key auth: `Authorization: Bearer <key>`.",
    "KeyAuth.primary": "The primary endpoint key.",
    "KeyAuth.secondary": "The secondary key: used when the upstream refuses the primary (`reject_statuses`).",
    "KeyAuth.identity": "The identity used to call `listKeys` (with `from_endpoint`).",
    "KeyAuth.arm_url": "Azure Resource Manager base URL (with `from_endpoint`).",
    "KeyAuth.api_version": "ARM `api-version` of the `listKeys` call.",
    "AadTokenAuth.type": "A Microsoft Entra ID access token for the scoring endpoint.",
    "AadTokenAuth.identity": "The identity the token is requested for.",
    "AadTokenAuth.scope": "Scope of the token request.",
    "AmlTokenAuth.type": "An Azure ML token, fetched with the endpoint's ARM `token` action.",
    "AmlTokenAuth.identity": "The identity used to call ARM.",
    "AmlTokenAuth.endpoint": "The online endpoint whose `token` action is called.",
    "AmlTokenAuth.arm_url": "Azure Resource Manager base URL.",
    "AmlTokenAuth.api_version": "ARM `api-version` of the `token` call.",
    # identity
    "IdentityConfig.tenant_id": "Directory (tenant) ID. Unset: `AZURE_TENANT_ID`.",
    "IdentityConfig.client_id": "Application (client) ID. Unset: `AZURE_CLIENT_ID`.",
    "IdentityConfig.client_secret": "Client secret of the app registration. Unset: `AZURE_CLIENT_SECRET`.",
    "IdentityConfig.certificate": (
        "Certificate credential of the app registration. Unset: `AZURE_CLIENT_CERTIFICATE_PATH` (one PEM "
        "file with the key and the certificate; `AZURE_CLIENT_CERTIFICATE_PASSWORD` if it is encrypted)."
    ),
    "IdentityConfig.federated_token_file": (
        "Workload identity: file holding the federated token; it must exist at start-up and is re-read "
        "for every token request (it rotates). Unset: `AZURE_FEDERATED_TOKEN_FILE`."
    ),
    "IdentityConfig.managed_identity": (
        "`system` for the system-assigned managed identity, or `{client_id: ...}` / `{resource_id: ...}` "
        "for a user-assigned one."
    ),
    "IdentityConfig.authority_host": (
        "Entra ID authority host, an `https://` URL without a path. Unset: `AZURE_AUTHORITY_HOST`, else "
        "`https://login.microsoftonline.com`."
    ),
    "CertificateConfig.private_key": "PEM private key.",
    "CertificateConfig.certificate": "PEM certificate (public part) registered with the app.",
    "ManagedIdentityRef.client_id": "Client ID of a user-assigned managed identity.",
    "ManagedIdentityRef.resource_id": "Azure resource ID of a user-assigned managed identity.",
    "EndpointRef.subscription_id": "Azure subscription ID.",
    "EndpointRef.resource_group": "Resource group of the workspace.",
    "EndpointRef.workspace": "Azure ML workspace name.",
    "EndpointRef.name": "Online endpoint name.",
}

# Rules that involve several keys of one mapping (model validators), keyed by model name.
SECTION_NOTES: dict[str, str] = {
    "GatewayConfig": (
        "The file is YAML. Every key is checked: an unknown or misspelt key is an error that names the "
        "key path. `gateway serve` and `gateway check` read `--config PATH`, else `$GATEWAY_CONFIG`, "
        f"else `{cfg.DEFAULT_CONFIG_PATH}`. Route names may use letters, digits, `_`, `.` and `-` "
        "(at most 64); two routes may not have the same `path`."
    ),
    "RouteConfig": "Give exactly one of `upstream` and `upstreams`.",
    "KeyAuth": (
        "Give either `primary` (and optionally `secondary`), or `from_endpoint` (and optionally "
        "`identity`) to fetch both keys from the control plane; not both. With `primary`/`secondary`, "
        "`endpoint` (and optionally `identity`, used only by `gateway rotate`) names the endpoint the keys "
        "belong to, so that `gateway rotate` can regenerate them (see [rotation](rotation.md))."
    ),
    "IdentityConfig": (
        "Give at most one of `client_secret`, `certificate`, `federated_token_file` and `managed_identity`. "
        "With none of them, the credential comes from the environment, in azure-identity's order: "
        "`AZURE_CLIENT_SECRET`, `AZURE_CLIENT_CERTIFICATE_PATH`, `AZURE_FEDERATED_TOKEN_FILE` (so an AKS "
        "workload identity pod needs no identity settings at all). Routes with the same identity share "
        "one token cache."
    ),
    "ManagedIdentityRef": "Give exactly one of `client_id` and `resource_id`.",
}

_SECRET_MODELS = frozenset({cfg.LiteralRef, cfg.EnvRef, cfg.FileRef, cfg.KeyVaultRef})
_HEADER_MODELS = frozenset({str, cfg.EnvRef, cfg.FileRef, cfg.KeyVaultRef})
_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}


@dataclass
class _Row:
    key: str
    type: str
    default: str
    description: str


@dataclass
class _Section:
    anchor: str
    title: str
    model: type[BaseModel]
    path: str
    intro: list[str] = field(default_factory=list)
    rows: list[_Row] = field(default_factory=list)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _strip_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _anchor(path: str, variant: str | None = None) -> str:
    text = path + (f"-{variant}" if variant else "")
    out = "".join(c if c.isalnum() else "-" for c in text.lower())
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")


def _constraints(metadata: list[Any]) -> str:
    parts = []
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            parts.append(f"≥ {item.ge}")
        elif isinstance(item, annotated_types.Gt):
            parts.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Le):
            parts.append(f"≤ {item.le}")
        elif isinstance(item, annotated_types.Lt):
            parts.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.MinLen) and item.min_length:
            parts.append(f"at least {item.min_length}")
        elif isinstance(item, annotated_types.MaxLen):
            parts.append(f"at most {item.max_length}")
    return ", ".join(parts)


def _size(value: int) -> str:
    for unit, size in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if value >= size and value % size == 0:
            return f" ({value // size} {unit})"
    return ""


def _scalar_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_scalar_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_scalar_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(name: str, info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(defaults below)"
    else:
        value = info.default
    if value is None:
        return "unset"
    text = f"`{_scalar_text(value)}`"
    if isinstance(value, int) and not isinstance(value, bool) and name.endswith("_bytes"):
        text += _size(value)
    return text


def _literal_text(values: tuple[Any, ...]) -> str:
    quoted = [f"`{v}`" for v in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _plural(text: str) -> str:
    return text + "s" if text in ("mapping", "string", "integer", "number", "boolean") else text


# A model found inside a type: (model, its key path, the `type:` variant it is, if any).
_Nested = list[tuple[type[BaseModel], str, str | None]]


class _Renderer:
    def __init__(self) -> None:
        self.sections: list[_Section] = []
        self.by_model: dict[type[BaseModel], _Section] = {}

    def type_text(self, tp: Any, path: str) -> tuple[str, _Nested]:
        """Human text for a type, and the models it contains: (model, key path, variant)."""
        tp = _strip_annotated(tp)
        members = _union_args(tp)
        if members is not None:
            members = tuple(_strip_annotated(m) for m in members if m is not type(None))
            if set(members) <= _SECRET_MODELS and len(members) > 1:
                return "secret", []
            if set(members) <= _HEADER_MODELS and len(members) > 1:
                return "string or secret", []
            if len(members) == 1:
                return self.type_text(members[0], path)
            models = [m for m in members if _is_model(m)]
            if models and all("type" in m.model_fields for m in models) and len(models) == len(members):
                kinds = [typing.get_args(m.model_fields["type"].annotation)[0] for m in models]
                variants: _Nested = [(m, path, f"type: {k}") for m, k in zip(models, kinds, strict=True)]
                return f"mapping, by `type`: {_literal_text(tuple(kinds))}", variants
            texts: list[str] = []
            nested_all: _Nested = []
            for member in members:
                text, nested = self.type_text(member, path)
                texts.append(text)
                nested_all.extend(nested)
            return " or ".join(texts), nested_all
        origin = typing.get_origin(tp)
        if origin is Literal:
            return _literal_text(typing.get_args(tp)), []
        if origin is list or origin is tuple:  # tuple[X, ...]: a list kept hashable
            item = typing.get_args(tp)[0]
            text, nested = self.type_text(item, f"{path}[]")
            return f"list of {_plural(text)}", nested
        if origin is dict:
            _, value = typing.get_args(tp)
            text, nested = self.type_text(value, f"{path}.<name>")
            return f"mapping of names to {_plural(text)}", nested
        if _is_model(tp):
            return "mapping", [(tp, path, None)]
        if tp in _SCALARS:
            return _SCALARS[tp], []
        raise TypeError(f"{path}: no rendering for the type {tp!r}")

    def description(self, model: type[BaseModel], name: str, info: FieldInfo) -> str:
        return info.description or FIELD_NOTES.get(f"{model.__name__}.{name}", "")

    def add(self, model: type[BaseModel], path: str, variant: str | None) -> _Section:
        anchor = _anchor(path, variant)
        title = f"`{path}`" + (f" with `{variant}`" if variant else "")
        section = _Section(anchor=anchor, title=title, model=model, path=path)
        if model.__doc__:
            section.intro.append(" ".join(model.__doc__.split()))
        note = SECTION_NOTES.get(model.__name__)
        if note:
            section.intro.append(note)
        self.sections.append(section)
        self.by_model[model] = section
        children: _Nested = []
        for name, info in model.model_fields.items():
            key = f"{path}.{name}" if path else name
            text, nested = self.type_text(info.annotation, key)
            limits = _constraints(info.metadata)
            if limits:
                text += f" ({limits})"
            description = self.description(model, name, info)
            for child, child_path, child_variant in nested:
                if child in self.by_model or any(c[0] is child for c in children):
                    known = self.by_model.get(child)
                    if known is not None and child_variant is None:
                        description += f" Same keys as [{known.title}](#{known.anchor})."
                    continue
                children.append((child, child_path, child_variant))
            section.rows.append(_Row(key, text, _default(name, info), description.strip()))
        for child, child_path, child_variant in children:
            if child not in self.by_model:
                self.add(child, child_path, child_variant)
        return section


def sections() -> list[_Section]:
    renderer = _Renderer()
    renderer.add(cfg.GatewayConfig, "", None)
    return renderer.sections


def documented_keys() -> Iterator[tuple[str, str]]:
    """Every rendered key path and its description (for tests)."""
    for section in sections():
        for row in section.rows:
            yield row.key, row.description


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    reserved = ", ".join(f"`{h}`" for h in sorted(cfg._RESERVED_HEADERS))
    admin = ", ".join(f"`{p}`" for p in cfg.ADMIN_PATHS)
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m gateway.config_reference > docs/configuration.md` from the models in",
        "     gateway/config.py. Do not edit by hand: tests/test_docs.py fails when this file is stale. -->",
        "",
        "`gateway check --config FILE` validates a file, resolves every secret and acquires every",
        "credential once. Examples: [`config/gateway.yaml`](../config/gateway.yaml) and",
        "[`config/examples/`](../config/examples/).",
        "",
        "**Secrets.** Wherever the type says *secret*, give one of:",
        "",
        "- `{env: NAME}`: the value of an environment variable, read once at start-up;",
        "- `{file: PATH}`: the content of a file, one trailing newline removed. The file is checked for",
        "  changes at most once a second while the gateway runs, so a rotated file (for example a",
        "  Kubernetes Secret volume) takes effect without a restart; a failed re-read keeps the last value;",
        "- `{keyvault: {vault: https://NAME.vault.azure.net, secret: NAME}}`: the latest version of a Key",
        "  Vault secret, read with the identity in top-level `keyvault` and polled every",
        "  `keyvault.refresh_every_s`; a failed poll keeps the last value (see [rotation](rotation.md));",
        "- a plain string: the secret itself, written into the config file. Allowed, with a warning at",
        "  start-up; prefer the others.",
        "",
        "Secrets are resolved when the gateway starts (or reloads), not when the file is validated.",
        f"A value from any source is at most {MAX_SECRET_CHARS:,} characters (25 KB, Key Vault's limit);",
        "a longer one is refused, naming its source (a rotated file over it keeps the last good value).",
        f"Route `headers` may not set {reserved}; route paths may not shadow the admin endpoints {admin}.",
        "",
        "**Reloading.** `gateway serve` reloads the file when it changes or on `SIGHUP`. An invalid",
        "file is rejected and the running configuration is kept.",
        "",
        "## Contents",
        "",
    ]
    all_sections = sections()
    for section in all_sections:
        title = section.title if section.path else "Top level"
        lines.append(f"- [{title}](#{section.anchor or 'top-level'})")
    for section in all_sections:
        anchor = section.anchor or "top-level"
        title = section.title if section.path else "Top level"
        lines += ["", f'<a id="{anchor}"></a>', "", f"## {title}", ""]
        for paragraph in section.intro:
            lines += [paragraph, ""]
        lines += ["| Key | Type | Default | Description |", "|---|---|---|---|"]
        for row in section.rows:
            lines.append(
                f"| `{row.key}` | {_cell(row.type)} | {_cell(row.default)} | {_cell(row.description)} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
