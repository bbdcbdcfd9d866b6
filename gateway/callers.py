"""Who calls: one `Caller` value per request, and each route's rules about what a caller may do.

A caller is what inbound protection proved about the client, in one of four forms:

- `app:<appid>`  an Entra ID access token (`appid` of v1 tokens, `azp` of v2), with its `oid` and `roles`;
- `key:<name>`   a key of `inbound.api_keys`, by the name the configuration gives it;
- `cert:<CN>`    a client certificate (mutual TLS), by its subject's common name;
- `anonymous`    none of these.

`Caller.id` is what the access log and spans show. `Caller.label` is the metric label: the id when the
configuration names that caller somewhere (a route's `callers`, an API key's name, a caller's own rate
under `limits.callers`), else `other`, so a client cannot grow a label set with tokens of its own.
`Caller.quota_key` is what per-caller rate limits count it under. All are computed once, when the caller
value is made (once per token, key or certificate subject, not per request).

`RouteAccess` is built once per route from `routes.NAME.callers`: `check(caller)` refuses with 403
`caller_not_allowed` (naming the caller and the route, never the rules), `may_pin_deployment(caller)`
says whether the client's `azureml-model-deployment` header may reach the upstream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import quote

from gateway.config import CallerRulesConfig, GatewayConfig, RouteCallersConfig
from gateway.errors import CallerNotAllowed

CallerKind = Literal["app", "key", "cert", "anonymous"]
OTHER: Final = "other"
# Longest name shown in an id (a certificate CN is at most 64 characters, an app id 36).
_MAX_SHOWN = 128
# Characters shown as they are in an id; anything else is percent-encoded, so an id is one log token.
_SAFE = "-._~:@+=/"
# Distinct certificate subjects remembered; beyond this, callers are made afresh (still correct).
_MAX_CERT_CALLERS = 1024


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request. `name` is the raw identifier rules match against (app id in lower case, key
    name, certificate CN; empty for anonymous); `id` the printable form; `label` the metric label."""

    kind: CallerKind
    name: str
    id: str
    label: str
    # What per-caller quotas count it under, as `limits.callers` names it (`app:<id>`, `key:<name>`,
    # `cert:<CN>`, unencoded); empty for anonymous callers, who are counted by their client address.
    quota_key: str = ""
    oid: str | None = None
    tenant_id: str | None = None
    roles: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return self.id


def _shown(name: str) -> str:
    text = quote(name[:_MAX_SHOWN], safe=_SAFE)
    return text if len(name) <= _MAX_SHOWN else text + "..."


ANONYMOUS: Final = Caller(kind="anonymous", name="", id="anonymous", label="anonymous")


class CallerFactory:
    """Makes `Caller` values, each with its metric label decided once. Built once per configuration."""

    def __init__(self, config: GatewayConfig) -> None:
        app_ids: set[str] = set()
        cert_subjects: set[str] = set()
        for route in config.routes.values():
            if route.callers is None:
                continue
            for rules in route.callers.rule_sets():
                app_ids.update(rules.app_ids)
                cert_subjects.update(rules.cert_subjects)
        # Callers with a rate of their own (`limits.callers`) are named by the configuration too.
        for limits in (config.inbound.limits, *(route.limits for route in config.routes.values())):
            for quota_key in limits.callers:
                kind, _, name = quota_key.partition(":")
                if kind == "app":
                    app_ids.add(name.lower())
                elif kind == "cert":
                    cert_subjects.add(name)
        self._app_ids = frozenset(app_ids)
        self._cert_subjects = frozenset(cert_subjects)
        # Key names all come from the configuration: each is its own label. One value per name, made now.
        self._keys = {key.name: _key_caller(key.name) for key in config.inbound.api_keys}
        self._certs: dict[str, Caller] = {}

    def app(self, app_id: str, *, oid: str | None, tenant_id: str | None, roles: Iterable[str]) -> Caller:
        """An Entra ID caller (from a validated token)."""
        name = app_id.lower()
        caller_id = f"app:{_shown(name)}"
        return Caller(
            kind="app",
            name=name,
            id=caller_id,
            label=caller_id if name in self._app_ids else OTHER,
            quota_key=f"app:{name}",
            oid=oid,
            tenant_id=tenant_id,
            roles=frozenset(roles),
        )

    def key(self, name: str) -> Caller:
        """The caller that sent the key of `inbound.api_keys` named `name`."""
        caller = self._keys.get(name)
        if caller is None:  # a name not in the configuration: the inbound stage and this factory disagree
            raise KeyError(f"no key named {name!r} in inbound.api_keys")
        return caller

    def cert(self, common_name: str | None) -> Caller:
        """The caller that presented a client certificate with this subject CN (None: the certificate
        has no CN; such a caller matches no `cert_subjects` rule)."""
        name = common_name or ""
        caller = self._certs.get(name)
        if caller is None:
            caller_id = f"cert:{_shown(name)}" if name else "cert:(no CN)"
            caller = Caller(
                kind="cert",
                name=name,
                id=caller_id,
                label=caller_id if name in self._cert_subjects else OTHER,
                quota_key=f"cert:{name}",
            )
            if len(self._certs) < _MAX_CERT_CALLERS:
                self._certs[name] = caller
        return caller

    @property
    def anonymous(self) -> Caller:
        return ANONYMOUS


