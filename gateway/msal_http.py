"""The HTTP client MSAL uses: httpx with our TLS and egress policy and a timeout on every call.

MSAL's default client is a `requests.Session` with no timeout, and `requests` lets REQUESTS_CA_BUNDLE /
CURL_CA_BUNDLE (set on these machines) replace the CA list given to it. Passing `http_client=` makes MSAL
use this object instead; it only needs requests-like `get`/`post` returning objects with `status_code`,
`text`, `headers` and `raise_for_status()` (msal/oauth2cli/http.py), which `httpx.Response` has.
"""

from __future__ import annotations

import logging
import math
import ssl
import threading
from typing import Any

import httpx

from gateway.egress import Egress

logger = logging.getLogger("gateway.msal_http")

# Arguments MSAL may pass that would change TLS, proxies or redirects: ignored, our policy is fixed.
_IGNORED = frozenset({"verify", "proxies", "allow_redirects", "stream", "cert"})


class MsalHttpClient:
    """requests-shaped `get`/`post` on one `httpx.Client` (a connection pool shared by MSAL's threads).

    It also remembers, per thread, the Retry-After of the last throttled (429/5xx) answer: MSAL raises
    `MsalServiceError` on a 5xx without exposing the response, and the token cache must honour it.
    """

    def __init__(self, ssl_context: ssl.SSLContext, timeout_s: float, egress: Egress) -> None:
        self.timeout_s = timeout_s
        # The egress policy decides about proxies; CA variables of the environment are never read.
        self._client = egress.httpx_client(ssl_context, httpx.Timeout(timeout_s))
        self._local = threading.local()

    def get(
        self,
        url: str,
        params: Any = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        return self._send("GET", url, params=params, headers=headers, **kwargs)

    def post(
        self,
        url: str,
        params: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        return self._send("POST", url, params=params, data=data, headers=headers, **kwargs)

    def _send(
        self,
        method: str,
        url: str,
        *,
        params: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        json: Any = None,
        timeout: Any = None,
        **kwargs: Any,
    ) -> httpx.Response:
        unknown = set(kwargs) - _IGNORED
        if unknown:
            logger.debug("ignoring MSAL http arguments %s", ", ".join(sorted(unknown)))
        content: bytes | str | None = None
        if isinstance(data, str | bytes):
            content, data = data, None  # httpx wants raw bodies as `content`
        elif isinstance(data, dict):
            # MSAL puts the signed client assertion in as bytes; requests form-encodes bytes as their
            # text, httpx as "b'...'" (which Entra ID rejects as a malformed JWT).
            data = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in data.items()}
        response = self._client.request(
            method,
            url,
            params=params,
            data=data,
            content=content,
            json=json,
            headers=headers,
            timeout=self._timeout(timeout),
        )
        self._remember_retry_after(response)
        return response

    def _timeout(self, requested: Any) -> float:
        # MSAL may ask for a timeout of its own; it can only make ours shorter, never unlimited.
        if isinstance(requested, int | float) and not isinstance(requested, bool) and requested > 0:
            return min(float(requested), self.timeout_s)
        return self.timeout_s

    def _remember_retry_after(self, response: httpx.Response) -> None:
        if response.status_code != 429 and response.status_code < 500:
            return
        value = response.headers.get("retry-after")
        try:
            seconds = float(value) if value is not None else None
        except ValueError:
            seconds = None  # an HTTP date: rare for token endpoints; use our backoff
        # `nan` or `inf` is no usable wait: our backoff decides.
        self._local.retry_after = seconds if seconds is not None and math.isfinite(seconds) else None

    def reset_retry_after(self) -> None:
        self._local.retry_after = None

    def retry_after(self) -> float | None:
        """Retry-After (seconds) of the last throttled answer this thread received since the reset."""
        value: float | None = getattr(self._local, "retry_after", None)
        return value

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"MsalHttpClient(timeout_s={self.timeout_s})"
