"""Every shipped configuration file loads, would start, keeps secrets out of the file, and together the
examples show every way of authenticating."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from gateway.cli import inbound_problem
from gateway.config import (
    AadTokenAuth,
    AmlTokenAuth,
    EnvRef,
    FileRef,
    GatewayConfig,
    KeyAuth,
    KeyVaultRef,
    LiteralRef,
    ManagedIdentityRef,
    load_config,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted([*ROOT.glob("config/*.yaml"), *ROOT.glob("config/examples/*.yaml")])


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def _walk(value: Any) -> Iterator[Any]:
    """Every model and value nested in a loaded config."""
    yield value
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _walk(getattr(value, name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _walk(item)


def test_there_are_examples() -> None:
    assert (ROOT / "config/gateway.yaml") in CONFIG_FILES
    assert len(CONFIG_FILES) >= 9


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_ids(CONFIG_FILES))
def test_example_loads(path: Path) -> None:
    # Secrets are resolved only when the gateway starts, so no environment variable or key file is needed.
    config = load_config(path)
    assert config.routes


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_ids(CONFIG_FILES))
def test_example_would_start(path: Path) -> None:
    assert inbound_problem(load_config(path)) is None


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_ids(CONFIG_FILES))
def test_example_has_no_literal_secret(path: Path) -> None:
    literals = [v for v in _walk(load_config(path)) if isinstance(v, LiteralRef)]
    assert not literals, "examples must take secrets from {env: ...} or {file: ...}"


def _forms(config: GatewayConfig) -> set[str]:
    forms: set[str] = set()
    for route in config.routes.values():
        auth = route.auth
        if isinstance(auth, KeyAuth):
            if auth.from_endpoint is not None:
                forms.add("key from_endpoint")
            for slot in (auth.primary, auth.secondary):
                if isinstance(slot, EnvRef):
                    forms.add("key env")
                elif isinstance(slot, FileRef):
                    forms.add("key file")
                elif isinstance(slot, KeyVaultRef):
                    forms.add("key keyvault")
        elif isinstance(auth, AadTokenAuth | AmlTokenAuth):
            forms.add(auth.type)
            identity = auth.identity
            if identity.client_secret is not None:
                forms.add("client_secret")
            if identity.certificate is not None:
                forms.add("certificate")
            if identity.federated_token_file is not None:
                forms.add("federated_token_file")
            if identity.managed_identity == "system":
                forms.add("managed_identity system")
            elif isinstance(identity.managed_identity, ManagedIdentityRef):
                forms.add("managed_identity user-assigned")
        if route.upstreams is not None and len({u.priority for u in route.upstreams}) > 1:
            forms.add("upstreams with priorities")
        if "azureml-model-deployment" in {h.lower() for h in route.headers}:
            forms.add("deployment header")
    return forms


def test_examples_cover_every_auth_form() -> None:
    seen: set[str] = set()
    for path in CONFIG_FILES:
        seen |= _forms(load_config(path))
    wanted = {
        "key env",
        "key file",
        "key from_endpoint",
        "key keyvault",
        "aad_token",
        "aml_token",
        "client_secret",
        "certificate",
        "federated_token_file",
        "managed_identity system",
        "managed_identity user-assigned",
        "upstreams with priorities",
        "deployment header",
    }
    assert wanted <= seen, f"no example shows: {sorted(wanted - seen)}"


def test_main_example_is_the_one_in_the_readme() -> None:
    config = load_config(ROOT / "config/gateway.yaml")
    auth = config.routes["iris"].auth
    assert isinstance(auth, KeyAuth)
    assert auth.primary == EnvRef(env="IRIS_PRIMARY_KEY")
    assert isinstance(auth.secondary, FileRef)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in readme.split("```yaml\n")[1:]]
    documented = [yaml.safe_load(b) for b in blocks if "routes:" in b]
    assert documented, "README.md shows no configuration"
    on_disk = yaml.safe_load((ROOT / "config/gateway.yaml").read_text(encoding="utf-8"))
    assert documented[0] == on_disk, "config/gateway.yaml and README.md's example differ"
