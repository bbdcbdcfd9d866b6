"""A requests-like facade over `httpx.Client` for MSAL's `http_client=` parameter.

MSAL (1.39) calls `http_client.get(url, params=, headers=)` and `http_client.post(url, params=, data=,
headers=)` without a timeout, and only reads `status_code`, `text`, `headers` and `raise_for_status()`
from the response, all of which httpx provides. The one incompatibility: a certificate credential's
`client_assertion` arrives as *bytes* in `data`, which requests form-encodes as the JWT but httpx encodes
as `b'eyJ...'`, a string Entra ID rejects as a malformed JWT (AADSTS50027). The gateway's own MSAL client
needs the same fix; this copy exists so the emulator's tests do not depend on gateway code.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["MsalHttpxClient"]


class MsalHttpxClient:
    """Wraps an `httpx.Client` (which carries verify=, timeouts and proxies) for use by MSAL."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(url, **kwargs)

    def post(self, url: str, *, data: Any = None, **kwargs: Any) -> httpx.Response:
        if isinstance(data, dict):
            data = {
                name: value.decode() if isinstance(value, bytes) else value for name, value in data.items()
            }
        return self.client.post(url, data=data, **kwargs)

    def close(self) -> None:
        self.client.close()
