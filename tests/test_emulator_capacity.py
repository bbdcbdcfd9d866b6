"""The emulator's per-deployment capacity (gateway/emulator/capacity.py): Azure ML serves
`max_concurrent` requests at once, queues `max_queued` more and answers 429 beyond."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from gateway.emulator.capacity import DeploymentCapacity, Throttled
from gateway.emulator.server import EmulatorServer
from gateway.emulator.state import EmulatorState

BODY = {"data": [[5.1, 3.5, 1.4, 0.2]]}


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    with EmulatorServer(EmulatorState(score_delay_s=0.0)) as server:
        yield server


def _wait(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def _score(emulator: EmulatorServer, results: list[httpx.Response], deployment: str | None = None) -> None:
    headers = {"authorization": f"Bearer {emulator.state.primary_key}", "x-request-id": "cap-1"}
    if deployment:
        headers["azureml-model-deployment"] = deployment
    results.append(httpx.post(emulator.scoring_uri, json=BODY, headers=headers, timeout=30))


def _deployment(emulator: EmulatorServer, name: str = "blue") -> dict[str, object]:
    return emulator.state.capacity.snapshot()[name]


def test_beyond_max_concurrent_the_endpoint_answers_429_like_azure(emulator: EmulatorServer) -> None:
    admin = httpx.post(
        emulator.http_url + "/_emulator/deployments", json={"name": "blue", "max_concurrent": 2}, timeout=10
    )
    assert admin.status_code == 200 and admin.json()["max_concurrent"] == 2
    emulator.state.configure(score_delay_s=1.0)
    try:
        held: list[httpx.Response] = []
        threads = [threading.Thread(target=_score, args=(emulator, held)) for _ in range(2)]
        for thread in threads:
            thread.start()
        _wait(lambda: _deployment(emulator)["in_flight"] == 2)
        refused: list[httpx.Response] = []
        _score(emulator, refused)
        other: list[httpx.Response] = []
        _score(emulator, other, deployment="green")  # another deployment: no limit set
        for thread in threads:
            thread.join()
    finally:
        emulator.state.configure(score_delay_s=0.0)
    assert [r.status_code for r in held] == [200, 200]
    assert refused[0].status_code == 429 and refused[0].text == "Too many requests."
    assert "retry-after" not in refused[0].headers  # Azure ML documents none
    assert refused[0].headers["x-request-id"] == "cap-1"
    assert other[0].status_code == 200
    view = _deployment(emulator)
    assert (view["peak_in_flight"], view["served"], view["throttled"], view["in_flight"]) == (2, 2, 1, 0)
    assert 0 < float(view["mean_in_flight"]) <= 2  # type: ignore[arg-type]
    assert emulator.state.snapshot()["deployments"]["blue"]["throttled"] == 1
    emulator.state.capacity.set("blue", None)


def test_queued_requests_wait_for_a_place_then_the_rest_get_429(emulator: EmulatorServer) -> None:
    emulator.state.capacity.set("blue", 1, max_queued=1)
    emulator.state.configure(score_delay_s=0.5)
    try:
        served: list[httpx.Response] = []
        threads = [threading.Thread(target=_score, args=(emulator, served))]
        threads[0].start()
        _wait(lambda: _deployment(emulator)["in_flight"] == 1)
        threads.append(threading.Thread(target=_score, args=(emulator, served)))
        threads[1].start()
        _wait(lambda: _deployment(emulator)["queued"] == 1)
        refused: list[httpx.Response] = []
        _score(emulator, refused)
        for thread in threads:
            thread.join()
    finally:
        emulator.state.configure(score_delay_s=0.0)
    assert [r.status_code for r in served] == [200, 200] and refused[0].status_code == 429
    view = _deployment(emulator)
    assert (view["peak_in_flight"], view["served"], view["throttled"]) == (1, 2, 1)
    emulator.state.capacity.set("blue", None)


@pytest.mark.parametrize(
    "body",
    [{"max_concurrent": 0}, {"max_concurrent": "2"}, {"max_queued": -1, "max_concurrent": 1}, {"what": 1}],
)
def test_admin_refuses_bad_settings(emulator: EmulatorServer, body: dict[str, object]) -> None:
    response = httpx.post(emulator.http_url + "/_emulator/deployments", json=body, timeout=10)
    assert response.status_code == 400 and response.json()["error"]


def test_cancelled_waiters_leave_no_place_taken() -> None:
    async def main() -> None:
        capacity = DeploymentCapacity()
        capacity.set("blue", 1, max_queued=3)
        entered, leave = asyncio.Event(), asyncio.Event()

        async def hold() -> None:
            async with capacity.slot("blue"):
                entered.set()
                await leave.wait()

        async def wait_in_line() -> None:
            async with capacity.slot("blue"):
                await asyncio.sleep(3600)

        holder = asyncio.create_task(hold())
        await entered.wait()
        waiters = [asyncio.create_task(wait_in_line()) for _ in range(3)]
        while capacity.snapshot()["blue"]["queued"] < 3:  # noqa: ASYNC110 - the waiters queue on this loop
            await asyncio.sleep(0)
        with pytest.raises(Throttled):
            async with capacity.slot("blue"):
                pass
        leave.set()  # the place goes to the first waiter...
        await holder
        waiters[0].cancel()  # ...which is cancelled before it runs: the place goes on
        for waiter in waiters[1:]:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        view = capacity.snapshot()["blue"]
        assert (view["in_flight"], view["queued"]) == (0, 0)

    asyncio.run(main())
