"""Caller identity and per-route authorization: the `inbound.entra_id` and `routes.NAME.callers` config,
the `Caller` values (ids and bounded metric labels), `RouteAccess`, and the two refusals' answers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.callers import (
    ANONYMOUS,
    OTHER,
    CallerFactory,
    RouteAccess,
    certificate_common_name,
    route_access,
)
from gateway.config import GatewayConfig, parse_config
from gateway.errors import (
    CallerNotAllowed,
    CallerTokenMissing,
    CallerUnauthenticated,
    ConfigError,
    UnknownSigningKey,
)
from gateway.responses import error_head, send_error

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
SCORER = "5c0e0000-0000-4000-8000-000000000001"
PINNER = "9140e000-0000-4000-8000-000000000002"
HASH = "a" * 64
ENTRA = {"tenant_id": TENANT, "audiences": ["api://scoring-gateway"]}


def route(**extra: Any) -> dict[str, Any]:
    return {"path": "/fraud", "upstream": "http://127.0.0.1:9/score", "auth": {"type": "none"}, **extra}


def config(callers: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"routes": {"fraud": route(**({"callers": callers} if callers else {}))}}
    data.update(top)
    return data


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "gw.yaml")
    return str(caught.value)


# ------------------------------------------------------------------------------ configuration
def test_entra_id_defaults() -> None:
    entra = parse_config(config(inbound={"entra_id": ENTRA})).inbound.entra_id
    assert entra is not None
    assert entra.authority == "https://login.microsoftonline.com" and entra.clock_skew_s == 60
    assert entra.allowed_tenants is None and entra.tenants() == (TENANT,)
    other = "0000aaaa-0000-4000-8000-000000000000"
    upper = {**ENTRA, "tenant_id": TENANT.upper(), "allowed_tenants": [TENANT, other, other.upper()]}
    assert parse_config(config(inbound={"entra_id": upper})).inbound.entra_id.tenants() == (TENANT, other)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("entra", "where", "what"),
    [
        ({"audiences": ["api://x"]}, "inbound.entra_id.tenant_id", "required key is missing"),
        ({"tenant_id": TENANT}, "inbound.entra_id.audiences", "required key is missing"),
        ({"tenant_id": TENANT, "audiences": []}, "inbound.entra_id.audiences", "at least 1 item"),
        ({"tenant_id": "common", "audiences": ["a"]}, "inbound.entra_id.tenant_id", "is not a tenant"),
        ({**ENTRA, "authority": "http://login.example"}, "inbound.entra_id.authority", "https://"),
        ({**ENTRA, "allowed_tenants": ["b-tenant"]}, "inbound.entra_id", "must include tenant_id"),
        ({**ENTRA, "allowed_tenants": []}, "inbound.entra_id.allowed_tenants", "list at least"),
        ({**ENTRA, "clock_skew_s": -1}, "inbound.entra_id.clock_skew_s", "greater than or equal"),
        ({**ENTRA, "audiences": [" api://x"]}, "inbound.entra_id.audiences", "is not an audience"),
        ({**ENTRA, "issuer": "x"}, "inbound.entra_id.issuer", "unknown key"),
    ],
)
def test_entra_id_errors_name_the_key(entra: dict[str, Any], where: str, what: str) -> None:
    message = refused(config(inbound={"entra_id": entra}))
    assert message.startswith(f"gw.yaml: {where}: ") and what in message, message


def test_callers_need_their_inbound_sources() -> None:
    message = refused(config({"app_ids": [SCORER], "may_pin_deployment": {"roles": ["Scoring.Pin"]}}))
    assert "routes: fraud.callers.app_ids: needs `inbound.entra_id`" in message
    assert "fraud.callers.may_pin_deployment.roles: needs `inbound.entra_id`" in message
    message = refused(config({"cert_subjects": ["batch-client"]}))
    assert "fraud.callers.cert_subjects: needs `server.tls.client_ca`" in message


def test_callers_api_keys_must_name_configured_keys() -> None:
    keys = {"api_keys": [{"name": "batch", "sha256": HASH}, {"name": "web", "sha256": "b" * 64}]}
    message = refused(config({"api_keys": ["batch", "reports"]}, inbound=keys))
    assert message == (
        "gw.yaml: routes: fraud.callers.api_keys: 'reports' is not the name of a key in `inbound.api_keys` "
        "(configured: batch, web)"
    )
    assert "(configured: none)" in refused(config({"api_keys": ["batch"]}))
    parse_config(config({"api_keys": ["batch"]}, inbound=keys))


def test_callers_must_name_somebody() -> None:
    assert "`callers` names nobody" in refused(config({"app_ids": []}))
    assert "`may_pin_deployment` names nobody" in refused(
        config({"app_ids": [SCORER], "may_pin_deployment": {}}, inbound={"entra_id": ENTRA})
    )
    assert "is not a name" in refused(config({"roles": [""]}, inbound={"entra_id": ENTRA}))
    assert "unknown key" in refused(config({"app_id": [SCORER]}, inbound={"entra_id": ENTRA}))


def test_entra_id_counts_as_inbound_protection() -> None:
    remote = {"host": "0.0.0.0"}
    assert not parse_config(config(server=remote)).has_inbound_protection()
    assert parse_config(config(server=remote, inbound={"entra_id": ENTRA})).has_inbound_protection()
    assert parse_config(
        config(server=remote, inbound={"allow_cidrs": ["10.0.0.0/8"]})
    ).has_inbound_protection()
    keyed = {"api_keys": [{"name": "a", "sha256": HASH}]}
    assert parse_config(config(server=remote, inbound=keyed)).has_inbound_protection()


# ------------------------------------------------------------------------------ callers and labels
def gateway_config() -> GatewayConfig:
    data = config(
        {"app_ids": [SCORER.upper()], "roles": ["Scoring.Invoke"], "api_keys": ["batch"]},
        inbound={"entra_id": ENTRA, "api_keys": [{"name": "batch", "sha256": HASH}, {"sha256": "b" * 64}]},
    )
    data["routes"]["pinned"] = route(path="/pinned", callers={"may_pin_deployment": {"app_ids": [PINNER]}})
    data["routes"]["open"] = route(path="/open")
    return parse_config(data)


def cert_config() -> GatewayConfig:
    """Client certificates name the callers of a gateway without API keys or Entra ID tokens."""
    data = config(
        {"cert_subjects": ["reporting client"], "may_pin_deployment": {"cert_subjects": ["pinning client"]}}
    )
    data["server"] = {"tls": {"cert": "x", "key": "y", "client_ca": "/etc/ca.pem"}}
    return parse_config(data)


def test_cert_subjects_need_certificates_to_name_the_callers() -> None:
    data = config({"cert_subjects": ["reporting client"]}, inbound={"entra_id": ENTRA})
    data["server"] = {"tls": {"cert": "x", "key": "y", "client_ca": "/etc/ca.pem"}}
    message = refused(data)
    assert "fraud.callers.cert_subjects: a client certificate names the caller only" in message


def test_caller_ids_and_bounded_labels() -> None:
    cfg = gateway_config()
    assert cfg.routes["fraud"].callers.app_ids == [SCORER]  # type: ignore[union-attr]  # GUIDs in lower case
    callers = CallerFactory(cfg)
    scorer = callers.app(SCORER, oid="o-1", tenant_id=TENANT, roles=["Scoring.Invoke"])
    assert (scorer.id, scorer.label, scorer.oid, scorer.roles) == (
        f"app:{SCORER}",
        f"app:{SCORER}",
        "o-1",
        frozenset({"Scoring.Invoke"}),
    )
    # An app nobody configured keeps its id (access log, spans) but counts under `other`.
    stranger = callers.app("0000dead-0000-4000-8000-000000000000", oid=None, tenant_id=TENANT, roles=())
    assert stranger.id.startswith("app:0000dead") and stranger.label == OTHER
    assert callers.app(PINNER.upper(), oid=None, tenant_id=TENANT, roles=()).label == f"app:{PINNER}"
    assert callers.key("batch").id == callers.key("batch").label == "key:batch"
    assert callers.key("batch") is callers.key("batch")  # made once, at start-up
    assert callers.key("client").label == "key:client"  # every key name comes from the configuration
    with pytest.raises(KeyError):
        callers.key("nobody")
    certificates = CallerFactory(cert_config())
    reporting = certificates.cert("reporting client")
    assert reporting.id == "cert:reporting%20client" == reporting.label  # one token in a log line
    assert certificates.cert("reporting client") is reporting
    assert certificates.cert("pinning client").label == "cert:pinning%20client"
    assert certificates.cert("laptop").label == OTHER and certificates.cert(None).id == "cert:(no CN)"
    assert callers.cert("reporting client").label == OTHER  # no route of this configuration names it
    assert callers.anonymous is ANONYMOUS and str(ANONYMOUS) == "anonymous" == ANONYMOUS.label
    hostile = callers.app("x y\n" + "z" * 300, oid=None, tenant_id=TENANT, roles=())
    assert " " not in hostile.id and "\n" not in hostile.id and len(hostile.id) < 420


def test_route_access_rules() -> None:
    cfg = gateway_config()
    callers = CallerFactory(cfg)
    access = route_access(cfg)
    fraud, pinned, open_route = access["fraud"], access["pinned"], access["open"]
    by_role = callers.app(
        "0000beef-0000-4000-8000-000000000000", oid=None, tenant_id=TENANT, roles=["Scoring.Invoke"]
    )
    by_id = callers.app(SCORER, oid=None, tenant_id=TENANT, roles=[])
    wrong_role = callers.app(
        "0000beef-0000-4000-8000-000000000000", oid=None, tenant_id=TENANT, roles=["Other"]
    )
    pinner = callers.app(PINNER, oid=None, tenant_id=TENANT, roles=[])
    for caller in (by_role, by_id, callers.key("batch")):
        assert fraud.allows(caller)
        fraud.check(caller)
    for caller in (wrong_role, pinner, callers.key("client"), callers.cert("reporting client"), ANONYMOUS):
        assert not fraud.allows(caller)
    assert pinned.may_pin_deployment(pinner) and not pinned.may_pin_deployment(by_id)
    assert not fraud.may_pin_deployment(by_id)  # no may_pin_deployment: nobody chooses the deployment
    assert not open_route.restricted and open_route.allows(ANONYMOUS) and fraud.restricted
    open_route.check(ANONYMOUS)
    # Only `may_pin_deployment`: every caller may call, some may choose.
    assert not pinned.restricted and pinned.allows(wrong_role) and pinned.allows(ANONYMOUS)
    certificates = CallerFactory(cert_config())
    reports = RouteAccess("fraud", cert_config().routes["fraud"].callers)
    assert reports.allows(certificates.cert("reporting client")) and not reports.allows(
        certificates.cert("laptop")
    )
    assert reports.may_pin_deployment(certificates.cert("pinning client"))
    assert not reports.may_pin_deployment(certificates.cert("reporting client"))


def test_refusal_names_caller_and_route_never_the_rules() -> None:
    cfg = gateway_config()
    callers = CallerFactory(cfg)
    fraud = route_access(cfg)["fraud"]
    stranger = callers.app(
        "0000dead-0000-4000-8000-000000000000", oid=None, tenant_id=TENANT, roles=["Other"]
    )
    with pytest.raises(CallerNotAllowed) as caught:
        fraud.check(stranger)
    message = caught.value.message
    assert (caught.value.status, caught.value.code) == (403, "caller_not_allowed")
    assert "app:0000dead-0000-4000-8000-000000000000" in message and "route fraud" in message
    for rule in (SCORER, "Scoring.Invoke", "batch"):
        assert rule not in message
    with pytest.raises(CallerNotAllowed) as anonymous:
        fraud.check(ANONYMOUS)
    assert "anonymous caller may not use route fraud" in anonymous.value.message


def test_certificate_common_name() -> None:
    peer = {"subject": ((("countryName", "NL"),), (("commonName", "batch-client"),))}
    assert certificate_common_name(peer) == "batch-client"
    assert certificate_common_name({"subject": ((("organizationName", "x"),),)}) is None
    assert certificate_common_name(None) is None and certificate_common_name({}) is None


# ------------------------------------------------------------------------------ the answers
async def _answer(error: Any) -> tuple[int, dict[bytes, bytes], dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await send_error(send, error, "req-1")
    headers = dict(sent[0]["headers"])
    return sent[0]["status"], headers, json.loads(sent[1]["body"])


def test_caller_unauthenticated_answers_with_a_bearer_challenge() -> None:
    status, headers, body = asyncio.run(
        _answer(CallerUnauthenticated("the access token expired at ...", reason="expired"))
    )
    assert status == 401 and headers[b"www-authenticate"] == b'Bearer error="invalid_token"'
    assert body["error"]["code"] == "caller_unauthenticated" and body["error"]["request_id"] == "req-1"
    status, headers, _ = asyncio.run(_answer(UnknownSigningKey("unknown key", kid="k")))
    assert status == 401 and b"www-authenticate" in headers
    status, headers, body = asyncio.run(_answer(CallerNotAllowed("caller app:x may not use route r")))
    assert (
        status == 403 and b"www-authenticate" not in headers and body["error"]["code"] == "caller_not_allowed"
    )


def test_the_wire_answer_carries_the_challenge_too() -> None:
    """The server protocol and the proxy write their answers themselves (`error_head`), not through
    ASGI: the refusal's headers must be there as well."""
    refused = CallerUnauthenticated("the access token expired at ...", reason="expired")
    head = error_head(refused, "req-1", b"{}").decode()
    assert 'www-authenticate: Bearer error="invalid_token"\r\n' in head
    assert (
        "www-authenticate: Bearer\r\n"
        in error_head(CallerTokenMissing("send a token"), "req-2", b"{}").decode()
    )
    assert "www-authenticate" not in error_head(CallerNotAllowed("caller app:x ..."), "req-3", b"{}").decode()


