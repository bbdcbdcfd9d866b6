"""The upstream side of one request (`Proxy._attempts`): the upstream response is owned from the moment
it arrives until it is released or handed to the client stream, whatever ends the request.

A request cancelled at any `await` of its attempts (the client went away: `gateway.exchange`
cancels its task) gives its connection back: with `max_connections: 1` the next request is served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from azure_env import (
    clean_emulator_fixture,  # noqa: F401 - fixture
    emulator_fixture,  # noqa: F401 - fixture
    identity,
    register_app,
)
from servers import ServerThread
from test_client_conformance import Peer, RawUpstream

from gateway.app import GatewayApp
from gateway.client import Origin
from gateway.config import parse_config
from gateway.emulator.server import EmulatorServer

ROWS = {"data": [[5.1, 3.5, 1.4, 0.2]]}
BODY = json.dumps(ROWS).encode()


def _wait(predicate: Callable[[], bool], what: str, within: float = 20.0) -> None:
    """Positive evidence, with a generous bound for a loaded machine."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _busy(pool: Origin) -> int:
    """Connections of the pool that are neither idle in it nor closed: held by a request."""
    return pool.open - len(pool.idle)


def test_client_leaving_during_a_slow_credential_recheck_leaks_no_connection(
    emulator: EmulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 15's reproduction: `max_connections: 1`, the upstream answers 401, the forced token fetch
    that follows takes 3 s (Entra slowed in the emulator), and the client gives up meanwhile. The
    connection that carried the 401 must come back: the next request is served, not refused with 503
    `overloaded` after `pool_timeout_s`."""
    app = register_app(emulator)
    config = {
        "tls": {"ca_bundle": str(emulator.ca_file)},
        "routes": {
            "aad": {
                "path": "/aad",
                "upstream": emulator.http_url,
                "max_connections": 1,
                "pool_timeout_s": 1.0,
                "auth": {"type": "aad_token", "identity": identity(emulator, app, timeout_s=10)},
            }
        },
    }
    caplog.set_level(logging.INFO, logger="gateway.access")
    with ServerThread(GatewayApp(parse_config(config))) as gw:
        pool = gw.app.router.by_name["aad"].upstreams[0].pool
        # The token is fetched and accepted once: a later 401 then means "revoked", a forced re-fetch.
        first = httpx.post(f"{gw.url}/aad/score", json=ROWS, timeout=30)
        assert first.status_code == 200, first.text
        fetches = emulator.state.token_request_count(client_id=app.client_id)
        emulator.state.set_fault("score", status=401, count=1)
        emulator.state.set_fault("token", delay_s=3.0, count=1)

        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as client:
            client.sendall(
                b"POST /aad/score HTTP/1.1\r\nHost: x\r\nx-request-id: leaving-client\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(BODY), BODY)
            )
            _wait(
                lambda: emulator.state.token_request_count(client_id=app.client_id) > fetches,
                "the forced token fetch after the 401",
            )
            # The client gives up while the gateway waits for the new token.
        _wait(
            lambda: any(
                r.name == "gateway.access"
                and "leaving-client" in r.getMessage()
                and "status=499" in r.getMessage()
                for r in caplog.records
            ),
            "the access line of the request whose client left",
        )
        # The access line is written after every `finally` of the request ran: the connection is back.
        assert _busy(pool) == 0, f"{_busy(pool)} connection(s) still held by a request that ended"
        response = httpx.post(f"{gw.url}/aad/score", json=ROWS, timeout=30)
        assert response.status_code == 200, response.text


# ------------------------------------------------------------------------------ every await of _attempts
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ANSWER_FIRST = {
    # The upstream refuses the credential: the gateway asks for a new token (Entra slowed to 3 s, within
    # identity.timeout_s: the fetch succeeds, after the client has left).
    "credential_recheck": b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n",
    # Retry-After within retry.retry_after_cap_s: the gateway waits it out itself.
    "retry_after_sleep": b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 30\r\nContent-Length: 0\r\n\r\n",
}


class KeepAliveUpstream:
    """A raw upstream that never closes a connection on its own (so a connection the gateway fails to
    give back stays counted for good), scripted per request: `first[n]` for the n-th request, then 200.
    A script entry is an answer, "reset" (read the request, reset the connection) or "hold" (read it,
    never answer)."""

    def __init__(self, *first: bytes | str) -> None:
        self.script = list(first)
        self.received = 0

    async def __call__(self, peer: Peer) -> None:
        while await peer.read_request() is not None:
            self.received += 1
            step = self.script.pop(0) if self.script else OK
            if step == "reset":
                peer.reset()
                return
            if step == "hold":
                await asyncio.Event().wait()
            assert isinstance(step, bytes)
            await peer.send(step)


def _route(upstream: str, **options: Any) -> dict[str, Any]:
    return {
        "path": "/iris",
        "upstream": upstream,
        "max_connections": 1,
        "pool_timeout_s": 1.0,
        "auth": {"type": "none"},
        **options,
    }


def _leave_when(gw: ServerThread, request_id: str, evidence: Callable[[], bool], what: str) -> None:
    """A raw-socket client sends a request, waits for `evidence` that the gateway is at the await point
    under test, and goes away: the gateway cancels the request there."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as client:
        client.sendall(
            b"POST /iris/score HTTP/1.1\r\nHost: x\r\nx-request-id: %b\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (request_id.encode(), len(BODY), BODY)
        )
        _wait(evidence, what)


@pytest.mark.parametrize(
    "await_point", ["credential_recheck", "retry_after_sleep", "backoff", "outlier_probe"]
)
def test_a_request_cancelled_at_any_await_of_its_attempts_gives_its_connection_back(
    await_point: str, emulator: EmulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    config: dict[str, Any] = {"tls": {"ca_bundle": str(emulator.ca_file)}}
    standby: RawUpstream | None = None
    if await_point == "outlier_probe":
        # The primary fails once (ejected), then holds the probe request without answering.
        primary_script = KeepAliveUpstream(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", "hold")
        primary = RawUpstream(primary_script)
        standby = RawUpstream(KeepAliveUpstream())
        standby.__enter__()
    elif await_point == "backoff":
        # The connection is lost after the request was sent; `on_connection_lost` replays it after a
        # backoff drawn from [0, 30 s].
        primary_script = KeepAliveUpstream("reset")
        primary = RawUpstream(primary_script)
    else:
        primary_script = KeepAliveUpstream(ANSWER_FIRST[await_point])
        primary = RawUpstream(primary_script)
    with primary:
        if await_point == "outlier_probe":
            assert standby is not None
            route = _route(
                "",
                upstreams=[{"url": primary.url, "priority": 0}, {"url": standby.url, "priority": 1}],
                outlier={"consecutive_failures": 1, "ejection_s": 0.05},
            )
            del route["upstream"]
        elif await_point == "backoff":
            route = _route(
                primary.url, retry={"on_connection_lost": True, "backoff_base_s": 30, "backoff_max_s": 30}
            )
        elif await_point == "retry_after_sleep":
            route = _route(primary.url, retry={"retry_after_cap_s": 60})
        else:
            app = register_app(emulator)
            route = _route(
                primary.url, auth={"type": "aad_token", "identity": identity(emulator, app, timeout_s=10)}
            )
        config["routes"] = {"iris": route}
        try:
            with ServerThread(GatewayApp(parse_config(config))) as gw:
                router_route = gw.app.router.by_name["iris"]
                upstream = router_route.upstreams[0]
                pool = upstream.pool
                if await_point == "credential_recheck":
                    fetches = emulator.state.token_request_count(client_id=app.client_id)
                    emulator.state.set_fault("token", delay_s=3.0, count=1)
                    _leave_when(
                        gw,
                        "leaving",
                        lambda: emulator.state.token_request_count(client_id=app.client_id) > fetches,
                        "the token re-fetch after the 401",
                    )
                elif await_point == "retry_after_sleep":
                    # The 503 was read and its connection pooled again: the gateway sleeps.
                    _leave_when(
                        gw, "leaving", lambda: primary_script.received == 1 and _busy(pool) == 0, "the sleep"
                    )
                elif await_point == "backoff":
                    _leave_when(
                        gw, "leaving", lambda: primary_script.received == 1 and pool.open == 0, "the backoff"
                    )
                else:
                    first = httpx.post(f"{gw.url}/iris/score", json=ROWS, timeout=30)
                    assert first.status_code == 200 and upstream.ejected_until, first.text
                    time.sleep(0.1)  # past ejection_s: the next request probes the primary
                    # The evidence includes the probe's owner: read after the client left, the gateway
                    # could already have released it.
                    _leave_when(
                        gw,
                        "leaving",
                        lambda: primary_script.received == 2 and upstream.probe_owner is not None,
                        "the probe's attempt",
                    )
                _wait(
                    lambda: any(
                        r.name == "gateway.access"
                        and r.getMessage().startswith("leaving ")
                        and "status=499" in r.getMessage()
                        for r in caplog.records
                    ),
                    "the access line of the request whose client left",
                )
                assert _busy(pool) == 0, f"{_busy(pool)} connection(s) still held by a request that ended"
                assert upstream.probe_owner is None
                response = httpx.post(f"{gw.url}/iris/score", json=ROWS, timeout=30)
                assert response.status_code == 200, response.text
                # Every connection is idle: closing the client closes them all.
                gw.call(gw.app.client.close())
                _wait(lambda: pool.open == 0, "the pool's open count to return to zero")
        finally:
            if standby is not None:
                standby.__exit__(None, None, None)
