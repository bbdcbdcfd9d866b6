"""`retry.deadline_s`, the whole request's time across attempts: a request with no time left is not sent,
and an attempt cut short by the deadline says so. Before the answer's head the deadline running out
counts against the upstream like any timeout; mid-body it does not (nor does timeout_s).

(An attack round found a request whose slow body upload used the deadline sent upstream anyway with
1 ms to answer: executed, answered 504 `... within 0.001 s (timeout_s)`, and the healthy upstream
ejected after two such requests.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from pathlib import Path
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
from test_acceptance_upstream import RawUpstream as RawSocketUpstream
from test_acceptance_upstream import free_port, ok, run_gateway
from test_client_conformance import OK, Peer, RawUpstream, open_route

from gateway.app import GatewayApp
from gateway.config import parse_config
from gateway.credentials.key import KeyCredential, KeySlot
from gateway.emulator.server import EmulatorServer
from gateway.secrets import LiteralSecret

DEADLINE_S = 0.5


def _route(url: str) -> dict[str, Any]:
    return open_route(
        url,
        timeout_s=30,
        retry={"deadline_s": DEADLINE_S, "backoff_base_s": 0.01},
        outlier={"consecutive_failures": 1, "ejection_s": 30},
    )


def _slow_upload(port: int) -> bytes:
    """A POST whose body takes longer than the deadline to arrive (half, a pause, the rest)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /open/score HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
        time.sleep(DEADLINE_S + 0.3)
        sock.sendall(b"56789")
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_a_request_whose_deadline_passed_before_it_was_sent_is_not_sent(
    gateway_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await peer.send(OK)

    caplog.set_level(logging.INFO)
    with RawUpstream(handler) as upstream:
        gw = gateway_factory({"routes": {"open": _route(upstream.url)}})
        assert httpx.post(gw.url + "/open/score", content=b"{}", timeout=10).status_code == 200
        for _ in range(2):
            answer = _slow_upload(gw.port)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 504 "), answer[:300]
            error = json.loads(body)["error"]
            assert error["code"] == "upstream_timeout" and "retry.deadline_s" in error["message"], error
        assert upstream.executions(b"POST /score") == 1  # the first request's only
        # The upstream was never at fault: not ejected, and the next request goes to it.
        assert not [r for r in caplog.records if "ejected" in r.getMessage()]
        assert httpx.post(gw.url + "/open/score", content=b"{}", timeout=10).status_code == 200
        access = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
        assert sum(" status=504 " in line and " attempts=0 " in line for line in access) == 2, access


def test_an_attempt_cut_short_by_the_deadline_names_it(
    gateway_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's message and the failed-attempt line name retry.deadline_s, which the operator should
    raise, not timeout_s (they said `timeout_s` with the deadline's remainder as its value)."""

    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await asyncio.sleep(DEADLINE_S + 1.0)  # slower than the deadline, well within timeout_s
            await peer.send(OK)

    caplog.set_level(logging.INFO)
    with RawUpstream(handler) as upstream:
        gw = gateway_factory({"routes": {"open": _route(upstream.url)}})
        response = httpx.post(gw.url + "/open/score", content=b"{}", timeout=10)
        assert response.status_code == 504
        error = response.json()["error"]
        assert error["code"] == "upstream_timeout" and "retry.deadline_s" in error["message"], error
        failures = [r.getMessage() for r in caplog.records if r.name == "gateway.failures"]
        assert failures and all("(deadline_timeout)" in line for line in failures), failures
        assert all("(retry.deadline_s)" in line for line in failures), failures


def _never_answers(conn: socket.socket, up: Any) -> None:
    if up.request(conn) is None:
        return
    time.sleep(30)


def _streams_slowly(conn: socket.socket, up: Any) -> None:
    """A healthy, slow stream: a chunk every 0.1 s for 3 s (never silent for read_timeout_s)."""
    while up.request(conn) is not None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(30):
            conn.sendall(b"2\r\nok\r\n")
            time.sleep(0.1)
        conn.sendall(b"0\r\n\r\n")


def test_an_upstream_that_cannot_answer_within_the_deadline_is_ejected(tmp_path: Path) -> None:
    """Before its answer's head, the deadline running out is the upstream's failure like any timeout: one
    that never answers is ejected, and requests go to the healthy one (with `read_timeout_s` at its
    default, the deadline is what ends every attempt on it)."""
    healthy, silent = RawSocketUpstream(ok), RawSocketUpstream(_never_answers)
    port = free_port()
    route = {
        "path": "/r",
        "upstreams": [{"url": healthy.url}, {"url": silent.url}],
        "auth": {"type": "none"},
        "timeout_s": 60,
        "retry": {"deadline_s": DEADLINE_S},
        "outlier": {"consecutive_failures": 2, "ejection_s": 300},
    }
    with run_gateway(tmp_path, port, {"r": route}):
        url = f"http://127.0.0.1:{port}/r/score"
        statuses = [httpx.post(url, content=b"{}", timeout=20).status_code for _ in range(12)]
    assert silent.executions <= 2, (statuses, silent.executions)
    assert statuses.count(200) >= 10, statuses


@pytest.mark.parametrize("limit", ["timeout_s", "deadline_s"])
def test_the_attempts_limit_running_out_mid_body_is_not_the_upstreams_failure(
    tmp_path: Path, limit: str
) -> None:
    """Two healthy upstreams streaming slowly past the attempt's limit: the answers are cut off
    (`upstream_aborted`), but a slow stream is no reason to eject an upstream (the client may be what
    holds it back), whether the limit is timeout_s or what retry.deadline_s left."""
    slow, other = RawSocketUpstream(_streams_slowly), RawSocketUpstream(_streams_slowly)
    port = free_port()
    route: dict[str, object] = {
        "path": "/r",
        "upstreams": [{"url": slow.url}, {"url": other.url}],
        "auth": {"type": "none"},
        "read_timeout_s": 1,
        "outlier": {"consecutive_failures": 2, "ejection_s": 300},
    }
    if limit == "timeout_s":
        route["timeout_s"] = 1
    else:
        route["timeout_s"] = 30
        route["retry"] = {"deadline_s": 1}
    with run_gateway(tmp_path, port, {"r": route}):
        url = f"http://127.0.0.1:{port}/r/score"
        for _ in range(4):
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(url, content=b"{}", timeout=20).read()
        log = (tmp_path / "gateway.log").read_text()
    assert "upstream_aborted" in log
    assert "ejected for" not in log, log


def test_a_forced_token_refresh_after_a_401_is_waited_for_no_longer_than_the_deadline(
    emulator: EmulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream refuses the token; the gateway asks Entra ID for a new one, which takes 4 s (within
    identity.timeout_s). The request waits until its deadline at most and gets the 401 (it waited for the
    whole fetch); the fetch goes on for the requests after it."""
    app = register_app(emulator)
    config = {
        "tls": {"ca_bundle": str(emulator.ca_file)},
        "routes": {
            "aad": {
                "path": "/aad",
                "upstream": emulator.http_url,
                "retry": {"deadline_s": 1.0},
                "auth": {"type": "aad_token", "identity": identity(emulator, app, timeout_s=10)},
            }
        },
    }
    caplog.set_level(logging.INFO, logger="gateway.access")
    with ServerThread(GatewayApp(parse_config(config))) as gw:
        assert (
            httpx.post(f"{gw.url}/aad/score", json={"data": [[5.1, 3.5, 1.4, 0.2]]}, timeout=30).status_code
            == 200
        )
        fetches = emulator.state.token_request_count(client_id=app.client_id)
        emulator.state.set_fault("score", status=401, count=1)
        emulator.state.set_fault("token", delay_s=4.0, count=1)
        started = time.monotonic()
        response = httpx.post(f"{gw.url}/aad/score", json={"data": [[5.1, 3.5, 1.4, 0.2]]}, timeout=30)
        took = time.monotonic() - started
        assert response.status_code == 401 and took < 3.5, (response.status_code, took)
        assert emulator.state.token_request_count(client_id=app.client_id) > fetches  # the fetch was asked
        # The fetch went on: the next request gets the new token once it arrives.
        assert (
            httpx.post(f"{gw.url}/aad/score", json={"data": [[5.1, 3.5, 1.4, 0.2]]}, timeout=30).status_code
            == 200
        )


def _refuses_and_breaks_off(conn: socket.socket, up: Any) -> None:
    """A retryable refusal (429, Retry-After: 0) whose body breaks off: 10 of its 100 bytes, then a reset."""
    if up.request(conn) is None:
        return
    conn.sendall(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\nContent-Length: 100\r\n\r\n0123456789")
    time.sleep(0.05)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


def test_a_refusal_whose_body_breaks_off_while_it_is_dropped_counts_against_the_upstream(
    tmp_path: Path,
) -> None:
    """Dropped before the replay, a refusal is an answer only when its body ended cleanly; one that broke
    off is the upstream's failure, as mid-body in an answer passed on (it reset the failure count, so an
    upstream that always did this was never ejected)."""
    healthy, broken = RawSocketUpstream(ok), RawSocketUpstream(_refuses_and_breaks_off)
    port = free_port()
    route = {
        "path": "/r",
        "upstreams": [{"url": healthy.url}, {"url": broken.url}],
        "auth": {"type": "none"},
        "retry": {"backoff_base_s": 0.01},
        "outlier": {"consecutive_failures": 2, "ejection_s": 300},
    }
    with run_gateway(tmp_path, port, {"r": route}):
        url = f"http://127.0.0.1:{port}/r/score"
        statuses = [httpx.post(url, content=b"{}", timeout=20).status_code for _ in range(12)]
        log = (tmp_path / "gateway.log").read_text()
    assert "ejected for" in log, (statuses, broken.executions)
    assert broken.executions <= 3, (statuses, broken.executions)


def test_a_key_refetch_after_every_key_was_refused_is_waited_for_no_longer_than_the_deadline() -> None:
    """An aml_key route whose every held key was refused reads its keys again from the control plane
    (several ARM round trips at worst): the request waits for that read until its deadline at most, then
    gets the refusal (it waited for the whole read)."""

    async def main() -> tuple[object, float]:
        async def slow_refetch() -> bool:
            await asyncio.sleep(3)  # the control plane's read of the keys
            return False

        credential = KeyCredential(
            "r", [KeySlot("primary", LiteralSecret("key-one-0123456789"))], refetch=slow_refetch
        )
        grant = credential.grant_nowait()
        started = time.perf_counter()
        replacement = await credential.rejected(grant, started + DEADLINE_S)
        return replacement, time.perf_counter() - started

    replacement, took = asyncio.run(main())
    assert replacement is None and took < 2.0, (replacement, took)
