"""The emulator's HTTP surface: Entra ID, managed identity (IMDS and App Service), ARM and the scoring
front end of an Azure ML managed online endpoint, plus an admin API under `/_emulator/`.

Wire formats follow what the real services send and what MSAL 1.39 and azure-ai-ml parse; see
/work/shared/reference/azure-ml-and-msal.md. Nothing here logs a header, body, key or token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import json
import math
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final
from urllib.parse import parse_qs, unquote_plus

import jwt
from cryptography import x509
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from gateway.emulator.capacity import Throttled
from gateway.emulator.classifier import predict
from gateway.emulator.state import (
    AML_RESOURCE,
    ARM_RESOURCE,
    KEYVAULT_RESOURCE,
    EmulatorState,
    Fault,
    RegisteredApp,
    TokenValidationError,
)

__all__ = ["SERVER_VERSION", "create_app"]

SERVER_VERSION: Final = "azmlinfsrv/1.5.1"
JWT_BEARER: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# The Azure ML front end rejects bodies over 1.5 MB before they reach the container.
MAX_SCORE_BODY: Final = 1536 * 1024
# azmlinfsrv answers 431 when a request-id header value is longer than this.
MAX_REQUEST_ID_LEN: Final = 100
RUN_FAILED_MESSAGE: Final = "An unexpected error occurred in scoring script. Check the logs for more info."
_RESERVED_SCOPES: Final = frozenset({"openid", "profile", "offline_access"})
_ARM_AUDIENCES: Final = (ARM_RESOURCE, "https://management.core.windows.net")

_ARM_ENDPOINT_PATH = re.compile(
    r"^(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.MachineLearningServices/"
    r"workspaces/(?P<ws>[^/]+)/onlineEndpoints/(?P<name>[^/]+)(?:/(?P<op>[^/]+))?/?$",
    re.IGNORECASE,
)
_ARM_OPERATION_PATH = re.compile(
    r"^(?P<sub>[^/]+)/providers/Microsoft\.MachineLearningServices/locations/(?P<loc>[^/]+)/"
    r"(?P<kind>mfeOperationResults|mfeOperationsStatus)/(?P<id>[^/]+)/?$",
    re.IGNORECASE,
)
_KEYVAULT_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")
# Key Vault's largest secret value.
MAX_SECRET_VALUE: Final = 25 * 1024
# ARM matches action names case-insensitively; these are the canonical spellings used as counter keys.
_ARM_ACTIONS: Final = {"listkeys": "listKeys", "token": "token", "regeneratekeys": "regenerateKeys"}

_ENTRA_FAULTS: Final[dict[int, tuple[str, int, str]]] = {
    400: ("invalid_request", 90014, "The request is malformed."),
    401: ("invalid_client", 7000215, "Invalid client secret provided."),
    403: ("unauthorized_client", 700016, "The client is not authorized."),
    429: ("temporarily_unavailable", 50196, "Too many requests. The request was throttled."),
    500: ("server_error", 90034, "An internal server error occurred."),
    503: ("temporarily_unavailable", 90033, "A transient error has occurred. Please try again."),
    504: ("temporarily_unavailable", 90033, "A transient error has occurred. Please try again."),
}
_ARM_FAULT_CODES: Final = {
    400: "BadRequest",
    401: "AuthenticationFailed",
    403: "AuthorizationFailed",
    404: "ResourceNotFound",
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
_SCORE_FAULT_TEXT: Final = {
    404: "No deployment to serve the request.",
    408: "Request timed out: the model did not answer within request_timeout_ms.",
    413: "Request payload too large.",
    424: "The model container returned an error.",
    429: "Too many requests.",
    500: "Internal server error.",
    502: "Bad gateway.",
    503: "Service unavailable.",
    504: "Gateway timeout.",
}


def _now_stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _misbehaving_number(text: str | None, usual: int) -> Any:
    """`text` as a JSON number where it is a finite one ("-1", "1e308"), else as the text ("nan"); `usual`
    when no misbehaviour is set."""
    if text is None:
        return usual
    try:
        number = json.loads(text)
    except ValueError:
        return text
    finite = isinstance(number, int | float) and not isinstance(number, bool) and math.isfinite(number)
    return number if finite else text


def _first_values(body: bytes) -> dict[str, str]:
    parsed = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in parsed.items()}


def _bearer(request: Request) -> str | None:
    """The credential of an `Authorization: Bearer X` header, or None if absent or another scheme."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, credential = header.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        return None
    return credential


def _basic_client(request: Request) -> tuple[str, str] | None:
    """client_secret_basic (RFC 6749 2.3.1): both parts are form-urlencoded before base64."""
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    return (unquote_plus(client_id), unquote_plus(secret)) if sep else None


def _b64url_hex(hex_digest: str) -> str:
    return base64.urlsafe_b64encode(bytes.fromhex(hex_digest)).rstrip(b"=").decode()


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    return data


