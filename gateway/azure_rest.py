"""One way to call Azure's REST APIs (ARM, Key Vault): token, egress, 401, errors, Retry-After, operations.

`AzureRest.call` is the only place where the gateway sends a request to an Azure service with a token:

- the token for the call's scope comes from the gateway's one token cache (`TokenEntry`);
- the request goes through the process's one httpx client for Azure APIs, built by
  `Egress.httpx_async_client`: the TLS trust of `tls.ca_bundle` and the egress policy (proxy, `no_proxy`,
  `proxy_auth`), never CA or proxy variables from the environment, no redirects;
- a 401 makes the token be fetched again once (single flight in the cache) and the request re-sent;
- the whole exchange, the answer's body included, is bounded by a timeout, and a body larger than
  `MAX_ANSWER_BYTES` is not read;
- Azure's error body `{"error": {"code", "message", "innererror"}}` becomes a message that is short
  (`MAX_MESSAGE_CHARS`), on one line, free of control characters and of registered secrets, so that
  `/readyz`, a log line or a command's output can show it whatever Azure (or a stand-in) sent;
- `Retry-After` is a number of seconds within [`RETRY_AFTER_MIN_S`, `RETRY_AFTER_MAX_S`]; anything
  else (absent, a date, `nan`, `inf`, garbage) counts as the caller's default;
- a long-running operation (`Azure-AsyncOperation`, else `Location`) is followed only on the https
  origin it was started on: an operation URL on another host or in plain http stops the wait with an
  error, and the token never goes there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from gateway import redaction
from gateway.credentials.base import Grant
from gateway.egress import Egress
from gateway.errors import CredentialUnavailable
from gateway.tokens import TokenEntry

DEFAULT_TIMEOUT_S = 30.0
# Error messages from Azure as shown anywhere (readiness, logs, CLI output): at most this long.
MAX_MESSAGE_CHARS = 500
# No answer of ARM or Key Vault comes near this (a secret bundle is at most ~150 KB, escaped).
MAX_ANSWER_BYTES = 8 * 1024 * 1024
RETRY_AFTER_MIN_S = 1.0
RETRY_AFTER_MAX_S = 60.0
# Polls of a long-running operation without a usable Retry-After.
OPERATION_POLL_S = 5.0

# C0 and C1 controls, DEL, line/paragraph separators and the bidirectional overrides: whatever could
# rewrite a terminal line or a log record. Replaced by a space, then runs of spaces collapse.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")

Pause = Callable[[float], Awaitable[None]]


def clean_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Text from Azure as the gateway shows it: one line, no control characters, no registered secret,
    at most `limit` characters (an ellipsis marks a cut)."""
    head = text[: limit * 4]  # bounded work, whatever the size of what arrived
    flat = " ".join(_CONTROL.sub(" ", head).split())
    flat = redaction.redact(flat)
    if len(flat) > limit or len(text) > len(head):
        return flat[: limit - 1] + "…"
    return flat


