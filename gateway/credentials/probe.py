"""The gateway's own question to an endpoint about one key: is it accepted?

A client chooses the path and the payload of its requests, so refusals of its requests can be provoked
(any path that answers 401 whatever the key, when `upstream` is the endpoint's base URL). Before a key
is declared rejected, the gateway asks itself, with a request no client shapes: `GET` on the endpoint's
`swagger.json` beside the scoring URI (the request `gateway rotate` verifies a new key with; Azure ML
answers it 401 to a wrong key and 200 to a valid one), or on the route's `auth.probe_path`.

The answer is one of three verdicts: `ACCEPTED` (2xx: the key is good, the refusals came from the
requests), `REJECTED` (a status of `auth.reject_statuses`), `UNDECIDED` (no answer, or any other
status, such as a 404 from an upstream that has no such path and never looked at the key).
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from gateway.egress import Egress

PROBE_TIMEOUT_S = 10.0


class ProbeVerdict(enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    UNDECIDED = "undecided"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    verdict: ProbeVerdict
    detail: str  # "answered 401", "failed: ConnectError: ...": never the key


def probe_url_for(upstream_url: str, probe_path: str | None = None) -> str:
    """`probe_path` on the upstream's origin, or `swagger.json` beside its scoring URI (`.../score`)."""
    parts = urlsplit(upstream_url)
    if probe_path is not None:
        path, _, query = probe_path.partition("?")
        return urlunsplit((parts.scheme, parts.netloc, path, query, ""))
    path = parts.path.rstrip("/").removesuffix("/score")
    return urlunsplit((parts.scheme, parts.netloc, f"{path}/swagger.json", "", ""))


class KeyProbe:
    """`GET url` with `Authorization: Bearer <key>`, through the gateway's TLS and egress policy."""

    def __init__(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext,
        egress: Egress,
        rejection_statuses: frozenset[int],
        timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        self.url = url
        self._ssl_context = ssl_context
        self._egress = egress
        self._rejection_statuses = rejection_statuses
        self._timeout = httpx.Timeout(timeout_s)

    async def check(self, key: str) -> ProbeResult:
        # A client per probe: probes are rare (a run of refusals), and nothing stays open between them.
        try:
            async with self._egress.httpx_async_client(self._ssl_context, self._timeout) as client:
                response = await client.get(self.url, headers={"Authorization": f"Bearer {key}"})
        except (httpx.HTTPError, OSError) as exc:
            return ProbeResult(ProbeVerdict.UNDECIDED, f"failed: {type(exc).__name__}: {exc}"[:300])
        status = response.status_code
        if 200 <= status < 300:
            verdict = ProbeVerdict.ACCEPTED
        elif status in self._rejection_statuses:
            verdict = ProbeVerdict.REJECTED
        else:
            verdict = ProbeVerdict.UNDECIDED
        return ProbeResult(verdict, f"answered {status}")

    def __repr__(self) -> str:
        return f"KeyProbe(url={self.url!r})"
