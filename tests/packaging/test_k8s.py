"""packaging/k8s, validated offline: each manifest against the Kubernetes API's JSON schemas
(kubernetes-validate bundles them; strict, so a misspelt field is an error) for the oldest
and newest versions we claim, the ServiceMonitor against prometheus-operator's CRD schema
(vendored in schemas/, made strict the same way); then the facts that tie the files
together: probes on /health at the port the server listens on, one GPU per pod, the image's
non-root user and cache volume, the Service, ServiceMonitor and autoscaler pointing at what
exists, and the autoscaler's metric being the one prometheus-adapter's rule serves (the live
server's /metrics has it: tests/app/server/test_deploy_queries.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.packaging.deploy_queries import K8S, adapter_rules

#: The Kubernetes versions the manifests are checked against: autoscaling/v2 and the probes'
#: fields as used here are GA in both.
VERSIONS = ["1.29", kubernetes_validate.utils.latest_version()]
SERVICE_MONITOR_SCHEMA = Path(__file__).with_name("schemas") / "servicemonitor-v1.json"
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load(name: str) -> dict:
    (doc,) = list(yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")))
    return doc


def by_kind() -> dict[str, dict]:
    return {load(name)["kind"]: load(name) for name in MANIFESTS}


def strict(schema: dict) -> dict:
    """The schema with ``additionalProperties: false`` wherever it lists properties and says
    nothing of others: the API server prunes unknown fields of a custom resource silently,
    so a misspelt field would otherwise pass and do nothing."""
    schema = copy.deepcopy(schema)

    def close(node) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def service_monitor_validator() -> jsonschema.Draft4Validator:
    schema = json.loads(SERVICE_MONITOR_SCHEMA.read_text(encoding="utf-8"))
    schema.pop("$comment")
    return jsonschema.Draft4Validator(strict(schema))  # OpenAPI v3's schemas are draft 4's


def test_every_manifest_is_a_kind_we_validate():
    assert {load(n)["kind"] for n in MANIFESTS} == {"Deployment", "PersistentVolumeClaim", "Service",
                                                     "ServiceMonitor", "HorizontalPodAutoscaler", "ConfigMap"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", [n for n in MANIFESTS if n != "servicemonitor.yaml"])
def test_manifest_matches_the_kubernetes_schema(name, version):
    kubernetes_validate.validate(load(name), version, strict=True)  # raises with the path and reason


def test_service_monitor_matches_prometheus_operators_schema():
    doc = load("servicemonitor.yaml")
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in service_monitor_validator().iter_errors(doc)]
    assert not errors, "\n".join(errors)


def test_the_validators_catch_a_misspelt_field():
    deployment = load("deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/health"}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    monitor = load("servicemonitor.yaml")
    monitor["spec"]["endpoints"][0]["honourLabels"] = True
    monitor["spec"]["endpoints"][0]["interval"] = "often"
    messages = [e.message for e in service_monitor_validator().iter_errors(monitor)]
    assert any("honourLabels" in m for m in messages) and any("'often' does not match" in m for m in messages)


def container() -> dict:
    (c,) = load("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c["env"]}


def test_probes_ask_health_on_the_servers_port():
    c = container()
    (port,) = c["ports"]
    assert env_of(c)["HEARTH_PORT"] == str(port["containerPort"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] == port["name"], probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "a model may load for minutes"


def test_one_gpu_per_pod_non_root_with_the_cache_volume():
    spec = load("deployment.yaml")["spec"]["template"]["spec"]
    c = container()
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 1
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == pod["runAsGroup"] == pod["fsGroup"] == 10001
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    dockerfile = (K8S.parent / "docker" / "Dockerfile").read_text()
    assert "USER 10001:10001" in dockerfile and 'VOLUME ["/cache"]' in dockerfile  # the image's
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/cache"]]["persistentVolumeClaim"]["claimName"] == load("pvc.yaml")["metadata"]["name"]
    assert "emptyDir" in volumes[mounts["/tmp"]]  # the root file system is read-only
    key_file = env_of(c)["HEARTH_API_KEY_FILE"]
    key_volume = volumes[mounts[str(Path(key_file).parent)]]["secret"]
    assert Path(key_file).name == "api-key" and key_volume["secretName"] == "hearth-api-key"


def test_service_monitor_and_autoscaler_point_at_what_exists():
    kinds = by_kind()
    deployment, service, monitor, hpa = (kinds[k] for k in
                                         ("Deployment", "Service", "ServiceMonitor", "HorizontalPodAutoscaler"))
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == container()["ports"][0]["name"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    # The server's hearth_requests_total has an `endpoint` label, which the operator also puts
    # on every target: only honorLabels keeps the server's (the dashboard groups by it).
    assert endpoint["honorLabels"] is True
    assert endpoint["authorization"]["credentials"] == {"name": "hearth-api-key", "key": "api-key"}

    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    (rule,) = adapter_rules()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}  # per pod, as a Pods metric needs


def test_kustomization_applies_every_manifest_but_the_adapters():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [n for n in MANIFESTS if n != "prometheus-adapter.yaml"]
    (image,) = kustomization["images"]
    assert container()["image"].split(":")[0] == image["name"]