class _EntraError(Exception):
    """Raised while processing a token request; rendered as Entra ID's error body."""

    def __init__(self, status: int, error: str, code: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.code = code
        self.description = description


class _Emulator:
    def __init__(self, state: EmulatorState, base_url: str) -> None:
        self.state = state
        self.base_url = base_url.rstrip("/")

    # ================================================================= shared
    async def _take_fault(self, target: str) -> Fault | None:
        """Apply the latency part of an armed fault; return it if the request must then fail."""
        fault = self.state.take_fault(target)
        if fault is None:
            return None
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.hang_s:
            await asyncio.sleep(fault.hang_s)
        return fault if fault.fails else None

    @staticmethod
    def _retry_after(fault: Fault) -> dict[str, str]:
        return {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}

    # ================================================================= Entra ID
    def _entra_error(
        self,
        request: Request,
        status: int,
        error: str,
        code: int,
        description: str,
        headers: Mapping[str, str] | None = None,
    ) -> JSONResponse:
        trace_id = str(uuid.uuid4())
        correlation_id = request.headers.get("client-request-id") or str(uuid.uuid4())
        stamp = _now_stamp()
        body = {
            "error": error,
            "error_description": (
                f"AADSTS{code}: {self.state.entra_error_message or description} Trace ID: {trace_id} "
                f"Correlation ID: {correlation_id} "
                f"Timestamp: {stamp}"
            ),
            "error_codes": [code],
            "timestamp": stamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"{self.base_url}/error?code={code}",
        }
        all_headers = {**self._entra_headers(request), **(headers or {})}
        return JSONResponse(body, status_code=status, headers=all_headers)

    @staticmethod
    def _entra_headers(request: Request) -> dict[str, str]:
        headers = {
            "Cache-Control": "no-store, no-cache",
            "Pragma": "no-cache",
            "x-ms-request-id": str(uuid.uuid4()),
        }
        if client_request_id := request.headers.get("client-request-id"):
            headers["client-request-id"] = client_request_id
        return headers

    async def _openid_fault(self, request: Request) -> Response | None:
        fault = await self._take_fault("openid")
        if fault is None:
            return None
        status = fault.failure_status
        error, code, text = _ENTRA_FAULTS.get(status, ("server_error", 90034, "Emulated failure."))
        return self._entra_error(
            request, status, error, code, f"{text} (emulated fault)", self._retry_after(fault)
        )

    async def discovery(self, request: Request) -> Response:
        self.state.record_discovery()
        if (failed := await self._openid_fault(request)) is not None:
            return failed
        tenant = request.path_params["tenant"]
        base = f"{self.base_url}/{tenant}"
        return JSONResponse(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{base}/v2.0",
                "request_uri_parameter_supported": False,
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "tenant_region_scope": "EU",
                "cloud_instance_name": "emulator.invalid",
            }
        )

    async def discovery_v1(self, request: Request) -> Response:
        """The v1 endpoint's document: v1 issuer (`https://sts.windows.net/{tenant}/`), v1 keys path."""
        self.state.record_discovery()
        if (failed := await self._openid_fault(request)) is not None:
            return failed
        tenant = request.path_params["tenant"]
        base = f"{self.base_url}/{tenant}"
        return JSONResponse(
            {
                "token_endpoint": f"{base}/oauth2/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{self.base_url}/common/discovery/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "token id_token", "token"],
                "scopes_supported": ["openid"],
                "issuer": f"https://sts.windows.net/{tenant}/",
                "authorization_endpoint": f"{base}/oauth2/authorize",
                "end_session_endpoint": f"{base}/oauth2/logout",
                "tenant_region_scope": "EU",
                "cloud_instance_name": "emulator.invalid",
            }
        )

    async def jwks(self, request: Request) -> Response:
        """The signing keys, the same for every tenant (as Entra ID's); v2 keys name their issuer."""
        self.state.record_jwks()
        if (failed := await self._openid_fault(request)) is not None:
            return failed
        tenant = request.path_params["tenant"]
        keys = self.state.signing.jwks()
        if request.url.path.endswith("/v2.0/keys"):
            keys = [key | {"issuer": f"{self.base_url}/{tenant}/v2.0"} for key in keys]
        return JSONResponse({"keys": keys})

    async def token(self, request: Request) -> Response:
        tenant = request.path_params["tenant"]
        form = _first_values(await request.body())
        basic = _basic_client(request)
        client_id = form.get("client_id") or (basic[0] if basic else "")
        scope = form.get("scope", "")
        self.state.record_token_request(client_id, scope)

        fault = await self._take_fault("token")
        if fault is not None:
            error, code, text = _ENTRA_FAULTS.get(
                fault.failure_status,
                ("server_error", 90034, "Emulated failure.")
                if fault.failure_status >= 500
                else ("invalid_request", 90014, "Emulated failure."),
            )
            return self._entra_error(
                request,
                fault.failure_status,
                error,
                code,
                f"{text} (emulated fault)",
                self._retry_after(fault),
            )

        try:
            return self._issue_client_credentials_token(request, tenant, client_id, form, basic)
        except _EntraError as exc:
            return self._entra_error(request, exc.status, exc.error, exc.code, exc.description)

    def _issue_client_credentials_token(
        self,
        request: Request,
        tenant: str,
        client_id: str,
        form: dict[str, str],
        basic: tuple[str, str] | None,
    ) -> Response:
        grant_type = form.get("grant_type")
        if not grant_type:
            raise _EntraError(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.",
            )
        if grant_type != "client_credentials":
            raise _EntraError(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant_type}'.",
            )
        if not client_id:
            raise _EntraError(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'client_id'.",
            )
        app = self.state.get_app(tenant, client_id)
        if app is None:
            raise _EntraError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. "
                "This can happen if the application has not been installed by the administrator of the "
                "tenant or consented to by any user in the tenant. You may have sent your authentication "
                "request to the wrong tenant.",
            )

        assertion = form.get("client_assertion")
        secret = form.get("client_secret") or (basic[1] if basic else None)
        if assertion:
            if form.get("client_assertion_type") != JWT_BEARER:
                raise _EntraError(
                    400,
                    "invalid_request",
                    700025,
                    f"client_assertion_type must be '{JWT_BEARER}' when a client_assertion is sent.",
                )
            appidacr = "2"
            self._check_assertion(request, tenant, app.client_id, assertion, app)
        elif secret:
            appidacr = "1"
            if app.secret is None or not secrets.compare_digest(secret.encode(), app.secret.encode()):
                raise _EntraError(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the "
                    "client secret value, not the client secret ID, for a secret added to app "
                    f"'{app.client_id}'.",
                )
        else:
            raise _EntraError(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or "
                "'client_secret'.",
            )

        resource = self._client_credentials_resource(form.get("scope", ""), tenant)
        expires_in, refresh_in = self.state.entra_lifetimes()
        access_token = self.state.issue_token_for_resource(
            resource,
            tenant_id=app.tenant_id,
            appid=app.client_id,
            oid=app.object_id,
            lifetime_s=expires_in,
            appidacr=appidacr,
            authority=self.base_url,
        )
        sent_expires_in = _misbehaving_number(self.state.entra_expires_in, expires_in)
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "expires_in": sent_expires_in,
            "ext_expires_in": sent_expires_in,
            "access_token": access_token,
        }
        if refresh_in is not None:
            body["refresh_in"] = refresh_in
        return JSONResponse(body, headers=self._entra_headers(request))

    def _client_credentials_resource(self, scope: str, tenant: str) -> str:
        scopes = [s for s in scope.split() if s not in _RESERVED_SCOPES]
        if not scopes:
            raise _EntraError(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'scope'.",
            )
        if len(scopes) > 1:
            raise _EntraError(
                400,
                "invalid_scope",
                70011,
                f"The provided value for the input parameter 'scope' is not valid. The scope {scope} is not "
                "valid. Client credential flows accept a single resource's /.default scope.",
            )
        requested = scopes[0]
        if not requested.endswith("/.default"):
            raise _EntraError(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {requested} is not valid. Client credential flows must have a "
                "scope value with /.default suffixed to the resource identifier (application ID URI).",
            )
        resource = requested.removesuffix("/.default")
        if not self.state.knows_resource(resource):
            raise _EntraError(
                400,
                "invalid_resource",
                500011,
                f"The resource principal named {resource} was not found in the tenant named {tenant}. "
                "This can happen if the application has not been installed by the administrator of the "
                "tenant or consented to by any user in the tenant. You might have sent your authentication "
                "request to the wrong tenant.",
            )
        return resource

    def _assertion_audiences(self, request: Request, tenant: str) -> list[str]:
        # Entra ID accepts its token endpoint (v1 or v2) or its issuer as the assertion audience; the same
        # app answers on the plain-http listener too, so that listener's own URLs count as well.
        bases = {self.base_url, str(request.base_url).rstrip("/")}
        return [
            f"{base}/{tenant}/{suffix}"
            for base in bases
            for suffix in ("oauth2/v2.0/token", "oauth2/token", "v2.0")
        ]

    def _check_assertion(
        self, request: Request, tenant: str, client_id: str, assertion: str, app: RegisteredApp
    ) -> None:
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as exc:
            raise _EntraError(400, "invalid_request", 50027, "JWT token is invalid or malformed.") from exc
        # A certificate assertion is self-issued by the client (iss == client_id); anything else is a token
        # from an external identity provider presented for workload identity federation.
        if str(unverified.get("iss", "")).lower() == client_id.lower():
            self._check_certificate_assertion(request, tenant, client_id, assertion, header, app)
        else:
            self._check_federated_assertion(assertion, app)

    def _check_certificate_assertion(
        self,
        request: Request,
        tenant: str,
        client_id: str,
        assertion: str,
        header: dict[str, Any],
        app: RegisteredApp,
    ) -> None:
        sent_thumbprint = str(header.get("x5t#S256") or header.get("x5t") or "")
        # MSAL sends x5t#S256 (PS256) when given the public certificate, x5t (RS256) with a SHA-1
        # thumbprint, both base64url *with* padding, which Entra ID accepts although RFC 7515 omits it.
        sent_sha256 = str(header.get("x5t#S256") or "").rstrip("=")
        sent_sha1 = str(header.get("x5t") or "").rstrip("=")
        known = (
            app.certificate_sha256 is not None and sent_sha256 == _b64url_hex(app.certificate_sha256)
        ) or (app.certificate_sha1 is not None and sent_sha1 == _b64url_hex(app.certificate_sha1))
        if app.certificate_pem is None or not known:
            raise _EntraError(
                401,
                "invalid_client",
                700027,
                "Client assertion failed signature validation. [Reason - The key was not found., "
                f"Thumbprint of key used by client: '{sent_thumbprint}']",
            )
        if header.get("alg") not in ("RS256", "PS256"):
            raise _EntraError(
                401,
                "invalid_client",
                700027,
                f"Client assertion uses an unsupported algorithm {header.get('alg')!r}.",
            )
        public_key = x509.load_pem_x509_certificate(app.certificate_pem.encode()).public_key()
        try:
            claims = jwt.decode(
                assertion,
                public_key,  # type: ignore[arg-type]
                algorithms=["RS256", "PS256"],
                audience=self._assertion_audiences(request, tenant),
                options={"require": ["exp", "aud", "iss", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise _EntraError(
                401, "invalid_client", 700024, "Client assertion is not within its valid time range."
            ) from exc
        except jwt.InvalidAudienceError as exc:
            raise _EntraError(
                401,
                "invalid_client",
                700212,
                "Client assertion audience claim does not match the token endpoint of this tenant.",
            ) from exc
        except jwt.InvalidSignatureError as exc:
            raise _EntraError(
                401,
                "invalid_client",
                700027,
                "Client assertion failed signature validation. [Reason - The provided signature value "
                "did not match the expected signature value.]",
            ) from exc
        except jwt.PyJWTError as exc:
            raise _EntraError(400, "invalid_request", 50027, "JWT token is invalid or malformed.") from exc
        if str(claims.get("sub", "")).lower() != client_id.lower():
            raise _EntraError(
                401,
                "invalid_client",
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter.",
            )

    def _check_federated_assertion(self, assertion: str, app: RegisteredApp) -> None:
        try:
            claims = self.state.verify_federated_token(assertion)
        except TokenValidationError as exc:
            if exc.reason == "expired":
                raise _EntraError(
                    401, "invalid_client", 700024, "Client assertion is not within its valid time range."
                ) from exc
            if exc.reason == "no_match":
                raise _EntraError(
                    401,
                    "invalid_client",
                    700213,
                    "No matching federated identity record found for presented assertion issuer or audience. "
                    "Check your federated identity credential Subject, Audience and Issuer against the "
                    "presented assertion.",
                ) from exc
            raise _EntraError(
                401, "invalid_client", 700027, "Client assertion failed signature validation."
            ) from exc
        subject = str(claims.get("sub"))
        if app.federated_subject is None or subject != app.federated_subject:
            raise _EntraError(
                401,
                "invalid_client",
                700213,
                f"No matching federated identity record found for presented assertion subject '{subject}'. "
                "Check your federated identity credential Subject, Audience and Issuer against the presented "
                "assertion.",
            )

    # ================================================================= managed identity
    def _mi_token(
        self, client_id: str, object_id: str, resource_id: str, resource: str
    ) -> tuple[str, int, int]:
        lifetime = self.state.mi_lifetime()
        now = int(time.time())
        token = self.state.issue_token_for_resource(
            resource,
            tenant_id=self.state.mi_tenant_id,
            appid=client_id,
            oid=object_id,
            lifetime_s=lifetime,
            appidacr="2",
            extra_claims={"xms_mirid": resource_id},
            authority=self.base_url,
        )
        return token, now, lifetime

    async def imds(self, request: Request) -> Response:
        """Azure VM / AKS pod identity: GET /metadata/identity/oauth2/token (MSAL's default MI source)."""
        query = request.query_params
        resource = query.get("resource", "")
        identity = self.state.find_identity(
            client_id=query.get("client_id"),
            object_id=query.get("object_id"),
            resource_id=query.get("msi_res_id") or query.get("mi_res_id"),
        )
        self.state.record_mi_request(identity.client_id if identity else query.get("client_id", ""), resource)

        def error(
            status: int, name: str, description: str, headers: Mapping[str, str] | None = None
        ) -> Response:
            return JSONResponse({"error": name, "error_description": description}, status, headers=headers)

        fault = await self._take_fault("mi")
        if fault is not None:
            name = "too_many_requests" if fault.failure_status == 429 else "unknown"
            return error(
                fault.failure_status,
                name,
                "IMDS failed the request (emulated fault)",
                self._retry_after(fault),
            )
        # IMDS insists on the header so that a server-side request forgery cannot reach it.
        if request.headers.get("metadata", "").lower() != "true":
            return error(400, "invalid_request", "Required metadata header not specified")
        if not query.get("api-version"):
            return error(400, "invalid_request", "Required query variable 'api-version' is missing")
        if not resource:
            return error(400, "invalid_request", "Required query variable 'resource' is missing")
        if identity is None:
            return error(400, "invalid_request", "Identity not found")
        if not self.state.knows_resource(resource):
            return error(
                400,
                "invalid_resource",
                f"AADSTS500011: The resource principal named {resource} was not found in the tenant named "
                f"{self.state.mi_tenant_id}.",
            )
        token, now, lifetime = self._mi_token(
            identity.client_id, identity.object_id, identity.resource_id, resource
        )
        # IMDS sends every number as a string; MSAL int()s expires_in.
        return JSONResponse(
            {
                "access_token": token,
                "client_id": identity.client_id,
                "expires_in": self.state.entra_expires_in or str(lifetime),
                "expires_on": str(now + lifetime),
                "ext_expires_in": str(lifetime),
                "not_before": str(now),
                "resource": resource,
                "token_type": "Bearer",
            }
        )

    async def app_service(self, request: Request) -> Response:
        """App Service / Functions / Container Apps: GET $IDENTITY_ENDPOINT with X-IDENTITY-HEADER."""
        query = request.query_params
        resource = query.get("resource", "")
        identity = self.state.find_identity(
            client_id=query.get("client_id"),
            object_id=query.get("object_id") or query.get("principal_id"),
            resource_id=query.get("mi_res_id"),
        )
        self.state.record_mi_request(identity.client_id if identity else query.get("client_id", ""), resource)

        def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
            body = {"statusCode": status, "message": message, "correlationId": str(uuid.uuid4())}
            return JSONResponse(body, status, headers=headers)

        fault = await self._take_fault("mi")
        if fault is not None:
            return error(
                fault.failure_status,
                "The identity endpoint failed (emulated fault)",
                self._retry_after(fault),
            )
        sent = request.headers.get("x-identity-header", "")
        if not sent or not secrets.compare_digest(sent.encode(), self.state.identity_header.encode()):
            return error(401, "Unauthorized. The X-IDENTITY-HEADER header is missing or invalid.")
        if query.get("api-version") != "2019-08-01":
            return error(400, "The api-version parameter is missing or not supported; use 2019-08-01.")
        if not resource:
            return error(400, "The resource parameter is required.")
        if identity is None:
            return error(400, "Unable to load the proper Managed Identity.")
        if not self.state.knows_resource(resource):
            return error(500, f"AADSTS500011: The resource principal named {resource} was not found.")
        token, now, lifetime = self._mi_token(
            identity.client_id, identity.object_id, identity.resource_id, resource
        )
        return JSONResponse(
            {
                "access_token": token,
                "expires_on": str(now + lifetime),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": identity.client_id,
            }
        )

    # ================================================================= ARM
    @staticmethod
    def _arm_headers(request: Request) -> dict[str, str]:
        request_id = str(uuid.uuid4())
        return {
            "x-ms-request-id": request_id,
            "x-ms-correlation-request-id": request.headers.get("x-ms-correlation-request-id") or request_id,
        }

    def _arm_error(
        self, request: Request, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> JSONResponse:
        body = {"error": {"code": code, "message": self.state.arm_error_message or message}}
        return JSONResponse(body, status, headers={**self._arm_headers(request), **(headers or {})})

    def _arm_auth_error(self, request: Request, code: str, message: str) -> JSONResponse:
        challenge = (
            f'Bearer authorization_uri="{self.base_url}/common", error="invalid_token", '
            f'error_description="{message}"'
        )
        return self._arm_error(request, 401, code, message, {"WWW-Authenticate": challenge})

    def _check_arm_token(self, request: Request) -> JSONResponse | None:
        header = request.headers.get("authorization")
        if not header:
            return self._arm_auth_error(
                request,
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is missing.",
            )
        token = _bearer(request)
        if token is None:
            return self._arm_auth_error(
                request,
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is provided in an invalid format.",
            )
        try:
            self.state.verify_access_token(token, audiences=_ARM_AUDIENCES)
        except TokenValidationError as exc:
            if exc.reason == "expired":
                return self._arm_auth_error(
                    request,
                    "ExpiredAuthenticationToken",
                    "The access token expiry UTC time is earlier than current UTC time.",
                )
            if exc.reason == "wrong_audience":
                return self._arm_auth_error(
                    request,
                    "InvalidAuthenticationTokenAudience",
                    "The access token has been obtained for wrong audience or resource. It should exactly "
                    "match with one of the allowed audiences 'https://management.core.windows.net/', "
                    "'https://management.azure.com/'.",
                )
            return self._arm_auth_error(request, "InvalidAuthenticationToken", "The access token is invalid.")
        return None

    async def arm(self, request: Request) -> Response:
        path = request.path_params["path"]
        endpoint = _ARM_ENDPOINT_PATH.match(path)
        operation_result = None if endpoint else _ARM_OPERATION_PATH.match(path)
        if endpoint is not None:
            op_segment = endpoint.group("op")
            operation = "get" if op_segment is None else _ARM_ACTIONS.get(op_segment.lower())
            expected_method = "GET" if op_segment is None else "POST"
        elif operation_result is not None:
            operation, expected_method = "operationResult", "GET"
        else:
            operation, expected_method = None, ""
        if operation is None:
            return self._arm_error(
                request, 404, "ResourceNotFound", "The resource or action was not found by the emulator."
            )
        if request.method != expected_method:
            return self._arm_error(
                request,
                405,
                "MethodNotAllowed",
                f"The requested method {request.method} is not allowed for this resource.",
            )
        self.state.record_arm_call(operation)

        fault = await self._take_fault("arm")
        if fault is not None:
            return self._arm_error(
                request,
                fault.failure_status,
                _ARM_FAULT_CODES.get(fault.failure_status, "InternalServerError"),
                "The request failed (emulated fault).",
                self._retry_after(fault),
            )
        if (auth_error := self._check_arm_token(request)) is not None:
            return auth_error
        api_version = request.query_params.get("api-version")
        if not api_version:
            return self._arm_error(
                request,
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        headers = self._arm_headers(request)
        if operation == "listKeys":
            keys = self.state.keys()
            return JSONResponse(
                {"primaryKey": keys["primary"], "secondaryKey": keys["secondary"]}, headers=headers
            )
        if operation == "token":
            token, expiry, refresh_after = self.state.issue_aml_token()
            body = {
                "accessToken": token,
                "expiryTimeUtc": self.state.aml_token_expiry or expiry,
                "refreshAfterTimeUtc": self.state.aml_token_refresh_after or refresh_after,
                "tokenType": "Bearer",
            }
            return JSONResponse(body, headers=headers)
        if operation == "regenerateKeys":
            assert endpoint is not None
            return await self._regenerate_keys(request, endpoint.group("sub"), api_version, headers)
        if operation == "get":
            assert endpoint is not None
            return JSONResponse(
                self._endpoint_resource(request, path, endpoint.group("name")), headers=headers
            )
        assert operation_result is not None
        status = self.state.poll_operation(operation_result.group("id"))
        if status is None:
            return self._arm_error(request, 404, "ResourceNotFound", "The operation was not found.")
        retry = {"Retry-After": self._lro_retry_after()}
        if operation_result.group("kind").lower() == "mfeoperationsstatus":  # Azure-AsyncOperation
            answer: dict[str, Any] = {"id": operation_result.group("id"), "status": status}
            if status == "Failed":
                answer["error"] = {"code": "InternalServerError", "message": "Regenerating the key failed."}
            return JSONResponse(answer, headers={**headers, **(retry if status == "InProgress" else {})})
        if status == "InProgress":  # Location: 202 while running, 200 when done, the error if it failed
            return Response(status_code=202, headers={**headers, **retry})
        if status == "Failed":
            return self._arm_error(request, 500, "InternalServerError", "Regenerating the key failed.")
        return Response(status_code=200, headers=headers)

    async def _regenerate_keys(
        self, request: Request, subscription: str, api_version: str, headers: dict[str, str]
    ) -> Response:
        try:
            body = await _json_body(request)
        except ValueError:
            return self._arm_error(request, 400, "InvalidRequestContent", "The request content was invalid.")
        key_type = body.get("keyType")
        key_value = body.get("keyValue")
        if not isinstance(key_type, str) or key_type.lower() not in ("primary", "secondary"):
            return self._arm_error(request, 400, "BadArgument", "keyType must be 'Primary' or 'Secondary'.")
        if key_value is not None and (not isinstance(key_value, str) or not key_value.strip()):
            return self._arm_error(request, 400, "BadArgument", "keyValue must be a non-empty string.")
        fault = await self._take_fault("regenerate")
        if fault is not None:
            status = fault.failure_status
            code = _ARM_FAULT_CODES.get(status, "InternalServerError")
            return self._arm_error(
                request, status, code, "The request failed (emulated fault).", self._retry_after(fault)
            )
        if await self._take_fault("lro") is not None:
            operation_id = self.state.start_operation("Failed")  # the key stays as it was
        else:
            self.state.regenerate_key(key_type.lower(), key_value)
            operation_id = self.state.start_operation("Succeeded")
        origin = self.state.lro_operation_origin or str(request.base_url)
        operations = (
            f"{origin.rstrip('/')}/subscriptions/{subscription}/providers/"
            f"Microsoft.MachineLearningServices/locations/emulator"
        )
        headers = {
            **headers,
            "Location": f"{operations}/mfeOperationResults/{operation_id}?api-version={api_version}",
            "Azure-AsyncOperation": (
                f"{operations}/mfeOperationsStatus/{operation_id}?api-version={api_version}"
            ),
            "Retry-After": self._lro_retry_after(),
        }
        return Response(status_code=202, headers=headers)

    def _lro_retry_after(self) -> str:
        text = self.state.lro_retry_after
        return str(self.state.lro_retry_after_s) if text is None else text

    # ================================================================= Key Vault
    def _vault_error(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        inner: str | None = None,
    ) -> JSONResponse:
        error: dict[str, Any] = {"code": code, "message": self.state.keyvault_error_message or message}
        if inner is not None:
            error["innererror"] = {"code": inner}
        return JSONResponse({"error": error}, status, headers=headers)

    def _vault_challenge(self) -> dict[str, str]:
        """Key Vault's answer to a missing or refused token carries where to get one, and for what."""
        return {
            "WWW-Authenticate": (
                f'Bearer authorization="{self.base_url}/common", resource="{KEYVAULT_RESOURCE}"'
            )
        }

    def _check_vault_token(self, request: Request) -> JSONResponse | None:
        challenge = self._vault_challenge()
        token = _bearer(request)
        if token is None:
            return self._vault_error(
                401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.", challenge
            )
        try:
            self.state.verify_access_token(token, audiences=(KEYVAULT_RESOURCE,))
        except TokenValidationError as exc:
            if exc.reason == "wrong_audience":
                message = f"AKV10022: Invalid audience. Expected {KEYVAULT_RESOURCE}."
            elif exc.reason == "expired":
                message = "AKV10032: Invalid issuer or the token has expired."
            else:
                message = "AKV10000: The access token is invalid."
            return self._vault_error(401, "Unauthorized", message, challenge)
        return None

    async def keyvault(self, request: Request) -> Response:
        name = request.path_params["name"]
        version = request.path_params.get("version")
        self.state.record_keyvault_request(request.method, name)
        refused = await self._vault_request_refused(request, name)
        if refused is not None:
            return refused
        if request.method == "PUT":
            return await self._put_secret(request, name, version)
        if request.method == "PATCH":
            return await self._update_secret(request, name, version)
        found = self.state.get_secret(name, version)
        if found is None:
            named = f"{name}/{version}" if version else name
            text = f"A secret with (name/id) {named} was not found in this key vault."
            return self._vault_error(404, "SecretNotFound", text)
        if not found.enabled:
            # Key Vault never serves a disabled version, nor an older one in its place.
            return self._vault_error(
                403, "Forbidden", "Operation get is not allowed on a disabled secret.", inner="SecretDisabled"
            )
        return JSONResponse(found.bundle(self.vault_url(request), name))

    async def keyvault_versions(self, request: Request) -> Response:
        """`GET /secrets/{name}/versions`: every version's id, attributes and tags, never a value."""
        name = request.path_params["name"]
        self.state.record_keyvault_request("LIST", name)
        refused = await self._vault_request_refused(request, name)
        if refused is not None:
            return refused
        versions = self.state.secret_version_list(name)
        if not versions:
            text = f"A secret with (name/id) {name} was not found in this key vault."
            return self._vault_error(404, "SecretNotFound", text)
        base = self.vault_url(request)
        items = [v.bundle(base, name, with_value=False) for v in versions]
        return JSONResponse({"value": items, "nextLink": None})

    async def _vault_request_refused(self, request: Request, name: str) -> Response | None:
        """What every Key Vault request passes first: faults, the token, api-version, the name."""
        fault = await self._take_fault("keyvault")
        if fault is not None:
            status = fault.failure_status
            if status == 401:  # the token refused, as Key Vault refuses one: its challenge comes along
                return self._vault_error(
                    401,
                    "Unauthorized",
                    "AKV10032: Invalid issuer or the token has expired (emulated fault).",
                    {**self._vault_challenge(), **self._retry_after(fault)},
                )
            code = "Throttled" if status == 429 else "InternalServerError" if status >= 500 else "Forbidden"
            return self._vault_error(
                status, code, "The request failed (emulated fault).", self._retry_after(fault)
            )
        if (auth_error := self._check_vault_token(request)) is not None:
            return auth_error
        if not request.query_params.get("api-version"):
            return self._vault_error(400, "BadParameter", "The api-version query parameter is missing.")
        if not _KEYVAULT_NAME.match(name):
            return self._vault_error(400, "BadParameter", "The secret name is invalid.")
        return None

    async def _put_secret(self, request: Request, name: str, version: str | None) -> Response:
        if version:
            return self._vault_error(405, "MethodNotAllowed", "PUT creates a new version; omit it.")
        try:
            body = await _json_body(request)
        except ValueError:
            return self._vault_error(400, "BadParameter", "The request body is not JSON.")
        value = body.get("value")
        # Key Vault stores an empty value as a version like any other.
        if not isinstance(value, str) or len(value) > MAX_SECRET_VALUE:
            return self._vault_error(400, "BadParameter", "value must be a string of at most 25 KB.")
        tags = _vault_tags(body.get("tags"))
        if tags is None:
            return self._vault_error(400, "BadParameter", "tags must map names to strings.")
        new_version = self.state.set_secret(name, value, tags=tags)
        stored = self.state.get_secret(name, new_version)
        assert stored is not None
        return JSONResponse(stored.bundle(self.vault_url(request), name))

    async def _update_secret(self, request: Request, name: str, version: str | None) -> Response:
        """`PATCH /secrets/{name}/{version}` (UpdateSecret): `attributes.enabled` and `tags`."""
        if not version:
            return self._vault_error(405, "MethodNotAllowed", "PATCH needs the version in the path.")
        try:
            body = await _json_body(request)
        except ValueError:
            return self._vault_error(400, "BadParameter", "The request body is not JSON.")
        attributes = body.get("attributes") or {}
        enabled = attributes.get("enabled") if isinstance(attributes, dict) else None
        if enabled is not None and not isinstance(enabled, bool):
            return self._vault_error(400, "BadParameter", "attributes.enabled must be true or false.")
        tags = None if "tags" not in body else _vault_tags(body["tags"])
        if "tags" in body and tags is None:
            return self._vault_error(400, "BadParameter", "tags must map names to strings.")
        updated = self.state.update_secret(name, version, enabled=enabled, tags=tags)
        if updated is None:
            text = f"A secret with (name/id) {name}/{version} was not found in this key vault."
            return self._vault_error(404, "SecretNotFound", text)
        return JSONResponse(updated.bundle(self.vault_url(request), name, with_value=False))

    @staticmethod
    def vault_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    def _endpoint_resource(self, request: Request, path: str, name: str) -> dict[str, Any]:
        base = str(request.base_url).rstrip("/")
        return {
            "id": f"/subscriptions/{path}",
            "name": name,
            "type": "Microsoft.MachineLearningServices/workspaces/onlineEndpoints",
            "location": "emulator",
            "kind": "Managed",
            "identity": {"type": "SystemAssigned"},
            "properties": {
                "authMode": "Key",
                "scoringUri": f"{base}/score",
                "swaggerUri": f"{base}/swagger.json",
                "traffic": {self.state.deployment: 100},
                "provisioningState": "Succeeded",
            },
        }

    # ================================================================= scoring
    def _authenticate_score(self, request: Request) -> tuple[str | None, str | None]:
        """(auth kind, None) on success, (None, reason) on failure. Accepts every endpoint auth mode."""
        if not request.headers.get("authorization"):
            return None, "missing_header"
        credential = _bearer(request)
        if credential is None:
            return None, "bad_header"
        slot = self.state.match_key(credential)
        if slot is not None:
            return f"key:{slot}", None
        aml_problem = self.state.check_aml_token(credential)
        if aml_problem is None:
            return "aml_token", None
        if aml_problem == "expired":
            return None, "aml_token_expired"
        if credential.count(".") != 2:
            return None, "unknown_key"
        try:
            self.state.verify_access_token(credential, audiences=(AML_RESOURCE,))
        except TokenValidationError as exc:
            return None, f"aad_token_{exc.reason}"
        return "aad_token", None

    async def score(self, request: Request) -> Response:
        started = time.perf_counter()
        request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        headers = {
            "x-ms-server-version": SERVER_VERSION,
            "x-request-id": request_id,
            "x-ms-request-id": request_id,
        }
        client_request_id = request.headers.get("x-ms-client-request-id")
        if client_request_id is not None:
            headers["x-ms-client-request-id"] = client_request_id
        deployment = request.headers.get("azureml-model-deployment") or self.state.deployment
        headers["azureml-model-deployment"] = deployment

        def finish(
            response: Response, outcome: str, auth: str | None = None, reason: str | None = None
        ) -> Response:
            self.state.record_score(outcome, auth=auth, reason=reason, request_id=request_id)
            return response

        fault = await self._take_fault("score")
        if fault is not None:
            status = fault.failure_status
            fault_headers = {**headers, **self._retry_after(fault)}
            if status == 424:
                fault_headers |= {
                    "ms-azureml-model-error-statuscode": "500",
                    "ms-azureml-model-error-reason": "model_error",
                }
            text = _SCORE_FAULT_TEXT.get(status, "Request failed.")
            return finish(PlainTextResponse(text, status, headers=fault_headers), str(status), reason="fault")

        if len(request_id) > MAX_REQUEST_ID_LEN or len(client_request_id or "") > MAX_REQUEST_ID_LEN:
            message = {"message": f"Request id headers must be at most {MAX_REQUEST_ID_LEN} characters."}
            return finish(JSONResponse(message, 431, headers=headers), "431", reason="header_too_long")

        auth, reason = self._authenticate_score(request)
        if auth is None:
            # The front end answers auth failures with a bare status word, e.g. key_auth_access_denied.
            text = (
                "key_auth_bad_header_forbidden"
                if reason in ("missing_header", "bad_header")
                else ("key_auth_access_denied")
            )
            return finish(PlainTextResponse(text, 401, headers=headers), "401", reason=reason)

        if request.method == "POST":
            content_length = request.headers.get("content-length", "")
            if content_length.isdigit() and int(content_length) > MAX_SCORE_BODY:
                return finish(
                    PlainTextResponse("Request payload too large.", 413, headers=headers), "413", auth
                )
            raw: bytes | None = await request.body()
            if len(raw or b"") > MAX_SCORE_BODY:
                return finish(
                    PlainTextResponse("Request payload too large.", 413, headers=headers), "413", auth
                )
        else:
            # azmlinfsrv hands a GET's query string to run(); here `?data=[[...]]` carries the rows.
            query_data = request.query_params.get("data")
            raw = None if query_data is None else f'{{"data": {query_data}}}'.encode()

        try:
            async with self.state.capacity.slot(deployment):  # the deployment's concurrency, as Azure's
                return await self._run_model(raw, headers, started, finish, auth)
        except Throttled:
            text = _SCORE_FAULT_TEXT[429]
            return finish(PlainTextResponse(text, 429, headers=headers), "429", auth, reason="capacity")

    async def _run_model(
        self,
        raw: bytes | None,
        headers: dict[str, str],
        started: float,
        finish: Callable[..., Response],
        auth: str | None,
    ) -> Response:
        if self.state.score_delay_s:
            await asyncio.sleep(self.state.score_delay_s)

        run_started = time.perf_counter()
        try:
            result = _run_scoring_script(raw)
        except Exception:
            headers |= {
                "x-ms-run-function-failed": "True",
                "x-ms-run-fn-exec-ms": f"{(time.perf_counter() - run_started) * 1000:.3f}",
            }
            body = {"message": RUN_FAILED_MESSAGE}
            return finish(JSONResponse(body, 500, headers=headers), "500", auth, reason="run_failed")
        headers["x-ms-run-fn-exec-ms"] = f"{(time.perf_counter() - run_started) * 1000:.3f}"
        headers["x-ms-total-exec-ms"] = f"{(time.perf_counter() - started) * 1000:.3f}"
        # run() returned json.dumps(labels); azmlinfsrv JSON-encodes that string again on the wire.
        return finish(
            Response(json.dumps(result), 200, headers=headers, media_type="application/json"), "ok", auth
        )

    async def health(self, request: Request) -> Response:
        return PlainTextResponse("Healthy")

    async def swagger(self, request: Request) -> Response:
        auth, _ = self._authenticate_score(request)
        if auth is None:
            return PlainTextResponse("key_auth_access_denied", 401)
        return JSONResponse(_swagger_document())

    # ================================================================= admin
    async def admin_state(self, request: Request) -> Response:
        return JSONResponse(self.state.snapshot())

    async def admin_regenerate(self, request: Request) -> Response:
        try:
            body = await _json_body(request)
            slot = body.get("slot", "primary")
            value = body.get("value")
            if not isinstance(slot, str) or (value is not None and not isinstance(value, str)):
                raise ValueError("slot and value must be strings")
            key = self.state.regenerate_key(slot, value)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse({"slot": slot.lower(), "key": key})

    async def admin_set_secret(self, request: Request) -> Response:
        """A new version of a Key Vault secret, without a token: `{"name": ..., "value": ...}`."""
        try:
            body = await _json_body(request)
            name, value = body.get("name"), body.get("value")
            if not isinstance(name, str) or not _KEYVAULT_NAME.match(name):
                raise ValueError("name must be a Key Vault secret name (letters, digits, '-')")
            if not isinstance(value, str):
                raise ValueError("value must be a string (empty is allowed, as in Key Vault)")
            version = self.state.set_secret(name, value)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse({"name": name, "version": version})

    async def admin_update_secret(self, request: Request) -> Response:
        """Enable or disable a version of a Key Vault secret (the current one without `version`), without a
        token: `{"enabled": false, "version": optional}`."""
        name = request.path_params["name"]
        try:
            body = await _json_body(request)
            enabled, version = body.get("enabled"), body.get("version")
            if not isinstance(enabled, bool) or (version is not None and not isinstance(version, str)):
                raise ValueError("enabled must be true or false, version a version id")
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        updated = self.state.update_secret(name, version, enabled=enabled)
        if updated is None:
            return JSONResponse({"error": f"no such secret or version: {name}"}, 404)
        return JSONResponse({"name": name, "version": updated.version, "enabled": updated.enabled})

    async def admin_set_fault(self, request: Request) -> Response:
        try:
            body = await _json_body(request)
            unknown = set(body) - {"target", "status", "retry_after", "count", "hang_s", "delay_s", "skip"}
            if unknown:
                raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
            for name in ("status", "retry_after", "count", "skip"):
                if body.get(name) is not None and (type(body[name]) is not int):
                    raise ValueError(f"{name} must be an integer")
            for name in ("hang_s", "delay_s"):
                if body.get(name) is not None and (
                    isinstance(body[name], bool) or not isinstance(body[name], int | float)
                ):
                    raise ValueError(f"{name} must be a number")
            fault = self.state.set_fault(
                str(body.get("target")),
                status=body.get("status"),
                retry_after=body.get("retry_after"),
                count=body.get("count"),
                hang_s=body.get("hang_s"),
                delay_s=body.get("delay_s"),
                skip=body.get("skip") or 0,
            )
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse(fault.to_json())

    async def admin_deployment(self, request: Request) -> Response:
        """`{"name": "blue", "max_concurrent": 4, "max_queued": 0}`: the deployment's capacity."""
        try:
            body = await _json_body(request)
            unknown = set(body) - {"name", "max_concurrent", "max_queued"}
            if unknown:
                raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
            name = body.get("name", self.state.deployment)
            limit, queued = body.get("max_concurrent"), body.get("max_queued", 0)
            if not isinstance(name, str) or not name:
                raise ValueError("name must be a deployment name")
            if (limit is not None and type(limit) is not int) or type(queued) is not int:
                raise ValueError(
                    "max_concurrent and max_queued must be integers (max_concurrent may be null)"
                )
            self.state.capacity.set(name, limit, queued)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse(self.state.capacity.snapshot().get(name, {"name": name, "max_concurrent": None}))

    async def admin_clear_faults(self, request: Request) -> Response:
        return JSONResponse({"cleared": self.state.clear_faults(request.query_params.get("target"))})

    async def admin_reset_counters(self, request: Request) -> Response:
        self.state.reset_counters()
        return JSONResponse({"reset": True})

    async def admin_config(self, request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(self.state.config())
        try:
            return JSONResponse(self.state.configure(**await _json_body(request)))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)

    async def admin_add_app(self, request: Request) -> Response:
        try:
            body = await _json_body(request)
            app = self.state.add_app(
                str(body["tenant_id"]),
                str(body["client_id"]),
                secret=body.get("secret"),
                certificate_pem=body.get("certificate_pem"),
                federated_subject=body.get("federated_subject"),
            )
        except (KeyError, ValueError) as exc:
            return JSONResponse({"error": f"invalid app: {exc}"}, 400)
        return JSONResponse(app.public_json())

    async def admin_add_identity(self, request: Request) -> Response:
        try:
            body = await _json_body(request)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        identity = self.state.add_user_assigned_identity(body.get("client_id"), name=body.get("name"))
        return JSONResponse(identity.to_json())

    async def admin_federated_token(self, request: Request) -> Response:
        try:
            body = await _json_body(request)
            subject = body["subject"]
            lifetime = float(body.get("lifetime_s", 3600))
        except (KeyError, ValueError, TypeError) as exc:
            return JSONResponse({"error": f"need a subject: {exc}"}, 400)
        return JSONResponse({"token": self.state.issue_federated_token(str(subject), lifetime_s=lifetime)})

    async def admin_revoke_aml_tokens(self, request: Request) -> Response:
        return JSONResponse({"revoked": self.state.revoke_aml_tokens()})

    # ----------------------------------------------------------------- caller tokens (APIs, signing keys)
    async def admin_rotate_signing_key(self, request: Request) -> Response:
        kid = self.state.signing.rotate()
        return JSONResponse({"kid": kid, "published": self.state.signing.kids()})

    async def admin_retire_signing_keys(self, request: Request) -> Response:
        removed = self.state.signing.retire()
        return JSONResponse({"removed": removed, "published": self.state.signing.kids()})

    async def admin_add_api(self, request: Request) -> Response:
        try:
            body = await _json_body(request)
            unknown = set(body) - {
                "tenant_id",
                "client_id",
                "identifier_uri",
                "app_roles",
                "access_token_version",
            }
            if unknown:
                raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
            roles = body.get("app_roles", [])
            if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
                raise ValueError("app_roles must be a list of role values")
            api = self.state.apis.add(
                str(body["tenant_id"]),
                identifier_uri=body.get("identifier_uri"),
                client_id=body.get("client_id"),
                app_roles=roles,
                access_token_version=body.get("access_token_version"),
            )
        except (KeyError, ValueError) as exc:
            return JSONResponse({"error": f"invalid API: {exc}"}, 400)
        return JSONResponse(api.to_json())

    async def admin_update_api(self, request: Request) -> Response:
        try:
            body = await _json_body(request)
            if set(body) != {"access_token_version"}:
                raise ValueError('give exactly {"access_token_version": 1, 2 or null}')
            api = self.state.apis.set_token_version(
                request.path_params["client_id"], body["access_token_version"]
            )
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse(api.to_json())

    async def admin_assign_role(self, request: Request) -> Response:
        try:
            body = await _json_body(request)
            principal, role = body.get("principal"), body.get("role")
            if not isinstance(principal, str) or not isinstance(role, str):
                raise ValueError('give the principal\'s client id and the role: {"principal", "role"}')
            api_client_id = request.path_params["client_id"]
            if request.method == "DELETE":
                self.state.apis.unassign(api_client_id, principal, role)
            else:
                self.state.apis.assign(api_client_id, principal, role)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse({"principal": principal, "role": role, "assigned": request.method != "DELETE"})


def _vault_tags(value: Any) -> dict[str, str] | None:
    """A secret's tags as Key Vault takes them (name -> string), {} when absent, None when malformed."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return None
    return dict(value)


def _run_scoring_script(raw: bytes | None) -> str:
    """What the seed's score.py does: `run(raw_data)` parses the JSON and returns json.dumps(labels)."""
    if raw is None:
        raise ValueError("no input data")
    rows = json.loads(raw)["data"]
    return json.dumps(predict(rows))


def _swagger_document() -> dict[str, Any]:
    return {
        "swagger": "2.0",
        "info": {
            "title": "ML service",
            "description": "API specification for the Azure Machine Learning service ML service",
            "version": "1.0",
        },
        "schemes": ["https"],
        "consumes": ["application/json"],
        "produces": ["application/json"],
        "securityDefinitions": {
            "Bearer": {
                "type": "apiKey",
                "name": "Authorization",
                "in": "header",
                "description": "For example: Bearer abc123",
            }
        },
        "paths": {
            "/": {
                "get": {
                    "operationId": "ServiceHealthCheck",
                    "description": "Simple health check to ensure the service is up at any given point.",
                    "responses": {"200": {"description": "The service is up; the body is 'Healthy'."}},
                }
            },
            "/score": {
                "post": {
                    "operationId": "RunMLService",
                    "description": "Run web service's model and get the prediction output",
                    "security": [{"Bearer": []}],
                    "parameters": [
                        {
                            "name": "serviceInputPayload",
                            "in": "body",
                            "description": "The input payload for the real-time machine learning service.",
                            "schema": {"$ref": "#/definitions/ServiceInput"},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "The service processed the input and returned a prediction.",
                            "schema": {"$ref": "#/definitions/ServiceOutput"},
                        },
                        "default": {
                            "description": "The service failed to execute due to an error.",
                            "schema": {"$ref": "#/definitions/ErrorResponse"},
                        },
                    },
                }
            },
        },
        "definitions": {
            "ServiceInput": {
                "type": "object",
                "properties": {
                    "data": {
                        "type": "array",
                        "items": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
                    }
                },
                "example": {"data": [[5.1, 3.5, 1.4, 0.2]]},
            },
            "ServiceOutput": {
                "type": "string",
                "description": "A JSON document (list of labels) encoded as a JSON string.",
                "example": '["setosa"]',
            },
            "ErrorResponse": {"type": "object", "properties": {"message": {"type": "string"}}},
        },
    }


_Handler = Callable[[Request], Awaitable[Response]]


def create_app(state: EmulatorState, *, base_url: str) -> Starlette:
    """Build the emulator app. `base_url` (https) is what Entra ID's discovery document advertises."""
    emulator = _Emulator(state, base_url)

    def route(path: str, endpoint: _Handler, *methods: str) -> Route:
        return Route(path, endpoint, methods=list(methods))

    admin = [
        route("/state", emulator.admin_state, "GET"),
        route("/keys/regenerate", emulator.admin_regenerate, "POST"),
        route("/secrets", emulator.admin_set_secret, "POST"),
        route("/secrets/{name}", emulator.admin_update_secret, "PATCH"),
        route("/faults", emulator.admin_set_fault, "POST"),
        route("/faults", emulator.admin_clear_faults, "DELETE"),
        route("/deployments", emulator.admin_deployment, "POST"),
        route("/reset-counters", emulator.admin_reset_counters, "POST"),
        route("/config", emulator.admin_config, "GET", "POST"),
        route("/apps", emulator.admin_add_app, "POST"),
        route("/identities", emulator.admin_add_identity, "POST"),
        route("/federated-token", emulator.admin_federated_token, "POST"),
        route("/aml-tokens/revoke", emulator.admin_revoke_aml_tokens, "POST"),
        route("/signing-keys/rotate", emulator.admin_rotate_signing_key, "POST"),
        route("/signing-keys/retire", emulator.admin_retire_signing_keys, "POST"),
        route("/apis", emulator.admin_add_api, "POST"),
        route("/apis/{client_id}", emulator.admin_update_api, "PATCH"),
        route("/apis/{client_id}/role-assignments", emulator.admin_assign_role, "POST", "DELETE"),
    ]
    routes = [
        route("/", emulator.health, "GET"),
        route("/score", emulator.score, "GET", "POST"),
        route("/swagger.json", emulator.swagger, "GET"),
        route("/metadata/identity/oauth2/token", emulator.imds, "GET"),
        route("/msi/token", emulator.app_service, "GET"),
        route("/subscriptions/{path:path}", emulator.arm, "GET", "POST", "PUT", "PATCH", "DELETE"),
        route("/secrets/{name}", emulator.keyvault, "GET", "PUT"),
        route("/secrets/{name}/versions", emulator.keyvault_versions, "GET"),
        route("/secrets/{name}/{version}", emulator.keyvault, "GET", "PATCH"),
        Mount("/_emulator", routes=admin),
        route("/{tenant}/v2.0/.well-known/openid-configuration", emulator.discovery, "GET"),
        route("/{tenant}/discovery/v2.0/keys", emulator.jwks, "GET"),
        route("/{tenant}/.well-known/openid-configuration", emulator.discovery_v1, "GET"),
        route("/{tenant}/discovery/keys", emulator.jwks, "GET"),
        route("/{tenant}/oauth2/v2.0/token", emulator.token, "POST"),
    ]
    return Starlette(routes=routes)
