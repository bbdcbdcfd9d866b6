from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from servers import ServerThread
from upstream import Upstream

from gateway.app import GatewayApp
from gateway.config import parse_config

PRIMARY = "primary-key-0123456789abcdef"
SECONDARY = "secondary-key-0123456789abcdef"


@pytest.fixture
def upstream() -> Iterator[tuple[Upstream, ServerThread]]:
    app = Upstream(accepted_keys={PRIMARY, SECONDARY})
    with ServerThread(app, lifespan="off") as server:
        yield app, server


@pytest.fixture
def gateway_factory() -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def start(config: dict[str, Any], **options: Any) -> ServerThread:
        app = GatewayApp(parse_config(config), config_path=options.pop("config_path", None))
        server = ServerThread(app, **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def key_route(upstream_url: str, **auth: Any) -> dict[str, Any]:
    return {"path": "/iris", "upstream": upstream_url, "auth": {"type": "key", **auth}}
