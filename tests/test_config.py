from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.config import load_config, parse_config
from gateway.errors import ConfigError

ISSUE_EXAMPLE = """
server:
  host: 127.0.0.1          # loopback by default: a sidecar shares the pod's network
  port: 8080
routes:
  iris:                    # route name, used in logs, metrics, readiness
    path: /iris            # requests under this prefix...
    upstream: https://iris-demo.eastus.inference.ml.azure.com/score   # ...go here
    timeout_s: 60
    headers:               # set on every upstream request of this route
      azureml-model-deployment: blue
    auth:
      type: key
      primary: {env: IRIS_PRIMARY_KEY}
      secondary: {file: /var/run/secrets/iris/secondary-key}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_issue_example_loads_as_written(tmp_path):
    config = load_config(_write(tmp_path, ISSUE_EXAMPLE))
    route = config.routes["iris"]
    assert route.path == "/iris"
    assert route.upstream == "https://iris-demo.eastus.inference.ml.azure.com/score"
    assert route.auth.type == "key"
    assert config.server.port == 8080
    assert config.max_body_bytes(route) == 10 * 1024 * 1024
    assert config.replay_buffer_bytes(route) == 2 * 1024 * 1024


@pytest.mark.parametrize(
    ("snippet", "where", "what"),
    [
        ({"path": "iris"}, "routes.iris.path", "must start with '/'"),
        ({"path": "/healthz"}, "routes.iris.path", "shadow the admin endpoint /healthz"),
        ({"path": "/"}, "routes.iris.path", "shadow"),
        ({"upstream": "ftp://x"}, "routes.iris.upstream", "http:// or https://"),
        ({"timeout_s": -1}, "routes.iris.timeout_s", "greater than 0"),
        ({"tiemout_s": 5}, "routes.iris.tiemout_s", "unknown key"),
        ({"auth": {"type": "key"}}, "routes.iris.auth", "needs `primary`"),
        ({"auth": {"type": "magic"}}, "routes.iris.auth", "does not match"),
        (
            {"auth": {"type": "key", "primary": {"env": 3}}},
            "routes.iris.auth.primary",
            "{env: VARIABLE_NAME}",
        ),
        ({"headers": {"Authorization": "x"}}, "routes.iris.headers", "set by the gateway"),
        ({"headers": {"bad header": "x"}}, "routes.iris.headers", "not a valid header name"),
    ],
)
def test_invalid_config_names_file_key_path_and_problem(snippet, where, what):
    route = {"path": "/iris", "upstream": "http://127.0.0.1:1/score", "auth": {"type": "none"}, **snippet}
    with pytest.raises(ConfigError) as info:
        parse_config({"routes": {"iris": route}}, "my.yaml")
    message = str(info.value)
    assert message.startswith(f"my.yaml: {where}"), message
    assert what in message


def test_duplicate_paths_and_empty_routes():
    route = {"path": "/a", "upstream": "http://x", "auth": {"type": "none"}}
    with pytest.raises(ConfigError, match="same path"):
        parse_config({"routes": {"a": route, "b": route}})
    with pytest.raises(ConfigError, match="routes"):
        parse_config({"routes": {}})


def test_literal_secrets_are_hidden_in_repr():
    config = parse_config(
        {
            "routes": {
                "a": {
                    "path": "/a",
                    "upstream": "http://x",
                    "auth": {"type": "key", "primary": "sup3r-s3cret-k3y"},
                }
            }
        }
    )
    assert "sup3r-s3cret-k3y" not in repr(config)
    assert "sup3r-s3cret-k3y" not in str(config.model_dump())


def test_yaml_errors_name_line(tmp_path):
    with pytest.raises(ConfigError, match=r"gateway.yaml: line \d+, column \d+: invalid YAML"):
        load_config(_write(tmp_path, "routes:\n  a: [unclosed\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


def _gateway(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=60, **kwargs
    )


def test_serve_exits_2_on_invalid_config(tmp_path):
    path = _write(tmp_path, "routes:\n  iris:\n    path: /iris\n    upstream: nope\n    auth: {type: none}\n")
    result = _gateway("serve", "--config", str(path))
    assert result.returncode == 2
    assert f"{path}: routes.iris.upstream:" in result.stderr


def test_serve_exits_2_on_missing_secret(tmp_path):
    path = _write(tmp_path, ISSUE_EXAMPLE)
    env = {k: v for k, v in __import__("os").environ.items() if k != "IRIS_PRIMARY_KEY"}
    result = _gateway("serve", "--config", str(path), env=env)
    assert result.returncode == 2
    assert "routes.iris.auth.primary: environment variable IRIS_PRIMARY_KEY is not set" in result.stderr


def test_serve_refuses_open_remote_bind(tmp_path):
    path = _write(
        tmp_path, "routes:\n  a:\n    path: /a\n    upstream: http://127.0.0.1:9\n    auth: {type: none}\n"
    )
    result = _gateway("serve", "--config", str(path), "--host", "0.0.0.0")
    assert result.returncode == 2
    assert "inbound.allow_cidrs" in result.stderr


def test_header_value_from_file_with_line_break_is_a_config_error(tmp_path):
    key = tmp_path / "key"
    key.write_text("abc\r\nX-Injected: 1\n")
    config = {
        "routes": {
            "iris": {
                "path": "/iris",
                "upstream": "http://127.0.0.1:9/score",
                "headers": {"x-api-key": {"file": str(key)}},
                "auth": {"type": "key", "primary": {"file": str(key)}},
            }
        }
    }
    from gateway.app import GatewayApp

    with pytest.raises(ConfigError, match=r"routes\.iris\.auth\.primary: .*line break"):
        GatewayApp(parse_config(config))
    config["routes"]["iris"]["auth"] = {"type": "none"}
    with pytest.raises(ConfigError, match=r"routes\.iris\.headers\.x-api-key: .*line break"):
        GatewayApp(parse_config(config))
