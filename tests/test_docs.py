"""The documentation and the Grafana dashboard stay true to the code.

- docs/configuration.md is exactly what `python -m gateway.config_reference` generates, and every
  configuration key has a description;
- docs/troubleshooting.md lists every error code the gateway answers with, and every log line it
  writes (and quotes no log line the code no longer writes);
- docs/metrics.md and grafana/scoring-gateway.json use only metrics (and labels) that exist;
- relative links between the docs resolve.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from gateway import config as config_models
from gateway import config_reference, errors, metrics

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DASHBOARD = ROOT / "grafana" / "scoring-gateway.json"
REGENERATE = "python -m gateway.config_reference > docs/configuration.md"


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------ configuration.md


def test_configuration_reference_is_current() -> None:
    expected = config_reference.render()
    actual = _read(DOCS / "configuration.md")
    assert actual == expected, f"docs/configuration.md is stale: run `{REGENERATE}`"


def test_every_configuration_key_is_described() -> None:
    missing = [key for key, description in config_reference.documented_keys() if not description]
    assert not missing, (
        "describe these keys with Field(description=...) in gateway/config.py "
        f"(or in FIELD_NOTES of gateway/config_reference.py): {missing}"
    )


def test_reference_covers_every_model() -> None:
    rendered = {section.model for section in config_reference.sections()}
    models = {
        value
        for value in vars(config_models).values()
        if isinstance(value, type)
        and issubclass(value, config_models._Model)
        and value is not config_models._Model
    }
    # The three secret forms are explained once in the introduction rather than as sections.
    secret_forms = {config_models.LiteralRef, config_models.EnvRef, config_models.FileRef}
    secret_forms |= {config_models.KeyVaultRef, config_models.KeyVaultSecretRef}
    assert models - secret_forms - rendered == set()


@pytest.mark.parametrize("note", sorted(config_reference.FIELD_NOTES))
def test_field_note_names_an_existing_key(note: str) -> None:
    model_name, _, field = note.partition(".")
    model = getattr(config_models, model_name, None)
    assert model is not None, f"FIELD_NOTES: no model {model_name} in gateway/config.py"
    assert field in model.model_fields, f"FIELD_NOTES: {model_name} has no field {field}"


@pytest.mark.parametrize("note", sorted(config_reference.SECTION_NOTES))
def test_section_note_names_an_existing_model(note: str) -> None:
    assert hasattr(config_models, note), f"SECTION_NOTES: no model {note} in gateway/config.py"


def test_rendering_is_deterministic() -> None:
    assert config_reference.render() == config_reference.render()


# ------------------------------------------------------------------------------ troubleshooting.md


def _client_facing_errors() -> list[type[errors.ClientFacingError]]:
    found: list[type[errors.ClientFacingError]] = []
    pending = list(errors.ClientFacingError.__subclasses__())
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: (c.status, c.code))


ERRORS = _client_facing_errors()


@pytest.mark.parametrize("error", ERRORS, ids=[e.code for e in ERRORS])
def test_troubleshooting_explains_every_error_code(error: type[errors.ClientFacingError]) -> None:
    text = _read(DOCS / "troubleshooting.md")
    assert f"| {error.status} | `{error.code}` |" in text, f"add {error.code} to the error code table"
    assert f"### {error.status} `{error.code}`" in text, f"add a section for {error.code}"


_LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
_PLACEHOLDER = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdfrx]")


def _source_files() -> Iterator[Path]:
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        if "emulator" not in path.parts:  # the emulator logs nothing a gateway user sees
            yield path


def _log_formats() -> Iterator[tuple[str, str, str]]:
    """(where, level, format string) of every logger call with a literal message, or with a module's string
    constant as its message (the access line's `ACCESS_FORMAT`)."""
    for path in _source_files():
        tree = ast.parse(_read(path))
        constants = {
            target.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            target = node.func.value
            if node.func.attr not in _LEVELS or not isinstance(target, ast.Name):
                continue
            if not target.id.endswith("logger") or not node.args:
                continue
            message = node.args[0]
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if isinstance(message, ast.Constant) and isinstance(message.value, str):
                yield where, node.func.attr, message.value
            elif isinstance(message, ast.Name) and message.id in constants:
                yield where, node.func.attr, constants[message.id]


LOG_FORMATS = [item for item in _log_formats() if item[1] != "debug"]


def _fragments(text: str, placeholder: re.Pattern[str], minimum: int) -> list[str]:
    return [f for f in placeholder.split(text) if len(f.strip()) >= minimum]


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("item", LOG_FORMATS, ids=[where for where, _, _ in LOG_FORMATS])
def test_troubleshooting_quotes_every_log_line(item: tuple[str, str, str]) -> None:
    where, _, message = item
    text = _flat(_read(DOCS / "troubleshooting.md"))
    missing = [f for f in _fragments(message, _PLACEHOLDER, 2) if _flat(f) not in text]
    assert not missing, f"{where}: docs/troubleshooting.md does not quote {message!r} (missing {missing})"


def _code_strings() -> list[str]:
    """Every string literal in the gateway, f-strings with their values left out."""
    strings: list[str] = []
    for path in _source_files():
        for node in ast.walk(ast.parse(_read(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                parts = [p.value if isinstance(p, ast.Constant) else "" for p in node.values]
                strings.append("\x00".join(str(part) for part in parts))
    return strings


def _documented_log_lines() -> list[str]:
    text = _read(DOCS / "troubleshooting.md")
    section = text.split("## Log lines", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| (?:DEBUG|INFO|WARNING|ERROR) \| `([^`]+)` \|", section, re.MULTILINE)


def test_troubleshooting_quotes_only_existing_log_lines() -> None:
    documented = _documented_log_lines()
    assert len(documented) >= len({m for _, _, m in LOG_FORMATS}) - 1
    corpus = "\n".join(_flat(s) for s in _code_strings())
    # Placeholders split a documented line into literal fragments; so do `:` and `;`, where the code
    # joins messages from several strings (a secret's source, an error and what is done about it).
    split = re.compile(r"\(?<[^>]+>\)?|[:;]")
    stale = []
    for line in documented:
        for fragment in _fragments(line, split, 8):
            if _flat(fragment.strip()) not in corpus:
                stale.append((line, fragment))
    assert not stale, f"docs/troubleshooting.md quotes log text the code does not write: {stale}"


# ------------------------------------------------------------------------------ metrics


def _metrics() -> dict[str, MetricWrapperBase]:
    return {m._name: m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}


def _exposed() -> dict[str, tuple[str, ...]]:
    """Series name as Prometheus sees it -> the metric's label names."""
    exposed: dict[str, tuple[str, ...]] = {}
    for name, metric in _metrics().items():
        labels = tuple(metric._labelnames)
        if isinstance(metric, Counter):
            exposed[f"{name}_total"] = labels
        elif isinstance(metric, Histogram):
            for suffix in ("_bucket", "_sum", "_count"):
                exposed[name + suffix] = (*labels, "le") if suffix == "_bucket" else labels
        elif isinstance(metric, Gauge):
            exposed[name] = labels
        else:  # pragma: no cover - a new metric type needs a rule here
            raise AssertionError(f"unknown metric type of {name}")
    return exposed


def test_metrics_doc_lists_every_metric() -> None:
    text = _read(DOCS / "metrics.md")
    exposed = _exposed()
    for name, metric in _metrics().items():
        shown = f"{name}_total" if isinstance(metric, Counter) else name
        assert f"`{shown}`" in text, f"docs/metrics.md does not describe {shown}"
    for mentioned in set(re.findall(r"\bgateway_[a-z0-9_]+", text)):
        assert mentioned in exposed or mentioned in _metrics(), f"docs/metrics.md names {mentioned}"


# Labels Prometheus adds to every scraped series.
_TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_read(DASHBOARD))
    return data


def _panels(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in data["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _exprs(data: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(data) for t in p.get("targets", []) if "expr" in t]
    for variable in data.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and isinstance(query, str):
            exprs.append(query)
    return exprs


def test_dashboard_is_valid_grafana_json() -> None:
    data = _dashboard()
    assert data["title"] and data["uid"] and isinstance(data["schemaVersion"], int)
    ids = [p["id"] for p in _panels(data)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(data):
        assert {"type", "title", "gridPos"} <= set(panel), panel.get("title")
        if panel["type"] != "row":
            assert panel["targets"], f"panel {panel['title']!r} queries nothing"
            assert panel["datasource"]["uid"] == "${datasource}"


def test_dashboard_queries_only_existing_metrics_and_labels() -> None:
    exposed = _exposed()
    exprs = _exprs(_dashboard())
    assert exprs
    for expr in exprs:
        names = re.findall(r"\b(gateway_[a-z0-9_]+)\b", expr)
        assert names, f"query names no gateway metric: {expr}"
        for name in names:
            assert name in exposed, f"{name} does not exist (gateway/metrics.py): {expr}"
        known = set().union(*(exposed[n] for n in names)) | _TARGET_LABELS
        selectors = re.findall(r"\{([^}]*)\}", expr)
        labels = [m for s in selectors for m in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", s)]
        for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            labels += [label.strip() for label in clause.split(",") if label.strip()]
        unknown = sorted(set(labels) - known)
        assert not unknown, f"unknown labels {unknown} in {expr}"


def test_dashboard_shows_every_metric() -> None:
    used = set(re.findall(r"\b(gateway_[a-z0-9_]+)\b", "\n".join(_exprs(_dashboard()))))
    for name, metric in _metrics().items():
        if isinstance(metric, Counter):
            assert f"{name}_total" in used, f"the dashboard does not show {name}_total"
        elif isinstance(metric, Histogram):
            assert f"{name}_bucket" in used, f"the dashboard does not show {name}"
        else:
            assert name in used, f"the dashboard does not show {name}"


def test_dashboard_marks_the_expiry_threshold() -> None:
    panel = next(p for p in _panels(_dashboard()) if "gateway_credential_expiry_seconds" in json.dumps(p))
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert any(step["value"] is not None and step["value"] > 0 for step in steps)


# ------------------------------------------------------------------------------ links


def _slug(heading: str) -> str:
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _read(path)
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}
    anchors |= set(re.findall(r'<a id="([^"]+)"', text))
    return anchors


DOC_FILES = sorted(DOCS.glob("*.md"))


@pytest.mark.parametrize("doc", DOC_FILES, ids=[d.name for d in DOC_FILES])
def test_relative_links_resolve(doc: Path) -> None:
    text = re.sub(r"```.*?```", "", _read(doc), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        assert path.exists(), f"{doc.name}: broken link {target}"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{doc.name}: no anchor #{anchor} in {path.name}"


def _yaml_examples() -> list[tuple[str, str]]:
    found = []
    for doc in [*DOC_FILES, ROOT / "README.md"]:
        for number, block in enumerate(re.findall(r"```ya?ml\n(.*?)```", _read(doc), flags=re.DOTALL)):
            found.append((f"{doc.name}#{number}", block))
    return found


YAML_EXAMPLES = _yaml_examples()


@pytest.mark.parametrize(("where", "block"), YAML_EXAMPLES, ids=[where for where, _ in YAML_EXAMPLES])
def test_every_yaml_example_in_the_docs_is_a_valid_config(where: str, block: str) -> None:
    """A reader copies these (callers, limits, Key Vault, Docker, Kubernetes...): each must load as the
    gateway's config, a fragment without routes together with one plain route."""
    data = yaml.safe_load(block)
    assert isinstance(data, dict), f"{where}: not a YAML mapping"
    data.setdefault(
        "routes", {"x": {"path": "/x", "upstream": "https://e.invalid/score", "auth": {"type": "none"}}}
    )
    config_models.parse_config(data)  # a ConfigError names the key at fault


def test_the_docs_show_the_new_surfaces_in_yaml() -> None:
    where = {name.split("#")[0] for name, _ in YAML_EXAMPLES}
    assert {"callers.md", "limits.md", "README.md"} <= where


def test_expected_docs_exist() -> None:
    names = {d.name for d in DOC_FILES}
    assert {
        "configuration.md",
        "troubleshooting.md",
        "kubernetes.md",
        "emulator.md",
        "metrics.md",
        "docker.md",
    } <= names
    assert "## Rotating keys with zero downtime" in _read(DOCS / "kubernetes.md")