def retry_after_s(value: str | None, default: float) -> float:
    """A Retry-After header as a wait in seconds, within [RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S]. Absent,
    an HTTP date, or not a finite number: `default` (clamped the same way)."""
    seconds = default
    if value is not None:
        with contextlib.suppress(ValueError):
            parsed = float(value.strip())
            if math.isfinite(parsed):
                seconds = parsed
    return min(max(seconds, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of a URL: what messages name (never a path, a query or credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def transport_problem(endpoint: str, exc: httpx.HTTPError) -> tuple[str, str]:
    """(message, hint) for a request to `endpoint` that failed below HTTP."""
    text = clean_message(str(exc)) or type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (
            f"the TLS certificate of {endpoint} is not trusted: {text}",
            "set tls.ca_bundle to a PEM file with the CA that signed it (CA variables in the environment "
            "are ignored)",
        )
    return (
        f"cannot reach {endpoint}: {type(exc).__name__}: {text}",
        "check DNS, proxies and firewalls between this host and it",
    )


class AzureError(Exception):
    """An Azure REST call failed. `message` names the service and resource and what it answered (already
    cleaned: short, one line, no secret); `hint` says what to do; `code` is Azure's error code (the inner
    one when there is one); `retry_after` is set for throttling and server errors."""

    def __init__(
        self,
        message: str,
        *,
        hint: str = "",
        status: int | None = None,
        code: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.status = status
        self.code = code
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class AzureTokenUnavailable(AzureError):
    """No token for the call's scope could be had: nothing was sent."""


@dataclass(frozen=True)
class AzureAnswer:
    """An answer read whole: status, headers and at most MAX_ANSWER_BYTES of body."""

    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None

    def json_object(self) -> dict[str, Any]:
        data = self.json()
        return data if isinstance(data, dict) else {}

    def error(self) -> tuple[str, str, str]:
        """(code, inner code, message) of Azure's error body, each cleaned; empty strings when absent."""
        error = self.json_object().get("error")
        if not isinstance(error, dict):
            return "", "", ""
        inner = error.get("innererror")
        inner_code = inner.get("code") if isinstance(inner, dict) else None
        return (
            clean_message(str(error.get("code") or ""), 100),
            clean_message(str(inner_code or ""), 100),
            clean_message(str(error.get("message") or "")),
        )

    def retry_after(self, default: float) -> float:
        return retry_after_s(self.headers.get("retry-after"), default)


class AzureRest:
    """Requests to Azure REST APIs. The httpx client is opened on first use in the running loop and closed
    when the last user releases it (or by `close`)."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        egress: Egress,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        pause: Pause = asyncio.sleep,
    ) -> None:
        self.timeout_s = timeout_s
        self.egress = egress
        self._ssl_context = ssl_context
        # How the helper waits between polls of an operation (tests record the waits instead).
        self._pause = pause
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._users: set[int] = set()

    # ------------------------------------------------------------------ the client's life
    def acquire(self, owner: object) -> None:
        self._users.add(id(owner))

    async def release(self, owner: object) -> None:
        self._users.discard(id(owner))
        if not self._users:
            await self.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()

    def http(self) -> httpx.AsyncClient:
        """The running loop's client: also what reads Entra ID's public signing keys (no token, so not
        through `call`), so that every request to Azure has one TLS trust and one egress policy."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # An AsyncClient's pool belongs to one event loop (`gateway check` and tests run several).
            self._client = self.egress.httpx_async_client(
                self._ssl_context, httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s))
            )
            self._loop = loop
        return self._client

    # ------------------------------------------------------------------ requests
    async def call(
        self,
        method: str,
        url: str,
        *,
        token: TokenEntry,
        what: str,
        body: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> AzureAnswer:
        """`method url` with a bearer token for `token`'s scope; any answer but a 401 that a new token
        fixes is returned (the caller decides what is success). AzureError when no token can be had or
        no answer arrives; `what` starts the message (e.g. "ARM listKeys", "Key Vault V: secret S")."""
        try:
            grant: Grant = token.peek() or await token.get()
        except CredentialUnavailable as exc:
            raise AzureTokenUnavailable(
                f"{what}: no token for {token.scope}: {exc.message}", retry_after=exc.retry_after
            ) from None
        for attempt in (1, 2):
            assert grant.header is not None
            answer = await self.send(
                method,
                url,
                what=what,
                headers={"Authorization": grant.header},
                body=body,
                timeout_s=timeout_s,
            )
            if answer.status == 401 and attempt == 1:
                replacement = await token.reject(grant, verdict=False)
                if replacement is not None:
                    grant = replacement
                    continue
            if answer.status != 401:
                token.accept(grant)
            return answer
        raise AssertionError("unreachable")

    async def send(
        self,
        method: str,
        url: str,
        *,
        what: str,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> AzureAnswer:
        """One request, its answer read whole within `timeout_s` (AzureError otherwise). Headers are the
        caller's (a scoring key for `gateway rotate`'s verification, a token from `call`)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        origin = origin_of(url)
        try:
            async with asyncio.timeout(limit):
                async with self.http().stream(
                    method, url, headers={"Accept": "application/json", **(headers or {})}, json=body
                ) as response:
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > MAX_ANSWER_BYTES:
                            raise AzureError(
                                f"{what}: {origin} answered {response.status_code} with a body larger than "
                                f"{MAX_ANSWER_BYTES // (1024 * 1024)} MiB, which was not read",
                                status=response.status_code,
                            )
                        chunks.append(chunk)
                    return AzureAnswer(response.status_code, response.headers, b"".join(chunks))
        except TimeoutError:
            raise AzureError(
                f"{what}: {origin} did not answer within {limit:g} s",
                hint=f"check network access to {origin}",
            ) from None
        except httpx.HTTPError as exc:
            message, hint = transport_problem(origin, exc)
            raise AzureError(f"{what}: {message}", hint=hint) from None

    def failure(self, answer: AzureAnswer, what: str, *, hint: str = "") -> AzureError:
        """The AzureError for an answer that is not a success: status, Azure's code and message."""
        code, inner, message = answer.error()
        shown = inner or code
        text = f"{what} answered {answer.status}" + (f" {shown}" if shown else "")
        if message:
            text += f": {message}"
        retry_after = None
        if answer.status == 429 or answer.status >= 500:
            retry_after = answer.retry_after(RETRY_AFTER_MIN_S)
        return AzureError(text, hint=hint, status=answer.status, code=shown, retry_after=retry_after)

    # ------------------------------------------------------------------ long-running operations
    async def follow_operation(
        self,
        accepted: AzureAnswer,
        *,
        started_on: str,
        token: TokenEntry,
        what: str,
        timeout_s: float,
    ) -> None:
        """Poll the operation a 202 started until it succeeded: `Azure-AsyncOperation`'s `status`, else
        `Location` until it stops answering 202. Only URLs on the https origin of `started_on` are
        followed. AzureError when the operation fails, cannot be followed, or does not end in time."""
        async_operation = accepted.headers.get("azure-asyncoperation")
        url = async_operation or accepted.headers.get("location")
        if not url:
            return  # accepted, with no way to follow it
        header = "Azure-AsyncOperation" if async_operation else "Location"
        allowed = origin_of(started_on)
        if urlsplit(url).scheme != "https" or origin_of(url) != allowed:
            raise AzureError(
                f"{what}: the operation's {header} URL is on {clean_message(origin_of(url), 200)}, not on "
                f"{allowed} where it was started: not followed (the management token is sent only there)",
                hint="check arm_url; Azure Resource Manager answers with operation URLs on its own host",
            )
        deadline = time.monotonic() + timeout_s
        waited = 0.0  # the waits asked for, so that a pause that returns early still ends the loop
        delay = accepted.retry_after(OPERATION_POLL_S)
        while True:
            waited += delay
            if waited > timeout_s or time.monotonic() + delay > deadline:
                raise AzureError(f"{what}: the operation did not finish within {timeout_s:g} s")
            await self._pause(delay)
            answer = await self.call("GET", url, token=token, what=f"{what}: the operation status")
            delay = answer.retry_after(OPERATION_POLL_S)
            if async_operation:
                if answer.status != 200:
                    raise self.failure(answer, f"{what}: the operation status")
                data = answer.json_object()
                status = clean_message(str(data.get("status") or ""), 40)
                if status.lower() == "succeeded":
                    return
                if status.lower() in ("failed", "canceled", "cancelled"):
                    error = data.get("error")
                    detail = ""
                    if isinstance(error, dict):
                        detail = clean_message(f"{error.get('code') or ''}: {error.get('message') or ''}")
                    raise AzureError(
                        f"{what}: the operation ended {status}" + (f": {detail}" if detail else "")
                    )
            elif answer.status in (200, 204):
                return
            elif answer.status != 202:
                raise self.failure(answer, f"{what}: the operation result")
