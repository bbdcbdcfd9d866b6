"""The Kubernetes manifests in config/kubernetes/: schema-valid for a pinned Kubernetes version, and
consistent with each other and with the gateway configuration they carry.

Schema validation uses kubernetes-validate, which ships the JSON schemas of each Kubernetes release
inside the package (no network), in strict mode: unknown fields are errors, as `kubectl apply
--validate=strict` makes them.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import posixpath
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import _parser, inbound_problem
from gateway.config import AadTokenAuth, FileRef, GatewayConfig, KeyAuth, KeyVaultRef, parse_config

try:
    import kubernetes_validate
except ImportError:  # only the schema tests need it; they fail (not skip) without it
    kubernetes_validate = None

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "config" / "kubernetes"
K8S_VERSION = "1.30"
GATEWAY_IMAGE = "scoring-gateway:0.1.0"
WORKLOAD_IDENTITY_LABEL = "azure.workload.identity/use"
WORKLOAD_IDENTITY_CLIENT_ID = "azure.workload.identity/client-id"


@dataclass
class Doc:
    path: Path
    index: int
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.data["kind"])

    @property
    def name(self) -> str:
        return str(self.data["metadata"]["name"])

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}#{self.index} ({self.kind} {self.name})"


def load_docs(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as handle:
        return [Doc(path, i, d) for i, d in enumerate(yaml.safe_load_all(handle)) if d is not None]


FILES = sorted(MANIFESTS.rglob("*.yaml")) + sorted(MANIFESTS.rglob("*.yml"))
DOCS = [doc for path in FILES for doc in load_docs(path)]
FOLDERS = sorted({doc.path.parent for doc in DOCS})


def folder_docs(folder: Path) -> list[Doc]:
    return [doc for doc in DOCS if doc.path.parent == folder]


def validate(data: dict[str, Any], version: str = K8S_VERSION) -> None:
    if kubernetes_validate is None:
        pytest.fail("kubernetes-validate is not installed: it is in pyproject's `test` extra")
    kubernetes_validate.validate(data, version, strict=True)


def _rejected() -> type[Exception]:
    return kubernetes_validate.ValidationError if kubernetes_validate is not None else Exception


# --------------------------------------------------------------------------------------------- schema


def test_manifests_exist() -> None:
    kinds = {doc.kind for doc in DOCS}
    assert {
        "Deployment",
        "ConfigMap",
        "Secret",
        "ServiceAccount",
        "Service",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PodDisruptionBudget",
    } <= kinds
    assert {f.relative_to(MANIFESTS).as_posix() for f in FOLDERS} >= {
        "keyvault-rotation",
        "sidecar/key-secret",
        "sidecar/workload-identity",
        "standalone",
    }
    assert "CronJob" in kinds


@pytest.mark.parametrize("doc", DOCS, ids=str)
def test_manifest_matches_the_kubernetes_schema(doc: Doc) -> None:
    validate(doc.data)


def _deployment() -> dict[str, Any]:
    return copy.deepcopy(next(d.data for d in DOCS if d.kind == "Deployment"))


def _pod(data: dict[str, Any]) -> dict[str, Any]:
    return data["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _unknown_container_field(data: dict[str, Any]) -> None:
    _pod(data)["containers"][0]["livenessProbes"] = {}


def _unknown_spec_field(data: dict[str, Any]) -> None:
    data["spec"]["replica"] = 2


def _wrong_type(data: dict[str, Any]) -> None:
    data["spec"]["replicas"] = "two"


def _wrong_nested_type(data: dict[str, Any]) -> None:
    _pod(data)["terminationGracePeriodSeconds"] = "30s"


def _missing_required(data: dict[str, Any]) -> None:
    del _pod(data)["containers"][0]["name"]


def _misplaced_security_field(data: dict[str, Any]) -> None:
    # readOnlyRootFilesystem belongs to the container's securityContext, not the pod's.
    _pod(data)["securityContext"]["readOnlyRootFilesystem"] = True


BREAKAGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "unknown container field": _unknown_container_field,
    "unknown spec field": _unknown_spec_field,
    "wrong type": _wrong_type,
    "wrong nested type": _wrong_nested_type,
    "missing required field": _missing_required,
    "field in the wrong place": _misplaced_security_field,
}


@pytest.mark.parametrize("breakage", list(BREAKAGES), ids=list(BREAKAGES))
def test_broken_manifest_is_rejected(breakage: str) -> None:
    data = _deployment()
    validate(data)  # the unbroken one passes
    BREAKAGES[breakage](data)
    with pytest.raises(_rejected()):
        validate(data)


def test_the_pinned_version_is_the_one_validated_against() -> None:
    # A preStop `sleep` action exists from Kubernetes 1.29 on: validating for 1.28 must reject it.
    data = _deployment()
    _pod(data)["containers"][0]["lifecycle"] = {"preStop": {"sleep": {"seconds": 5}}}
    validate(data)
    with pytest.raises(_rejected()):
        validate(data, "1.28")


# ------------------------------------------------------------------------------------- cross-checks


def _containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def _gateway_container(pod: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in _containers(pod) if c["image"] == GATEWAY_IMAGE]
    assert len(found) == 1, f"expected one container running {GATEWAY_IMAGE}"
    return found[0]


def _by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {doc.name: doc for doc in docs if doc.kind == kind}


def _labels_match(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@dataclass
class Gateway:
    """A Deployment that runs the gateway, with everything it references resolved."""

    folder: Path
    deployment: Doc
    pod: dict[str, Any]
    container: dict[str, Any]
    config: GatewayConfig
    config_path: str
    mounts: dict[str, dict[str, Any]]  # mountPath -> volume
    docs: list[Doc]

    @property
    def sidecar(self) -> bool:
        return any(c is not self.container for c in _containers(self.pod))


def _dockerfile_exec_form(instruction: str) -> list[str]:
    """ENTRYPOINT or CMD of the gateway's Dockerfile (exec form), as Kubernetes sees the image."""
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if line.startswith(instruction + " "):
            value = json.loads(line[len(instruction) + 1 :])
            assert isinstance(value, list), f"{instruction} must use the exec form"
            return [str(v) for v in value]
    return []