def _key_caller(name: str) -> Caller:
    caller_id = f"key:{_shown(name)}"
    return Caller(kind="key", name=name, id=caller_id, label=caller_id, quota_key=f"key:{name}")


def certificate_common_name(peercert: Mapping[str, Any] | None) -> str | None:
    """The subject CN of a certificate as `ssl.SSLObject.getpeercert()` returns it (the last CN if there
    are several, as OpenSSL-based servers do), or None."""
    if not peercert:
        return None
    found: str | None = None
    for rdn in peercert.get("subject", ()):
        for attribute, value in rdn:
            if attribute == "commonName" and isinstance(value, str):
                found = value
    return found


class CallerRule:
    """One `callers` block (or its `may_pin_deployment`), built once: a caller matches when it matches
    any entry of any list."""

    __slots__ = ("api_keys", "app_ids", "cert_subjects", "roles")

    def __init__(self, config: CallerRulesConfig) -> None:
        self.app_ids = frozenset(config.app_ids)
        self.roles = frozenset(config.roles)
        self.api_keys = frozenset(config.api_keys)
        self.cert_subjects = frozenset(config.cert_subjects)

    def allows(self, caller: Caller) -> bool:
        kind = caller.kind
        if kind == "app":
            return caller.name in self.app_ids or not self.roles.isdisjoint(caller.roles)
        if kind == "key":
            return caller.name in self.api_keys
        if kind == "cert":
            return caller.name in self.cert_subjects
        return False


class RouteAccess:
    """What a route's `callers` allow: who may use the route, and who may choose its deployment."""

    __slots__ = ("_pin", "_rule", "route")

    def __init__(self, route: str, config: RouteCallersConfig | None) -> None:
        self.route = route
        # No `callers`, or only `may_pin_deployment` given: every caller that passed `inbound` may call.
        self._rule = None if config is None or config.is_empty() else CallerRule(config)
        pin = None if config is None else config.may_pin_deployment
        self._pin = None if pin is None else CallerRule(pin)

    @property
    def restricted(self) -> bool:
        """Whether some callers are refused (False: `check` never raises)."""
        return self._rule is not None

    def allows(self, caller: Caller) -> bool:
        return self._rule is None or self._rule.allows(caller)

    def check(self, caller: Caller) -> None:
        """Raise 403 `caller_not_allowed` unless `caller` may use the route."""
        if self._rule is not None and not self._rule.allows(caller):
            raise CallerNotAllowed(_refusal(caller, self.route))

    def may_pin_deployment(self, caller: Caller) -> bool:
        """Whether the client's own `azureml-model-deployment` header may reach the upstream."""
        return self._pin is not None and self._pin.allows(caller)


def _refusal(caller: Caller, route: str) -> str:
    if caller.kind == "anonymous":
        return (
            f"an anonymous caller may not use route {route}: identify yourself (an Entra ID token in "
            "Authorization: Bearer, a gateway API key or a client certificate)"
        )
    return f"caller {caller.id} may not use route {route}; ask the gateway's operator for access"


def route_access(config: GatewayConfig) -> dict[str, RouteAccess]:
    """One `RouteAccess` per route name."""
    return {name: RouteAccess(name, route.callers) for name, route in config.routes.items()}
