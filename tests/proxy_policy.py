"""A proxy.py plugin for tests: the proxy's policy forbids every destination (403), as a corporate proxy's
destination allow-list does. Loaded by the proxy subprocess (`--plugins proxy_policy.ForbidEverything`)."""

from __future__ import annotations

from proxy.http.exception import HttpRequestRejected
from proxy.http.parser import HttpParser
from proxy.http.proxy import HttpProxyBasePlugin

# What the proxy says besides its status: never shown to the gateway's clients.
REASON = b"Forbidden by corporate egress policy 7f3e"


class ForbidEverything(HttpProxyBasePlugin):
    def before_upstream_connection(self, request: HttpParser) -> HttpParser | None:
        raise HttpRequestRejected(status_code=403, reason=REASON)