def argv(container: dict[str, Any]) -> list[str]:
    """The process the container runs: `command` replaces ENTRYPOINT, `args` replaces CMD."""
    if "command" in container:
        return [*container["command"], *container.get("args", [])]
    return [*_dockerfile_exec_form("ENTRYPOINT"), *container.get("args", _dockerfile_exec_form("CMD"))]


def _config_path(container: dict[str, Any]) -> str:
    words = argv(container)
    assert words[0] == "gateway", f"the container runs {words}, not the gateway"
    try:
        args = _parser().parse_args(words[1:])
    except SystemExit:
        pytest.fail(f"`{' '.join(words)}` is not a valid gateway command line")
    assert args.command == "serve", f"the container runs `{' '.join(words)}`"
    assert args.config, "the gateway must be given --config"
    return str(args.config)


def _gateways() -> list[Gateway]:
    found = []
    for folder in FOLDERS:
        docs = folder_docs(folder)
        config_maps = _by_kind(docs, "ConfigMap")
        for deployment in docs:
            if deployment.kind != "Deployment":
                continue
            pod = _pod(deployment.data)
            container = _gateway_container(pod)
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
            config_path = _config_path(container)
            directory, filename = posixpath.split(config_path)
            assert directory in mounts, f"{deployment}: nothing is mounted at {directory}"
            source = mounts[directory].get("configMap")
            assert source, f"{deployment}: {directory} is not a ConfigMap volume"
            assert "subPath" not in str(container.get("volumeMounts")), "subPath mounts never update"
            config_map = config_maps.get(source["name"])
            assert config_map is not None, f"{deployment}: ConfigMap {source['name']} is not in {folder}"
            text = config_map.data["data"][filename]
            config = parse_config(yaml.safe_load(text), f"{config_map}:{filename}")
            found.append(Gateway(folder, deployment, pod, container, config, config_path, mounts, docs))
    return found


