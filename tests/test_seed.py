"""The seed document's REST client code, run unchanged (minus its Authorization header) against the
gateway in front of the emulated Azure ML endpoint."""

from __future__ import annotations

import json

import pytest
import requests

from gateway.emulator.server import EmulatorServer
from gateway.emulator.state import EmulatorState


@pytest.fixture
def scoring_endpoint(gateway_factory, tmp_path):
    state = EmulatorState()
    with EmulatorServer(state) as emulator:
        keys = state.keys()
        (tmp_path / "primary").write_text(keys["primary"] + "\n")
        (tmp_path / "secondary").write_text(keys["secondary"] + "\n")
        gw = gateway_factory(
            {
                "routes": {
                    "iris": {
                        "path": "/iris",
                        "upstream": emulator.scoring_uri,
                        "auth": {
                            "type": "key",
                            "primary": {"file": str(tmp_path / "primary")},
                            "secondary": {"file": str(tmp_path / "secondary")},
                        },
                    }
                }
            }
        )
        yield gw.url + "/iris", state, emulator.scoring_uri


def _seed_client(endpoint: str) -> list[str]:
    # --- from ../shared/seed: "Use a REST endpoint", unchanged ---
    x_new = [[0.1, 2.3, 4.1, 2.0], [0.2, 1.8, 3.9, 2.1]]
    json_data = json.dumps({"data": x_new})
    request_headers = {"Content-Type": "application/json"}
    response = requests.post(url=endpoint, data=json_data, headers=request_headers)
    predictions = json.loads(response.json())
    for i in range(len(x_new)):
        print(x_new[i], predictions[i])
    # --- end of seed code ---
    return predictions


def test_seed_client_code_works_through_the_gateway(scoring_endpoint, capsys):
    endpoint, state, _ = scoring_endpoint
    assert _seed_client(endpoint) == ["versicolor", "versicolor"]
    assert "[0.1, 2.3, 4.1, 2.0] versicolor" in capsys.readouterr().out
    assert state.score_auth_count("key:primary") == 1


def test_seed_client_survives_a_regenerated_primary_key(scoring_endpoint):
    endpoint, state, _ = scoring_endpoint
    assert _seed_client(endpoint) == ["versicolor", "versicolor"]
    state.regenerate_key("primary")
    assert _seed_client(endpoint) == ["versicolor", "versicolor"]
    assert state.score_auth_count("key:secondary") == 1


def test_body_is_byte_identical_to_a_direct_call(scoring_endpoint):
    endpoint, state, scoring_uri = scoring_endpoint
    payload = json.dumps({"data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]})
    through_gateway = requests.post(endpoint, data=payload, headers={"Content-Type": "application/json"})
    direct = requests.post(
        scoring_uri,
        data=payload,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {state.primary_key}"},
    )
    assert through_gateway.status_code == direct.status_code == 200
    assert through_gateway.content == direct.content
    assert json.loads(through_gateway.json()) == ["setosa", "virginica"]
