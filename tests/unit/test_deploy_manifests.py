"""deploy/: Kubernetes manifests, the KServe InferenceService, docker compose, Prometheus and Grafana.

Kubernetes objects are validated offline against the API schemas that `kubernetes-validate` bundles,
strictly (unknown fields are errors), for the oldest and the newest Kubernetes it knows. KServe's
InferenceService is a custom resource those schemas lack: its pod part is validated as a Kubernetes
PodSpec, the rest against a small JSON schema of the KServe v1beta1 fields used here (written from
KServe's Go types, not KServe's own CRD, which is not available offline). compose.yaml has no
validator here (no Docker engine or compose plugin): it is parsed and checked field by field.
Everything that must agree across files is checked to agree: SERVE_* settings parse with the
server's own settings code, ports, probe paths, names, the image tag and the user id.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from service import metrics
from service.settings import Settings, from_sources
from tests.unit.test_dockerfile import DOCKERFILE, parse_dockerfile, stage_env

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
KUBERNETES_VERSIONS = [all_versions()[0], all_versions()[-1]]


def load_all(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def core_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_all(path)]


def objects_by_kind() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for doc in core_objects():
        assert doc["kind"] not in found, f"two {doc['kind']} objects: the checks below expect one of each"
        found[doc["kind"]] = doc
    return found


def image_env() -> dict[str, str]:
    return stage_env(parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8")), "serve")


def env_settings(container: dict[str, Any]) -> Settings:
    """The server settings a container's SERVE_* values give (on top of the image's)."""
    env = {k: v for k, v in image_env().items() if k.startswith("SERVE_")}
    env.update(
        {e["name"]: e["value"] for e in container.get("env", []) if e["name"].startswith("SERVE_") and "value" in e}
    )
    return from_sources(flags={}, environ=env)


def image_uid() -> int:
    instructions = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    user = next(i.args for i in instructions if i.stage == "serve" and i.keyword == "USER")
    return int(user.split(":")[0])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_objects_match_the_api_schemas(version: str) -> None:
    objects = core_objects()
    assert {o["kind"] for o in objects} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
    }
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_deployment_serves_on_a_gpu_as_a_non_root_user() -> None:
    objects = objects_by_kind()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid()
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["image"] == f"imgclf:{VERSION}"
    settings = env_settings(container)
    assert settings.enable_management is False and settings.host == "0.0.0.0"
    assert pod["terminationGracePeriodSeconds"] > settings.drain_timeout_s


def test_deployment_probes_ports_and_volume_agree_with_the_server() -> None:
    objects = objects_by_kind()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = env_settings(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.http_port, "grpc": settings.grpc_port, "metrics": settings.metrics_port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == settings.metrics_port
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    (volume,) = (name for name, path in mounts.items() if Path(path) == settings.model_store)
    assert claims[volume] == objects["PersistentVolumeClaim"]["metadata"]["name"]


def test_service_and_autoscaler_point_at_the_deployment() -> None:
    objects = objects_by_kind()
    deployment, service, hpa = objects["Deployment"], objects["Service"], objects["HorizontalPodAutoscaler"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == container_ports
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


# The fields of serving.kserve.io/v1beta1 InferenceService used here (KServe's PredictorSpec inlines a
# PodSpec, validated separately, and a ComponentExtensionSpec, whose fields are listed).
COMPONENT_EXTENSION = {
    "minReplicas": {"type": "integer", "minimum": 0},
    "maxReplicas": {"type": "integer", "minimum": 0},
    "scaleTarget": {"type": "integer", "minimum": 1},
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "containerConcurrency": {"type": "integer", "minimum": 0},
    "timeout": {"type": "integer", "minimum": 1},
    "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
}
INFERENCE_SERVICE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                # KServe requires a DNS-1035 label (it becomes a Knative service and a host name)
                "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["predictor"],
            "additionalProperties": False,
            "properties": {"predictor": {"type": "object", "required": ["containers"]}},
        },
    },
}


def test_inference_service_is_a_custom_v2_predictor_of_our_image() -> None:
    (isvc,) = load_all(K8S / "kserve" / "inferenceservice.yaml")
    jsonschema.validate(isvc, INFERENCE_SERVICE_SCHEMA)
    predictor = isvc["spec"]["predictor"]
    extension = {k: v for k, v in predictor.items() if k in COMPONENT_EXTENSION}
    jsonschema.validate(extension, {"type": "object", "properties": COMPONENT_EXTENSION})
    pod_spec = {k: v for k, v in predictor.items() if k not in COMPONENT_EXTENSION}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, KUBERNETES_VERSIONS[-1], strict=True)  # also rejects unknown fields

    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container" and container["image"] == f"imgclf:{VERSION}"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PROTOCOL"] == "v2"  # how a custom predictor states its protocol to KServe
    claim = load_all(K8S / "pvc.yaml")[0]["metadata"]["name"]
    assert env["STORAGE_URI"].startswith(f"pvc://{claim}/")
    settings = env_settings(container)
    assert settings.model_store == Path("/mnt/models")  # where KServe puts STORAGE_URI
    assert settings.enable_management is False
    (port,) = container["ports"]  # Knative routes exactly one port
    assert port == {"name": "http1", "containerPort": settings.http_port, "protocol": "TCP"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["securityContext"]["runAsUser"] == image_uid()
    assert int(isvc["metadata"]["annotations"]["prometheus.kserve.io/port"]) == settings.metrics_port


def compose() -> dict[str, Any]:
    (doc,) = load_all(DEPLOY / "compose.yaml")
    return doc


def test_compose_builds_the_serve_image_and_mounts_files_that_exist() -> None:
    services = compose()["services"]
    assert set(services) == {"serve", "prometheus", "grafana"}
    serve = services["serve"]
    assert (DEPLOY / serve["build"]["context"] / "Dockerfile").resolve() == DOCKERFILE
    assert serve["build"]["target"] == "serve" and serve["image"] == f"imgclf:{VERSION}"
    settings = from_sources(flags={}, environ={**image_env(), **serve["environment"]})
    published = {int(p.split(":")[-1]) for p in serve["ports"]}
    assert published == {settings.http_port, settings.grpc_port}
    (device,) = serve["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert services["grafana"]["profiles"] == ["grafana"]  # optional
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists() or source == "../model_store", volume


def test_prometheus_scrapes_the_serve_metrics_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    metrics_port = from_sources(flags={}, environ=image_env()).metrics_port
    assert static["targets"] == [f"serve:{metrics_port}"]
    assert job["metrics_path"] == "/metrics"
    mounted = [v for v in compose()["services"]["prometheus"]["volumes"] if v.startswith("./prometheus.yml:")]
    assert mounted == ["./prometheus.yml:/etc/prometheus/prometheus.yml:ro"]


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    result = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "imgclf.json").read_text(encoding="utf-8"))
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_queries_only_metrics_the_server_exports() -> None:
    exported = {family.name for family in metrics.REGISTRY.collect()}  # without _total, _bucket, ...
    queries = dashboard_queries()
    assert queries
    for query in queries:
        for name in re.findall(r"\binference_\w+", query):
            base = re.sub(r"_(bucket|sum|count|total)$", "", name)
            assert base in exported, f"{name} is not a metric of service/metrics.py"
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert datasource["datasources"][0]["uid"] == "prometheus"
