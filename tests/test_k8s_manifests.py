"""Kubernetes manifests (docker/k8s/): rendered as kubectl apply -k would take them (every resource
the kustomization lists), checked for what ties them together and to the server: selectors and
labels, ports, probes, the drain, the autoscaler's metric. Schemas and security rules are checked
by `make k8s-check` (kubernetes-validate and checkov); no cluster and no kustomize are needed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.api.metrics import ServerMetrics
from server.cli import SHUTDOWN_BACKSTOP_S
from server.settings import Settings

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "docker" / "k8s"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def rendered() -> dict[str, dict[str, Any]]:
    """The kustomization's resources by kind (one of each)."""
    docs = [doc for name in kustomization()["resources"] for doc in yaml.safe_load_all((K8S / name).read_text())
            if doc]
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds), kinds
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module")
def res() -> dict[str, dict[str, Any]]:
    return rendered()


@pytest.fixture(scope="module")
def container(res) -> dict[str, Any]:
    [c] = res["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A port given by number or by name, as the container's port number."""
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in container["ports"]], port
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_every_manifest_is_in_the_kustomization_and_parses():
    listed = set(kustomization()["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    kinds = set(rendered())
    assert kinds == {"Deployment", "Service", "ServiceMonitor", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
                     "NetworkPolicy"}


def test_selectors_match_the_pods_labels(res):
    deploy, service = res["Deployment"], res["Service"]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert selects(deploy["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(service["spec"]["selector"], pod_labels)
    assert selects(res["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"], pod_labels)
    monitor = res["ServiceMonitor"]["spec"]
    assert selects(monitor["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert {e["path"] for e in monitor["endpoints"]} == {"/metrics"}


def test_ports_and_probes_reach_the_servers_port(res, container):
    image_port = re.search(r"CTC_PORT=(\d+)", (REPO / "Dockerfile").read_text()).group(1)
    assert "CTC_PORT" not in env(container)
    port = container_port(container, "http")
    assert port == int(image_port) == Settings.model_fields["port"].default
    [svc_port] = res["Service"]["spec"]["ports"]
    assert container_port(container, svc_port["targetPort"]) == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and container_port(container, get["port"]) == port, probe
    [rule] = res["NetworkPolicy"]["spec"]["ingress"]
    assert [container_port(container, p["port"]) for p in rule["ports"]] == [port]
    scrape = res["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert scrape["prometheus.io/scrape"] == "true" and int(scrape["prometheus.io/port"]) == port
    assert scrape["prometheus.io/path"] == "/metrics"


def test_env_names_real_settings(container):
    fields = {f"CTC_{name.upper()}" for name in Settings.model_fields}
    assert set(env(container)) <= fields


def test_drain_fits_in_the_grace_period_and_liveness_outlasts_it(res, container):
    """SIGTERM comes after preStop; then the drain (CTC_SHUTDOWN_TIMEOUT) and the backstop in which
    uvicorn sends the final messages. /health is 503 all that time: liveness must not restart the pod."""
    pod = res["Deployment"]["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = int(env(container).get("CTC_SHUTDOWN_TIMEOUT", Settings.model_fields["shutdown_timeout"].default))
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain + SHUTDOWN_BACKSTOP_S
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > drain + SHUTDOWN_BACKSTOP_S
    ready = container["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] <= 10  # out of the Service soon after a drain starts


def test_gpu_model_volume_and_security(res, container):
    pod = res["Deployment"]["spec"]["template"]["spec"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    models = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]
    assert models["claimName"] == res["PersistentVolumeClaim"]["metadata"]["name"]
    assert models["readOnly"] and mounts["/models"]["readOnly"]
    assert env(container)["CTC_MODEL"].startswith("/models/")
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # the image's caches, on a read-only root
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]


def test_image_tag_agrees_with_the_kustomization(container):
    [image] = kustomization()["images"]
    name, _, tag = container["image"].partition(":")
    assert image["name"] == name and image["newTag"] == tag


def test_autoscaler_scales_the_deployment_on_the_adapters_metric(res):
    hpa, deploy = res["HorizontalPodAutoscaler"]["spec"], res["Deployment"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deploy["metadata"]["name"]}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    [metric] = hpa["metrics"]
    name = metric["pods"]["metric"]["name"]
    families = text_string_to_metric_families(ServerMetrics().render().decode())
    gauges = {f.name for f in families if f.type == "gauge"}
    assert name == "ctc_num_requests_waiting" and name in gauges  # the server's own, by its exact name
    [rule] = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert re.match(rf"{name}\{{", rule["seriesQuery"])
    assert re.fullmatch(rule["name"]["matches"], name) and rule["name"]["as"] == name
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]