GATEWAYS = _gateways()


def _gw_id(gateway: Gateway) -> str:
    return str(gateway.deployment)


def test_every_folder_has_a_gateway() -> None:
    assert {g.folder for g in GATEWAYS} == set(FOLDERS)


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: str(f.relative_to(ROOT)))
def test_references_resolve_within_the_folder(folder: Path) -> None:
    docs = folder_docs(folder)
    names = {kind: _by_kind(docs, kind) for kind in ("ConfigMap", "Secret", "ServiceAccount", "Deployment")}
    deployments = list(names["Deployment"].values())
    for deployment in deployments:
        pod = _pod(deployment.data)
        spec = deployment.data["spec"]
        assert _labels_match(spec["selector"], spec["template"]["metadata"]["labels"]), deployment
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in names["ConfigMap"], (deployment, volume)
            if "secret" in volume:
                assert volume["secret"]["secretName"] in names["Secret"], (deployment, volume)
        account = pod.get("serviceAccountName")
        if account is not None:
            assert account in names["ServiceAccount"], f"{deployment}: no ServiceAccount {account}"
        for container in _containers(pod):
            ports = {p.get("name") for p in container.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str):
                    assert port in ports, f"{deployment}: {probe} uses an unknown port {port}"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if key in ref:
                        assert ref[key]["name"] in names[kind], (deployment, env)
    pod_labels = [d.data["spec"]["template"]["metadata"]["labels"] for d in deployments]
    pod_ports = {
        p.get("name") for d in deployments for c in _containers(_pod(d.data)) for p in c.get("ports", [])
    }
    for doc in docs:
        if doc.kind == "Service":
            selector = {"matchLabels": doc.data["spec"]["selector"]}
            assert any(_labels_match(selector, labels) for labels in pod_labels), f"{doc} selects no pod"
            for port in doc.data["spec"]["ports"]:
                target = port.get("targetPort")
                if isinstance(target, str):
                    assert target in pod_ports, f"{doc}: no container port named {target}"
        elif doc.kind in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = doc.data["spec"]["selector" if doc.kind == "PodDisruptionBudget" else "podSelector"]
            assert any(_labels_match(selector, labels) for labels in pod_labels), f"{doc} selects no pod"
        elif doc.kind == "HorizontalPodAutoscaler":
            target = doc.data["spec"]["scaleTargetRef"]
            assert target["kind"] == "Deployment" and target["name"] in names["Deployment"], doc


@pytest.mark.parametrize("gateway", GATEWAYS, ids=_gw_id)
def test_gateway_config_would_start(gateway: Gateway) -> None:
    assert inbound_problem(gateway.config) is None