def test_quota_keys_and_labels_of_callers_with_a_rate_of_their_own() -> None:
    """`limits.callers` names callers as `app:<id>` (in any case), `key:<name>`, `cert:<CN>`: those are the
    callers' quota keys, unencoded, and a caller named there has its own metric label."""
    other_app = "7a000000-0000-4000-8000-0000000000ff"
    data = config(inbound={"limits": {"callers": {f"APP:{other_app.upper()}": {"requests_per_s": 5}}}})
    data["routes"]["fraud"]["limits"] = {"callers": {"cert:reporting client": {"requests_per_s": 1}}}
    data["server"] = {"tls": {"cert": "x", "key": "y", "client_ca": "/etc/ca.pem"}}
    cfg = parse_config(data)
    assert list(cfg.inbound.limits.callers) == [f"app:{other_app}"]
    callers = CallerFactory(cfg)
    app = callers.app(other_app.upper(), oid=None, tenant_id=TENANT, roles=[])
    assert (app.quota_key, app.label) == (f"app:{other_app}", f"app:{other_app}")
    cert = callers.cert("reporting client")
    assert (cert.id, cert.quota_key, cert.label) == (
        "cert:reporting%20client",
        "cert:reporting client",
        cert.id,
    )
    stranger = callers.app(SCORER, oid=None, tenant_id=TENANT, roles=[])
    assert (stranger.quota_key, stranger.label) == (f"app:{SCORER}", "other")