@pytest.mark.parametrize("gateway", GATEWAYS, ids=_gw_id)
def test_gateway_container(gateway: Gateway) -> None:
    container, config = gateway.container, gateway.config
    assert gateway.config_path == "/etc/gateway/gateway.yaml"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {}
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port == config.server.port, f"{probe} does not probe the port the gateway listens on"
        assert "host" not in get, "probes must go to the pod IP"
        probes[probe] = get["path"]
    assert probes == {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


@pytest.mark.parametrize("gateway", GATEWAYS, ids=_gw_id)
def test_gateway_runs_locked_down(gateway: Gateway) -> None:
    pod_context = gateway.pod.get("securityContext", {})
    context = gateway.container["securityContext"]
    assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True
    assert context.get("runAsUser", pod_context.get("runAsUser", 0)) != 0
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert not context["capabilities"].get("add")
    assert gateway.pod.get("automountServiceAccountToken") is False
    # A read-only root still needs a writable /tmp (multi-worker metrics live there).
    assert gateway.mounts.get("/tmp", {}).get("emptyDir") is not None


@pytest.mark.parametrize("gateway", GATEWAYS, ids=_gw_id)
def test_termination_grace_outlasts_the_gateway(gateway: Gateway) -> None:
    pre_stop = gateway.container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        pre_stop_s = pre_stop["sleep"]["seconds"]
    elif "exec" in pre_stop:
        words = shlex.split(" ".join(pre_stop["exec"]["command"]))
        pre_stop_s = int(words[words.index("sleep") + 1]) if "sleep" in words else 0
    else:
        pre_stop_s = 0
    grace = gateway.pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop_s + gateway.config.server.grace_period_s


@pytest.mark.parametrize("gateway", GATEWAYS, ids=_gw_id)
def test_secret_files_are_mounted(gateway: Gateway) -> None:
    secrets = _by_kind(gateway.docs, "Secret")
    files = [v for v in _walk_config(gateway.config) if isinstance(v, FileRef)]
    for ref in files:
        directory, filename = posixpath.split(ref.file)
        volume = gateway.mounts.get(directory)
        assert volume is not None and "secret" in volume, f"{ref.file} is not in a Secret volume"
        secret = secrets[volume["secret"]["secretName"]].data
        keys = {**secret.get("data", {}), **secret.get("stringData", {})}
        assert filename in keys, f"Secret {secret['metadata']['name']} has no key {filename}"
        mode = volume["secret"].get("defaultMode", 0o644)
        if mode & 0o004 == 0:  # not world-readable: the pod's fsGroup must be able to read it
            assert mode & 0o040 and gateway.pod["securityContext"].get("fsGroup") is not None


def _walk_config(value: Any) -> Iterator[Any]:
    yield value
    if hasattr(type(value), "model_fields"):
        for name in type(value).model_fields:
            yield from _walk_config(getattr(value, name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _walk_config(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk_config(item)


@pytest.mark.parametrize("gateway", [g for g in GATEWAYS if g.sidecar], ids=_gw_id)
def test_sidecar_serves_only_its_own_pod(gateway: Gateway) -> None:
    config = gateway.config
    # The kubelet probes the pod IP, so the gateway listens on all interfaces; only loopback clients
    # (the pod's own containers) may use it.
    assert config.server.host == "0.0.0.0"
    assert not config.server.allow_unauthenticated_remote
    assert config.inbound.allow_cidrs
    for cidr in config.inbound.allow_cidrs:
        assert ipaddress.ip_network(cidr, strict=False).is_loopback, f"{cidr} is not loopback"
    app = [c for c in _containers(gateway.pod) if c is not gateway.container]
    urls = [e.get("value", "") for c in app for e in c.get("env", [])]
    assert any(u.startswith(f"http://127.0.0.1:{config.server.port}/") for u in urls)


@pytest.mark.parametrize("gateway", [g for g in GATEWAYS if not g.sidecar], ids=_gw_id)
def test_standalone_is_highly_available(gateway: Gateway) -> None:
    spec = gateway.deployment.data["spec"]
    assert spec["replicas"] >= 2
    assert gateway.pod.get("topologySpreadConstraints") or gateway.pod.get("affinity", {}).get(
        "podAntiAffinity"
    )
    kinds = {d.kind for d in gateway.docs}
    assert {"Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    hpa = next(d for d in gateway.docs if d.kind == "HorizontalPodAutoscaler").data
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] >= 2
    assert gateway.config.inbound.enabled, "a shared gateway needs inbound protection"
    policy = next(d for d in gateway.docs if d.kind == "NetworkPolicy").data["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule.get("ports", [])}
    assert egress_ports == {53, 443}


def _uses_workload_identity(gateway: Gateway) -> bool:
    labels = gateway.deployment.data["spec"]["template"]["metadata"]["labels"]
    return bool(labels.get(WORKLOAD_IDENTITY_LABEL) == "true")


def test_a_workload_identity_variant_exists() -> None:
    assert any(_uses_workload_identity(g) for g in GATEWAYS)


@pytest.mark.parametrize("gateway", [g for g in GATEWAYS if _uses_workload_identity(g)], ids=_gw_id)
def test_workload_identity_needs_no_secret(gateway: Gateway) -> None:
    accounts = _by_kind(gateway.docs, "ServiceAccount")
    account = accounts[gateway.pod["serviceAccountName"]].data
    assert account["metadata"]["annotations"][WORKLOAD_IDENTITY_CLIENT_ID]
    for route in gateway.config.routes.values():
        if isinstance(route.auth, KeyAuth):
            # Keys are secrets, unless the gateway reads them from Key Vault with its workload identity.
            assert isinstance(route.auth.primary, KeyVaultRef) and isinstance(
                route.auth.secondary, KeyVaultRef
            )
            identities = [gateway.config.keyvault.identity, route.auth.identity]
        else:
            assert isinstance(route.auth, AadTokenAuth), "workload identity routes use Entra tokens"
            identities = [route.auth.identity]
        for identity in identities:
            assert identity is not None
            assert identity.client_secret is None and identity.certificate is None
            assert identity.managed_identity is None
    assert not _by_kind(gateway.docs, "Secret"), "nothing secret is needed"
    assert not any("secret" in v for v in gateway.mounts.values())


@pytest.mark.parametrize("gateway", [g for g in GATEWAYS if not _uses_workload_identity(g)], ids=_gw_id)
def test_key_routes_read_keys_from_files(gateway: Gateway) -> None:
    for route in gateway.config.routes.values():
        if isinstance(route.auth, KeyAuth) and route.auth.from_endpoint is None:
            # Files, not environment variables: a rotated Secret reaches the gateway without a restart.
            assert isinstance(route.auth.primary, FileRef)
            assert isinstance(route.auth.secondary, FileRef)


# ------------------------------------------------------------------------------------- key rotation

CRONJOBS = [doc for doc in DOCS if doc.kind == "CronJob"]


@pytest.mark.parametrize("cronjob", CRONJOBS, ids=str)
def test_rotation_cronjob_runs_gateway_rotate_with_workload_identity(cronjob: Doc) -> None:
    from gateway.rotate import make_plan

    spec = cronjob.data["spec"]
    assert spec["concurrencyPolicy"] == "Forbid", "two rotations of one endpoint must never overlap"
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0, "a failed rotation is looked at, not retried blindly"
    template = job["template"]
    pod = template["spec"]
    assert template["metadata"]["labels"][WORKLOAD_IDENTITY_LABEL] == "true"
    docs = folder_docs(cronjob.path.parent)
    account = _by_kind(docs, "ServiceAccount")[pod["serviceAccountName"]].data
    assert account["metadata"]["annotations"][WORKLOAD_IDENTITY_CLIENT_ID]
    assert not _by_kind(docs, "Secret"), "workload identity: nothing secret is needed"
    (container,) = pod["containers"]
    assert container["image"] == GATEWAY_IMAGE
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    words = argv(container)
    assert words[0] == "gateway"
    args = _parser().parse_args(words[1:])
    assert args.command == "rotate" and not args.dry_run
    # The ConfigMap the gateways use, mounted where --config points, holds a route rotate can plan.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    directory, filename = posixpath.split(args.config)
    config_map = _by_kind(docs, "ConfigMap")[mounts[directory]["configMap"]["name"]]
    config = parse_config(yaml.safe_load(config_map.data["data"][filename]), str(config_map))
    plan = make_plan(config, str(config_map), args.route, slots=None, settle_s=None, verify_url=None)
    assert [s.slot for s in plan.slots] == ["secondary", "primary"]
    assert all(s.source == "keyvault" for s in plan.slots)
    assert plan.settle_s > config.keyvault.refresh_every_s
    gateways = [g for g in GATEWAYS if g.folder == cronjob.path.parent]
    assert gateways and all(g.config.routes[args.route] == config.routes[args.route] for g in gateways)
    assert mounts.get("/tmp", {}).get("emptyDir") is not None
